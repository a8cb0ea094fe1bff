"""Read-only followers of an S3 store: the writer publishes its journal,
read-only mounts on other machines apply it.

**The writer** (:class:`Publisher`, every read-write filesystem session of
an S3 store) uploads, every ``s3_publish_interval`` seconds (10 by default)
when its index changed, the archived journal segments the bucket lacks as
``follow/journal-N`` and the records its live journal gained since the last
round as ``follow/part-N`` (N the last record's number; the journal's header,
then whole records: a valid journal file), and once more at a clean close.
It deletes the parts an archived segment holds and the ``follow/`` segments
it no longer keeps itself (those older than its two index snapshots).  They
are the journal's bytes as on disk: every record sealed under the store's
key with its sequence number in the associated data.

**A follower** (``dcmfs mount -o ro,follow=SECONDS`` of a store made by
``dcmfs attach``; :class:`Follower`) lists ``follow/`` every SECONDS,
fetches the segments and parts whose last record is after its own sequence
number, and applies the records that authenticate, continue its sequence without a
gap and leave no chunk entry naming an object the bucket lacks
(:func:`dcmfs.index.follow.apply_available`); the rest waits for the next
round.  Its index is then checkpointed with its sums sealed as on the writer,
and read as any index (index authenticity: docs/format.md).  A bucket that
is rolled back or withholds segments can delay a follower, never take it
backwards: records it applied are never applied again, older ones are
ignored, and a gap stops it (it then warns, once, that it may need a new
``dcmfs attach --follower``).

The delay until a new file shows on a follower: the writer's next
publication (``s3_publish_interval``, 10 s; a record is in the live journal
as soon as its operation returned), the upload of the file's objects (``s3_upload_delay``, 10 s; a chunk
awaiting the re-encoder until its replacement is uploaded) and the
follower's next round (``follow``): about 30 s with the defaults.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .. import format as fmt
from ..errors import DcmfsError, StoreIOError
from ..index import Index
from ..index.follow import apply_available, read_records
from ..index.shred import shred_passed
from ..index.journal import HEADER_SIZE as JOURNAL_HEADER
from ..index.journal import whole_records
from ..index.schema import JOURNAL_NAME
from ..index.snapshots import archive_segments, snapshots
from ..storage.backend import Backend, BackendMissing
from ..storage.objects import object_name

log = logging.getLogger("dcmfs.s3")

PREFIX = "follow/"
#: ``follow/part-N``: the records of the live journal published in one round,
#: the last one numbered N, after the journal's header
PART = "part-"


def _number(name: str, kind: str) -> int | None:
    tail = name[len(PREFIX):]
    if tail.startswith(kind) and tail[len(kind):].isdigit():
        return int(tail[len(kind):])
    return None


def published(remote: Backend, after: int = 0) -> list[tuple[int, str]]:
    """(number of its last record, name) of every file under ``follow/``
    (archived segments and parts) whose last record is after ``after``, in
    that order."""
    found = []
    for name in remote.list(PREFIX):
        for kind in (fmt.ARCHIVE_PREFIX, PART):
            n = _number(name, kind)
            if n is not None and n > after:
                found.append((n, name))
    return sorted(found)


def in_bucket(remote: Backend, oids: set[bytes], known: set[bytes], mapper=map) -> set[bytes]:
    """Which of ``oids`` the bucket holds (as objects or in packs); ``known``
    holds those found before, and gains those found now (objects are
    immutable: once there, there); ``mapper``: a pool's map for the HEADs."""
    todo = [o for o in oids if o not in known]
    refresh = getattr(remote, "refresh_packs", None)
    if todo and refresh is not None:  # the packs uploaded since the last look
        refresh()
    for oid, size in zip(todo, mapper(lambda o: remote.head(object_name(o)), todo)):
        if size is not None:
            known.add(oid)
    return {o for o in oids if o in known}


def newest_published(remote: Backend) -> int:
    """The number of the newest record a writer published under
    ``follow/`` (0: none)."""
    return max((n for n, _ in published(remote)), default=0)


def download(remote: Backend, names: list[str], directory: str) -> dict[str, str]:
    """The journal files ``names`` of the bucket written into ``directory``:
    path -> name, in the order given; a file deleted meanwhile (a part an
    archived segment now holds) is left out.  Their records are
    authenticated when read (:func:`dcmfs.index.follow.read_records`)."""
    paths = {}
    for i, name in enumerate(names):
        try:
            blob = remote.get(name)
        except BackendMissing:
            continue
        path = os.path.join(directory, f"{i:06d}-{os.path.basename(name)}")
        with open(path, "wb") as f:
            f.write(blob)
        paths[path] = name
    return paths


def download_published(remote: Backend, directory: str) -> list[str]:
    """Every journal file the writer published under ``follow/``, written
    into ``directory`` (``dcmfs attach`` rolls them forward: the records
    after the newest snapshot, which the writer's lost machine held)."""
    return list(download(remote, [name for _, name in published(remote)], directory))


class Publisher:
    """The writer's side: uploads its journal for followers."""

    def __init__(self, remote: Backend, root: str, index: Callable[[], Index | None],
                 lock, interval: float) -> None:
        self.remote = remote
        self.root = root
        self._index = index
        self._lock = lock
        self.interval = interval
        self._published_seq = -1
        #: the live journal published so far: its inode and where its
        #: unpublished records start
        self._journal_id, self._offset = None, JOURNAL_HEADER
        #: the oldest local snapshot (after a shred pass the only one), since
        #: when, and whether the parts it holds are gone: followers get
        #: ``grace`` seconds to fetch them first (as objects' deletes wait)
        self.grace = max(60.0, 3 * interval)
        self._floor, self._floor_at, self._floor_done = 0, 0.0, True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dcmfs-publish-journal",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()

    def publish(self) -> None:
        """Upload what changed (a failure is logged; the next round retries)."""
        index = self._index()
        if index is None or getattr(self.remote, "fence", None) is not None \
                and self.remote.fence.is_set():  # the lease went to another writer
            return
        try:  # a key command changed it: followers need its keys first
            from .remote import refresh_header
            refresh_header(getattr(self.remote, "remote", self.remote), self.root)
        except (OSError, StoreIOError) as exc:
            log.warning("replacing the bucket's copy of the header failed (%s); retrying in "
                        "%.0f s", type(exc).__name__, self.interval)
            return
        seq = index.seq
        if seq == self._published_seq and self._floor_done:
            return
        directory = os.path.join(self.root, fmt.SNAPSHOTS_DIR)
        try:
            present = set(self.remote.list(PREFIX))
            with self._lock:  # no rotation of the journal meanwhile
                segments = archive_segments(directory)
                header, tail, offset = self._new_records()
            # a shred pass removes every segment: the one snapshot left holds
            # the parts up to its number, which go too, after the grace
            kept, archived = set(), self._snapshot_floor(directory)
            for last, path in segments:
                name = PREFIX + os.path.basename(path)
                kept.add(name)
                archived = max(archived, last)
                if name not in present:
                    self.remote.put(name, _read(path))
            whole, last = whole_records(tail)
            if whole:
                name = f"{PREFIX}{PART}{last:016d}"
                self.remote.put(name, header + tail[:whole])
                kept.add(name)
            for name in present - kept:  # parts an archived segment holds, old segments
                n = _number(name, PART)
                if n is None or n <= archived:
                    self.remote.delete(name)
        except (OSError, StoreIOError) as exc:
            log.warning("publishing the journal for followers failed (%s); retrying in "
                        "%.0f s", type(exc).__name__, self.interval)
            return
        self._offset = offset + whole
        self._published_seq = seq

    def _snapshot_floor(self, directory: str) -> int:
        """The oldest snapshot's number once it is ``grace`` seconds old (the
        parts up to it may go), else 0."""
        oldest = max((n for n, _ in snapshots(directory)[:1]), default=0)
        if oldest != self._floor:
            self._floor, self._floor_at, self._floor_done = oldest, time.monotonic(), False
        if time.monotonic() - self._floor_at < self.grace:
            return 0
        self._floor_done = True
        return oldest

    def _new_records(self) -> tuple[bytes, bytes, int]:
        """(header, the bytes after what was published, where they start) of
        the live journal (a new one after a rotation starts from its header)."""
        with open(os.path.join(self.root, fmt.INDEX_DIR, JOURNAL_NAME), "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != self._journal_id or st.st_size < self._offset:
                self._journal_id, self._offset = st.st_ino, JOURNAL_HEADER
            header = f.read(JOURNAL_HEADER)
            f.seek(self._offset)
            return header, f.read(), self._offset

    def close(self) -> None:
        """Stop, after one last publication (the caller drained the uploads)."""
        self._stop.set()
        self._thread.join()
        self.publish()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Follower:
    """A read-only mount's side: applies the writer's published journal."""

    def __init__(self, remote: Backend, root: str, index: Index, master_key: bytes,
                 store_id: bytes, lock, interval: float,
                 on_applied: Callable[[], None] = lambda: None, keys=None) -> None:
        #: adopts the epochs of the writer's rotations (:mod:`.followkeys`)
        self.keys = keys
        self.remote = remote
        self.root = root
        self.index = index
        self._key, self._store_id = master_key, store_id
        self._lock = lock
        self.interval = interval
        self.on_applied = on_applied
        #: inode -> object ids it reads, of the files open on this mount
        #: (set by its filesystem)
        self.held: Callable[[], dict[int, set[bytes]]] = dict
        #: records applied so far, rounds run, and the last round's error
        self.applied = 0
        self.rounds = 0
        self.last_error: str | None = None
        self._gap_logged = False
        self._present: set[bytes] = set()
        self._heads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dcmfs-follow-head")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dcmfs-follow", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.follow()
            except DcmfsError as exc:
                self.last_error = str(exc)
                log.warning("following the writer failed: %s; retrying in %.0f s", exc,
                            self.interval)

    def follow(self) -> int:
        """One round: fetch what the writer published and apply what can be;
        returns how many records were applied."""
        self.rounds += 1
        if self.keys is not None:  # first: new records may name objects of a new epoch
            why = self.keys.refresh()
            if why is not None:
                if why != self.last_error:
                    log.warning("following the writer stopped: %s", why)
                self.last_error = why
                return 0
        seq = self.index.seq
        found = published(self.remote, seq)
        # the segments uploaded with the snapshots too (a writer of an older
        # dcmfs published none under follow/)
        archived = fmt.SNAPSHOTS_DIR + "/" + fmt.ARCHIVE_PREFIX
        for name in self.remote.list(archived):
            tail = name[len(archived):]
            if tail.isdigit() and int(tail) > seq:
                found.append((int(tail), name))
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".follow-") as tmp:
            paths = download(self.remote, [name for _, name in sorted(found)], tmp)
            records, skipped = read_records(list(paths), self._key, self._store_id, seq)
        for path, exc in skipped:  # another store's, or a damaged header
            log.warning("%s in the bucket is not this store's journal (%s); skipped",
                        paths[path], exc)
        if records and min(records) > seq + 1:
            if not self._gap_logged:
                log.warning("the bucket holds no journal records right after change %d: "
                            "withheld, or this follower fell behind what the writer keeps; "
                            "if it lasts, unmount and 'dcmfs attach --follower' again", seq)
                self._gap_logged = True
            return 0
        with self._lock:
            n = apply_available(self.index, records.items(), self._in_bucket, self.held)
            if n:
                self.on_applied()
                new = (ops for rseq, ops in records.items() if seq < rseq <= self.index.seq)
                if shred_passed(new):
                    # the writer ran a shred pass: this copy of the index lets
                    # go of the deleted files' records too (its freed pages)
                    self.index.compact()
        self.applied += n
        return n

    def status(self) -> dict:
        """For ``dcmfs status``: where the follower is (no names)."""
        return {"seq": self.index.seq, "applied": self.applied, "rounds": self.rounds,
                "interval": self.interval, "last_error": self.last_error}

    def _in_bucket(self, oids: set[bytes]) -> set[bytes]:
        return in_bucket(self.remote, oids, self._present, self._heads.map)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._heads.shutdown(wait=True)
