"""The re-encoder's passes over a whole store: :meth:`Passes.enqueue_all`
(``dcmfs recompress``) and the look for hot files due to be coded densely
(:mod:`dcmfs.core.tiers`)."""

from __future__ import annotations

import logging
import stat
import time

from ..errors import loggable
from ..sandbox.pool import ParserFailure
from .extents import ExtentReader

log = logging.getLogger("dcmfs.reencoder")

#: the content kind of a file whose analysis or re-encoding failed
FAILED = "failed"


class Passes:
    """Passes of the re-encoder over the whole store (a mixin of
    :class:`~dcmfs.core.reencoder.Reencoder`): every file with work left
    (``dcmfs recompress``), and the hot files due to be coded densely."""

    #: content records looked at per hold of the core's lock
    SLICE = 1000

    def enqueue_all(self, retry_failed: bool = False) -> int:
        """Queue every file the re-encoder has work on (``dcmfs recompress``):
        not yet looked at in its current version, or holding uncompressed
        chunks; with ``retry_failed`` also the files whose analysis failed
        (never retried otherwise).  Returns the number of files queued
        (core lock held)."""
        todo = []
        with self.host.index.begin() as txn:
            for ino, inode in txn.iter_inodes():
                if not stat.S_ISREG(inode.mode) or inode.size == 0 or ino in self._queue:
                    continue
                content = txn.get_content(ino)
                if not _fresh(content, inode.generation, self.dicom) or (
                        retry_failed and content and content.get("kind") == FAILED):
                    todo.append(ino)
                    self._attempts.pop(ino, None)
        if todo:
            with self.host.write_txn() as txn:
                for ino in todo:
                    txn.add_backlog(ino)
                    content = txn.get_content(ino)
                    if content and content.get("kind") == FAILED:
                        # looked at afresh: the failure is forgotten
                        txn.put_content(ino, dict(content, kind="unknown"))
            for ino in todo:
                self._add(ino, 0)
            self._wake.set()
        return len(todo)

    def _look_for_cold(self) -> None:
        """Queue the hot files that are due (in slices: the core's lock is
        held for a thousand records at a time, never for a whole scan)."""
        host = self.host
        self.tiers.next_look = time.monotonic() + self.tiers.look_every
        start: int | None = 0
        try:
            while start is not None and not self._stop.is_set():
                with host.lock:
                    with host.index.begin() as txn:
                        cool, keep, start = self.tiers.due(txn, start, self.SLICE)
                    if keep:
                        with host.write_txn() as txn:
                            for ino, read in keep:
                                content = txn.get_content(ino)
                                if content is not None:
                                    txn.put_content(ino, dict(content, hot_at=int(read)))
                    for ino in cool:
                        if ino not in self._queue:
                            self._cooling.add(ino)
                            self._add(ino, 0)
        except Exception as exc:  # noqa: BLE001 — the index: next time
            log.error("looking for hot files to code densely failed: %s", loggable(exc))

    def _cool(self, ino: int, inode, table, cipher, content: dict) -> bool:
        """Code a hot file's frames again with the configured image codecs
        (decoded and compared before the swap, like any re-encoding)."""
        host = self.host
        reader = ExtentReader(host.objects, cipher, ino, inode, table, host.chunk_size)
        try:
            plan = self._analyse(reader, inode.size)
        except ParserFailure as exc:
            if exc.stopped:
                return False
            plan = None
        cold = dict(content, **self.tiers.fields(cooling=True))
        cold.pop("hot_at", None)
        if plan is None or not plan.codes_frames:
            # it was coded once: it stays as it is, and is not looked at again
            with host.lock, host.write_txn() as txn:
                txn.put_content(ino, cold)
            return True
        done = self._encode_frames(ino, inode, table, cipher, plan, reader, cold, cooling=True)
        if done:
            self.files_cooled += 1
        return done


def _fresh(content: dict | None, generation: int, dicom_aware: bool) -> bool:
    """Has the re-encoder handled this version of the file (under this policy)?"""
    return (content is not None and content.get("generation") == generation
            and not (dicom_aware and content.get("kind") == "unknown"))
