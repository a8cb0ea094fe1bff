"""One operation's view of the index: :class:`Txn` and its typed accessors,
a group for each database of :mod:`dcmfs.index.schema`."""

from __future__ import annotations

import json
import stat
import struct
from typing import TYPE_CHECKING, Iterator

import lmdb

from .. import format as fmt
from ..errors import IntegrityError
from ..storage.objects import ChunkRef
from .auth import KEYED_DIRENT, group_of
from .journal import CONVERT, DELETE, PUT, Op
from .inline import row_key as inline_key, split_key
from .shred import note_deletion
from .schema import (DB_ID, STATS, U16, U64, U64X2, Inode, decode_chunk, decode_dirent,
                     encode_chunk, encode_dirent, ino_key, lmdb_error)

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
        #: False: records of groups that differ are read too (verify reports
        #: such groups itself; see :mod:`dcmfs.integrity.authentic`)
        self.gated = True
        #: the same changes as (database, key, old value, new value), for the
        #: index's sums (:mod:`dcmfs.index.auth`)
        self.changes: list[tuple[str, bytes, bytes | None, bytes | None]] = []
        self._taken_inline: list[bytes] = []  # staged again if it aborts

    def __enter__(self) -> "Txn":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._borrowed:
            return
        if exc_type is not None:
            self.txn.abort()
            self.ix.inline.give_back(self._taken_inline)
        elif self._nested:
            try:
                self.ix._commit_nested(self)
            except BaseException:
                self.txn.abort()
                self.ix.inline.give_back(self._taken_inline)
                raise
        else:
            self.txn.abort()  # a read-only transaction

    def _record(self, kind: int, db: str, key: bytes, value: bytes | None) -> None:
        if self.ops is not None:
            self.ops.append((kind, DB_ID[db], bytes(key), value))

    def _authentic(self, db: str, key: bytes) -> bool:
        """Does the record's group match its sum (checked once a session)?"""
        try:
            self._refuse_suspect(db, key)
        except IntegrityError:
            return False
        return True

    def _refuse_suspect(self, db: str, key: bytes) -> None:
        """Check the record's group the first time one of its records is
        read; raise if it does not match its sum: the record may be old or
        foreign (see :mod:`dcmfs.index.auth`)."""
        ix = self.ix
        if ix.verified_all or ix.sums is None or not (ix.gated and self.gated):
            return
        g = group_of(db, key)
        if g not in ix.verified and not ix.check_group(g, self.txn, self.changes):
            raise IntegrityError(f"index records of group {g:x} do not match the index's "
                                 "sealed checksum (added, removed, altered or rolled back)")

    # --- helpers ---------------------------------------------------------------
    def _get(self, db: str, key: bytes) -> bytes | None:
        raw = self.txn.get(key, db=self._db[db])
        if raw is None:
            return None
        self._refuse_suspect(db, key)
        return self.ix.open(db, key, raw)

    def _write(self, db: str, key: bytes, value: bytes) -> None:
        """Put a value as stored, journaled and counted in the sums."""
        try:
            old = self.txn.get(key, db=self._db[db])
            self.txn.put(key, value, db=self._db[db])
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"writing {db}") from exc
        if old is not None and db == "dirents":  # a name now leads elsewhere
            self.ix.names_gen += 1
        self._record(PUT, db, key, value)
        self.changes.append((db, bytes(key), old, value))

    def _put(self, db: str, key: bytes, value: bytes) -> None:
        self._write(db, key, self.ix.seal(db, key, value))

    def _delete(self, db: str, key: bytes, leaf: bool = False) -> bool:
        try:
            old = self.txn.get(key, db=self._db[db])
            found = old is not None and self.txn.delete(key, db=self._db[db])
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"deleting from {db}") from exc
        if found:
            if db == "dirents" and not leaf:  # a name is gone
                self.ix.names_gen += 1
            self._record(DELETE, db, key, None)
            self.changes.append((db, bytes(key), old, None))
        return found

    def _scan(self, db: str, prefix: bytes,
              gated: bool = True) -> Iterator[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=self._db[db])
        if not cur.set_range(prefix):
            return
        for key, raw in cur:
            if not key.startswith(prefix):
                break
            if gated:
                self._refuse_suspect(db, key)
            yield key, self.ix.open(db, key, raw)

    # --- meta (plain) ---------------------------------------------------------
    def meta_get(self, name: str) -> bytes | None:
        return self.txn.get(name.encode(), db=self._db["meta"])

    def _put_plain(self, db: str, key: bytes, value: bytes) -> None:
        """Put a value that is not sealed (meta figures, inode-number sets)."""
        self._write(db, key, value)

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

    def add_stored(self, ino: int, delta: int) -> None:
        """A file's objects take ``delta`` more bytes in the store: the
        store's total and the file's own figure (``st_blocks``)."""
        self.add_stats(stored=delta)
        inode = self.get_inode(ino)
        if inode is not None and inode.stored >= 0:
            inode.stored += delta
            self.put_inode(ino, inode)

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

    def get_audit_head(self) -> dict | None:
        """The audit trail's chain head at the last checkpoint
        (``meta/audit_head``, sealed; see :mod:`dcmfs.audit`), None if none.

        Raises
        ------
        IntegrityError
            The record does not authenticate.
        """
        raw = self._get("meta", b"audit_head")
        try:
            return None if raw is None else dict(json.loads(raw))
        except (TypeError, ValueError) as exc:
            raise IntegrityError("index entry meta/audit_head does not decode") from exc

    def put_audit_head(self, head: dict) -> None:
        self._put("meta", b"audit_head", json.dumps(head, sort_keys=True).encode())

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

    def delete_inode(self, ino: int, inode: Inode | None = None) -> list[ChunkRef]:
        """Remove an inode with its chunks and xattrs; returns the chunk refs.
        A file with a secret is counted for the next shred pass
        (:mod:`dcmfs.index.shred`).  ``inode``: its record as the caller
        read it in this transaction (the core's unlink: not opened again)."""
        try:  # (a directory's or a symlink's secret keys no object)
            if inode is None:
                inode = self.get_inode(ino)
            counts = inode is not None and bool(inode.secret) and stat.S_ISREG(inode.mode)
        except (IntegrityError, struct.error):  # fsck removing a damaged record
            counts = True
        if counts:
            note_deletion(self)
        refs = list(self.chunks(ino).values())
        for prefix_db in ("chunks", "xattrs"):
            keys = [k for k, _ in self._scan_raw(prefix_db, ino_key(ino))]
            for k in keys:
                self._delete(prefix_db, k)
        for db in ("inodes", "orphans", "backlog", "content", "scrubbed"):
            self._delete(db, ino_key(ino))
        if self._db["deidview"] is not None:
            self._delete("deidview", ino_key(ino))
        if self._db["inline"] is not None:  # the objects of its small chunks, now
            for k in [k for k, _ in self._scan_raw("inline", ino_key(ino))]:
                self._delete("inline", k)
        return refs

    def _scan_from(self, db: str, start: int) -> Iterator[tuple[int, bytes]]:
        """(inode number, opened value) of an inode-keyed database, from
        number ``start`` on (a pass that holds the core lock a slice at a time)."""
        cur = self.txn.cursor(db=self._db[db])
        if not cur.set_range(ino_key(start)):
            return
        for key, raw in cur:
            self._refuse_suspect(db, key)
            yield U64.unpack(key)[0], self.ix.open(db, key, raw)

    def iter_inodes(self, start: int = 0) -> Iterator[tuple[int, Inode]]:
        """(inode number, record) of every inode, from number ``start`` on."""
        for ino, raw in self._scan_from("inodes", start):
            yield ino, Inode.decode(raw)

    def iter_inodes_checked(self) -> Iterator[tuple[int, Inode | IntegrityError]]:
        """Like :meth:`iter_inodes`, but a record that does not authenticate
        is yielded as its error instead of ending the scan (verify)."""
        for key, raw in self._scan_raw("inodes", b"", gated=False):
            ino = U64.unpack(key)[0]
            try:
                yield ino, Inode.decode(self.ix.open("inodes", key, raw))
            except (IntegrityError, struct.error) as exc:
                yield ino, (exc if isinstance(exc, IntegrityError)
                            else IntegrityError(f"inode {ino}: record does not decode"))

    def _scan_raw(self, db: str, prefix: bytes,
                  gated: bool = True) -> list[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=self._db[db])
        out = []
        if cur.set_range(prefix):
            for key, raw in cur:
                if not key.startswith(prefix):
                    break
                out.append((key, raw))
        if gated:
            for key, _ in out:
                self._refuse_suspect(db, key)
        return out

    # --- directory entries ----------------------------------------------------
    def _dkey(self, parent: int, name: bytes) -> bytes:
        ix = self.ix
        return (ix.parent_tag(parent) if ix.keyed_dirents else ino_key(parent)) \
            + ix.name_tag(parent, name)

    def _dprefix(self, parent: int) -> bytes:
        return self.ix.parent_tag(parent) if self.ix.keyed_dirents else ino_key(parent)

    def lookup(self, parent: int, name: bytes) -> int | None:
        raw = self._get("dirents", self._dkey(parent, name))
        return None if raw is None else decode_dirent(raw, self.ix.keyed_dirents)[1]

    def add_dirent(self, parent: int, name: bytes, ino: int) -> None:
        value = (encode_dirent(parent, ino, name) if self.ix.keyed_dirents
                 else U64.pack(ino) + name)
        self._put("dirents", self._dkey(parent, name), value)

    def remove_dirent(self, parent: int, name: bytes, leaf: bool = False) -> None:
        """``leaf``: the entry names no directory and the caller forgets
        the path it removed from its own memo of names itself, so the
        names generation stays (:attr:`Index.names_gen`)."""
        self._delete("dirents", self._dkey(parent, name), leaf=leaf)

    def list_dir(self, parent: int) -> Iterator[tuple[bytes, int]]:
        for _, raw in self._scan("dirents", self._dprefix(parent)):
            _, child, name = decode_dirent(raw, self.ix.keyed_dirents)
            yield name, child

    def dir_is_empty(self, parent: int) -> bool:
        cur = self.txn.cursor(db=self._db["dirents"])
        prefix = self._dprefix(parent)
        return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def iter_dirents(self) -> Iterator[tuple[int, bytes, int]]:
        """Every directory entry as (parent, name, child), also those of
        groups that did not match the sealed sums (verify and fsck name files
        with them)."""
        for key, raw in self._scan("dirents", b"", gated=False):
            parent, child, name = decode_dirent(raw, len(key) == KEYED_DIRENT)
            yield (U64.unpack_from(key)[0] if parent is None else parent), name, child

    def convert_dirents(self) -> int:
        """Key every directory entry by the keyed tag of its parent (the
        upgrade to format 4; see :meth:`Index.convert_dirents`); returns how
        many were converted."""
        changes = self.ix.convert(self.txn)
        self.ix.names_gen += 1
        self.changes.extend(changes)
        self._record(CONVERT, "dirents", b"", None)
        return len(changes) // 2

    # --- chunk table ----------------------------------------------------------
    def chunks(self, ino: int) -> dict[int, ChunkRef]:
        out = {}
        for key, raw in self._scan("chunks", ino_key(ino)):
            out[U64X2.unpack(key)[1]] = decode_chunk(raw)
        return out

    def put_chunk(self, ino: int, index: int, ref: ChunkRef) -> None:
        """Put a chunk record; an inline object it names goes into the
        ``inline`` database in this same operation, and the inline object of
        the record it replaces (another object) goes out of it."""
        key = U64X2.pack(ino, index)
        if self._db["inline"] is not None:
            self._drop_inline(ino, key, keep=ref.oid)
        if ref.flags & fmt.CHUNK_FLAG_INLINE:
            self._put_inline(ino, ref.oid)
        self._put("chunks", key, encode_chunk(ref))

    def delete_chunk(self, ino: int, index: int, keep_inline: bool = False) -> None:
        key = U64X2.pack(ino, index)  # keep_inline: fsck salvages the row first
        if self._db["inline"] is not None and not keep_inline:
            self._drop_inline(ino, key)
        self._delete("chunks", key)

    def _put_inline(self, ino: int, oid: bytes) -> None:
        if self._db["inline"] is None:
            raise IntegrityError("an inline object for a store without its database "
                                 "(feature inline-small-v1 missing)")
        key = inline_key(ino, oid)
        blob = self.ix.inline.take(oid, self._taken_inline)
        if blob is None:
            if self.txn.get(key, db=self._db["inline"]) is not None:
                return  # the same object put again (repair, a replayed record)
            raise IntegrityError(f"inline object {oid.hex()} of inode {ino} was not sealed "
                                 "in this session")
        self._write("inline", key, blob)

    def _drop_inline(self, ino: int, key: bytes, keep: bytes | None = None) -> None:
        """Delete the inline object the chunk record ``key`` names (unless it
        is ``keep``): it goes with its record, in the same operation."""
        raw = self.txn.get(key, db=self._db["chunks"])
        if raw is None:
            return
        try:
            old = decode_chunk(self.ix.open("chunks", key, raw))
        except (IntegrityError, struct.error):
            return  # a damaged record: fsck deletes what it names
        if old.flags & fmt.CHUNK_FLAG_INLINE and old.oid != keep:
            self._delete("inline", inline_key(ino, old.oid))

    def get_inline(self, ino: int, oid: bytes) -> bytes | None:
        """The stored bytes of an inline object (as this transaction sees them)."""
        if self._db["inline"] is None:
            return None
        raw = self.txn.get(inline_key(ino, oid), db=self._db["inline"])
        return None if raw is None else bytes(raw)

    def iter_inline(self, ino: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(inode, object id) of every inline object, or of ``ino``'s (fsck, verify)."""
        prefix = b"" if ino is None else U64.pack(ino)
        cur = None if self._db["inline"] is None else self.txn.cursor(db=self._db["inline"])
        for key in cur.iternext(values=False) if cur is not None and cur.set_range(prefix) else ():
            if not key.startswith(prefix):
                return
            yield split_key(key)

    def delete_inline(self, ino: int, oid: bytes) -> bool:
        """Remove an inline object no record names (fsck)."""
        return self._delete("inline", inline_key(ino, oid))

    def iter_all_chunks_checked(self) -> Iterator[tuple[int, int, ChunkRef | None]]:
        """Like :meth:`iter_all_chunks`; an entry that does not authenticate
        is yielded with None (verify, fsck)."""
        for key, raw in self._scan_raw("chunks", b"", gated=False):
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
        return [U64.unpack(k)[0] for k, _ in self._scan_raw("backlog", b"", gated=False)
                if self._authentic("backlog", k)]

    # --- what the re-encoder found (sealed) -------------------------------------
    def get_content(self, ino: int) -> dict | None:
        raw = self._get("content", ino_key(ino))
        return None if raw is None else json.loads(raw)

    def put_content(self, ino: int, info: dict) -> None:
        """Padded with spaces (JSON ignores them) to a multiple of 128 bytes:
        the record's length does not tell what the re-encoder found."""
        raw = json.dumps(info, sort_keys=True).encode()
        self._put("content", ino_key(ino), raw + b" " * (-len(raw) % 128))

    def iter_content(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(inode, record) of what the re-encoder found, from inode ``start`` on."""
        for ino, raw in self._scan_from("content", start):
            yield ino, json.loads(raw)

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
        return [U64.unpack(k)[0] for k, _ in self._scan_raw("orphans", b"", gated=False)
                if self._authentic("orphans", k)]
