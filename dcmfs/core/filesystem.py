"""The filesystem core: POSIX semantics on top of the index and the objects.

It knows nothing of FUSE: paths come in as ``str``, results go out as plain
values and failures as :mod:`dcmfs.errors` exceptions, so every operation is
testable without a kernel (S3QL drives its Operations class the same way).
The FUSE adapter calls it from several threads at once (libfuse's
multi-threaded loop) and background jobs call in too: one lock serialises
them, and an operation that can take long (fsync) does its long part
outside it, so no request holds the others (see ``FileOps.fsync``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from typing import Callable

from .. import format as fmt
from ..config import Config
from ..errors import DcmfsError, Exists, NameTooLong, NotADirectory, NotFound, loggable
from ..index import Inode
from ..index.schema import SECRET_LEN
from ..opened.recovery import RecoveryReport, delete_file
from ..opened.store import OpenedStore
from ..sandbox.pool import BACKGROUND_NICE, ParserPool
from ..storage import codec as codecs
from ..storage.digest import tree_digest
from ..storage.header import Store
from .contents import FileData
from .openfile import OpenFile
from .readahead import ReadAhead
from .control import StoreOps
from .handles import NAME_MAX, FileOps, Handle, _locked, _mutating
from .links import KernelNames
from .links import PathCache
from .names import NameOps
from .host import JobHostOps
from .importer import import_inbox
from .syncloops import SyncLoops
from .deidrecords import RecordFiller
from .reencoder import Reencoder
from .scrub import Scrubber, VerifyJob

log = logging.getLogger("dcmfs.fs")

#: the digest of an empty file
EMPTY_DIGEST = tree_digest(0, [])
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _split(path: str) -> tuple[str, bytes]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", os.fsencode(name)


class FileSystem(NameOps, FileOps, StoreOps, JobHostOps, SyncLoops):
    """One opened store, ready to serve filesystem operations.

    ``store`` is an :class:`~dcmfs.opened.store.OpenedStore` (the
    filesystem takes it over and closes it) or a
    :class:`~dcmfs.storage.header.Store` with its key unwrapped (opened here
    with ``config``).  The filesystem adds POSIX semantics, the open-file
    tables and the background jobs; the store's lifecycle (checks, the
    unclean-store procedure, checkpoints) belongs to the opened store.
    """

    #: may the adapter call in from several threads at once? (every
    #: operation takes the core's lock; fsync leaves it for its long part)
    concurrent_requests = True

    def __init__(self, store: Store | OpenedStore, config: Config | None = None,
                 clock: Callable[[], int] = time.time_ns):
        opened = store if isinstance(store, OpenedStore) else OpenedStore(store, config)
        self.opened = opened
        self.store = opened.store
        self.config = config = config or opened.config
        self.read_only = config.read_only
        self._clock = clock
        self._lock = opened.lock
        self._stop = opened.stopping
        self.closed = False
        self.store_lock = opened.store_lock
        self.objects = opened.objects
        self.index = opened.index
        self.chunk_size = opened.chunk_size
        self.general_codec = opened.general_codec
        try:
            self._setup(config)
        except BaseException:
            # nothing may stay open: LMDB forbids opening one environment twice
            self._stop.set()
            for name in ("reencoder", "scrubber", "deid_filler"):
                job = getattr(self, name, None)
                if job is not None:
                    job.stop() if name == "reencoder" else job.join()
            if hasattr(self, "data"):
                self.data.shutdown()
            opened.close()
            raise

    def _setup(self, config: Config) -> None:
        self.data = FileData(self.index, self.objects, self.chunk_size, self.general_codec,
                             config.workers, config.max_inflight, config.dirty_limit,
                             config.read_cache_bytes, read_ahead=8 if self.opened.remote else 2)
        self.data.on_damage = self.damaged
        if self.opened.follower is not None:  # the writer's changes came in
            self.opened.follower.on_applied = lambda: (self._inodes.clear(), self._paths.clear())
            self.opened.follower.held = lambda: {i: f.oids() for i, f in self._open.items()}
        #: read-ahead across the files of a directory: an S3 store fetches
        #: and decodes, a local one decodes
        remote = self.opened.remote is not None
        self.readahead = ReadAhead(
            self.index, self.objects, self.chunk_size, self._resolve, self._inode,
            decode=None if remote else self.data.decode_ahead,
            decode_fetched=self.data.decode_ahead if remote else None)
        self._open: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, int] = {}
        self._next_fh = 1
        self._inodes: dict[int, Inode] = {}
        self._secrets = fmt.FILE_SECRETS_FEATURE in self.store.features
        #: (parent ino, name) -> (ino, path): libfuse's hidden names of open
        #: files that were unlinked (see NameOps._hide); in memory only
        self._hidden: dict[tuple[int, bytes], tuple[int, str]] = {}
        self._paths = PathCache()  # names getattr resolved (see NameOps._resolve_known)
        #: ino -> monotonic time of its last release (see NameOps._hide)
        self._released: dict[int, float] = {}
        self._knames = KernelNames()
        self.recovered: RecoveryReport | None = None
        self._syncer: threading.Thread | None = None
        #: set to have the checkpoint thread checkpoint now (see _maybe_checkpoint)
        self._checkpoint_due = threading.Event()
        self.reencoder: Reencoder | None = None
        self.scrubber: Scrubber | None = None
        self.verify_job: VerifyJob | None = None
        self._local = threading.local()
        #: ``dcmfs key rotate --finish`` on the mounted store (core.rekey)
        self.rekey_job = None
        self.deid_filler: RecordFiller | None = None
        if not config.read_only:
            self.recovered = self.opened.start_session(self._clock, self._delete_inode)
            self.opened.open_audit()  # after the replay: it resumes from the index's head
            self.opened.start_publishing()  # S3: the journal for read-only followers
            self.checkpoint()
            # always there for 'recompress'; it runs by itself with -o reencode=1
            # background work: its workers run at a lower priority than the
            # daemon (measured: starting two during a CT ingest cost 15 % of it)
            parsers = ParserPool(config.reencode_threads, config.parser_memory,
                                 config.parser_timeout, nice=BACKGROUND_NICE) \
                if config.sandbox else None
            self.reencoder = Reencoder(self, config.backlog_limit, dicom_aware=config.dicom,
                                       parsers=parsers,
                                       window=config.reencode_threads,
                                       hot_days=config.hot_days)
            self.data.on_deferred = self.reencoder.deferred
            self.data.on_discarded = self.reencoder.release
            if config.reencode:
                if self.data.codec != codecs.NONE:
                    self.data.may_defer = self.reencoder.reserve
                self.data.queue_all = config.dicom
                self.reencoder.start()
            if parsers is not None and config.dicom:  # what the de-identified view lists
                self.deid_filler = RecordFiller(self, parsers)
                self.deid_filler.start()
            if config.scrub_interval > 0:
                self.scrubber = Scrubber(self, config.scrub_interval, config.scrub_rate)
            if config.checkpoint_interval > 0:
                self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                                name="dcmfs-checkpoint")
                self._syncer.start()
            self.imported = import_inbox(self)  # what write-only mounts left (core.importer)
        elif self.opened.open_audit() is not None and config.checkpoint_interval > 0:
            # read-only: the trail alone is written; made durable as often
            self._syncer = threading.Thread(target=self._audit_sync_loop, daemon=True,
                                            name="dcmfs-audit-sync")
            self._syncer.start()

    @property
    def caller(self) -> tuple[int, int, int] | None:
        """(uid, gid, pid) of the request this thread serves: the FUSE
        adapter sets it before each call; None for calls from inside (the
        daemon itself).  Per thread: requests are served concurrently."""
        return getattr(self._local, "caller", None)

    @caller.setter
    def caller(self, value: tuple[int, int, int] | None) -> None:
        self._local.caller = value

    @property
    def stale_names(self) -> list[str]:
        """Names whose kernel caches this thread's last operation made stale
        (the other names of a hard-linked file it changed): the FUSE adapter
        has the kernel drop them before it answers, and empties the list."""
        return self._knames.stale

    # --- durability -----------------------------------------------------------------
    def make_durable(self) -> None:
        """Every committed operation survives a power loss from now on."""
        self.opened.make_durable()

    def checkpoint(self, delete_later: bool = False, synced_at: int | None = None) -> None:
        """Commit the index durably, then delete superseded objects (and take
        a snapshot when the journal archive has grown: see
        :meth:`OpenedStore.checkpoint`, also for ``synced_at``);
        ``delete_later``: only set them aside, for
        :meth:`FileData.delete_set_aside` without the lock."""
        self.opened.checkpoint(after_commit=self.data.set_aside if delete_later
                               else self.data.checkpointed, synced_at=synced_at)

    def snapshot(self) -> None:
        """A sealed copy of the index in ``snapshots/`` (after a checkpoint)."""
        self.opened.snapshot()

    def sync_all(self) -> None:
        """Commit every open file and checkpoint (fsync of a directory, umount).

        As for fsync: the open files' sealing is waited for, and the objects
        are synced, before the core's lock is taken."""
        with self._lock:
            jobs = [job for of in self._open.values() if of.changed
                    for job in self.data.seal_dirty(of)]
        for job in jobs:
            job.exception()  # a failure is raised by the commit
        if not self.read_only:
            try:
                self.objects.sync()
            except DcmfsError:
                pass  # final for the mount: the checkpoint raises it
        self._sync_all()

    @_locked
    def _sync_all(self) -> None:
        first_error = None
        for of in list(self._open.values()):
            try:
                self.data.commit(of)
            except Exception as exc:  # noqa: BLE001 — commit the others, then report
                first_error = first_error or exc
        self.checkpoint()
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """Flush everything and close the store (the store stays consistent
        even if this is never called)."""
        if self.closed:
            return
        self._stop.set()
        self._checkpoint_due.set()
        if self._syncer is not None:
            self._syncer.join()
        if self.reencoder is not None:
            self.reencoder.stop()  # its backlog stays in the index for next time
        for job in (self.scrubber, self.verify_job, self.rekey_job, self.deid_filler):
            if job is not None:
                job.join()
        self.closed = True
        try:
            if not self.read_only:
                self.sync_all()
                with self._lock:
                    for of in list(self._open.values()):
                        if of.unlinked:
                            self._purge(of.ino)
                    self.opened.end_session()
                    self.checkpoint()
                    self.final_snapshot()
        finally:
            self.data.shutdown()
            self.opened.close()

    # --- helpers ----------------------------------------------------------------
    def _audit(self, event: str, ino: int | None, path: str | None, who=None,
               **fields) -> None:
        """Record an event that succeeded in the audit trail (before the
        answer; ``who``: an identity kept from the open, else the caller)."""
        trail = self.opened.audit
        if trail is not None:
            trail.record(event, who or self.caller, ino, path, **fields)

    @contextlib.contextmanager
    def _write_txn(self):
        """A write transaction for one operation.

        Operations change cached inode objects in place; if the transaction
        fails (disk full, index full) those changes must not outlive it, so
        the caches are reloaded from the index.
        """
        try:
            with self.index.begin(write=True) as txn:
                yield txn
        except BaseException:
            self._reload_caches()
            raise

    def _reload_caches(self) -> None:
        self._inodes.clear()
        self._paths.clear()
        with self.index.begin() as txn:
            for ino, of in self._open.items():
                fresh = txn.get_inode(ino)
                if fresh is None:
                    continue
                of.inode.__dict__.update(fresh.__dict__)
                of.unlinked = fresh.nlink == 0

    def _inode(self, txn, ino: int) -> Inode:
        of = self._open.get(ino)
        if of is not None:
            return of.inode
        inode = self._inodes.get(ino)
        if inode is None:
            inode = txn.get_inode(ino)
            if inode is None:
                raise NotFound(f"inode {ino} is missing")
            self._remember_inode(ino, inode)
        return inode

    def _remember_inode(self, ino: int, inode: Inode) -> None:
        if len(self._inodes) > 20000:
            self._inodes.clear()
        self._inodes[ino] = inode

    def _put(self, txn, ino: int, inode: Inode) -> None:
        txn.put_inode(ino, inode)
        self._inodes[ino] = inode

    def _resolve(self, txn, path: str) -> int:
        ino = fmt.ROOT_INO
        for part in path.split("/"):
            if part:
                ino = self._step(txn, ino, part, path)
        return ino

    def _step(self, txn, ino: int, part: str, path: str) -> int:
        """The inode the name ``part`` leads to in directory ``ino`` (one
        component of ``path``, which errors name)."""
        if not stat.S_ISDIR(self._inode(txn, ino).mode):
            raise NotADirectory(path)
        name = os.fsencode(part)
        if len(name) > NAME_MAX:  # as ext4: never "not found" for such a name
            raise NameTooLong(path)
        child = txn.lookup(ino, name)
        if child is None:
            hidden = self._hidden.get((ino, name)) if self._hidden else None
            if hidden is None:
                raise NotFound(path)
            child = hidden[0]
        return child

    def _parent(self, txn, path: str) -> tuple[int, bytes]:
        parent_path, name = _split(path)
        if len(name) > NAME_MAX:
            raise NameTooLong(path)
        parent = self._resolve_known(txn, parent_path)  # the directory, once
        if not stat.S_ISDIR(self._inode(txn, parent).mode):
            raise NotADirectory(parent_path)
        return parent, name

    def _free_name(self, txn, path: str) -> tuple[int, bytes, Inode]:
        """(parent ino, name, parent inode) for a name that must not exist yet."""
        parent, name = self._parent(txn, path)
        if txn.lookup(parent, name) is not None:
            raise Exists(path)
        return parent, name, self._inode(txn, parent)

    def _entry(self, txn, path: str) -> tuple[int, bytes, int, Inode]:
        """(parent ino, name, ino, inode) of an existing name."""
        parent, name = self._parent(txn, path)
        ino = txn.lookup(parent, name)
        if ino is None:
            raise NotFound(path)
        return parent, name, ino, self._inode(txn, ino)

    def _stat(self, ino: int, inode: Inode) -> dict:
        of = self._open.get(ino)
        size = of.size if of is not None else inode.size
        # st_blocks: what the file takes in the store (compressed; holes
        # cost nothing), as ZFS reports with compression on; the logical
        # size while it has unsaved changes or for a record from before
        # format 4 (until the file changes)
        stored = inode.stored if (of is None or not of.changed) and inode.stored >= 0 \
            else size
        st = {"st_ino": ino, "st_mode": inode.mode, "st_nlink": inode.nlink,
              "st_uid": inode.uid, "st_gid": inode.gid, "st_size": size,
              "st_blocks": -(-stored // 512), "st_blksize": self.store.chunk_size,
              "st_atime": inode.atime_ns, "st_mtime": inode.mtime_ns,
              "st_ctime": inode.ctime_ns}
        if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            st["st_rdev"] = inode.rdev
        return st

    def _new_inode(self, txn, mode: int, uid: int, gid: int, parent: Inode,
                   nlink: int = 1, target: bytes = b"") -> tuple[int, Inode]:
        now = self._clock()
        if parent.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        size = len(target) if stat.S_ISLNK(mode) else 0  # a device keeps its rdev there
        # every type gets a secret (when the store has the feature), so the
        # record's length does not tell a regular file from a directory
        inode = Inode(mode, uid, gid, nlink, size, now, now, now,
                      secrets.token_bytes(16), target=target,
                      digest=EMPTY_DIGEST if stat.S_ISREG(mode) else None,
                      secret=secrets.token_bytes(SECRET_LEN) if self._secrets else b"")
        ino = txn.alloc_ino()
        self._put(txn, ino, inode)
        return ino, inode

    def _touch_dir(self, txn, ino: int, inode: Inode, nlink_delta: int = 0) -> None:
        now = self._clock()
        inode.mtime_ns = inode.ctime_ns = now
        inode.nlink += nlink_delta
        self._put(txn, ino, inode)

    def _drop_link(self, txn, ino: int, inode: Inode) -> list[bytes]:
        """One name of ``ino`` went away; returns objects to delete later."""
        inode.nlink -= 1
        inode.ctime_ns = self._clock()
        if inode.nlink > 0:
            self._put(txn, ino, inode)
            return []
        of = self._open.get(ino)
        if of is not None:  # unlinked while open: keep until the last release
            of.unlinked = True
            self._put(txn, ino, inode)
            txn.add_orphan(ino)
            return []
        return self._delete_inode(txn, ino, inode)

    def _delete_inode(self, txn, ino: int, inode: Inode) -> list[bytes]:
        self._inodes.pop(ino, None)
        self._knames.forget(ino)
        return delete_file(txn, ino, inode)

    def _purge(self, ino: int) -> None:
        with self._write_txn() as txn:
            inode = txn.get_inode(ino)
            garbage = self._delete_inode(txn, ino, inode) if inode is not None else []
        self.data.after_commit(garbage)

    # --- attributes ---------------------------------------------------------------
    @_locked
    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        if fh is not None and fh in self._handles:
            of = self._handles[fh].of
            return self._stat(of.ino, of.inode)
        # a name and a record held: no transaction (issue 17)
        if fh is None and path is not None and self.index.broken is None \
                and (ino := self._paths.get(self.index.names_gen, path)) is not None:
            inode = of.inode if (of := self._open.get(ino)) is not None else self._inodes.get(ino)
            if inode is not None and (inode.nlink <= 1 or stat.S_ISDIR(inode.mode)):
                return self._stat(ino, inode)
        with self.index.begin() as txn:
            # fstat(2) of a directory comes with its handle and (nopath) no path
            ino = self._dirs[fh] if path is None and fh in self._dirs \
                else self._resolve_known(txn, path)
            inode = self._inode(txn, ino)
            if inode.nlink > 1 and path is not None and not stat.S_ISDIR(inode.mode):
                self._knames.seen(ino, path)  # a lookup: the kernel knows it by this name
            return self._stat(ino, inode)

    @_mutating
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        ino, path = self._setattr(path, fh, mode=mode)
        self._audit("chmod", ino, path, mode=mode & 0o7777)

    @_mutating
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        ino, path = self._setattr(path, fh, uid=uid, gid=gid)
        self._audit("chown", ino, path, owner=uid, group=gid)

    @_mutating
    def utimens(self, path: str | None, atime_ns: int | None, mtime_ns: int | None,
                fh: int | None = None) -> None:
        """``None`` for both means now; UTIME_NOW/UTIME_OMIT are honoured."""
        now = self._clock()
        if atime_ns is None and mtime_ns is None:
            atime_ns = mtime_ns = now
        self._setattr(path, fh, atime=atime_ns, mtime=mtime_ns, now=now)

    def _setattr(self, path, fh, mode=None, uid=None, gid=None, atime=None, mtime=None,
                 now=None) -> tuple[int, str | None]:
        """Change attributes; returns (ino, path)."""
        now = now or self._clock()
        with self._write_txn() as txn:
            if fh is not None:
                h = self._handle(fh)
                ino, path = h.of.ino, h.path
            else:
                ino = self._resolve(txn, path)
            inode = self._inode(txn, ino)
            if mode is not None:
                inode.mode = (inode.mode & ~0o7777) | (mode & 0o7777)
            if uid is not None and uid != -1 and uid != 0xFFFFFFFF:
                inode.uid = uid
            if gid is not None and gid != -1 and gid != 0xFFFFFFFF:
                inode.gid = gid
            for attr, value in (("atime_ns", atime), ("mtime_ns", mtime)):
                if value is None or value == UTIME_OMIT:
                    continue
                setattr(inode, attr, now if value == UTIME_NOW else value)
            inode.ctime_ns = now
            self._put(txn, ino, inode)
        self._knames.changed(ino, path)
        self.data.after_commit([])
        return ino, path

    # --- the filesystem as a whole -----------------------------------------------------------
    def statfs(self) -> dict:
        st = os.statvfs(self.store.root)
        return {"f_bsize": st.f_bsize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks,
                "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_files": st.f_files,
                "f_ffree": st.f_ffree, "f_favail": st.f_favail, "f_namemax": NAME_MAX}
