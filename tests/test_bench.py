"""The benchmark must not rot: its quick mode runs end to end on every CI run.

No figure is judged by speed here (speed is the benchmark's business, on a
quiet machine); the test checks that every contender ran, that what was
written was read back (the benchmark compares it byte for byte and fails
otherwise), that the sizes make sense, and that the DICOM-aware re-encoder
really did its work on the native subset (and the paused and dicom=0
variants really were paused and zstd-only).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

MOUNTED = ("dcmfs", "dcmfs-paused", "dcmfs-dicom0")


def test_bench_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(out.read_text())

    # the CT series and the big file
    c = figures["contenders"]
    assert set(c) == {"plain", "dcmfs", "published"}
    assert figures["files"] == 20 and figures["big_mib"] == 16
    assert 0.1 < c["dcmfs"]["ratio"]["median"] < 0.6  # compressed at rest (CT: ~0.2)
    assert c["plain"]["ratio"]["median"] > 0.99
    assert 0.2 < c["published"]["ratio"]["median"] < 0.5
    for name in ("plain", "dcmfs"):
        for key in ("ingest_mb_s", "read_mb_s", "big_write_mb_s", "big_read_mb_s"):
            assert c[name][key] > 0
    assert c["dcmfs"]["reencoded_files"]["median"] == 20
    assert c["dcmfs"]["frames_coded"]["median"] >= 20  # every CT frame went to JPEG-LS
    assert c["dcmfs"]["reencode_errors"]["max"] == 0

    # the native subset: smallest CT, MR, CR and US file, once
    s = figures["subset"]
    sc = s["contenders"]
    assert set(sc) == {"plain", *MOUNTED, "published"}
    assert s["modalities"] == {"CT": 1, "MR": 1, "CR": 1, "US": 1} and s["copies"] == 1
    assert sc["plain"]["ratio"]["median"] > 0.99
    for name in MOUNTED:
        row = sc[name]
        assert row["ingest_mb_s"] > 0 and row["at_rest_mb_s"] > 0 and row["read_mb_s"] > 0
        assert row["reencoded_files"]["median"] == 4
        assert row["reencode_errors"]["max"] == 0
    # paused: nothing was taken from the backlog while the files were written
    assert sc["dcmfs-paused"]["backlog_after_write"]["median"] == 4
    # DICOM-aware: frames in JPEG-LS, smaller than zstd alone; dicom=0: no frames
    assert sc["dcmfs"]["frames_coded"]["median"] > 0
    assert sc["dcmfs-paused"]["frames_coded"]["median"] == sc["dcmfs"]["frames_coded"]["median"]
    assert sc["dcmfs-dicom0"]["frames_coded"]["median"] == 0
    dicom, zstd = sc["dcmfs"]["ratio"]["median"], sc["dcmfs-dicom0"]["ratio"]["median"]
    assert 0.05 < dicom < zstd < 0.9
    assert abs(sc["dcmfs-paused"]["ratio"]["median"] - dicom) < 0.01
    assert 0.05 < sc["published"]["ratio"]["median"] < 0.9
    for name in ("dcmfs", "published"):  # per modality: dcmfs from its stats xattr
        for mod in ("CT", "MR", "CR", "US"):
            assert 0 < sc[name][f"ratio_{mod}"]["median"] < 1
    assert 0 < s["lzma_only"]["ratio"] < 1
    assert set(s["comparisons"]) >= {"ingest_running_vs_paused", "ingest_running_vs_dicom0",
                                     "stored_size_vs_dicom0", "stored_size_vs_published"}
    assert s["comparisons"]["stored_size_vs_dicom0"] == dicom / zstd

    goals = {g["goal"]: g for g in figures["goals"]}
    assert len(goals) == 6 and all(isinstance(g["met"], bool) for g in goals.values())
    assert goals["subset stored/original, DICOM-aware, re-encoded"]["value"] == dicom

    assert "| dcmfs |" in r.stdout and "| dcmfs-paused |" in r.stdout
    assert "| goal (issue 3) |" in r.stdout
    assert not list(tmp_path.glob("dcmfs-bench-*"))  # cleaned up, nothing mounted
