"""Framed chunk objects (object layout 3, feature ``framed-chunks-v1``).

A chunk to be compressed with zstd whose plaintext is longer than one frame
is cut into frames of :data:`FRAME_SIZE` plaintext bytes, each compressed and sealed on its own, after a sealed frame table;
so a small random read reads (a ranged read) and decodes one frame, not the
whole chunk.  The object keeps the prefix and context block of layout 2::

    0    8      prefix (magic, version 3, kind, reserved)
    8    96     nonce + context block (as in layout 2; the flags carry
                CHUNK_FLAG_FRAMED)
    104  12+T+16  frame table: AES-256-GCM(file key, u32 stored length of
                each frame); AAD = prefix + store id + object id + CTX +
                u32 0xffffffff + u32 frame count
    ...  12+L+16  frame k (k = 0..count-1): AES-256-GCM(file key, frame);
                AAD = prefix + store id + object id + CTX + u32 k +
                u32 frame count

A frame's payload is the u32 stored lengths of its units (32 KiB of
plaintext each, :data:`UNIT_SIZE`; 2 to a full frame) and then the units,
each zstd-coded when its stored length is shorter than its plaintext
length, stored as it is when they are equal: a random read authenticates
the frame and decodes only the unit it needs.  The CTX's payload length is
the object length less 132, as in layout 2 (header 116 + one tag).  Every
frame binds the object (prefix, store, id, context) and its own place and
the frame count: frames cannot be swapped, dropped, reordered or moved to
another object; the table binds every frame's length, so a truncated or
extended object fails the length check of a whole read, and a ranged read
of a frame past the end comes back short.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from . import crypto
from .. import format as fmt
from .codec import NONE, ZSTD, CodecError

#: plaintext bytes per frame, the unit of authentication (the last frame of
#: a chunk may be shorter).  A whole read makes one GCM call per frame, and
#: each call lets go of the GIL and takes it back from the mount's other
#: threads: smaller frames cost a sequential reader more (measured with one
#: frame per call before units: 32 KiB frames 30 % more CPU for a 1 GiB
#: read than unframed chunks, 64 KiB 15 %); what a random read decodes is
#: the unit below
FRAME_SIZE = 64 * 1024
#: plaintext bytes per unit, what a frame's payload is coded in: a random
#: read decodes only the unit it lies in.  Measured on CT bytes (zstd-1,
#: CPU per decode; a whole MiB's units in one call against one 1 MiB zstd
#: frame; stored share of the plaintext): 16 KiB units 30 us, 1.35x, 0.3955;
#: 32 KiB 46 us, 1.22-1.26x, 0.395; 64 KiB (one per frame) 110-120 us,
#: 1.13-1.15x, 0.389.  32 KiB: 70 us less per random read (a third of
#: the daemon's CPU for one) for a tenth more decoding on a sequential read.
#: The frame stays the unit of authentication (one GCM call per 64 KiB)
UNIT_SIZE = 32 * 1024
#: chunks asked to be coded with zstd are framed (each frame stored as it
#: is where zstd does not shrink it); image codecs code a band whole, and a
#: chunk sealed uncompressed on purpose waits for the re-encoder
FRAME_CODECS = (ZSTD,)
_PLACE = struct.Struct(">II")
#: the unit lengths at the start of a frame's payload, by unit count
_LENGTHS = {n: struct.Struct(f">{n}I") for n in range(1, FRAME_SIZE // UNIT_SIZE + 1)}
_TABLE_MARK = 0xFFFFFFFF
_local = threading.local()
#: nonce and tag around each sealed piece
OVERHEAD = fmt.NONCE_LEN + fmt.TAG_LEN


def count_of(plain_len: int) -> int:
    return max(1, -(-plain_len // FRAME_SIZE))


def frame_len(plain_len: int, k: int) -> int:
    """Plaintext length of frame ``k`` of a chunk of ``plain_len`` bytes."""
    return min(FRAME_SIZE, plain_len - k * FRAME_SIZE)


def table_end(plain_len: int) -> int:
    """Where the sealed frame table ends (the first frame starts)."""
    return fmt.OBJ_HEADER_LEN - fmt.NONCE_LEN + OVERHEAD + 4 * count_of(plain_len)


def frameable(codec: int, plain_len: int) -> bool:
    return codec in FRAME_CODECS and plain_len > FRAME_SIZE


def units_of(frame_plain: int) -> int:
    """Units (of :data:`UNIT_SIZE`) in a frame of ``frame_plain`` bytes."""
    return max(1, -(-frame_plain // UNIT_SIZE))


def unit_len(frame_plain: int, j: int) -> int:
    return min(UNIT_SIZE, frame_plain - j * UNIT_SIZE)


def max_payload(frame_plain: int) -> int:
    """The longest payload a frame of ``frame_plain`` bytes may have
    (every unit stored as it is, after the unit lengths)."""
    return frame_plain + 4 * units_of(frame_plain)


def code(codec: int, plaintext: bytes, level: int) -> tuple[int, list[bytes]]:
    """(codec of the object, the frames' payloads): each frame is its units'
    stored lengths (u32 each) and the units, each zstd-coded when that makes
    it shorter, else as it is; the object's codec is zstd when any unit is.
    Every unit is compressed in one call (one release of the GIL)."""
    view = memoryview(plaintext)
    n = len(plaintext)
    spans = []  # (frame, start, end) of every unit
    for k in range(count_of(n)):
        fl = frame_len(n, k)
        for j in range(units_of(fl)):
            lo = k * FRAME_SIZE + j * UNIT_SIZE
            spans.append((k, lo, lo + unit_len(fl, j)))
    raws = [view[lo:hi] for _, lo, hi in spans]
    coded: list = raws
    if codec == ZSTD:
        cctx = zstandard.ZstdCompressor(level=level)
        multi = getattr(cctx, "multi_compress_to_buffer", None)
        coded = multi(raws) if multi is not None and len(raws) > 1 else \
            [cctx.compress(r) for r in raws]
    frames: list[list] = [[] for _ in range(count_of(n))]
    any_coded = False
    for i, (k, lo, hi) in enumerate(spans):
        piece = coded[i]
        if codec == ZSTD and len(piece) < hi - lo:
            any_coded = True
        else:
            piece = raws[i]
        frames[k].append(piece)
    out = [struct.pack(f">{len(f)}I", *map(len, f)) + b"".join(f) for f in frames]
    return (ZSTD if any_coded else NONE), out


def _units(payload, frame_plain: int) -> list:
    """A frame's units (memoryviews), their lengths checked; or :class:`CodecError`."""
    count = units_of(frame_plain)
    if len(payload) < 4 * count:
        raise CodecError("a frame is shorter than its unit lengths")
    view = memoryview(payload)
    out, pos = [], 4 * count
    for j, length in enumerate(_LENGTHS[count].unpack_from(view)):
        if length > unit_len(frame_plain, j):
            raise CodecError("a unit is longer than its plaintext")
        out.append(view[pos:pos + length])
        pos += length
    if pos != len(payload):
        raise CodecError("a frame's units do not fill it")
    return out


def _unit(piece, plain_len: int) -> bytes:
    if len(piece) == plain_len:
        return bytes(piece)
    try:
        out = _decompressor().decompress(piece, max_output_size=plain_len)
    except zstandard.ZstdError as exc:
        raise CodecError("zstd unit is damaged") from exc
    if len(out) != plain_len:
        raise CodecError("a unit decodes to the wrong length")
    return out


def decode_unit(payload, frame_plain: int, j: int) -> bytes:
    """Unit ``j`` of one frame, as :func:`decode_units` checks and decodes it."""
    return _unit(_units(payload, frame_plain)[j], unit_len(frame_plain, j))


def decode_units(payload, frame_plain: int, first: int, last: int) -> list[bytes]:
    """Units ``first``..``last`` of one frame (of ``frame_plain`` bytes),
    decoded (each exactly its length), or :class:`CodecError`: a random
    read decodes the 32 KiB unit it lies in, not the whole frame."""
    units = _units(payload, frame_plain)
    return [_unit(units[j], unit_len(frame_plain, j)) for j in range(first, last + 1)]


def decode(payload, frame_plain: int) -> bytes:
    """One frame's plaintext (exactly ``frame_plain`` bytes) or :class:`CodecError`."""
    return b"".join(decode_units(payload, frame_plain, 0, units_of(frame_plain) - 1))


def decode_all(payloads: list, plain_len: int) -> bytes:
    """The plaintext of a whole chunk of ``plain_len`` bytes from its
    frames' payloads (each unit exactly its length, as :func:`decode`
    checks it), or :class:`CodecError`.

    Every zstd unit is decoded in one call that releases the GIL once
    (``multi_decompress_to_buffer``), not once per unit: each release is
    a wait to take the GIL back from the mount's other threads, and 16 of
    them per MiB made a sequential read of framed chunks take twice the
    wall time of unframed ones (measured: 16 decodes of 64 KiB beside a
    busy Python thread 25 ms per MiB, one decode of 1 MiB 8 ms, the 16 in
    one call 7 ms)."""
    parts: list = []
    coded: list[tuple[int, int]] = []  # (place in parts, plaintext length)
    for k, payload in enumerate(payloads):
        fl = frame_len(plain_len, k)
        for j, piece in enumerate(_units(payload, fl)):
            if len(piece) != unit_len(fl, j):
                coded.append((len(parts), unit_len(fl, j)))
            parts.append(piece)
    multi = getattr(_decompressor(), "multi_decompress_to_buffer", None)
    if len(coded) < 2 or multi is None:  # nothing to batch (or no C backend)
        for i, length in coded:
            parts[i] = _unit(parts[i], length)
        return b"".join(parts)
    sizes = struct.pack(f"={len(coded)}Q", *(length for _, length in coded))
    try:
        out = multi([parts[i] for i, _ in coded], decompressed_sizes=sizes)
    except zstandard.ZstdError as exc:
        raise CodecError("zstd unit is damaged") from exc
    for j, (i, length) in enumerate(coded):
        if len(out[j]) != length:
            raise CodecError("a unit decodes to the wrong length")
        parts[i] = out[j]
    return b"".join(parts)


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:  # one per thread (not thread-safe; creating one per frame costs)
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def stored_len(frames: list[bytes]) -> int:
    """The CTX payload length of a framed object (object length less 132)."""
    return 4 * len(frames) + sum(len(f) + OVERHEAD for f in frames)


def seal(gcm: crypto.Gcm, aad: bytes, frames: list[bytes]) -> bytes:
    """Frame table and frames, sealed (``aad``: prefix + store id + object
    id + CTX); starts with the table's nonce (offset 104 of the object)."""
    count = len(frames)
    table = struct.pack(f">{count}I", *map(len, frames))
    out = [gcm.seal(table, aad + _PLACE.pack(_TABLE_MARK, count))]
    for k, f in enumerate(frames):
        out.append(gcm.seal(f, aad + _PLACE.pack(k, count)))
    return b"".join(out)


def open_table(gcm: crypto.Gcm, aad: bytes, plain_len: int, sealed) -> list[int]:
    """Every frame's start in the object (and the end of the last one),
    from the sealed table; raises :class:`crypto.AuthenticationFailed`."""
    count = count_of(plain_len)
    table = gcm.open(sealed, aad + _PLACE.pack(_TABLE_MARK, count))
    pos = table_end(plain_len)
    starts = [pos]
    for length in struct.unpack(f">{count}I", table):
        if length > max_payload(frame_len(plain_len, len(starts) - 1)):
            raise crypto.AuthenticationFailed("a frame is longer than its plaintext")
        pos += length + OVERHEAD
        starts.append(pos)
    return starts


def open_frame(gcm: crypto.Gcm, aad: bytes, k: int, count: int, sealed) -> bytes:
    """Frame ``k``'s payload; raises :class:`crypto.AuthenticationFailed`."""
    return gcm.open(sealed, aad + _PLACE.pack(k, count))
