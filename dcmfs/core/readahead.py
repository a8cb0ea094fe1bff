"""Read-ahead across files: fetch (an S3 store) or decode (a local store)
what a sequential reader reads next.

A cold read of a remote store waits on a GET per object; a cold read of a
local one on the decoding of each object (HTJ2K or JPEG XL bands of DICOM
frames, a few milliseconds each), which a reader of one file at a time
never overlaps with anything but the next band of the same file.  Readers of DICOM
read whole files, one after the other, in name order (a viewer loading a
series) or in directory order (``cp -r``, ``tar``); this module recognises
both and asks the store to fetch the objects they will need next with a few
GETs at once (:meth:`dcmfs.storage.objects.ObjectStore.prefetch`), so that
the round trips overlap each other and the decoding.

The rules (nothing is fetched for a reader that jumps about):

* **within a file**: a read that starts where the previous read of that open
  file ended (the first at offset 0) is sequential; the objects of the next
  :data:`WINDOW` bytes after it are fetched.  A read elsewhere fetches
  nothing ahead, and restarts the count.
* **across files**: a file read sequentially to its end is remembered as the
  last one of its directory.  When the next file opened in that directory is
  the one after it, by name or in the directory's own order, the reader
  walks the directory: this file's objects (up to :data:`WINDOW` bytes) and
  those of the next :data:`FILES` files in that order are fetched, asked for
  all at once and then again only once half of them were opened, so that
  the fetches of an S3 store with packs come in few GETs (the objects of
  files written one after the other sit side by side in a pack: one GET
  brings ~8 slices of a CT series).  A reader that stops wastes at most
  those files' fetches.

A local store (``decode`` given) has no GETs to overlap: within a file the
core already decodes the next bands of a sequential reader
(:class:`dcmfs.core.contents.FileData`), and across files this module has the
first :data:`LOCAL_WINDOW` bytes of this file and of the next
:data:`LOCAL_FILES` files decoded into the decoded cache by the core's
read-ahead threads, so that the next file's first bands are ready when it
is opened.  A reader that stops wastes at most that much decoding.  The
objects of this file and of the next :data:`LOCAL_FETCH_FILES` are read from
the disk into the page cache before that (asked for as an S3 store's
fetches are), so that the decoding threads do not wait on the disk for each
object of a store read cold, one after the other (issue 17: the 1 200 small
object files of a CT series read cold from the disk took 0.9-1.9 s one after
the other, of which 0.2 s was CPU).

An S3 store does both: it fetches as above, and has the first
:data:`LOCAL_WINDOW` bytes of this file and of the next :data:`LOCAL_FILES`
decoded as a local store does (each decode waits for its object's fetch):
once packs took the GETs' cost off the server, the read was bound by the
daemon's decoding, one file at a time.
"""

from __future__ import annotations

import bisect
import collections
import os
import stat
from typing import Callable

from ..errors import DcmfsError
from ..format import CHUNK_FLAG_INLINE
from ..index import Index
from ..storage.objects import ObjectStore
from .openfile import OpenFile

#: plaintext bytes fetched ahead of a sequential reader within a file
WINDOW = 32 * 1024 * 1024
#: files fetched ahead of a reader walking a directory (asked for half of
#: them at a time: with packs, their objects come in one GET)
FILES = 16
#: a local store: bytes of each file, and files, decoded ahead of such a
#: reader (a CT slice is 0.5 MB; the decoded cache holds 64 MiB)
LOCAL_WINDOW = 2 * 1024 * 1024
LOCAL_FILES = 2
#: a local store: files whose first :data:`LOCAL_WINDOW` bytes are read from
#: the disk into the page cache ahead of such a reader (two threads: see
#: :meth:`dcmfs.storage.backend.LocalBackend.prefetch`)
LOCAL_FETCH_FILES = 4
#: directories whose walk is followed at a time (the last file read through
#: in each, the files asked for ahead): past this the oldest is forgotten,
#: so that a daemon whose readers walk a million series keeps no record of
#: each (a forgotten walk only misses its read-ahead until its next file)
DIRECTORIES = 64


def _newest(table: dict, key, value):
    """``table[key] = value``, as its newest entry, the oldest dropped past
    :data:`DIRECTORIES`; returns ``value``."""
    table.pop(key, None)
    table[key] = value
    while len(table) > DIRECTORIES:
        table.pop(next(iter(table)))
    return value


class _Listing:
    """A directory's entries in name order and in its own order."""

    def __init__(self, mtime_ns: int, entries: list[tuple[bytes, int]]) -> None:
        self.mtime_ns = mtime_ns
        self.own = entries
        self.position = {name: i for i, (name, _) in enumerate(entries)}
        self.by_name = sorted(entries)
        self.names = [name for name, _ in self.by_name]


class ReadAhead:
    """One per mounted store; called under the core's lock.  ``decode``
    (a local store): ``decode(ino, inode, chunks, end)`` has a closed
    file's first ``end`` bytes decoded in the background."""

    def __init__(self, index: Index, objects: ObjectStore, chunk_size: int,
                 resolve: Callable, inode: Callable, window: int = WINDOW,
                 files: int = FILES, decode: Callable | None = None,
                 decode_fetched: Callable | None = None) -> None:
        self.decode = decode
        #: an S3 store: ``decode``'s like, run after the fetches were asked for
        self.decode_fetched = decode_fetched
        #: files decoded ahead of a walk (a local store)
        self.decode_files = LOCAL_FILES
        if decode is not None:
            window, files = LOCAL_WINDOW, LOCAL_FETCH_FILES
        self.index = index
        self.objects = objects
        self.chunk_size = chunk_size
        self._resolve = resolve
        self._inode = inode
        self.window = window
        self.files = files
        #: directory path -> name of the last file of it read to its end
        self._last: dict[str, bytes] = {}
        self._listings: dict[str, _Listing] = {}
        #: open files -> (where its sequential reader is, fetched up to)
        self._pos: dict[int, list[int]] = {}
        #: local stores: files whose first bytes a walk asked to be decoded
        #: already (the next open of the walk asks only for the one file new
        #: to it, not again for all: an open does no lookups it did for the
        #: one before)
        self._decoded: collections.OrderedDict[int, None] = collections.OrderedDict()
        #: directory path -> the files of it whose fetch was asked for (S3)
        self._asked: dict[str, set[int]] = {}

    # --- within a file ---------------------------------------------------------
    def read(self, of: OpenFile, offset: int, size: int, path: str | None) -> None:
        """A read of ``[offset, offset + size)`` of ``of`` (by ``path``) comes."""
        pos = self._pos.setdefault(of.ino, [0, 0])
        if offset != pos[0]:  # not where the last read ended: random access
            pos[0] = pos[1] = offset + size
            return
        end = min(offset + size, of.size)
        pos[0] = end
        if end >= of.size and path:  # read through: its directory may be next
            _newest(self._last, os.path.dirname(path), os.fsencode(os.path.basename(path)))
        if self.decode is not None:  # local: the core decodes ahead within a file
            return
        if pos[1] < end + self.window // 2 and pos[1] < of.size:
            self._fetch(of.committed, max(pos[1], end), end + self.window)
            pos[1] = end + self.window

    def release(self, ino: int) -> None:
        self._pos.pop(ino, None)

    def _fetch(self, committed: dict, start: int, end: int) -> int:
        return self.objects.prefetch(self._wanted(committed, start, end))

    def _wanted(self, committed: dict, start: int, end: int) -> list[bytes]:
        """The objects of ``[start, end)`` of a file, in file order (those
        kept in the index, inline, need no fetch)."""
        cs = self.chunk_size
        wanted = []
        for idx, ref in committed.items():
            if ref.flags & CHUNK_FLAG_INLINE:
                continue
            lo = ref.offset if ref.offset >= 0 else idx * cs
            if lo < end and lo + max(ref.plain_len, 1) > start:
                wanted.append((lo, ref.oid))
        wanted.sort()
        return [oid for _, oid in wanted]

    # --- across files ------------------------------------------------------------
    def open(self, of: OpenFile, path: str) -> None:
        """``of`` was opened for reading by ``path``."""
        directory = os.path.dirname(path)
        name = os.fsencode(os.path.basename(path))
        last = self._last.get(directory)
        if last is None or last == name:
            return
        with self.index.begin() as txn:
            listing = self._listing(txn, directory)
            if listing is None:
                return
            order = self._order(listing, last, name)
            if order is None:
                return
            self._pos[of.ino] = [0, self.window]
            self._fetch_ahead(txn, directory, of, order)
            if self.decode is not None:
                if self._ask(of.ino):
                    self.decode(of.ino, of.inode, of.committed, self.window)
                for child in order[:self.decode_files]:
                    if not self._ask(child):
                        continue
                    inode = self._inode(txn, child)
                    if stat.S_ISREG(inode.mode):
                        self.decode(child, inode, txn.chunks(child), self.window)
                return
            if self.decode_fetched is not None:  # the GETs are on their way: decode
                self.decode_fetched(of.ino, of.inode, of.committed, LOCAL_WINDOW)
                for child in order[:LOCAL_FILES]:
                    inode = self._inode(txn, child)
                    if stat.S_ISREG(inode.mode):
                        self.decode_fetched(child, inode, txn.chunks(child), LOCAL_WINDOW)

    def _fetch_ahead(self, txn, directory: str, of: OpenFile, order: list[int]) -> None:
        """Fetch the objects of ``of``'s first window and of the next
        :attr:`files` files of the walk (``order``), asked for all at once
        and again only once half of them were opened."""
        asked = _newest(self._asked, directory, self._asked.get(directory, set()))
        if of.ino not in asked:  # a walk starts (again): nothing asked yet
            asked.clear()
        ahead = [c for c in order[:self.files] if c not in asked]
        # asked recently: wait for half a window of new files
        if len(ahead) >= self.files // 2 or len(order) < self.files:
            wanted = self._wanted(of.committed, 0, self.window)
            for child in ahead:
                asked.add(child)
                inode = self._inode(txn, child)
                if stat.S_ISREG(inode.mode):
                    wanted += self._wanted(txn.chunks(child), 0, self.window)
            self.objects.prefetch(wanted)  # at once: one GET of a pack brings many
            while len(asked) > 4 * self.files:
                asked.pop()

    def _ask(self, ino: int) -> bool:
        """Is ``ino`` new to the walk (and remembered now)?"""
        if ino in self._decoded:
            self._decoded.move_to_end(ino)
            return False
        self._decoded[ino] = None
        while len(self._decoded) > 4 * (self.files + 1):
            self._decoded.popitem(last=False)
        return True

    def _order(self, listing: _Listing, last: bytes, name: bytes) -> list[int] | None:
        """The inodes after ``name`` in the order in which ``name`` follows
        ``last``; None if it follows it in neither."""
        i = bisect.bisect_left(listing.names, name)
        if 0 < i < len(listing.names) + 1 and listing.names[i - 1] == last \
                and i < len(listing.names) and listing.names[i] == name:
            return [child for _, child in listing.by_name[i + 1:i + 1 + self.files]]
        j = listing.position.get(name)
        if j and listing.position.get(last) == j - 1:
            return [child for _, child in listing.own[j + 1:j + 1 + self.files]]
        return None

    def _listing(self, txn, directory: str) -> _Listing | None:
        try:
            ino = self._resolve(txn, directory or "/")
            inode = self._inode(txn, ino)
        except DcmfsError:  # gone or renamed meanwhile: no read-ahead
            return None
        if not stat.S_ISDIR(inode.mode):
            return None
        listing = self._listings.get(directory)
        if listing is None or listing.mtime_ns != inode.mtime_ns:
            listing = _Listing(inode.mtime_ns, list(txn.list_dir(ino)))
            self._listings[directory] = listing
            while len(self._listings) > 64:
                self._listings.pop(next(iter(self._listings)))
        return listing
