"""The state of one open file and the cache of decoded chunks (used by
:mod:`dcmfs.core.contents`)."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future

from ..index import Inode
from ..storage.codec import ZSTD
from ..storage.dicom import sniff
from ..storage.objects import ChunkRef

#: a whole file of at most this many bytes that does not start like DICOM is
#: compressed (zstd) when it is closed, and the re-encoder never sees it: its
#: background pass would only compress it with zstd too, at the cost of a
#: second object written and the first deleted (measured, issue 17: about
#: 1 ms of daemon CPU per 1 KiB file, against some 10 us for zstd at close)
SETTLE_AT_CLOSE = 64 * 1024


class ChunkCache:
    """A small LRU of decoded chunks keyed by object id (ids are never reused,
    so entries never go stale)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._bytes = 0
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, oid: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(oid)
            if data is not None:
                self._items.move_to_end(oid)
            return data

    def put(self, oid: bytes, data: bytes) -> None:
        if len(data) > self._limit:
            return
        with self._lock:
            if oid in self._items:
                return
            self._items[oid] = data
            self._bytes += len(data)
            while self._bytes > self._limit:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)


class OpenFile:
    """Live state of one open regular file (shared by all its handles)."""

    def __init__(self, ino: int, inode: Inode, committed: dict[int, ChunkRef]) -> None:
        self.ino = ino
        self.inode = inode
        self.handles = 0
        self.size = inode.size
        self.committed = committed
        #: chunk buffers being written (bytes: one write's, kept as it came)
        self.dirty: dict[int, bytearray | bytes] = {}
        self.dirty_bytes = 0
        #: sealed (or being sealed) since the last commit; result None = hole
        self.pending: dict[int, Future] = {}
        #: replaced before they were committed: delete once written
        self.discarded: list[Future] = []
        self.changed = False
        self.unlinked = False
        self.cipher = None  # set by FileData
        self.write_error: BaseException | None = None
        #: files the re-encoder laid out in extents of their own sizes
        #: (DICOM-coded): sorted extent starts and indices, for reads; None
        #: for the fixed layout.  The first change turns it back into chunks.
        self.extents: tuple[list[int], list[int]] | None = None
        #: where the last read ended: a read starting near it is sequential
        #: (and only then are the next extents decoded ahead)
        self.read_end = 0
        #: was the last read near the one before it? (a small read is
        #: sequential only after another near one)
        self.read_near = False

    def oids(self) -> set[bytes]:
        """The object ids of the chunks committed when it was opened."""
        return {ref.oid for ref in self.committed.values()}

    @property
    def write_generation(self) -> int:
        return self.inode.generation + 1


def all_zero(data: bytes) -> bool:
    # the ends first: real data almost never ends in zeros, and this saves a
    # full scan of every chunk; bytes(n) is calloc'ed, the compare is memcmp
    return not data or (data[-1] == 0 and data[0] == 0 and data == bytes(len(data)))


def on_written(fut: Future, of: OpenFile) -> None:
    """Done-callback of a sealing job (runs in the worker thread, possibly
    after a waiter has already handled the future)."""
    exc = fut.exception()
    if exc is None:
        fut.plaintext = None  # durable now: free the memory
    elif of.pending.get(fut.idx) is fut:
        of.write_error = exc


class InlineJob(Future):
    """A sealing job run by the thread that waits for it (:meth:`run`,
    without the core's lock) instead of by the pool.  Anyone else waiting
    meanwhile (a commit from another handle) waits as for a pool job."""

    def __init__(self, fn, args: tuple) -> None:
        super().__init__()
        self._job = (fn, args)

    def run(self) -> None:
        job, self._job = self._job, None
        if job is None:  # run already
            return
        fn, args = job
        try:
            self.set_result(fn(*args))
        except BaseException as exc:  # the commit raises it, as for a pool job
            self.set_exception(exc)


def run_inline(jobs) -> None:
    """Run the inline jobs among ``jobs`` in this thread, then wait for all."""
    for job in jobs:
        if isinstance(job, InlineJob):
            job.run()
    for job in jobs:
        job.exception()  # wait; a failure is raised by the commit


def done_future(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def settles_at_close(plaintext: bytes, codec: int) -> bool:
    """Is this whole file's content (its only chunk) compressed at close and
    left out of the re-encoder's backlog?  Only with zstd as the store codec
    (lzma at close would cost more than the background pass it saves)."""
    return codec == ZSTD and len(plaintext) <= SETTLE_AT_CLOSE and not sniff(plaintext[:132])


def settled_info(generation: int) -> dict:
    """The content record of a file settled at close: what the re-encoder
    would have found (``dcmfs stats`` counts it as non-DICOM, not as "not
    analysed yet")."""
    return {"kind": "other", "reason": "not DICOM", "path": "general",
            "generation": generation}
