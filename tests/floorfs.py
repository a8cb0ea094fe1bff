"""A do-nothing filesystem served by dcmfs's own FUSE adapter: the floor of
a metadata request (libfuse3 + mfusepy/ctypes + the GIL + the adapter's
wrapper), for benchmarks of issue 17.  Not a test and not shipped.

Files live in a dict (attributes only, writes counted not kept); it is
served by ``dcmfs.adapter.fuse_ops`` exactly as a store is: the same
libfuse3 loading, the same _Fuse class and _Operations wrapper, the same
mount options (entry/attr timeouts 60 s, default_permissions, use_ino,
nopath, kernel_cache) and dcmfs's request loop (dcmfs.adapter.loop).

    python tests/floorfs.py MOUNTPOINT      # foreground until unmounted
"""

from __future__ import annotations

import itertools
import stat
import sys
import threading
import time
import types

from dcmfs import errors as E
from dcmfs.adapter import fuse_ops
from dcmfs.adapter.metrics import OpStats


class FloorFS:
    concurrent_requests = True

    def __init__(self) -> None:
        self.store = types.SimpleNamespace(root="floor")
        self.config = types.SimpleNamespace(fuse_threads=True, follow=False, read_ahead_kb=0)
        self.opened = types.SimpleNamespace(audit=None)
        self.stale_names: list[str] = []
        now = time.time_ns()
        self._lock = threading.Lock()
        self._ino = itertools.count(2)
        self._fh = itertools.count(1)
        self._handles: dict[int, str] = {}
        self._files: dict[str, dict] = {"/": self._attrs(1, stat.S_IFDIR | 0o755, 0, 0, now)}

    @staticmethod
    def _attrs(ino, mode, uid, gid, now) -> dict:
        return {"st_ino": ino, "st_mode": mode, "st_nlink": 2 if stat.S_ISDIR(mode) else 1,
                "st_uid": uid, "st_gid": gid, "st_size": 0, "st_blocks": 0,
                "st_atime": now, "st_mtime": now, "st_ctime": now, "st_blksize": 4096}

    def _get(self, path):
        try:
            return self._files[path]
        except KeyError:
            raise E.NotFound("no such file") from None

    def hidden(self, path, fh) -> bool:
        return False

    def getattr(self, path, fh=None):
        with self._lock:
            if fh is not None and fh in self._handles:
                path = self._handles[fh]
            return dict(self._get(path))

    def opendir(self, path):
        return 0

    def readdir(self, path, fh):
        with self._lock:
            pre = path.rstrip("/") + "/"
            return [(p[len(pre):], a["st_ino"]) for p, a in self._files.items()
                    if p.startswith(pre) and "/" not in p[len(pre):] and p != "/"]

    def releasedir(self, fh):
        pass

    def mkdir(self, path, mode, uid, gid):
        with self._lock:
            self._files[path] = self._attrs(next(self._ino), stat.S_IFDIR | mode, uid, gid,
                                            time.time_ns())

    def rmdir(self, path):
        with self._lock:
            del self._files[path]

    def create(self, path, mode, flags, uid, gid):
        with self._lock:
            self._files[path] = self._attrs(next(self._ino), stat.S_IFREG | mode, uid, gid,
                                            time.time_ns())
            fh = next(self._fh)
            self._handles[fh] = path
            return fh

    def open(self, path, flags):
        with self._lock:
            self._get(path)
            fh = next(self._fh)
            self._handles[fh] = path
            return fh

    def write(self, fh, data, offset):
        with self._lock:
            a = self._files[self._handles[fh]]
            a["st_size"] = max(a["st_size"], offset + len(data))
            a["st_mtime"] = time.time_ns()
            return len(data)

    def read(self, fh, size, offset):
        return b""

    def flush(self, fh):
        pass

    def release(self, fh):
        with self._lock:
            self._handles.pop(fh, None)

    def unlink(self, path):
        with self._lock:
            del self._files[path]

    def truncate(self, path, length, fh=None):
        with self._lock:
            self._get(self._handles.get(fh, path))["st_size"] = length

    def utimens(self, path, atime, mtime, fh=None):
        pass

    def chmod(self, path, mode, fh=None):
        pass

    def chown(self, path, uid, gid, fh=None):
        pass

    def statfs(self):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 20, "f_ffree": 1 << 19,
                "f_favail": 1 << 19, "f_namemax": 255}

    def getxattr(self, path, name, caller=None):
        raise E.NoAttribute("none")

    def listxattr(self, path):
        return []


def main() -> None:
    fuse_ops.serve(FloorFS(), sys.argv[1],
                   {"entry_timeout": fuse_ops.KERNEL_TIMEOUT,
                    "attr_timeout": fuse_ops.KERNEL_TIMEOUT}, ops=OpStats())


if __name__ == "__main__":
    main()
