"""Packs: sealed objects uploaded several to one S3 object (feature ``s3-packs-v1``).

A cold read of a CT series from Ceph RGW on loopback was bound by the
requests, not the bytes: 1 200 GETs of ~40 KB objects for 400 slices, and
radosgw and the OSD spent ~1.5 ms of CPU on each whatever its size, on the
cores the reader needed.  The write-back cache
(:class:`~dcmfs.storage.cache.CachedBackend`) therefore uploads the objects
that are due together, in write order, as one *pack*; a read of an object
that is not cached is a ranged GET of its bytes in the pack, and the
read-ahead fetches the neighbours of a pack (the next files of a series,
written one after the other) in one GET.

The objects in a pack are the sealed objects exactly as on disk, so every
check of a read is unchanged: the context block names the object, its file,
position and generation, and a flipped, swapped, moved, rolled-back or
missing object in a pack gives EIO for its file exactly as a loose one.
A pack is named ``packs/<16 hex digits: milliseconds since the epoch><16
random hex digits>`` (names sort by upload time, so a follower lists only
the new ones) and laid out as::

    offset  size    field
    0       4       magic "DCMP"
    4       1       pack layout version (1)
    5       3       reserved, 0
    8       4       count n (u32, big-endian)
    12      28 x n  table: object id (16) | offset in the pack (u64) | length (u32)
    ...             the objects, one after the other

The table is not sealed: it holds object ids and offsets only (a store
without packs shows the same ids as bucket names), and a table that lies
makes reads fetch the wrong bytes, which then fail the object's checks.
Where each object is lives in a local LMDB map, ``STORE/packs/``
(:class:`PackMap`), written before the objects count as uploaded; a
missing map is rebuilt from the tables in the bucket (``dcmfs attach``, a
follower, a lost store directory).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Iterable, Iterator, NamedTuple

import lmdb

from ..errors import StoreIOError

PACKS = "packs/"
MAGIC = b"DCMP"
VERSION = 1
HEAD = struct.Struct(">4sB3xI")
ENTRY = struct.Struct(">16sQI")
#: a pack holds at most this many bytes of objects, or objects (a CT
#: slice is ~3 objects of ~40 KB once re-encoded: a pack is ~100 slices)
PACK_BYTES = 8 << 20
PACK_OBJECTS = 512
#: the table of a pack this size at most is read in one GET
TABLE_GUESS = HEAD.size + ENTRY.size * 256
#: the directory of the map in the store directory
MAP_DIR = "packs"


class Where(NamedTuple):
    """An object's place: the pack's name, the object's first byte in it, its length."""

    pack: str
    offset: int
    length: int


def new_pack_name(after: str | None = None) -> str:
    """A new pack's name, sorting after ``after`` (the newest pack known)
    whatever this machine's clock says: a follower lists only the packs
    named after the newest it knows, less 10 minutes
    (:meth:`~dcmfs.storage.packcache.PackedCache.refresh_packs`), so a pack
    named earlier than that (a writer whose clock is behind the one before
    it) would never be found.  Take it when the PUT is sent, not before its
    retries, for the same reason."""
    ms = int(time.time() * 1000)
    if after is not None:
        # (a name a bucket writer made up may be the largest there is)
        ms = min(max(ms, int(after[len(PACKS):len(PACKS) + 16], 16) + 1), (1 << 64) - 1)
    return f"{PACKS}{ms:016x}{os.urandom(8).hex()}"


def build(members: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[bytes, int, int]]]:
    """The pack of ``(object id, sealed object)`` pairs and its table."""
    offset = HEAD.size + ENTRY.size * len(members)
    table = []
    for oid, blob in members:
        table.append((oid, offset, len(blob)))
        offset += len(blob)
    head = HEAD.pack(MAGIC, VERSION, len(members))
    return b"".join([head, *(ENTRY.pack(*e) for e in table),
                     *(blob for _, blob in members)]), table


def table_size(head: bytes) -> int:
    """Bytes of a pack's head and table, from its first :data:`HEAD` bytes;
    raises ValueError for something that is not a pack."""
    if len(head) < HEAD.size:
        raise ValueError("not a pack: too short")
    magic, version, count = HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION or count > PACK_OBJECTS * 64:
        raise ValueError("not a pack of this version")
    return HEAD.size + ENTRY.size * count


def parse_table(data: bytes, size: int | None = None) -> list[tuple[bytes, int, int]]:
    """The table of a pack from its first bytes (at least :func:`table_size`;
    ``size``: the pack's length, to refuse entries past its end).  Raises
    ValueError."""
    need = table_size(data)
    if len(data) < need:
        raise ValueError("not a pack: its table is cut")
    out = []
    for i in range(HEAD.unpack_from(data)[2]):
        oid, offset, length = ENTRY.unpack_from(data, HEAD.size + i * ENTRY.size)
        if offset < need or (size is not None and offset + length > size):
            raise ValueError("not a pack: an entry points outside it")
        out.append((oid, offset, length))
    return out


class PackMap:
    """Which pack holds each uploaded object (``STORE/packs/``, LMDB, synced
    at every change).  ``objects``: object id -> pack id (16) | offset (u64)
    | length (u32); ``packs``: pack id -> objects in it still named (u32);
    ``members``: pack id + object id -> b"" (a pack's objects, for its
    rewrite); ``dirty``: pack id -> b"", the packs that lost an object (it
    was deleted, or a newer pack holds it: a PUT repeated after a crash
    between it and the map's write) and wait to be rewritten or deleted,
    kept across openings so that none stays in the bucket for good;
    ``meta``: ``complete`` once filled from the bucket.
    ``fresh``: the map was never filled from the bucket (a new, lost or
    attached store directory: :meth:`CachedBackend.refresh_packs` reads
    every pack's table, then marks it complete)."""

    def __init__(self, root: str) -> None:
        path = os.path.join(root, MAP_DIR)
        os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            self._env = lmdb.open(path, map_size=1 << 34, max_dbs=5, subdir=True,
                                  readahead=False)
        except lmdb.Error as exc:
            raise StoreIOError(f"opening the pack map {path} failed ({type(exc).__name__}); "
                               f"remove {path} and mount again: it is rebuilt from the "
                               "bucket.") from exc
        self._objects = self._env.open_db(b"objects")
        self._packs = self._env.open_db(b"packs")
        #: pack id + object id -> b"" (the objects of a pack, for rewriting it)
        self._members = self._env.open_db(b"members")
        self._meta = self._env.open_db(b"meta")
        #: pack id -> b"": packs that lost objects (see the class docstring)
        self._dirty = self._env.open_db(b"dirty")
        with self._env.begin(db=self._meta) as txn:
            self.fresh = txn.get(b"complete") is None
        self._lock = threading.Lock()

    def mark_complete(self) -> None:
        """Every pack the bucket held when the map was made is in it."""
        with self._write() as txn:
            txn.put(b"complete", b"1", db=self._meta)
        self.fresh = False

    @staticmethod
    def _pid(pack: str) -> bytes:
        return bytes.fromhex(pack[len(PACKS):])

    def _write(self):
        """A write transaction; an LMDB failure (a full disk) is a StoreIOError."""
        return _Writing(self._env, self._lock)

    def where(self, oid: bytes) -> Where | None:
        with self._env.begin(db=self._objects) as txn:
            v = txn.get(oid)
        if v is None:
            return None
        offset, length = struct.unpack_from(">QI", v, 16)
        return Where(PACKS + v[:16].hex(), offset, length)

    def add(self, pack: str, table: Iterable[tuple[bytes, int, int]]) -> set[str]:
        """Record a pack uploaded (or found in the bucket): its objects are
        there now (an object in two packs: the newer entry wins).  Returns
        the packs that lost objects to it (marked dirty)."""
        pid = self._pid(pack)
        lost = set()
        with self._write() as txn:
            n = 0
            for oid, offset, length in table:
                old = txn.get(oid, db=self._objects)
                if old is not None and old[:16] != pid:
                    self._release(txn, old[:16])
                    txn.delete(old[:16] + oid, db=self._members)
                    lost.add(PACKS + old[:16].hex())
                elif old is not None:
                    continue  # the same entry again
                txn.put(oid, pid + struct.pack(">QI", offset, length), db=self._objects)
                txn.put(pid + oid, b"", db=self._members)
                n += 1
            before = txn.get(pid, db=self._packs)
            txn.put(pid, struct.pack(">I", n + (struct.unpack(">I", before)[0]
                                                if before else 0)), db=self._packs)
        return lost

    def _release(self, txn, pid: bytes) -> int:
        """One object fewer named in pack ``pid`` (marked dirty); returns how
        many are left."""
        v = txn.get(pid, db=self._packs)
        left = max(0, (struct.unpack(">I", v)[0] if v else 0) - 1)
        txn.put(pid, struct.pack(">I", left), db=self._packs)
        txn.put(pid, b"", db=self._dirty)
        return left

    def drop(self, oid: bytes) -> tuple[str, int] | None:
        """The object is deleted: (its pack, objects left in it), or None
        when no pack holds it."""
        with self._write() as txn:
            v = txn.get(oid, db=self._objects)
            if v is None:
                return None
            txn.delete(oid, db=self._objects)
            txn.delete(v[:16] + oid, db=self._members)
            return PACKS + v[:16].hex(), self._release(txn, v[:16])

    def forget(self, pack: str) -> None:
        """The pack is gone from the bucket (deleted, or repacked)."""
        with self._write() as txn:
            txn.delete(self._pid(pack), db=self._packs)
            txn.delete(self._pid(pack), db=self._dirty)

    def dirty(self) -> set[str]:
        """The packs that lost objects and were not rewritten or deleted yet."""
        with self._env.begin(db=self._dirty) as txn:
            return {PACKS + k.hex() for k, _ in txn.cursor()}

    def mark_dirty(self, pack: str) -> None:
        """``pack`` holds objects no longer named in it: rewrite it."""
        with self._write() as txn:
            txn.put(self._pid(pack), b"", db=self._dirty)

    def clean(self, pack: str) -> None:
        """Not dirty any more (a pack missing from the bucket: nothing to do)."""
        with self._write() as txn:
            txn.delete(self._pid(pack), db=self._dirty)

    def members(self, pack: str) -> list[tuple[bytes, int, int]]:
        """The objects still named in ``pack``: (object id, offset, length)."""
        pid = self._pid(pack)
        out = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._members)
            if cursor.set_range(pid):
                for key in cursor.iternext(values=False):
                    if key[:16] != pid:
                        break
                    v = txn.get(key[16:], db=self._objects)
                    if v is not None and v[:16] == pid:
                        out.append((key[16:], *struct.unpack_from(">QI", v, 16)))
        return out

    def newest(self) -> str | None:
        """The newest pack in the map (names sort by upload time); None if
        there is none, or the map cannot be read (the clock alone names)."""
        try:
            with self._env.begin(db=self._packs) as txn:
                cursor = txn.cursor()
                return PACKS + bytes(cursor.key()).hex() if cursor.last() else None
        except lmdb.Error:
            return None

    def knows(self, pack: str) -> bool:
        with self._env.begin(db=self._packs) as txn:
            return txn.get(self._pid(pack)) is not None

    def packs(self) -> set[str]:
        with self._env.begin(db=self._packs) as txn:
            return {PACKS + k.hex() for k, _ in txn.cursor()}

    def oids(self) -> Iterator[bytes]:
        with self._env.begin(db=self._objects) as txn:
            keys = [k for k, _ in txn.cursor()]
        yield from keys

    def close(self) -> None:
        self._env.close()


class _Writing:
    """``with``: a write transaction of the map under its lock; LMDB errors
    become :class:`StoreIOError` (the upload pool retries those)."""

    def __init__(self, env, lock: threading.Lock) -> None:
        self._env, self._lock = env, lock

    def __enter__(self):
        self._lock.acquire()
        try:
            self._txn = self._env.begin(write=True)
        except lmdb.Error as exc:
            self._lock.release()
            raise StoreIOError(f"the pack map cannot be written ({type(exc).__name__})") from exc
        return self._txn

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if kind is None:
                self._txn.commit()
            else:
                self._txn.abort()
        except lmdb.Error as err:
            raise StoreIOError(f"the pack map cannot be written ({type(err).__name__})") from err
        finally:
            self._lock.release()
        if isinstance(exc, lmdb.Error):
            raise StoreIOError(f"the pack map cannot be written ({type(exc).__name__})") from exc
        return False
