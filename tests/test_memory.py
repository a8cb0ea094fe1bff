"""Memory stays bounded whatever the file size (a 4 GiB file, RSS < 200 MB)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import psutil
import pytest

#: ./scripts/test --quick leaves it out (writes and reads 4 GiB: ~35-85 s)
pytestmark = pytest.mark.slow

GIB = 1 << 30
MIB = 1 << 20
LIMIT = 200 * 1000 * 1000


def test_4_gib_file_keeps_daemon_rss_bounded(mounted):
    proc = psutil.Process(mounted.daemon_pid())
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    block = bytearray(os.urandom(MIB))
    want = hashlib.sha256()
    try:
        with open(mounted.mnt / "huge", "wb") as f:
            for i in range(4 * GIB // MIB):
                block[:8] = i.to_bytes(8, "big")  # every chunk differs
                f.write(block)
                want.update(block)
        got = hashlib.sha256()
        with open(mounted.mnt / "huge", "rb") as f:
            while b := f.read(4 * MIB):
                got.update(b)
    finally:
        stop.set()
        sampler.join()
    assert os.path.getsize(mounted.mnt / "huge") == 4 * GIB
    assert got.hexdigest() == want.hexdigest()
    assert peak[0] < LIMIT, f"daemon RSS peaked at {peak[0] / 1e6:.0f} MB"
    print(f"daemon peak RSS {peak[0] / 1e6:.0f} MB")
