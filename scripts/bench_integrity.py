"""Figures of the integrity tools (issue 4): verify speed on the CT series,
mounted and not; the time to rebuild the index of a store of many files,
from its snapshot and journals and from the objects alone.

    ./scripts/bench-integrity [--files 400] [--small 10000] [--reps 3] [--json out.json]

The CT series is N copies of pydicom-data's 693_UNCR.dcm with distinct UIDs,
written through a real mount and re-encoded (image-coded frames,
the heaviest decode), so verify reads what a PACS would have stored.  Medians of --reps.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cli(*args, check=True, timeout=3600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dcmfs.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SystemExit(f"dcmfs {' '.join(map(str, args))} failed: {r.stderr}")
    return r


def ct_series(n: int) -> list[bytes]:
    import data_store
    import pydicom
    from pydicom.uid import generate_uid
    src = pathlib.Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append(buf.getvalue())
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def verify_speed(base: pathlib.Path, files: int, reps: int) -> dict:
    store, mnt, key = base / "ct-store", base / "ct-mnt", base / "ct-key"
    mnt.mkdir()
    cli("init", store, "--key-file", key)
    cli("mount", store, mnt, "--key-file", key)
    try:
        series = ct_series(files)
        for i, data in enumerate(series):
            (mnt / f"ct{i:04d}.dcm").write_bytes(data)
        cli("recompress", store)
        mb = sum(map(len, series)) / 1e6
        mounted = [timed(lambda: cli("verify", store)) for _ in range(reps)]
    finally:
        cli("umount", mnt)
    offline = []
    for _ in range(reps):
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
        offline.append(timed(lambda: cli("verify", store, "--key-file", key)))
    ratio = json.loads(cli("stats", store, "--key-file", key, "--json").stdout)
    stored = sum(g["stored_bytes"] for g in ratio["groups"])
    return {"files": files, "mb": round(mb, 1), "stored_over_original": round(stored / mb / 1e6, 3),
            "verify_mounted_mb_s": round(mb / statistics.median(mounted), 1),
            "verify_unmounted_cold_mb_s": round(mb / statistics.median(offline), 1),
            "runs_s": {"mounted": [round(t, 2) for t in mounted],
                       "unmounted": [round(t, 2) for t in offline]}}


def rebuild_time(base: pathlib.Path, n: int, reps: int) -> dict:
    """A store of n small files in 100 directories, written through the core."""
    import shutil

    from dcmfs.config import Config
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage.header import Secret, init_store, open_store
    secret_bytes = os.urandom(32)
    key = base / "small-key"
    key.write_bytes(secret_bytes)
    secret = Secret("keyfile", secret_bytes)
    cfg = Config(reencode=False, checkpoint_interval=0)
    src = base / "small-store"
    init_store(str(src), secret, cfg)
    fs = FileSystem(open_store(str(src), secret), cfg)
    for d in range(100):
        fs.mkdir(f"/d{d}", 0o755, 0, 0)
    for i in range(n):
        fh = fs.create(f"/d{i % 100}/f{i}.dcm", 0o644, os.O_WRONLY, 0, 0)
        fs.write(fh, os.urandom(64) * 64, 0)
        fs.release(fh)
    fs.close()
    out = {"files": n}
    for label, remove in (("from_snapshot_and_journal", ["index/data.mdb"]),
                          ("from_objects_alone", ["index", "snapshots"])):
        times = []
        for _ in range(reps):
            work = base / f"small-{label}"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            for rel in remove:
                p = work / rel
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            t = time.perf_counter()
            r = cli("fsck", work, "--rebuild-index", "--key-file", key, "--json", check=False)
            times.append(time.perf_counter() - t)
            if r.returncode not in (0, 34):
                raise SystemExit(f"dcmfs fsck --rebuild-index failed: {r.stderr}")
            result = json.loads(r.stdout)
            assert result["clean"], result["remaining"][:3]
        out[label + "_s"] = round(statistics.median(times), 2)
        out[label + "_runs_s"] = [round(t, 2) for t in times]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--small", type=int, default=10000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcmfs-integrity-") as tmp:
        base = pathlib.Path(tmp)
        out = {"verify": verify_speed(base, args.files, args.reps),
               "rebuild": rebuild_time(base, args.small, args.reps)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
