"""The index schema: the one place its databases, keys and values are written down.

Schema (format version 1).  All integers are big-endian so that LMDB's byte
order is numeric order.  ``SIV(...)`` is AES-256-GCM-SIV under the index key
(HKDF of the master key, label ``index``) with the database name and the LMDB
key as associated data, so a value moved to another key fails to open.

============  ==============================  ======================================
database      key                             value
============  ==============================  ======================================
``meta``      ascii name                      plain bytes:
                                              ``format`` -> b"1";
                                              ``store_id`` -> 16 bytes;
                                              ``next_ino`` -> u64;
                                              ``state`` -> b"clean" or b"mounted";
                                              ``stats`` -> files, logical bytes,
                                              stored bytes (3 x u64; plain, so
                                              ``dcmfs status`` needs no key);
                                              ``journal_seq`` -> u64, the last
                                              journal record this index holds;
                                              ``dirents`` -> b"keyed" (format 4
                                              directory entries);
                                              sealed: ``auth`` -> SIV(sequence,
                                              group count, top of the sums:
                                              :mod:`dcmfs.index.auth`);
                                              ``damage`` -> SIV(JSON: since,
                                              reason), present while the store
                                              is marked as needing fsck (the
                                              copy of ``STORE/needs-fsck``
                                              that notices its deletion)
                                              ``audit_head`` -> SIV(JSON: seq,
                                              hash, segment, offset, start_*):
                                              the audit trail's chain head at
                                              the last checkpoint (feature
                                              ``audit-v1``, :mod:`dcmfs.audit`);
                                              plain: ``shred`` -> 5 x u64,
                                              deletions waiting for a shred
                                              pass (:mod:`dcmfs.index.shred`)
``inodes``    ino u64                         SIV(INODE record, see :class:`Inode`:
                                              any file type - regular, directory,
                                              symlink, FIFO, socket, character or
                                              block device; trailing bytes: the
                                              symlink target, or a device's rdev
                                              as u64, else none; since
                                              ``file-secrets-v1`` the file's
                                              32-byte secret)
``dirents``   parent tag (16) + name tag (16)  SIV(parent u64 + child u64 + name
                                              length u16 + name, zeros to a
                                              multiple of 32 bytes); before
                                              format 4: key parent ino u64 +
                                              name tag, value child + name
``chunks``    ino u64 + chunk index u64       SIV(CHUNK record, see ``_CHUNK``; files
                                              laid out in extents (DICOM-coded)
                                              append the extent's offset, u64)
``xattrs``    ino u64 + name tag (16)         SIV(name length u16 + name + value)
``orphans``   ino u64                         b"" — unlinked while open, purged
                                              at release or at the next mount
``backlog``   ino u64                         b"" — closed with chunks sealed
                                              uncompressed, or not yet looked at
                                              by the DICOM-aware re-encoder
``scrubbed``  ino u64                         u64 (plain): when the file was last
                                              verified intact, ns since the epoch
``content``   ino u64                         SIV(JSON: what the re-encoder found:
                                              generation, kind, modality, transfer
                                              syntax, photometric, bits, codec path,
                                              fallback reason; never a patient
                                              attribute)
``sums``      group u64                       32 bytes (plain): the sum of the
                                              group's record numbers; the sealed
                                              ``meta/auth`` authenticates them
``deidview``  ino u64                         SIV(JSON: what the de-identified view
                                              lists of a DICOM file: generation,
                                              patient identity, study, series and
                                              instance UIDs, every other UID of the
                                              header, where the Pixel Data element
                                              starts and ends, withheld reason;
                                              feature ``deid-view-v1``, see
                                              :mod:`dcmfs.core.deidview`)
``inline``    ino u64 + object id (16)        the object's exact bytes (layout 2,
                                              sealed as an object file is; not
                                              sealed again): a chunk flagged
                                              ``CHUNK_FLAG_INLINE`` (feature
                                              ``inline-small-v1``,
                                              :mod:`dcmfs.index.inline`)
============  ==============================  ======================================

The *parent tag* is HMAC-SHA256(name key, "directory" || parent ino)[:16]. The *name tag* is HMAC-SHA256(name key, parent ino + name) truncated to 16
bytes: a lookup needs no scan, and without the key the index reveals neither
names nor which entries share a name.  The root directory is inode 1.

Here too: :func:`read_stats`, the plain totals ``dcmfs status`` reads
without the key, and :func:`lmdb_error`, LMDB's exceptions as ours.  How the
environment is opened, journaled and checkpointed is in
:mod:`dcmfs.index.index`; one operation's typed accessors are
:class:`dcmfs.index.txn.Txn`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import struct

import lmdb

from ..errors import IndexDamagedError, NoSpaceError, StoreIOError
from ..storage.objects import ChunkRef

#: inode numbers, counters, times (big-endian: LMDB's byte order is numeric order)
U64 = struct.Struct(">Q")
#: a ``chunks`` key: ino + chunk index
U64X2 = struct.Struct(">QQ")
#: mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, file_id,
#: generation, digest kind (0 none, 1 whole-file SHA-256 of a store before
#: the tree digest, 2 tree digest), digest; followed by ``target``: a
#: symlink's target, a character or block device's number (rdev, u64), else
#: nothing
_INODE = struct.Struct(">IIIIQqqq16sQB32s")
#: format 4: the digest-kind byte's bit 7 says the record ends with the
#: bytes the file takes in the store (u64, all ones: not known), the
#: target's length (u16), the target and zeros to a multiple of RECORD_PAD
#: bytes, so a symlink's record tells its target's length rounded up only
_PADDED = 0x80
#: feature ``file-secrets-v1``: bit 6 says a 32-byte file secret follows the
#: stored bytes (before the target's length); the file's payload key is
#: derived from it too, so the key leaves the store with the record
#: (crypto-shredding, :mod:`dcmfs.index.shred`)
_SECRET = 0x40
SECRET_LEN = 32
_UNKNOWN = (1 << 64) - 1
RECORD_PAD = 32
#: oid, generation, codec, flags, plain_len, stored_len
_CHUNK = struct.Struct(">16sQBBII")
#: format 4: every chunk record has one length - the extent offset (u64,
#: all ones: none) and the plaintext's SHA-256 (zeros: none), then a byte
#: saying which of the two are there - so its length tells neither whether
#: the file is DICOM-coded nor whether it predates the tree digest
_CHUNK_TAIL = struct.Struct(">Q32sB")
_NO_OFFSET = (1 << 64) - 1
#: an ``xattrs`` value starts with the name's length
U16 = struct.Struct(">H")
#: ``meta/stats``: files, logical bytes, stored bytes
STATS = struct.Struct(">QQQ")

DATABASES = ("meta", "inodes", "dirents", "chunks", "xattrs", "orphans", "backlog",
             "content", "scrubbed", "sums", "deidview", "inline")
#: databases a store made by an older dcmfs may lack (created at its first
#: read-write opening; empty for a read-only one)
OPTIONAL = ("scrubbed", "sums", "deidview", "inline")
#: databases whose values are sealed (the others hold plain numbers or nothing)
SEALED = ("inodes", "dirents", "chunks", "xattrs", "content", "deidview")
#: a database's number in journal records
DB_ID = {name: i for i, name in enumerate(DATABASES)}
#: the journal's file in the index directory
JOURNAL_NAME = "journal"


@dataclasses.dataclass
class Inode:
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    file_id: bytes
    generation: int = 0
    #: the file's content digest (see :mod:`dcmfs.storage.digest`)
    digest: bytes | None = None
    target: bytes = b""
    #: True: ``digest`` is the tree digest; False: a whole-file SHA-256 kept
    #: from before the tree digest (replaced at the file's next change)
    tree: bool = True
    #: bytes the file's objects take in the store (``st_blocks``); -1: not
    #: known (a record from before format 4, until the file next changes)
    stored: int = 0
    #: the file's random secret (32 bytes; feature ``file-secrets-v1``):
    #: part of its payload key, so deleting the record destroys the key;
    #: b"" for a file made before the feature (its key is as before)
    secret: bytes = b""

    @property
    def rdev(self) -> int:
        """The device number of a character or block device (kept in
        ``target``, so the record's layout is the same for every type); 0
        for every other type."""
        if stat.S_IFMT(self.mode) in (stat.S_IFCHR, stat.S_IFBLK) and len(self.target) == 8:
            return U64.unpack(self.target)[0]
        return 0

    @staticmethod
    def device_target(rdev: int) -> bytes:
        """``target`` of a character or block device numbered ``rdev``."""
        return U64.pack(rdev)

    def encode(self) -> bytes:
        kind = (0 if self.digest is None else (2 if self.tree else 1)) | _PADDED
        if self.secret:
            if len(self.secret) != SECRET_LEN:
                raise ValueError("a file secret has 32 bytes")
            kind |= _SECRET
        tail = (U64.pack(self.stored if self.stored >= 0 else _UNKNOWN) + self.secret
                + U16.pack(len(self.target)) + self.target)
        return _INODE.pack(self.mode, self.uid, self.gid, self.nlink, self.size,
                           self.atime_ns, self.mtime_ns, self.ctime_ns, self.file_id,
                           self.generation, kind, self.digest or bytes(32)) \
            + tail + bytes(-len(tail) % RECORD_PAD)

    @classmethod
    def decode(cls, raw: bytes) -> "Inode":
        (mode, uid, gid, nlink, size, at, mt, ct, file_id, gen, kind,
         digest) = _INODE.unpack_from(raw)
        stored, secret = -1, b""
        if kind & _PADDED:  # format 4: stored bytes, [secret,] the target's length, then zeros
            stored = U64.unpack_from(raw, _INODE.size)[0]
            at_len = _INODE.size + 8
            if kind & _SECRET:
                secret = bytes(raw[at_len:at_len + SECRET_LEN])
                if len(secret) != SECRET_LEN:
                    raise struct.error("inode record too short for its file secret")
                at_len += SECRET_LEN
            n = U16.unpack_from(raw, at_len)[0]
            target = bytes(raw[at_len + 2:at_len + 2 + n])
            stored = -1 if stored == _UNKNOWN else stored
        else:
            target = bytes(raw[_INODE.size:])
        kind &= ~(_PADDED | _SECRET)
        return cls(mode, uid, gid, nlink, size, at, mt, ct, file_id, gen,
                   digest if kind else None, target, tree=kind != 1, stored=stored,
                   secret=secret)


#: a directory entry (format 4): parent, child, name length, then the name
#: and zeros to a multiple of DIRENT_PAD bytes, so the sealed value tells
#: only the name's length rounded up (as gocryptfs pads names to 16 bytes)
_DIRENT = struct.Struct(">QQH")
DIRENT_PAD = 32


def encode_dirent(parent: int, child: int, name: bytes) -> bytes:
    raw = _DIRENT.pack(parent, child, len(name)) + name
    return raw + bytes(-len(raw) % DIRENT_PAD)


def decode_dirent(raw: bytes, keyed: bool) -> tuple[int | None, int, bytes]:
    """(parent or None, child, name) of a directory entry's value: format 4
    (``keyed``: the key holds a keyed tag of the parent), or before (child +
    name; the parent is in the key)."""
    if not keyed:
        return None, U64.unpack_from(raw)[0], bytes(raw[8:])
    parent, child, n = _DIRENT.unpack_from(raw)
    if _DIRENT.size + n > len(raw):
        raise struct.error("directory entry does not decode")
    return parent, child, bytes(raw[_DIRENT.size:_DIRENT.size + n])


def ino_key(ino: int) -> bytes:
    return U64.pack(ino)


def encode_chunk(ref: ChunkRef) -> bytes:
    has = (1 if ref.offset >= 0 else 0) | (2 if ref.digest is not None else 0)
    return _CHUNK.pack(*ref[:6]) + _CHUNK_TAIL.pack(
        ref.offset if ref.offset >= 0 else _NO_OFFSET, ref.digest or bytes(32), has)


def decode_chunk(raw: bytes) -> ChunkRef:
    """A chunk record: the fixed part, then (format 4) the fixed tail, or
    (before) the extent offset (u64) if any, then the plaintext's SHA-256
    (32 bytes) if any, told apart by length."""
    fields = _CHUNK.unpack_from(raw)
    rest = len(raw) - _CHUNK.size
    if rest == _CHUNK_TAIL.size:
        offset, digest, has = _CHUNK_TAIL.unpack_from(raw, _CHUNK.size)
        return ChunkRef(*fields, offset if has & 1 else -1, digest if has & 2 else None)
    digest = bytes(raw[-32:]) if rest in (32, 40) else None
    offset = U64.unpack_from(raw, _CHUNK.size)[0] if rest in (8, 40) else -1
    return ChunkRef(*fields, offset, digest)


def lmdb_error(exc: lmdb.Error, doing: str) -> Exception:
    """The error of ours to raise for ``exc`` (``raise lmdb_error(...) from exc``)."""
    if isinstance(exc, lmdb.MapFullError):
        return NoSpaceError(f"The index is full while {doing}; raise index_map_size.")
    err = getattr(exc, "args", (None,))
    text = str(exc)
    if "No space left" in text or (err and err[0] == errno.ENOSPC):
        return NoSpaceError(f"The disk under the store is full while {doing}; "
                            "free space there and retry.")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                        lmdb.VersionMismatchError, lmdb.BadRslotError)):
        return IndexDamagedError(f"The index is damaged ({doing}): {text}. "
                                 "Run 'dcmfs fsck' on the store.")
    return StoreIOError(f"Index error while {doing}: {text}.")


def read_stats(path: str) -> tuple[int, int, int] | None:
    """(files, logical bytes, stored bytes) without the key; None if no index.

    While a daemon has the index open, figures may be up to one checkpoint
    old, and a read racing a checkpoint can fail (the daemon opens LMDB
    without its lock file); ``dcmfs status`` asks a running daemon instead.
    """
    found = read_meta(path, ("stats",), "reading statistics")
    if found is None:
        return None
    raw = found["stats"]
    return STATS.unpack(raw) if raw else (0, 0, 0)


def read_meta(path: str, names: tuple[str, ...], doing: str) -> dict | None:
    """The raw ``meta`` values ``names`` of a closed index (None for a
    missing one), without the key; None if there is no index."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    try:
        env = lmdb.open(path, subdir=True, readonly=True, lock=True, max_dbs=len(DATABASES))
    except lmdb.Error as exc:
        raise lmdb_error(exc, doing) from exc
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            return {name: txn.get(name.encode(), db=meta) for name in names}
    except lmdb.Error as exc:
        raise lmdb_error(exc, doing) from exc
    finally:
        env.close()
