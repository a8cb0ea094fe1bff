"""A store on disk: its header, its master key, its lock.

``STORE/dcmfs.store`` is a small JSON document (no secrets in it):

.. code-block:: json

    {"magic": "dcmfs-store", "format_version": 1,
     "features": ["chunked-v1", "key-slots-v1", ...], "store_id": "<32 hex>",
     "chunk_size": 1048576, "codec": "zstd",
     "slots": [...], "next_slot": 2, "mac": "<hex>"}

The master key is wrapped once per key slot (:mod:`dcmfs.storage.slots`);
``mac`` authenticates every other field under a key derived from the master
key.  Stores made before ``key-slots-v1`` have one wrap instead,
``"key": {"kind": "keyfile" | "passphrase", "salt", "argon2id", "wrapped"}``,
whose associated data is the canonical JSON of every other field; they are
still opened, and turned into a slot table at the first read-write opening
or ``dcmfs key`` command.

Every rewrite of the header (:func:`rewrite_header`) holds an exclusive
``flock`` on the store directory itself, not the store lock: a running
daemon holds that for its whole session, and a key command must work while
the store is mounted (the daemon reads the header only when it opens the
store, and keeps the master key in memory).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import secrets

from . import crypto, slots
from .. import format as fmt
from .codec import GENERAL_CODECS
from ..config import (KDF_MAX_ITERATIONS, KDF_MAX_LANES, KDF_MAX_MEMORY_KIB, Config,
                      kdf_within_bounds)
from .durable import write_file
from .headerlock import HeaderLock, remove_torn_headers
from .inbox import ingest_key
from ..errors import (ForeignStoreError, KdfBoundsError, SecretError, StoreDamagedError, StoreIOError,
                     StoreLockedError, StoreMissingError, StoreNotEmptyError,
                     UnsupportedFormatError, WrongKeyError)


@dataclasses.dataclass(frozen=True)
class Secret:
    """Key material read by the CLI: a key file's bytes or a passphrase."""

    kind: str  # "keyfile" | "passphrase" | "credential" | "command" | "pkcs11"
    value: bytes = dataclasses.field(repr=False)
    #: a ``pkcs11`` secret's token session (:mod:`dcmfs.storage.pkcs11`); the
    #: value is then the PIN
    pkcs11: object = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Store:
    root: str
    store_id: bytes
    chunk_size: int
    codec: str
    features: frozenset
    #: the master key, the key of epoch ``master_epoch``: the header mac, the
    #: ingest wrap, the damage mark, and the index (names, journal, audit) of a
    #: store whose index names no other generation (:mod:`dcmfs.index.keygen`)
    master_key: bytes = dataclasses.field(repr=False)
    #: {epoch: data key} of every live key epoch (0: the store key)
    epoch_keys: dict = dataclasses.field(default=None, repr=False, compare=False)
    #: the epoch new chunks are sealed under
    epoch: int = 0
    #: where the objects live: "" (the store directory) or s3://BUCKET/PREFIX
    backend: str = ""
    #: the kind of the key slot that opened the store (the audit's mount record)
    unlocked_by: str = ""
    #: (the header's ``ingest`` entry, its private key): :mod:`.inbox`
    ingest: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    #: the epoch the master key is (0, the store key, until a ``key rotate
    #: --finish`` moved it: feature ``key-generations-v1``)
    master_epoch: int = 0
    #: (id, private key) of the slot that opened it, for a follower (followkeys)
    slot_key: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epoch_keys is None:
            object.__setattr__(self, "epoch_keys", {0: self.master_key})


def _aad(header: dict) -> bytes:
    rest = {k: v for k, v in header.items() if k != "key"}
    key = {k: v for k, v in header["key"].items() if k != "wrapped"}
    return json.dumps({"header": rest, "key": key}, sort_keys=True).encode()


def _kek(secret: Secret, key_info: dict, root: str = "") -> bytes:
    """The key-encryption key of ``secret`` under the header's ``key`` table.

    The table is not authenticated yet (what it derives is what authenticates
    it), so its Argon2id parameters are bounded before they are used.

    Raises
    ------
    KdfBoundsError
        The parameters are outside :func:`dcmfs.config.kdf_within_bounds`.
    """
    try:
        salt = bytes.fromhex(key_info["salt"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ForeignStoreError(f"The store header at {root} has no valid salt; it is damaged "
                                "(restore it from a backup).") from exc
    if key_info.get("kind") == "passphrase" and not kdf_within_bounds(key_info.get("argon2id")):
        raise KdfBoundsError(
            f"The store header at {root} asks for Argon2id parameters outside the bounds "
            f"dcmfs accepts (at most {KDF_MAX_MEMORY_KIB // 1024 // 1024} GiB of memory, "
            f"{KDF_MAX_ITERATIONS} passes and {KDF_MAX_LANES} lanes), so it was altered and "
            "nothing was derived: restore the header (dcmfs.store) from a backup.")
    if secret.kind != key_info["kind"]:
        want = "a key file (--key-file)" if key_info["kind"] == "keyfile" else "a passphrase"
        raise WrongKeyError(f"This store is opened with {want}.")
    if secret.kind == "keyfile":
        if len(secret.value) < 32:
            raise SecretError("The key file holds fewer than 32 bytes; it is not a dcmfs key.")
        return crypto.kek_from_keyfile(secret.value, salt)
    p = key_info["argon2id"]
    return crypto.kek_from_passphrase(secret.value, salt, p["memory_kib"], p["iterations"],
                                      p["lanes"])


def init_store(root: str, secret: Secret, config: Config, label: str = "",
               backend: str = "") -> Store:
    """Create a new store in ``root`` (which must be missing or empty), with
    one key slot for ``secret`` (labelled ``label``).

    ``backend``: ``s3://BUCKET/PREFIX`` for a store whose objects live in a
    bucket (the header names it, with the feature ``backend-s3-v1``).

    Raises
    ------
    StoreNotEmptyError
        ``root`` holds files.
    """
    root = os.path.abspath(root)
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise StoreNotEmptyError(f"{root} exists and is not a directory.")
        if os.listdir(root):
            raise StoreNotEmptyError(f"{root} is not empty; choose a new or empty directory.")
    if config.codec not in GENERAL_CODECS:
        raise ValueError(f"{config.codec!r} is not a general codec ({', '.join(GENERAL_CODECS)})")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    os.makedirs(os.path.join(root, fmt.OBJECTS_DIR), mode=0o700)
    master = crypto.random_key()
    store_id = secrets.token_bytes(16)
    header = {
        "magic": fmt.STORE_MAGIC,
        "format_version": fmt.FORMAT_VERSION,
        "features": sorted((fmt.WRITE_FEATURES | {f"codec-{config.codec}"})
                           & fmt.KNOWN_FEATURES),
        "store_id": store_id.hex(),
        "chunk_size": config.chunk_size,
        "codec": config.codec,
    }
    if backend:
        header["backend"] = backend
        header["features"] = sorted(set(header["features"]) | {fmt.BACKEND_S3_FEATURE}
                                    | fmt.S3_WRITE_FEATURES)
    slot = slots.new_slot(1, secret, label or "initial", dataclasses.asdict(config.kdf))
    _write_header(root, slots.new_table(header, master, secret, slot))
    return Store(root, store_id, config.chunk_size, config.codec,
                 frozenset(header["features"]), master, backend=backend,
                 unlocked_by=secret.kind)


def _write_header(root: str, header: dict, step=None) -> None:
    write_file(os.path.join(root, fmt.HEADER_NAME),
               (json.dumps(header, indent=1, sort_keys=True) + "\n").encode(), mode=0o600,
               step=step)


def rewrite_header(root: str, change, step=None) -> dict:
    """Replace the header with ``change(header)``, under the header lock, the
    header read afresh under it; atomic and durable (temp file, fsync,
    rename, fsync of the directory), so a crash at any ``step`` leaves the
    old header or the new one.  Returns the new header."""
    root = os.path.abspath(root)
    with HeaderLock(root):
        header = change(read_header(root))
        _write_header(root, header, step)
        remove_torn_headers(root)
    return header



def read_header(root: str) -> dict:
    """Read and validate the store header (no key needed).

    Raises
    ------
    StoreMissingError, ForeignStoreError, UnsupportedFormatError
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise StoreMissingError(f"No store at {root}: the directory does not exist. "
                                "Create one with 'dcmfs init'.")
    path = os.path.join(root, fmt.HEADER_NAME)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read())
    except FileNotFoundError as exc:
        raise ForeignStoreError(f"{root} is not a dcmfs store (no {fmt.HEADER_NAME}).") from exc
    except (ValueError, OSError) as exc:
        raise ForeignStoreError(f"{root}: the store header cannot be read; "
                                "it is damaged or not a dcmfs store.") from exc
    if not isinstance(header, dict) or header.get("magic") != fmt.STORE_MAGIC:
        raise ForeignStoreError(f"{root} is not a dcmfs store.")
    version = header.get("format_version")
    if not isinstance(version, int) or version > fmt.FORMAT_VERSION or version < 1:
        raise UnsupportedFormatError(
            f"{root} has store format version {version}; this dcmfs reads up to "
            f"{fmt.FORMAT_VERSION}. Upgrade dcmfs.")
    key_info = header.get("key")
    if slots.FEATURE in header.get("features", []):
        if not slots.valid_table(header):
            raise ForeignStoreError(f"{root}: the store header has no valid key slot table; "
                                    "it is damaged (restore dcmfs.store from a backup).")
    elif (not isinstance(key_info, dict) or key_info.get("kind") not in ("keyfile", "passphrase")
            or not isinstance(key_info.get("wrapped"), str)):
        raise ForeignStoreError(f"{root}: the store header has no valid key table; it is "
                                "damaged (restore dcmfs.store from a backup).")
    unknown = set(header.get("features", [])) - fmt.KNOWN_FEATURES
    if unknown:
        raise UnsupportedFormatError(f"{root} uses features this dcmfs does not know "
                                     f"({', '.join(sorted(unknown))}). Upgrade dcmfs.")
    return header


def unlock(root: str, header: dict, secret: Secret, with_private: bool = False) -> tuple:
    """({epoch: key}, the slot that opened it) of a header of either layout
    (epoch 0 is the store key); for a single-wrap header the "slot" is its
    ``key`` table with the KEK under ``"kek"``, what
    :func:`dcmfs.storage.slots.from_legacy` needs.

    Raises
    ------
    WrongKeyError, HeaderAlteredError, KdfBoundsError, SecretError
    """
    if "slots" in header:
        return slots.unlock(header, secret, root, with_private)
    key_info = header["key"]
    if secret.kind not in slots.UNLOCKS.get(key_info["kind"], ()):
        want = "a key file (--key-file)" if key_info["kind"] == "keyfile" else "a passphrase"
        raise WrongKeyError(f"This store is opened with {want}.")
    kek = _kek(slots_secret_as(secret, key_info["kind"]), key_info, root)
    try:
        master = crypto.Gcm(kek).open(bytes.fromhex(key_info["wrapped"]), _aad(header))
    except (crypto.AuthenticationFailed, ValueError) as exc:
        slots.log.warning("unlock failed: %s did not open the store's single %s wrap",
                          slots.WHAT[secret.kind], key_info["kind"])
        raise WrongKeyError(f"The key does not open the store at {root}: wrong key file or "
                            "passphrase (or a damaged store header).") from exc
    return ({0: master}, {**key_info, "id": 1, "kek": kek}) + ((None,) if with_private else ())


def slots_secret_as(secret: Secret, kind: str) -> Secret:
    """A credential's bytes are a key file's: the same secret under that kind."""
    return secret if secret.kind == kind else Secret(kind, secret.value)


def open_store(root: str, secret: Secret, for_writing: bool = False) -> Store:
    """Unwrap the master key of the store at ``root``.

    ``for_writing``: first add the features this version may write to the
    header if it lacks them (a single-wrap header becomes a slot table;
    :func:`rewrite_header`), under the store lock; a store in use is left as
    it is.

    Raises
    ------
    WrongKeyError
        The key file or passphrase does not open the store.
    HeaderAlteredError
        A slot opens, but the header is not what a key holder wrote.
    """
    root = os.path.abspath(root)
    header = read_header(root)
    try:
        keys, slot, private = unlock(root, header, secret, with_private=True)
    except WrongKeyError as err:
        err.store_root = root  # the audit trail records the attempt
        raise
    master = slots.master_of(header, keys) if "slots" in header else keys[0]
    if for_writing and not fmt.write_features(header) <= set(header["features"]):
        try:
            lock = StoreLock(root)
        except StoreLockedError:
            pass  # in use: the opener fails on the lock itself; nothing changed
        else:
            try:
                header = rewrite_header(root, lambda h: upgrade(root, h, secret, master))
            finally:
                lock.release()
    return Store(root, bytes.fromhex(header["store_id"]), int(header["chunk_size"]),
                 header["codec"], frozenset(header["features"]), master, keys,
                 header.get("epoch", 0), str(header.get("backend", "")),
                 str(slot.get("kind", "")), ingest_key(root, header, master),
                 slots.master_epoch(header),
                 (int(slot["id"]), private) if private is not None else None)


def upgrade(root: str, header: dict, secret: Secret, master: bytes,
            legacy_kek: bytes | None = None) -> dict:
    """``header`` (read under the header lock) with the features this version
    writes, as a slot table sealed with ``master`` (``legacy_kek``: the KEK
    of a single-wrap header, if it is known already)."""
    if "slots" not in header:
        legacy_kek = legacy_kek or unlock(root, header, secret)[1]["kek"]
        header = slots.from_legacy(header, master, legacy_kek, secret)
        slots.log.info("key slots: the store's single key wrap became slot 1 (%s)",
                       header["slots"][0]["kind"])
    header["features"] = sorted(set(header["features"]) | fmt.write_features(header))
    return slots.seal_header(master, header)


class StoreLock:
    """An exclusive ``flock`` on ``STORE/lock`` held while the store is open.

    The lock file holds the pid of the holder, so ``dcmfs status`` and
    ``dcmfs umount`` can find the daemon.  The kernel drops the lock when the
    process dies, so a crashed daemon never blocks a remount.
    """

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, fmt.LOCK_NAME)
        try:
            # never through a symlink: whoever can write the store must not
            # make a root daemon truncate a file of their choice
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                              0o600)
        except OSError as exc:  # e.g. a read-only store (ProtectSystem= in a unit)
            raise StoreIOError(f"The store {root} cannot be opened for writing "
                               f"({exc.strerror}); make it writable for dcmfs.") from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            pid = read_lock_pid(root)
            os.close(self.fd)
            raise StoreLockedError(
                f"The store {root} is in use by another dcmfs process"
                f"{f' (pid {pid})' if pid else ''}; unmount it first.") from exc
        self.write_pid(os.getpid())

    def write_pid(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def read_lock_pid(root: str) -> int | None:
    """The pid of the process holding the store lock, None if it is free.

    The kernel's word (:func:`lock_holders`) comes first: the pid written in
    the lock file is only a hint, anyone who can write the store can change
    it.
    """
    path = os.path.join(root, fmt.LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = (lock_holders(root) or set()) - {0}
            if len(holders) == 1:
                return holders.pop()
            return lock_file_pid(root)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_file_pid(root: str) -> int | None:
    """The pid written in the lock file (a hint, not a proof)."""
    try:
        fd = os.open(os.path.join(root, fmt.LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holders(root: str) -> set[int] | None:
    """The pids the kernel names (``/proc/locks``) as holding a ``flock`` on
    this very lock file (its device and inode), 0 for a holder outside this
    pid namespace; None if that cannot be read."""
    try:
        st = os.lstat(os.path.join(root, fmt.LOCK_NAME))
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146345 0 EOF"; "1: -> FLOCK ..." waits
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            if fields[4].isdigit():
                holders.add(int(fields[4]))
    return holders


# --- the damage mark ----------------------------------------------------------------
# ``STORE/needs-fsck`` (JSON: when, why, how many integrity errors; never a
# name) is written at the first integrity error a daemon meets and removed by
# a clean ``dcmfs fsck``.  It lives outside the index because the index may be
# what is damaged; the index keeps a sealed copy as well (``meta/damage``,
# :mod:`dcmfs.opened.store`), so that deleting the file is noticed.  The file
# carries ``mac``: HMAC-SHA256 under a key derived from the master key for
# this store (label ``damage-mark``) of its other fields, so a mark copied
# from another store or altered is told apart from a genuine one.  Any mark
# at all refuses read-write openings, authentic or not (a plain mark from an
# older dcmfs, or one that does not authenticate, still counts): a forged
# mark can only make a store wait for fsck, the safe direction.

def _mark_key(store: Store) -> bytes:
    return crypto.derive(store.master_key, b"damage-mark", store.store_id)


def _mark_mac(store: Store, mark: dict) -> str:
    body = json.dumps({k: v for k, v in mark.items() if k != "mac"}, sort_keys=True).encode()
    return hmac.new(_mark_key(store), body, hashlib.sha256).hexdigest()


def damage_mark(root: str) -> dict | None:
    """The mark's content if the store is marked as needing fsck (no key
    needed; not authenticated: see :func:`mark_authentic`)."""
    try:
        with open(os.path.join(root, fmt.DAMAGE_MARK), "rb") as f:
            data = json.loads(f.read() or b"{}")
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: still marked


def mark_authentic(store: Store, mark: dict) -> bool:
    """Was this mark written by a dcmfs holding this store's key?"""
    mac = mark.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, _mark_mac(store, mark))


def set_damage_mark(store: Store, reason: str, errors: int = 1,
                    since: str | None = None) -> dict:
    """Write (or update) the sealed mark; returns its fields."""
    import time
    old = damage_mark(store.root)
    mark = {"since": since or time.strftime("%Y-%m-%d %H:%M:%S %Z"), "errors": 0}
    if old is not None and mark_authentic(store, old):
        mark.update(since=old.get("since", mark["since"]), errors=int(old.get("errors", 0)))
    mark["reason"] = reason
    mark["errors"] += errors
    mark["mac"] = _mark_mac(store, mark)
    write_file(os.path.join(store.root, fmt.DAMAGE_MARK),
               (json.dumps(mark, sort_keys=True) + "\n").encode(), mode=0o600)
    return mark


def clear_damage_mark(root: str) -> None:
    from .durable import fsync_dir
    try:
        os.unlink(os.path.join(root, fmt.DAMAGE_MARK))
    except FileNotFoundError:
        return
    fsync_dir(root)


def plain(text: object, limit: int = 60) -> str:
    """A field of a mark as a message may quote it: printable ASCII only,
    short (the file is not trusted before it authenticates)."""
    return "".join(c for c in str(text) if " " <= c <= "~")[:limit] or "?"


def refuse_if_damaged(store: Store) -> None:
    """Raise :class:`StoreDamagedError` if the store carries a damage mark
    (genuine, from an older dcmfs, or one that does not authenticate)."""
    root = store.root
    mark = damage_mark(root)
    if mark is None:
        return
    until = (f"it mounts read-only only (-o ro) until you run 'dcmfs fsck {root}' (and "
             f"'dcmfs fsck --repair {root}' if that finds damage)")
    if "mac" not in mark and mark:
        raise StoreDamagedError(
            f"The store {root} is marked as damaged since {plain(mark.get('since', '?'))} "
            f"({plain(mark.get('reason', 'integrity errors'))}, marked by an older dcmfs); "
            f"{until}.")
    if not mark_authentic(store, mark):
        raise StoreDamagedError(
            f"The store {root} carries a damage mark ({fmt.DAMAGE_MARK}) that does not "
            f"authenticate (altered, or copied from another store); {until}.")
    raise StoreDamagedError(
        f"The store {root} is marked as damaged since {plain(mark['since'])} "
        f"({plain(mark.get('reason', 'integrity errors'))}); {until}.")
