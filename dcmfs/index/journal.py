"""The index journal: a sealed redo log of index changes since the last checkpoint.

Why it exists: a PACS closes thousands of files a minute.  Making every
close durable on disk (fsync of the object, of its directory and of the
LMDB commit) cost about 2 ms a file, a third of the ingest time, and buys
nothing that ``close(2)`` promises.  What close must guarantee is that the
data survives a crash of the daemon; only ``fsync(2)`` promises survival of
a power loss.  So each index transaction is appended to this journal with
one ``write(2)`` (it is then in the kernel's page cache, which outlives the
daemon), while LMDB keeps the changes in one long write transaction that is
committed durably at a *checkpoint* (every few seconds, when the journal
grows, at ``umount``).  ``fsync(2)`` on a file makes objects and journal
durable (two system calls) without a checkpoint.

File layout (``STORE/journal``)::

    header  b"DCMJ" | version u16 | reserved u16 | store id (16)
    record  length u32 | sequence u64 | nonce (12) | AES-256-GCM-SIV(ops) + tag

Version 2 seals records with AES-256-GCM-SIV (one store-wide key, random
nonces: a nonce that repeats reveals at most that two records are equal);
version-1 journals (AES-256-GCM) are still read, and a read-write opening
moves one to the archive after its replay, so new records are never
appended to it.

The associated data of a record binds the header (so a journal cannot move
between stores) and its sequence number (so records cannot be reordered,
dropped from the middle or replayed).  Sequence numbers continue across
checkpoints; the index records the last one it contains
(``meta/journal_seq``), and replay applies the records after it, in order,
stopping at the first that is torn, fails authentication or breaks the
sequence (a power loss can only cut the tail, never the middle, because
every durability point syncs the whole journal).

``ops`` is a list of index changes: ``kind u8`` (1 put, 2 delete, 3 the
format-4 conversion of the directory entries, with an empty key),
``database u8``, ``key length u16``, key, and for a put ``value length u32``
and the value exactly as stored in LMDB (already sealed, except ``meta``).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Iterator

from ..storage import crypto
from ..storage.durable import fsync_dir
from ..errors import NoSpaceError, StoreIOError, UnsupportedFormatError

MAGIC = b"DCMJ"
VERSION = 2
_HEADER = struct.Struct(">4sHH16s")
HEADER_SIZE = _HEADER.size
_RECORD = struct.Struct(">IQ")
_OP = struct.Struct(">BBH")
_U32 = struct.Struct(">I")
PUT, DELETE = 1, 2
#: format 4's upgrade of the directory entries, replayed as one operation
#: (:meth:`dcmfs.index.index.Index.convert`): no key, no value
CONVERT = 3
#: a record longer than this is damage, not data (one index transaction)
MAX_RECORD = 64 * 1024 * 1024

Op = tuple[int, int, bytes, bytes | None]


def whole_records(data: bytes) -> tuple[int, int | None]:
    """(length, last sequence number) of the longest run of complete records
    at the start of ``data`` (bytes of a journal after its header, as they
    are on disk; nothing is authenticated here): what the writer publishes
    for followers (:mod:`dcmfs.opened.follow`) ends at a record's end."""
    pos, last = 0, None
    while pos + _RECORD.size <= len(data):
        length, seq = _RECORD.unpack_from(data, pos)
        if length > MAX_RECORD or pos + _RECORD.size + length > len(data):
            break
        pos += _RECORD.size + length
        last = seq
    return pos, last


def encode_ops(ops: list[Op]) -> bytes:
    parts = []
    for kind, db, key, value in ops:
        parts.append(_OP.pack(kind, db, len(key)))
        parts.append(key)
        if kind == PUT:
            parts.append(_U32.pack(len(value)))
            parts.append(value)
    return b"".join(parts)


def decode_ops(raw: bytes) -> list[Op]:
    ops, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        kind, db, klen = _OP.unpack_from(raw, pos)
        pos += _OP.size
        key = bytes(view[pos:pos + klen])
        pos += klen
        value = None
        if kind == PUT:
            (vlen,) = _U32.unpack_from(raw, pos)
            pos += 4
            value = bytes(view[pos:pos + vlen])
            pos += vlen
        elif kind not in (DELETE, CONVERT):
            raise ValueError(f"unknown journal op {kind}")
        ops.append((kind, db, key, value))
    if pos != len(raw):
        raise ValueError("journal record is truncated")
    return ops


class Journal:
    """An open journal file.  Not thread-safe: the index serialises callers."""

    def __init__(self, path: str, master_key: bytes, store_id: bytes,
                 read_only: bool = False) -> None:
        self.path = path
        self._store_id = store_id
        self._key = crypto.derive(master_key, b"journal", store_id)
        self._header = _HEADER.pack(MAGIC, VERSION, 0, store_id)
        #: the layout of this file's records (a version-1 journal: AES-GCM)
        self.version = VERSION
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self._fd = None  # read-only and never written: nothing to replay
            self.size = 0
            self._aead = crypto.Siv(self._key)
            return
        except OSError as exc:
            raise StoreIOError(f"Opening the index journal failed: {exc.strerror}.") from exc
        head = os.pread(self._fd, _HEADER.size, 0)
        if not head and not read_only:
            self._write_at(self._header, 0, "the index journal header")
            head = self._header
        if head and head[:4] == MAGIC and len(head) == _HEADER.size:
            _, version, _, sid = _HEADER.unpack(head)
            if version > VERSION:
                raise UnsupportedFormatError(
                    f"The index journal has version {version}, newer than this dcmfs "
                    f"understands ({VERSION}); use a newer dcmfs.")
            if sid != store_id:
                raise StoreIOError("The index journal belongs to another store; "
                                   "move it away and run 'dcmfs fsck' on the store.")
            self.version = version
            self._header = bytes(head)
        elif head:
            raise StoreIOError("The index journal has a damaged header; "
                               "run 'dcmfs fsck' on the store.")
        self.size = os.fstat(self._fd).st_size
        self._aead = (crypto.Siv if self.version >= 2 else crypto.Gcm)(self._key)

    def rekey(self, master_key: bytes) -> None:
        """Go on under another key generation (:mod:`dcmfs.index.keygen`);
        only for a journal holding no record."""
        if self.size > _HEADER.size:
            raise StoreIOError("re-keying an index journal that holds records")
        self._key = crypto.derive(master_key, b"journal", self._store_id)
        self._aead = crypto.Siv(self._key)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _aad(self, seq: int) -> bytes:
        return self._header + seq.to_bytes(8, "big")

    def _write_at(self, data: bytes, offset: int, what: str, fd: int | None = None) -> None:
        view = memoryview(data)
        fd = self._fd if fd is None else fd
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"The disk under the store is full while writing {what}; "
                                   "free space there and retry.") from exc
            raise StoreIOError(f"Writing {what} failed: {exc.strerror}.") from exc

    # --- writing --------------------------------------------------------------
    def append(self, seq: int, ops: list[Op]) -> None:
        """Append one record; on failure the journal is as before."""
        plain = encode_ops(ops)
        if len(plain) > MAX_RECORD - 64:
            raise StoreIOError("One operation changes too much of the index at once "
                               f"({len(plain)} bytes); split it up.")
        sealed = self._aead.seal(plain, self._aad(seq))
        record = _RECORD.pack(len(sealed), seq) + sealed
        start = self.size
        try:
            self._write_at(record, start, "the index journal")
        except BaseException:
            try:
                os.ftruncate(self._fd, start)  # a torn tail must not stay behind
            except OSError:
                pass  # replay stops at a torn record anyway
            raise
        self.size = start + len(record)

    def sync(self) -> None:
        """Make every appended record durable."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreIOError(f"fsync of the index journal failed: {exc.strerror}.") from exc

    def rotate(self, dest: str) -> None:
        """Move every record to ``dest`` (an archive segment, kept for index
        rebuilds) and start an empty journal.  A failure at any step leaves a
        journal at its path holding every record not in the index (the old one,
        or the new one after a complete switch)."""
        tmp = self.path + ".new"
        try:
            os.fdatasync(self._fd)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreIOError(f"Archiving the index journal failed: {exc.strerror}.") from exc
        header = _HEADER.pack(MAGIC, VERSION, 0, self._store_id)
        try:
            self._write_at(header, 0, "the index journal header", fd)
            os.fdatasync(fd)
            os.rename(self.path, dest)  # the records move to the archive
        except (OSError, NoSpaceError, StoreIOError) as exc:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreIOError(f"Archiving the index journal failed: {exc}.") from exc
        try:
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            os.rename(dest, self.path)  # undo: the records stay in the live journal
            raise StoreIOError(f"Archiving the index journal failed: {exc.strerror}.") from exc
        os.close(self._fd)
        self._fd = fd
        self.size = _HEADER.size
        self._header, self.version = header, VERSION
        self._aead = crypto.Siv(self._key)
        try:
            fsync_dir(os.path.dirname(dest))
            fsync_dir(os.path.dirname(self.path))
        except OSError as exc:
            raise StoreIOError(f"fsync after archiving the index journal failed: "
                               f"{exc.strerror}.") from exc

    def reset(self) -> None:
        """Forget every record (they are all in a durable checkpoint now); the
        journal continues in the current layout."""
        header = _HEADER.pack(MAGIC, VERSION, 0, self._store_id)
        try:
            os.ftruncate(self._fd, _HEADER.size)
            if header != self._header:
                self._write_at(header, 0, "the index journal header")
            os.fdatasync(self._fd)  # a shred pass relies on the records being gone
        except OSError as exc:
            raise StoreIOError(f"Truncating the index journal failed: {exc.strerror}.") from exc
        self.size = _HEADER.size
        self._header, self.version = header, VERSION
        self._aead = crypto.Siv(self._key)

    # --- reading --------------------------------------------------------------
    def records(self, after: int) -> Iterator[tuple[int, list[Op]]]:
        """The intact records with sequence numbers after ``after``, in order.

        Stops silently at the first torn, unauthentic or out-of-sequence
        record: that is where the last session's durable writes ended.
        """
        for seq, ops, _ in self._scan():
            if seq > after:
                yield seq, ops

    def _scan(self) -> Iterator[tuple[int, list[Op], int]]:
        """(sequence, ops, offset after the record) of the intact prefix."""
        if self._fd is None:
            return
        pos = _HEADER.size
        expect = None
        while pos + _RECORD.size <= self.size:
            length, seq = _RECORD.unpack(os.pread(self._fd, _RECORD.size, pos))
            if length > MAX_RECORD or pos + _RECORD.size + length > self.size:
                return
            if expect is not None and seq != expect:
                return
            blob = os.pread(self._fd, length, pos + _RECORD.size)
            try:
                ops = decode_ops(self._aead.open(blob, self._aad(seq)))
            except (crypto.AuthenticationFailed, ValueError, struct.error):
                return
            pos += _RECORD.size + length
            expect = seq + 1
            yield seq, ops, pos

    def cut_after(self, seq: int) -> bool:
        """Durably drop everything after the record ``seq`` (or after the last
        intact record before it): a torn tail a power cut left, and records a
        replay did not apply.  Appends must never land behind such bytes, or
        the next replay would stop before them.  Returns True if it cut."""
        end = _HEADER.size
        for rseq, _, pos in self._scan():
            if rseq > seq:
                break
            end = pos
        if end >= self.size:
            return False
        try:
            os.ftruncate(self._fd, end)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreIOError(f"Cutting the index journal after its last intact record "
                               f"failed: {exc.strerror}.") from exc
        self.size = end
        return True
