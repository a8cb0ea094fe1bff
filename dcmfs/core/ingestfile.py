"""One file of a write-only ingest mount (:mod:`dcmfs.core.ingest`): the
in-memory tree's nodes, and how a file's chunks and record are sealed into
the inbox session (:mod:`dcmfs.storage.inbox`)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
import time

from ..errors import StoreIOError
from ..storage import inbox
from ..storage.durable import fsync_dir, write_file, write_new


class Node:
    __slots__ = ("ino", "mode", "uid", "gid", "atime", "mtime", "ctime", "children")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int) -> None:
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.atime = self.mtime = self.ctime = now
        self.children: dict[str, Node] | None = {} if stat.S_ISDIR(mode) else None


class File(Node):
    __slots__ = ("file_id", "key", "chunks", "tail", "tail_start", "opens", "live", "seq",
                 "unsynced", "unlinked", "path", "issued", "plock", "closed_at", "handed")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int, path: str) -> None:
        super().__init__(ino, mode, uid, gid, now)
        self.file_id = os.urandom(16)
        self.key = os.urandom(32)
        #: [object id, plain length, stored length, SHA-256] of each sealed chunk
        self.chunks: list[list] = []
        self.tail = bytearray()
        self.tail_start = 0
        self.opens = 0
        #: handles not closed yet by their process (close(2) flushes at
        #: once; the kernel's release comes later, asynchronously)
        self.live = 0
        self.seq = 0  # the record last written (0: none yet)
        self.issued = 0  # the last record prepared (see Sealer.prepare)
        #: held while the file's inbox files change (a record is written
        #: outside the filesystem's lock: releases of several files overlap)
        self.plock = threading.RLock()
        self.unsynced: list[str] = []
        self.unlinked = False
        self.path = path
        #: monotonic time its record was last written closed (None: open)
        self.closed_at: float | None = None
        #: handed over to the key holders: its last record says ``final``,
        #: and the mount never changes it again
        self.handed = False

    @property
    def size(self) -> int:
        return self.tail_start + len(self.tail)


class Sealer:
    """Seals the files of one ingest session into its inbox directory."""

    def __init__(self, recipient: inbox.Recipient, session: bytes, directory: str) -> None:
        self.recipient, self.session, self.dir = recipient, session, directory

    def seal(self, node: File, length: int) -> None:
        plain = bytes(node.tail[:length])
        index = len(node.chunks)
        blob = inbox.seal_chunk(node.key, self.recipient.store_id, self.session, node.file_id,
                                index, plain)
        oid = os.urandom(16).hex()
        path = os.path.join(self.dir, oid + ".obj")
        write_new(path, blob)
        node.unsynced.append(path)
        node.chunks.append([oid, len(plain), len(blob), hashlib.sha256(plain).hexdigest()])
        del node.tail[:length]
        node.tail_start += length

    def publish(self, node: File) -> None:
        """:meth:`prepare` and :meth:`commit` at once."""
        self.commit(node, self.prepare(node))

    def prepare(self, node: File) -> tuple:
        """The file's record as of now (the caller holds the filesystem's
        lock, or the file's own, ``plock``, once it is closed); :meth:`commit`
        writes it, with or without the filesystem's lock."""
        with node.plock:
            return self._prepare(node)

    def _prepare(self, node: File) -> tuple:
        record = {"path": node.path, "mode": node.mode, "uid": node.uid, "gid": node.gid,
                  "atime_ns": node.atime, "mtime_ns": node.mtime, "size": node.size,
                  "key": node.key.hex(), "chunks": [list(c) for c in node.chunks]}
        if node.handed:
            record["final"] = True
        paths, node.unsynced = node.unsynced, []
        node.issued += 1
        return node.issued, paths, record

    def commit(self, node: File, job: tuple) -> None:
        """Make the chunks durable (each fsynced), then the record (the
        durable-write helper); the previous record is removed after.  A
        record older than one committed already, or of a file unlinked
        meanwhile, is not written."""
        seq, paths, record = job
        blob = inbox.seal_record(self.recipient, self.session, node.file_id, seq, record)
        with node.plock:
            try:
                for path in paths:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:  # discarded meanwhile
                        continue
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if node.unlinked or seq < node.seq:
                    return
                write_file(os.path.join(self.dir, inbox.record_name(node.file_id, seq)), blob)
            except OSError as exc:
                raise StoreIOError(f"Writing to the inbox failed ({exc.strerror}).") from exc
            old, node.seq = node.seq, seq
            if old:
                self.remove(os.path.join(self.dir, inbox.record_name(node.file_id, old)))

    def close(self, node: File) -> None:
        """A file's last handle was released (the caller set this under the
        filesystem's lock, then let it go): its last chunk sealed and its
        record written, under the file's own lock only, so that the next
        files are created and written meanwhile."""
        with node.plock:
            if node.unlinked:
                return  # unlink discards it
            if node.tail or not node.chunks:
                self.seal(node, len(node.tail))
            self.commit(node, self._prepare(node))
            node.closed_at = time.monotonic()

    def hand_over(self, node: File) -> None:
        """The closed file's record written again, ``final``: a key holder
        imports it while the mount goes on.  The caller set ``node.handed``
        under the filesystem's lock (nothing changes the file after)."""
        with node.plock:
            if not node.unlinked:
                self.commit(node, self._prepare(node))

    def discard(self, node: File) -> None:
        """An unlinked file's inbox files go (its record first: a record never
        names a chunk that is gone).  The caller set ``node.unlinked``."""
        with node.plock:
            if node.seq:
                self.remove(os.path.join(self.dir, inbox.record_name(node.file_id, node.seq)))
            for oid, *_ in node.chunks:
                self.remove(os.path.join(self.dir, oid + ".obj"))
            node.chunks.clear()
            node.unsynced.clear()

    @staticmethod
    def remove(path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StoreIOError(f"Removing an inbox file failed ({exc.strerror}).") from exc


def new_session(base: str, tries: int = 5) -> tuple[bytes, str, int]:
    """A new session directory under ``base``, locked: made under a name the
    importer skips (``.<session>``), locked, then put in place; a key holder
    removes only sessions whose lock is free.  A key holder's sweep of
    unplaced sessions may remove it in the instant before it is locked: then
    a new session is made."""
    for attempt in range(tries):
        session = os.urandom(16)
        making = os.path.join(base, "." + session.hex())
        final = os.path.join(base, session.hex())
        os.makedirs(making, mode=0o700)
        fd = -1
        try:
            fd = os.open(os.path.join(making, "lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(making, final)
            if os.fstat(fd).st_ino != os.stat(os.path.join(final, "lock")).st_ino:
                raise FileNotFoundError("the lock was swept")  # a new one
        except FileNotFoundError:  # swept meanwhile
            if fd >= 0:
                os.close(fd)
            if attempt == tries - 1:
                raise
            continue
        fsync_dir(base)
        fsync_dir(os.path.dirname(base))
        return session, final, fd
    raise AssertionError("unreachable")
