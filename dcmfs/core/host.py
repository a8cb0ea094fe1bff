"""The mounted filesystem as the host of its background jobs (a part of the core).

:class:`JobHostOps` is mixed into :class:`dcmfs.core.filesystem.FileSystem`
and implements :class:`dcmfs.opened.jobs.ActiveJobHost`: the re-encoder, the
scrubber and a mounted verify use these methods, never the core's private
tables.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from ..errors import IntegrityError, StoreIOError
from ..index import Txn


class JobHostOps:
    """What background jobs may see of the mounted filesystem."""

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    @contextlib.contextmanager
    def write_txn(self) -> Iterator[Txn]:
        with self._write_txn() as txn:
            yield txn

    def forget_inode(self, ino: int) -> None:
        """A job changed the inode record of a closed file in the index
        (its stored size): getattr reads it afresh."""
        self._inodes.pop(ino, None)

    def is_open(self, ino: int) -> bool:
        return ino in self._open

    def has_uncommitted(self, ino: int) -> bool:
        of = self._open.get(ino)
        return of is not None and of.changed

    def last_activity(self) -> float:
        return self.data.last_activity

    def after_commit(self, superseded: list[bytes]) -> None:
        self.data.after_commit(superseded)

    def damaged(self, ino: int, exc: Exception) -> None:
        self.opened.damaged(ino, exc)

    def objects_in_flight(self, candidates: list[bytes]) -> set[bytes]:
        """Objects the daemon holds that the index does not name yet (or any
        more): superseded ones waiting for a checkpoint, those of open files,
        and those the re-encoder is writing for the file it is on."""
        out = set(self.data.superseded())
        busy = self.reencoder.current if self.reencoder is not None else None
        if busy is not None:
            for oid in candidates:
                try:
                    ctx = self.objects.context_of(oid)
                except (StoreIOError, IntegrityError):
                    continue
                if ctx.ino == busy:
                    out.add(oid)
        for of in self._open.values():
            for fut in list(of.pending.values()) + list(of.discarded):
                if fut.done() and fut.exception() is None and fut.result() is not None:
                    out.add(fut.result().oid)
        return out
