"""Crypto-shredding: what the index keeps of deleted files' secrets, and
the pass that makes them leave every copy of the index the store holds.

Since feature ``file-secrets-v1`` every new inode holds a random 32-byte
secret in its sealed record (:class:`~dcmfs.index.schema.Inode`), and a
file's payload key is HKDF of the key epoch's key *salted with that
secret* (:func:`dcmfs.storage.filekeys.file_key`).  Deleting the file
deletes the record, but the secret is still in the index's history: the
journal records that put the inode (the live journal and the archived
segments ``snapshots/journal-N``), the snapshots ``snapshots/snapshot-N``
taken while the file lived, and the free pages of ``index/data.mdb``
(LMDB does not clear a page it frees).  The *shred pass*
(:func:`dcmfs.opened.shred.shred`) removes all of them at once:

1. a checkpoint, then a compacted snapshot at the current sequence
   number N, and every older snapshot and every archived segment removed
   (they hold records up to N only);
2. the live journal emptied (its records are all in the checkpoint);
3. the live ``data.mdb`` replaced by a compacted copy (LMDB's
   ``mdb_env_copy2`` with ``MDB_CP_COMPACT`` writes live pages only, and of
   each page its live part only) - :meth:`Index.compact`;
4. ``meta/shred`` records the pass (journal record N + 1).

The *shred horizon* of a file deleted in journal record D is the end of the
first pass after D: from then on no file of the store holds its secret, and
its objects (or copies of them kept anywhere: S3 versions, replicas,
backups of the object tree) cannot be opened with the master key and any
copy of the index made after the horizon.

``meta/shred`` (plain, like ``meta/stats``, so ``dcmfs status`` needs no
key; counted in the state group's sums like every ``meta`` record):
``pending u64`` (deletions of regular files with a secret since the last
pass; a directory's or a symlink's secret keys no object),
``first_ns u64`` (when the first of them was deleted), ``last_seq u64``
(the journal record of the last of them), ``done_ns u64`` and ``done_seq
u64`` (when the last pass ended, and the sequence number of its snapshot).
"""

from __future__ import annotations

import dataclasses
import struct
import time
from typing import Iterable

from .journal import PUT
from .schema import DB_ID

_STATE = struct.Struct(">QQQQQ")
META_KEY = "shred"


@dataclasses.dataclass
class ShredState:
    """``meta/shred`` (all zeros: nothing pending, no pass yet)."""

    pending: int = 0
    first_ns: int = 0
    last_seq: int = 0
    done_ns: int = 0
    done_seq: int = 0

    def encode(self) -> bytes:
        return _STATE.pack(self.pending, self.first_ns, self.last_seq, self.done_ns,
                           self.done_seq)

    @classmethod
    def decode(cls, raw: bytes | None) -> "ShredState":
        if not raw or len(raw) != _STATE.size:
            return cls()
        return cls(*_STATE.unpack(raw))

    def due(self, after_seconds: float, now_ns: int | None = None) -> bool:
        """Is a pass due: deletions pending, the first ``after_seconds`` ago?"""
        if not self.pending:
            return False
        now_ns = time.time_ns() if now_ns is None else now_ns
        return now_ns - self.first_ns >= after_seconds * 1e9

    def report(self, after_seconds: float | None = None) -> dict:
        """What ``dcmfs status`` and ``dcmfs shred`` show (counts and times;
        nothing names a file).  ``deadline``: when a mounted daemon with
        ``-o shred_after`` passes at the latest (None: at unmount only)."""
        out = {"pending": self.pending,
               "first_deleted": self.first_ns / 1e9 if self.pending else None,
               "last_pass": self.done_ns / 1e9 if self.done_ns else None,
               "last_pass_seq": self.done_seq or None}
        if self.pending and after_seconds:
            out["deadline"] = self.first_ns / 1e9 + after_seconds
        return out


def read_state(txn) -> ShredState:
    """The store's shred state in a :class:`~dcmfs.index.txn.Txn`."""
    return ShredState.decode(txn.meta_get(META_KEY))


def note_deletion(txn) -> None:
    """A file with a secret was deleted in this transaction: one more
    deletion waits for the next pass."""
    state = read_state(txn)
    if not state.pending:
        state.first_ns = time.time_ns()
    state.pending += 1
    state.last_seq = txn.ix.seq + 1  # the record this transaction becomes
    txn.meta_put(META_KEY, state.encode())


def note_pass(txn, snapshot_seq: int) -> ShredState:
    """A pass ended: nothing is pending any more."""
    state = ShredState(done_ns=time.time_ns(), done_seq=snapshot_seq)
    txn.meta_put(META_KEY, state.encode())
    return state


def shred_passed(records: Iterable[list]) -> bool:
    """Do these journal records' ops (a follower's) include the record of a
    shred pass (``meta/shred`` put with nothing pending after a pass)?"""
    for ops in records:
        for kind, db, key, value in ops:
            if kind == PUT and db == DB_ID["meta"] and key == META_KEY.encode():
                state = ShredState.decode(value)
                if state.done_ns and not state.pending:
                    return True
    return False
