"""The upload pool of the write-back cache (:class:`~dcmfs.storage.cache.CachedBackend`):
a few threads that put waiting objects into the bucket (one by one, or in
packs: :mod:`dcmfs.storage.packcache`), send the deletes after their delay,
retry with backoff for as long as the mount lives, and start a pack rewrite
when the last of a run of deletes is done.

A mixin of :class:`~dcmfs.storage.cache.CachedBackend`, which holds the
lock (``_cv``), the queues and the books these use.
"""

from __future__ import annotations

import logging
import os
import time

from .backend import BackendMissing
from ..errors import StoreIOError

log = logging.getLogger("dcmfs.s3")

_UPLOADED_MODE = 0o400


class UploadPool:
    """Needs the queues (``_queue``, ``_held``, ``_later``), the books
    (``_pending``, ``_lru``, ``_in_flight``, ``_deleting``, ``counts``) and
    the events (``_released``, ``_abandon``, ``fence``) of
    :class:`~dcmfs.storage.cache.CachedBackend`."""

    # --- the upload pool ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                queue = None
                while not self._closed:
                    if not self._released.is_set():
                        self._cv.wait(1.0)
                        continue
                    heads = [q for q in (self._queue, self._held, self._later) if q]
                    if heads:
                        queue = min(heads, key=lambda q: q[0][2])
                        wait = queue[0][2] - time.monotonic()
                        if (wait <= 0 or self._hurry
                                or self._pending_bytes * 2 > self.cache_size):
                            break
                        self._cv.wait(min(wait, 1.0))
                    else:
                        self._cv.wait(1.0)  # timed: a lost wakeup costs a second
                if queue is None or not queue or self._abandon.is_set():
                    return
                op, name, _ = queue.popleft()
                names = [name]
                if op == "collect":
                    names = []
                elif op == "put":
                    if name not in self._pending or name in self._in_flight:
                        continue
                    if self.pack_uploads:  # the others that are due go with it
                        self._more_puts(names, self._pending[name])
                else:
                    while name in self._in_flight:  # its upload first, then the delete
                        self._cv.wait(1.0)
                self._in_flight.update(names)
            try:
                if op == "collect":
                    pass  # the dirty packs, below
                elif op == "put" and self.pack_uploads:
                    self._upload_pack(names)
                elif op == "put":
                    self._upload(name)
                else:
                    with self._pack_lock:
                        self._remove(name)
                    self.counts["deletes"] += 1
                    with self._cv:
                        self._deleting.discard(name)
            except StoreIOError as exc:
                # abandoned at close: the object stays pending in the cache;
                # else (reading the cached copy failed) it is tried again
                if not self._abandon.is_set():
                    log.warning("%s; queued again", exc)
                    with self._cv:
                        for n in names:
                            if op == "put" and n in self._pending:
                                self._queue.append((op, n, time.monotonic() + 1.0))
            finally:
                repack = False
                with self._cv:
                    self._in_flight.difference_update(names)
                    if op != "put":
                        self._deletes_waiting -= 1
                    repack = bool(self._dirty) and self._repack_due()
                    self._cv.notify_all()
            if repack:  # the last of a run of deletes: the packs that lost objects
                self._repack_dirty()

    def _drop_pending(self, name: str) -> None:
        """``name`` was deleted before its upload: nothing to send."""
        with self._cv:
            size = self._pending.pop(name, None)
            if size is not None:
                self._pending_bytes -= size
            self._cv.notify_all()

    def _upload(self, name: str) -> None:
        try:
            data = self.cache.get(name)
        except BackendMissing:  # deleted meanwhile: nothing to upload
            self._drop_pending(name)
            return
        def put() -> None:
            if self.fence.is_set():
                raise StoreIOError("another writer holds the lease; not uploaded")
            self.remote.put(name, data)
        self._retrying(put)
        try:
            os.chmod(self.cache.path(name), _UPLOADED_MODE)
        except FileNotFoundError:
            pass
        self._uploaded([name], len(data))

    def _uploaded(self, names: list[str], nbytes: int) -> None:
        """One PUT of ``names`` (``nbytes`` sent) went through: they count
        as cached copies of what the bucket holds, evictable."""
        with self._cv:
            self.counts["uploads"] += 1
            self.counts["uploaded_objects"] += len(names)
            self.counts["uploaded_bytes"] += nbytes
            for name in names:
                size = self._pending.pop(name, None)
                if size is not None:  # not deleted while it was on its way
                    self._pending_bytes -= size
                    self._lru[name] = size
                    self._cached_bytes += size
            self._evict()
            self._cv.notify_all()

    def _retrying(self, call) -> None:
        delay = 0.1
        while True:
            try:
                call()
                return
            except StoreIOError as exc:
                with self._cv:
                    self.counts["errors"] += 1
                    first = self.last_error is None
                    self.last_error = str(exc)
                if first or self.counts["errors"] % 100 == 0:
                    log.warning("%s; retrying (%d errors so far)", exc, self.counts["errors"])
                if self._abandon.wait(delay):
                    raise
                self.counts["retries"] += 1
                delay = min(delay * 2, 5.0)

    def release_uploads(self) -> None:
        """The bucket may be written from now on (``hold_uploads``); the packs
        an earlier opening left dirty (:meth:`PackMap.dirty`) are rewritten
        or deleted first."""
        dirty = self.packs.dirty() if self.packs is not None else set()
        with self._cv:
            self._released.set()
            if dirty:
                self._dirty |= dirty
                self._deletes_waiting += 1  # a drain waits for it
                self._later.appendleft(("collect", "", 0.0))
            self._cv.notify_all()
