"""The de-identified view's index records (``deidview``, feature
``deid-view-v1``): what the view lists of each file, made in the parser
workers from the file's header (:func:`dcmfs.storage.deid.facts`) by a
one-time pass (:func:`refresh`: the view's first mount, and a normal mount
in the background, :class:`RecordFiller`), and what ``dcmfs stats`` says
the view withholds (:func:`withheld`).  See :mod:`dcmfs.core.deidview`.
"""

from __future__ import annotations

import collections
import logging
import stat
import threading
import time
from typing import Callable

from ..errors import loggable
from ..sandbox.pool import ParserFailure, ParserPool
from ..storage.dicom import HEADER_CAP

log = logging.getLogger("dcmfs.deid")

#: the first bytes the one-time pass sends to a worker (a header is a few
#: kilobytes); all of the file up to HEADER_CAP only when that is not enough
FIRST_BYTES = 64 * 1024


def refresh(fs, parsers: ParserPool, stop: Callable[[], bool] | None = None) -> int:
    """Give every regular file without a current ``deidview`` record one
    (the one-time pass; a file the worker cannot read gets a record that
    says why).  Returns the number of files looked at.  Needs a read-write
    opening.  Raises :class:`ParserFailure` (``stopped``) when the pool is
    closed under it; ``stop`` ends it early."""
    todo = []
    with fs.lock:
        with fs.index.begin() as txn:
            for ino, inode in txn.iter_inodes():
                if not stat.S_ISREG(inode.mode) or inode.size == 0:
                    continue
                record = txn.get_deid(ino)
                if record is None or record.get("generation") != inode.generation:
                    todo.append((ino, inode.generation, inode.size))
    for ino, generation, size in todo:
        if stop is not None and stop():
            break
        record = dict(_facts(fs, parsers, ino, size), generation=generation)
        with fs.lock:
            with fs.index.begin() as txn:
                inode = txn.get_inode(ino)
            if inode is None or inode.generation != generation:
                continue  # changed meanwhile: the next pass
            with fs.write_txn() as txn:
                txn.put_deid(ino, record)
    if todo:
        fs.checkpoint()
    return len(todo)


def _facts(fs, parsers: ParserPool, ino: int, size: int) -> dict:
    fh = fs.open_inode(ino)
    try:
        head = fs.read(fh, min(size, FIRST_BYTES), 0, ahead=False)
        try:
            facts = parsers.deid_facts(head, size)
            if facts["reason"] and size > len(head):
                head += fs.read(fh, min(size, HEADER_CAP) - len(head), len(head), ahead=False)
                facts = parsers.deid_facts(head, size)
        except ParserFailure as exc:
            if exc.stopped:
                raise
            facts = {"dicom": True, "reason": exc.reason}
    finally:
        fs.release(fh)
    return facts


class RecordFiller(threading.Thread):
    """Fills the ``deidview`` records of a normally mounted store in the
    background: once at the start (the one-time pass over older files), then
    whenever the re-encoder has finished files and is idle and file I/O is
    quiet, so a file gets its record soon after it is re-encoded and the
    view's first mount finds them made.  Uses the re-encoder's workers."""

    INTERVAL = 5.0
    #: seconds without file reads or writes before it looks at files
    QUIET = 2.0

    def __init__(self, fs, parsers: ParserPool) -> None:
        super().__init__(daemon=True, name="dcmfs-deid-records")
        self.fs, self.parsers = fs, parsers
        self.looked = 0

    def _yield(self) -> bool:
        r = self.fs.reencoder
        return self.fs.stopping.is_set() or (r is not None and r.backlog[0] > 0)

    def run(self) -> None:
        seen = -1
        while not self.fs.stopping.wait(self.INTERVAL):
            r = self.fs.reencoder
            done = r.files_done if r is not None else 0
            if done == seen or (r is not None and r.backlog[0]) \
                    or time.monotonic() - self.fs.last_activity() < self.QUIET:
                continue
            try:
                # the pass yields to the re-encoder: new files come first
                self.looked += refresh(self.fs, self.parsers, self._yield)
                seen = done if not self._yield() else -1
            except ParserFailure as exc:
                if exc.stopped:
                    return
            except Exception as exc:  # noqa: BLE001 — the disk, the index: next time
                log.warning("de-identified view records not filled: %s", loggable(exc))


def withheld(index, include_burned_in: bool = False) -> dict:
    """What the view leaves out: {reason: [inode, ...]} of the DICOM files
    it does not show (``dcmfs stats``); never a name or an attribute."""
    out: dict[str, list[int]] = collections.defaultdict(list)
    with index.begin() as txn:
        for ino, record in txn.iter_deid():
            reason = withheld_reason(record, include_burned_in)
            if reason:
                out[reason].append(ino)
    return dict(out)


def withheld_reason(record: dict, include_burned_in: bool) -> str:
    if not record.get("dicom"):
        return ""
    if record.get("reason"):
        return record["reason"]
    return "" if include_burned_in else record.get("withheld", "")
