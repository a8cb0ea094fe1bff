"""An opened store: what every command and the daemon open, check and close.

:class:`OpenedStore` holds, for one session on one store, the store lock, the
header and master key (:class:`~dcmfs.storage.header.Store`), the codecs, the
object store and the index, and closes them in reverse order in one
:meth:`~OpenedStore.close` (an :class:`contextlib.ExitStack`).  The mount
daemon, ``recompress``, ``stats``, ``verify``, ``fsck`` and the index rebuild
all use it; the filesystem core (:mod:`dcmfs.core`) sits on top of it and
adds POSIX semantics only.

The mount-time checks (:func:`preflight`) run once: ``dcmfs mount`` runs them
in the calling process, before it forks the daemon, and hands the daemon the
store it checked (``checked=True``); every other opener runs them here.  A
store that was not closed cleanly goes through :meth:`OpenedStore.start_session`
(journal replay, the unclean-store recovery, the ``mounted`` state) before
anything writes to it.

An opened store also serves as the :class:`~dcmfs.opened.jobs.JobHost` of an
offline verify: nothing is open, nothing is in flight, nobody is busy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from typing import Callable, Iterator

from .. import format as fmt
from ..audit.segments import list_segments
from ..audit.trail import AuditTrail
from ..config import Config
from ..errors import DcmfsError, IntegrityError
from ..index import Index, Inode, Txn, Witness, index_key
from ..index.keygen import mark as mark_generation
from ..index.snapshots import archived_bytes, refuse_if_missing, take_snapshot
from ..storage.codec import NAMES, Codecs
from ..storage.header import Secret, Store, StoreLock, clear_damage_mark, open_store, set_damage_mark
from ..storage.objects import ChunkRef, ObjectDamaged, ObjectStore
from .authentic import authenticate, upgrade_dirents
from .preflight import preflight  # noqa: F401 (app.mount imports it from here)
from .recovery import RecoveryReport, recover

log = logging.getLogger("dcmfs.store")


class OpenedStore:
    """One store, opened: lock, objects, index and codecs, with one close.

    ``index=False`` opens everything but the index (``fsck`` reports an index
    that does not open as a problem, the rebuild makes a new one): call
    :meth:`open_index` later.  ``checked=True``: the caller ran
    :func:`preflight` already (``dcmfs mount`` before it forks).
    """

    def __init__(self, store: Store, config: Config, *, index: bool = True,
                 checked: bool = False) -> None:
        self.store = store
        self.config = config
        self.root = store.root
        self.read_only = config.read_only
        self.chunk_size = store.chunk_size
        #: the store's general codec (the one chunks are compressed with)
        self.general_codec = NAMES[store.codec]
        #: the core's lock: background jobs hold it only to read a file's
        #: index entries or to swap them (see :mod:`dcmfs.opened.jobs`)
        self.lock = threading.RLock()
        #: set when the session ends: background jobs stop
        self.stopping = threading.Event()
        self.closed = False
        self.index: Index | None = None
        #: object ids (or inode numbers) whose damage has been logged
        self._damage_seen: set = set()
        #: the damage record the next checkpoint writes into the index
        self.damage_pending: dict | None = None
        self._damage_lock = threading.Lock()
        #: the audit trail, once :meth:`open_audit` opened it
        self.audit: AuditTrail | None = None
        self._stack = contextlib.ExitStack()
        try:
            if not checked and index:
                preflight(store, config, lock_free=False)
            #: held for the whole session: two daemons never open one store
            self.store_lock = StoreLock(store.root)
            self._stack.callback(self.store_lock.release)
            self.codecs = Codecs.of(config)
            #: an S3 store's write-back cache in front of its bucket (None: local)
            self.remote = None
            #: the thread uploading a snapshot taken while mounted
            self._publisher: threading.Thread | None = None
            if store.backend:
                from .remote import open_backend
                self.remote = open_backend(store, config)
            self.objects = ObjectStore(store.root, store.store_id, store.master_key,
                                       self.codecs, verify_writes=config.verify_writes,
                                       backend=self.remote,
                                       epoch_keys=store.epoch_keys, epoch=store.epoch)
            self._stack.callback(self.objects.close)
            if self.remote is not None:
                if not self.read_only:  # one writer per bucket prefix
                    from .remote import start_writing
                    try:
                        lease = start_writing(self.remote, store.backend, store.root)
                    except BaseException:
                        self.remote.close()
                        raise
                    self._stack.callback(lease.release)  # after the backlog drained
                self._stack.callback(self._close_remote)
            self._stack.callback(self.close_index)
            #: a read-only mount that follows the writer (dcmfs.opened.follow)
            self.following = bool(store.backend and config.read_only and config.follow > 0)
            self.publisher = self.follower = None
            if index:
                self.open_index()
                self._start_follow()
        except BaseException:
            self._stack.close()  # nothing may stay open: LMDB forbids opening twice
            raise

    @classmethod
    def open(cls, root: str, secret: Secret, config: Config, *, for_writing: bool = False,
             index: bool = True) -> "OpenedStore":
        """Unwrap the key of the store at ``root`` and open it."""
        return cls(open_store(root, secret, for_writing=for_writing), config, index=index)

    # --- the index ----------------------------------------------------------------
    def open_index(self, tolerate_mismatch: bool = False) -> Index:
        """Open (or create, for a new store) the index.

        ``tolerate_mismatch``: an index that does not match its sealed sums
        opens read-write too, its reads ungated (fsck, which names and
        repairs what it can; see :mod:`dcmfs.opened.authentic`).

        Raises
        ------
        IndexDamagedError
            The index is missing although the store holds data, or it is damaged.
        """
        refuse_if_missing(self.root)
        path = os.path.join(self.root, fmt.INDEX_DIR)
        gen, key = index_key(path, self.store)
        #: the key the index, its journal and the audit trail are under
        self.index_key = key
        read_only = self.config.read_only and not self.following
        self.index = Index(path, key, self.store.store_id, self.config.index_map_size,
                           # a follower applies the writer's records to its index
                           read_only=read_only,
                           archive_dir=os.path.join(self.root, fmt.SNAPSHOTS_DIR),
                           generation=gen)
        self.objects.inline = self.index.inline
        if not read_only and fmt.INLINE_FEATURE in self.store.features:
            self.objects.inline_max = min(self.config.inline_max, fmt.INLINE_MAX)
        if not read_only:
            mark_generation(self.index, gen)  # a new index made under a later epoch
        self.index.on_mismatch = self._group_differs
        try:
            authenticate(self.index, self.root, self.config,
                         Witness.for_store(self.config.state_dir, key, self.store.store_id,
                                           tuple(self.store.epoch_keys.values())),
                         tolerate_mismatch)
        except BaseException:
            self.close_index()
            raise
        return self.index

    def _start_follow(self) -> None:
        """A follower applies the writer's published journal
        (:mod:`dcmfs.opened.follow`); it stops before the index closes."""
        if self.following:
            from .follow import Follower
            from .followkeys import KeyFollower
            keys = KeyFollower(self.remote.remote, self.root, self.store, self.objects,
                               self.index.generation)
            self.follower = Follower(self.remote, self.root, self.index, self.index_key,
                                     self.store.store_id, self.lock, self.config.follow,
                                     keys=keys)
            self._stack.callback(self.follower.close)

    def start_publishing(self) -> None:
        """A read-write session of an S3 store (the filesystem's, not fsck's
        or attach's, whose index is not the writer's) publishes its journal
        for followers; it stops, after a last publication, before the index
        closes."""
        if self.remote is None or self.read_only or not self.config.s3_publish_interval \
                or self.publisher is not None:
            return
        from .follow import Publisher
        self.publisher = Publisher(self.remote, self.root, lambda: self.index, self.lock,
                                   self.config.s3_publish_interval)
        self._stack.callback(self.publisher.close)

    def _group_differs(self, group: int) -> None:
        self.damaged(0, IntegrityError(f"index records of group {group:x} do not match the "
                                       "index's sealed checksum"))

    def open_audit(self) -> AuditTrail | None:
        """Open the audit trail for appending, after the journal replay
        (the index's chain head is where it resumes); None with ``-o
        audit=0`` (a store that has a trail gets one ``audit-off`` record
        then: the gap is visible).

        A read-only opening appends to the trail too (reads are as sensitive
        on a read-only mount), and changes nothing else: the index (and so
        its head) stays as it is, the next read-write opening verifies the
        records after the head and takes them into it; no segment is
        dropped for retention.  A store without ``audit-v1`` (not yet
        upgraded by a read-write opening) gets no trail then."""
        if self.audit is not None:
            return self.audit
        if self.read_only and "audit-v1" not in self.store.features:
            return None
        if not self.config.audit and not list_segments(self.root):
            return None
        head = None
        # a follower's index holds the writer's head, of the writer's trail:
        # its own trail (the reads on this machine) has no head in the index
        with self.index.begin() as txn:
            try:
                head = None if self.following else txn.get_audit_head()
            except DcmfsError as exc:  # the trail's check names it
                log.error("the index's audit head is unreadable: %s", exc)
        trail = AuditTrail(self.root, self.index_key, self.store.store_id, head,
                           segment_size=self.config.audit_segment_size,
                           retention=0.0 if self.read_only else self.config.audit_retention,
                           forward=self.config.audit_forward,
                           older=tuple(self.objects.epoch_keys.values()))
        if not self.config.audit:
            trail.record("audit-off", None)
            trail.close()
            return None
        if self.following:  # 'dcmfs audit --verify': not the index's head's trail
            trail.record("follower", None)
        self.audit = trail
        self._stack.callback(self.close_audit)
        return self.audit

    def close_audit(self) -> None:
        audit, self.audit = self.audit, None
        if audit is not None:
            audit.close()

    def close_index(self) -> None:
        if self.index is not None:
            index, self.index = self.index, None
            if index.witness is not None:
                index.witness.close()
            index.close()

    def chunk_intact(self, txn: Txn, ino: int, idx: int, ref: ChunkRef) -> bool:
        """Is the object a journal record names intact on disk?  (journal
        replay, the roll-forward of an index rebuild)

        Only a missing, torn or unauthentic object says no (a power cut came
        before it reached the disk); any other error (EIO, EMFILE) is raised,
        so that nothing is dropped for a passing fault.
        """
        inode = txn.get_inode(ino)
        if inode is None:
            return False
        # an inline object is in the record itself (the transaction replaying it)
        blob = txn.get_inline(ino, ref.oid) if ref.flags & fmt.CHUNK_FLAG_INLINE else None
        if ref.flags & fmt.CHUNK_FLAG_INLINE and blob is None:
            return False
        try:
            self.objects.read(self.objects.file_cipher(inode.file_id, inode.secret),
                              inode.file_id, ino, idx, ref, blob)
        except ObjectDamaged:
            return False
        return True

    @contextlib.contextmanager
    def write_txn(self) -> Iterator[Txn]:
        with self.index.begin(write=True) as txn:
            yield txn

    # --- a read-write session -----------------------------------------------------
    def start_session(self, clock: Callable[[], int] = time.time_ns,
                      delete_inode=None) -> RecoveryReport | None:
        """Apply what a crash left in the journal, check the store if the last
        session did not end cleanly, and record that it is in use; returns
        what the recovery removed, or None after a clean session.

        ``delete_inode(txn, ino, inode)`` removes an orphan inode (default:
        :func:`dcmfs.opened.recovery.delete_file`).
        """
        # objects a crashed daemon left in the page cache become durable before
        # any checkpoint may name them
        self.objects.sync(force=True)
        applied, dropped = self.index.replay(self.chunk_intact)
        if applied or dropped:
            log.warning("journal replayed: %d operations applied, %d dropped (their data "
                        "had not reached the disk)", applied, dropped)
        if not self.index.keyed_dirents:
            upgrade_dirents(self.index, self.root)
        self._ensure_root(clock)
        with self.index.begin() as txn:
            state = txn.meta_get("state")
        report = None
        if state == b"mounted":
            report = recover(self.index, self.objects, delete_inode)
        with self.write_txn() as txn:
            txn.meta_put("state", b"mounted")
        return report

    def _ensure_root(self, clock: Callable[[], int]) -> None:
        with self.write_txn() as txn:
            if txn.get_inode(fmt.ROOT_INO) is None:
                now = clock()
                txn.put_inode(fmt.ROOT_INO, Inode(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(),
                                                  2, 0, now, now, now, secrets.token_bytes(16)))
                txn.meta_put("format", str(fmt.FORMAT_VERSION).encode())
                txn.meta_put("store_id", self.store.store_id)

    def end_session(self) -> None:
        """The session ended cleanly: no recovery is needed next time."""
        with self.write_txn() as txn:
            txn.meta_put("state", b"clean")

    # --- durability -----------------------------------------------------------------
    def make_durable(self) -> None:
        """Every committed operation survives a power loss from now on
        (objects first, then the journal that names them)."""
        self.objects.sync(upload=self.config.s3_sync)
        self.index.sync_journal()
        if self.audit is not None:
            self.audit.sync()

    def checkpoint(self, after_commit: Callable[[], None] = lambda: None,
                   synced_at: int | None = None) -> None:
        """Commit the index durably (objects first); ``after_commit`` runs
        right after (the core deletes superseded objects there).  When the
        archived journal has grown large, take a new index snapshot, so that
        a rebuild has little to roll forward and the archive stays bounded.

        ``synced_at``: the journal's sequence number read before a sync of
        the objects that the caller made without the lock.  If no operation
        was journaled since, every object the index names was written before
        that sync began, and the objects are not synced again here, under
        the lock (a file being written meanwhile, not yet committed, would
        have its new objects synced while every request waits)."""
        with self.lock:
            covered = synced_at is not None and self.index.seq == synced_at
            self._write_damage_record()
            self._write_audit_head()
            if not covered:
                self.objects.sync()
            rotated = self.index.checkpoint()
            after_commit()
            if rotated and archived_bytes(self.index.archive_dir) >= self.config.snapshot_after:
                self.snapshot(wait=False)

    def _write_audit_head(self) -> None:
        """The audit trail made durable, its head into the index (under the
        core's lock, between operations)."""
        if self.audit is None or self.index is None:
            return
        head = self.audit.checkpoint()
        if head is not None:
            with self.write_txn() as txn:
                txn.put_audit_head(head)

    def snapshot(self, wait: bool = True) -> None:
        """A sealed copy of the index in ``snapshots/`` (after a checkpoint),
        uploaded by an S3 store once the objects it names are in the bucket."""
        with self.lock:
            take_snapshot(self.index, os.path.join(self.root, fmt.SNAPSHOTS_DIR))
        self.publish_snapshots(wait)

    def publish_snapshots(self, wait: bool = True) -> None:
        """An S3 store: snapshots and segments into the bucket, those gone out;
        ``wait=False`` (mounted) in a thread, so that no operation waits."""
        if self.remote is None or self.read_only:
            return
        from .remote import publish_snapshots
        if self._publisher is not None:
            self._publisher.join()
        if wait:
            publish_snapshots(self.remote, self.root, self.config.s3_drain_timeout)
            return
        self._publisher = threading.Thread(
            target=publish_snapshots, name="dcmfs-publish", daemon=True,
            args=(self.remote, self.root, self.config.s3_drain_timeout))
        self._publisher.start()

    def _close_remote(self) -> None:
        if self._publisher is not None:
            self._publisher.join()
        self.remote.close(0 if self.read_only else self.config.s3_drain_timeout)

    # --- integrity errors ------------------------------------------------------------
    def damaged(self, ino: int, exc: Exception) -> None:
        """An integrity error was met (a read, the re-encoder, the scrubber).

        The reader gets EIO for that file only; intact files are still served.
        The first error marks the store as needing fsck (``STORE/needs-fsck``),
        which refuses read-write mounts until ``dcmfs fsck`` ran, and says so
        in the log once; each damaged object is logged once (inode and object
        id, never a path).  Thread-safe.
        """
        key = getattr(exc, "oid", None) or ino
        with self._damage_lock:
            if key in self._damage_seen:
                return
            first = not self._damage_seen
            self._damage_seen.add(key)
        if first:
            log.error("integrity error in inode %d: %s; the store is marked as needing "
                      "'dcmfs fsck %s' (intact files are still served, damaged ones give EIO)",
                      ino, exc, self.root)
            try:
                mark = set_damage_mark(self.store, "integrity errors")
            except DcmfsError as err:
                log.error("could not mark the store as damaged: %s", err)
                mark = {"since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            # the index's copy goes in with the next checkpoint (this may run
            # inside another transaction)
            self.damage_pending = {"since": mark["since"], "reason": "integrity errors"}
        else:
            log.warning("integrity error in inode %d: %s", ino, exc)

    def _write_damage_record(self) -> None:
        """The index's sealed copy of the damage mark, if one is pending
        (under the core's lock, between operations)."""
        info, self.damage_pending = self.damage_pending, None
        if info is None or self.read_only or self.index is None:
            return
        try:
            with self.write_txn() as txn:
                if txn.meta_get("damage") is None:
                    txn.put_damage(info)
        except DcmfsError as err:
            log.error("could not record the damage in the index: %s", err)

    def record_damage(self, reason: str, errors: int = 1) -> bool:
        """Mark the store as needing fsck outside a session (an offline
        verify, fsck): the mark file, and the index's copy when the index
        can be written safely (read-write, nothing left to replay); returns
        whether the index holds it."""
        mark = set_damage_mark(self.store, reason, errors)
        if self.read_only:
            return False
        try:
            index = self.index or self.open_index()
            if index.unapplied_records():
                return False  # its journal first: new records must follow its last
            with self.write_txn() as txn:
                if txn.meta_get("damage") is None:
                    txn.put_damage({"since": mark["since"], "reason": reason})
            self.objects.sync(force=True)
            index.checkpoint()
        except DcmfsError as err:  # the index may be what is damaged
            log.warning("the damage mark is in %s only: the index could not record it (%s)",
                        fmt.DAMAGE_MARK, err)
            return False
        return True

    def clear_damage(self) -> None:
        """A clean fsck: drop the index's record, then the mark file (in this
        order: a crash in between leaves a mark, never a record alone)."""
        index = self.index or self.open_index()
        with self.write_txn() as txn:
            found = txn.clear_damage()
        if found:
            index.checkpoint()
        clear_damage_mark(self.root)

    @property
    def integrity_errors(self) -> int:
        """Damaged objects (or files) met so far in this session."""
        return len(self._damage_seen)

    # --- as a JobHost (an offline verify) -----------------------------------------
    def is_open(self, ino: int) -> bool:
        return False

    def has_uncommitted(self, ino: int) -> bool:
        return False

    def objects_in_flight(self, candidates: list[bytes]) -> set[bytes]:
        return set()

    # --- closing ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the index, the objects and release the lock (in that order)."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self._stack.close()

    def __enter__(self) -> "OpenedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
