"""The namespace (a part of the core): directories and names - mkdir, rmdir,
readdir, unlink, rename, link, symlink, readlink, mknod (FIFOs, sockets,
character and block devices).

:class:`NameOps` is mixed into :class:`dcmfs.core.filesystem.FileSystem`;
it uses the FileSystem's index, path resolution and inode helpers.
"""

from __future__ import annotations

import os
import re
import stat
import time

from ..errors import (DcmfsError, DirectoryNotEmpty, Exists, InvalidArgument, IsADirectory,
                      NotADirectory, NotFound)
from ..index import Inode
from .handles import _locked, _mutating
from .links import canonical, moved

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
#: the name libfuse renames an open file to when it is unlinked, or replaced
#: by a rename (``.fuse_hidden`` and 16 hex digits); such a name is reserved:
#: see :meth:`NameOps._hide`
_HIDDEN = re.compile(rb"\.fuse_hidden[0-9a-f]{16}")
#: seconds after a file's last release in which libfuse's hiding rename of
#: it is still taken for the unlink it stands for (see NameOps._hide; the
#: rename comes right after the release, once it has the core's lock)
RELEASE_RACE = 0.5
#: what mknod(2) makes (a directory is mkdir's; the kernel refuses it)
_MKNOD_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG)


class NameOps:
    """Directories and names."""

    # --- directories --------------------------------------------------------------
    @_locked
    def opendir(self, path: str) -> int:
        with self.index.begin() as txn:
            ino = self._resolve_known(txn, path)  # the kernel looked it up just now
            if not stat.S_ISDIR(self._inode(txn, ino).mode):
                raise NotADirectory(path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = ino
        return fh

    @_locked
    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_locked
    def readdir(self, path: str | None, fh: int | None = None) -> list[tuple[str, int]]:
        """Entries of a directory given by open handle or by path."""
        with self.index.begin() as txn:
            if fh is not None and fh in self._dirs:
                ino = self._dirs[fh]
            else:
                ino = self._resolve(txn, path)
            if not stat.S_ISDIR(self._inode(txn, ino).mode):
                raise NotADirectory(path or "")
            return [(os.fsdecode(name), child) for name, child in txn.list_dir(ino)]

    @_mutating
    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        with self._write_txn() as txn:
            parent, name, pinode = self._free_name(txn, path)
            ino, _ = self._new_inode(txn, stat.S_IFDIR | (mode & 0o7777), uid, gid, pinode,
                                     nlink=2)
            txn.add_dirent(parent, name, ino)
            self._touch_dir(txn, parent, pinode, +1)
        self.data.after_commit([])
        self._audit("mkdir", ino, path, mode=mode & 0o7777)

    @_mutating
    def rmdir(self, path: str) -> None:
        with self._write_txn() as txn:
            parent, name, ino, inode = self._entry(txn, path)
            if not stat.S_ISDIR(inode.mode):
                raise NotADirectory(path)
            if not txn.dir_is_empty(ino):
                raise DirectoryNotEmpty(path)
            txn.remove_dirent(parent, name)
            self._delete_inode(txn, ino, inode)
            self._touch_dir(txn, parent, self._inode(txn, parent), -1)
        self.data.after_commit([])
        self._audit("rmdir", ino, path)

    # --- names ----------------------------------------------------------------------
    @_mutating
    def unlink(self, path: str) -> None:
        if self._hidden and self._forget_hidden(path):
            return
        with self._write_txn() as txn:
            parent, name, ino, inode = self._entry(txn, path)
            if stat.S_ISDIR(inode.mode):
                raise IsADirectory(path)
            # a file's name has no names below it: only this path is
            # forgotten, not every name getattr remembered (issue 17)
            leaf = canonical(path)
            txn.remove_dirent(parent, name, leaf=leaf)
            if leaf:
                self._paths.drop(path)
            garbage = self._drop_link(txn, ino, inode)
            self._touch_dir(txn, parent, self._inode(txn, parent))
        self._knames.changed(ino, path)
        self._knames.gone(ino, path)
        self.data.after_commit(garbage)
        self._audit("unlink", ino, path)

    @_mutating
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument("unsupported rename flags")
        if new.rstrip("/").startswith(old.rstrip("/") + "/"):
            raise InvalidArgument("cannot move a directory into itself")
        if not flags and _HIDDEN.fullmatch(os.fsencode(new.rpartition("/")[2])) \
                and self._hide(old, new):
            return
        garbage: list[bytes] = []
        with self._write_txn() as txn:
            op, oname = self._parent(txn, old)
            np, nname = self._parent(txn, new)
            src = txn.lookup(op, oname)
            if src is None:
                raise NotFound(old)
            dst = txn.lookup(np, nname)
            sinode = self._inode(txn, src)
            src_dir = stat.S_ISDIR(sinode.mode)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise NotFound(new)
                dinode = self._inode(txn, dst)
                txn.add_dirent(op, oname, dst)
                txn.add_dirent(np, nname, src)
                if op != np and src_dir != stat.S_ISDIR(dinode.mode):
                    delta = 1 if src_dir else -1
                    self._touch_dir(txn, op, self._inode(txn, op), -delta)
                    self._touch_dir(txn, np, self._inode(txn, np), +delta)
                for ino, inode in ((src, sinode), (dst, dinode)):
                    inode.ctime_ns = self._clock()
                    self._put(txn, ino, inode)
                dst_dir = stat.S_ISDIR(dinode.mode)
            else:
                if dst is not None:
                    if flags & RENAME_NOREPLACE:
                        raise Exists(new)
                    if dst == src:
                        return
                    dinode = self._inode(txn, dst)
                    if stat.S_ISDIR(dinode.mode):
                        if not src_dir:
                            raise IsADirectory(new)
                        if not txn.dir_is_empty(dst):
                            raise DirectoryNotEmpty(new)
                        garbage = self._delete_inode(txn, dst, dinode)
                        self._touch_dir(txn, np, self._inode(txn, np), -1)
                    else:
                        if src_dir:
                            raise NotADirectory(new)
                        garbage = self._drop_link(txn, dst, dinode)
                txn.remove_dirent(op, oname)
                txn.add_dirent(np, nname, src)
                sinode.ctime_ns = self._clock()
                self._put(txn, src, sinode)
                delta = 1 if src_dir and op != np else 0
                self._touch_dir(txn, op, self._inode(txn, op), -delta)
                if np != op:
                    self._touch_dir(txn, np, self._inode(txn, np), +delta)
        if flags & RENAME_EXCHANGE:
            parked = "\0" + old  # no path starts with NUL
            self._renamed(old, parked, src, src_dir)
            self._renamed(new, old, dst, dst_dir)
            self._renamed(parked, new, src, src_dir)
            self._knames.changed(dst, old)
        else:
            if dst is not None:  # replaced: its other names lost a link
                self._knames.changed(dst, new)
                self._knames.gone(dst, new)
            self._renamed(old, new, src, src_dir)
        self._knames.changed(src, new)
        self.data.after_commit(garbage)
        if flags & RENAME_EXCHANGE:
            self._audit("rename", src, old, to=new, exchanged=dst)
        else:
            self._audit("rename", src, old, to=new,
                        **({"replaced": dst} if dst is not None else {}))

    def _renamed(self, old: str, new: str, ino: int, is_dir: bool) -> None:
        """Follow a rename in the kernel's names and the open handles' names."""
        self._knames.renamed(old, new, None if is_dir else ino)
        if is_dir or ino in self._open:
            for h in self._handles.values():
                if h.path is not None and (p := moved(h.path, old, new)) is not None:
                    h.path = p

    # --- names of open files that are gone ----------------------------------------------
    def _hide(self, old: str, new: str) -> bool:
        """libfuse's unlink of an open file, or its rename of another file
        over one: it renames the open file to ``new``, a hidden name, and
        unlinks that at the last close, so that the kernel can still reach
        the file (fstat, fchmod, fgetxattr of the open descriptor).  Here
        it *is* the unlink (journaled now: the file is an orphan, gone after
        a crash), and ``new`` only a name in memory by which the open file
        is reached until its last release.  False if ``old`` is not an
        open file (nor one released in the last ``RELEASE_RACE`` seconds):
        an ordinary rename then."""
        with self._write_txn() as txn:
            op, oname, ino, inode = self._entry(txn, old)
            np, nname = self._parent(txn, new)
            # closed a moment ago: libfuse found it open while its release
            # was being served on another of its threads; it meant an unlink
            # (an ordinary rename would leave a .fuse_hidden file for good)
            closed = ino not in self._open
            if closed and time.monotonic() - self._released.get(ino, -60.0) > RELEASE_RACE \
                    or stat.S_ISDIR(inode.mode) or txn.lookup(np, nname) is not None:
                return False
            txn.remove_dirent(op, oname)
            garbage = self._drop_link(txn, ino, inode)
            self._touch_dir(txn, op, self._inode(txn, op))
        if closed:
            self._knames.changed(ino, old)
            self._knames.gone(ino, old)
        else:
            self._hidden[(np, nname)] = (ino, new)
            self._renamed(old, new, ino, False)  # the kernel keeps its inode as ``new``
            self._knames.changed(ino, new)
        self.data.after_commit(garbage)
        self._audit("unlink", ino, old, **({} if closed else {"open": True}))
        return True

    def _forget_hidden(self, path: str) -> bool:
        """libfuse's unlink of a hidden name after the last close: nothing is
        left to do but forgetting the name (the release purged the file)."""
        with self.index.begin() as txn:
            key = self._parent(txn, path)
        hidden = self._hidden.pop(key, None)
        if hidden is not None:
            self._knames.gone(*hidden)
        return hidden is not None

    def _resolve_known(self, txn, path: str) -> int:
        """``_resolve`` for getattr, remembered while no directory entry is
        removed or replaced (:attr:`Index.names_gen`): the kernel asks the
        attributes of a name it just created, wrote or whose directory
        changed by the name's path each time (measured, issue 17: two
        sealed entries opened per GETATTR of /dir/file).  A hidden name
        (libfuse's, of an open unlinked file) is never remembered, nor a
        path in another spelling than ``/a/b`` (an unlink forgets the name
        it removed by that spelling: :meth:`unlink`).  A name not known
        yet is looked up in its directory, which is resolved (and
        remembered) so too: the kernel's LOOKUP of a name about to be
        created, a create or an unlink in a known directory open one
        entry, not one per component of the path (issue 17)."""
        gen = self.index.names_gen
        below: list[tuple[str, str]] = []  # (path, its last name) under the known one
        # up to the nearest remembered directory (a loop, not a recursion:
        # a tree a thousand directories deep is a path of 2 000 bytes)
        while (ino := self._paths.get(gen, path)) is None:
            head, _, last = path.rpartition("/")
            if not (head and last):
                ino = self._resolve(txn, path)
                self._remember(gen, path, ino)
                break
            below.append((path, last))
            path = head
        for path, last in reversed(below):
            ino = self._step(txn, ino, last, path)
            self._remember(gen, path, ino)
        return ino

    def _remember(self, gen: int, path: str, ino: int) -> None:
        if not self._hidden and canonical(path):
            self._paths.put(gen, path, ino)

    def hidden(self, path: str | None, fh: int | None = None) -> bool:
        """Is ``path`` (or the name the handle ``fh`` was opened by) the
        hidden name of an open, unlinked file?  (libfuse takes one off the
        nlink it reports for it: the adapter adds it back.)"""
        if not self._hidden:
            return False
        if path is None:
            h = self._handles.get(fh)
            path = h.path if h is not None else None
        if path is None or not _HIDDEN.fullmatch(os.fsencode(path.rpartition("/")[2])):
            return False
        with self._lock, self.index.begin() as txn:
            try:
                return self._parent(txn, path) in self._hidden
            except DcmfsError:
                return False

    @_mutating
    def link(self, existing: str, new: str) -> None:
        with self._write_txn() as txn:
            ino = self._resolve(txn, existing)
            inode = self._inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise IsADirectory(existing)
            parent, name, pinode = self._free_name(txn, new)
            txn.add_dirent(parent, name, ino)
            inode.nlink += 1
            inode.ctime_ns = self._clock()
            self._put(txn, ino, inode)
            self._touch_dir(txn, parent, pinode)
        # the kernel inode of ``existing`` holds nlink and ctime of before
        self._knames.seen(ino, existing)
        self._knames.changed(ino, new)
        self._knames.seen(ino, new)
        self.data.after_commit([])
        self._audit("link", ino, existing, to=new)

    @_mutating
    def symlink(self, path: str, target: str, uid: int, gid: int) -> None:
        with self._write_txn() as txn:
            parent, name, pinode = self._free_name(txn, path)
            ino, _ = self._new_inode(txn, stat.S_IFLNK | 0o777, uid, gid, pinode,
                                     target=os.fsencode(target))
            txn.add_dirent(parent, name, ino)
            self._touch_dir(txn, parent, pinode)
        self.data.after_commit([])
        self._audit("symlink", ino, path, target=target)

    @_mutating
    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
        """mknod(2): a FIFO, a socket (bind(2) of an AF_UNIX socket), a
        character or block device (its ``rdev`` kept in the inode record,
        see :attr:`Inode.rdev`) or an empty regular file.  The kernel has
        checked the caller's right to make devices."""
        kind = stat.S_IFMT(mode)
        if kind not in _MKNOD_TYPES:
            raise InvalidArgument(path)
        target = Inode.device_target(rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else b""
        with self._write_txn() as txn:
            parent, name, pinode = self._free_name(txn, path)
            ino, _ = self._new_inode(txn, kind | (mode & 0o7777), uid, gid, pinode,
                                     target=target)
            txn.add_dirent(parent, name, ino)
            self._touch_dir(txn, parent, pinode)
            if kind == stat.S_IFREG:
                txn.add_stats(files=1)
        self.data.after_commit([])
        self._audit("mknod", ino, path, mode=mode)

    @_locked
    def readlink(self, path: str) -> str:
        with self.index.begin() as txn:
            inode = self._inode(txn, self._resolve(txn, path))
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument(path)
        return os.fsdecode(inode.target)
