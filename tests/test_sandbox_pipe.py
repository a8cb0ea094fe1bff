"""What a file's trip through the parser workers costs (issue 14): the
optimisations of the pool and the worker, each where it can fail."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest

from dcmfs.core.extents import extents_of
from dcmfs.sandbox import pool as pool_mod
from dcmfs.sandbox import protocol
from dcmfs.sandbox.pool import CRASHED, ParserPool
from dcmfs.storage import codec, dicom

from . import fuzz_dicom as F
from .test_core import read_file, write_file
from .test_dicom import content
from .test_hostile import HOSTILE, _drain


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


def _series(fs, n: int) -> dict[str, bytes]:
    """n CT slices (one real slice, a byte of the header changed in each)."""
    ct = F.sources(1)[0].read_bytes()
    files = {}
    for i in range(n):
        data = ct[:200] + bytes([ct[200] ^ (i + 1)]) + ct[201:] if ct[200:201] else ct
        files[f"/s{i:02d}.dcm"] = data
        write_file(fs, f"/s{i:02d}.dcm", data)
    return files


def test_the_next_files_analysis_runs_ahead(make_fs):
    """While a file's last band is coded, the next file is analysed on a
    worker the first band freed; its plan is used, every file exact."""
    fs = make_fs(HOSTILE)
    files = _series(fs, 6)
    _drain(fs, timeout=120)
    for path, data in files.items():
        assert content(fs, path)["path"] == "frames", path
        assert read_file(fs, path) == data, path
    assert fs.reencoder.plans_ahead >= 4  # all but the first (and a pause at most)
    assert fs.reencoder.parsers.started == 2  # the same two workers, no third


def test_a_plan_made_ahead_is_not_used_for_a_changed_file(make_fs, monkeypatch):
    """The file analysed ahead is rewritten (not DICOM any more) before its
    turn: it is analysed again, never coded with the stale plan."""
    fs = make_fs(HOSTILE)
    files = _series(fs, 2)
    r = fs.reencoder
    real = type(r)._look_ahead
    changed = []

    def look_then_change(self, current):
        real(self, current)
        if self._ahead is not None and not changed:
            self._ahead[4].result()  # the old bytes' plan: frames
            ino = self._ahead[0]
            with fs.lock, fs.index.begin() as txn:
                path = next(p for p in files if fs._resolve(txn, p) == ino)
            files[path] = b"not DICOM any more " * (len(files[path]) // 19)
            fh = fs.open(path, os.O_WRONLY | os.O_TRUNC)
            fs.write(fh, files[path], 0)
            fs.release(fh)
            changed.append(path)

    monkeypatch.setattr(type(r), "_look_ahead", look_then_change)
    _drain(fs, timeout=120)
    assert changed
    assert content(fs, changed[0])["reason"] == "not DICOM"
    assert r.plans_ahead == 0
    for path, data in files.items():
        assert read_file(fs, path) == data, path


def test_a_worker_killed_while_analysing_ahead(make_fs, monkeypatch):
    """A worker that dies on the file analysed ahead fails that file alone
    (recorded once, 'analysis crashed'); the files before and after it are
    coded in order and every file reads back exact."""
    fs = make_fs(HOSTILE)
    files = _series(fs, 5)
    paths = list(files)
    real_call = pool_mod._Worker.call
    analyses = []

    def die_on_third(self, request, blob, timeout):
        if request.get("op") == "analyse":
            analyses.append(self.proc.pid)
            if len(analyses) == 3:
                os.kill(self.proc.pid, signal.SIGSEGV)
                self.proc.wait()
        return real_call(self, request, blob, timeout)

    monkeypatch.setattr(pool_mod._Worker, "call", die_on_third)
    _drain(fs, timeout=120)
    reasons = [content(fs, p)["reason"] for p in paths]
    paths_ = [content(fs, p)["path"] for p in paths]
    assert reasons.count(CRASHED) == 1 and reasons[2] == CRASHED, reasons
    assert paths_ == ["frames", "frames", "general", "frames", "frames"], paths_
    assert fs.reencoder.plans_ahead >= 2
    for path, data in files.items():
        assert read_file(fs, path) == data, path


def test_a_message_crosses_a_small_pipe_whole_and_in_order():
    """One writev per message; a pipe too small for it takes it in pieces
    (partial writes resume where they stopped) and the reader gets it
    whole; a reader that stops reading makes the writer time out at its
    deadline instead of blocking."""
    rfd, wfd = os.pipe()
    try:
        os.set_blocking(wfd, False)
        blob = os.urandom(3 * 65536 + 123)  # past a 64 KiB pipe's buffer
        got = []
        t = threading.Thread(target=lambda: got.append(protocol.recv(rfd)))
        t.start()
        protocol.send(wfd, {"op": "encode", "n": 1}, blob, time.monotonic() + 10)
        t.join(10)
        assert got == [({"op": "encode", "n": 1}, blob)]
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # nobody reads now
            protocol.send(wfd, {"op": "encode"}, blob, time.monotonic() + 0.5)
        assert time.monotonic() - start < 5
    finally:
        os.close(rfd)
        os.close(wfd)
