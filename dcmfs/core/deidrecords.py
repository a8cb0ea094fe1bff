"""The de-identified view's index records (``deidview``, feature
``deid-view-v1``): what the view lists of each file, made in the parser
workers from the file's header (:func:`dcmfs.storage.deid.facts`) by a
one-time pass (:func:`refresh`, in the background: :class:`RecordFiller`), and what ``dcmfs stats`` says
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
#: inodes a pass looks at per hold of the core's lock (a store of a million
#: files held it for seconds at every pass)
SLICE = 2000


def refresh(fs, parsers: ParserPool, stop: Callable[[], bool] | None = None,
            on_todo: Callable[[int], None] | None = None,
            on_record: Callable[[int, dict], None] | None = None) -> int:
    """Give every regular file without a current ``deidview`` record one
    (the one-time pass; a file the worker cannot read gets a record that
    says why).  Returns the number of files looked at.  Needs a read-write
    opening.  Raises :class:`ParserFailure` (``stopped``) when the pool is
    closed under it; ``stop`` ends it early; ``on_todo`` hears how many
    files lack a record, ``on_record`` each record as it is made."""
    todo = []
    start: int | None = 0
    while start is not None:  # SLICE inodes per hold of the core's lock, not all at once
        with fs.lock:
            with fs.index.begin() as txn:
                after = None
                for n, (ino, inode) in enumerate(txn.iter_inodes(start)):
                    if n == SLICE:
                        after = ino
                        break
                    if not stat.S_ISREG(inode.mode) or inode.size == 0:
                        continue
                    record = txn.get_deid(ino)
                    if record is None or record.get("generation") != inode.generation:
                        todo.append((ino, inode.generation, inode.size))
        start = after
        if stop is not None and stop():
            break
    if on_todo is not None:
        on_todo(len(todo))
    looked = 0
    for ino, generation, size in todo:
        if stop is not None and stop():
            break
        looked += 1
        record = dict(_facts(fs, parsers, ino, size), generation=generation)
        with fs.lock:
            with fs.index.begin() as txn:
                inode = txn.get_inode(ino)
            if inode is None or inode.generation != generation:
                continue  # changed meanwhile: the next pass
            with fs.write_txn() as txn:
                txn.put_deid(ino, record)
        if on_record is not None:
            on_record(ino, record)
    if looked:
        fs.checkpoint()
    return looked


def _facts(fs, parsers: ParserPool, ino: int, size: int) -> dict:
    fh = fs.open_inode(ino)
    try:
        head = fs.read(fh, min(size, FIRST_BYTES), 0, ahead=False)
        try:
            facts = parsers.deid_facts(head, size)
            # more bytes may help a DICOM header longer than the first read,
            # never a file its first 132 bytes say is not DICOM
            if facts["dicom"] and facts["reason"] and size > len(head):
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
    """Fills the ``deidview`` records of a read-write opening in the
    background: once at the start (the one-time pass over older files), then
    whenever files were written, deleted or re-encoded, the re-encoder is idle and
    file I/O is quiet, so a file gets its record soon after it is written
    and the view's first mount finds them made.  Uses the re-encoder's
    workers (or the view's).

    A served view (:class:`~dcmfs.core.deidview.DeidView`, as the mount or
    beside the normal one) makes it *eager* until its first pass is done: it
    looks at files at once, also while files are read, and tells the view
    each record as it is made, so the view answers at once and fills in
    (:meth:`status`: the progress ``dcmfs status`` shows)."""

    INTERVAL = 5.0
    #: seconds without file reads or writes before it looks at files
    QUIET = 2.0

    def __init__(self, fs, parsers: ParserPool) -> None:
        super().__init__(daemon=True, name="dcmfs-deid-records")
        self.fs, self.parsers = fs, parsers
        self.looked = 0
        #: called with (ino, record) for every record made
        self.listeners: list[Callable[[int, dict], None]] = []
        #: called after every pass (a view drops the files deleted meanwhile)
        self.after_pass: list[Callable[[], None]] = []
        #: look at files now rather than when quiet (until the first pass is done)
        self.eager = False
        self.wake = threading.Event()
        #: set when a pass has looked at every file that lacked a record
        self.first_pass_done = threading.Event()
        #: files the running pass has still to look at, and its size
        self.pending = self.todo = 0
        self.running = False

    def _yield(self) -> bool:
        r = self.fs.reencoder
        return self.fs.stopping.is_set() or (r is not None and r.backlog[0] > 0)

    def _todo(self, n: int) -> None:
        self.pending = self.todo = n

    def _made(self, ino: int, record: dict) -> None:
        self.pending = max(0, self.pending - 1)
        for listener in list(self.listeners):
            try:
                listener(ino, record)
            except Exception as exc:  # noqa: BLE001 — a view's trouble must not stop the pass
                log.warning("de-identified view not told of inode %d: %s", ino, loggable(exc))

    def serve_view(self, listener: Callable[[int, dict], None],
                   after_pass: Callable[[], None]) -> None:
        """A view is served: tell it of every record and of every pass's
        end, and look at files now."""
        self.listeners.append(listener)
        self.after_pass.append(after_pass)
        self.eager = not self.first_pass_done.is_set()
        self.wake.set()

    def status(self) -> dict:
        return {"first_pass_done": self.first_pass_done.is_set(), "running": self.running,
                "pending_files": self.pending, "pass_files": self.todo, "looked": self.looked}

    def join(self, timeout: float | None = None) -> None:
        self.wake.set()  # the stopping store: no wait for the interval
        super().join(timeout)

    def run(self) -> None:
        seen = -1
        while not self.fs.stopping.is_set():
            self.wake.wait(self.INTERVAL)
            self.wake.clear()
            if self.fs.stopping.is_set():
                return
            r = self.fs.reencoder
            # files re-encoded, written, deleted (the number of files) since the last
            # pass; the index only under the core's lock (its reads share one txn)
            with self.fs.lock:
                files = self.fs.stats()[0]
            done = (r.files_done if r is not None else 0, self.fs.data.commits, files)
            if not self.eager and (done == seen or (r is not None and r.backlog[0])
                                   or time.monotonic() - self.fs.last_activity() < self.QUIET):
                continue
            self.running = True
            # the pass yields to the re-encoder (new files come first), except
            # the first one a served view waits for
            stop = self.fs.stopping.is_set if self.eager else self._yield
            try:
                self.looked += refresh(self.fs, self.parsers, stop, self._todo, self._made)
                if not stop():
                    seen = done
                    self.first_pass_done.set()
                    self.eager = False
                else:
                    seen = -1
                for hook in list(self.after_pass):
                    hook()
            except ParserFailure as exc:
                if exc.stopped:
                    return
            except Exception as exc:  # noqa: BLE001 — the disk, the index: next time
                log.warning("de-identified view records not filled: %s", loggable(exc))
            finally:
                self.running = False


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
