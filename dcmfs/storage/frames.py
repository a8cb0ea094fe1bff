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

A frame is zstd-coded when its stored length is shorter than its plaintext
length, stored as it is when they are equal.  The CTX's payload length is
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

#: plaintext bytes per frame (the last frame of a chunk may be shorter).
#: Measured (zstd-1, a CT series' bytes): 16 / 32 / 64 KiB frames store
#: 0.396 / 0.396 / 0.390 of the plaintext (1 MiB: 0.389) and decode in
#: 25 / 42 / 77 us; through the mount, random 4 KiB reads ran at the same
#: IOPS with 32 and 64 KiB (the request's other costs dominate), while a
#: sequential read of 1 GiB took 30 % more CPU than unframed chunks with 32
#: KiB frames and 15 % more with 64 KiB
FRAME_SIZE = 64 * 1024
#: chunks asked to be coded with zstd are framed (each frame stored as it
#: is where zstd does not shrink it); image codecs code a band whole, and a
#: chunk sealed uncompressed on purpose waits for the re-encoder
FRAME_CODECS = (ZSTD,)
_PLACE = struct.Struct(">II")
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


def code(codec: int, plaintext: bytes, level: int) -> tuple[int, list[bytes]]:
    """(codec of the object, the coded frames): each frame zstd-coded when
    that makes it shorter, else as it is; the object's codec is zstd when
    any frame is."""
    view = memoryview(plaintext)
    frames = []
    any_coded = False
    cctx = zstandard.ZstdCompressor(level=level) if codec == ZSTD else None
    for k in range(count_of(len(plaintext))):
        raw = view[k * FRAME_SIZE:(k + 1) * FRAME_SIZE]
        if cctx is not None:
            coded = cctx.compress(raw)
            if len(coded) < len(raw):
                frames.append(coded)
                any_coded = True
                continue
        frames.append(bytes(raw))
    return (ZSTD if any_coded else NONE), frames


def decode(payload: bytes, plain_len: int) -> bytes:
    """One frame's plaintext (exactly ``plain_len`` bytes) or :class:`CodecError`."""
    if len(payload) == plain_len:
        return payload
    if len(payload) > plain_len:
        raise CodecError("a frame is longer than its plaintext")
    try:
        out = _decompressor().decompress(payload, max_output_size=plain_len)
    except zstandard.ZstdError as exc:
        raise CodecError("zstd frame is damaged") from exc
    if len(out) != plain_len:
        raise CodecError("a frame decodes to the wrong length")
    return out


def decode_all(payloads: list, plain_len: int) -> bytes:
    """The plaintext of a whole chunk of ``plain_len`` bytes from its
    frames' payloads (each frame exactly its length, as :func:`decode`
    checks it), or :class:`CodecError`.

    Every zstd frame is decoded in one call that releases the GIL once
    (``multi_decompress_to_buffer``), not once per frame: each release is
    a wait to take the GIL back from the mount's other threads, and 16 of
    them per MiB made a sequential read of framed chunks take twice the
    wall time of unframed ones (measured: 16 decodes of 64 KiB beside a
    busy Python thread 25 ms per MiB, one decode of 1 MiB 8 ms, the 16 in
    one call 7 ms)."""
    coded = [k for k, p in enumerate(payloads) if len(p) != frame_len(plain_len, k)]
    multi = getattr(_decompressor(), "multi_decompress_to_buffer", None)
    if len(coded) < 2 or multi is None:  # nothing to batch (or no C backend)
        return b"".join(decode(p, frame_len(plain_len, k)) for k, p in enumerate(payloads))
    for k in coded:
        if len(payloads[k]) > frame_len(plain_len, k):
            raise CodecError("a frame is longer than its plaintext")
    sizes = struct.pack(f"={len(coded)}Q", *(frame_len(plain_len, k) for k in coded))
    try:
        out = multi([payloads[k] for k in coded], decompressed_sizes=sizes)
    except zstandard.ZstdError as exc:
        raise CodecError("zstd frame is damaged") from exc
    parts = list(payloads)
    for j, k in enumerate(coded):
        if len(out[j]) != frame_len(plain_len, k):
            raise CodecError("a frame decodes to the wrong length")
        parts[k] = out[j]
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
        if length > frame_len(plain_len, len(starts) - 1):
            raise crypto.AuthenticationFailed("a frame is longer than its plaintext")
        pos += length + OVERHEAD
        starts.append(pos)
    return starts


def open_frame(gcm: crypto.Gcm, aad: bytes, k: int, count: int, sealed) -> bytes:
    """Frame ``k``'s payload; raises :class:`crypto.AuthenticationFailed`."""
    return gcm.open(sealed, aad + _PLACE.pack(k, count))
