"""One operation's view of the index: :class:`Txn` and its typed accessors,
a group for each database of :mod:`dcmfs.index.schema`."""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Iterator

import lmdb

from .. import format as fmt
from ..errors import IntegrityError
from ..storage.objects import ChunkRef
from .journal import DELETE, PUT, Op
from .schema import (DB_ID, STATS, U16, U64, U64X2, Inode, decode_chunk, encode_chunk,
                     ino_key, lmdb_error)

if TYPE_CHECKING:
    from .index import Index


class Txn:
    """One operation's view of the index with typed accessors; a context manager.

    Leaving the ``with`` block normally commits a write transaction (journal
    first, then the batch); an exception aborts it.  A read transaction
    borrows the batch and leaves it untouched.
    """

    def __init__(self, index: Index, txn: lmdb.Transaction, nested: bool = False,
                 borrowed: bool = False) -> None:
        self.ix = index
        self.txn = txn
        self._db = index.dbs
        self._nested = nested
        self._borrowed = borrowed
        #: the changes of a nested transaction, for the journal
        self.ops: list[Op] | None = [] if nested else None

    def __enter__(self) -> "Txn":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._borrowed:
            return
        if exc_type is not None:
            self.txn.abort()
        elif self._nested:
            try:
                self.ix._commit_nested(self)
            except BaseException:
                self.txn.abort()
                raise
        else:
            self.txn.abort()  # a read-only transaction

    def _record(self, kind: int, db: str, key: bytes, value: bytes | None) -> None:
        if self.ops is not None:
            self.ops.append((kind, DB_ID[db], bytes(key), value))

    # --- helpers ---------------------------------------------------------------
    def _get(self, db: str, key: bytes) -> bytes | None:
        raw = self.txn.get(key, db=self._db[db])
        return None if raw is None else self.ix.open(db, key, raw)

    def _put(self, db: str, key: bytes, value: bytes) -> None:
        sealed = self.ix.seal(db, key, value)
        try:
            self.txn.put(key, sealed, db=self._db[db])
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"writing {db}") from exc
        self._record(PUT, db, key, sealed)

    def _delete(self, db: str, key: bytes) -> bool:
        try:
            found = self.txn.delete(key, db=self._db[db])
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"deleting from {db}") from exc
        if found:
            self._record(DELETE, db, key, None)
        return found

    def _scan(self, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=self._db[db])
        if not cur.set_range(prefix):
            return
        for key, raw in cur:
            if not key.startswith(prefix):
                break
            yield key, self.ix.open(db, key, raw)

    # --- meta (plain) ---------------------------------------------------------
    def meta_get(self, name: str) -> bytes | None:
        return self.txn.get(name.encode(), db=self._db["meta"])

    def _put_plain(self, db: str, key: bytes, value: bytes) -> None:
        """Put a value that is not sealed (meta figures, inode-number sets)."""
        try:
            self.txn.put(key, value, db=self._db[db])
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"writing {db}") from exc
        self._record(PUT, db, key, value)

    def meta_put(self, name: str, value: bytes) -> None:
        self._put_plain("meta", name.encode(), value)

    def stats(self) -> tuple[int, int, int]:
        """(regular files, logical bytes, stored bytes) of the whole store."""
        raw = self.meta_get("stats")
        return STATS.unpack(raw) if raw else (0, 0, 0)

    def add_stats(self, files: int = 0, logical: int = 0, stored: int = 0) -> None:
        if files or logical or stored:
            f, lg, st = self.stats()
            self.meta_put("stats", STATS.pack(f + files, lg + logical, st + stored))

    def get_damage(self) -> dict | None:
        """The sealed damage record (``meta/damage``), None if the store is
        not marked.

        Raises
        ------
        IntegrityError
            The record does not authenticate.
        """
        raw = self._get("meta", b"damage")
        if raw is None:
            return None
        try:
            info = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError("index entry meta/damage does not decode") from exc
        return info if isinstance(info, dict) else {}

    def put_damage(self, info: dict) -> None:
        self._put("meta", b"damage", json.dumps(info, sort_keys=True).encode())

    def clear_damage(self) -> bool:
        return self._delete("meta", b"damage")

    def alloc_ino(self) -> int:
        raw = self.meta_get("next_ino")
        ino = U64.unpack(raw)[0] if raw else fmt.ROOT_INO + 1
        self.meta_put("next_ino", U64.pack(ino + 1))
        return ino

    # --- inodes ---------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode | None:
        raw = self._get("inodes", ino_key(ino))
        return None if raw is None else Inode.decode(raw)

    def put_inode(self, ino: int, inode: Inode) -> None:
        self._put("inodes", ino_key(ino), inode.encode())

    def delete_inode(self, ino: int) -> list[ChunkRef]:
        """Remove an inode with its chunks and xattrs; returns the chunk refs."""
        refs = list(self.chunks(ino).values())
        for prefix_db in ("chunks", "xattrs"):
            keys = [k for k, _ in self._scan_raw(prefix_db, ino_key(ino))]
            for k in keys:
                self._delete(prefix_db, k)
        self._delete("inodes", ino_key(ino))
        self._delete("orphans", ino_key(ino))
        self._delete("backlog", ino_key(ino))
        self._delete("content", ino_key(ino))
        self._delete("scrubbed", ino_key(ino))
        if self._db["deidview"] is not None:
            self._delete("deidview", ino_key(ino))
        return refs

    def iter_inodes(self) -> Iterator[tuple[int, Inode]]:
        for key, raw in self._scan("inodes", b""):
            yield U64.unpack(key)[0], Inode.decode(raw)

    def iter_inodes_checked(self) -> Iterator[tuple[int, Inode | IntegrityError]]:
        """Like :meth:`iter_inodes`, but a record that does not authenticate
        is yielded as its error instead of ending the scan (verify)."""
        for key, raw in self._scan_raw("inodes", b""):
            ino = U64.unpack(key)[0]
            try:
                yield ino, Inode.decode(self.ix.open("inodes", key, raw))
            except (IntegrityError, struct.error) as exc:
                yield ino, (exc if isinstance(exc, IntegrityError)
                            else IntegrityError(f"inode {ino}: record does not decode"))

    def _scan_raw(self, db: str, prefix: bytes) -> list[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=self._db[db])
        out = []
        if cur.set_range(prefix):
            for key, raw in cur:
                if not key.startswith(prefix):
                    break
                out.append((key, raw))
        return out

    # --- directory entries ----------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None:
        key = ino_key(parent) + self.ix.name_tag(parent, name)
        raw = self._get("dirents", key)
        return None if raw is None else U64.unpack_from(raw)[0]

    def add_dirent(self, parent: int, name: bytes, ino: int) -> None:
        key = ino_key(parent) + self.ix.name_tag(parent, name)
        self._put("dirents", key, U64.pack(ino) + name)

    def remove_dirent(self, parent: int, name: bytes) -> None:
        self._delete("dirents", ino_key(parent) + self.ix.name_tag(parent, name))

    def list_dir(self, parent: int) -> Iterator[tuple[bytes, int]]:
        for _, raw in self._scan("dirents", ino_key(parent)):
            yield raw[8:], U64.unpack_from(raw)[0]

    def dir_is_empty(self, parent: int) -> bool:
        cur = self.txn.cursor(db=self._db["dirents"])
        prefix = ino_key(parent)
        return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def iter_dirents(self) -> Iterator[tuple[int, bytes, int]]:
        for key, raw in self._scan("dirents", b""):
            yield U64.unpack_from(key)[0], raw[8:], U64.unpack_from(raw)[0]

    # --- chunk table ----------------------------------------------------------
    def chunks(self, ino: int) -> dict[int, ChunkRef]:
        out = {}
        for key, raw in self._scan("chunks", ino_key(ino)):
            out[U64X2.unpack(key)[1]] = decode_chunk(raw)
        return out

    def put_chunk(self, ino: int, index: int, ref: ChunkRef) -> None:
        self._put("chunks", U64X2.pack(ino, index), encode_chunk(ref))

    def delete_chunk(self, ino: int, index: int) -> None:
        self._delete("chunks", U64X2.pack(ino, index))

    def iter_all_chunks_checked(self) -> Iterator[tuple[int, int, ChunkRef | None]]:
        """Like :meth:`iter_all_chunks`; an entry that does not authenticate
        is yielded with None (verify, fsck)."""
        for key, raw in self._scan_raw("chunks", b""):
            ino, idx = U64X2.unpack(key)
            try:
                yield ino, idx, decode_chunk(self.ix.open("chunks", key, raw))
            except (IntegrityError, struct.error):
                yield ino, idx, None

    def iter_all_chunks(self) -> Iterator[tuple[int, int, ChunkRef]]:
        for key, raw in self._scan("chunks", b""):
            ino, idx = U64X2.unpack(key)
            yield ino, idx, decode_chunk(raw)

    # --- xattrs ---------------------------------------------------------------
    def _xkey(self, ino: int, name: bytes) -> bytes:
        return ino_key(ino) + self.ix.name_tag(ino, b"xattr\x00" + name)

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self._get("xattrs", self._xkey(ino, name))
        if raw is None:
            return None
        n = U16.unpack_from(raw)[0]
        return raw[2 + n:]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._put("xattrs", self._xkey(ino, name), U16.pack(len(name)) + name + value)

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self._delete("xattrs", self._xkey(ino, name))

    def list_xattrs(self, ino: int) -> list[bytes]:
        out = []
        for _, raw in self._scan("xattrs", ino_key(ino)):
            n = U16.unpack_from(raw)[0]
            out.append(raw[2:2 + n])
        return out

    # --- orphans --------------------------------------------------------------
    def add_orphan(self, ino: int) -> None:
        self._put_plain("orphans", ino_key(ino), b"")

    def remove_orphan(self, ino: int) -> None:
        self._delete("orphans", ino_key(ino))

    # --- re-encoding backlog -----------------------------------------------------
    def add_backlog(self, ino: int) -> None:
        self._put_plain("backlog", ino_key(ino), b"")

    def remove_backlog(self, ino: int) -> None:
        self._delete("backlog", ino_key(ino))

    def backlog(self) -> list[int]:
        return [U64.unpack(k)[0] for k, _ in self._scan_raw("backlog", b"")]

    # --- what the re-encoder found (sealed) -------------------------------------
    def get_content(self, ino: int) -> dict | None:
        raw = self._get("content", ino_key(ino))
        return None if raw is None else json.loads(raw)

    def put_content(self, ino: int, info: dict) -> None:
        self._put("content", ino_key(ino), json.dumps(info, sort_keys=True).encode())

    # --- what the de-identified view lists of a file (sealed) -------------------
    def get_deid(self, ino: int) -> dict | None:
        if self._db["deidview"] is None:
            return None
        raw = self._get("deidview", ino_key(ino))
        return None if raw is None else json.loads(raw)

    def put_deid(self, ino: int, record: dict) -> None:
        self._put("deidview", ino_key(ino), json.dumps(record, sort_keys=True).encode())

    def iter_deid(self) -> Iterator[tuple[int, dict]]:
        if self._db["deidview"] is None:
            return
        for key, raw in self._scan("deidview", b""):
            yield U64.unpack(key)[0], json.loads(raw)

    # --- when each file was last verified (the scrubber) -----------------------
    def set_scrubbed(self, ino: int, when_ns: int) -> None:
        self._put_plain("scrubbed", ino_key(ino), U64.pack(when_ns))

    def scrubbed(self, ino: int) -> int | None:
        if self._db["scrubbed"] is None:
            return None
        raw = self.txn.get(ino_key(ino), db=self._db["scrubbed"])
        return None if raw is None else U64.unpack(raw)[0]

    def orphans(self) -> list[int]:
        return [U64.unpack(k)[0] for k, _ in self._scan_raw("orphans", b"")]
