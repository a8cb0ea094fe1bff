"""Small chunks' objects kept in the index (feature ``inline-small-v1``).

A chunk whose object takes at most :data:`~dcmfs.format.INLINE_MAX` bytes
is not written as an object file: :class:`~dcmfs.storage.objects.ObjectStore`
seals it exactly as it seals a file (same layout, same associated data:
prefix, store id, object id, context; the context's flags carry
``CHUNK_FLAG_INLINE``) and hands the bytes to :class:`InlineRows` here.  The
operation that commits the chunk record puts them in the ``inline`` database
(key: inode u64 + object id), journaled and counted in the sums like any
record (:meth:`dcmfs.index.txn.Txn.put_chunk`); the operation that drops or
replaces the record deletes them.  Reads authenticate them as they do an
object file's bytes, so a row swapped, moved, rolled back or altered is
refused with the same diagnosis.

Readers outside the core's lock (the FUSE reader threads, the prefetch
pool) must not touch the index's batch transaction.  They find the bytes in
memory while the batch that holds them is not committed yet (:attr:`_staged`,
:attr:`_placed`), else in a read transaction of their own.  The index is
opened without LMDB's lock file, so nothing stops a later write transaction
from reusing the pages such a reader still walks: a checkpoint's commit
waits for the readers in flight (:meth:`exclusive`), and a reader that
starts after it sees the new snapshot, whose pages no write reuses before the
next commit.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterator

from .schema import U64

if TYPE_CHECKING:
    from .index import Index

DB = "inline"


def row_key(ino: int, oid: bytes) -> bytes:
    return U64.pack(ino) + oid


def split_key(key: bytes) -> tuple[int, bytes]:
    """(inode, object id) of a row key."""
    return U64.unpack_from(key)[0], bytes(key[8:])


class InlineRows:
    """The ``inline`` database of one opened index, for the object store."""

    def __init__(self, index: "Index") -> None:
        self._ix = index
        #: sealed by the object store, not yet put by a transaction
        self._staged: dict[bytes, bytes] = {}
        #: put in the batch, not yet committed to the environment
        self._placed: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._readers = 0
        self._writing = False
        #: a commit waiting: new readers wait behind it (readers come
        #: back to back; the commit must not starve)
        self._waiting = 0
        #: a follower's rows that the writer's records deleted while the
        #: follower holds their files open (row key -> bytes): the open file
        #: reads the version it opened until its last handle goes
        self.kept: dict[bytes, bytes] = {}

    # --- the object store's side ------------------------------------------------
    def stage(self, oid: bytes, blob: bytes) -> None:
        """A sealed object waiting for the operation that commits its chunk."""
        self._staged[oid] = bytes(blob)

    def unstage(self, oid: bytes) -> bool:
        """Forget a staged object no record will name (a write given up);
        True if it was one."""
        return self._staged.pop(oid, None) is not None

    def get(self, ino: int, oid: bytes) -> bytes | None:
        """The bytes of the inline object ``oid`` of inode ``ino``, or None;
        safe from any thread (see the module's notes)."""
        blob = self._staged.get(oid)
        if blob is None:
            blob = self._placed.get(oid)
        if blob is not None:
            return blob
        key = row_key(ino, oid)
        with self._reading():  # (a swap replaces the handle with the environment)
            db = self._ix.dbs.get(DB)
            if db is None:
                return None
            with self._ix.env.begin() as txn:
                raw = txn.get(key, db=db)
                if raw is not None:
                    return bytes(raw)
        return self.kept.get(key)

    # --- a follower's side ------------------------------------------------------
    def keep(self, key: bytes) -> None:
        """The row ``key`` is about to be deleted by a record a follower
        applies while the file is open there: keep its bytes."""
        blob = self.get(*split_key(key))
        if blob is not None:
            self.kept[key] = blob

    def let_go(self, ino: int) -> None:
        """The follower's last handle of ``ino`` went: its kept rows go."""
        if self.kept:
            prefix = U64.pack(ino)
            for key in [k for k in self.kept if k.startswith(prefix)]:
                del self.kept[key]

    # --- the transaction's side -------------------------------------------------
    def take(self, oid: bytes, taken: list[bytes]) -> bytes | None:
        """The staged bytes of ``oid`` for the transaction putting its chunk
        record (kept for readers until the batch is committed); ``oid`` is
        added to ``taken`` if this moved it out of the staged ones."""
        blob = self._staged.pop(oid, None)
        if blob is None:
            return self._placed.get(oid)
        self._placed[oid] = blob
        taken.append(oid)
        return blob

    def give_back(self, taken: list[bytes]) -> None:
        """The transaction that took these aborted (a full disk, a failed
        journal write): staged again for its retry, which may come after a
        checkpoint has cleared what the batch held."""
        for oid in taken:
            blob = self._placed.pop(oid, None)
            if blob is not None:
                self._staged[oid] = blob

    # --- the index's side -------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        with self._lock:
            while self._writing or self._waiting:
                self._idle.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1
                if not self._readers:
                    self._idle.notify_all()

    @contextlib.contextmanager
    def exclusive(self, committing: bool = False) -> Iterator[None]:
        """No reader in flight while the environment changes under them (a
        commit, a swap); ``committing``: the batch is committed inside, what
        it held is then read from the environment."""
        with self._lock:
            self._waiting += 1
            try:
                while self._writing or self._readers:
                    self._idle.wait()
            finally:
                self._waiting -= 1
            self._writing = True
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                if ok and committing:
                    self._placed.clear()
                self._writing = False
                self._idle.notify_all()
