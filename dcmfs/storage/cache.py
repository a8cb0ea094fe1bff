"""A local write-back cache in front of a remote backend (S3 stores).

Objects (names under ``objects/``) are written to the store directory
exactly as in a local store, so writers never wait on the network, and a
small pool of threads uploads them in the background.  The cached file's
mode says whether it is in the bucket yet: 0600 while it waits, 0400 once
uploaded, so a restart (or a crash) finds the backlog again by a scan and
uploads it (objects are immutable, so uploading one twice is harmless).

The cache is bounded (``-o cache_size=``): only uploaded objects are evicted,
least recently used first.  When the objects still waiting fill the cache,
a writer of a new object waits until uploads make room: writers slow down,
never fail and never lose data.  A failed upload is retried with backoff
(0.1 s doubling to 5 s) for as long as the mount lives, so a server that is
down only delays the uploads; a read of an object that is not cached fetches
it whole from the bucket and caches it.  Other names (snapshots, journal
segments, the header, the lease) go straight to the bucket.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Iterator

from .backend import Backend, BackendMissing, LocalBackend
from .durable import TMP_PREFIX, write_new
from .fetch import Fetcher
from .packcache import PackedCache
from .packs import PackMap
from .uploads import UploadPool
from ..errors import StoreIOError

log = logging.getLogger("dcmfs.s3")

OBJECTS = "objects/"
#: objects sealed uncompressed for the re-encoder wait this many upload
#: delays (60 s by default): on a 400-slice CT series the re-encoder's
#: backlog took ~25 s to drain, so 10 s uploaded most chunks twice
HOLD = 6
_UPLOADED_MODE = 0o400


def is_object(name: str) -> bool:
    return name.startswith(OBJECTS)


class CachedBackend(UploadPool, PackedCache, Backend):
    kind = "s3"

    def __init__(self, cache: LocalBackend, remote: Backend, cache_size: int,
                 uploaders: int = 4, upload_delay: float = 0.0, fetchers: int = 8,
                 delete_delay: float = 0.0, packs: PackMap | None = None,
                 pack_uploads: bool = False, hold_uploads: bool = False) -> None:
        """``packs``: where packed objects are (:mod:`dcmfs.storage.packs`;
        None: every object is its own S3 object); ``pack_uploads``: upload
        new objects in packs (feature ``s3-packs-v1``); ``hold_uploads``:
        nothing is uploaded or deleted in the bucket until
        :meth:`release_uploads` (a writer's opening: not before it holds the
        lease and the bucket has its header)."""
        self.cache = cache
        self.packs = packs
        self.pack_uploads = pack_uploads and packs is not None
        #: packs that lost objects, to be rewritten or deleted
        self._dirty: set[str] = set()
        self._repacking = 0
        self._pack_lock = threading.Lock()
        #: names of packs being put and not yet in the map (a sweep spares them)
        self._putting: set[str] = set()
        #: seconds a superseded object stays in the bucket after its delete
        #: (read-only followers lag behind the writer; a drain sends them at once)
        self.delete_delay = delete_delay
        #: GETs ahead of the reads (:mod:`dcmfs.storage.fetch`)
        self.fetcher = Fetcher(self._download, threads=fetchers, limit=32 * fetchers,
                               group=self._group if packs is not None else None,
                               download_many=self._download_many)
        #: seconds a new object waits before its upload, unless the cache is
        #: half full or someone drains: a chunk the re-encoder replaces in
        #: that time (close seals uncompressed, the re-encoder compresses)
        #: is never uploaded at all
        self.upload_delay = upload_delay
        self._hurry = 0
        self.remote = remote
        self.cache_size = cache_size
        self._cv = threading.Condition()
        #: objects not in the bucket yet (queued or being uploaded): name -> bytes
        self._pending: dict[str, int] = {}
        self._pending_bytes = 0
        #: uploaded objects in the cache, least recently used first
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._cached_bytes = 0
        #: (operation, name, not before): "put" waits for upload_delay, "delete" not
        self._queue: collections.deque[tuple[str, str, float]] = collections.deque()
        #: puts of objects likely to be replaced soon (sealed uncompressed for
        #: the re-encoder): they wait HOLD x upload_delay, in a queue of their own
        self._held: collections.deque[tuple[str, str, float]] = collections.deque()
        #: deletes, each after ``delete_delay``: a follower still reading the
        #: state that named the object has that long to move on
        self._later: collections.deque[tuple[str, str, float]] = collections.deque()
        self._in_flight: set[str] = set()
        #: deleted, the bucket's copy not yet: answered as missing
        self._deleting: set[str] = set()
        #: deletes queued or running (what a drain waits for besides uploads)
        self._deletes_waiting = 0
        self._closed = False
        self._abandon = threading.Event()
        #: set when this opening lost the writer's lease: nothing is uploaded
        self.fence = threading.Event()
        #: set once the bucket may be written (see ``hold_uploads``)
        self._released = threading.Event()
        if not hold_uploads:
            self._released.set()
        self.counts = collections.Counter()
        self.last_error: str | None = None
        self._scan()
        self._threads = [threading.Thread(target=self._work, name=f"dcmfs-upload-{i}",
                                          daemon=True) for i in range(uploaders)]
        for t in self._threads:
            t.start()

    # --- the cache at startup ------------------------------------------------------
    def _scan(self) -> None:
        top = self.cache.path(OBJECTS)
        found = []
        for dirpath, _, filenames in os.walk(top):
            for leaf in filenames:
                if leaf.startswith(TMP_PREFIX):
                    continue
                path = os.path.join(dirpath, leaf)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, OBJECTS + os.path.relpath(path, top), st))
        for _, name, st in sorted(found):
            if st.st_mode & 0o200:
                self._pending[name] = st.st_size
                self._pending_bytes += st.st_size
                self._queue.append(("put", name, 0.0))
            else:
                self._lru[name] = st.st_size
                self._cached_bytes += st.st_size
        if self._pending:
            log.info("%d objects (%d bytes) in the cache are not in the bucket yet; "
                     "uploading them", len(self._pending), self._pending_bytes)

    # --- Backend ---------------------------------------------------------------------
    def create(self, name: str, data: bytes | memoryview, hold: bool = False) -> bool:
        """``hold``: the object will probably be replaced soon (the
        re-encoder's input); its upload waits longer."""
        if not is_object(name):
            return self.remote.create(name, data)
        self._wait_for_room(len(data))
        if not self.cache.create(name, data):
            return False
        self._queued(name, len(data), hold)
        return True

    def put(self, name: str, data: bytes | memoryview) -> None:
        if not is_object(name):
            self.remote.put(name, data)
            return
        self._wait_for_room(len(data))
        self.cache.put(name, data)
        with self._cv:
            self._forget(name)
        self._queued(name, len(data))

    def get(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        if not is_object(name):
            return self.remote.get(name, start, end)
        try:
            data = self.cache.get(name, start, end)
        except BackendMissing:
            pass
        else:
            with self._cv:
                if name in self._lru:
                    self._lru.move_to_end(name)
            return data
        if name in self._deleting:
            raise BackendMissing(name)
        if self.fetcher.claim(name):  # fetched ahead meanwhile: in the cache now?
            try:
                return self.cache.get(name, start, end)
            except BackendMissing:
                pass
        if start or end is not None:  # a header only (fsck, verify): not worth caching
            self.counts["downloads"] += 1
            return self._remote_get(name, start, end)
        return self._download(name)

    def _download(self, name: str) -> bytes:
        """Get an object from the bucket and keep a copy in the cache."""
        return self._cache_fetched(name, self._remote_get(name))

    def _cache_fetched(self, name: str, blob: bytes) -> bytes:
        with self._cv:
            self.counts["downloads"] += 1
            self.counts["downloaded_bytes"] += len(blob)
        try:
            # deleted while its GET was on its way (a fetch ahead): not cached,
            # else it would sit in the cache under a deleted name, off the books
            if name not in self._deleting and self._keep(name, blob):
                with self._cv:
                    if name in self._deleting:  # deleted as it was written
                        self.cache.delete(name)
                        return blob
                    if name in self._lru:  # two fetches of one object
                        return blob
                    self._lru[name] = len(blob)
                    self._cached_bytes += len(blob)
                    self._evict()
        except StoreIOError as exc:  # a full cache disk must not fail a read
            log.warning("could not cache a downloaded object: %s", exc)
        return blob

    def _keep(self, name: str, blob: bytes) -> bool:
        """Write a downloaded object into the cache under a temporary name,
        then rename it: a concurrent read of the same object (the fetch pool,
        the read that waited for it) never sees it half written.  No fsync:
        the bucket holds it.  False if it was cached already."""
        path = self.cache.path(name)
        if os.path.exists(path):
            return False
        tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.urandom(6).hex()}")
        self.cache._parent(path)
        write_new(tmp, blob, mode=_UPLOADED_MODE)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreIOError(f"caching {os.path.basename(path)} failed: "
                               f"{exc.strerror}") from exc
        return True

    def prefetch(self, names: list[str]) -> int:
        """Fetch these objects into the cache ahead of their reads (those
        cached or being deleted are skipped); returns how many were queued."""
        # the cache's books, not a stat per name (this runs on the reader's path)
        todo = [n for n in names if n not in self._deleting and n not in self._lru
                and n not in self._pending]
        return self.fetcher.want(todo) if todo else 0

    def head(self, name: str) -> int | None:
        if is_object(name):
            size = self.cache.head(name)
            if size is not None:
                return size
            if name in self._deleting:
                return None
            where = self._where(name)
            if where is not None:
                return where.length
        return self.remote.head(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        seen = set()
        if is_object(prefix) or OBJECTS.startswith(prefix):
            for name in self.cache.list(prefix if is_object(prefix) else OBJECTS):
                seen.add(name)
                yield name
            for oid in self.packs.oids() if self.packs is not None else ():
                name = f"{OBJECTS}{oid.hex()[:2]}/{oid.hex()}"
                if name.startswith(prefix) and name not in seen and name not in self._deleting:
                    seen.add(name)
                    yield name
        for name in self.remote.list(prefix):
            if name not in seen and name not in self._deleting:
                yield name

    def delete(self, name: str) -> None:
        if not is_object(name):
            self.remote.delete(name)
            return
        with self._cv:  # marked first: a fetch ending now does not cache it
            if (self.pack_uploads and name in self._pending and name not in self._in_flight
                    and self._where(name) is None):
                # never uploaded (a chunk sealed uncompressed for the re-encoder,
                # replaced): nothing in the bucket to delete, no DELETE sent (a
                # copy a PUT put before a crash is in a pack the map took from
                # the bucket at this opening, so _where knows it)
                self._forget(name)
                self.cache.delete(name)
                self.counts["deletes_unsent"] += 1
                return
            self._forget(name)
            self._deleting.add(name)
            self._deletes_waiting += 1
            self._later.append(("delete", name, time.monotonic() + self.delete_delay))
            self._cv.notify()
        self.cache.delete(name)

    # --- bookkeeping ----------------------------------------------------------------
    def _queued(self, name: str, size: int, hold: bool = False) -> None:
        with self._cv:
            self._deleting.discard(name)
            self._pending[name] = size
            self._pending_bytes += size
            queue = self._held if hold else self._queue
            # the uploaders sleep until the earliest head of the queues is due
            # (a second at most): an entry behind another, due later, needs no
            # wakeup (one per object doubled the CPU of a create: ~90 -> ~45 us)
            wake = (not queue or self.upload_delay <= 0 or self._hurry
                    or self._pending_bytes * 2 > self.cache_size)
            queue.append(("put", name, time.monotonic()
                          + (HOLD if hold else 1) * self.upload_delay))
            if wake:
                self._cv.notify()

    def _forget(self, name: str) -> None:
        size = self._pending.pop(name, None)
        if size is not None:
            self._pending_bytes -= size
        size = self._lru.pop(name, None)
        if size is not None:
            self._cached_bytes -= size
        self._cv.notify_all()

    def _wait_for_room(self, size: int) -> None:
        """Writers wait while objects not yet uploaded fill the cache."""
        with self._cv:
            self._evict(size)
            if self._pending_bytes + size > self.cache_size and self._pending_bytes:
                self.counts["writer_waits"] += 1
                started = time.monotonic()
                while (self._pending_bytes + size > self.cache_size and self._pending_bytes
                       and not self._closed):
                    self._cv.wait(0.5)
                    self._evict(size)
                self.counts["writer_wait_ms"] += int((time.monotonic() - started) * 1000)

    def _evict(self, extra: int = 0) -> None:
        """Drop uploaded objects, least recently used first, until the cache
        fits (under the lock)."""
        while self._lru and self._pending_bytes + self._cached_bytes + extra > self.cache_size:
            name, size = self._lru.popitem(last=False)
            self._cached_bytes -= size
            try:
                self.cache.delete(name)
            except StoreIOError as exc:
                log.warning("could not evict a cached object: %s", exc)
            self.counts["evictions"] += 1

    # --- waiting and closing -------------------------------------------------------
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every object written so far is in the bucket (and every
        delete was sent); False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._hurry += 1  # nothing waits for its delay meanwhile
            self._cv.notify_all()
            try:
                # stale queue entries (objects deleted before their upload) do
                # not count: only what is waiting, running or still to delete
                while self._pending or self._in_flight or self._deletes_waiting \
                        or self._repacking:
                    if self._pending and not (self._queue or self._held or self._later
                                              or self._in_flight):
                        # waiting objects no queue holds: queue them again
                        # (an upload of one is harmless, a lost one is not)
                        log.warning("%d waiting objects were not queued; queueing them",
                                    len(self._pending))
                        self._queue.extend(("put", n, 0.0) for n in self._pending)
                        self._cv.notify_all()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(left if left is not None else 1.0)
            finally:
                self._hurry -= 1
        return True

    def stats(self) -> dict:
        with self._cv:
            out = {"backlog_objects": len(self._pending), "backlog_bytes": self._pending_bytes,
                   "cache_bytes": self._pending_bytes + self._cached_bytes,
                   "cache_size": self.cache_size}
        out.update(self.counts)
        out["fetched_ahead"] = self.fetcher.fetched
        out["requests"] = getattr(self.remote, "requests", 0)
        return out

    def close(self, drain_timeout: float = 0) -> None:
        """Stop the pool after waiting up to ``drain_timeout`` seconds for the
        backlog; what is left stays in the cache for the next opening."""
        if drain_timeout and not self.drain(drain_timeout):
            log.warning("%d objects were not uploaded before closing; the next mount uploads "
                        "them", len(self._pending))
        self.fetcher.close()
        with self._cv:
            self._closed = True
            self._abandon.set()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        if self.packs is not None:
            self.packs.close()
        self.remote.close()
