"""Object files kept open for ranged reads (a part of
:class:`dcmfs.storage.backend.LocalBackend`).

A random 4 KiB read of a framed object reads one frame: it was an open, a
pread and a close of the object file, and the open's path walk about 12 us
of the 150 us of CPU the core spent on such a read (cProfile, in-process,
issue 17).  The files of the objects read last stay open in an LRU instead.

What is read through a kept descriptor is authenticated as before (every
frame against its object, place and context): damage in place is seen at
once; a file replaced by renaming another over it (a swap by hand) is seen
once its descriptor is dropped: evicted, or after a frame read through it
failed.  The store's own deletes, puts and moves of a name drop it
(:meth:`KeptFiles.forget`; fsck's repair and quarantine too), so the store
does not read a deleted or moved object through one; a name opened while
a forget ran (the open is outside the lock) serves that one read and is not
kept.  Descriptors are counted while in use: one evicted (or forgotten)
while another thread reads through it is closed after that read.
"""

from __future__ import annotations

import collections
import os
import resource
import threading


class _Kept:
    __slots__ = ("fd", "users", "dropped")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dropped = False


class KeptFiles:
    """An LRU of open read-only descriptors, by name."""

    #: descriptors kept at most: one per 1 MiB chunk of a 1 GiB file read
    #: at random, and never more than a quarter of the process's limit of
    #: open files (1024 by default: then 256)
    LIMIT = 1024

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = self.LIMIT if soft == resource.RLIM_INFINITY else \
                max(1, min(self.LIMIT, soft // 4))
        self._limit = limit
        self._open: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: forgets (and closes) so far: a descriptor opened across one may be
        #: of a file deleted or moved meanwhile, and is not kept
        self._forgets = 0

    def pread(self, name: str, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file at ``path`` (shorter past its
        end); raises what ``os.open`` or ``os.pread`` raise."""
        kept = self._take(name, path)
        try:
            want = max(0, end - start)
            data = os.pread(kept.fd, want, start)
            while len(data) < want:  # a short read before the end: read on
                more = os.pread(kept.fd, want - len(data), start + len(data))
                if not more:
                    break
                data += more
            return data
        finally:
            self._give(kept)

    def forget(self, name: str) -> None:
        """``name`` was deleted or replaced: drop its descriptor."""
        with self._lock:
            self._forgets += 1
            kept = self._open.pop(name, None)
            if kept is not None:
                self._drop(kept)

    def close(self) -> None:
        with self._lock:
            self._forgets += 1
            while self._open:
                self._drop(self._open.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._open)

    def _take(self, name: str, path: str) -> _Kept:
        with self._lock:
            kept = self._open.get(name)
            if kept is not None:
                self._open.move_to_end(name)
                kept.users += 1
                return kept
            forgets = self._forgets
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            kept = self._open.get(name)
            if kept is not None:  # another thread opened it meanwhile
                os.close(fd)
                self._open.move_to_end(name)
            elif forgets != self._forgets:  # perhaps of a file deleted meanwhile
                kept = _Kept(fd)
                kept.dropped = True  # closed after this read
            else:
                kept = self._open[name] = _Kept(fd)
                while len(self._open) > self._limit:
                    self._drop(self._open.popitem(last=False)[1])
            kept.users += 1
            return kept

    def _give(self, kept: _Kept) -> None:
        with self._lock:
            kept.users -= 1
            if kept.dropped and kept.users == 0:
                os.close(kept.fd)

    def _drop(self, kept: _Kept) -> None:
        """(under the lock) closed now, or by its last user."""
        kept.dropped = True
        if kept.users == 0:
            os.close(kept.fd)
