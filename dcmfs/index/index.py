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
from ..errors import (DcmfsError, IndexDamagedError, IndexNotAuthenticError, IntegrityError,
                      NeedsRecoveryError)
from . import auth
from .journal import PUT, Journal, Op
from .journal import HEADER_SIZE as JOURNAL_HEADER
from .journal import VERSION as JOURNAL_VERSION
from .schema import (DATABASES, JOURNAL_NAME, OPTIONAL, U64, U64X2, decode_chunk,
                     lmdb_error, read_meta)
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


class Index:
    """The opened LMDB environment, its journal and the keys that seal its values."""

    def __init__(self, path: str, master_key: bytes, store_id: bytes, map_size: int,
                 read_only: bool = False, journal_limit: int = 8 * 1024 * 1024,
                 archive_dir: str | None = None, check: bool = True) -> None:
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
            raise lmdb_error(exc, "opening the index") from exc
        self._siv = index_sealer(master_key, store_id)
        self._name_key = crypto.derive(master_key, b"names", store_id)
        self.journal = Journal(os.path.join(path, JOURNAL_NAME), master_key, store_id,
                               read_only=read_only)
        self._batch: lmdb.Transaction | None = None
        self._seq = self._applied_seq()
        self._auth_key = auth.auth_key(master_key, store_id)
        #: the sums of every record (batch included), kept change by change
        self.sums: auth.Sums | None = None
        #: groups whose records do not match the sealed sums: their files are
        #: refused (see :mod:`dcmfs.index.auth`)
        self.suspect: frozenset[int] = frozenset()
        #: the groups that differed when the index was opened (kept when
        #: :attr:`suspect` is cleared for fsck); while any did, nothing may
        #: seal new sums (a checkpoint would make foreign records authentic)
        #: unless a repair explained every difference (:attr:`reseal_allowed`)
        self.mismatch: frozenset[int] = frozenset()
        self.reseal_allowed = False
        #: "ok" (the sums match), "legacy" (no sealed sums: a store of format
        #: 3 or older), "unchecked" (not compared: ``check=False``), or
        #: "mismatch" (see :attr:`suspect`)
        self.auth_state = "unchecked"
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

    # --- authenticity (dcmfs.index.auth) -----------------------------------------
    def sealed_sums(self) -> tuple[int, auth.Sums] | None:
        """(sequence number, sums) of the sealed ``meta/auth`` record as
        committed; None if there is none.

        Raises
        ------
        IntegrityError
            The record does not authenticate or does not decode.
        """
        with self.env.begin() as txn:
            raw = txn.get(auth.AUTH_KEY, db=self.dbs["meta"])
        if raw is None:
            return None
        plain = self.open("meta", auth.AUTH_KEY, raw)
        try:
            return auth.Sums.decode(self._auth_key, plain)
        except (ValueError, struct.error) as exc:
            raise IntegrityError("index entry meta/auth does not decode") from exc

    def scan_sums(self, txn: lmdb.Transaction | None = None) -> auth.Sums:
        """The sums of every record as the index holds them now (one read of
        the whole index)."""
        own = txn is None
        txn = txn or self.env.begin()
        try:
            def items():
                for name in DATABASES:
                    db = self.dbs[name]
                    if db is None:
                        continue
                    for k, v in txn.cursor(db=db):
                        yield name, k, v
            return auth.scan(self._auth_key, items())
        finally:
            if own:
                txn.abort()

    def _load_sums(self, check: bool) -> None:
        """Read the sealed sums and, with ``check``, compare them with the
        records (see :attr:`auth_state`)."""
        try:
            sealed = self.sealed_sums()
        except IntegrityError:
            sealed = (-1, None)
        if sealed is not None and sealed[0] != self._seq:
            sealed = (-1, None)  # sums of another checkpoint: nothing matches
        if not check and sealed is not None and sealed[1] is not None:
            self.sums = sealed[1]
            return
        if not check and self.read_only:
            return  # nothing will change: the sums are not needed
        self.sums = self.scan_sums()
        if not check:
            return
        if sealed is None:
            self.auth_state = "legacy"
        elif sealed[1] is None:
            self.auth_state, self.suspect = "mismatch", frozenset(range(auth.GROUPS + 1))
        else:
            differing = self.sums.differing(sealed[1])
            self.auth_state = "mismatch" if differing else "ok"
            self.suspect = frozenset(differing)
        self.mismatch = self.suspect

    def seal_now(self) -> None:
        """Seal the sums now (a store that had none): a checkpoint of an
        otherwise empty batch."""
        self._parent()
        self.checkpoint()

    def last_journal_seq(self) -> int:
        """The sequence number of the last intact journal record (the index's
        own if the journal holds nothing after it)."""
        last = self._seq
        for seq, _ in self.journal.records(self._seq):
            last = seq
        return last

    def root_digest(self) -> bytes:
        """One value for the whole index as it is now (the witness keeps it)."""
        if self.sums is None:
            self.sums = self.scan_sums()
        return self.sums.digest()

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
        if self.mismatch and not self.reseal_allowed:
            raise IndexNotAuthenticError(
                "The index does not match its sealed checksum, so no change to it is made "
                "durable; rebuild it with 'dcmfs fsck --rebuild-index'.")
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
            error = lmdb_error(exc, "checkpointing the index")
            self._reload_from_journal()
            raise error from exc
        self.pending_records = 0
        self.mismatch, self.auth_state = frozenset(), "ok"
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
        if self.sums is None:
            self.sums = self.scan_sums(batch)
        batch.put(auth.AUTH_KEY, self.seal("meta", auth.AUTH_KEY, self.sums.encode(self._seq)),
                  db=self.dbs["meta"])
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

    def _count(self, changes) -> None:
        """Add committed changes (database, key, old, new) to the sums."""
        if self.sums is None:
            return
        for name, key, old, new in changes:
            self.sums.change(name, key, old, new)

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
            self.sums = self.scan_sums(self._parent())
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
            raise lmdb_error(exc, "starting a transaction") from exc

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

    def name_tag(self, parent: int, name: bytes) -> bytes:
        return hmac.new(self._name_key, U64.pack(parent) + name, hashlib.sha256).digest()[:16]

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

