"""The write-only ingest filesystem (``dcmfs mount -o recipient=FILE``).

A node holding only the store's recipient public key (a DICOM receiver in a
DMZ) serves this instead of :class:`~dcmfs.core.filesystem.FileSystem`: it
never opens the index (it cannot: no key) and never takes the store lock
(a key holder may have the store mounted meanwhile).  What it shows:

* the tree it created during this mount, kept in memory: directories and
  files, their names, modes, owners, times and sizes; nothing of the
  store's other files, nor of earlier ingest mounts;
* a file being written can be written (sequentially; bytes already sealed,
  one chunk behind the end, cannot be rewritten: EACCES), never read;
* a closed file cannot be opened again, for reading or writing (EACCES);
  it can be renamed, have its mode or times changed, or be unlinked (its
  inbox record is written again, or removed) until it is *handed over*,
  ``handover_after`` after its close (60 s): its record is then written a
  last time, marked final, and a key holder imports it while this mount
  goes on; the mount refuses to rename, change or delete it from then on
  (EACCES).  A mount that ends hands over every file it closed.

Each file has a random data key; its chunks are sealed with it into the
session's inbox directory as they fill (:mod:`dcmfs.storage.inbox`); at
close, and at fsync, every chunk is made durable, then the file's record
(its path, metadata, chunk list and data key) is encapsulated to the
recipient and written with the durable-write helper.  Empty directories
are not recorded: the key holder creates directories as the paths of the
files it imports need them.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
import threading
import time

from ..errors import (DirectoryNotEmpty, Exists, InvalidArgument, IsADirectory, NoAttribute,
                      NotADirectory, NotFound, NotSupported, PermissionDenied, BadHandle)
from ..storage import inbox
from ..storage.durable import fsync_dir
from .ingestfile import File, Node, Sealer, new_session

log = logging.getLogger("dcmfs.ingest")

NAME_MAX = 255


class _Opened:
    """Stands in for the opened store the FUSE adapter asks about."""

    audit = None



class IngestFS:
    """The core of a write-only ingest mount (the FUSE adapter drives it)."""

    concurrent_requests = True

    def __init__(self, store_root: str, recipient: inbox.Recipient, config,
                 clock=time.time_ns) -> None:
        self.store = type("IngestStore", (), {"root": store_root,
                                              "chunk_size": recipient.chunk_size})()
        self.config = config
        self.opened = _Opened()
        self.recipient = recipient
        self.session, self.dir, self._lock_fd = new_session(
            os.path.join(store_root, inbox.INBOX_DIR))
        self._sealer = Sealer(recipient, self.session, self.dir)
        self._clock = clock
        self._lock = threading.RLock()
        self._next_ino = 2
        self.root = Node(1, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), clock())
        self._handles: dict[int, File] = {}
        self._flushed: set[int] = set()
        self._dirs: dict[int, Node] = {}
        self._next_fh = 1
        self.stale_names: list[str] = []
        self.caller = None
        self.files_written = 0
        self.handed_over = 0
        #: closed files in the order of their close, not handed over yet
        self._closed: collections.deque[File] = collections.deque()
        self._stop = threading.Event()
        self._handover = None
        if config.handover_after > 0:
            self._handover = threading.Thread(target=self._handover_loop, daemon=True,
                                              name="dcmfs-handover")
            self._handover.start()
        log.info("ingest session %s started (write-only, recipient %s)", self.session.hex()[:8],
                 recipient.kind)

    # --- hand-over ----------------------------------------------------------
    def _handover_loop(self) -> None:
        period = max(0.1, min(self.config.handover_after / 4, 10.0))
        while not self._stop.wait(period):
            try:
                self.hand_over_due()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("handing files over to the key holders failed")

    def hand_over_due(self) -> int:
        """Hand over the files closed ``handover_after`` ago or more; returns
        how many."""
        due = []
        limit = time.monotonic() - self.config.handover_after
        with self._lock:
            while self._closed and self._closed[0].closed_at <= limit:
                node = self._closed.popleft()
                if not node.unlinked and not node.handed:
                    node.handed = True
                    due.append(node)
        for node in due:  # outside the lock, as a close
            self._sealer.hand_over(node)
        with self._lock:
            self.handed_over += len(due)
        return len(due)

    @staticmethod
    def _changeable(node: Node, tree: bool = False) -> None:
        """EACCES for a file handed over (with ``tree``: or a directory
        holding one, for a rename)."""
        if getattr(node, "handed", False):
            raise PermissionDenied()
        if tree and node.children is not None:
            for child in node.children.values():
                IngestFS._changeable(child, True)

    # --- names --------------------------------------------------------------
    @staticmethod
    def _parts(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in self._parts(path):
            if node.children is None:
                raise NotADirectory()
            node = node.children.get(part)
            if node is None:
                raise NotFound()
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        parts = self._parts(path)
        if not parts:
            raise Exists()
        parent = self._lookup("/".join(parts[:-1]))
        if parent.children is None:
            raise NotADirectory()
        if len(os.fsencode(parts[-1])) > NAME_MAX:
            from ..errors import NameTooLong
            raise NameTooLong()
        return parent, parts[-1]

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino - 1

    def hidden(self, path, fh=None) -> bool:
        return False

    def _stat(self, node: Node) -> dict:
        size = node.size if isinstance(node, File) else 0
        return {"st_ino": node.ino, "st_mode": node.mode,
                "st_nlink": 2 + sum(c.children is not None for c in node.children.values())
                if node.children is not None else (0 if getattr(node, "unlinked", False) else 1),
                "st_uid": node.uid, "st_gid": node.gid, "st_size": size,
                "st_blocks": -(-size // 512), "st_blksize": self.recipient.chunk_size,
                "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime}

    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        with self._lock:
            if fh is not None and fh in self._handles:
                return self._stat(self._handles[fh])
            if path is None and fh in self._dirs:
                return self._stat(self._dirs[fh])
            return self._stat(self._lookup(path or "/"))

    def opendir(self, path: str) -> int:
        with self._lock:
            node = self._lookup(path)
            if node.children is None:
                raise NotADirectory()
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = node
            return fh

    def releasedir(self, fh: int) -> None:
        with self._lock:
            self._dirs.pop(fh, None)

    def readdir(self, path: str | None, fh: int | None = None) -> list[tuple[str, int]]:
        with self._lock:
            node = self._dirs[fh] if path is None and fh in self._dirs else self._lookup(path)
            if node.children is None:
                raise NotADirectory()
            return [(name, child.ino) for name, child in node.children.items()]

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        with self._lock:
            parent, name = self._parent(path)
            if name in parent.children:
                raise Exists()
            parent.children[name] = Node(self._new_ino(), stat.S_IFDIR | (mode & 0o7777), uid,
                                          gid, self._clock())
            parent.mtime = parent.ctime = self._clock()

    def rmdir(self, path: str) -> None:
        with self._lock:
            parent, name = self._parent(path)
            node = parent.children.get(name)
            if node is None:
                raise NotFound()
            if node.children is None:
                raise NotADirectory()
            if node.children:
                raise DirectoryNotEmpty()
            del parent.children[name]

    def unlink(self, path: str) -> None:
        with self._lock:
            parent, name = self._parent(path)
            node = parent.children.get(name)
            if node is None:
                raise NotFound()
            if node.children is not None:
                raise IsADirectory()
            self._changeable(node)
            del parent.children[name]
            node.unlinked = True
            if node.opens == 0:
                self._sealer.discard(node)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~1:  # RENAME_NOREPLACE only
            raise InvalidArgument()
        with self._lock:
            oparent, oname = self._parent(old)
            node = oparent.children.get(oname)
            if node is None:
                raise NotFound()
            nparent, nname = self._parent(new)
            there = nparent.children.get(nname)
            if there is node:
                return
            self._changeable(node, tree=True)
            if there is not None:
                self._changeable(there)
            if node.children is not None and \
                    self._parts(new)[:len(self._parts(old))] == self._parts(old):
                raise InvalidArgument()  # not into itself
            if there is not None:
                if flags & 1:
                    raise Exists()
                if there.children is not None:
                    if node.children is None:
                        raise IsADirectory()
                    if there.children:
                        raise DirectoryNotEmpty()
                elif node.children is not None:
                    raise NotADirectory()
                else:
                    there.unlinked = True
                    if there.opens == 0:
                        self._sealer.discard(there)
            del oparent.children[oname]
            nparent.children[nname] = node
            node.ctime = self._clock()
            self._republish(node, "/" + "/".join(self._parts(new)))

    def _republish(self, node: Node, path: str) -> None:
        """A closed file's record written again (its path or metadata changed)."""
        if isinstance(node, File):
            node.path = path
            if node.opens == 0 and node.issued:  # closed: its record written again
                self._sealer.publish(node)
            return
        for name, child in node.children.items():
            self._republish(child, f"{path.rstrip('/')}/{name}")

    def link(self, existing: str, new: str) -> None:
        raise NotSupported()

    def symlink(self, path: str, target: str, uid: int, gid: int) -> None:
        raise NotSupported()

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
        raise NotSupported()

    def readlink(self, path: str) -> str:
        raise InvalidArgument()

    # --- metadata -----------------------------------------------------------
    def _node(self, path, fh) -> Node:
        if fh is not None and fh in self._handles:
            return self._handles[fh]
        return self._lookup(path or "/")

    def _meta_changed(self, node: Node) -> None:
        """After a change the caller checked with :meth:`_changeable`."""
        node.ctime = self._clock()
        if isinstance(node, File) and node.opens == 0 and node.issued and not node.unlinked:
            self._sealer.publish(node)

    def chmod(self, path, mode: int, fh=None) -> None:
        with self._lock:
            node = self._node(path, fh)
            self._changeable(node)
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            self._meta_changed(node)

    def chown(self, path, uid: int, gid: int, fh=None) -> None:
        with self._lock:
            node = self._node(path, fh)
            self._changeable(node)
            node.uid = node.uid if uid == -1 else uid
            node.gid = node.gid if gid == -1 else gid
            self._meta_changed(node)

    def utimens(self, path, atime_ns, mtime_ns, fh=None) -> None:
        now = self._clock()
        with self._lock:
            node = self._node(path, fh)
            self._changeable(node)
            node.atime = now if atime_ns is None else atime_ns
            node.mtime = now if mtime_ns is None else mtime_ns
            self._meta_changed(node)

    def statfs(self) -> dict:
        st = os.statvfs(self.store.root)
        return {"f_bsize": st.f_bsize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks,
                "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_files": st.f_files,
                "f_ffree": st.f_ffree, "f_favail": st.f_favail, "f_namemax": NAME_MAX}

    def setxattr(self, *args, **kwargs) -> None:
        raise NotSupported()

    def getxattr(self, path, name, caller=None) -> bytes:
        """Only the root's status attribute (``dcmfs status``, ``dcmfs
        umount``): the daemon's pid, its session, counts and sizes."""
        from ..format import STATUS_XATTR
        if path != "/" or name != STATUS_XATTR:
            raise NoAttribute()
        with self._lock:
            files = [n for n in self._walk(self.root) if isinstance(n, File)]
            status = {"pid": os.getpid(), "files": len(files),
                      "logical_bytes": sum(f.size for f in files),
                      "stored_bytes": sum(c[2] for f in files for c in f.chunks),
                      "write_only": {"session": self.session.hex(),
                                     "recipient": self.recipient.kind,
                                     "open_files": sum(f.opens > 0 for f in files),
                                     "handed_over": self.handed_over}}
        return json.dumps(status).encode()

    def _walk(self, node: Node):
        yield node
        for child in (node.children or {}).values():
            yield from self._walk(child)

    def listxattr(self, path) -> list[str]:
        return []

    def removexattr(self, path, name) -> None:
        raise NoAttribute()

    def require_admin(self, caller) -> None:
        raise PermissionDenied()

    # --- contents -----------------------------------------------------------
    def create(self, path: str, mode: int, flags: int, uid: int, gid: int) -> int:
        with self._lock:
            parent, name = self._parent(path)
            if name in parent.children:
                raise Exists()  # the kernel asks open() for names it knows
            node = File(self._new_ino(), stat.S_IFREG | (mode & 0o7777), uid, gid,
                         self._clock(), "/" + "/".join(self._parts(path)))
            parent.children[name] = node
            parent.mtime = parent.ctime = node.mtime
            return self._new_handle(node)

    def _new_handle(self, node: File) -> int:
        node.opens += 1
        node.live += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        return fh

    def open(self, path: str, flags: int) -> int:
        """Only a file still open for writing takes another writer; a closed
        file, and reading anything, is refused (EACCES)."""
        with self._lock:
            node = self._lookup(path)
            if node.children is not None:
                raise IsADirectory()
            if node.live == 0 or flags & os.O_ACCMODE != os.O_WRONLY:
                raise PermissionDenied()  # closed (by close(2), even before release)
            if flags & os.O_TRUNC:
                self._truncate(node, 0)
            return self._new_handle(node)

    def _file(self, fh: int) -> File:
        node = self._handles.get(fh)
        if node is None:
            raise BadHandle()
        return node

    def read(self, fh: int, size: int, offset: int, ahead: bool = True) -> bytes:
        raise PermissionDenied()

    def write(self, fh: int, data: bytes, offset: int) -> int:
        with self._lock:
            node = self._file(fh)
            if offset < node.tail_start:
                raise PermissionDenied()  # sealed already: write-only means append-mostly
            pos = offset - node.tail_start
            if pos > len(node.tail):
                node.tail.extend(bytes(pos - len(node.tail)))
            node.tail[pos:pos + len(data)] = data
            node.mtime = node.ctime = self._clock()
            chunk = self.recipient.chunk_size
            while len(node.tail) > chunk:
                self._sealer.seal(node, chunk)
            return len(data)

    def truncate(self, path, length: int, fh=None) -> None:
        with self._lock:
            node = self._node(path, fh)
            if node.children is not None:
                raise IsADirectory()
            if node.live == 0 and fh is None:
                raise PermissionDenied()  # a closed file
            self._truncate(node, length)

    def _truncate(self, node: File, length: int) -> None:
        if length < node.tail_start:
            raise PermissionDenied()
        pos = length - node.tail_start
        if pos <= len(node.tail):
            del node.tail[pos:]
        else:
            node.tail.extend(bytes(pos - len(node.tail)))
        node.mtime = node.ctime = self._clock()

    def fallocate(self, fh, mode, offset, length) -> None:
        raise NotSupported()

    def flush(self, fh: int) -> None:
        """close(2): from now on the file counts as closed for open()."""
        with self._lock:
            node = self._file(fh)
            if fh not in self._flushed:
                self._flushed.add(fh)
                node.live -= 1

    def fsync(self, fh: int, datasync: bool = False) -> None:
        """What was written so far is in the inbox, durably, as the file's
        record says (the key holder imports it even if the mount dies)."""
        with self._lock:
            node = self._file(fh)
            if node.tail:
                self._sealer.seal(node, len(node.tail))
            if node.unlinked:
                return
            job = self._sealer.prepare(node)
        self._sealer.commit(node, job)  # other requests go on meanwhile

    def sync_all(self) -> None:
        """Every record is durable when written (fsyncdir has nothing left)."""

    def release(self, fh: int) -> None:
        with self._lock:
            node = self._handles.pop(fh, None)
            if node is None:
                return
            if fh in self._flushed:
                self._flushed.discard(fh)
            else:
                node.live -= 1
            node.opens -= 1
            if node.opens:
                return
            if node.unlinked:
                self._sealer.discard(node)
                return
            self.files_written += 1
        # outside the lock: the next files are created and written while
        # this one's last chunk is sealed and its chunks and record are made
        # durable (a rename or unlink of it meanwhile waits for that)
        self._sealer.close(node)
        with self._lock:
            if not node.unlinked:
                self._closed.append(node)

    def close(self) -> None:
        """Unmount: files still open are closed as if released."""
        self._stop.set()
        if self._handover is not None:
            self._handover.join()
        with self._lock:
            for fh in list(self._handles):
                self.release(fh)
            fsync_dir(self.dir)
            os.close(self._lock_fd)
        log.info("ingest session %s ended: %d files written", self.session.hex()[:8],
                 self.files_written)
