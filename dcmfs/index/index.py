"""The LMDB index: the opened environment, its journal, checkpoints, replay
and the keys that seal its values.

The schema (databases, keys, values) is in :mod:`dcmfs.index.schema`; one
operation's view with typed accessors is :class:`dcmfs.index.txn.Txn`.

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

import json
import logging
import os
import shutil
import struct
from typing import Iterator

import lmdb

from ..storage import crypto
from .. import format as fmt
from ..errors import (DcmfsError, IndexDamagedError, IntegrityError, NeedsRecoveryError,
                      StoreIOError)
from ..storage.durable import fsync_dir
from . import auth
from .checks import Checked
from .tags import NameTags
from .journal import CONVERT, PUT, Journal, Op
from .journal import HEADER_SIZE as JOURNAL_HEADER
from .journal import VERSION as JOURNAL_VERSION
from .auth import KEYED_DIRENT
from .inline import InlineRows
from .schema import (DATABASES, JOURNAL_NAME, OPTIONAL, U64, U64X2, decode_chunk,
                     encode_dirent, lmdb_error, read_meta)
from .txn import Txn
from .witness import Witness

log = logging.getLogger("dcmfs.index")


def index_sealer(master_key: bytes, store_id: bytes) -> crypto.Siv:
    """The AEAD that seals index values (HKDF label ``index``)."""
    return crypto.Siv(crypto.derive(master_key, b"index", store_id))


def sealed_aad(db: str, key: bytes) -> bytes:
    """The associated data of a sealed value: its database and key."""
    return db.encode() + b"\x00" + key


def read_damage(path: str, master_key: bytes, store_id: bytes) -> dict | None:
    """The sealed damage record (``meta/damage``) of a closed index, None if
    there is none; ``{}`` for one that does not authenticate (it counts).

    An index that cannot be read here is left to the opening that follows,
    which reports it; a record only in the journal (a crash within a
    checkpoint interval of the first integrity error) is not seen.
    """
    try:
        found = read_meta(path, ("damage",), "reading the damage record")
    except DcmfsError:
        return None
    raw = found and found["damage"]
    if raw is None:
        return None
    try:
        info = json.loads(index_sealer(master_key, store_id).open(raw, sealed_aad("meta",
                                                                                  b"damage")))
    except (crypto.AuthenticationFailed, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class Index(Checked, NameTags):
    """The opened LMDB environment, its journal and the keys that seal its values."""

    def __init__(self, path: str, master_key: bytes, store_id: bytes, map_size: int,
                 read_only: bool = False, journal_limit: int = 8 * 1024 * 1024,
                 archive_dir: str | None = None, check: bool = False,
                 generation: int = 0) -> None:
        self.read_only = read_only
        self.generation = generation  # the epoch of master_key (dcmfs.index.keygen)
        self._journal_limit = journal_limit
        #: where full journals go (``snapshots/``): with the newest snapshot
        #: they are the whole index, for ``dcmfs fsck --rebuild-index``
        self.archive_dir = archive_dir
        self._master, self._store_id = master_key, store_id
        if not read_only:  # lmdb would create the directory with its file mode 0600 (no x):
            os.makedirs(path, mode=0o700, exist_ok=True)  # only CAP_DAC_OVERRIDE could enter it
            if os.stat(path).st_mode & 0o700 != 0o700:
                os.chmod(path, 0o700)
        self._open_env(path, map_size)
        self._siv = index_sealer(master_key, store_id)
        NameTags.__init__(self, crypto.derive(master_key, b"names", store_id))
        self.journal = Journal(os.path.join(path, JOURNAL_NAME), master_key, store_id,
                               read_only=read_only)
        self._batch: lmdb.Transaction | None = None
        #: small chunks' objects (feature ``inline-small-v1``), for the object store
        self.inline = InlineRows(self)
        self._seq = self._applied_seq()
        self._init_checks(master_key, store_id)
        #: directory entries keyed by a keyed tag of the parent (format 4;
        #: ``meta/dirents`` = b"keyed"), else by the parent's inode number
        self.keyed_dirents = self._detect_dirents()
        #: raised when a directory entry may be removed or replaced (core.links.PathCache)
        self.names_gen = 0
        #: the witness outside the store, once the session has started it
        self.witness: Witness | None = None
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
        self._load_sums(check)

    def _open_env(self, path: str, map_size: int) -> None:
        read_only = self.read_only
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
            raise lmdb_error(exc, "opening the index") from exc

    def compact(self) -> None:
        """Replace ``data.mdb`` by a compacted copy of itself (LMDB's copy
        with MDB_CP_COMPACT: live pages only), so that no freed page keeps
        an old record (crypto-shredding, :mod:`dcmfs.index.shred`).  Call
        it right after a checkpoint, with no transaction open (the core's
        lock held); a crash leaves the old file or the new one, both whole."""
        from .keygen import compact_index  # (kept apart for this module's size)
        compact_index(self)

    def swap_in(self, tmp: str, path: str, map_size: int) -> None:
        """Replace the index's data file with the durable copy in ``tmp``
        (compaction, a key generation move) and open it again."""
        with self.inline.exclusive():
            self.env.close()
            try:
                os.rename(os.path.join(tmp, "data.mdb"), os.path.join(path, "data.mdb"))
                fsync_dir(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                self._open_env(path, map_size)

    def _applied_seq(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"journal_seq", db=self.dbs["meta"])
        return U64.unpack(raw)[0] if raw else 0

    def close(self) -> None:
        """Close without a checkpoint: what is not checkpointed stays in the journal."""
        if self._batch is not None:
            self._batch.abort()
            self._batch = None
        self.journal.close()
        with self.inline.exclusive():
            self.env.close()

    # --- durability -------------------------------------------------------------
    def sync_journal(self) -> None:
        """Make every committed operation durable through the journal.

        The caller must first have made durable every object those
        operations refer to.
        """
        if self.pending_records:
            self.journal.sync()
            if self.witness is not None:
                self.witness.synced(self._seq)

    #: journal records after which a checkpoint is due (``slack`` times: overdue)
    checkpoint_records = 4096

    def needs_checkpoint(self, slack: int = 1) -> bool:
        return (self.pending_records >= self.checkpoint_records * slack
                or self.journal.size >= self._journal_limit * slack)

    @property
    def seq(self) -> int:
        """The sequence number of the last journaled operation."""
        return self._seq

    @property
    def broken(self) -> str | None:
        """Why the index may not be used any more (every transaction
        raises IndexDamagedError with it), or None."""
        return self._broken

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
            with self.inline.exclusive(committing=True):  # readers see it whole
                self._commit_batch(batch)
        except lmdb.Error as exc:
            # the batch is gone, the journal still holds every change: rebuild
            # the batch from it so that the mount goes on (disk full, say)
            try:
                batch.abort()
            except lmdb.Error:
                pass
            error = lmdb_error(exc, "checkpointing the index")
            self._reload_from_journal()
            raise error from exc
        self.pending_records = 0
        if self.witness is not None:
            self.witness.checkpoint(self._seq, self.sums.digest())
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

    def _renew_journal(self) -> None:
        """A journal of an older layout (every record of it is in the index
        now) goes to the archive, or away; new records go to a new one."""
        dest = os.path.join(self.archive_dir or "", f"{fmt.ARCHIVE_PREFIX}{self._seq:016d}")
        if self.archive_dir is None or self.journal.size <= JOURNAL_HEADER \
                or os.path.exists(dest):
            self.journal.reset()  # no record to keep (never over an archived segment)
            return
        os.makedirs(self.archive_dir, mode=0o700, exist_ok=True)
        self.journal.rotate(dest)

    def _commit_batch(self, batch: lmdb.Transaction) -> None:
        """The durable LMDB commit of a checkpoint (one place, for fault tests)."""
        batch.put(b"journal_seq", U64.pack(self._seq), db=self.dbs["meta"])
        batch.put(auth.AUTH_KEY, self._write_sums(batch), db=self.dbs["meta"])
        batch.commit()
        self.env.sync(True)

    def _apply(self, parent: lmdb.Transaction, ops: list[Op]) -> lmdb.Transaction:
        """A child transaction holding ``ops``; its changes to the sums are
        in :attr:`_applied` until the caller counts them (:meth:`_count`)."""
        child = self.env.begin(write=True, parent=parent)
        changes = []
        try:
            for kind, db_id, key, value in ops:
                name = DATABASES[db_id]
                db = self.dbs[name]
                self.names_gen += name == "dirents"  # a replay or a follower's apply
                if kind == CONVERT:
                    changes += self.convert(child)
                    continue
                old = child.get(key, db=db)
                if kind == PUT:
                    child.put(key, value, db=db)
                    changes.append((name, key, old, value))
                elif old is not None:
                    child.delete(key, db=db)
                    changes.append((name, key, old, None))
        except BaseException:
            child.abort()
            raise
        self._applied = changes
        return child


    def _reload_from_journal(self) -> None:
        """Start a new batch holding the index plus every journal record."""
        self._batch = None
        expect = self._applied_seq()
        problem = "records missing"
        try:
            self._reset_sums(expect)
            for seq, ops in self.journal.records(expect):
                if seq != expect + 1:
                    break
                self._apply(self._parent(), ops).commit()
                self._count(self._applied)
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
        txn.changes = list(self._applied)  # in the child, not yet in the sums
        try:
            for kind, db_id, key, value in ops:
                if kind == PUT and DATABASES[db_id] == "chunks":
                    ino, idx = U64X2.unpack(key)
                    ref = decode_chunk(self.open("chunks", key, value))
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
        self._count(self._applied)
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
            if self.journal.version < JOURNAL_VERSION:
                self._renew_journal()
        return applied, dropped

    def raw_items(self, db: str) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value as stored) of one database (fsck)."""
        if self.dbs[db] is None:  # an optional database an older store lacks
            return
        txn = self._parent() if not self.read_only else self.env.begin()
        yield from txn.cursor(db=self.dbs[db])

    # --- transactions -----------------------------------------------------------
    def _parent(self) -> lmdb.Transaction:
        if self._batch is None:
            try:
                self._batch = self.env.begin(write=True)
            except lmdb.Error as exc:
                raise lmdb_error(exc, "starting a transaction") from exc
        return self._batch

    def begin(self, write: bool = False, gated: bool = True) -> "Txn":
        """A transaction for one operation (a context manager).

        Reads see every committed operation, checkpointed or not.
        ``gated=False``: records of groups that do not match their sums are
        read too (verify, which reports those groups itself).
        """
        if self._broken:
            raise IndexDamagedError(self._broken)
        try:
            if self.read_only:
                txn = Txn(self, self.env.begin(write=False))
            elif not write:
                txn = Txn(self, self._parent(), borrowed=True)
            else:
                txn = Txn(self, self.env.begin(write=True, parent=self._parent()), nested=True)
        except lmdb.Error as exc:
            raise lmdb_error(exc, "starting a transaction") from exc
        txn.gated = gated
        return txn

    def _commit_nested(self, txn: "Txn") -> None:
        """Journal one operation's changes, then merge them into the batch."""
        if txn.ops:
            self.journal.append(self._seq + 1, txn.ops)  # may raise: nothing changed yet
            self._seq += 1
            self.pending_records += 1
            if self.witness is not None:
                self.witness.written(self._seq)
        try:
            txn.txn.commit()
        except lmdb.Error as exc:
            self._broken = ("The index failed in memory; restart the daemon "
                            "(its journal keeps every change).")
            raise lmdb_error(exc, "committing") from exc
        self._count(txn.changes)

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

    def _detect_dirents(self) -> bool:
        with self.env.begin() as txn:
            return txn.get(b"dirents", db=self.dbs["meta"]) == b"keyed"

    def convert(self, txn: lmdb.Transaction) -> list:
        """Key every directory entry of the older layout (parent inode + name
        tag) by the keyed tag of its parent, its value padded
        (:func:`~dcmfs.index.schema.encode_dirent`); returns the changes
        (database, key, old, new).  Entries that do not open stay as they
        are, for fsck.  Idempotent; one journal operation (``CONVERT``)."""
        db = self.dbs["dirents"]
        old = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db) if len(k) != KEYED_DIRENT]
        changes = []
        for key, sealed in old:
            try:
                plain = self.open("dirents", key, sealed)
            except IntegrityError:
                continue
            parent, child, name = U64.unpack_from(key)[0], U64.unpack_from(plain)[0], plain[8:]
            nkey = self.parent_tag(parent) + self.name_tag(parent, name)
            nvalue = self.seal("dirents", nkey, encode_dirent(parent, child, name))
            prev = txn.get(nkey, db=db)
            txn.delete(key, db=db)
            txn.put(nkey, nvalue, db=db)
            changes += [("dirents", key, sealed, None), ("dirents", nkey, prev, nvalue)]
        flag = txn.get(b"dirents", db=self.dbs["meta"])
        txn.put(b"dirents", b"keyed", db=self.dbs["meta"])
        changes.append(("meta", b"dirents", flag, b"keyed"))
        self.keyed_dirents = True
        return changes

    def convert_dirents(self) -> int:
        """The format-4 upgrade of the directory entries, journaled as one
        operation; returns how many entries were converted."""
        with self.begin(write=True) as txn:
            return txn.convert_dirents()

    def unapplied_records(self) -> bool:
        """Does the journal hold records after the index's sequence number
        (an unclean store, before its replay)?"""
        return any(True for _ in self.journal.records(self._seq))

    def seal(self, db: str, key: bytes, value: bytes) -> bytes:
        return self._siv.seal(value, sealed_aad(db, key))

    def open(self, db: str, key: bytes, sealed: bytes) -> bytes:
        try:
            return self._siv.open(sealed, sealed_aad(db, key))
        except crypto.AuthenticationFailed as exc:
            raise IntegrityError(f"index entry {db}/{key.hex()} failed authentication; "
                                 "run 'dcmfs fsck' on the store") from exc

