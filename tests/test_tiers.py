"""Hot and cold DICOM (issue 17): the re-encoder first codes frames in the
fast-decoding form (blosc2: byte-shuffled zstd; HTJ2K where it saves much,
zstd where cheaper) and codes them densely
(the configured image codecs: JPEG XL) once a file has not been read for
``hot_days``; a file read meanwhile stays hot."""

from __future__ import annotations

import dataclasses
import os
import time

import pydicom
import pytest

from dcmfs.storage import codec
from dcmfs.storage.objects import stored_bytes

from .conftest import assert_no_dangling, ct_file
from .test_core import read_file
from .test_dicom import REAL, layout, write_recompressed


def _codecs(table) -> set[int]:
    return {r.codec for r in table.values()}


def _content(fs, path):
    with fs.lock, fs.index.begin() as txn:
        return txn.get_content(fs._resolve(txn, path))


def _image_bands(table) -> int:
    return sum(r.codec in codec.IMAGE_CODECS for r in table.values())


@pytest.mark.parametrize("sandbox", [True, False], ids=["workers", "in-process"])
def test_fresh_files_decode_fast_and_turn_dense_when_not_read(make_fs, sandbox):
    hot_s = 3.0
    fs = make_fs(dataclasses.replace(REAL, hot_days=hot_s / 86400, sandbox=sandbox))
    fs.reencoder.tiers.next_look = float("inf")  # the test says when to look
    ds = pydicom.dcmread(ct_file())
    unread, hot_table = write_recompressed(fs, "/unread.dcm", ds)
    ds.InstanceNumber = 2
    read, _ = write_recompressed(fs, "/read.dcm", ds)
    # a CT slice: blosc2 decodes ~3x as fast as HTJ2K for ~8 % of the band more
    assert _codecs(hot_table) <= {codec.BLOSC2, codec.ZSTD}, _codecs(hot_table)
    assert codec.BLOSC2 in _codecs(hot_table)
    assert _content(fs, "/unread.dcm")["tier"] == "hot"
    hot_at = _content(fs, "/read.dcm")["hot_at"]
    time.sleep(hot_s + 0.5)
    assert read_file(fs, "/read.dcm") == read  # read within its hot time: stays hot
    fs.reencoder._look_for_cold()
    fs.reencoder.tiers.next_look = float("inf")  # one look only (it set the next)
    assert fs.reencoder.wait_idle(120)
    cold_table = layout(fs, "/unread.dcm")
    assert codec.JPEGXL in _codecs(cold_table) and codec.BLOSC2 not in _codecs(cold_table)
    # the hot coding's one band per frame, the cold one's two (HOT_BAND_BYTES)
    assert [_image_bands(t) for t in (hot_table, cold_table)] == [1, 2]
    assert sum(map(stored_bytes, cold_table.values())) < \
        sum(map(stored_bytes, hot_table.values()))
    assert _content(fs, "/unread.dcm")["tier"] == "cold"
    assert read_file(fs, "/unread.dcm") == unread  # byte-exact, decoded and compared
    kept = _content(fs, "/read.dcm")
    assert kept["tier"] == "hot" and kept["hot_at"] > hot_at
    assert codec.JPEGXL not in _codecs(layout(fs, "/read.dcm"))
    assert fs.live_status()["cooled_files"] == 1
    tiers = {g["modality"]: g["tiers"] for g in fs.content_stats()["groups"]}
    assert tiers["CT"]["hot"][0] == 1 and tiers["CT"]["cold"][0] == 1
    fs.checkpoint()
    assert_no_dangling(fs)
    fs.close()
    fs = make_fs(REAL)  # after a remount, and with hot_days=0 nothing is hot any more
    assert read_file(fs, "/unread.dcm") == unread and read_file(fs, "/read.dcm") == read


def test_hot_days_0_codes_densely_at_once(make_fs):
    fs = make_fs(dataclasses.replace(REAL, hot_days=0))
    data, table = write_recompressed(fs, "/ct.dcm", pydicom.dcmread(ct_file()))
    assert codec.JPEGXL in _codecs(table)
    assert "tier" not in _content(fs, "/ct.dcm")
    assert read_file(fs, "/ct.dcm") == data


def test_a_blosc2_payload_decodes_only_to_its_band():
    """Codec 7 is capped like every codec: its chunk header must name the
    band's size and the payload's length before anything is decompressed."""
    ds = pydicom.dcmread(ct_file())
    band = ds.PixelData[:256 * 512 * 2]
    spec = codec.FrameSpec(256, 512, 1, 16, ds.BitsStored, True, False, False)
    used, payload = codec.Codecs().compress(codec.IMAGE_HOT, band, spec)
    assert used == codec.BLOSC2
    assert codec.Codecs.decompress(used, payload, len(band)) == band
    at = codec._IMG_HEADER.size
    for pos in (at + 4, at + 6, at + 12, at + 14):  # its sizes: refused before decoding
        damaged = bytearray(payload)
        damaged[pos] ^= 0xFF
        with pytest.raises(codec.CodecError):
            codec.Codecs.decompress(used, bytes(damaged), len(band))
    for cut in (len(payload) - 1, at + 10):
        with pytest.raises(codec.CodecError):
            codec.Codecs.decompress(used, payload[:cut], len(band))


def _blosc2_format(payload: bytes) -> int:
    """The compressor format of a codec-7 payload's C-Blosc2 chunk (the top
    three bits of its flags byte: 1 LZ4 and LZ4HC, 4 zstd)."""
    return payload[codec._IMG_HEADER.size + 2] >> 5


def test_the_hot_tier_codes_for_decode_speed_and_reads_what_it_coded_before():
    """The hot tier is there to decode fast (issue 17): its blosc2 chunks are
    LZ4HC-compressed (a band decodes ~4x as fast as zstd's, for ~0.04 of the
    CT slice more), and the zstd chunks of the hot bands stores made before
    still decode (the chunk header names its compressor)."""
    import imagecodecs

    ds = pydicom.dcmread(ct_file())
    spec = codec.FrameSpec(256, 512, 1, 16, ds.BitsStored, True, False, False)
    for band in (ds.PixelData[:256 * 512 * 2], ds.PixelData[256 * 512 * 2:]):
        used, payload = codec.Codecs().compress(codec.IMAGE_HOT, band, spec)
        assert used == codec.BLOSC2 and _blosc2_format(payload) == 1
        assert len(payload) < 0.37 * len(band)
        assert codec.Codecs.decompress(used, payload, len(band)) == band
        # a band as the hot tier coded it before: zstd level 3 in the chunk
        arr, header = codec._image_samples(band, spec)
        old = header + imagecodecs.blosc2_encode(arr, level=3, compressor="zstd",
                                                 shuffle="shuffle", typesize=2, numthreads=1)
        assert _blosc2_format(old) == 4
        assert codec.Codecs.decompress(codec.BLOSC2, old, len(band)) == band


def test_a_hot_ct_slice_is_one_band_and_a_cold_one_two(make_fs):
    """The hot tier codes a 512 KiB CT frame as one band (one object: each
    object more is a read, two authentications and a hand-off to a
    decoding thread, and blosc2 decodes the whole frame in ~0.2 ms); the
    cold coding keeps 256 KiB bands, whose decoding two cores share."""
    fs = make_fs(REAL)  # hot_days: the default
    fs.reencoder.tiers.next_look = float("inf")
    ds = pydicom.dcmread(ct_file())
    data, hot_table = write_recompressed(fs, "/ct.dcm", ds)
    pixels = [r for r in hot_table.values() if r.codec in codec.IMAGE_CODECS]
    assert [r.plain_len for r in pixels] == [len(ds.PixelData)]
    assert read_file(fs, "/ct.dcm") == data
    fs.close()
    fs = make_fs(dataclasses.replace(REAL, hot_days=0))
    ds.InstanceNumber = 2
    data, cold_table = write_recompressed(fs, "/cold.dcm", ds)
    pixels = [r for r in cold_table.values() if r.codec in codec.IMAGE_CODECS]
    assert [r.plain_len for r in pixels] == [len(ds.PixelData) // 2] * 2
    assert read_file(fs, "/cold.dcm") == data
