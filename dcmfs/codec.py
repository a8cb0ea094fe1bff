"""Compression codecs, one byte id each (a leaf: imports only errors).

The id is part of every chunk's authenticated context, so a codec can never
be swapped under a stored object.  Later codecs (DICOM-aware, issue 3) add an
entry to ``CODECS``; ids are never reused.

Decompression is capped at the expected plaintext length: a hostile or
damaged payload cannot make the daemon allocate more than one chunk.
"""

from __future__ import annotations

import lzma

import zstandard

from .errors import IntegrityError

NONE, ZSTD, LZMA = 0, 1, 2
NAMES = {"none": NONE, "zstd": ZSTD, "lzma": LZMA}
IDS = {v: k for k, v in NAMES.items()}


class CodecError(IntegrityError):
    """A payload did not decompress to the expected length."""


class Codecs:
    """Compressors with their settings; one per store opening, thread-safe."""

    def __init__(self, zstd_level: int = 1, lzma_preset: int = 6) -> None:
        self._zstd_level = zstd_level
        self._lzma_preset = lzma_preset
        # zstandard's (de)compressor objects are not thread-safe; the
        # module-level one-shot functions are cheap enough per 1 MiB chunk.

    def compress(self, codec: int, plaintext: bytes) -> tuple[int, bytes]:
        """Compress; returns (codec actually used, payload).

        A chunk that does not shrink is stored uncompressed (codec NONE).
        """
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
        else:
            raise CodecError(f"unknown codec id {codec}")
        if len(out) != plain_len:
            raise CodecError(f"payload decompressed to {len(out)} bytes, expected {plain_len}")
        return out
