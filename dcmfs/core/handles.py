"""Operations on open files and extended attributes (a part of the core).

:class:`FileOps` is mixed into :class:`dcmfs.core.filesystem.FileSystem`; it uses
the FileSystem's index, data path, handle table and inode helpers.  It is a
separate module only to keep each file of the core readable.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import threading
import time
from typing import Callable

from .. import format as fmt
from ..errors import (BadHandle, DcmfsError, Exists, InvalidArgument, IsADirectory,
                     NameTooLong, NoAttribute, NotSupported, PermissionDenied, ReadOnlyError,
                     TooBig)
from ..audit.trail import identity
from .links import canonical
from .openfile import OpenFile, run_inline
from ..index import Inode

log = logging.getLogger("dcmfs.fs")

NAME_MAX = 255
#: an open's access mode in the audit trail
_ACCESS = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw", 3: "rw"}
XATTR_CREATE, XATTR_REPLACE = 1, 2
#: fallocate(2) modes (linux/falloc.h); the others (collapse, insert, unshare
#: range) are EOPNOTSUPP, as on a filesystem without them
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


#: how deep this thread is in the core's locked methods: only the outermost
#: call is a request (note_request), not the calls it makes
_DEPTH = threading.local()


def _noted(self, method: Callable, args, kwargs, count: bool = True):
    depth = getattr(_DEPTH, "n", 0)
    if depth == 0 and count:
        self.data.note_request()
    _DEPTH.n = depth + 1
    try:
        result = method(self, *args, **kwargs)
    finally:
        _DEPTH.n = depth
    self._maybe_checkpoint()
    return result


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return _noted(self, method, args, kwargs)
    return wrapper


def _status(method: Callable) -> Callable:
    """Locked, but not a request that background work yields to: ``dcmfs
    status`` or a bench polling the daemon's own attributes many times a
    second held the re-encoder back for good."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return _noted(self, method, args, kwargs, count=False)
    return wrapper


def _mutating(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.read_only:
            raise ReadOnlyError("The store is mounted read-only.")
        with self._lock:
            return _noted(self, method, args, kwargs)
    return wrapper


class Handle:
    __slots__ = ("of", "flags", "path", "who", "wrote")

    def __init__(self, of: OpenFile, flags: int, path: str | None = None) -> None:
        self.of = of
        self.flags = flags
        #: the name it was opened by (followed through renames): the kernel
        #: inode whose pages a write through it holds (see core.links)
        self.path = path
        #: who opened it (uid, gid, pid, process name), for the audit trail's
        #: write-close record; ``wrote``: written since the last flush
        self.who: tuple | None = None
        self.wrote = False


class FileOps:
    """Open, read, write, truncate, flush, fsync, release; xattrs."""

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise BadHandle(f"file handle {fh} is not open")
        return h

    # --- files ------------------------------------------------------------------------
    def _open_file(self, ino: int, inode: Inode, flags: int, path: str | None = None) -> int:
        of = self._open.get(ino)
        if of is None:
            of = self.data.open_file(ino, inode)
            self._open[ino] = of
            self._inodes.pop(ino, None)  # the open file owns the live inode now
        of.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(of, flags, path)
        return fh

    @_mutating
    def create(self, path: str, mode: int, flags: int, uid: int, gid: int) -> int:
        with self._write_txn() as txn:
            parent, name, pinode = self._free_name(txn, path)
            ino, inode = self._new_inode(txn, stat.S_IFREG | (mode & 0o7777), uid, gid, pinode)
            txn.add_dirent(parent, name, ino)
            self._touch_dir(txn, parent, pinode)
            txn.add_stats(files=1)
        if canonical(path):  # (as _resolve_known: an unlink forgets that spelling only)
            self._paths.put(self.index.names_gen, path, ino)  # the kernel's GETATTRs to come
        self.data.after_commit([])
        fh = self._open_file(ino, inode, flags, path)
        self._audit_open(fh, "create", ino, path, mode=mode & 0o7777)
        return fh

    @_locked
    def open(self, path: str, flags: int) -> int:
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise ReadOnlyError("The store is mounted read-only.")
        with self.index.begin() as txn:
            # by the name the kernel's LOOKUP resolved a moment ago (issue 17:
            # a viewer's open of /patient/study/series/slice opened 4 entries)
            ino = self._resolve_known(txn, path)
            inode = self._inode(txn, ino)
        if stat.S_ISDIR(inode.mode):
            raise IsADirectory(path)
        if not stat.S_ISREG(inode.mode):  # the kernel opens FIFOs, sockets, devices itself
            raise InvalidArgument(path)
        fh = self._open_file(ino, inode, flags, path)
        of = self._handles[fh].of
        if flags & os.O_TRUNC and of.size:
            self.data.truncate(of, 0)
            of.inode.mtime_ns = of.inode.ctime_ns = self._clock()
            self._knames.changed(ino, path)
        if self.reencoder is not None and not flags & (os.O_WRONLY | os.O_RDWR):
            self.reencoder.tiers.read(ino)  # a hot file being read stays hot
        self._audit_open(fh, "open", ino, path, access=_ACCESS[flags & os.O_ACCMODE],
                         **({"trunc": True} if flags & os.O_TRUNC else {}))
        if self.readahead is not None and not flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.readahead.open(of, path)
        return fh

    def _audit_open(self, fh: int, event: str, ino: int, path: str, **fields) -> None:
        """Record an open; its handle keeps who opened it (the process name
        is read once per open) for the write-close record."""
        trail = self.opened.audit
        if trail is not None:
            h = self._handles[fh]
            h.who = identity(self.caller, fresh=True)
            trail.record(event, h.who, ino, path, **fields)

    def _audit_written(self, h: Handle) -> None:
        """A write-close record: the file's new size and digest prefix."""
        if h.wrote:
            h.wrote = False
            digest = h.of.inode.digest
            self._audit("write-close", h.of.ino, h.path, who=h.who, size=h.of.size,
                        digest=digest.hex()[:16] if digest else None)

    @_locked
    def open_inode(self, ino: int) -> int:
        """Open a regular file by inode number for reading (the
        de-identified view reads the files it serves so)."""
        with self.index.begin() as txn:
            inode = self._inode(txn, ino)
        if not stat.S_ISREG(inode.mode):
            raise InvalidArgument(f"inode {ino} is not a regular file")
        return self._open_file(ino, inode, os.O_RDONLY)

    @_locked
    def read(self, fh: int, size: int, offset: int, ahead: bool = True) -> bytes:
        """``ahead``: extents past the range are decoded meanwhile (a
        sequential reader's); False for a reader of one range only."""
        h = self._handle(fh)
        if self.readahead is not None and not h.of.changed:
            self.readahead.read(h.of, offset, size, h.path)
        return self.data.read(h.of, offset, size, ahead)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        # a full sealing pool is waited for here, not under the lock
        # (a writer at random offsets seals a chunk at nearly every write)
        self.data.wait_for_room()
        return self._write(fh, data, offset)

    @_mutating
    def _write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handle(fh)
        of = h.of
        if h.flags & os.O_APPEND:
            offset = of.size
        if offset + len(data) > fmt.MAX_FILE_SIZE:
            raise TooBig("file too large")
        n = self.data.write(of, offset, data)
        h.wrote = True
        of.inode.mtime_ns = of.inode.ctime_ns = self._clock()
        self._knames.changed(of.ino, h.path)
        return n

    @_mutating
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if length < 0 or length > fmt.MAX_FILE_SIZE:
            raise InvalidArgument("bad length")
        if fh is not None:
            h = self._handle(fh)
            self.data.truncate(h.of, length)
            h.wrote = True
            h.of.inode.mtime_ns = h.of.inode.ctime_ns = self._clock()
            self._knames.changed(h.of.ino, h.path)
            return
        with self.index.begin() as txn:
            ino = self._resolve(txn, path)
            inode = self._inode(txn, ino)
        if stat.S_ISDIR(inode.mode):
            raise IsADirectory(path)
        if not stat.S_ISREG(inode.mode):
            raise InvalidArgument(path)
        fh = self._open_file(ino, inode, os.O_WRONLY)
        try:
            of = self._handle(fh).of
            self.data.truncate(of, length)
            of.inode.mtime_ns = of.inode.ctime_ns = self._clock()
            self.data.commit(of)
        finally:
            self._release(fh)
        self._knames.changed(ino, path)
        self._audit("truncate", ino, path, size=length)

    @_mutating
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file.

        Mode 0 extends the file to ``offset + length`` when it is shorter
        (the new bytes are a hole: dcmfs allocates nothing ahead, so a later
        write can still meet a full disk); ``FALLOC_FL_KEEP_SIZE`` alone
        changes nothing.  ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` and
        ``FALLOC_FL_ZERO_RANGE`` (which extends the file like mode 0 unless
        KEEP_SIZE) make the range read as zeros: whole chunks become holes
        (no object), partial ones are rewritten with zeros.

        Raises InvalidArgument (bad range), TooBig, NotSupported (any other
        mode, or PUNCH_HOLE without KEEP_SIZE).
        """
        if offset < 0 or length <= 0:
            raise InvalidArgument("bad range")
        end = offset + length
        if end > fmt.MAX_FILE_SIZE:
            raise TooBig("file too large")
        h = self._handle(fh)
        of = h.of
        keep = mode & FALLOC_FL_KEEP_SIZE
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        if kind not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) or \
                (kind == FALLOC_FL_PUNCH_HOLE and not keep):
            raise NotSupported(f"fallocate mode {mode:#x}")
        changed = False
        if kind:  # zero what the file holds of the range
            changed = self._zero(of, offset, min(end, of.size))
        if not keep and end > of.size:
            self.data.truncate(of, end)
            changed = True
        if changed:
            h.wrote = True
            of.inode.mtime_ns = of.inode.ctime_ns = self._clock()
            self._knames.changed(of.ino, h.path)

    def _zero(self, of: OpenFile, start: int, stop: int) -> bool:
        """Make [start, stop) of an open file read as zeros; only the chunks
        that hold data there are touched (an absent chunk is a hole already).
        A whole chunk of zeros is sealed as a hole, so no object remains."""
        cs = self.data.chunk_size
        if start >= stop:
            return False
        first, last = start // cs, (stop - 1) // cs
        if of.extents is not None:  # the first write copies it back into chunks
            touched = range(first, last + 1)
        else:
            touched = sorted(i for i in {*of.committed, *of.pending, *of.dirty}
                             if first <= i <= last)
        for idx in touched:
            lo, hi = max(start, idx * cs), min(stop, (idx + 1) * cs)
            self.data.write(of, lo, bytes(hi - lo))
        return True

    def _seal_unlocked(self, fh: int) -> None:
        """Seal an open file's dirty chunks and wait for its sealing jobs
        without holding the core's lock (the long part of a commit: up to
        ``dirty_limit`` of chunks to compress and write), so that the
        commit which follows under the lock is short."""
        with self._lock:
            of = self._handle(fh).of
            jobs = self.data.seal_dirty(of, inline=True) if of.changed else []
        run_inline(jobs)  # a failure is raised by the commit

    def flush(self, fh: int) -> None:
        """close(2) on a descriptor: commit, so the data survives a daemon crash."""
        self._seal_unlocked(fh)
        with self._lock:
            h = self._handle(fh)
            if h.of.changed:
                self.data.commit(h.of)
            self._audit_written(h)
            self._maybe_checkpoint()

    def fsync(self, fh: int, datasync: bool = False) -> None:
        """fsync(2): commit and make it durable (survives power loss).

        The long part - sealing the file's last chunks and syncing a
        gigabyte of objects to the disk - runs without the core's lock, so
        the mount's other requests are served meanwhile (as the background
        checkpoint syncs the objects before it takes the lock).  Then, under
        the lock, the commit finds its objects written and the final
        sync covers only what was written since (objects first, then the
        journal that names them: the crash policy of ``make_durable``).
        """
        self._seal_unlocked(fh)
        if not self.read_only:  # also other files' objects (nothing if none was written)
            try:
                self.objects.sync()
            except DcmfsError:
                pass  # final for the mount: make_durable below raises it
        with self._lock:
            self.data.commit(self._handle(fh).of)
            self.make_durable()
            self._maybe_checkpoint()

    @_locked
    def release(self, fh: int) -> None:
        h = self._handles.get(fh)
        self._release(fh)
        if h is not None:
            self._audit_written(h)  # written after the last flush (mmap)

    def _release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        of = h.of
        of.handles -= 1
        if of.handles > 0:
            return
        try:
            if of.changed and not of.unlinked:
                self.data.commit(of)
        finally:
            del self._open[of.ino]
            if not of.changed and not of.unlinked and self.opened.follower is None:
                # what was just committed: the kernel asks the attributes of
                # a file it wrote by its name right after the close (its own
                # were invalidated by the write), and would open the record
                # the commit sealed (issue 17); a follower's records change
                # under its open files (the writer's), so it keeps none
                self._remember_inode(of.ino, of.inode)
            if len(self._released) > 256:
                self._released.clear()
            self._released[of.ino] = time.monotonic()
            if self.readahead is not None:
                self.readahead.release(of.ino)
            if self.opened.follower is not None:  # rows kept for it while open
                self.index.inline.let_go(of.ino)
            if self._hidden:  # its hidden names lead nowhere now
                for key, hidden in list(self._hidden.items()):
                    if hidden[0] == of.ino:
                        del self._hidden[key]
                        self._knames.gone(*hidden)
            if of.changed:
                # unlinked, or the commit failed (the writer heard of it at
                # close): nothing refers to what was sealed for it any more
                if not of.unlinked:
                    log.warning("inode %d: changes not committed at release are dropped",
                                of.ino)
                self.data.discard(of)
            if of.unlinked:
                self._purge(of.ino)

    # --- extended attributes -------------------------------------------------------------
    @staticmethod
    def _xname(name: str) -> bytes:
        if name.startswith("system."):
            raise NotSupported(name)
        raw = os.fsencode(name)
        if len(raw) > NAME_MAX:
            raise NameTooLong(name)
        return raw

    def require_admin(self, caller: int | None) -> None:
        """The virtual attributes of the mount root answer root and the
        daemon's owner only (``caller``: the uid of the process asking; None
        for calls from inside): verify's report holds paths of files the
        caller may not see, and the status, stats and ops figures are the
        admin's, not every local user's of an ``allow_other`` mount.

        Raises
        ------
        PermissionDenied
            Anyone else (EACCES).
        """
        if caller is not None and caller not in (0, os.getuid()):
            raise PermissionDenied("only root or the mount's owner may do this")

    @_locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0,
                 caller: int | None = None) -> None:
        if name.startswith(fmt.XATTR_PREFIX):  # reserved: only the control command
            if name == fmt.CONTROL_XATTR and path == "/":
                self.require_admin(caller)
                self.control(bytes(value).decode("utf-8", "replace"))
                return
            raise NotSupported(name)
        if self.read_only:
            raise ReadOnlyError("The store is mounted read-only.")
        raw = self._xname(name)
        if len(value) > 65536:
            raise TooBig("xattr value too large")
        with self._write_txn() as txn:
            ino = self._resolve(txn, path)
            exists = txn.get_xattr(ino, raw) is not None
            if flags & XATTR_CREATE and exists:
                raise Exists(name)
            if flags & XATTR_REPLACE and not exists:
                raise NoAttribute(name)
            txn.set_xattr(ino, raw, bytes(value))
            inode = self._inode(txn, ino)
            inode.ctime_ns = self._clock()
            self._put(txn, ino, inode)
        self._knames.changed(ino, path)
        self.data.after_commit([])
        self._audit("setxattr", ino, path, name=name)

    def getxattr(self, path: str, name: str, caller: int | None = None) -> bytes:
        if name.startswith(fmt.XATTR_PREFIX) and name != fmt.FSCK_XATTR:
            return self._virtual_xattr(path, name, caller)
        return self._getxattr(path, name)

    @_locked
    def _getxattr(self, path: str, name: str) -> bytes:
        raw = self._xname(name)
        with self.index.begin() as txn:
            # the kernel asks security.capability before each write of a
            # file (file_remove_privs): by the name it just created or stat'ed
            value = txn.get_xattr(self._resolve_known(txn, path), raw)
        if value is None:
            raise NoAttribute(name)
        return value

    @_status
    def _virtual_xattr(self, path: str, name: str, caller: int | None) -> bytes:
        """The attributes dcmfs answers itself, on the mount root, for root
        and the mount's owner; any other name under the reserved prefix is
        refused."""
        if path != "/" or not (name in (fmt.STATUS_XATTR, fmt.STATS_XATTR)
                               or name.startswith(fmt.VERIFY_XATTR)):
            raise NotSupported(name)
        self.require_admin(caller)
        if name == fmt.STATUS_XATTR:
            return json.dumps(self.live_status(), sort_keys=True).encode()
        if name == fmt.STATS_XATTR:
            return json.dumps(self.content_stats(), sort_keys=True).encode()
        if name == fmt.VERIFY_XATTR:
            job = self.verify_job
            return json.dumps(job.status() if job else {}, sort_keys=True).encode()
        if name.startswith(fmt.VERIFY_XATTR + ":"):
            # a read-only mount refuses setxattr in the kernel: "user.dcmfs.verify:{args}"
            # starts a verify there (the admin's command falls back to it)
            self.control("verify" + name[len(fmt.VERIFY_XATTR) + 1:])
            return b"{}"
        raise NotSupported(name)

    @_locked
    def listxattr(self, path: str) -> list[str]:
        with self.index.begin() as txn:
            names = [os.fsdecode(n) for n in txn.list_xattrs(self._resolve(txn, path))]
        # an attribute under the reserved prefix set by an older dcmfs stays hidden
        return [n for n in names if not n.startswith(fmt.XATTR_PREFIX) or n == fmt.FSCK_XATTR]

    @_mutating
    def removexattr(self, path: str, name: str) -> None:
        if name.startswith(fmt.XATTR_PREFIX) and name != fmt.FSCK_XATTR:
            raise NotSupported(name)
        raw = self._xname(name)
        with self._write_txn() as txn:
            ino = self._resolve(txn, path)
            if not txn.remove_xattr(ino, raw):
                raise NoAttribute(name)
        self._knames.changed(ino, path)
        self.data.after_commit([])
        self._audit("removexattr", ino, path, name=name)
