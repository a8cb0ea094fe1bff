"""Where a store's objects live: one interface, two backends.

A :class:`Backend` holds immutable blobs under slash-separated names
(``objects/ab/<32 hex>``, ``snapshots/…``, ``dcmfs.store``, ``lease``).  It
can put, get (a byte range), head, list by prefix, delete and create a name
only if it does not exist yet (the conditional PUT of S3, ``O_EXCL`` on
disk).  :class:`LocalBackend` is the store directory itself (today's layout,
unchanged); :mod:`dcmfs.storage.s3` is a bucket and a prefix; both pass the
same conformance suite (``tests/test_backends.py``), as restic's backends do.

Errors: a missing name raises :class:`BackendMissing`; anything else the
backend cannot do raises :class:`~dcmfs.errors.StoreIOError` (or
:class:`~dcmfs.errors.NoSpaceError`).
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .durable import TMP_PREFIX, _raise_os, write_new
from .keptfds import KeptFiles
from ..errors import StoreIOError


class BackendMissing(KeyError):
    """The name is not in the backend."""


class Backend:
    """The operations a store needs of where its objects live."""

    #: a short word for logs and status ("local", "s3")
    kind = "?"

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``name`` (replacing what was there)."""
        raise NotImplementedError

    def create(self, name: str, data: bytes | memoryview) -> bool:
        """Store ``data`` under ``name`` only if the name is free; False if it
        was taken (atomic: of two creators exactly one wins)."""
        raise NotImplementedError

    def get(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        """The bytes ``[start, end)`` of ``name`` (to its end when ``end`` is
        None; a range past the end is cut short)."""
        raise NotImplementedError

    def head(self, name: str) -> int | None:
        """The size of ``name``, or None when it is missing."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every name starting with ``prefix`` (no order promised)."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing name is not an error."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Names are paths under a directory (the store's own layout)."""

    kind = "local"

    #: threads that bring the objects a sequential reader needs next into
    #: the page cache (:meth:`prefetch`)
    WARM_THREADS = 2

    def __init__(self, root: str) -> None:
        self.root = root
        #: object files kept open for ranged reads (:meth:`get_kept`)
        self.kept = KeptFiles()
        self._warm: ThreadPoolExecutor | None = None
        self._warm_lock = threading.Lock()

    def prefetch(self, names: list[str]) -> int:
        """Have the page cache read these objects ahead of their reads (a
        reader walking a directory: :mod:`dcmfs.core.readahead`); returns how
        many were queued.  A store read cold (after a reboot, or a prior not
        read for days) is one small file per object: the 400-slice CT series'
        1 200 objects took 0.9-1.9 s to open and read from this machine's
        disk one after the other (0.2 s of it CPU), which the decoding
        threads waited for one object at a time (issue 17).  Two threads,
        asked for 4 files ahead: 4 threads asked for 16 read the fresh series
        slower than none at all (4 interleaved pairs on a loaded machine),
        2 for 4 faster (4 pairs each of the fresh and cold series)."""
        with self._warm_lock:
            if self._warm is None:
                self._warm = ThreadPoolExecutor(self.WARM_THREADS,
                                                thread_name_prefix="dcmfs-warm")
            for name in names:
                self._warm.submit(self._warm_one, os.path.join(self.root, name))
        return len(names)

    @staticmethod
    def _warm_one(path: str) -> None:
        try:  # the open reads the directory and inode blocks; the advice the data
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # deleted meanwhile: the read itself says what is missing
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def wait_idle(self, cancel: bool = False) -> None:
        """Wait until every object :meth:`prefetch` was asked for has been
        advised (``cancel``: those not started are dropped)."""
        with self._warm_lock:
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.shutdown(wait=True, cancel_futures=cancel)

    def close(self) -> None:
        self.wait_idle(cancel=True)
        self.kept.close()  # the object files kept open for ranged reads

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _parent(self, path: str) -> None:
        d = os.path.dirname(path)
        if not os.path.isdir(d):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreIOError(f"cannot create a directory of the store: "
                                   f"{exc.strerror}") from exc

    def put(self, name: str, data: bytes | memoryview, mode: int = 0o600) -> None:
        from .durable import write_file
        path = self.path(name)
        self._parent(path)
        try:
            write_file(path, data, mode=mode, sync_dir=False)
        finally:  # after the rename: a read before it may have kept the old file
            self.kept.forget(name)

    def create(self, name: str, data: bytes | memoryview, mode: int = 0o600) -> bool:
        """``O_EXCL``, without fsync: objects are made durable in bulk
        (:func:`dcmfs.storage.durable.sync_filesystem`)."""
        path = self.path(name)
        self._parent(path)
        try:
            write_new(path, data, mode=mode)
        except StoreIOError as exc:
            if isinstance(exc.__cause__, FileExistsError):
                return False
            raise
        return True

    def get(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        # os-level calls: a buffered open, seek and read cost three times as
        # much, which a 4 KiB random read through a framed object notices
        try:
            fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if end is None:
                    end = os.fstat(fd).st_size
                want = max(0, end - start)
                data = os.pread(fd, want, start)
                while len(data) < want:  # a short read before the end: read on
                    more = os.pread(fd, want - len(data), start + len(data))
                    if not more:
                        break
                    data += more
                return data
            finally:
                os.close(fd)
        except FileNotFoundError as exc:
            raise BackendMissing(name) from exc
        except OSError as exc:
            raise StoreIOError(f"reading {os.path.basename(name)} failed: "
                               f"{exc.strerror}") from exc

    def get_kept(self, name: str, start: int, end: int) -> bytes:
        """As :meth:`get`, through a descriptor kept open for the next
        ranged read of ``name`` (a random reader's frames: see
        :mod:`dcmfs.storage.keptfds`)."""
        try:
            return self.kept.pread(name, os.path.join(self.root, name), start, end)
        except FileNotFoundError as exc:
            raise BackendMissing(name) from exc
        except OSError as exc:
            raise StoreIOError(f"reading {os.path.basename(name)} failed: "
                               f"{exc.strerror}") from exc

    def head(self, name: str) -> int | None:
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreIOError(f"stat of {os.path.basename(name)} failed: "
                               f"{exc.strerror}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        # walk only the directories the prefix can reach; temp files of
        # interrupted writes are not names
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.path(base) if base else self.root
        if not os.path.isdir(top):
            return
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames.sort()
            for name in sorted(filenames):
                full = rel + name
                if not name.startswith(TMP_PREFIX) and full.startswith(prefix):
                    yield full

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StoreIOError(f"deleting {os.path.basename(name)} failed: "
                                   f"{exc.strerror}") from exc
        finally:  # after the unlink: a read before it may have kept the file
            self.kept.forget(name)
