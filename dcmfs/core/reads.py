"""Reading file contents (a part of :class:`dcmfs.core.contents.FileData`):
committed chunks through the decoded cache, extents by bisection with
read-ahead for a sequential reader, and for a random reader only the 64 KiB
frames of framed objects (:mod:`dcmfs.storage.frames`) a read touches."""

from __future__ import annotations

import bisect
import time

from ..errors import IntegrityError
from ..format import CHUNK_FLAG_FRAMED, CHUNK_FLAG_LAST
from ..storage.frames import FRAME_SIZE, UNIT_SIZE
from ..storage.objects import ChunkRef

from .openfile import OpenFile


class FileReads:
    """The read half of :class:`~dcmfs.core.contents.FileData` (its cache,
    objects, prefetch pool and damage reporting)."""

    # --- reading --------------------------------------------------------------
    def _load(self, of: OpenFile, idx: int, ref: ChunkRef) -> bytes:
        data = self.cache.get(ref.oid)
        if data is None:
            with self._prefetch_lock:
                fut = self._prefetching.get(ref.oid)
            data = fut.result() if fut is not None else None
        if data is None:
            try:
                data = self.objects.read(of.cipher, of.inode.file_id, of.ino, idx, ref)
            except IntegrityError as exc:
                self.on_damage(of.ino, exc)
                raise
            self.cache.put(ref.oid, data)
        return data

    def _load_range(self, of: OpenFile, idx: int, ref: ChunkRef, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of the chunk ``ref`` names (shorter past its
        end), for a random reader: of a framed object not decoded whole,
        only the frames the range touches are read and authenticated, and
        only the 32 KiB units it lies in decoded (and cached)."""
        whole = self.cache.get(ref.oid)
        if whole is None and ref.flags & CHUNK_FLAG_FRAMED:
            hi = min(hi, ref.plain_len)
            if lo >= hi:
                return b""
            first, last = lo // UNIT_SIZE, (hi - 1) // UNIT_SIZE
            if first == last:  # a small read (4 KiB): one unit, no lists
                key = ref.oid + first.to_bytes(4, "big")
                unit = self.cache.get(key)
                if unit is None:
                    try:
                        unit = self.objects.read_unit(of.cipher, of.inode.file_id, of.ino, idx,
                                                      ref, first)
                    except IntegrityError as exc:
                        self.on_damage(of.ino, exc)
                        raise
                    self.cache.put(key, unit)
                base = first * UNIT_SIZE
                return unit[lo - base:hi - base]
            keys = [ref.oid + u.to_bytes(4, "big") for u in range(first, last + 1)]
            got = [self.cache.get(key) for key in keys]
            if None in got:
                try:
                    got = self.objects.read_units(of.cipher, of.inode.file_id, of.ino, idx,
                                                  ref, first, last)
                except IntegrityError as exc:
                    self.on_damage(of.ino, exc)
                    raise
                for key, unit in zip(keys, got):
                    self.cache.put(key, unit)
            base = first * UNIT_SIZE
            data = got[0] if len(got) == 1 else b"".join(got)
            return data[lo - base:hi - base]
        if whole is None:
            whole = self._load(of, idx, ref)
        return whole[lo:hi]

    def chunk_plain(self, of: OpenFile, idx: int,
                    part: tuple[int, int] | None = None) -> bytes | bytearray:
        """The current plaintext of chunk ``idx`` (may be shorter than the
        chunk: the rest reads as zeros); with ``part`` (lo, hi), only those
        bytes of it (a random reader: of a framed object only the frames
        they lie in are decoded)."""
        buf = of.dirty.get(idx)
        fut = of.pending.get(idx) if buf is None else None
        if fut is not None and fut.exception() is not None:
            buf = fut.plaintext  # not written (yet): still in memory
        if buf is not None:
            return buf if part is None else buf[part[0]:part[1]]
        if fut is not None:
            ref = fut.result()
        else:
            ref = of.committed.get(idx)
            if idx == (of.size - 1) // self.chunk_size and not of.changed:
                # the last chunk is always stored, with the LAST flag: a missing
                # entry or flag means the index or the object was tampered with
                if ref is None or not ref.flags & CHUNK_FLAG_LAST:
                    exc = IntegrityError(f"inode {of.ino}: last chunk {idx} is missing or "
                                         "unflagged")
                    self.on_damage(of.ino, exc)
                    raise exc
        if ref is None:
            return b""
        if part is None:
            return self._load(of, idx, ref)
        return self._load_range(of, idx, ref, *part)

    def _read_extents(self, of: OpenFile, offset: int, end: int, ahead: bool = True,
                      whole: bool = True) -> bytes:
        """Read from the extent layout: only the extents (frames) the range
        touches are decoded (and, with ``ahead``, the next ones prefetched;
        without ``whole``, of framed extents only the 64 KiB frames read)."""
        starts, order = of.extents
        parts = []
        k = max(0, bisect.bisect_right(starts, offset) - 1)
        pos = offset
        while pos < end:
            if k >= len(order):
                raise self._bad_layout(of, "extents end before the file does")
            idx = order[k]
            ref = of.committed[idx]
            if ref.offset > pos or (k + 1 == len(order)) != bool(ref.flags & CHUNK_FLAG_LAST):
                raise self._bad_layout(of, f"extent {idx} is out of place")
            for later in order[k + 1:k + 1 + self.READ_AHEAD] if ahead else ():
                self._prefetch(of, later)  # decoding on the other core meanwhile
            if whole:
                piece = self._load(of, idx, ref)[pos - ref.offset:end - ref.offset]
            else:
                piece = self._load_range(of, idx, ref, pos - ref.offset, end - ref.offset)
            if not piece:
                raise self._bad_layout(of, f"extent {idx} is shorter than its place")
            parts.append(piece)
            pos += len(piece)
            k += 1
        if end == of.size and (k != len(order) or
                               of.committed[order[-1]].offset + of.committed[order[-1]].plain_len
                               != of.size):
            raise self._bad_layout(of, "extents do not end where the file does")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _bad_layout(self, of: OpenFile, what: str) -> IntegrityError:
        exc = IntegrityError(f"inode {of.ino}: {what}")
        self.on_damage(of.ino, exc)
        return exc

    def read(self, of: OpenFile, offset: int, size: int, ahead: bool = True) -> bytes:
        self.last_activity = time.monotonic()  # background work yields to readers too
        end = min(offset + size, of.size)
        if offset >= end:
            return b""
        # read ahead only for a sequential reader (the kernel's own
        # read-ahead may reorder its requests a little, or skip ahead);
        # random access decodes what it reads and nothing more: a small read
        # (under a frame) of a framed object, only the frames it touches.
        # The kernel's read-ahead asks for 128 KiB and more: such a read
        # near the last one is sequential, and any such read decodes whole
        # objects, as the reads near it will.  A small read is sequential
        # only when the one before it was near its own predecessor too (or
        # it starts the file): a random reader's read that lands near the
        # last by chance (1 in 512 of 4 KiB reads in 256 MiB) decoded whole
        # objects and two more ahead, a quarter of all its decoding
        near = abs(offset - of.read_end) <= self.SEQUENTIAL_SLACK
        big = end - offset >= FRAME_SIZE
        sequential = near and (big or of.read_near or offset == 0)
        of.read_end, of.read_near = end, near
        whole = sequential or big
        if of.extents is not None:
            return self._read_extents(of, offset, end, ahead and sequential, whole)
        cs = self.chunk_size
        parts = []
        for idx in range(offset // cs, (end - 1) // cs + 1):
            base = idx * cs
            lo, hi = max(offset, base) - base, min(end, base + cs) - base
            piece = self.chunk_plain(of, idx)[lo:hi] if whole else \
                self.chunk_plain(of, idx, (lo, hi))
            if len(piece) < hi - lo:
                piece = bytes(piece) + bytes(hi - lo - len(piece))
            parts.append(piece)
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
