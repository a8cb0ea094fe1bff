"""What a file's trip through the parser workers costs (issue 14): the
optimisations of the pool and the worker, each where it can fail."""

from __future__ import annotations

import io

import pytest

from dcmfs.core.extents import extents_of
from dcmfs.sandbox.pool import ParserPool
from dcmfs.storage import codec, dicom

from . import fuzz_dicom as F


def _ct_bands() -> list[tuple[bytes, codec.FrameSpec]]:
    """The bands of a real CT slice (512 x 512, 16 bits: two bands)."""
    data = F.sources(1)[0].read_bytes()
    plan = dicom.analyse(io.BytesIO(data), len(data))
    bands = [(data[s:s + n], f) for s, n, f in extents_of(plan, len(data), 1 << 20)
             if f is not None]
    assert len(bands) >= 2
    return bands


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_a_warm_worker_keeps_band_buffers_in_its_heap():
    """Bands after the first few cost the worker no fresh pages (glibc's
    defaults mapped and unmapped every band's buffers: ~480 page faults
    each)."""
    bands = _ct_bands()
    p = ParserPool(1)
    try:
        p.warm()
        pid = p._idle[0].proc.pid
        for band, frame in bands * 3:
            p.encode(band, frame, 1, (codec.HTJ2K,))
        before = _minor_faults(pid)
        n = 0
        for band, frame in bands * 10:
            used, payload = p.encode(band, frame, 1, (codec.HTJ2K,))
            assert codec.Codecs.decompress(used, payload, len(band)) == band
            n += 1
        assert (_minor_faults(pid) - before) / n < 50
    finally:
        p.close()
