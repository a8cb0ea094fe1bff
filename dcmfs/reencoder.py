"""The background re-encoder: closed files are compressed off the close path.

A PACS must never wait on a codec.  While the backlog has room, ``close``
seals a file's chunks uncompressed (AES-GCM runs at GB/s) and records the
inode in the index's ``backlog``; this thread then compresses each chunk
with the store's codec, writes the new object, and swaps the chunk
reference in one journaled index transaction - only if the file is not
open and its chunk table is unchanged, otherwise it tries again later.
The old objects are deleted after the next checkpoint, like any superseded
object; a crash at any point leaves either the old or the new object
referenced, never neither.  When the backlog is full, ``close`` compresses
inline again, so the backlog (and the extra disk space it takes) stays
bounded.

It runs on the second core: zstd, AES and file I/O release the GIL, and
the core's lock is held only for the index reads and the swap.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .codec import NONE
from .errors import IntegrityError
from .filedata import stored_bytes

log = logging.getLogger("dcmfs.reencoder")


class Reencoder:
    """Works through the backlog of one opened :class:`FileSystem`."""

    def __init__(self, fs, limit_bytes: int, window: int = 2,
                 quiet_after: float = 0.2) -> None:
        self.fs = fs
        self.limit = limit_bytes
        #: chunks of one file re-encoded at once while file I/O is quiet
        self.window = window
        #: seconds without file writes after which I/O counts as quiet
        self.quiet_after = quiet_after
        self._pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="dcmfs-reenc")
        #: inode -> uncompressed bytes it holds in the backlog
        self._queue: collections.OrderedDict[int, int] = collections.OrderedDict()
        #: bytes sealed uncompressed for files not committed yet
        self._reserved: dict[int, int] = {}
        self._bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.files_done = 0
        self.errors = 0
        with fs.index.begin() as txn:
            for ino in txn.backlog():
                inode = txn.get_inode(ino)
                self._add(ino, inode.size if inode else 0)

    # --- the queue --------------------------------------------------------------
    def _add(self, ino: int, size: int) -> None:
        self._queue[ino] = self._queue.pop(ino, 0) + size
        self._bytes += size

    def reserve(self, ino: int, nbytes: int) -> bool:
        """May a chunk of ``nbytes`` be sealed uncompressed? (core lock held)

        Counted per chunk, so one huge file cannot overrun the limit.
        """
        if self._bytes + nbytes > self.limit:
            return False
        self._reserved[ino] = self._reserved.get(ino, 0) + nbytes
        self._bytes += nbytes
        return True

    def release(self, ino: int) -> None:
        """Uncommitted chunks of this inode were dropped (core lock held)."""
        self._bytes -= self._reserved.pop(ino, 0)

    def deferred(self, ino: int) -> None:
        """A commit left this inode's chunks uncompressed (core lock held)."""
        nbytes = self._reserved.pop(ino, 0)
        self._bytes -= nbytes
        self._add(ino, nbytes)
        self._wake.set()

    @property
    def backlog(self) -> tuple[int, int]:
        """(files, logical bytes) waiting."""
        return len(self._queue), self._bytes

    # --- the thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="dcmfs-reencode")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._running.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)

    def pause(self) -> None:
        """Hold the thread after the file it is on (benchmarks, tests)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the backlog is empty (tests, ``recompress``)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait(0.5)
                continue
            with self.fs._lock:
                ino = next(iter(self._queue), None)
            if ino is None:
                with self._idle:
                    self._idle.notify_all()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            pause = 0.05
            try:
                done = self.encode(ino)
            except IntegrityError as exc:
                # a damaged object: leave the file as it is (reads report it)
                self.errors += 1
                log.error("re-encoding inode %d failed: %s", ino, exc)
                done = None
            except Exception as exc:  # noqa: BLE001 — disk full, I/O error: try later
                self.errors += 1
                log.error("re-encoding inode %d failed, will retry: %s", ino, exc)
                done, pause = False, 5.0
            try:
                with self.fs._lock:
                    if done is False:  # open, changed or failed: to the back of the queue
                        if ino in self._queue:
                            self._queue.move_to_end(ino)
                    else:
                        if done is None:
                            self._drop(ino)
                        self._bytes -= self._queue.pop(ino, 0)
            except Exception as exc:  # noqa: BLE001 — the entry stays; next time
                log.error("re-encoder backlog update failed: %s", exc)
                pause = 5.0
            if done is False or pause > 0.05:
                self._stop.wait(pause)  # without the lock: file operations go on

    def _drop(self, ino: int) -> None:
        with self.fs._write_txn() as txn:
            txn.remove_backlog(ino)

    # --- one file ---------------------------------------------------------------
    def encode(self, ino: int) -> bool:
        """Compress the uncompressed chunks of one closed file.

        Returns False when the file is open or changed under us (try later),
        True when it is done (compressed, or nothing left to compress).
        """
        fs = self.fs
        with fs._lock:
            if ino in fs._open:
                return False
            with fs.index.begin() as txn:
                inode = txn.get_inode(ino)
                table = txn.chunks(ino)
            if inode is None:
                return True  # deleted: its backlog entry went with it
        todo = {i: r for i, r in table.items() if r.codec == NONE}
        cipher = fs.objects.file_cipher(inode.file_id)
        new = {}

        def one(idx: int, ref):
            plain = fs.objects.read(cipher, inode.file_id, ino, idx, ref)
            return fs.objects.write(cipher, inode.file_id, ino, idx, ref.generation,
                                    ref.flags, fs.data.codec, plain)

        # chunks go to the re-encoder's own threads (never ahead of the
        # core's sealing jobs); two at a time while file I/O is quiet, so a big
        # file gets both cores, one at a time while files are being written
        window: collections.deque = collections.deque()
        try:
            for idx, ref in sorted(todo.items()) + [(None, None)]:
                if idx is not None:
                    if self._stop.is_set():
                        return False
                    window.append((idx, self._pool.submit(one, idx, ref)))
                quiet = time.monotonic() - fs.data.last_activity > self.quiet_after
                width = self.window if quiet else 1
                while window and (idx is None or len(window) >= width):
                    done_idx, fut = window.popleft()
                    nref = fut.result()
                    if nref.codec == NONE:  # incompressible: keep the original
                        fs.objects.delete(nref.oid)
                    else:
                        new[done_idx] = nref
            with fs._lock:
                if ino in fs._open:
                    raise _Retry
                with fs.index.begin() as txn:
                    if txn.chunks(ino) != table:  # written since we read it
                        raise _Retry
                with fs._write_txn() as txn:
                    for idx, nref in new.items():
                        txn.put_chunk(ino, idx, nref)
                    txn.add_stats(stored=sum(stored_bytes(r) for r in new.values())
                                  - sum(stored_bytes(todo[i]) for i in new))
                    txn.remove_backlog(ino)
                fs.data.after_commit([todo[i].oid for i in new])
                self.files_done += 1
                new = {}
            return True
        except _Retry:
            return False
        finally:
            unused = list(new.values())
            for _, fut in window:  # stopped or failed half-way: wait, then clean up
                if fut.exception() is None:
                    unused.append(fut.result())
            for nref in unused:  # not swapped in: nothing refers to them
                fs.objects.delete(nref.oid)


class _Retry(Exception):
    """The file changed while it was being re-encoded."""
