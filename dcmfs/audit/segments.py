"""The byte layout of audit segments (format feature ``audit-v1``).

``STORE/audit/segment-NNNNNNNN`` (mode 0600), append-only::

    header  b"DCMA" | version u16 | reserved u16 | store id (16) | segment u64 |
            first sequence u64 | previous chain hash (32) |
            nonce (12) + tag (16): AES-GCM-SIV(audit key, b"", header bytes before it)
    frame   length u32 (of what follows) | sequence u64 | nonce (12) |
            AES-GCM-SIV(audit key, record) + tag (16)

The audit key is HKDF(master, ``audit``, store id); a writer's nonces are
a random prefix per opening and a counter (any unique nonce reads back).  A record's associated
data is ``b"dcmfs-audit-1" | store id | segment u64 | sequence u64 | previous
chain hash``, so a record moved to another store, segment or position, or
following anything but its true predecessor, fails to open.  The *chain
hash* after a frame is ``SHA-256(previous chain hash | frame bytes)`` (the
chain starts from 32 zero bytes), computable without the key (``dcmfs
status``), checked with it (``dcmfs audit verify``).  A record is compact
JSON (``t`` ns since the epoch, ``e`` event, ``u``/``g``/``p`` the caller's
uid, gid and pid, ``c`` its process name, ``i`` inode, ``path``, and the
event's fields) padded with spaces to a multiple of 64 bytes, so a frame's
length says little about the path's.  A segment other than the last ends
with a ``segment-end`` record: a segment cut at a frame boundary is told
from a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Iterator

from ..storage import crypto

MAGIC = b"DCMA"
VERSION = 1
DIR = "audit"
PREFIX = "segment-"
#: failed unlock attempts, noted in the clear (no key yet), sealed into the
#: chain by the next read-write opening
UNLOCK_NOTE = "unlock-failures"
AAD_LABEL = b"dcmfs-audit-1"
ZERO_HASH = bytes(32)
_HEAD = struct.Struct(">4sHH16sQQ32s")
HEADER_LEN = _HEAD.size + crypto.NONCE_LEN + 16
_FRAME = struct.Struct(">IQ")
#: a frame longer than this is damage, not a record
MAX_FRAME = 1 << 20
PAD = 64


def audit_key(master_key: bytes, store_id: bytes) -> crypto.Siv:
    return crypto.Siv(crypto.derive(master_key, b"audit", store_id))


def segment_name(number: int) -> str:
    return f"{PREFIX}{number:08d}"


def list_segments(root: str) -> list[tuple[int, str]]:
    """(number, path) of every segment file in ``STORE/audit``, in order."""
    d = os.path.join(root, DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            out.append((int(name[len(PREFIX):]), os.path.join(d, name)))
    return sorted(out)


def make_header(aead: crypto.Siv, store_id: bytes, number: int, first_seq: int,
                prev_hash: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, store_id, number, first_seq, prev_hash)
    return head + aead.seal(b"", head)


class Header:
    __slots__ = ("store_id", "number", "first_seq", "prev_hash", "authentic")

    def __init__(self, raw: bytes, aead: crypto.Siv | None) -> None:
        if len(raw) < HEADER_LEN or raw[:4] != MAGIC:
            raise ValueError("not an audit segment")
        magic, version, _, self.store_id, self.number, self.first_seq, self.prev_hash = \
            _HEAD.unpack_from(raw)
        if version > VERSION:
            raise ValueError(f"audit segment version {version} is newer than this dcmfs")
        self.authentic = None
        if aead is not None:
            try:
                aead.open(raw[_HEAD.size:HEADER_LEN], raw[:_HEAD.size])
                self.authentic = True
            except crypto.AuthenticationFailed:
                self.authentic = False


def record_aad(store_id: bytes, segment: int, seq: int, prev_hash: bytes) -> bytes:
    return AAD_LABEL + store_id + struct.pack(">QQ", segment, seq) + prev_hash


#: one encoder (json.dumps builds one per call with these settings)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_record(fields: dict) -> bytes:
    raw = _ENCODE(fields).encode()
    return raw + b" " * (-len(raw) % PAD)


def make_frame(aead: crypto.Siv, store_id: bytes, segment: int, seq: int,
               prev_hash: bytes, fields: dict, nonce: bytes | None = None) -> bytes:
    """A sealed frame; ``nonce`` unique per record (random if not given)."""
    aad = record_aad(store_id, segment, seq, prev_hash)
    raw = encode_record(fields)
    sealed = aead.seal(raw, aad) if nonce is None else aead.seal_with(nonce, raw, aad)
    return _FRAME.pack(len(sealed) + 8, seq) + sealed


def chain(prev_hash: bytes, frame: bytes | memoryview) -> bytes:
    h = hashlib.sha256(prev_hash)
    h.update(frame)
    return h.digest()


def open_frame(aead: crypto.Siv, store_id: bytes, segment: int, prev_hash: bytes,
               frame: bytes) -> dict:
    """The record of one frame.  Raises AuthenticationFailed or ValueError."""
    seq = _FRAME.unpack_from(frame)[1]
    plain = aead.open(frame[_FRAME.size:], record_aad(store_id, segment, seq, prev_hash))
    fields = json.loads(plain)
    if not isinstance(fields, dict):
        raise ValueError("an audit record is not an object")
    return fields


class Torn:
    """The end of a segment cuts a frame (or holds bytes that are no frame)."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


def frames(data: bytes, start: int = HEADER_LEN) -> Iterator[tuple[int, int, bytes] | Torn]:
    """(offset, sequence, frame bytes) of each frame from ``start``; a
    :class:`Torn` last if the data ends inside a frame."""
    pos, end = start, len(data)
    while pos < end:
        if end - pos < _FRAME.size:
            yield Torn(pos, end - pos)
            return
        length, seq = _FRAME.unpack_from(data, pos)
        if length < 8 + 16 + crypto.NONCE_LEN or length > MAX_FRAME \
                or pos + 4 + length > end:
            yield Torn(pos, end - pos)
            return
        yield pos, seq, data[pos:pos + 4 + length]
        pos += 4 + length


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def plain_head(root: str) -> dict:
    """Size, segments and head (last sequence number and chain hash) of a
    store's trail without the key (unauthenticated: ``dcmfs status``)."""
    segs = list_segments(root)
    size = sum(os.path.getsize(p) for _, p in segs if os.path.exists(p))
    note = os.path.join(root, DIR, UNLOCK_NOTE)
    out = {"bytes": size, "segments": len(segs), "seq": 0, "head": None,
           "unsealed_unlock_failures": (os.path.getsize(note) // NOTE.size
                                        if os.path.exists(note) else 0)}
    if not segs:
        return out
    try:
        data = read_file(segs[-1][1])
        h = Header(data, None)
    except (OSError, ValueError):
        return out
    seq, digest = h.first_seq - 1, h.prev_hash
    for item in frames(data):
        if isinstance(item, Torn):
            break
        seq, digest = item[1], chain(digest, item[2])
    out.update(seq=seq, head=digest.hex())
    return out


#: one failed unlock attempt in ``audit/unlock-failures``: time ns, uid, gid,
#: pid, what was attempted (an index into NOTE_COMMANDS)
NOTE = struct.Struct(">QIIIB3x")
NOTE_COMMANDS = ("other", "mount", "recompress", "stats", "verify", "fsck", "audit", "key")
