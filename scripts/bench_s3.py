"""S3 contenders: dcmfs on its local backend against dcmfs on Ceph RGW
(a throwaway one-node cluster on loopback, tests/ceph.py), interleaved, on
the CT series of the main benchmark (400 slices of 513 KB by default).

Figures per contender, medians of the repetitions (min and max in the JSON):
ingest MB/s through the mount (close of the last file), seconds from the
end of the ingest until the upload backlog is empty, cold read MB/s after
unmount, an emptied object cache and drop_caches, and for S3 the PUT
requests and uploaded bytes per GB ingested.

    ./scripts/bench-s3 [--files N] [--reps N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_contenders import drop_caches  # noqa: E402
from bench_data import make_series, read_files, write_files  # noqa: E402
from tests.ceph import CephS3, ensure_installed  # noqa: E402


def cli(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcmfs.cli", *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=1800)


def live(mp: pathlib.Path) -> dict:
    return json.loads(os.getxattr(mp, "user.dcmfs.status"))


def run(kind: str, base: pathlib.Path, files, cluster, options) -> dict:
    store, mp, key = base / "store", base / "mnt", base / "key"
    mp.mkdir(parents=True)
    extra = []
    if kind == "s3":
        creds = base / "s3.creds"
        creds.write_text(cluster.credentials_text())
        creds.chmod(0o600)
        extra = ["--s3-credentials-file", creds]
        url = f"s3://{cluster.bucket}/bench-{os.urandom(4).hex()}"
        cli("init", store, "--key-file", key, "--backend", url, *extra)
    else:
        cli("init", store, "--key-file", key)
    opts = ["-o", ",".join(options)] if options else []
    mount = ["mount", store, mp, "--key-file", key, *extra, *opts]
    cli(*mount)
    out: dict = {}
    try:
        logical = sum(p.stat().st_size for p in files)
        t = time.perf_counter()
        write_files(files, mp)
        ingest = time.perf_counter() - t
        out["ingest_mbs"] = logical / ingest / 1e6
        t = time.perf_counter()
        while True:  # the re-encoder's backlog, then (S3) the upload backlog
            st = live(mp)
            s3 = st.get("s3")
            if not st.get("backlog_files") and (s3 is None or s3["backlog_objects"] == 0):
                break
            time.sleep(0.2)
        out["settled_s"] = time.perf_counter() - t
        if s3 is not None:
            gb = logical / 1e9
            out["puts_per_gb"] = s3["uploads"] / gb
            out["uploaded_gb_per_gb"] = s3["uploaded_bytes"] / 1e9 / gb
            out["requests_per_gb"] = s3["requests"] / gb
        cli("umount", mp)
        if kind == "s3":
            shutil.rmtree(store / "objects")
            (store / "objects").mkdir(mode=0o700)
        drop_caches()
        cli(*mount)
        spent, n, wrong = read_files(files, mp)
        out["cold_read_mbs"] = n / spent / 1e6
        out["wrong"] = len(wrong)
    finally:
        cli("umount", mp, check=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("-o", dest="options", action="append", default=[],
                    help="mount options of every contender")
    args = ap.parse_args()
    reason = ensure_installed()
    if reason:
        print(f"bench-s3: {reason}", file=sys.stderr)
        return 1
    work = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-bench-s3-", dir="/var/tmp"))
    cluster = CephS3()
    results: dict[str, list[dict]] = {"local": [], "s3": []}
    try:
        cluster.start()
        (work / "src").mkdir()
        files = make_series(work / "src", args.files)
        kinds = ["local", "s3"]
        for rep in range(args.reps):
            for kind in kinds[rep % 2:] + kinds[:rep % 2]:  # the order rotates
                base = work / f"{kind}-{rep}"
                results[kind].append(run(kind, base, files, cluster, args.options))
                shutil.rmtree(base, ignore_errors=True)
                print(kind, rep, json.dumps(results[kind][-1]), file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for kind, runs in results.items():
        summary[kind] = {k: {"median": statistics.median(r[k] for r in runs),
                             "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
                         for k in runs[0]} if runs else {}
    if summary["local"] and summary["s3"]:
        summary["s3_ingest_vs_local"] = statistics.median(
            s["ingest_mbs"] / loc["ingest_mbs"] for s, loc in zip(results["s3"],
                                                                  results["local"]))
    print(json.dumps(summary, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"runs": results, "summary": summary},
                                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
