"""The LMDB index: the one place its schema lives.

Schema (format version 1).  All integers are big-endian so that LMDB's byte
order is numeric order.  ``SIV(...)`` is AES-256-GCM-SIV under the index key
(HKDF of the master key, label ``index``) with the database name and the LMDB
key as associated data, so a value moved to another key fails to open.

============  ==============================  ======================================
database      key                             value
============  ==============================  ======================================
``meta``      ascii name                      plain bytes:
                                              ``format`` -> b"1";
                                              ``store_id`` -> 16 bytes;
                                              ``next_ino`` -> u64;
                                              ``state`` -> b"clean" or b"mounted";
                                              ``stats`` -> files, logical bytes,
                                              stored bytes (3 x u64; plain, so
                                              ``dcmfs status`` needs no key);
                                              ``journal_seq`` -> u64, the last
                                              journal record this index holds
``inodes``    ino u64                         SIV(INODE record, see :class:`Inode`)
``dirents``   parent ino u64 + name tag (16)  SIV(child ino u64 + name bytes)
``chunks``    ino u64 + chunk index u64       SIV(CHUNK record, see ``_CHUNK``; files
                                              laid out in extents (DICOM-coded)
                                              append the extent's offset, u64)
``xattrs``    ino u64 + name tag (16)         SIV(name length u16 + name + value)
``orphans``   ino u64                         b"" — unlinked while open, purged
                                              at release or at the next mount
``backlog``   ino u64                         b"" — closed with chunks sealed
                                              uncompressed, or not yet looked at
                                              by the DICOM-aware re-encoder
``scrubbed``  ino u64                         u64 (plain): when the file was last
                                              verified intact, ns since the epoch
``content``   ino u64                         SIV(JSON: what the re-encoder found:
                                              generation, kind, modality, transfer
                                              syntax, photometric, bits, codec path,
                                              fallback reason; never a patient
                                              attribute)
============  ==============================  ======================================

The *name tag* is HMAC-SHA256(name key, parent ino + name) truncated to 16
bytes: a lookup needs no scan, and without the key the index reveals neither
names nor which entries share a name.  The root directory is inode 1.

Transactions and durability: the daemon keeps one long LMDB write
transaction (the *batch*).  Each operation runs in a nested transaction;
when it succeeds its changes are appended to the sealed journal
(:mod:`dcmfs.index.journal`) and merged into the batch, so a crash of the daemon
loses nothing that was closed.  :meth:`Index.checkpoint` commits the batch
durably and empties the journal; :meth:`Index.sync_journal` makes the
journal durable without a checkpoint (``fsync(2)``).  When the index is
opened, :meth:`Index.replay` applies the records a crash left in the
journal.  The environment is opened without LMDB's lock file (one daemon
per store is guaranteed by the store lock, and every use of a transaction
is serialised by the core), so the batch may be used from any thread.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import json
import logging
import os
import struct
from typing import Iterator

import lmdb

from ..storage import crypto
from .. import format as fmt
from ..errors import (IndexDamagedError, IntegrityError, NeedsRecoveryError, NoSpaceError,
                     StoreIOError)
from .journal import DELETE, PUT, Journal, Op
from ..storage.objects import ChunkRef

log = logging.getLogger("dcmfs.index")

_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")
#: mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, file_id,
#: generation, has_sha256, sha256; followed by the symlink target
_INODE = struct.Struct(">IIIIQqqq16sQB32s")
#: oid, generation, codec, flags, plain_len, stored_len
_CHUNK = struct.Struct(">16sQBBII")
_U16 = struct.Struct(">H")
_STATS = struct.Struct(">QQQ")

DATABASES = ("meta", "inodes", "dirents", "chunks", "xattrs", "orphans", "backlog",
             "content", "scrubbed")
#: databases a store made by an older dcmfs may lack (created at its first
#: read-write opening; empty for a read-only one)
OPTIONAL = ("scrubbed",)
#: databases whose values are sealed (the others hold plain numbers or nothing)
SEALED = ("inodes", "dirents", "chunks", "xattrs", "content")
_DB_ID = {name: i for i, name in enumerate(DATABASES)}
JOURNAL_NAME = "journal"


@dataclasses.dataclass
class Inode:
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    file_id: bytes
    generation: int = 0
    sha256: bytes | None = None
    target: bytes = b""

    def encode(self) -> bytes:
        return _INODE.pack(self.mode, self.uid, self.gid, self.nlink, self.size,
                           self.atime_ns, self.mtime_ns, self.ctime_ns, self.file_id,
                           self.generation, self.sha256 is not None,
                           self.sha256 or bytes(32)) + self.target

    @classmethod
    def decode(cls, raw: bytes) -> "Inode":
        (mode, uid, gid, nlink, size, at, mt, ct, file_id, gen, has_sha,
         sha) = _INODE.unpack_from(raw)
        return cls(mode, uid, gid, nlink, size, at, mt, ct, file_id, gen,
                   sha if has_sha else None, bytes(raw[_INODE.size:]))


def ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def _encode_chunk(ref: ChunkRef) -> bytes:
    raw = _CHUNK.pack(*ref[:6])
    return raw if ref.offset < 0 else raw + _U64.pack(ref.offset)


def _decode_chunk(raw: bytes) -> ChunkRef:
    fields = _CHUNK.unpack_from(raw)
    if len(raw) == _CHUNK.size + _U64.size:
        return ChunkRef(*fields, _U64.unpack_from(raw, _CHUNK.size)[0])
    return ChunkRef(*fields)


def _lmdb_error(exc: lmdb.Error, doing: str) -> Exception:
    if isinstance(exc, lmdb.MapFullError):
        return NoSpaceError(f"The index is full while {doing}; raise index_map_size.")
    err = getattr(exc, "args", (None,))
    text = str(exc)
    if "No space left" in text or (err and err[0] == errno.ENOSPC):
        return NoSpaceError(f"The disk under the store is full while {doing}; "
                            "free space there and retry.")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                        lmdb.VersionMismatchError, lmdb.BadRslotError)):
        return IndexDamagedError(f"The index is damaged ({doing}): {text}. "
                                 "Run 'dcmfs fsck' on the store.")
    return StoreIOError(f"Index error while {doing}: {text}.")


def read_stats(path: str) -> tuple[int, int, int] | None:
    """(files, logical bytes, stored bytes) without the key; None if no index.

    While a daemon has the index open, figures may be up to one checkpoint
    old, and a read racing a checkpoint can fail (the daemon opens LMDB
    without its lock file); ``dcmfs status`` asks a running daemon instead.
    """
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    try:
        env = lmdb.open(path, subdir=True, readonly=True, lock=True, max_dbs=len(DATABASES))
    except lmdb.Error as exc:
        raise _lmdb_error(exc, "reading statistics") from exc
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            raw = txn.get(b"stats", db=meta)
        return _STATS.unpack(raw) if raw else (0, 0, 0)
    except lmdb.Error as exc:
        raise _lmdb_error(exc, "reading statistics") from exc
    finally:
        env.close()


class Index:
    """The opened LMDB environment, its journal and the keys that seal its values."""

    def __init__(self, path: str, master_key: bytes, store_id: bytes, map_size: int,
                 read_only: bool = False, journal_limit: int = 8 * 1024 * 1024,
                 archive_dir: str | None = None) -> None:
        self.read_only = read_only
        self._journal_limit = journal_limit
        #: where full journals go (``snapshots/``): with the newest snapshot
        #: they are the whole index, for ``dcmfs fsck --rebuild-index``
        self.archive_dir = archive_dir
        self._master, self._store_id = master_key, store_id
        if not read_only:  # lmdb would create the directory with its file mode 0600 (no x):
            os.makedirs(path, mode=0o700, exist_ok=True)  # only CAP_DAC_OVERRIDE could enter it
            if os.stat(path).st_mode & 0o700 != 0o700:
                os.chmod(path, 0o700)
        try:
            self.env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=len(DATABASES),
                                 readonly=read_only, create=not read_only, mode=0o600,
                                 sync=True, metasync=True, readahead=False, lock=False)
            self.dbs = {}
            for name in DATABASES:
                try:
                    self.dbs[name] = self.env.open_db(name.encode(), create=not read_only)
                except lmdb.NotFoundError:
                    if name not in OPTIONAL:
                        raise
                    self.dbs[name] = None  # an older store opened read-only: empty
        except lmdb.Error as exc:
            raise _lmdb_error(exc, "opening the index") from exc
        self._siv = crypto.Siv(crypto.derive(master_key, b"index", store_id))
        self._name_key = crypto.derive(master_key, b"names", store_id)
        self.journal = Journal(os.path.join(path, JOURNAL_NAME), master_key, store_id,
                               read_only=read_only)
        self._batch: lmdb.Transaction | None = None
        self._seq = self._applied_seq()
        #: journal records appended since the last checkpoint
        self.pending_records = 0
        self._broken: str | None = None
        if read_only and any(True for _ in self.journal.records(self._seq)):
            self.journal.close()
            self.env.close()
            raise NeedsRecoveryError(
                "The store was not cleanly unmounted and its journal holds changes not yet "
                "in the index; mount it read-write once so they are applied, then mount "
                "it read-only.")

    def _applied_seq(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"journal_seq", db=self.dbs["meta"])
        return _U64.unpack(raw)[0] if raw else 0

    def close(self) -> None:
        """Close without a checkpoint: what is not checkpointed stays in the journal."""
        if self._batch is not None:
            self._batch.abort()
            self._batch = None
        self.journal.close()
        self.env.close()

    # --- durability -------------------------------------------------------------
    def sync_journal(self) -> None:
        """Make every committed operation durable through the journal.

        The caller must first have made durable every object those
        operations refer to.
        """
        if self.pending_records:
            self.journal.sync()

    def needs_checkpoint(self) -> bool:
        return (self.pending_records >= 4096 or self.journal.size >= self._journal_limit)

    @property
    def seq(self) -> int:
        """The sequence number of the last journaled operation."""
        return self._seq

    def checkpoint(self) -> bool:
        """Commit the batch durably; returns True when the journal was full
        and moved to the archive.

        The caller must first have made durable every object the batch refers to.
        """
        if self._broken:
            raise IndexDamagedError(self._broken)
        if self._batch is None:
            return False
        batch, self._batch = self._batch, None
        try:
            self._commit_batch(batch)
        except lmdb.Error as exc:
            # the batch is gone, the journal still holds every change: rebuild
            # the batch from it so that the mount goes on (disk full, say)
            try:
                batch.abort()
            except lmdb.Error:
                pass
            error = _lmdb_error(exc, "checkpointing the index")
            self._reload_from_journal()
            raise error from exc
        self.pending_records = 0
        # the records stay in the journal after the checkpoint (replay skips
        # them): with the snapshots, journal and archive are the whole index,
        # so it can be rebuilt if data.mdb is lost.  A full journal moves to
        # the archive.
        if self.journal.size < self._journal_limit:
            return False
        if self.archive_dir is None:
            self.journal.reset()
            return False
        os.makedirs(self.archive_dir, mode=0o700, exist_ok=True)
        self.journal.rotate(os.path.join(self.archive_dir,
                                         f"{fmt.ARCHIVE_PREFIX}{self._seq:016d}"))
        return True

    def _commit_batch(self, batch: lmdb.Transaction) -> None:
        """The durable LMDB commit of a checkpoint (one place, for fault tests)."""
        batch.put(b"journal_seq", _U64.pack(self._seq), db=self.dbs["meta"])
        batch.commit()
        self.env.sync(True)

    def _apply(self, parent: lmdb.Transaction, ops: list[Op]) -> lmdb.Transaction:
        child = self.env.begin(write=True, parent=parent)
        try:
            for kind, db_id, key, value in ops:
                db = self.dbs[DATABASES[db_id]]
                if kind == PUT:
                    child.put(key, value, db=db)
                else:
                    child.delete(key, db=db)
        except BaseException:
            child.abort()
            raise
        return child

    def _reload_from_journal(self) -> None:
        """Start a new batch holding the index plus every journal record."""
        self._batch = None
        expect = self._applied_seq()
        problem = "records missing"
        try:
            for seq, ops in self.journal.records(expect):
                if seq != expect + 1:
                    break
                self._apply(self._parent(), ops).commit()
                expect = seq
        except (lmdb.Error, IndexError) as exc:
            expect, problem = -1, str(exc)
        if expect != self._seq:
            self._broken = ("The index could not be rebuilt from its journal; restart the "
                            "daemon (a restart replays the journal).")
            log.error("%s (%s)", self._broken, problem)

    def _apply_checked(self, ops: list[Op], verify) -> bool:
        """Apply one record's ops to the batch if every chunk object it puts is
        intact (``verify(txn, ino, index, ref)``); False (nothing applied) if not."""
        try:
            child = self._apply(self._parent(), ops)
        except (lmdb.Error, IndexError):
            return False
        ok = True
        txn = Txn(self, child)
        try:
            for kind, db_id, key, value in ops:
                if kind == PUT and DATABASES[db_id] == "chunks":
                    ino, idx = _U64x2.unpack(key)
                    ref = _decode_chunk(self.open("chunks", key, value))
                    if not verify(txn, ino, idx, ref):
                        ok = False
                        break
        except (lmdb.Error, IntegrityError, struct.error):
            ok = False
        except BaseException:
            child.abort()
            raise
        if not ok:
            child.abort()
            return False
        child.commit()
        return True

    def replay(self, verify, commit: bool = True) -> tuple[int, int]:
        """Apply the journal records a crash left behind; returns (applied, dropped).

        ``verify(txn, ino, index, ref)`` is asked about every chunk a record
        puts; a record whose object is not intact (its write had not reached
        the disk when the power failed) ends the replay there, so the index
        is always a prefix of what was written.  Any other error from
        ``verify`` propagates: the mount fails and nothing is dropped.  The
        result is checkpointed; the caller must have synced the objects.
        """
        records = list(self.journal.records(self._seq))
        applied = 0
        for seq, ops in records:
            if seq != self._seq + 1:
                break
            if not self._apply_checked(ops, verify):
                break
            self._seq = seq
            applied += 1
        dropped = len(records) - applied
        if commit:
            # what was not applied (dropped records, a torn tail) goes, durably,
            # before anything is appended or archived: new records must follow
            # the last applied one, or the next replay would stop at the old
            # bytes, and a rebuild must never roll dropped records forward
            self.journal.cut_after(self._seq)
            if records:
                self.checkpoint()  # the caller has synced the objects first
        return applied, dropped

    def raw_items(self, db: str) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value as stored) of one database (fsck)."""
        txn = self._parent() if not self.read_only else self.env.begin()
        yield from txn.cursor(db=self.dbs[db])

    # --- transactions -----------------------------------------------------------
    def _parent(self) -> lmdb.Transaction:
        if self._batch is None:
            try:
                self._batch = self.env.begin(write=True)
            except lmdb.Error as exc:
                raise _lmdb_error(exc, "starting a transaction") from exc
        return self._batch

    def begin(self, write: bool = False) -> "Txn":
        """A transaction for one operation (a context manager).

        Reads see every committed operation, checkpointed or not.
        """
        if self._broken:
            raise IndexDamagedError(self._broken)
        try:
            if self.read_only:
                return Txn(self, self.env.begin(write=False))
            if not write:
                return Txn(self, self._parent(), borrowed=True)
            return Txn(self, self.env.begin(write=True, parent=self._parent()), nested=True)
        except lmdb.Error as exc:
            raise _lmdb_error(exc, "starting a transaction") from exc

    def _commit_nested(self, txn: "Txn") -> None:
        """Journal one operation's changes, then merge them into the batch."""
        if txn.ops:
            self.journal.append(self._seq + 1, txn.ops)  # may raise: nothing changed yet
            self._seq += 1
            self.pending_records += 1
        try:
            txn.txn.commit()
        except lmdb.Error as exc:
            self._broken = ("The index failed in memory; restart the daemon "
                            "(its journal keeps every change).")
            raise _lmdb_error(exc, "committing") from exc

    def roll_forward(self, journal_paths: list[str], verify) -> tuple[int, int, int]:
        """Apply the records of these journals (archive segments in order, then
        a live journal) that follow the index's sequence number, each only if
        its objects are intact (``verify`` as for :meth:`replay`); stops at the
        first gap or failing record.  Returns (records applied, records not
        applied, the highest sequence number seen).  For index rebuilds; the
        result is checkpointed."""
        applied = skipped = 0
        highest = self._seq
        for path in journal_paths:
            j = Journal(path, self._master, self._store_id, read_only=True)
            try:
                for seq, ops in j.records(self._seq):
                    highest = max(highest, seq)
                    if skipped or seq != self._seq + 1 or not self._apply_checked(ops, verify):
                        skipped += 1
                        continue
                    self._seq = seq
                    applied += 1
            finally:
                j.close()
        self.checkpoint()
        return applied, skipped, highest

    def skip_to(self, seq: int) -> None:
        """Continue numbering after ``seq`` (a rebuild that left records
        unapplied: their numbers must never be reused)."""
        if seq > self._seq:
            self._seq = seq

    def name_tag(self, parent: int, name: bytes) -> bytes:
        return hmac.new(self._name_key, _U64.pack(parent) + name, hashlib.sha256).digest()[:16]

    def seal(self, db: str, key: bytes, value: bytes) -> bytes:
        return self._siv.seal(value, db.encode() + b"\x00" + key)

    def open(self, db: str, key: bytes, sealed: bytes) -> bytes:
        try:
            return self._siv.open(sealed, db.encode() + b"\x00" + key)
        except crypto.AuthenticationFailed as exc:
            raise IntegrityError(f"index entry {db}/{key.hex()} failed authentication; "
                                 "run 'dcmfs fsck' on the store") from exc


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
            self.ops.append((kind, _DB_ID[db], bytes(key), value))

    # --- helpers ---------------------------------------------------------------
    def _get(self, db: str, key: bytes) -> bytes | None:
        raw = self.txn.get(key, db=self._db[db])
        return None if raw is None else self.ix.open(db, key, raw)

    def _put(self, db: str, key: bytes, value: bytes) -> None:
        sealed = self.ix.seal(db, key, value)
        try:
            self.txn.put(key, sealed, db=self._db[db])
        except lmdb.Error as exc:
            raise _lmdb_error(exc, f"writing {db}") from exc
        self._record(PUT, db, key, sealed)

    def _delete(self, db: str, key: bytes) -> bool:
        try:
            found = self.txn.delete(key, db=self._db[db])
        except lmdb.Error as exc:
            raise _lmdb_error(exc, f"deleting from {db}") from exc
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
            raise _lmdb_error(exc, f"writing {db}") from exc
        self._record(PUT, db, key, value)

    def meta_put(self, name: str, value: bytes) -> None:
        self._put_plain("meta", name.encode(), value)

    def stats(self) -> tuple[int, int, int]:
        """(regular files, logical bytes, stored bytes) of the whole store."""
        raw = self.meta_get("stats")
        return _STATS.unpack(raw) if raw else (0, 0, 0)

    def add_stats(self, files: int = 0, logical: int = 0, stored: int = 0) -> None:
        if files or logical or stored:
            f, lg, st = self.stats()
            self.meta_put("stats", _STATS.pack(f + files, lg + logical, st + stored))

    def alloc_ino(self) -> int:
        raw = self.meta_get("next_ino")
        ino = _U64.unpack(raw)[0] if raw else fmt.ROOT_INO + 1
        self.meta_put("next_ino", _U64.pack(ino + 1))
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
        return refs

    def iter_inodes(self) -> Iterator[tuple[int, Inode]]:
        for key, raw in self._scan("inodes", b""):
            yield _U64.unpack(key)[0], Inode.decode(raw)

    def iter_inodes_checked(self) -> Iterator[tuple[int, Inode | IntegrityError]]:
        """Like :meth:`iter_inodes`, but a record that does not authenticate
        is yielded as its error instead of ending the scan (verify)."""
        for key, raw in self._scan_raw("inodes", b""):
            ino = _U64.unpack(key)[0]
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
        return None if raw is None else _U64.unpack_from(raw)[0]

    def add_dirent(self, parent: int, name: bytes, ino: int) -> None:
        key = ino_key(parent) + self.ix.name_tag(parent, name)
        self._put("dirents", key, _U64.pack(ino) + name)

    def remove_dirent(self, parent: int, name: bytes) -> None:
        self._delete("dirents", ino_key(parent) + self.ix.name_tag(parent, name))

    def list_dir(self, parent: int) -> Iterator[tuple[bytes, int]]:
        for _, raw in self._scan("dirents", ino_key(parent)):
            yield raw[8:], _U64.unpack_from(raw)[0]

    def dir_is_empty(self, parent: int) -> bool:
        cur = self.txn.cursor(db=self._db["dirents"])
        prefix = ino_key(parent)
        return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def iter_dirents(self) -> Iterator[tuple[int, bytes, int]]:
        for key, raw in self._scan("dirents", b""):
            yield _U64.unpack_from(key)[0], raw[8:], _U64.unpack_from(raw)[0]

    # --- chunk table ----------------------------------------------------------
    def chunks(self, ino: int) -> dict[int, ChunkRef]:
        out = {}
        for key, raw in self._scan("chunks", ino_key(ino)):
            out[_U64x2.unpack(key)[1]] = _decode_chunk(raw)
        return out

    def put_chunk(self, ino: int, index: int, ref: ChunkRef) -> None:
        self._put("chunks", _U64x2.pack(ino, index), _encode_chunk(ref))

    def delete_chunk(self, ino: int, index: int) -> None:
        self._delete("chunks", _U64x2.pack(ino, index))

    def iter_all_chunks_checked(self) -> Iterator[tuple[int, int, ChunkRef | None]]:
        """Like :meth:`iter_all_chunks`; an entry that does not authenticate
        is yielded with None (verify, fsck)."""
        for key, raw in self._scan_raw("chunks", b""):
            ino, idx = _U64x2.unpack(key)
            try:
                yield ino, idx, _decode_chunk(self.ix.open("chunks", key, raw))
            except (IntegrityError, struct.error):
                yield ino, idx, None

    def iter_all_chunks(self) -> Iterator[tuple[int, int, ChunkRef]]:
        for key, raw in self._scan("chunks", b""):
            ino, idx = _U64x2.unpack(key)
            yield ino, idx, _decode_chunk(raw)

    # --- xattrs ---------------------------------------------------------------
    def _xkey(self, ino: int, name: bytes) -> bytes:
        return ino_key(ino) + self.ix.name_tag(ino, b"xattr\x00" + name)

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self._get("xattrs", self._xkey(ino, name))
        if raw is None:
            return None
        n = _U16.unpack_from(raw)[0]
        return raw[2 + n:]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._put("xattrs", self._xkey(ino, name), _U16.pack(len(name)) + name + value)

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self._delete("xattrs", self._xkey(ino, name))

    def list_xattrs(self, ino: int) -> list[bytes]:
        out = []
        for _, raw in self._scan("xattrs", ino_key(ino)):
            n = _U16.unpack_from(raw)[0]
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
        return [_U64.unpack(k)[0] for k, _ in self._scan_raw("backlog", b"")]

    # --- what the re-encoder found (sealed) -------------------------------------
    def get_content(self, ino: int) -> dict | None:
        raw = self._get("content", ino_key(ino))
        return None if raw is None else json.loads(raw)

    def put_content(self, ino: int, info: dict) -> None:
        self._put("content", ino_key(ino), json.dumps(info, sort_keys=True).encode())

    # --- when each file was last verified (the scrubber) -----------------------
    def set_scrubbed(self, ino: int, when_ns: int) -> None:
        self._put_plain("scrubbed", ino_key(ino), _U64.pack(when_ns))

    def scrubbed(self, ino: int) -> int | None:
        if self._db["scrubbed"] is None:
            return None
        raw = self.txn.get(ino_key(ino), db=self._db["scrubbed"])
        return None if raw is None else _U64.unpack(raw)[0]

    def orphans(self) -> list[int]:
        return [_U64.unpack(k)[0] for k, _ in self._scan_raw("orphans", b"")]
