"""dcmfs benchmark: one run, contenders interleaved, medians of repetitions.

Workloads
  ct     a CT series of N files (~513 KB each) made from pydicom-data's
         693_UNCR.dcm with distinct UIDs, written file by file (open, write,
         close) into each contender, then read back cold (remount and
         drop_caches between ingest and read).
  big    one 1 GiB file written in 1 MiB writes, then read back cold; its
         content is the CT series repeated, so it compresses like real data.

Contenders
  plain      a directory on the same disk (no encryption, no compression)
  dcmfs      a real dcmfs mount with the default policy: close seals uncompressed,
             the background re-encoder compresses with zstd level 1; "at rest"
             is when the writer is done *and* the backlog is compressed, and the
             stored size and cold read are measured at rest
             (--codecs adds: inline = zstd at close, no re-encoder; lzma; zstd:N)
  published  the method of the study dcmfs grew from, faithfully: per file
             base64 -> LZMA (xz preset 6) -> AES-256, in this one process
  gocryptfs  when installed (Debian's gocryptfs), with -scryptn 10

Usage: ./scripts/bench [--files 400] [--reps 3] [--big-mib 1024] [--json out.json]
       ./scripts/bench --quick      (under a minute; tests/test_bench.py runs it in CI)
"""

from __future__ import annotations

import argparse
import base64
import json
import lzma
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pydicom
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = pathlib.Path(__file__).resolve().parent.parent


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: reads are warm, which only flatters the contenders equally


def make_series(dst: pathlib.Path, n: int) -> list[pathlib.Path]:
    import data_store
    src = pathlib.Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    ds = pydicom.dcmread(src)
    series = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        p = dst / f"CT{i:05d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


class Sampler:
    """Peak RSS and CPU seconds of one process while a workload runs."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def cpu(self) -> float:
        if self.proc is None:
            return 0.0
        t = self.proc.cpu_times()
        return t.user + t.system

    def __enter__(self):
        self.cpu0 = self.cpu()
        if self.proc:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.cpu_seconds = self.cpu() - self.cpu0


def write_files(files, dst: pathlib.Path) -> list[float]:
    lat = []
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        with open(dst / p.name, "wb") as f:
            f.write(data)
        lat.append(time.perf_counter() - t)
    return lat


def read_files(files, dst: pathlib.Path) -> int:
    n = 0
    for p in files:
        with open(dst / p.name, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                n += len(b)
    return n


def write_big(dst: pathlib.Path, block: bytes, mib: int) -> None:
    with open(dst / "big.bin", "wb") as f:
        for i in range(mib):
            off = (i * 1048576) % (len(block) - 1048576)
            f.write(block[off:off + 1048576])


def du(path: pathlib.Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


# --- contenders -------------------------------------------------------------------------
class Contender:
    def settle(self):
        """Wait until the contender's background work is done (nothing by default)."""


class Plain(Contender):
    name = "plain"

    def __init__(self, base):
        self.dir = base / "plain"

    def setup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()

    def mnt(self):
        return self.dir

    def remount(self):
        drop_caches()

    def pid(self):
        return None

    def stored(self):
        return du(self.dir)

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Dcmfs(Contender):
    """spec: zstd (the default policy), inline (zstd compressed at close, no
    re-encoder), lzma, zstd:N (level N)."""

    def __init__(self, base, spec="zstd"):
        self.name = "dcmfs" if spec == "zstd" else f"dcmfs-{spec}"
        codec, _, level = spec.partition(":")
        self.options = ["-o", f"zstd_level={level}"] if level else []
        if codec == "inline":
            codec = "zstd"
            self.options = ["-o", "reencode=0"]
        self.codec = codec
        self.base = base / self.name
        self.store, self.key, self.mp = self.base / "store", self.base / "key", self.base / "mnt"

    def cli(self, *args):
        subprocess.run([sys.executable, "-m", "dcmfs.cli", *map(str, args)], check=True,
                       stdout=subprocess.DEVNULL)

    def setup(self):
        shutil.rmtree(self.base, ignore_errors=True)
        self.mp.mkdir(parents=True)
        self.cli("init", self.store, "--key-file", self.key, "--codec", self.codec)
        self.cli("mount", self.store, self.mp, "--key-file", self.key, *self.options)

    def mnt(self):
        return self.mp

    def remount(self):
        self.cli("umount", self.mp)
        drop_caches()
        self.cli("mount", self.store, self.mp, "--key-file", self.key, *self.options)

    def pid(self):
        from dcmfs.store import read_lock_pid
        return read_lock_pid(str(self.store))

    def stored(self):
        return du(self.store / "objects") + du(self.store / "index")

    def settle(self):
        """Wait until the background re-encoder has compressed everything."""
        from dcmfs.format import STATUS_XATTR
        while json.loads(os.getxattr(self.mp, STATUS_XATTR))["backlog_files"]:
            time.sleep(0.02)
        # fsync of the root directory checkpoints the index, which lets the
        # superseded uncompressed objects go (else they stay until the next
        # timed checkpoint, up to 5 s later)
        fd = os.open(self.mp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def teardown(self):
        self.cli("umount", self.mp)
        shutil.rmtree(self.base, ignore_errors=True)


class Gocryptfs(Contender):
    name = "gocryptfs"

    def __init__(self, base):
        self.base = base / "gocryptfs"
        self.cipher, self.mp, self.pw = self.base / "c", self.base / "m", self.base / "pw"

    def setup(self):
        shutil.rmtree(self.base, ignore_errors=True)
        self.cipher.mkdir(parents=True)
        self.mp.mkdir()
        self.pw.write_text("benchmark passphrase\n")
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", str(self.pw),
                        str(self.cipher)], check=True)
        self._mount()

    def _mount(self):
        subprocess.run(["gocryptfs", "-q", "-passfile", str(self.pw), str(self.cipher),
                        str(self.mp)], check=True)

    def mnt(self):
        return self.mp

    def remount(self):
        subprocess.run(["fusermount3", "-u", str(self.mp)], check=True)
        drop_caches()
        self._mount()

    def pid(self):
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "gocryptfs" and str(self.mp) in (p.info["cmdline"] or []):
                return p.pid
        return None

    def stored(self):
        return du(self.cipher)

    def teardown(self):
        subprocess.run(["fusermount3", "-u", str(self.mp)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def published_method(files) -> dict:
    """base64 -> LZMA -> AES per file, in one process (the study's pipeline)."""
    key = AESGCM.generate_key(bit_length=256)
    aes = AESGCM(key)
    lat, stored, logical = [], 0, 0
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        packed = lzma.compress(base64.b64encode(data), preset=6)
        nonce = os.urandom(12)
        sealed = nonce + aes.encrypt(nonce, packed, None)
        lat.append(time.perf_counter() - t)
        stored += len(sealed)
        logical += len(data)
    return {"lat": lat, "stored": stored, "logical": logical}


# --- the run ----------------------------------------------------------------------------------
def run(args) -> dict:
    base = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-bench-", dir=args.workdir))
    try:
        src = base / "src"
        src.mkdir()
        files = make_series(src, args.files)
        logical = sum(p.stat().st_size for p in files)
        block = b"".join(p.read_bytes() for p in files[:64])
        contenders = [Plain(base), Dcmfs(base)]
        contenders += [Dcmfs(base, c) for c in args.codecs]
        if shutil.which("gocryptfs"):
            contenders.append(Gocryptfs(base))
        if args.only:
            contenders = [c for c in contenders if c.name in args.only]
        results: dict[str, dict[str, list]] = {c.name: {} for c in contenders}
        run_published = not args.only or "published" in args.only
        if run_published:
            results["published"] = {}

        def add(name, key, value):
            results[name].setdefault(key, []).append(value)

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            if run_published:
                pub = published_method(files)
                add("published", "ingest_s", sum(pub["lat"]))
                add("published", "file_ms_median", statistics.median(pub["lat"]) * 1000)
                add("published", "file_ms_p99",
                    sorted(pub["lat"])[int(0.99 * len(pub["lat"]))] * 1000)
                add("published", "ratio", pub["stored"] / pub["logical"])
            for c in contenders:
                c.setup()
                try:
                    with Sampler(c.pid()) as s:
                        t = time.perf_counter()
                        lat = write_files(files, c.mnt())
                        os.sync() if c.name == "plain" else None
                        ingest = time.perf_counter() - t
                        c.settle()
                        at_rest = time.perf_counter() - t
                    add(c.name, "ingest_s", ingest)
                    add(c.name, "at_rest_s", at_rest)
                    add(c.name, "file_ms_median", statistics.median(lat) * 1000)
                    add(c.name, "file_ms_p99", sorted(lat)[int(0.99 * len(lat))] * 1000)
                    add(c.name, "ratio", c.stored() / logical)
                    add(c.name, "ingest_cpu_s", s.cpu_seconds)
                    add(c.name, "ingest_peak_rss_mib", s.peak / 2**20)
                    c.remount()
                    with Sampler(c.pid()) as s:
                        t = time.perf_counter()
                        n = read_files(files, c.mnt())
                        add(c.name, "read_s", time.perf_counter() - t)
                    assert n == logical
                    if args.big_mib:
                        with Sampler(c.pid()) as s:
                            t = time.perf_counter()
                            write_big(c.mnt(), block, args.big_mib)
                            add(c.name, "big_write_s", time.perf_counter() - t)
                            c.settle()
                            add(c.name, "big_at_rest_s", time.perf_counter() - t)
                        add(c.name, "big_write_peak_rss_mib", s.peak / 2**20)
                        c.remount()
                        with Sampler(c.pid()) as s:
                            t = time.perf_counter()
                            with open(c.mnt() / "big.bin", "rb") as f:
                                while f.read(1 << 20):
                                    pass
                            add(c.name, "big_read_s", time.perf_counter() - t)
                        add(c.name, "big_read_peak_rss_mib", s.peak / 2**20)
                finally:
                    c.teardown()
        return summarize(results, logical, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def summarize(results, logical, args) -> dict:
    mb = logical / 1e6
    out = {"files": args.files, "series_mb": round(mb, 1), "reps": args.reps,
           "big_mib": args.big_mib, "contenders": {}}
    for name, metrics in results.items():
        row = {}
        for key, values in metrics.items():
            row[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
        med = {k: v["median"] for k, v in row.items()}
        if "ingest_s" in med:
            row["ingest_mb_s"] = mb / med["ingest_s"]
            row["ingest_files_s"] = args.files / med["ingest_s"]
        if "at_rest_s" in med:
            row["at_rest_mb_s"] = mb / med["at_rest_s"]
        if "read_s" in med:
            row["read_mb_s"] = mb / med["read_s"]
        if "big_write_s" in med:
            row["big_write_mb_s"] = args.big_mib * 1.048576 / med["big_write_s"]
            row["big_read_mb_s"] = args.big_mib * 1.048576 / med["big_read_s"]
        out["contenders"][name] = row
    c = out["contenders"]
    if "published" in c and "dcmfs" in c:
        out["dcmfs_vs_published"] = {
            "per_file_speedup": c["published"]["file_ms_median"]["median"]
            / c["dcmfs"]["file_ms_median"]["median"],
            "ingest_speedup": c["published"]["ingest_s"]["median"] / c["dcmfs"]["ingest_s"]["median"],
            "stored_size_ratio": c["dcmfs"]["ratio"]["median"] / c["published"]["ratio"]["median"],
        }
    if "gocryptfs" in c and "dcmfs" in c:
        out["dcmfs_vs_gocryptfs"] = {
            "ingest": c["dcmfs"]["ingest_mb_s"] / c["gocryptfs"]["ingest_mb_s"],
            "read": c["dcmfs"]["read_mb_s"] / c["gocryptfs"]["read_mb_s"],
        }
    return out


def render(out: dict) -> str:
    lines = [f"CT series: {out['files']} files, {out['series_mb']} MB; 1 file of "
             f"{out['big_mib']} MiB; medians of {out['reps']} repetitions", "",
             "| contender | ingest MB/s | files/s | ms/file (median, p99) | at rest MB/s "
             "| stored/original | cold read MB/s | daemon CPU s | peak RSS MiB | 1 GiB write MB/s "
             "| 1 GiB read MB/s | 1 GiB peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in out["contenders"].items():
        def g(key, fmt="{:.0f}"):
            v = r.get(key)
            if isinstance(v, dict):
                v = v["median"]
            return "-" if v is None else fmt.format(v)
        lines.append(f"| {name} | {g('ingest_mb_s')} | {g('ingest_files_s')} | "
                     f"{g('file_ms_median', '{:.2f}')}, {g('file_ms_p99', '{:.2f}')} | "
                     f"{g('at_rest_mb_s')} | {g('ratio', '{:.3f}')} | {g('read_mb_s')} | {g('ingest_cpu_s', '{:.1f}')} | "
                     f"{g('ingest_peak_rss_mib')} | {g('big_write_mb_s')} | {g('big_read_mb_s')} | "
                     f"{g('big_write_peak_rss_mib')} |")
    for key in ("dcmfs_vs_published", "dcmfs_vs_gocryptfs"):
        if key in out:
            lines.append("")
            lines.append(key + ": " + ", ".join(f"{k} {v:.2f}×" if "ratio" not in k
                                                 else f"{k} {v:.3f}"
                                                 for k, v in out[key].items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--codecs", nargs="*", default=[], help="extra dcmfs codecs, e.g. lzma zstd:1")
    p.add_argument("--only", nargs="*", help="run only these contenders (plain, dcmfs, "
                   "dcmfs-zstd:1, gocryptfs, published, …)")
    p.add_argument("--workdir", default=None, help="where stores and mounts go (default /tmp)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for CI: 20 files, 1 repetition, 16 MiB, plain + dcmfs + "
                        "published (figures are not meaningful, the code path is)")
    args = p.parse_args()
    if args.quick:
        args.files, args.reps, args.big_mib = 20, 1, 16
        args.only = args.only or ["plain", "dcmfs", "published"]
    out = run(args)
    print(render(out))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
