"""``dcmfs fsck --rebuild-index``: a new index from the sealed snapshots, the
journal records and the objects (see ``docs/format.md``, "Integrity")."""

from __future__ import annotations

import logging
import os
import shutil
import time

from .. import format as fmt
from ..index import JOURNAL_NAME, Index, Witness, index_key
from ..index.follow import apply_available, read_records
from ..index.keygen import mark as mark_generation
from ..index.snapshots import archive_segments, legacy_snapshots, snapshots
from ..opened.follow import in_bucket
from ..opened.store import OpenedStore
from ..errors import StoreIOError
from ..storage.durable import fsync_dir

log = logging.getLogger("dcmfs")


def rebuild_index(opened: OpenedStore, known_seq: int = 0,
                  published: list[str] | None = None) -> dict:
    """Move the index aside and build a new one from the newest snapshot that
    opens and the journal records after it whose objects are intact; returns
    what was used.  ``opened`` is the store opened without its index (it
    holds the lock and the objects).  The caller then runs the repair
    (:class:`Fsck`), which reconciles the result with the objects.

    The journals read are the archive segments and the journals of every
    index moved aside so far (a rebuild interrupted after the move loses
    nothing).  Afterwards the archive segments join the moved-aside index:
    the history before the rebuild is closed, so a later rebuild can never
    roll records of it onto the new one; numbering continues above every
    sequence number seen.

    ``published`` (``dcmfs attach``: every journal came from the bucket):
    the journal files the writer published for followers
    (:func:`dcmfs.opened.follow.download_published`), read with the archive
    segments, overlapping in any order; one that is not this store's
    journal is skipped (``published_skipped``), and what it held counts as
    missing.  Their records are applied as a follower applies them
    (:func:`dcmfs.index.follow.apply_available`): the longest run after
    which every chunk entry names an object the bucket holds.  A record
    naming an object that left the bucket since (the file was deleted or
    rewritten later, the chunk re-encoded before its upload) does not stop
    the run when a later record drops that entry; a local rebuild stops at
    the first record whose object is missing or torn.

    ``records_missing`` in the result: how many journal records the store
    is known to have had past what the rebuild found (``known_seq``: the
    newest record the writer published for followers; or this machine's
    witness), lost with the index: their inline objects are nowhere else.
    A session that ended cleanly journals one record after its last
    snapshot (its bookkeeping), which is not counted.
    """
    store, config = opened.store, opened.config
    root = store.root
    index_dir = os.path.join(root, fmt.INDEX_DIR)
    snap_dir = os.path.join(root, fmt.SNAPSHOTS_DIR)
    if opened.index is not None:
        raise ValueError("rebuild_index needs a store opened without its index")
    earlier = sorted(n for n in os.listdir(root) if n.startswith(f"{fmt.INDEX_DIR}.damaged-"))
    aside = None
    if os.path.exists(index_dir):
        stamp, n = time.strftime("%Y%m%d%H%M%S"), 0
        aside = os.path.join(root, f"{fmt.INDEX_DIR}.damaged-{stamp}")
        while os.path.exists(aside):
            n += 1
            aside = os.path.join(root, f"{fmt.INDEX_DIR}.damaged-{stamp}.{n}")
        os.rename(index_dir, aside)
        fsync_dir(root)
    used = {"moved_aside": os.path.basename(aside) if aside else None, "snapshot": None,
            "skipped_snapshots": [], "journal_records": 0, "records_after_gap": 0,
            "published_skipped": 0}
    candidates = list(reversed(snapshots(snap_dir))) + list(reversed(
        legacy_snapshots(snap_dir)))
    for seq, path in candidates:
        tmp = index_dir + ".new"
        why = _trial_open(store, config, path, tmp)
        if why is None:
            # the journal the trial open created there is empty: the
            # records come from the archive and the old journals
            os.remove(os.path.join(tmp, JOURNAL_NAME))
            os.rename(tmp, index_dir)
            used["snapshot"] = os.path.basename(path)
            break
        used["skipped_snapshots"].append({"snapshot": os.path.basename(path), "why": why})
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(index_dir, mode=0o700, exist_ok=True)
    gen, key = index_key(index_dir, store)  # the snapshot's own, or the master's
    ix = Index(index_dir, key, store.store_id, config.index_map_size, archive_dir=snap_dir,
               generation=gen)
    mark_generation(ix, gen)
    try:
        segments = [p for _, p in archive_segments(snap_dir)]
        journals = segments + [os.path.join(root, d, JOURNAL_NAME)
                               for d in earlier + ([os.path.basename(aside)] if aside
                                                   else [])
                               if os.path.exists(os.path.join(root, d, JOURNAL_NAME))]
        if published is None:
            applied, skipped, highest = ix.roll_forward(journals, opened.chunk_intact)
        else:
            applied, skipped, highest, used["published_skipped"] = _roll_forward_bucket(
                ix, journals + published, key, store.store_id, opened.objects.backend)
        used.update(journal_records=applied, records_after_gap=skipped)
        with ix.begin() as txn:
            ended_cleanly = txn.meta_get("state") == b"clean"
        ix.skip_to(highest)
        witness = Witness.for_store(config.state_dir, key, store.store_id)
        try:
            seen = witness.read()
        except StoreIOError:  # damaged: it says nothing
            seen = None
        known = max(known_seq, seen.written if seen is not None else 0)
        used["records_missing"] = max(0, known - ix.seq - (1 if ended_cleanly else 0))
        with ix.begin(write=True) as txn:
            txn.meta_put("store_id", store.store_id)
            txn.meta_put("format", str(fmt.FORMAT_VERSION).encode())
            txn.meta_put("state", b"mounted")  # not clean until the repair ran
        if not ix.keyed_dirents:
            ix.convert_dirents()
        ix.checkpoint()
        # the admin rebuilt the index from what the store holds: that is what
        # this machine has seen from now on
        witness.start(ix.seq, ix.seq, ix.root_digest())
        witness.close()
    finally:
        ix.close()
    if segments:
        keep = os.path.join(aside or os.path.join(root, f"{fmt.INDEX_DIR}.damaged-archive"),
                            "archive")
        os.makedirs(keep, mode=0o700, exist_ok=True)
        for path in segments:
            os.rename(path, os.path.join(keep, os.path.basename(path)))
        fsync_dir(keep)
        fsync_dir(snap_dir)
    fsync_dir(root)
    return used


def _roll_forward_bucket(ix: Index, paths: list[str], key: bytes, store_id: bytes,
                         remote) -> tuple[int, int, int, int]:
    """(records applied, records after them not applied, the highest
    sequence number seen, files skipped: not this store's journals) of the
    journals at ``paths``, applied as a follower applies the writer's (see
    :func:`rebuild_index`)."""
    records, skipped = read_records(paths, key, store_id, ix.seq)
    for _, exc in skipped:
        log.warning("a journal from the bucket is not this store's (%s); skipped",
                    type(exc).__name__)
    applied = apply_available(ix, records.items(),
                              lambda oids: in_bucket(remote, oids, set()))
    ix.checkpoint()
    highest = max(records, default=ix.seq)
    return applied, sum(1 for seq in records if seq > ix.seq), highest, len(skipped)


def _trial_open(store, config, snapshot: str, tmp: str) -> str | None:
    """Copy ``snapshot`` to ``tmp`` and open it there: None if it is a usable
    index of this store, else why not (a snapshot may have lost its data
    file or be torn or damaged: the rebuild then takes an older one, or none)."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        shutil.copyfile(os.path.join(snapshot, "data.mdb"), os.path.join(tmp, "data.mdb"))
    except FileNotFoundError:
        return "its data.mdb is missing"
    except OSError as exc:
        return f"its data.mdb cannot be read ({exc.strerror})"
    try:
        ix = Index(tmp, index_key(tmp, store)[1], store.store_id, config.index_map_size,
                   check=True)
        try:
            with ix.begin() as txn:
                if txn.meta_get("store_id") != store.store_id:
                    return "it belongs to another store"
                if ix.auth_state == "mismatch":
                    return "it does not match its sealed checksum"
                list(txn.iter_inodes())
        finally:
            ix.close()
    except Exception as exc:  # noqa: BLE001 — any failure: try an older snapshot
        return f"it does not open ({type(exc).__name__})"  # its message holds a path
    return None
