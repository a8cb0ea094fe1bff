"""Decoding ahead of readers, for :class:`dcmfs.core.contents.FileData`:
the next extents of a file read in order, and the first objects of the
files a reader walking a directory opens next (:mod:`dcmfs.core.readahead`).
Decoded objects go into the decoded cache; a read that finds one being
decoded waits for it.  A failure here is left for the read itself to meet
and report."""

from __future__ import annotations

from ..index import Inode
from ..storage.objects import ChunkRef
from .openfile import OpenFile


class Prefetching:
    """Needs ``objects``, ``cache``, ``chunk_size``, ``_prefetch_pool``,
    ``_prefetching`` and ``_prefetch_lock`` (set by FileData)."""

    def _prefetch(self, of: OpenFile, idx: int) -> None:
        """Decode extent ``idx`` in the background (sequential reads of
        DICOM-coded files: the next band decodes while this one is read)."""
        self._prefetch_ref(of.cipher, of.inode.file_id, of.ino, idx, of.committed[idx])

    def _prefetch_ref(self, cipher, file_id: bytes, ino: int, idx: int, ref: ChunkRef) -> bool:
        with self._prefetch_lock:
            if ref.oid in self._prefetching or self.cache.get(ref.oid) is not None:
                return False
            self._prefetching[ref.oid] = self._prefetch_pool.submit(
                self._prefetch_one, cipher, file_id, ino, idx, ref)
            return True

    def decode_ahead(self, ino: int, inode: Inode, committed: dict, end: int) -> int:
        """Decode the objects of a closed file's first ``end`` bytes in the
        background (a reader walking a directory opens it next: see
        :mod:`dcmfs.core.readahead`); returns how many were queued."""
        cs = self.chunk_size
        refs = sorted(((ref.offset if ref.offset >= 0 else idx * cs), idx, ref)
                      for idx, ref in committed.items())
        cipher = None
        queued = 0
        for lo, idx, ref in refs:
            if lo >= end:
                break
            if cipher is None:
                cipher = self.objects.file_cipher(inode.file_id, inode.secret)
            queued += self._prefetch_ref(cipher, inode.file_id, ino, idx, ref)
        return queued

    def _prefetch_one(self, cipher, file_id, ino, idx, ref) -> bytes | None:
        try:
            data = self.objects.read(cipher, file_id, ino, idx, ref)
            self.cache.put(ref.oid, data)
            return data
        except Exception:  # noqa: BLE001 — the read itself will meet it and report it
            return None
        finally:
            with self._prefetch_lock:
                self._prefetching.pop(ref.oid, None)
