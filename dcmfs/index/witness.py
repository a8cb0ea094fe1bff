"""The witness: what this machine last saw of a store, kept outside it.

Sums sealed inside the index (:mod:`dcmfs.index.auth`) catch any record
changed, added, removed or spliced in from an older copy, but not a store
replaced as a whole by an older copy of itself (a restored backup, or an
attacker rolling it back), nor a journal cut after a crash: both are
self-consistent.  So each store has a small file in the system's state
directory (``/var/lib/dcmfs/witness/<store id>`` for root, the XDG state
directory for other users, ``state_dir`` to choose), as CryFS keeps
per-client state: the sequence number and sums digest of the last
checkpoint, and the last journal record written and made durable, with the
boot they belong to.  A store whose index or journal ends before that is
refused (:class:`~dcmfs.errors.RollbackError`) unless ``--accept-rollback``.

Layout (one 128-byte record, rewritten in place)::

    b"DCMW" | version u8 | reserved (3) | store id (16) | boot id (16) |
    checkpoint seq u64 | written seq u64 | synced seq u64 | sums digest (32) |
    keyed BLAKE2b-128 of the bytes before it (16)

``written`` is updated with one ``pwrite(2)`` after each journal append (no
sync: it survives what the journal's page cache survives, a daemon crash);
``synced`` and the checkpoint with ``fdatasync(2)`` when the journal or the
index is made durable.  After a reboot (another boot id) only what was synced
is required; in the same boot, everything written.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import os
import struct

from ..errors import StoreIOError
from ..storage import crypto

NAME = "witness"
_REC = struct.Struct(">4sB3x16s16sQQQ32s")
_MAGIC = b"DCMW"
_VERSION = 1
SIZE = _REC.size + 16


def boot_id() -> bytes:
    """This boot's id (random per boot, from the kernel)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().replace(b"-", b"").decode())
    except (OSError, ValueError):
        return bytes(16)


def default_dir() -> str:
    """Where witnesses live when ``state_dir`` is not set."""
    env = os.environ.get("DCMFS_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/dcmfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "dcmfs")


@dataclasses.dataclass
class Seen:
    """What a witness holds."""

    boot: bytes
    checkpoint: int
    written: int
    synced: int
    digest: bytes


class Witness:
    """The witness file of one store (``path``), under a key of the store's."""

    def __init__(self, path: str, master_key: bytes, store_id: bytes,
                 older: tuple = ()) -> None:
        self.path = path
        self._store_id = store_id
        self._key = crypto.derive(master_key, b"witness", store_id)
        #: keys of other live epochs: a witness written before the index was
        #: sealed again under ``master_key`` (a crash within ``rotate
        #: --finish``) is read with them, its digest then not compared
        self._older = [crypto.derive(k, b"witness", store_id) for k in older
                       if k != master_key]
        self._fd: int | None = None
        self._boot = boot_id()
        self.seen: Seen | None = None

    @classmethod
    def for_store(cls, state_dir: str | None, master_key: bytes,
                  store_id: bytes, older: tuple = ()) -> "Witness":
        directory = os.path.join(state_dir or default_dir(), NAME)
        return cls(os.path.join(directory, store_id.hex()), master_key, store_id, older)

    def _mac(self, body: bytes, key: bytes | None = None) -> bytes:
        return hashlib.blake2b(body, key=key or self._key, digest_size=16).digest()

    def rekey(self, master_key: bytes, seq: int, digest: bytes) -> None:
        """The index was sealed again under ``master_key`` (at ``seq``, its
        sums' digest now ``digest``): the witness is rewritten under it."""
        self._older = [self._key]
        self._key = crypto.derive(master_key, b"witness", self._store_id)
        self.checkpoint(seq, digest)

    def read(self) -> Seen | None:
        """What the witness holds; None if there is none (a store this
        machine has not seen).

        Raises
        ------
        StoreIOError
            The witness exists but cannot be read or does not authenticate.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read(SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreIOError(f"The witness {self.path} cannot be read: {exc.strerror}.") \
                from exc
        older = next((k for k in self._older if len(raw) == SIZE and hmac.compare_digest(
            self._mac(raw[:_REC.size], k), raw[_REC.size:])), None)
        if older is None and (len(raw) != SIZE or not hmac.compare_digest(
                self._mac(raw[:_REC.size]), raw[_REC.size:])):
            raise StoreIOError(f"The witness {self.path} of this store is damaged or was "
                               "altered; move it away to accept the store as it is.")
        magic, version, sid, boot, ckpt, written, synced, digest = _REC.unpack_from(raw)
        if magic != _MAGIC or version != _VERSION or sid != self._store_id:
            raise StoreIOError(f"The witness {self.path} belongs to another store or "
                               "version; move it away to accept the store as it is.")
        # a digest of sums under an older key says nothing of the index now
        self.seen = Seen(boot, ckpt, written, synced, b"" if older else digest)
        return self.seen

    def required(self) -> int:
        """The journal sequence number the store must reach: everything
        written in this boot, or what was made durable before a reboot."""
        s = self.seen
        if s is None:
            return 0
        return max(s.checkpoint, s.written if s.boot == self._boot else s.synced)

    # --- writing ----------------------------------------------------------------
    def start(self, seq: int, reach: int, digest: bytes) -> None:
        """Open for writing and record the store as it is now (durably): its
        index at ``seq`` with ``digest``, its journal up to ``reach``."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreIOError(f"The witness {self.path} cannot be written: "
                               f"{exc.strerror}.") from exc
        self.seen = Seen(self._boot, seq, reach, reach, digest)
        self._write(sync=True)

    def _write(self, sync: bool) -> None:
        if self._fd is None:
            return
        s = self.seen
        body = _REC.pack(_MAGIC, _VERSION, self._store_id, self._boot, s.checkpoint,
                         s.written, s.synced, s.digest)
        try:
            os.pwrite(self._fd, body + self._mac(body), 0)
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreIOError(f"The disk holding the witness {self.path} is full; "
                                   "free space there.") from exc
            raise StoreIOError(f"Writing the witness {self.path} failed: "
                               f"{exc.strerror}.") from exc

    def written(self, seq: int) -> None:
        if self._fd is not None:
            self.seen.written = seq
            self._write(sync=False)

    def synced(self, seq: int) -> None:
        if self._fd is not None:
            self.seen.synced = self.seen.written = max(seq, self.seen.written)
            self._write(sync=True)

    def checkpoint(self, seq: int, digest: bytes) -> None:
        if self._fd is not None:
            s = self.seen
            s.checkpoint, s.digest = seq, digest
            s.synced = s.written = max(seq, s.written)
            self._write(sync=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
