"""The background re-encoder: closed files are compressed off the close path.

A PACS must never wait on a codec.  While the backlog has room, ``close``
seals a file's chunks uncompressed (AES-GCM runs at GB/s) and records the
inode in the index's ``backlog``; this thread then compresses each chunk
with the store's codec, writes the new object, and swaps the chunk
reference in one journaled index transaction - only if the file is not
open and its chunk table is unchanged, otherwise it tries again later.
The old objects are deleted after the next checkpoint, like any superseded
object; a crash at any point leaves either the old or the new object
referenced, never neither.  When the backlog is full, ``close`` compresses
inline again, so the backlog (and the extra disk space it takes) stays
bounded.

It runs on the second core: zstd, AES and file I/O release the GIL, and
the core's lock is held only for the index reads and the swap.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..storage import dicom
from ..storage.codec import (HOT_IMAGE, HTJ2K, IMAGE, IMAGE_CODECS, IMAGE_HOT, NONE,
                             CodecMismatch, Unsuitable)
from ..errors import IntegrityError, StoreIOError, loggable
from ..opened.jobs import ActiveJobHost
from ..sandbox.pool import ParserFailure, ParserPool
from ..storage.digest import hasher_for
from .extents import CommittedReader, ExtentReader, extents_layout, extents_of
from .lookahead import LookAhead
from .passes import FAILED, Passes, _fresh
from .tiers import HOT, Tiers
from ..storage.objects import file_oids, stored_bytes
from ..format import CHUNK_FLAG_EXTENT, CHUNK_FLAG_LAST

log = logging.getLogger("dcmfs.reencoder")

#: attempts at one file in one session before a failure that is not the
#: disk's is recorded and the file left as it is
MAX_ATTEMPTS = 3


class Reencoder(Passes, LookAhead):
    """Works through the backlog of one mounted store (its
    :class:`~dcmfs.opened.jobs.ActiveJobHost`: the filesystem core)."""

    def __init__(self, host: ActiveJobHost, limit_bytes: int, dicom_aware: bool = True, window: int = 2,
                 quiet_after: float = 1.0, parsers: ParserPool | None = None,
                 hot_days: float = 0.0) -> None:
        self.host = host
        #: hot (fast-decoding) and cold (dense) codings of DICOM files
        #: (only when HTJ2K is among the configured image codecs)
        self.tiers = Tiers(hot_days if dicom_aware and HTJ2K in
                           host.objects.codecs.encode_settings()[1] else 0.0)
        #: hot files due to be coded cold (see :mod:`dcmfs.core.tiers`)
        self._cooling: set[int] = set()
        self.files_cooled = 0
        #: the workers that parse and encode file content (None: in this
        #: process, ``-o sandbox=0``)
        self.parsers = parsers
        self._warming = False
        self._init_look_ahead()
        #: failed attempts per inode in this session (a bug must not loop)
        self._attempts: collections.Counter = collections.Counter()
        self.limit = limit_bytes
        #: lay DICOM files out in extents with frames in the image codec
        self.dicom = dicom_aware
        #: chunks of one file re-encoded at once while file I/O is quiet
        self.window = window
        #: seconds without file reads or writes after which I/O counts as
        #: quiet (measured on the native subset: 0.2 s let the re-encoder in
        #: between a PACS's files, ingest 0.83x of paused; 1 s: 0.92x)
        self.quiet_after = quiet_after
        self._pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="dcmfs-reenc")
        #: inode -> uncompressed bytes it holds in the backlog
        self._queue: collections.OrderedDict[int, int] = collections.OrderedDict()
        #: bytes sealed uncompressed for files not committed yet
        self._reserved: dict[int, int] = {}
        self._bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        #: the inode being re-encoded now (its new objects are not named yet)
        self.current: int | None = None
        self.files_done = 0
        self.bytes_done = 0
        #: extents coded by an image codec (bands: a large frame is several,
        #: small frames share one)
        self.frames_coded = 0
        self.errors = 0
        with host.index.begin() as txn:
            for ino in txn.backlog():
                inode = txn.get_inode(ino)
                self._add(ino, inode.size if inode else 0)

    # --- the queue --------------------------------------------------------------
    def _add(self, ino: int, size: int) -> None:
        self._queue[ino] = self._queue.pop(ino, 0) + size
        self._bytes += size

    def reserve(self, ino: int, nbytes: int) -> bool:
        """May a chunk of ``nbytes`` be sealed uncompressed? (core lock held)

        Counted per chunk, so one huge file cannot overrun the limit.
        """
        if self._bytes + nbytes > self.limit:
            return False
        self._reserved[ino] = self._reserved.get(ino, 0) + nbytes
        self._bytes += nbytes
        return True

    def release(self, ino: int) -> None:
        """Uncommitted chunks of this inode were dropped (core lock held)."""
        self._bytes -= self._reserved.pop(ino, 0)

    def deferred(self, ino: int) -> None:
        """A commit left this inode's chunks uncompressed (core lock held)."""
        nbytes = self._reserved.pop(ino, 0)
        self._bytes -= nbytes
        self._add(ino, nbytes)
        self._wake.set()

    @property
    def backlog(self) -> tuple[int, int]:
        """(files, logical bytes) waiting."""
        return len(self._queue), self._bytes

    # --- the thread -------------------------------------------------------------
    def _start_warming(self) -> None:
        """Warm workers for the first files (starting one takes ~0.4 s) once
        there is work and the writes have paused (the loop calls it after
        :meth:`_yield_to_foreground`): started at the first close, the two
        workers' start-up took 0.9 s of CPU in the middle of a CT ingest
        (measured, issue 17: 400 files, re-encoder paused, 2.2 s of daemon
        CPU meanwhile); a mount with an empty backlog starts none."""
        if not self._warming and self.parsers is not None and self.dicom:
            self._warming = True
            threading.Thread(target=self.parsers.warm_all, daemon=True,
                             name="dcmfs-warm-parsers").start()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="dcmfs-reencode")
            self._thread.start()

    def stop(self) -> None:
        """Stop within a bound: workers are killed, whatever they are doing
        (the file they were on stays in the backlog for the next mount)."""
        self._stop.set()
        self._wake.set()
        self._running.set()
        if self.parsers is not None:
            self.parsers.close()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)
        self._stop_look_ahead()

    def pause(self) -> None:
        """Hold the thread after the file it is on (benchmarks, tests)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the backlog is empty (tests, ``recompress``)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue, timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait(0.5)
                continue
            with self.host.lock:
                ino = next(iter(self._queue), None)
            if ino is None:
                with self._idle:
                    self._idle.notify_all()
                if self.tiers.on and time.monotonic() >= self.tiers.next_look:
                    self._look_for_cold()
                    continue
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            # the analysis (pydicom, pure Python) competes with the FUSE
            # thread for the GIL: it waits for quiet too, and so does the
            # workers' start-up
            self._yield_to_foreground()
            if self._stop.is_set():
                continue
            self._start_warming()
            pause = 0.05
            self.current = ino  # verify: its new objects are not orphans
            try:
                done = self.encode(ino)
            except CodecMismatch as exc:  # a codec bug: the file stays as it is
                self.errors += 1
                log.error("re-encoding inode %d failed: %s", ino, loggable(exc))
                done = None
            except IntegrityError as exc:
                # a damaged object: leave the file as it is (reads report it)
                self.errors += 1
                self.host.damaged(ino, exc)
                done = None
            except Exception as exc:  # noqa: BLE001 — disk full, I/O error: try later
                self.errors += 1
                self._attempts[ino] += 1
                if self._attempts[ino] >= MAX_ATTEMPTS and not _transient(exc):
                    # not the disk: a bug, or a file that trips one; it is
                    # recorded and never retried automatically
                    log.error("re-encoding inode %d failed %d times (%s); it stays as it is "
                              "('dcmfs recompress --retry-failed' tries again)", ino,
                              MAX_ATTEMPTS, loggable(exc))
                    done = self._give_up(ino, "re-encode failed")
                else:
                    log.error("re-encoding inode %d failed, will retry: %s", ino,
                              loggable(exc))
                    done, pause = False, 5.0
            self.current = None
            try:
                with self.host.lock:
                    if done is False:  # open, changed or failed: to the back of the queue
                        if ino in self._queue:
                            self._queue.move_to_end(ino)
                    else:
                        if done is None:
                            self._drop(ino)
                        self._bytes -= self._queue.pop(ino, 0)
                        self._cooling.discard(ino)
            except Exception as exc:  # noqa: BLE001 — the entry stays; next time
                log.error("re-encoder backlog update failed: %s", loggable(exc))
                pause = 5.0
            if done is False or pause > 0.05:
                self._stop.wait(pause)  # without the lock: file operations go on

    def _yield_to_foreground(self) -> None:
        host = self.host
        while not self._stop.is_set() and self._bytes < self.limit // 2 \
                and time.monotonic() - host.last_activity() < self.quiet_after:
            self._stop.wait(self.quiet_after / 2)

    def _drop(self, ino: int) -> None:
        with self.host.write_txn() as txn:
            txn.remove_backlog(ino)

    def _give_up(self, ino: int, reason: str) -> bool | None:
        """Record that this version of the file stays as it is (``dcmfs
        stats`` counts the reason) and take it off the backlog."""
        try:
            with self.host.lock:
                with self.host.index.begin() as txn:
                    inode = txn.get_inode(ino)
                if inode is None:
                    return True
                with self.host.write_txn() as txn:
                    txn.put_content(ino, {"kind": FAILED, "generation": inode.generation,
                                          "reason": reason, "path": "general"})
                    txn.remove_backlog(ino)
        except Exception as exc:  # noqa: BLE001 — then it stays queued
            log.error("re-encoder could not record inode %d: %s", ino, loggable(exc))
            return False
        return True

    # --- one file ---------------------------------------------------------------
    def encode(self, ino: int) -> bool:
        """Re-encode one closed file.

        A DICOM file with native pixel data that the DICOM-aware codec has not
        seen yet is laid out again in extents: the bytes before the pixels,
        frames in bands (each coded by whichever exact result of the
        configured image codecs and zstd is cheapest, see
        :func:`dcmfs.storage.codec.cheapest`), the
        bytes after.  Any other file gets its uncompressed chunks compressed.
        What was found is recorded (sealed) for ``dcmfs stats``.

        Returns False when the file is open or changed under us (try later),
        True when it is done.
        """
        host = self.host
        with host.lock:
            if host.is_open(ino):
                return False
            with host.index.begin() as txn:
                inode = txn.get_inode(ino)
                table = txn.chunks(ino)
                content = txn.get_content(ino)
            if inode is None:
                return True  # deleted: its backlog entry went with it
        try:
            return self._encode(ino, inode, table, content)
        except CodecMismatch:
            raise
        except IntegrityError:
            # rewritten (or deleted) since we read its table, and the old
            # objects collected by a checkpoint: not damage, try again later
            with host.lock:
                if host.is_open(ino):
                    return False
                with host.index.begin() as txn:
                    if txn.get_inode(ino) is None:
                        return True
                    if txn.chunks(ino) != table:
                        return False
            raise

    def _encode(self, ino: int, inode, table, content) -> bool:
        host = self.host
        cipher = host.objects.file_cipher(inode.file_id, inode.secret)
        info = None
        fresh = _fresh(content, inode.generation, self.dicom)
        if not self.dicom and not fresh:
            info = {"kind": "unknown", "generation": inode.generation, "path": "general",
                    "reason": ""}
        elif fresh and ino in self._cooling:  # a hot file's turn to be coded densely
            if content.get("tier") != HOT or not extents_layout(table):
                return True
            return self._cool(ino, inode, table, cipher, content)
        elif not fresh and not extents_layout(table):
            reader = CommittedReader(host.objects, cipher, ino, inode, table, host.chunk_size)
            try:
                reader, plan = self._planned(ino, inode, table, reader)
            except ParserFailure as exc:
                if exc.stopped:
                    return False  # unmounting: the file stays in the backlog
                log.warning("inode %d: %s; it stays with the general codec", ino, exc.reason)
                plan = dicom.Plan({"kind": FAILED}, exc.reason)
            info = dict(plan.info, generation=inode.generation, reason=plan.reason,
                        path="general")
            if plan.codes_frames:
                try:
                    info.update(path="frames", **self.tiers.fields(cooling=False))
                    return self._encode_frames(ino, inode, table, cipher, plan, reader, info)
                except ParserFailure as exc:
                    if exc.stopped:
                        return False
                    log.warning("inode %d: %s while coding frames; the general codec takes "
                                "the file", ino, exc.reason)
                    info.update(kind=FAILED, path="general", reason=exc.reason)
                except (Unsuitable, CodecMismatch) as exc:
                    # byte-exact or nothing: the general codec takes the file
                    log.warning("inode %d: frames left to the general codec: %s", ino,
                                loggable(exc))
                    info.update(path="general", reason=_reason(exc))
        threshold = 0.97 if info and info.get("reason") == "encapsulated pixel data" else 1.0
        return self._encode_chunks(ino, inode, table, cipher, info, threshold)

    def _analyse(self, reader: CommittedReader, size: int) -> dicom.Plan:
        """The plan of a file from its first bytes (at most HEADER_CAP; a
        file that does not even start like DICOM is not sent anywhere)."""
        if not dicom.sniff(reader.pread(0, 132)):
            return dicom.Plan({"kind": "other"}, "not DICOM")
        head = reader.pread(0, min(size, dicom.HEADER_CAP))
        if self.parsers is not None:
            return self.parsers.analyse(head, size)
        return dicom.analyse(io.BytesIO(head), size)  # -o sandbox=0

    def _encode_chunks(self, ino, inode, table, cipher, info, threshold: float) -> bool:
        """Compress the uncompressed chunks of a file with the store codec
        (kept only when they shrink below ``threshold`` of the original)."""
        host = self.host
        todo = {i: r for i, r in table.items() if r.codec == NONE}

        def one(idx: int, ref):
            plain = host.objects.read(cipher, inode.file_id, ino, idx, ref)
            nref = host.objects.write(cipher, inode.file_id, ino, idx, ref.generation,
                                      ref.flags, host.general_codec, plain, inline=False)
            if nref.codec != NONE and nref.stored_len >= threshold * nref.plain_len:
                host.objects.delete(nref.oid)  # saves too little: keep the original
                return ref
            return nref

        return self._run(ino, table, ((i, one, (i, r)) for i, r in sorted(todo.items())),
                         info, replace_all=False, size=inode.size)

    def _encode_frames(self, ino, inode, table, cipher, plan, reader, info,
                       cooling: bool = False) -> bool:
        host = self.host
        image = self.tiers.image_codec(cooling)
        level, images = host.objects.codecs.encode_settings()
        settings = (level, images if image == IMAGE else HOT_IMAGE)
        cs = host.chunk_size
        extents = extents_of(plan, inode.size, cs, self.tiers.band_bytes(cooling))
        last = len(extents) - 1
        hasher = hasher_for(inode, cs)

        def one(n: int, start: int, data: bytes, frame):
            codec = image if frame is not None else host.general_codec
            flags = CHUNK_FLAG_EXTENT | (CHUNK_FLAG_LAST if n == last else 0)
            payload = None
            if frame is not None and self.parsers is not None:
                # the encoders see untrusted geometry and samples: in a
                # worker; the object store decodes and compares the result
                codec, payload = self.parsers.encode(data, frame, *settings, hot=image == IMAGE_HOT)
            ref = host.objects.write(cipher, inode.file_id, ino, n, inode.generation, flags,
                                     codec, data, frame, payload=payload, inline=False)
            return ref._replace(offset=start)

        def jobs():
            for n, (start, length, frame) in enumerate(extents):
                data = reader.pread(start, length)  # authenticated old objects
                hasher.update(data)
                if n == last and inode.digest is not None and hasher.digest() != inode.digest:
                    raise IntegrityError(f"inode {ino}: content does not match its checksum")
                yield n, one, (n, start, data, frame)
            self._look_ahead(ino)  # every band handed out: the next file's analysis

        counts = collections.Counter()
        done = self._run(ino, table, jobs(), info, replace_all=True, size=inode.size,
                         counts=counts)
        if done:
            self.frames_coded += sum(counts[c] for c in IMAGE_CODECS)
        return done

    def _run(self, ino, table, jobs, info, replace_all: bool, size: int, counts=None) -> bool:
        """Run (index, function, args) jobs on the re-encoder's threads, then
        swap the new chunk references in, if the file is still closed and
        unchanged.  ``replace_all``: the new references are the whole table."""
        host = self.host
        new = {}
        # jobs go to the re-encoder's own threads (never ahead of the core's
        # sealing jobs); two at a time while file I/O is quiet, so a big file
        # gets both cores; while files are written or read it waits (the PACS
        # comes first), unless the backlog is past half its room: then one
        # job at a time, so that close need not compress inline
        window: collections.deque = collections.deque()
        try:
            for job in itertools.chain(jobs, [None]):
                if job is not None:
                    self._yield_to_foreground()
                    if self._stop.is_set():
                        return False
                    idx, fn, args = job
                    window.append((idx, self._pool.submit(fn, *args)))
                quiet = time.monotonic() - host.last_activity() > self.quiet_after
                width = self.window if quiet else 1
                while window and (job is None or len(window) >= width):
                    done_idx, fut = window.popleft()
                    nref = fut.result()
                    if replace_all or nref.codec != NONE:
                        new[done_idx] = nref
                        if counts is not None:
                            counts[nref.codec] += 1
                    elif nref.oid != table[done_idx].oid:  # incompressible: keep the original
                        host.objects.delete(nref.oid)
            with host.lock:
                if host.is_open(ino):
                    raise _Retry
                with host.index.begin() as txn:
                    if txn.chunks(ino) != table:  # written since we read it
                        raise _Retry
                gone = [i for i in table if replace_all and i not in new]
                replaced = [i for i in table if i in new or i in gone]
                with host.write_txn() as txn:
                    for idx, nref in new.items():
                        txn.put_chunk(ino, idx, nref)
                    for idx in gone:
                        txn.delete_chunk(ino, idx)
                    txn.add_stored(ino, sum(stored_bytes(r) for r in new.values())
                                   - sum(stored_bytes(table[i]) for i in replaced))
                    txn.remove_backlog(ino)
                    if info is not None:
                        txn.put_content(ino, info)
                host.forget_inode(ino)  # st_blocks: the new stored size
                host.after_commit(file_oids(table[i] for i in replaced))
                self.files_done += 1
                self.bytes_done += size
                new = {}
            return True
        except _Retry:
            return False
        finally:
            unused = list(new.values())
            for _, fut in window:  # stopped or failed half-way: wait, then clean up
                if fut.exception() is None:
                    unused.append(fut.result())
            for nref in unused:  # not swapped in: nothing refers to them
                if nref.oid not in {r.oid for r in table.values()}:
                    host.objects.delete(nref.oid)


def _transient(exc: BaseException) -> bool:
    """A failure of the disk or the store, not of the file: retry."""
    return isinstance(exc, (StoreIOError, OSError))


def _reason(exc: Exception) -> str:
    if isinstance(exc, CodecMismatch):
        return "image codec not byte-exact"
    return "image codec refused a frame"


class _Retry(Exception):
    """The file changed while it was being re-encoded."""
