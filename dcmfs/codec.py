"""Compression codecs, one byte id each (a leaf: imports only errors).

The id is part of every chunk's authenticated context, so a codec can never
be swapped under a stored object; ids are never reused.

* 0 none, 1 zstd, 2 lzma (xz): general purpose, any bytes.
* 3 jpegls: one frame of native DICOM pixel data, lossless JPEG-LS (CharLS
  through ``imagecodecs``, which releases the GIL).  The payload is
  self-describing: a small header (:data:`_JLS_HEADER`: geometry, sample
  layout, byte order, sample mapping) followed by the JPEG-LS codestream, so
  decoding needs nothing but the payload and the plaintext length.  Signed
  samples are mapped to offset binary (``v + 2**(bits-1)``), which keeps
  neighbouring values neighbours (masking two's complement to BitsStored
  wraps -1 to the top of the range and costs 25 % on CT); samples that use
  bits above BitsStored are coded at the full 16 bits.  Anything the codec
  cannot take exactly raises :class:`Unsuitable` and the caller falls back.

Decompression is capped at the expected plaintext length: a hostile or
damaged payload cannot make the daemon allocate more than one chunk.
"""

from __future__ import annotations

import lzma
import struct
from typing import NamedTuple

import zstandard

from .errors import IntegrityError

NONE, ZSTD, LZMA, JPEGLS = 0, 1, 2, 3
NAMES = {"none": NONE, "zstd": ZSTD, "lzma": LZMA, "jpegls": JPEGLS}
IDS = {v: k for k, v in NAMES.items()}

#: version u8, rows u16, columns u16, samples u8, bits allocated u8, bits
#: used u8, mapping u8 (0 unsigned as is, 1 signed -> offset binary),
#: planar u8, big-endian u8
_JLS_HEADER = struct.Struct(">BHHBBBBBB")
_JLS_VERSION = 1


class FrameSpec(NamedTuple):
    """How one frame of native pixel data is laid out (from the DICOM header)."""

    rows: int
    columns: int
    samples: int          # 1 or 3
    bits_allocated: int   # 8 or 16
    bits_stored: int
    signed: bool
    planar: bool          # PlanarConfiguration 1: colour planes one after the other
    big_endian: bool

    @property
    def nbytes(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated // 8


class CodecMismatch(IntegrityError):
    """A codec's output did not decode back to its input (never stored)."""


class Unsuitable(ValueError):
    """The image codec cannot take this frame exactly (the caller falls back)."""


class CodecError(IntegrityError):
    """A payload did not decompress to the expected length."""


class Codecs:
    """Compressors with their settings; one per store opening, thread-safe."""

    def __init__(self, zstd_level: int = 1, lzma_preset: int = 6) -> None:
        self._zstd_level = zstd_level
        self._lzma_preset = lzma_preset
        # zstandard's (de)compressor objects are not thread-safe; the
        # module-level one-shot functions are cheap enough per 1 MiB chunk.

    def compress(self, codec: int, plaintext: bytes,
                 frame: FrameSpec | None = None) -> tuple[int, bytes]:
        """Compress; returns (codec actually used, payload).

        A chunk that does not shrink is stored uncompressed (codec NONE).
        JPEGLS needs the ``frame`` layout; it keeps whichever of JPEG-LS and
        zstd is smaller (palette colour and noise-like frames go to zstd), and
        raises :class:`Unsuitable` for frames it cannot code.
        """
        if codec == JPEGLS:
            jls = _jls_encode(plaintext, frame)  # None: CharLS gave up (noise)
            used, payload = self.compress(ZSTD, plaintext)
            return (JPEGLS, jls) if jls is not None and len(jls) < len(payload) \
                else (used, payload)
        if codec == ZSTD:
            payload = zstandard.compress(plaintext, self._zstd_level)
        elif codec == LZMA:
            payload = lzma.compress(plaintext, format=lzma.FORMAT_XZ, preset=self._lzma_preset)
        elif codec == NONE:
            return NONE, plaintext
        else:
            raise ValueError(f"unknown codec id {codec}")
        if len(payload) >= len(plaintext):
            return NONE, plaintext
        return codec, payload

    @staticmethod
    def decompress(codec: int, payload: bytes, plain_len: int) -> bytes:
        """Decompress to exactly ``plain_len`` bytes or raise :class:`CodecError`."""
        if codec == NONE:
            out = payload
        elif codec == ZSTD:
            try:
                out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=plain_len)
            except zstandard.ZstdError as exc:
                raise CodecError("zstd payload is damaged") from exc
        elif codec == LZMA:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            try:
                out = dec.decompress(payload, max_length=plain_len)
            except lzma.LZMAError as exc:
                raise CodecError("lzma payload is damaged") from exc
            if not dec.eof:
                raise CodecError("lzma payload is longer than its recorded size")
        elif codec == JPEGLS:
            out = _jls_decode(payload, plain_len)
        else:
            raise CodecError(f"unknown codec id {codec}")
        if len(out) != plain_len:
            raise CodecError(f"payload decompressed to {len(out)} bytes, expected {plain_len}")
        return out


def warm_up() -> None:
    """Import the image codec's libraries now (a mount does it in the
    background: the first read of a DICOM-coded file after a mount would
    otherwise wait ~0.2 s for imagecodecs and numpy to load)."""
    import imagecodecs  # noqa: F401
    import numpy  # noqa: F401


# --- JPEG-LS frames ------------------------------------------------------------
def _samples(plaintext: bytes, spec: FrameSpec):
    """The frame's samples as an array shaped for the image codec:
    (rows, columns) or (rows, columns, 3)."""
    import numpy as np

    dtype = np.uint8 if spec.bits_allocated == 8 else np.dtype(">u2" if spec.big_endian else "<u2")
    arr = np.frombuffer(plaintext, dtype=dtype)
    if spec.samples == 1:
        return arr.reshape(spec.rows, spec.columns)
    if spec.planar:
        return arr.reshape(3, spec.rows, spec.columns).transpose(1, 2, 0)
    return arr.reshape(spec.rows, spec.columns, 3)


def _jls_encode(plaintext: bytes, spec: FrameSpec | None) -> bytes | None:
    import imagecodecs
    import numpy as np

    if spec is None:
        raise Unsuitable("no frame layout given")
    if spec.bits_allocated not in (8, 16) or spec.samples not in (1, 3):
        raise Unsuitable(f"{spec.bits_allocated}-bit, {spec.samples}-sample frames")
    if len(plaintext) != spec.nbytes or not 0 < spec.rows < 65536 or not 0 < spec.columns < 65536:
        raise Unsuitable("frame size does not match its geometry")
    arr = _samples(plaintext, spec)
    bits = spec.bits_allocated
    mapping = 0
    if spec.bits_allocated == 16:
        arr = arr.astype(np.uint16)  # native byte order for the codec
        stored = spec.bits_stored if 1 < spec.bits_stored <= 16 else 16
        if spec.signed and spec.samples == 1:
            # offset binary at BitsStored if the samples are sign extensions
            # of it, else at the full 16 bits
            values = arr.view(np.int16).astype(np.int32)
            lo, hi = int(values.min()), int(values.max())
            if not (-(1 << (stored - 1)) <= lo and hi < (1 << (stored - 1))):
                stored = 16
            arr, bits, mapping = (values + (1 << (stored - 1))).astype(np.uint16), stored, 1
        elif int(arr.max()) < (1 << stored):
            bits = stored
    arr = np.ascontiguousarray(arr)
    try:
        stream = imagecodecs.jpegls_encode(arr)
    except imagecodecs.JpeglsError:
        # e.g. noise that would grow past imagecodecs' output buffer: this
        # frame goes to zstd (or stays as is)
        return None
    header = _JLS_HEADER.pack(_JLS_VERSION, spec.rows, spec.columns, spec.samples,
                              spec.bits_allocated, bits, mapping, spec.planar, spec.big_endian)
    return header + stream


def _jls_decode(payload: bytes, plain_len: int) -> bytes:
    import imagecodecs
    import numpy as np

    if len(payload) < _JLS_HEADER.size:
        raise CodecError("jpegls payload is too short")
    version, rows, columns, samples, alloc, bits, mapping, planar, big = \
        _JLS_HEADER.unpack_from(payload)
    if version != _JLS_VERSION or alloc not in (8, 16) or samples not in (1, 3) \
            or rows * columns * samples * alloc // 8 != plain_len:
        raise CodecError("jpegls payload header does not match the chunk")
    try:
        arr = imagecodecs.jpegls_decode(memoryview(payload)[_JLS_HEADER.size:])
    except Exception as exc:  # noqa: BLE001 — any decoder failure is damage
        raise CodecError(f"jpegls payload is damaged: {exc}") from exc
    want = (rows, columns) if samples == 1 else (rows, columns, 3)
    if arr.shape != want:
        raise CodecError("jpegls payload decoded to the wrong shape")
    if alloc == 8:
        arr = arr.astype(np.uint8)
    else:
        if mapping == 1:
            arr = (arr.astype(np.int32) - (1 << (bits - 1))).astype(np.int16)
        arr = arr.astype(">u2" if big else "<u2") if mapping == 0 else \
            arr.astype(">i2" if big else "<i2")
    if samples == 3 and planar:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr).tobytes()
