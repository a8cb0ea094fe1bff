"""The key slots of a store, changed in place: ``dcmfs key add|remove|change``.

Each operation rewraps the master key only (no object, no index record is
touched), so it takes the same time whatever the store holds, and works
while the store is mounted: it holds the header lock (a ``flock`` on the
store directory), not the store lock a daemon keeps, and the daemon never
reads the header again after it opened the store.  It is authorised by a
secret that opens an existing slot, and writes the new header with the
durable-write helper (temp file, fsync, rename, fsync of the directory),
so a crash at any step leaves the old slot table or the new one.  A
single-wrap header (formats 1-3) is turned into a slot table first, in the
same replace.

Every change is logged (``key slots: ...``) with slot ids, kinds and labels,
never a secret, and described in ``report`` (a dict the caller passes) for
the sealed audit trail: the public fields of the change, and under
``master``/``store_id`` what the caller needs to seal the record with
(:mod:`dcmfs.app.keyaudit`).
"""

from __future__ import annotations

from . import slots
from .header import Secret, read_header, rewrite_header, unlock, upgrade
from ..errors import KeySlotError, WrongKeyError


def list_slots(root: str) -> list[dict]:
    """The slots of the store at ``root`` (id, kind, label, created; no key
    needed, nothing secret).  A single-wrap header shows as slot 1,
    ``legacy``."""
    header = read_header(root)
    if "slots" not in header:
        return [{"id": 1, "kind": header["key"]["kind"], "label": "(single-wrap header)",
                 "created": None, "legacy": True}]
    return [{k: s.get(k) for k in ("id", "kind", "label", "created", "changed")
             if s.get(k) is not None} for s in header["slots"]]


def _opened(root: str, header: dict, secret: Secret) -> tuple[dict, dict, dict]:
    """(the header as a slot table, {epoch: key}, the slot that opened)."""
    try:
        keys, slot = unlock(root, header, secret)
    except WrongKeyError as err:
        err.store_root = root  # the audit trail notes the attempt
        raise
    if "slots" not in header:
        header = upgrade(root, header, secret, keys[0], slot["kek"])  # single wrap: epoch 0
        slot = header["slots"][0]
    return header, keys, slot


def _report(report: dict | None, header: dict, keys: dict, by: dict, **fields) -> None:
    """What a change did, for the audit trail: its fields, the authorising
    slot (id and kind), and the store key and id to seal the record."""
    if report is not None:
        report.update(fields, by=by["id"], by_kind=by["kind"],
                      master=slots.master_of(header, keys),
                      store_id=bytes.fromhex(header["store_id"]), keys=dict(keys),
                      master_epoch=slots.master_epoch(header))


def changed_as_reported(root: str, master: bytes, fields: dict) -> bool:
    """Does the store's authentic header (read afresh, its mac checked with
    ``master``) show the change ``fields`` describe?  A running daemon
    checks what ``dcmfs key`` asks it to record (action ``add``/``change``:
    the slot is there with that kind; ``remove``: it is gone; ``rotate``:
    the epoch is the newest; ``rotate-finish``: the destroyed epochs are)."""
    import hmac
    header = read_header(root)
    if "slots" not in header or not hmac.compare_digest(
            header["mac"], slots.header_mac(master, header)):
        return False
    action, by_id = fields.get("action"), {s["id"]: s for s in header["slots"]}
    if action in ("add", "change"):
        slot = by_id.get(fields.get("slot"))
        return slot is not None and slot["kind"] == fields.get("kind")
    if action == "remove":
        return fields.get("slot") not in by_id
    if action == "rotate":
        return header.get("epoch") == fields.get("epoch")
    if action == "recipient":
        return header.get("ingest", {}).get("kind") == fields.get("kind")
    if action == "rotate-finish":
        gone = {d["epoch"] for d in header.get("destroyed", [])}
        return set(fields.get("destroyed") or ()) <= gone \
            and header.get("epoch") == fields.get("epoch")
    return False


def _slot(header: dict, slot_id: int) -> dict:
    for s in header["slots"]:
        if s["id"] == slot_id:
            return s
    raise KeySlotError(f"The store has no key slot {slot_id}; 'dcmfs key list' shows its "
                       "slots.")


def add_slot(root: str, secret: Secret, new: Secret, label: str, kdf: dict,
             step=None, report: dict | None = None) -> int:
    """Add a slot for ``new`` (authorised by ``secret``); returns its id.

    Raises
    ------
    WrongKeyError, HeaderAlteredError
        ``secret`` opens no slot, or the header was altered.
    """
    slots.check_label(label)
    added = {}

    def change(header: dict) -> dict:
        header, keys, by = _opened(root, header, secret)
        slot = slots.new_slot(header["next_slot"], new, label, kdf)
        header["next_slot"] += 1
        header["slots"].append(slots.enrol(header, keys, new, slot))
        added.update(id=slot["id"], by=by["id"])
        _report(report, header, keys, by, action="add", slot=slot["id"], kind=new.kind,
                label=label)
        return slots.seal_header(slots.master_of(header, keys), header)

    rewrite_header(root, change, step)
    slots.log.info("key slots: slot %d (%s, label %r) added, authorised by slot %d",
                   added["id"], new.kind, label, added["by"])
    return added["id"]


def remove_slot(root: str, secret: Secret, slot_id: int, step=None,
                report: dict | None = None) -> None:
    """Remove slot ``slot_id`` (authorised by ``secret``, which may be that
    slot's own).

    Raises
    ------
    KeySlotError
        There is no such slot, or it is the last one.
    """
    done = {}

    def change(header: dict) -> dict:
        header, keys, by = _opened(root, header, secret)
        gone = _slot(header, slot_id)
        if len(header["slots"]) == 1:
            raise KeySlotError(f"Slot {slot_id} is the store's last key slot; add another "
                               "('dcmfs key add') before removing it, or nothing could "
                               "open the store.")
        slots.drop(header, slot_id)
        done.update(kind=gone["kind"], label=gone["label"], by=by["id"])
        _report(report, header, keys, by, action="remove", slot=slot_id, kind=gone["kind"],
                label=gone["label"])
        return slots.seal_header(slots.master_of(header, keys), header)

    rewrite_header(root, change, step)
    slots.log.info("key slots: slot %d (%s, label %r) removed, authorised by slot %d",
                   slot_id, done["kind"], done["label"], done["by"])


def change_slot(root: str, secret: Secret, slot_id: int, new: Secret, label: str | None,
                kdf: dict, step=None, report: dict | None = None) -> None:
    """Give slot ``slot_id`` a new secret (and kind, and label if given),
    authorised by ``secret``.

    Raises
    ------
    KeySlotError
        There is no such slot.
    """
    done = {}

    def change(header: dict) -> dict:
        header, keys, by = _opened(root, header, secret)
        old = _slot(header, slot_id)
        slot = slots.new_slot(slot_id, new, label or old["label"], kdf)
        slot["created"] = old.get("created") or slot["created"]
        slot["changed"] = slots.now()
        # a new key pair: the old secret, with a copy of the old header,
        # opens no epoch made after the change
        slots.drop(header, slot_id)
        header["slots"].append(slots.enrol(header, keys, new, slot))
        header["slots"].sort(key=lambda s: s["id"])
        done.update(old=old["kind"], by=by["id"])
        _report(report, header, keys, by, action="change", slot=slot_id, kind=new.kind,
                old_kind=old["kind"], label=slot["label"])
        return slots.seal_header(slots.master_of(header, keys), header)

    rewrite_header(root, change, step)
    slots.log.info("key slots: slot %d changed (%s -> %s), authorised by slot %d",
                   slot_id, done["old"], new.kind, done["by"])


def rotate(root: str, secret: Secret, step=None, in_use: bool = False,
           report: dict | None = None, lock_held: bool = False) -> tuple[int, bytes]:
    """Start a new key epoch (authorised by ``secret``): a random data key
    sealed to every slot; chunks are sealed under it from the next opening
    on, or at once by a running daemon that is handed the key (``in_use``:
    the caller does that, :meth:`dcmfs.core.control.StoreOps.adopt_epoch`).
    Returns (the new epoch, its key).  ``lock_held``: the caller holds the
    store lock.

    Raises
    ------
    StoreLockedError
        The store is open and ``in_use`` is False.
    """
    from .header import StoreLock
    from ..errors import StoreLockedError
    try:
        lock = None if lock_held else StoreLock(root)
    except StoreLockedError as exc:
        if not in_use:
            raise StoreLockedError(f"The store {root} is open in another dcmfs process that "
                                   "is not a mount (fsck, verify, recompress); try again when "
                                   "it is done.") from exc
        lock = None
    done = {}
    try:
        def change(header: dict) -> dict:
            header, keys, by = _opened(root, header, secret)
            done["epoch"], done["key"] = slots.rotate(header, slots.master_of(header, keys))
            done["by"] = by["id"]
            _report(report, header, keys, by, action="rotate", epoch=done["epoch"])
            return slots.seal_header(slots.master_of(header, keys), header)

        rewrite_header(root, change, step)
    finally:
        if lock is not None:
            lock.release()
    slots.log.info("key epochs: rotation to epoch %d started, authorised by slot %d; "
                   "'dcmfs key rotate --finish' seals older chunks again",
                   done["epoch"], done["by"])
    return done["epoch"], done["key"]


def epoch_key_authentic(root: str, master: bytes, epoch: int, key: bytes) -> bool:
    """Is ``key`` the key of ``epoch``, the newest epoch of the store's
    authentic header?  (A running daemon checks what it is handed.)"""
    import hmac
    header = read_header(root)
    if "epochs" not in header or header.get("epoch") != epoch or not hmac.compare_digest(
            header["mac"], slots.header_mac(master, header)):
        return False
    entry = next(e for e in header["epochs"] if e["epoch"] == epoch)
    return hmac.compare_digest(entry.get("check", ""),
                               slots.epoch_check(master, header["store_id"], epoch, key))


def retire(root: str, master: bytes, epochs: set[int]) -> list[int]:
    """Destroy the data keys of ``epochs`` (no chunk uses them any more; the
    caller checked, under the store lock), except the master's (epoch 0, the
    store key, until a generation move), which also seals the index: it is
    marked ``retired`` (it seals no file contents any more).  ``master``
    (the master key) authenticates the header read afresh.  Returns the
    epochs destroyed."""
    import hmac
    from ..errors import HeaderAlteredError
    gone: list[int] = []

    def change(header: dict) -> dict:
        if not hmac.compare_digest(header["mac"], slots.header_mac(master, header)):
            raise HeaderAlteredError(f"The store header at {root} was altered by someone "
                                     "without the key; nothing was destroyed.")
        master_epoch = slots.master_epoch(header)
        for entry in list(header["epochs"]):
            if entry["epoch"] == master_epoch and master_epoch in epochs \
                    and header["epoch"] != master_epoch:
                entry.setdefault("retired", slots.now())  # seals no contents any more
            elif entry["epoch"] in epochs and entry["epoch"] != header["epoch"]:
                slots.destroy(header, entry["epoch"])
                gone.append(entry["epoch"])
        return slots.seal_header(master, header)

    rewrite_header(root, change)
    for epoch in gone:
        slots.log.info("key epochs: the key of epoch %d was destroyed (no chunk uses it)", epoch)
    return gone


def move_master(root: str, master: bytes, keys: dict[int, bytes], gen: int,
                epochs: set[int], step=None) -> list[int]:
    """Make epoch ``gen`` (the newest) the store's master (feature
    ``key-generations-v1``) and destroy ``epochs`` - epoch 0, the store key,
    among them: the caller sealed the index side under ``gen`` and no chunk
    uses them (:mod:`dcmfs.opened.regen`).  One header replace: the mac, the
    epochs' checks and the ingest wrap move to the new master, and the old
    epochs' entries (their keys sealed to every slot) leave the header, so
    the slots wrap only the newer keys from then on.  ``master`` (the master
    the caller opened the store with) authenticates the header read afresh;
    ``keys``: {epoch: key} of every live epoch.  Returns the epochs destroyed."""
    import hmac
    from . import inbox
    from ..errors import HeaderAlteredError
    gone: list[int] = []

    def change(header: dict) -> dict:
        if not hmac.compare_digest(header["mac"], slots.header_mac(master, header)):
            raise HeaderAlteredError(f"The store header at {root} was altered by someone "
                                     "without the key; nothing was destroyed.")
        if header["epoch"] != gen:
            raise KeySlotError("The store was rotated again meanwhile; run 'dcmfs key rotate "
                               "--finish' again.")
        new = keys[gen]
        sid = header["store_id"]
        if header.get("ingest") is not None:
            private = inbox.open_entry(master, bytes.fromhex(sid), header["ingest"])
            header["ingest"] = inbox.wrap_entry(new, bytes.fromhex(sid), header["ingest"],
                                                private)
        header["master"] = gen
        header["features"] = sorted(set(header["features"]) | {slots.GENERATIONS_FEATURE})
        for entry in list(header["epochs"]):
            if entry["epoch"] in epochs and entry["epoch"] != gen:
                slots.destroy(header, entry["epoch"])
                gone.append(entry["epoch"])
        for entry in header["epochs"]:
            if "check" in entry:  # what a daemon handed the key checks it against
                entry["check"] = slots.epoch_check(new, sid, entry["epoch"],
                                                   keys[entry["epoch"]])
        return slots.seal_header(new, header)

    rewrite_header(root, change, step)
    for epoch in gone:
        slots.log.info("key epochs: the key of epoch %d was destroyed (no chunk, index record "
                       "or audit record uses it)%s", epoch,
                       " - the store key made with the store" if epoch == 0 else "")
    slots.log.info("key generations: epoch %d is the store's master key from now on", gen)
    return gone


def list_epochs(root: str) -> list[dict]:
    """The key epochs: live ones (``current`` marks the newest, ``master`` the
    one the index and header keys come from) and destroyed ones, with dates
    (no key needed)."""
    header = read_header(root)
    if "epochs" not in header:
        return [{"epoch": 0, "state": "current"}]
    master = slots.master_epoch(header)
    out = [{"epoch": e["epoch"], "created": e.get("created"),
            "state": ("current" if e["epoch"] == header["epoch"] else
                      "retired" if e.get("retired") else "live"),
            **({"master": True} if e["epoch"] == master else {})}
           for e in header["epochs"]]
    out += [{"epoch": d["epoch"], "destroyed": d.get("destroyed"), "state": "destroyed"}
            for d in header.get("destroyed", [])]
    return sorted(out, key=lambda e: e["epoch"])


def recipient(root: str, secret: Secret, kind: str | None = None, step=None,
              report: dict | None = None):
    """The store's ingest recipient (:mod:`.inbox`), created first if it has
    none (authorised by ``secret``; feature ``ingest-v1``): its public
    half, read from the header once its mac is checked, so what is exported
    is what a key holder wrote.  ``kind``: ``x25519`` (the default when
    creating) or ``rsa-oaep-3072``.

    Raises
    ------
    KeySlotError
        The store has a recipient of the other kind.
    """
    from . import inbox
    done: dict = {}

    def change(header: dict) -> dict:
        header, keys, by = _opened(root, header, secret)
        entry = header.get("ingest")
        if entry is not None:
            if kind is not None and entry["kind"] != kind:
                raise KeySlotError(f"The store has a recipient of kind {entry['kind']} already; "
                                   "it is made once (export it without --rsa).")
            done.update(entry=entry, new=False)
            return header
        store_id = bytes.fromhex(header["store_id"])
        header["ingest"] = inbox.new_entry(slots.master_of(header, keys), store_id,
                                           kind or "x25519", slots.now())
        header["features"] = sorted(set(header["features"]) | {inbox.FEATURE})
        done.update(entry=header["ingest"], new=True, by=by["id"])
        _report(report, header, keys, by, action="recipient", kind=header["ingest"]["kind"])
        return slots.seal_header(slots.master_of(header, keys), header)

    header = rewrite_header(root, change, step)
    if done["new"]:
        slots.log.info("ingest: a %s recipient key pair was created, authorised by slot %d",
                       done["entry"]["kind"], done["by"])
    return inbox.Recipient(bytes.fromhex(header["store_id"]), int(header["chunk_size"]),
                           done["entry"]["kind"], bytes.fromhex(done["entry"]["public"]))
