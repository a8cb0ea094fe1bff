"""File contents: chunk buffers, the sealing pool and the commit protocol.

A file is cut into ``chunk_size`` plaintext chunks.  While a file is open its
state lives in an :class:`OpenFile`: chunks being written sit in *dirty*
buffers; a chunk that fills up (or the oldest ones, when the dirty bytes of a
file pass ``dirty_limit``) is handed to a small thread pool that compresses,
checks, seals and writes it (zstd, AES-GCM and write release the GIL).
``commit`` (called from flush/fsync/release) waits for those objects, fixes
the last-chunk flags, computes the whole-file SHA-256 and commits the new
chunk table, size, hash and generation in one index transaction (journaled,
see :mod:`dcmfs.index`).

Crash policy: objects are written before the transaction that names them is
journaled, and made durable before the journal or a checkpoint is (see
``FileSystem.make_durable``); objects a commit supersedes are deleted only
after the next checkpoint, when no durable index state names them any more.
A crash in between leaves unreferenced objects, which the unclean-mount
check removes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Callable

from ..storage.codec import NONE
from ..format import CHUNK_FLAG_LAST
from ..index import Index, Inode
from ..storage.digest import block_digest, tree_digest
from ..storage.objects import ChunkRef, ObjectStore, file_oids, stored_bytes

from .garbage import Garbage
from .prefetch import Prefetching
from .reads import FileReads
from .openfile import (ChunkCache, InlineJob, OpenFile, all_zero, done_future,
                       on_written, settled_info, settles_at_close)

log = logging.getLogger("dcmfs.data")


class FileData(Prefetching, Garbage, FileReads):
    """Reads, writes and commits file contents for the filesystem core."""

    #: a read starting this close to where the last one ended is sequential
    SEQUENTIAL_SLACK = 256 * 1024
    #: extents (bands of DICOM frames) decoded ahead of a sequential reader
    READ_AHEAD = 2

    def __init__(self, index: Index, objects: ObjectStore, chunk_size: int, codec: int,
                 workers: int, max_inflight: int, dirty_limit: int, cache_bytes: int,
                 read_ahead: int = READ_AHEAD) -> None:
        self.READ_AHEAD = read_ahead  # more for an S3 store: each read waits on a GET
        self.index = index
        self.objects = objects
        self.chunk_size = chunk_size
        self.codec = codec
        #: may chunks be sealed uncompressed now, for the re-encoder to
        #: compress later? (the core points this at the backlog's room)
        self.may_defer: Callable[[int, int], bool] = lambda ino, nbytes: False
        #: queue every committed file for the re-encoder (DICOM-aware policy)
        self.queue_all = False
        #: monotonic time of the last file read or write, or of a burst of
        #: other requests (background work yields to it: see note_request)
        self.last_activity = 0.0
        self._burst = (0.0, 0)
        self.commits = 0  # file versions committed (the de-identified view follows them)
        self.dirty_limit = dirty_limit
        self.cache = ChunkCache(cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dcmfs-seal")
        self._prefetch_pool = ThreadPoolExecutor(max_workers=self.READ_AHEAD,
                                                 thread_name_prefix="dcmfs-ahead")
        self._prefetching: dict[bytes, Future] = {}
        self._prefetch_lock = threading.Lock()
        self._inflight: collections.deque[Future] = collections.deque()
        self._max_inflight = max_inflight
        Garbage.__init__(self, objects)

    def shutdown(self) -> None:
        self._prefetch_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    # --- opening --------------------------------------------------------------
    def open_file(self, ino: int, inode: Inode) -> OpenFile:
        with self.index.begin() as txn:
            committed = txn.chunks(ino)
        of = OpenFile(ino, inode, committed)
        of.cipher = self.objects.file_cipher(inode.file_id, inode.secret)
        if any(r.offset >= 0 for r in committed.values()):
            order = sorted(committed, key=lambda i: committed[i].offset)
            of.extents = ([committed[i].offset for i in order], order)
        return of

    def _to_fixed(self, of: OpenFile) -> None:
        """Before the first change to an extent-laid-out file: copy it into
        fixed chunks (sealed as usual; the extents are superseded at commit).
        Costs one read and write of the file; PACS rarely rewrite a file."""
        cs = self.chunk_size
        count = -(-of.size // cs)
        for idx in range(count):
            if idx in of.dirty or idx in of.pending:
                continue
            data = self._read_extents(of, idx * cs, min(of.size, (idx + 1) * cs))
            of.dirty[idx] = bytearray(data)
            of.dirty_bytes += cs
            if idx < count - 1:
                self._submit(of, idx, last=False)
        for idx in of.committed:
            if idx >= count:  # extent numbers past the chunks: gone at commit
                of.pending[idx] = done_future(None)
        of.extents = None

    #: this many requests within BURST_SECONDS are a burst (a poller's few a
    #: second are not: a re-encoder waiting for quiet would wait for ever)
    BURST_REQUESTS, BURST_SECONDS = 20, 0.1

    def note_request(self) -> None:
        """A request of any kind (create, stat, unlink…); a burst of them is
        activity as a read or write is (measured, issue 17: the re-encoder
        rewrote the objects of 5 000 small files while they were stat'ed
        and unlinked).  Called under the core's lock."""
        now = time.monotonic()
        start, count = self._burst
        if now - start > self.BURST_SECONDS:
            start, count = now, 0
        self._burst = (start, count + 1)
        if count + 1 >= self.BURST_REQUESTS:
            self.last_activity = now

    # --- writing --------------------------------------------------------------
    def _dirty_buffer(self, of: OpenFile, idx: int) -> bytearray:
        buf = of.dirty.get(idx)
        if buf is not None:
            if type(buf) is not bytearray:  # a write kept as it came (see write)
                buf = of.dirty[idx] = bytearray(buf)
            return buf
        content = self.chunk_plain(of, idx)
        limit = max(0, min(self.chunk_size, of.size - idx * self.chunk_size))
        buf = bytearray(content[:limit])
        self._new_dirty(of, idx, buf)
        return buf

    def _new_dirty(self, of: OpenFile, idx: int, buf: bytes | bytearray) -> None:
        """``buf`` is chunk ``idx``'s content now; what was sealed for it
        before is superseded."""
        fut = of.pending.pop(idx, None)
        if fut is not None:
            of.discarded.append(fut)
        of.dirty[idx] = buf
        of.dirty_bytes += self.chunk_size
        if of.dirty_bytes > self.dirty_limit:
            for old in sorted(of.dirty):
                if old != idx and of.dirty_bytes > self.dirty_limit:
                    self._submit(of, old, last=False)

    def write(self, of: OpenFile, offset: int, data: bytes) -> int:
        self.last_activity = time.monotonic()
        if of.extents is not None:
            self._to_fixed(of)
        if of.write_error is not None:
            # a chunk sealed in the background failed (disk full): tell the
            # writer now; the chunk's data is kept and retried at commit
            exc, of.write_error = of.write_error, None
            raise exc
        cs = self.chunk_size
        view = memoryview(data)
        pos = 0
        total = len(data)
        while pos < total:
            off = offset + pos
            idx, within = divmod(off, cs)
            n = min(cs - within, total - pos)
            if within == 0 and idx not in of.dirty and of.size <= off:
                # the chunk holds nothing yet (a new file, or past its end):
                # its content is this write's bytes, kept as they came, not
                # copied into a buffer here and out of it again at sealing
                # (issue 17); a later write to the chunk copies them
                whole = n == total and type(data) is bytes
                self._new_dirty(of, idx, data if whole else bytes(view[pos:pos + n]))
            else:
                buf = self._dirty_buffer(of, idx)
                if len(buf) < within:
                    buf.extend(bytes(within - len(buf)))
                buf[within:within + n] = view[pos:pos + n]
            pos += n
            if off + n > of.size:
                of.size = off + n
            if within + n == cs:
                self._submit(of, idx, last=False)
        of.changed = True
        return total

    def truncate(self, of: OpenFile, length: int) -> None:
        cs = self.chunk_size
        if of.extents is not None:
            if length == 0:  # every extent becomes a hole below
                of.extents = None
            else:
                self._to_fixed(of)
        if length < of.size:
            first_gone = -(-length // cs)  # chunks at or past this index vanish
            for idx in [i for i in of.dirty if i >= first_gone]:
                del of.dirty[idx]
                of.dirty_bytes -= cs
            for idx in [i for i in of.pending if i >= first_gone]:
                of.discarded.append(of.pending.pop(idx))
            for idx in [i for i in of.committed if i >= first_gone]:
                # removed from the table at commit; mark the chunk as a hole now
                of.pending[idx] = done_future(None)
            if length % cs:
                idx = length // cs
                buf = self._dirty_buffer(of, idx)
                del buf[length % cs:]
        of.size = length
        of.changed = True

    # --- sealing --------------------------------------------------------------
    def _submit(self, of: OpenFile, idx: int, last: bool, block: bool = True,
                inline: bool = False) -> None:
        buf = of.dirty.pop(idx)
        of.dirty_bytes -= self.chunk_size
        # a chunk before the last is a whole block (a sparse write leaves it
        # short): its record's digest is then its block's (storage.digest)
        plaintext = bytes(buf) if last else bytes(buf).ljust(self.chunk_size, b"\0")
        if not last and all_zero(plaintext):
            of.pending[idx] = done_future(None)  # an all-zero chunk is stored as a hole
            return
        while self._inflight and (self._inflight[0].done() or
                                  block and len(self._inflight) >= self._max_inflight):
            self._inflight.popleft().exception()  # wait; errors go to their commit
        settled = last and idx == 0 and settles_at_close(plaintext, self.codec)
        deferred = (not settled and self.codec != NONE
                    and self.may_defer(of.ino, len(plaintext)))
        codec = NONE if deferred else self.codec
        args = (of.cipher, of.inode.file_id, of.ino, idx, of.write_generation,
                CHUNK_FLAG_LAST if last else 0, codec, plaintext)
        fut = (InlineJob(self.objects.write, args) if inline
               else self._pool.submit(self.objects.write, *args))
        # the plaintext is kept only until the object is safely written, so
        # that a failed write (disk full) can be retried by the next commit
        fut.plaintext = plaintext
        fut.idx = idx
        fut.deferred = deferred
        fut.settled = settled
        of.pending[idx] = fut
        if not inline:  # (an inline job is done before anyone waits for room)
            self._inflight.append(fut)
        fut.add_done_callback(lambda f, of=of: on_written(f, of))

    def wait_for_room(self) -> None:
        """Wait until fewer than ``max_inflight`` sealing jobs run (called
        without the core's lock, before a write: the write's own
        back-pressure then rarely waits with the lock held)."""
        while True:
            busy = [f for f in list(self._inflight) if not f.done()]
            if len(busy) < self._max_inflight:
                return
            futures_wait(busy, return_when=FIRST_COMPLETED)

    def seal_dirty(self, of: OpenFile, inline: bool = False) -> list[Future]:
        """Hand every dirty chunk to the sealing pool; returns the jobs a
        commit would wait for.  The caller may wait for them without the
        core's lock (fsync), so that the commit after is short.  No
        back-pressure here: the chunks are in memory already, and a job
        frees its plaintext once written.  ``inline``: a lone dirty chunk
        becomes an :class:`InlineJob` the caller runs without the lock (no
        hand-off to a pool thread that it would only wait for: issue 17)."""
        last_idx = (of.size - 1) // self.chunk_size if of.size else -1
        alone = inline and len(of.dirty) == 1
        for idx in sorted(of.dirty):
            self._submit(of, idx, last=(idx == last_idx), block=False, inline=alone)
        return list(of.pending.values())

    def _wait_pending(self, of: OpenFile) -> dict[int, ChunkRef | None]:
        """Wait for every pending object.

        A failed object's plaintext goes back to the dirty set and the first
        error is raised; objects already written stay pending for the retry.
        """
        first_error = None
        for idx, fut in list(of.pending.items()):
            exc = fut.exception()
            if exc is not None:
                del of.pending[idx]
                of.dirty[idx] = bytearray(fut.plaintext)
                of.dirty_bytes += self.chunk_size
                first_error = first_error or exc
        for fut in of.discarded:
            if fut.exception() is None and fut.result() is not None:
                self.objects.delete(fut.result().oid)
        of.discarded.clear()
        of.write_error = None
        if first_error is not None:
            raise first_error
        return {idx: fut.result() for idx, fut in of.pending.items()}

    # --- committing -----------------------------------------------------------
    def commit(self, of: OpenFile) -> None:
        """Make the file's current content the committed version.

        Raises NoSpaceError/StoreIOError with the file's data kept (in memory
        or in written objects), so a retry after space was freed succeeds.
        """
        if not of.changed:
            return
        cs = self.chunk_size
        size = of.size
        last_idx = (size - 1) // cs if size else -1
        self.seal_dirty(of)
        written = self._wait_pending(of)
        table = dict(of.committed)
        for idx, ref in written.items():
            if ref is None:
                table.pop(idx, None)
            else:
                table[idx] = ref
        for idx in [i for i in table if i > last_idx]:
            del table[idx]
        self._fix_last_flags(of, table, written, last_idx, size)
        digest = self._digest(of, table, size)

        old = of.committed
        # (a record that only gained its digest keeps its object)
        superseded = file_oids(r for i, r in old.items()
                               if i not in table or table[i].oid != r.oid)
        stored_delta = (sum(stored_bytes(r) for r in table.values())
                        - sum(stored_bytes(r) for r in old.values()))
        inode = of.inode
        new_inode = Inode(**{**inode.__dict__, "size": size, "digest": digest, "tree": True,
                             "generation": of.write_generation,
                             "stored": sum(stored_bytes(r) for r in table.values())})
        # left for the re-encoder: sealed uncompressed on purpose (a chunk that
        # did not compress is not re-tried)
        deferred = any(getattr(f, "deferred", False) for f in of.pending.values())
        settled = last_idx == 0 and getattr(of.pending.get(0), "settled", False)
        queue = deferred or (self.queue_all and size > 0 and not settled)
        with self.index.begin(write=True) as txn:
            if queue:
                txn.add_backlog(of.ino)
            elif settled and self.queue_all:
                txn.put_content(of.ino, settled_info(of.write_generation))
            for idx, ref in table.items():
                if old.get(idx) != ref:
                    txn.put_chunk(of.ino, idx, ref)
            for idx in old:
                if idx not in table:
                    txn.delete_chunk(of.ino, idx)
            txn.put_inode(of.ino, new_inode)
            txn.add_stats(logical=size - inode.size, stored=stored_delta)
        inode.size, inode.digest, inode.generation = size, digest, new_inode.generation
        inode.tree, inode.stored = True, new_inode.stored
        of.committed = table
        of.pending.clear()
        of.changed = False
        self.commits += 1
        self.after_commit(superseded)
        if queue:
            self.on_deferred(of.ino)

    def on_damage(self, ino: int, exc: Exception) -> None:
        """Hook: an integrity error was met reading this inode (the core sets it)."""
        log.error("integrity error in inode %d: %s", ino, exc)

    def on_discarded(self, ino: int) -> None:
        """Hook: an open file's uncommitted chunks were dropped (the core sets it)."""

    def on_deferred(self, ino: int) -> None:
        """Hook: a commit left chunks for the re-encoder (the core sets it)."""

    def _fix_last_flags(self, of: OpenFile, table: dict[int, ChunkRef],
                        written: dict[int, ChunkRef | None], last_idx: int, size: int) -> None:
        """Reseal chunks so that the last one, and only it, has the LAST flag.

        Needed when a file ends exactly on a chunk boundary (its last chunk was
        sealed early as full) or grew past a former last chunk.
        """
        cs = self.chunk_size
        wrong = [i for i, r in table.items() if r.flags & CHUNK_FLAG_LAST and i != last_idx]
        if last_idx >= 0 and not (last_idx in table and table[last_idx].flags & CHUNK_FLAG_LAST):
            wrong.append(last_idx)
        for idx in wrong:
            ref = table.get(idx)
            plain = bytes(self._load(of, idx, ref)) if ref is not None else b""
            flags = 0
            if idx == last_idx:
                flags = CHUNK_FLAG_LAST
                plain = plain[:size - idx * cs].ljust(size - idx * cs, b"\0")
            else:  # a former last chunk: a whole block now
                plain = plain.ljust(cs, b"\0")
            new = self.objects.write(of.cipher, of.inode.file_id, of.ino, idx,
                                     of.write_generation, flags, self.codec, plain)
            replaced = written.get(idx)
            # a retry after a failed commit must find the new object, not the old
            of.pending[idx] = done_future(new)
            if replaced is not None:  # sealed this round, never in the index
                self.objects.delete(replaced.oid)
            table[idx] = written[idx] = new

    def _digest(self, of: OpenFile, table: dict[int, ChunkRef], size: int) -> bytes:
        """The file's tree digest from its chunk records: the chunks this
        commit wrote carry their digest, so nothing is read or hashed again
        but a chunk whose record lacks it (written before the tree digest)
        or that is shorter than its block (a last chunk the file grew past
        by truncation); such a record gets its digest now, once."""
        cs = self.chunk_size
        last = (size - 1) // cs if size else -1
        blocks = []
        for idx in sorted(table):
            ref = table[idx]
            length = cs if idx < last else size - idx * cs
            digest = ref.digest
            if digest is None or ref.plain_len != length:
                plain = bytes(self._load(of, idx, ref))[:length].ljust(length, b"\0")
                digest = block_digest(plain)
                if ref.plain_len == length:
                    table[idx] = ref._replace(digest=digest)
            blocks.append((idx, digest, length))
        return tree_digest(size, blocks)

    def discard(self, of: OpenFile) -> None:
        """Forget an open file's uncommitted changes (it was unlinked, or its
        last commit failed): delete the objects sealed for it, which no index
        entry refers to."""
        committed = {r.oid for r in of.committed.values()}
        for fut in list(of.pending.values()) + of.discarded:
            if fut.exception() is None and fut.result() is not None \
                    and fut.result().oid not in committed:
                self.objects.delete(fut.result().oid)
        of.pending.clear()
        of.discarded.clear()
        self.on_discarded(of.ino)
        of.dirty.clear()
        of.dirty_bytes = 0
        of.changed = False
