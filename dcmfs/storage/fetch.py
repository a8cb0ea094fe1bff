"""Objects fetched from the bucket ahead of the reads that will need them.

A cold read of an S3 store waits on one GET per object; fetched one after
the other, a CT series read at ~20 MB/s on loopback, the daemon idle most of
the time (py-spy: the reader waited on each GET's round trip, then on the
decode).  :class:`Fetcher` runs a few GETs at once on a small pool of
threads: the core asks for the objects a sequential reader will need next
(the rest of the file, the next files of a directory read in order: see
:mod:`dcmfs.core.readahead`), and a read of an object being fetched waits
for that fetch instead of sending a second GET.

Nothing here is speculative by itself: only what the core names is
fetched, at most ``limit`` objects queued or in flight (what does not fit is
dropped: the read fetches it itself).  A failed fetch is forgotten (the
read meets the error itself and reports it).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Iterable

log = logging.getLogger("dcmfs.s3")


class Fetcher:
    """``download(name)`` fetches one object into the cache (run on the pool);
    ``group(name, queued)`` (packs): ``name`` and the queued names one GET
    brings along, which ``download_many(names)`` then fetches together."""

    def __init__(self, download: Callable[[str], object], threads: int = 8,
                 limit: int = 64, group: Callable[[str, list[str]], list[str]] | None = None,
                 download_many: Callable[[list[str]], object] | None = None) -> None:
        self._download = download
        self._group = group
        self._download_many = download_many
        self._threads_wanted = threads
        self.limit = limit
        self._cv = threading.Condition()
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        #: name -> set when its fetch ended (cached or failed)
        self._running: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False
        #: objects fetched ahead, and reads that found theirs on its way
        self.fetched = 0
        self.waited = 0

    def want(self, names: Iterable[str]) -> int:
        """Queue the fetch of ``names`` (in order; those queued or on their
        way already are skipped); returns how many were queued."""
        added = 0
        with self._cv:
            if self._closed:
                return 0
            for name in names:
                if name in self._queued or name in self._running:
                    continue
                if len(self._queue) + len(self._running) >= self.limit:
                    break
                self._queue.append(name)
                self._queued.add(name)
                added += 1
            if added:
                if len(self._threads) < self._threads_wanted:
                    self._start_threads()
                self._cv.notify(added)
        return added

    def _start_threads(self) -> None:
        while len(self._threads) < self._threads_wanted:
            t = threading.Thread(target=self._work, daemon=True,
                                 name=f"dcmfs-fetch-{len(self._threads)}")
            self._threads.append(t)
            t.start()

    def claim(self, name: str) -> bool:
        """Called by a read of ``name`` that missed the cache: True if a
        fetch of it ran and ended meanwhile (look in the cache again), False
        if the caller fetches it itself (a queued fetch is withdrawn)."""
        with self._cv:
            if name in self._queued:
                self._queued.discard(name)
                try:
                    self._queue.remove(name)
                except ValueError:
                    pass
                return False
            done = self._running.get(name)
        if done is None:
            return False
        done.wait()
        with self._cv:
            self.waited += 1
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                name = self._queue.popleft()
                self._queued.discard(name)
                names = [name]
                if self._group is not None and self._queue:
                    names = self._group(name, list(self._queue))
                    for other in names[1:]:
                        self._queue.remove(other)
                        self._queued.discard(other)
                events = [threading.Event() for _ in names]
                self._running.update(zip(names, events))
            ok = False
            try:
                if len(names) > 1:
                    self._download_many(names)
                else:
                    self._download(name)
                ok = True
            except Exception as exc:  # noqa: BLE001 — the read meets it and reports it
                log.debug("fetching objects ahead failed: %s", type(exc).__name__)
            finally:
                with self._cv:  # the pool's threads count under the lock
                    if ok:
                        self.fetched += len(names)
                    for n in names:
                        del self._running[n]
                    self._cv.notify_all()
                for done in events:
                    done.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being fetched; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._running, timeout)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
