"""The benchmark must not rot: its quick mode runs end to end on every CI run.

No figure is judged by speed here (speed is the benchmark's business, on a
quiet machine); the test checks that every contender ran, that what was
written was read back, and that the sizes make sense.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(out.read_text())
    c = figures["contenders"]
    assert set(c) == {"plain", "dcmfs", "published"}
    assert figures["files"] == 20 and figures["big_mib"] == 16
    assert 0.1 < c["dcmfs"]["ratio"]["median"] < 0.6  # compressed at rest (CT: ~0.2)
    assert c["plain"]["ratio"]["median"] > 0.99
    assert 0.2 < c["published"]["ratio"]["median"] < 0.5
    for name in ("plain", "dcmfs"):
        for key in ("ingest_mb_s", "read_mb_s", "big_write_mb_s", "big_read_mb_s"):
            assert c[name][key] > 0
    assert "| dcmfs |" in r.stdout
    assert not list(tmp_path.glob("dcmfs-bench-*"))  # cleaned up, nothing mounted
