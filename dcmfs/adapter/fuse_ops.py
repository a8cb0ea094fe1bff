"""The FUSE adapter: the only module that imports mfusepy.

It translates paths, handles and exceptions, nothing more (borg ``vfs.py``).
Every dcmfs error becomes an errno through ``ERRNO`` (:mod:`.kernel`); unexpected exceptions
are not swallowed here: mfusepy logs them with their traceback.

mfusepy registers every attribute of the Operations object whose name matches
a FUSE operation, so this class has no helper attributes with such names.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import queue
import struct
import threading
import time
from typing import Callable


def _import_mfusepy():
    """mfusepy, bound to libfuse3.  Without FUSE_LIBRARY_NAME (or _PATH)
    mfusepy loads libfuse2 where both are installed (gocryptfs and Ceph pull
    libfuse2 in), so dcmfs names libfuse3 itself, for the import only: the
    process environment, which children inherit, stays as the user set it."""
    chosen = "FUSE_LIBRARY_NAME" in os.environ or "FUSE_LIBRARY_PATH" in os.environ
    if not chosen:
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy as module
    finally:
        if not chosen:
            del os.environ["FUSE_LIBRARY_NAME"]
    return module


try:
    mfusepy = _import_mfusepy()
except (OSError, ImportError, EnvironmentError) as exc:  # libfuse3 missing
    mfusepy = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

from .. import errors as E
from ..core.filesystem import FileSystem
from .kernel import ERRNO, errno_of, set_read_ahead  # noqa: F401 (ERRNO: the table)
from .metrics import OPS_XATTR, OpStats
from .loop import ended, hand_over, main_real, started
from .statbuf import stat_packer

log = logging.getLogger("dcmfs.fuse")

if mfusepy is not None and mfusepy.fuse_version_major == 3:
    # a mount with several threads is served by dcmfs's own loop (see .loop)
    mfusepy.fuse_main_real = main_real(mfusepy._libfuse, mfusepy.fuse_main_real)

#: reads, writes and the close of a file that wrote this much are long:
#: another thread reads the next requests meanwhile (.loop)
LONG_IO = 64 * 1024

def require_fuse() -> None:
    """Raise :class:`FuseUnavailableError` unless libfuse3 and /dev/fuse are usable."""
    if mfusepy is None:
        raise E.FuseUnavailableError(
            f"libfuse3 cannot be loaded ({_IMPORT_ERROR}); install it with "
            "'apt-get install fuse3'.")
    if mfusepy.fuse_version_major != 3:
        raise E.FuseUnavailableError("dcmfs needs libfuse3, but libfuse2 was loaded (as "
                                     "FUSE_LIBRARY_NAME or FUSE_LIBRARY_PATH asks); unset "
                                     "it, or install fuse3.")
    if not os.path.exists("/dev/fuse"):
        raise E.FuseUnavailableError("/dev/fuse is missing: load the fuse kernel module "
                                     "('modprobe fuse') or give the container /dev/fuse.")


#: operations the audit trail records: the core is told who asks
#: (uid, gid, pid of the calling process) before each of them
AUDITED = frozenset({"open", "create", "mkdir", "rmdir", "unlink", "rename", "link", "symlink",
                     "mknod", "chmod", "chown", "truncate", "setxattr", "removexattr"})


def _translate(method: Callable) -> Callable:
    """Errors to errno, and one count (latency, bytes, errno) per operation."""
    name = method.__name__
    audited = name in AUDITED

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started()
        try:
            return served(self, *args, **kwargs)
        finally:
            ended()

    def served(self, *args, **kwargs):
        t0 = time.perf_counter()
        if audited and self._audit:
            self._fs.caller = mfusepy.fuse_get_context()
        try:
            result = method(self, *args, **kwargs)
        except E.DcmfsError as exc:
            code = errno_of(exc)
            self._ops.failed(name, time.perf_counter() - t0, code)
            if code == errno.EIO and not isinstance(exc, E.IntegrityError):
                # integrity errors are logged (once each) by the core
                log.error("%s: %s", name, exc)
            elif code == errno.ENOSPC:
                log.warning("%s: %s", name, exc)
            else:  # the class only: a namespace error's message may hold the path
                log.debug("%s: %s", name, type(exc).__name__)
            raise mfusepy.FuseOSError(code) from exc
        if self._fs.stale_names:  # before the answer: no window with stale caches
            self._invalidate()
        self._ops.done(name, time.perf_counter() - t0, result)
        return result
    return wrapper


class _Invalidator:
    """Has the kernel drop what it caches for given paths (attributes and
    pages: libfuse3's ``fuse_invalidate_path``), for the other names of a
    hard-linked file that an operation changed (see :mod:`dcmfs.core.links`).

    The kernel carries out an invalidation at once, except that dropping a
    page waits while the page is locked - by a read or write of that name
    queued behind the operation being answered, which would wait for this
    loop in turn.  So the calls run on a thread of their own, and an
    operation waits for them at most :attr:`WAIT` seconds before it answers
    (in practice microseconds; only with I/O in flight on another name of
    the same file does the wait end first, and the invalidation completes
    right after that I/O).
    """

    WAIT = 0.05

    def __init__(self, fuse_ptr: int) -> None:
        fn = mfusepy._libfuse.fuse_invalidate_path  # the library mfusepy serves with
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
        self._call = functools.partial(fn, fuse_ptr)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dcmfs-invalidate")
        self._thread.start()

    def invalidate(self, paths: list[str]) -> None:
        done = threading.Event()
        self._queue.put((paths, done))
        done.wait(self.WAIT)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            paths, done = item
            for path in dict.fromkeys(paths):
                # -ENOENT: the kernel holds no inode for that name (never
                # looked up, or forgotten): nothing cached, nothing to do
                self._call(path.encode("utf-8", "surrogateescape"))
            done.set()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class _Operations:
    """Operations for mfusepy; each method is one call into the core."""

    use_ns = True
    flag_nullpath_ok = True
    flag_nopath = True

    def __init__(self, fs: FileSystem, on_ready: Callable[[], None] | None,
                 ops: OpStats, primary: bool = True, mountpoint: str | None = None,
                 read_ahead_kb: int = 0) -> None:
        self._fs = fs
        self._on_ready = on_ready
        self._primary = primary
        self._ops = ops
        self._invalidator: _Invalidator | None = None
        self._audit = fs.opened.audit is not None
        self._mountpoint = mountpoint
        self._read_ahead_kb = read_ahead_kb
        #: bytes written through each handle since its last flush
        self._written: dict[int, int] = {}

    def init(self, path):
        # the ``struct fuse *`` of this mount, for fuse_invalidate_path
        fuse_ptr = mfusepy._libfuse.fuse_get_context().contents.fuse
        self._invalidator = _Invalidator(fuse_ptr)
        if self._primary:
            _PRIMARY[:] = [fuse_ptr]
        if self._read_ahead_kb and self._mountpoint:
            # the kernel takes the INIT reply's read-ahead (at most its own
            # 128 KiB) after this returns: set ours once the mount answers
            threading.Thread(target=set_read_ahead, daemon=True, name="dcmfs-read-ahead",
                             args=(self._mountpoint, self._read_ahead_kb)).start()
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path):
        # before libfuse frees the ``struct fuse`` the invalidations use
        if self._primary:
            _PRIMARY.clear()
        if self._invalidator is not None:
            self._invalidator.stop()
            self._invalidator = None

    def _invalidate(self) -> None:
        stale = self._fs.stale_names
        paths = stale[:]
        stale.clear()
        if self._invalidator is not None:
            self._invalidator.invalidate(paths)

    @_translate
    def getattr(self, path, fh=None):
        st = self._fs.getattr(path, fh)
        if st["st_nlink"] and self._fs.hidden(path, fh):
            st["st_nlink"] += 1  # libfuse takes one off for its hidden name
        return st

    @_translate
    def opendir(self, path):
        return self._fs.opendir(path)

    @_translate
    def readdir(self, path, fh):
        # an entry with inode number 0 is skipped by readdir(3): give each its ino
        return [(".", None, 0), ("..", None, 0)] + [
            (name, {"st_ino": ino}, 0) for name, ino in self._fs.readdir(path, fh)]

    @_translate
    def releasedir(self, path, fh):
        self._fs.releasedir(fh)

    @_translate
    def mkdir(self, path, mode):
        uid, gid, _ = mfusepy.fuse_get_context()
        self._fs.mkdir(path, mode, uid, gid)

    @_translate
    def rmdir(self, path):
        self._fs.rmdir(path)

    @_translate
    def create(self, path, mode, flags):
        uid, gid, _ = mfusepy.fuse_get_context()
        return self._fs.create(path, mode, flags, uid, gid)

    @_translate
    def open(self, path, flags):
        return self._fs.open(path, flags)

    @_translate
    def read(self, path, size, offset, fh):
        if size >= LONG_IO:
            hand_over()
        return self._fs.read(fh, size, offset)

    @_translate
    def write(self, path, data, offset, fh):
        self._written[fh] = self._written.get(fh, 0) + len(data)
        if len(data) >= LONG_IO:
            hand_over()
        return self._fs.write(fh, data, offset)

    @_translate
    def truncate(self, path, length, fh=None):
        self._fs.truncate(path, length, fh)

    @_translate
    def fallocate(self, path, mode, offset, length, fh):
        self._fs.fallocate(fh, mode, offset, length)

    @_translate
    def flush(self, path, fh):
        if self._written.pop(fh, 0) >= LONG_IO:
            hand_over()
        self._fs.flush(fh)

    @_translate
    def fsync(self, path, datasync, fh):
        hand_over(watch=True)
        self._fs.fsync(fh, bool(datasync))

    @_translate
    def fsyncdir(self, path, datasync, fh):
        hand_over(watch=True)
        self._fs.sync_all()

    @_translate
    def release(self, path, fh):
        if self._written.pop(fh, 0) >= LONG_IO:
            hand_over()
        self._fs.release(fh)

    @_translate
    def unlink(self, path):
        self._fs.unlink(path)

    @_translate
    def rename(self, old, new, flags=0):
        self._fs.rename(old, new, flags)

    @_translate
    def link(self, target, source):
        # mfusepy: ``target`` is the new name, ``source`` the existing file
        self._fs.link(source, target)

    @_translate
    def symlink(self, target, source):
        # mfusepy: ``target`` is the link's path, ``source`` what it points to
        uid, gid, _ = mfusepy.fuse_get_context()
        self._fs.symlink(target, source, uid, gid)

    @_translate
    def mknod(self, path, mode, dev):
        uid, gid, _ = mfusepy.fuse_get_context()
        self._fs.mknod(path, mode, dev, uid, gid)

    @_translate
    def readlink(self, path):
        return self._fs.readlink(path)

    @_translate
    def chmod(self, path, mode, fh=None):
        self._fs.chmod(path, mode, fh)

    @_translate
    def chown(self, path, uid, gid, fh=None):
        self._fs.chown(path, uid, gid, fh)

    @_translate
    def utimens(self, path, times=None, fh=None):
        atime, mtime = times if times else (None, None)
        self._fs.utimens(path, atime, mtime, fh)

    @_translate
    def statfs(self, path):
        return self._fs.statfs()

    @_translate
    def setxattr(self, path, name, value, options, position=0):
        self._fs.setxattr(path, name, value, options, caller=mfusepy.fuse_get_context()[0])

    @_translate
    def getxattr(self, path, name, position=0):
        caller = mfusepy.fuse_get_context()[0]
        if name == OPS_XATTR and path == "/":  # the adapter's own counters
            self._fs.require_admin(caller)
            return self._ops.snapshot_json()
        return self._fs.getxattr(path, name, caller=caller)

    @_translate
    def listxattr(self, path):
        return self._fs.listxattr(path)

    @_translate
    def removexattr(self, path, name):
        self._fs.removexattr(path, name)


def _fuse_class():
    pack_stat = stat_packer(mfusepy.c_stat)

    class _Fuse(mfusepy.FUSE):
        """mfusepy's libfuse3 callbacks drop two things dcmfs needs: renameat2
        flags (RENAME_NOREPLACE must not overwrite) and the file handle of
        ftruncate/fchmod/fchown/futimens (with ``nopath`` the path is NULL);
        its create is slower than it need be."""

        def _path(self, path):
            return None if path is None else path.decode(self.encoding, self.errors)

        @staticmethod
        def _fh(fip):
            return fip.contents.fh if fip else None

        def fgetattr(self, path, buf, fip):
            # the struct filled in one pack_into, not field by field (statbuf)
            attrs = self.operations.getattr(self._path(path), self._fh(fip))
            st = buf.contents
            try:
                pack_stat(st, attrs)
            except (KeyError, TypeError, struct.error):  # a view's answer of another shape
                ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
                mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
            return 0

        def create(self, path, mode, fip):
            # mfusepy's asks inspect.signature of the operation on every
            # create (measured, issue 17: 1.5 % of the daemon's CPU in a
            # small-file burst)
            fi = fip.contents
            fi.fh = self.operations.create(self._path(path), mode, fi.flags)
            return 0

        def open(self, path, fip):
            fi = fip.contents
            fi.fh = self.operations.open(self._path(path), fi.flags)
            if not fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC) \
                    and hasattr(fi, "noflush"):
                # no FLUSH at close(2) of a descriptor that cannot have
                # written (libfuse >= 3.11): one round trip less per file
                # read (measured, issue 17); RELEASE still comes
                fi.noflush = 1
            return 0

        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(self._path(old), self._path(new), flags)

        def truncate_fuse_3(self, path, length, fip):
            return self.operations.truncate(self._path(path), length, self._fh(fip))

        def chmod_fuse_3(self, path, mode, fip):
            return self.operations.chmod(self._path(path), mode, self._fh(fip))

        def chown_fuse_3(self, path, uid, gid, fip):
            uid = -1 if mfusepy.c_uid_t(uid + 1).value == 0 else uid
            gid = -1 if mfusepy.c_gid_t(gid + 1).value == 0 else gid
            return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

        def utimens_fuse_3(self, path, buf, fip):
            times = None
            if buf:
                times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                         mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
            return self.operations.utimens(self._path(path), times, self._fh(fip))
    return _Fuse


#: seconds the kernel keeps names and attributes (``-o entry_timeout=``,
#: ``-o attr_timeout=`` override it)
KERNEL_TIMEOUT = 60

#: the ``struct fuse *`` of the daemon's main mount while it is served
_PRIMARY: list = []


def serve(fs: FileSystem, mountpoint: str, options: dict,
          on_ready: Callable[[], None] | None = None, ops: OpStats | None = None,
          primary: bool = True) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT/SIGHUP).

    libfuse's own signal handlers end the loop and unmount; the caller then
    closes ``fs``, which flushes everything.

    A second mount of the same daemon (``primary`` False: the de-identified
    view beside the files, served from a thread of its own and mounted
    first) must leave the signals to the main one: libfuse keeps a single
    session for its handlers (the one mounted last: the main) and removes
    the handlers when any session ends, so when the second one ends first
    they are given back to the main session here; else SIGTERM would kill
    the daemon without flushing.
    """
    require_fuse()
    # no hard_remove: an unlinked open file keeps a (hidden) name in libfuse,
    # so that fstat(2) of its descriptor reaches the core (see NameOps._hide)
    # dcmfs is the only writer of its store, and tells the kernel when one
    # name of a hard-linked file made the others stale (_Invalidator): the
    # kernel may keep names and attributes for a minute, not libfuse's 1 s
    # (measured, issue 17: stat of 5 000 files 0.44 -> 0.89 of gocryptfs)
    opts = {"fsname": fs.store.root, "subtype": "dcmfs", "default_permissions": True,
            "use_ino": True, "nopath": True, "kernel_cache": True}
    # not where the tree changes by itself: the de-identified view, and a
    # follower (it applies another machine's journal: a file first seen
    # empty would read empty for a minute)
    if isinstance(fs, FileSystem) and not fs.config.follow:
        opts.update(entry_timeout=KERNEL_TIMEOUT, attr_timeout=KERNEL_TIMEOUT)
    opts.update(options)
    log.debug("FUSE options: %s", ", ".join(f"{k}={v}" for k, v in sorted(opts.items())))
    # dcmfs's loop (.loop) where the core takes requests from several
    # threads (one that waits, such as a fsync syncing a gigabyte, holds one
    # thread, not the mount); a view that does not is served by one thread
    threads = getattr(fs, "concurrent_requests", False) and fs.config.fuse_threads
    try:
        read_ahead_kb = getattr(getattr(fs, "config", None), "read_ahead_kb", 0)
        _fuse_class()(_Operations(fs, on_ready, ops or OpStats(), primary, mountpoint,
                                  read_ahead_kb), mountpoint,
                      foreground=True, nothreads=not threads, **opts)
    except RuntimeError as exc:
        # libfuse reports a loop ended by a signal as a non-zero result
        log.debug("FUSE loop ended: %s", exc)
    finally:
        if not primary and _PRIMARY:
            lib = mfusepy._libfuse
            lib.fuse_get_session.argtypes, lib.fuse_get_session.restype = \
                [ctypes.c_void_p], ctypes.c_void_p
            lib.fuse_set_signal_handlers.argtypes = [ctypes.c_void_p]
            lib.fuse_set_signal_handlers(lib.fuse_get_session(_PRIMARY[0]))
