"""S3 contenders: dcmfs on its local backend against dcmfs on Ceph RGW
(a throwaway one-node cluster on loopback, tests/ceph.py), interleaved, on
the CT series of the main benchmark (400 slices of 513 KB by default).
``./scripts/bench`` runs them (:func:`s3_contenders`, skipped with the
reason printed when Ceph cannot be installed or started); alone:

    ./scripts/bench-s3 [--files N] [--reps N] [--json OUT] [-o OPTIONS]

Figures per contender, medians of the repetitions (min and max beside):
ingest MB/s through the mount (close of the last file), seconds from the
end of the ingest until everything is at rest (re-encoded and, for S3,
uploaded: the upload backlog empty), cold read MB/s after unmount, an
emptied object cache and drop_caches, with the daemon's CPU seconds of that
read, and for S3 the PUT requests, all requests and uploaded bytes per GB
ingested and the GET requests of the cold read per GB read.
"""

from __future__ import annotations

import argparse
import json
import os
import psutil
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


def daemon(store: pathlib.Path):
    from dcmfs.storage.header import read_lock_pid
    pid = read_lock_pid(str(store))
    return psutil.Process(pid) if pid else None


def cpu_s(proc) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


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
        out["load"] = os.getloadavg()[0]
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
        proc = daemon(store)
        cpu = cpu_s(proc)
        before = live(mp).get("s3") or {}
        spent, n, wrong = read_files(files, mp)
        out["cold_read_mbs"] = n / spent / 1e6
        out["cold_read_cpu_s"] = cpu_s(proc) - cpu
        if kind == "s3":  # GET requests (a pack's neighbours come in one)
            after = live(mp)["s3"]
            out["gets_per_gb_read"] = (after.get("gets", 0) - before.get("gets", 0)) / (n / 1e9)
        out["wrong"] = len(wrong)
    finally:
        cli("umount", mp, check=False)
    return out


KINDS = {"local": "dcmfs", "s3": "dcmfs-s3"}


def s3_contenders(workdir: pathlib.Path, files, reps: int, options=()) -> dict:
    """The local backend against Ceph RGW, ``reps`` times, order rotating;
    ``{"skipped": reason}`` when Ceph cannot be installed or started."""
    reason = ensure_installed()
    if reason:
        return {"skipped": reason}
    cluster = CephS3()
    results: dict[str, list[dict]] = {"local": [], "s3": []}
    try:
        try:
            cluster.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            return {"skipped": f"the Ceph cluster did not start ({type(exc).__name__}: {exc})"}
        kinds = list(results)
        for rep in range(reps):
            for kind in kinds[rep % 2:] + kinds[:rep % 2]:  # the order rotates
                base = workdir / f"{kind}-{rep}"
                try:
                    results[kind].append(run(kind, base, files, cluster, list(options)))
                finally:
                    shutil.rmtree(base, ignore_errors=True)
                print(f"  s3 bench {kind} {rep + 1}/{reps}: {json.dumps(results[kind][-1])}",
                      file=sys.stderr)
    finally:
        cluster.stop()
    return summarize(results, files, reps, options)


def summarize(results: dict, files, reps: int, options) -> dict:
    out = {"files": len(files), "reps": reps, "options": list(options), "runs": results,
           "contenders": {}}
    for kind, runs in results.items():
        out["contenders"][KINDS[kind]] = {
            k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]} if runs else {}
    if results["local"] and results["s3"]:
        # per repetition (the two ran back to back), then the median
        out["s3_ingest_vs_local"] = statistics.median(
            s["ingest_mbs"] / loc["ingest_mbs"]
            for s, loc in zip(results["s3"], results["local"]))
        out["s3_cold_read_vs_local"] = statistics.median(
            s["cold_read_mbs"] / loc["cold_read_mbs"]
            for s, loc in zip(results["s3"], results["local"]))
    return out


ROWS = [("ingest MB/s", "ingest_mbs", "{:.1f}"), ("until at rest (uploaded), s", "settled_s",
                                                  "{:.1f}"),
        ("cold read, empty cache, MB/s", "cold_read_mbs", "{:.1f}"),
        ("cold read, daemon CPU s", "cold_read_cpu_s", "{:.2f}"),
        ("cold read, GETs per GB read", "gets_per_gb_read", "{:.0f}"),
        ("PUTs per GB ingested", "puts_per_gb", "{:.0f}"),
        ("requests per GB ingested", "requests_per_gb", "{:.0f}"),
        ("GB uploaded per GB ingested", "uploaded_gb_per_gb", "{:.2f}"),
        ("load average", "load", "{:.1f}")]


def render_s3(v: dict) -> str:
    """The S3 contenders' table (markdown)."""
    if "skipped" in v:
        return f"\nS3 backend: skipped ({v['skipped']})"
    names = [n for n in ("dcmfs", "dcmfs-s3") if v["contenders"].get(n)]
    lines = ["", f"S3 backend (Ceph RGW on loopback) against the local backend, CT series "
             f"({v['files']} files), medians of {v['reps']} (min-max), order rotating:", "",
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, f in ROWS:
        cells = []
        for n in names:
            m = v["contenders"][n].get(key)
            cells.append("-" if m is None else
                         f"{f.format(m['median'])} ({f.format(m['min'])}-{f.format(m['max'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "s3_ingest_vs_local" in v:
        lines.append(f"\nS3 / local, medians of the per-repetition ratios: ingest "
                     f"{v['s3_ingest_vs_local']:.2f} (target >= 0.90), cold read "
                     f"{v['s3_cold_read_vs_local']:.2f}; cold read target >= 100 MB/s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("-o", dest="options", action="append", default=[],
                    help="mount options of every contender")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-bench-s3-", dir="/var/tmp"))
    try:
        (work / "src").mkdir()
        files = make_series(work / "src", args.files)
        out = s3_contenders(work, files, args.reps, args.options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render_s3(out))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if "skipped" in out else 0


if __name__ == "__main__":
    sys.exit(main())
