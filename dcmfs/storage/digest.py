"""A file's digest, computed from its blocks (a leaf: imports nothing of ours).

The file is cut into logical blocks of the store's chunk size (the last one
shorter).  Each block's digest is the SHA-256 of its bytes; blocks of zeros
(holes, sparse regions) are left out, so they cost nothing.  The file's
digest is

    SHA-256("dcmfs-tree-1" || u64 size || for each non-zero block, in order:
            u64 block index || SHA-256(block))

It does not depend on how the file is stored (fixed chunks, or extents of
DICOM frames), so the re-encoder and ``dcmfs verify`` check any layout
against it by reading the file once, in order (:class:`TreeHasher`); and in
the fixed layout each chunk record keeps its block's digest, so a commit
hashes only the chunks it wrote (:func:`tree_digest`), whatever the size of
the file.

Stores made before the tree digest keep a whole-file SHA-256 in inodes not
written since (:class:`WholeHasher`); both kinds are checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

_U64 = struct.Struct(">Q")
_LABEL = b"dcmfs-tree-1"
_ZERO_DIGESTS: dict[int, bytes] = {}


def block_digest(block: bytes) -> bytes:
    return hashlib.sha256(block).digest()


class Digester:
    """Block digests of long blocks computed on a thread of its own while
    the caller does other work with the block: the sealing of a chunk
    compresses and encrypts it meanwhile (zstd, AES-GCM and SHA-256 all
    release the GIL), so a closing writer waits for the longer of the two,
    not for their sum, when a core is free (issue 17: SHA-256 was 0.4 ms of
    a 513 KB CT slice's 1.0 ms seal)."""

    #: blocks shorter than this are hashed by the caller (the hand-off
    #: would cost more than it saves)
    APART = 256 * 1024

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        #: callers between :meth:`sealing`'s start and end
        self._active = 0

    @contextlib.contextmanager
    def sealing(self):
        """Around one caller's work with a block: while another caller is
        at work too, no core is free for the digest thread (two cores, and
        several writers: measured, issue 17) and :meth:`later` hashes in
        place, saving the hand-off."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def later(self, block: bytes) -> Callable[[], bytes]:
        """A callable that returns ``block_digest(block)`` (it waits for
        the digest thread); ``block`` must not change meanwhile."""
        if len(block) < self.APART or self._active > 1:
            digest = block_digest(block)
            return lambda: digest
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dcmfs-digest")
            return self._pool.submit(block_digest, block).result

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (cached: few lengths occur)."""
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = _ZERO_DIGESTS[length] = block_digest(bytes(length))
        if len(_ZERO_DIGESTS) > 64:
            _ZERO_DIGESTS.pop(next(iter(_ZERO_DIGESTS)))
    return d


def tree_digest(size: int, blocks: Iterable[tuple[int, bytes, int]]) -> bytes:
    """The file digest from ``(block index, block digest, block length)`` of
    its blocks in order (holes may be omitted; zero blocks are skipped)."""
    h = hashlib.sha256(_LABEL + _U64.pack(size))
    for idx, digest, length in blocks:
        if digest != zero_digest(length):
            h.update(_U64.pack(idx) + digest)
    return h.digest()


class TreeHasher:
    """The tree digest of bytes fed in order (:meth:`update`, :meth:`zeros`)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._h = hashlib.sha256()
        self._entries = []
        self._idx = 0
        self._filled = 0
        self.size = 0

    def _entry(self) -> bytes | None:
        d = self._h.digest()
        return None if d == zero_digest(self._filled) else _U64.pack(self._idx) + d

    def _finish_block(self) -> None:
        entry = self._entry()
        if entry is not None:
            self._entries.append(entry)
        self._idx += 1
        self._filled = 0
        self._h = hashlib.sha256()

    def update(self, data) -> None:
        view = memoryview(data)
        bs = self.block_size
        while view:
            n = min(bs - self._filled, len(view))
            piece = view[:n]
            self._h.update(piece)
            self._filled += n
            self.size += n
            view = view[n:]
            if self._filled == bs:
                self._finish_block()

    def zeros(self, n: int) -> None:
        """``n`` zero bytes (a hole): whole zero blocks are skipped unhashed."""
        bs = self.block_size
        if self._filled:
            k = min(bs - self._filled, n)
            self.update(bytes(k))
            n -= k
        whole, rest = divmod(n, bs)
        self._idx += whole
        self.size += whole * bs
        if rest:
            self.update(bytes(rest))

    def digest(self) -> bytes:
        entries = list(self._entries)
        if self._filled:
            entry = self._entry()
            if entry is not None:
                entries.append(entry)
        return hashlib.sha256(_LABEL + _U64.pack(self.size) + b"".join(entries)).digest()


class WholeHasher:
    """The whole-file SHA-256 of inodes written before the tree digest."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data) -> None:
        self._h.update(data)

    def zeros(self, n: int) -> None:
        block = bytes(min(n, 1 << 20))
        while n > 0:
            k = min(n, len(block))
            self._h.update(block[:k])
            n -= k

    def digest(self) -> bytes:
        return self._h.digest()


def hasher_for(inode, block_size: int):
    """The hasher that checks ``inode``'s digest (tree, or a legacy whole-file SHA-256)."""
    return TreeHasher(block_size) if inode.tree else WholeHasher()
