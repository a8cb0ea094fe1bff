"""dcmfs benchmark: one run, contenders interleaved, medians of repetitions.

Workloads
  ct      a CT series of N files (~513 KB each) made from pydicom-data's
          693_UNCR.dcm with distinct UIDs, written file by file (open, write,
          close) into each contender, then read back cold (remount and
          drop_caches between ingest and read) and compared byte for byte.
  big     one 1 GiB file written in 1 MiB writes, then read back cold; its
          content is the CT series repeated, so it compresses like real data.
  subset  the native subset of pydicom-data: every file whose transfer syntax
          is neither compressed nor deflated, whose Modality is CT, MR, CR or
          US and which has PixelData (22 files, 40.5 MB in pydicom-data 1.0.0),
          written --subset-copies times (byte-identical copies under other
          names; no contender deduplicates) into fresh stores, settled, read
          back cold and compared byte for byte.  --quick takes the smallest
          file of each modality, once.

Contenders
  plain         a directory on the same disk (no encryption, no compression)
  dcmfs         a real dcmfs mount with the default policy: close seals
                uncompressed, the background re-encoder lays DICOM files with
                native pixel data out in extents (header zstd, each frame in
                JPEG-LS or zstd, whichever is smaller) and compresses anything
                else with zstd level 1; "at rest" is when the writer is done
                *and* the backlog is re-encoded and checkpointed; the stored
                size and the cold read are measured at rest
  dcmfs-paused  the same, with the re-encoder paused (user.dcmfs.control) while
                the files are written and resumed after: ingest without any
                background work, then the whole backlog at once
  dcmfs-dicom0  -o dicom=0: the re-encoder compresses with zstd only (the
                policy before the DICOM-aware codec)
                (--codecs adds any of these to the ct workload, and: inline =
                -o reencode=0, zstd at close, no re-encoder; lzma; zstd:N)
  published     the method of the study dcmfs grew from, faithfully: per file
                base64 -> LZMA (xz preset 6) -> AES-256, in this one process;
                on the subset it runs on one copy (the copies are identical),
                and plain LZMA (preset 6, no base64) is measured once besides
  gocryptfs     when installed (Debian's gocryptfs), with -scryptn 10 (ct, big)

The subset runs plain, dcmfs, dcmfs-paused, dcmfs-dicom0 and published, in a
rotating order.  Stored sizes are the store's files (objects and index); the
per-modality ratios of dcmfs come from its user.dcmfs.stats (object bytes).
"Goals" compares the figures with the targets of issue 3; nothing fails on them.

Usage: ./scripts/bench [--files 400] [--reps 3] [--big-mib 1024] [--subset-copies 5]
                       [--codecs inline dicom0 paused] [--json out.json]
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
import warnings

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


MODALITIES = ("CT", "MR", "CR", "US")


def native_subset(quick: bool = False) -> list[tuple[pathlib.Path, str]]:
    """(path, modality) of pydicom-data's files with native pixel data: transfer
    syntax neither compressed nor deflated, Modality CT/MR/CR/US, PixelData.
    ``quick``: only the smallest file of each modality."""
    import data_store
    data = pathlib.Path(data_store.__file__).parent / "data"
    out = []
    for p in sorted(data.rglob("*")):
        if not p.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, defer_size=1024)
        except Exception:  # noqa: BLE001 — not DICOM, or damaged on purpose
            continue
        ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
        if not ts or ts.is_compressed or ts.is_deflated:
            continue
        if ds.get("Modality") in MODALITIES and "PixelData" in ds:
            out.append((p, ds.Modality))
    if quick:
        smallest = {}
        for p, mod in sorted(out, key=lambda pm: (pm[0].stat().st_size, pm[0].name)):
            smallest.setdefault(mod, (p, mod))
        out = sorted(smallest.values())
    return out


def copy_subset(subset, dst: pathlib.Path, copies: int) -> tuple[list[pathlib.Path], dict]:
    """The subset ``copies`` times under distinct names; returns the files and
    name -> modality."""
    files, modality = [], {}
    for k in range(copies):
        for p, mod in subset:
            q = dst / f"{k}_{p.name}"
            shutil.copyfile(p, q)
            files.append(q)
            modality[q.name] = mod
    return files, modality


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


def read_files(files, dst: pathlib.Path) -> tuple[float, int, list[str]]:
    """Read every file back in 1 MiB reads: (seconds spent in open and read,
    bytes read, names whose content differs from the source).  The comparison
    happens outside the timed part."""
    n, spent, wrong = 0, 0.0, []
    for p in files:
        parts = []
        t = time.perf_counter()
        with open(dst / p.name, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                parts.append(b)
        spent += time.perf_counter() - t
        data = b"".join(parts)
        n += len(data)
        if data != p.read_bytes():
            wrong.append(p.name)
    return spent, n, wrong


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
    def before_write(self):
        """Called right before the timed writes (nothing by default)."""

    def after_write(self):
        """Called when the timed writes are done, before settle (nothing by default)."""

    def settle(self):
        """Wait until the contender's background work is done (nothing by default)."""

    def status(self) -> dict | None:
        """The daemon's live figures, when it has any."""
        return None

    def modality_stats(self) -> dict | None:
        """modality -> (logical bytes, stored bytes), when the contender knows."""
        return None


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
    """spec: zstd (the default policy: DICOM-aware background re-encoder),
    paused (the same, re-encoder paused while the files are written), dicom0
    (-o dicom=0: the re-encoder compresses with zstd only), inline (zstd
    compressed at close, no re-encoder), lzma, zstd:N (level N)."""

    #: seconds the backlog may stand still before settle gives up
    STALL_S = 300

    def __init__(self, base, spec="zstd"):
        self.name = "dcmfs" if spec == "zstd" else f"dcmfs-{spec}"
        codec, _, level = spec.partition(":")
        self.options = ["-o", f"zstd_level={level}"] if level else []
        self.paused = codec == "paused"
        if codec == "inline":
            self.options = ["-o", "reencode=0"]
        elif codec == "dicom0":
            self.options = ["-o", "dicom=0"]
        if codec in ("inline", "dicom0", "paused"):
            codec = "zstd"
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

    def control(self, command: bytes):
        from dcmfs.format import CONTROL_XATTR
        os.setxattr(self.mp, CONTROL_XATTR, command)

    def before_write(self):
        if self.paused:
            self.control(b"pause")

    def after_write(self):
        if self.paused:
            self.control(b"resume")

    def status(self):
        from dcmfs.format import STATUS_XATTR
        return json.loads(os.getxattr(self.mp, STATUS_XATTR))

    def modality_stats(self):
        from dcmfs.format import STATS_XATTR
        out: dict[str, list[int]] = {}
        for g in json.loads(os.getxattr(self.mp, STATS_XATTR))["groups"]:
            if g["modality"] in MODALITIES:
                acc = out.setdefault(g["modality"], [0, 0])
                acc[0] += g["logical_bytes"]
                acc[1] += g["stored_bytes"]
        return out

    def settle(self):
        """Wait until the background re-encoder has re-encoded everything."""
        last, since = None, time.monotonic()
        while True:
            st = self.status()
            if not st["backlog_files"]:
                break
            progress = (st["backlog_files"], st["backlog_bytes"], st["reencoded_files"])
            if progress != last:
                last, since = progress, time.monotonic()
            elif time.monotonic() - since > self.STALL_S:
                raise RuntimeError(f"{self.name}: the backlog stands still: {st}")
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
    lat, stored, logical, sizes = [], 0, 0, {}
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        packed = lzma.compress(base64.b64encode(data), preset=6)
        nonce = os.urandom(12)
        sealed = nonce + aes.encrypt(nonce, packed, None)
        lat.append(time.perf_counter() - t)
        stored += len(sealed)
        logical += len(data)
        sizes[p.name] = (len(data), len(sealed))
    return {"lat": lat, "stored": stored, "logical": logical, "sizes": sizes}


def lzma_only(files) -> dict:
    """Plain LZMA (xz preset 6) per file, no base64, no encryption."""
    spent, stored, logical = 0.0, 0, 0
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        stored += len(lzma.compress(data, preset=6))
        spent += time.perf_counter() - t
        logical += len(data)
    return {"ratio": stored / logical, "mb_s": logical / 1e6 / spent}


# --- the run ----------------------------------------------------------------------------------
def measure(c, files, logical: int, add, big_mib: int = 0, block: bytes = b"") -> None:
    """One contender through one workload, from a fresh store to its teardown:
    ingest (timed), settle (at rest), stored size, remount + drop_caches, cold
    read (timed, then compared byte for byte); then the big file if asked."""
    c.setup()
    try:
        with Sampler(c.pid()) as s:
            c.before_write()
            t = time.perf_counter()
            lat = write_files(files, c.mnt())
            if c.name == "plain":
                os.sync()
            ingest = time.perf_counter() - t
            status = c.status()  # what the writer left for the re-encoder
            c.after_write()
            c.settle()
            at_rest = time.perf_counter() - t
        if status is not None:
            add("backlog_after_write", status["backlog_files"])
        add("ingest_s", ingest)
        add("at_rest_s", at_rest)
        add("file_ms_median", statistics.median(lat) * 1000)
        add("file_ms_p99", sorted(lat)[int(0.99 * len(lat))] * 1000)
        add("ratio", c.stored() / logical)
        add("ingest_cpu_s", s.cpu_seconds)
        add("ingest_peak_rss_mib", s.peak / 2**20)
        status = c.status()
        if status is not None:
            for key in ("reencoded_files", "frames_coded", "reencode_errors"):
                add(key, status.get(key, 0))
        for mod, (plain_bytes, stored_bytes) in (c.modality_stats() or {}).items():
            add(f"ratio_{mod}", stored_bytes / plain_bytes)
        c.remount()
        read_s, n, wrong = read_files(files, c.mnt())
        if n != logical or wrong:
            raise RuntimeError(f"{c.name}: read back {n} of {logical} bytes; differing: "
                               f"{wrong[:5]}")
        add("read_s", read_s)
        if big_mib:
            with Sampler(c.pid()) as s:
                c.before_write()
                t = time.perf_counter()
                write_big(c.mnt(), block, big_mib)
                add("big_write_s", time.perf_counter() - t)
                c.after_write()
                c.settle()
                add("big_at_rest_s", time.perf_counter() - t)
            add("big_write_peak_rss_mib", s.peak / 2**20)
            c.remount()
            with Sampler(c.pid()) as s:
                t = time.perf_counter()
                with open(c.mnt() / "big.bin", "rb") as f:
                    while f.read(1 << 20):
                        pass
                add("big_read_s", time.perf_counter() - t)
            add("big_read_peak_rss_mib", s.peak / 2**20)
    finally:
        c.teardown()


def adder(results: dict, name: str):
    def add(key, value):
        results[name].setdefault(key, []).append(value)
    return add


def add_published(add, files, modality=None) -> None:
    pub = published_method(files)
    add("ingest_s", sum(pub["lat"]))
    add("file_ms_median", statistics.median(pub["lat"]) * 1000)
    add("file_ms_p99", sorted(pub["lat"])[int(0.99 * len(pub["lat"]))] * 1000)
    add("ratio", pub["stored"] / pub["logical"])
    if modality:
        for mod in sorted(set(modality.values())):
            sizes = [v for k, v in pub["sizes"].items() if modality[k] == mod]
            add(f"ratio_{mod}", sum(s for _, s in sizes) / sum(n for n, _ in sizes))


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

        # the native subset: fresh stores of their own, in a rotating order
        subset, sub, sresults = [], [], {}
        if args.subset_copies:
            subset = native_subset(quick=args.quick)
            if not subset:
                raise SystemExit("no native CT/MR/CR/US file found in pydicom-data")
            (base / "subset-src").mkdir()
            (base / "subset").mkdir()
            sub_files, modality = copy_subset(subset, base / "subset-src", args.subset_copies)
            one_copy = sub_files[:len(subset)]
            sub_logical = sum(p.stat().st_size for p in sub_files)
            sub = [Plain(base / "subset"), Dcmfs(base / "subset"),
                   Dcmfs(base / "subset", "paused"), Dcmfs(base / "subset", "dicom0")]
            if args.only:
                sub = [c for c in sub if c.name in args.only]
            sresults = {c.name: {} for c in sub}
            if run_published:
                sresults["published"] = {}
        lzma_alone = None

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            if run_published:
                add_published(adder(results, "published"), files)
            for c in contenders:
                measure(c, files, logical, adder(results, c.name), args.big_mib, block)
            if sresults:
                if run_published:
                    add_published(adder(sresults, "published"), one_copy, modality)
                    if lzma_alone is None:
                        lzma_alone = lzma_only(one_copy)
                k = rep % len(sub) if sub else 0
                for c in sub[k:] + sub[:k]:
                    measure(c, sub_files, sub_logical, adder(sresults, c.name))
        out = summarize(results, logical, args)
        if sresults:
            out["subset"] = summarize_subset(sresults, subset, sub_logical, args, lzma_alone)
        out["goals"] = goals(out)
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _rows(results: dict, mb: float, files: int, big_mib: int = 0, own: dict | None = None) -> dict:
    """Medians (and min, max) of every metric, and the rates derived from them;
    ``own``: name -> (MB, files) for contenders that ran on other amounts."""
    rows = {}
    for name, metrics in results.items():
        row = {}
        for key, values in metrics.items():
            row[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
        med = {k: v["median"] for k, v in row.items()}
        m, n = (own or {}).get(name, (mb, files))
        if "ingest_s" in med:
            row["ingest_mb_s"] = m / med["ingest_s"]
            row["ingest_files_s"] = n / med["ingest_s"]
        if "at_rest_s" in med:
            row["at_rest_mb_s"] = m / med["at_rest_s"]
        if "read_s" in med:
            row["read_mb_s"] = m / med["read_s"]
        if "big_write_s" in med:
            row["big_write_mb_s"] = big_mib * 1.048576 / med["big_write_s"]
            row["big_read_mb_s"] = big_mib * 1.048576 / med["big_read_s"]
        rows[name] = row
    return rows


def summarize(results, logical, args) -> dict:
    mb = logical / 1e6
    out = {"files": args.files, "series_mb": round(mb, 1), "reps": args.reps,
           "big_mib": args.big_mib, "contenders": _rows(results, mb, args.files, args.big_mib)}
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
    variants = variant_comparisons(c)
    if variants:
        out["dcmfs_vs_variants"] = variants
    return out


def variant_comparisons(c: dict) -> dict:
    """The default policy (re-encoder running during ingest) against the
    variants that ran: paused, dicom=0, inline."""
    cmp = {}
    if "dcmfs" not in c:
        return cmp
    d = c["dcmfs"]
    for other, tag in (("dcmfs-paused", "paused"), ("dcmfs-dicom0", "dicom0"),
                       ("dcmfs-inline", "inline")):
        if other in c:
            cmp[f"ingest_running_vs_{tag}"] = d["ingest_mb_s"] / c[other]["ingest_mb_s"]
            cmp[f"at_rest_running_vs_{tag}"] = d["at_rest_mb_s"] / c[other]["at_rest_mb_s"]
            if tag != "paused":
                cmp[f"stored_size_vs_{tag}"] = d["ratio"]["median"] / c[other]["ratio"]["median"]
    return cmp


def summarize_subset(results, subset, logical, args, lzma_alone) -> dict:
    mb = logical / 1e6
    one_mb = sum(p.stat().st_size for p, _ in subset) / 1e6
    out = {"files": len(subset), "copies": args.subset_copies, "mb": round(mb, 1),
           "modalities": {m: sum(1 for _, mod in subset if mod == m)
                          for m in MODALITIES if any(mod == m for _, mod in subset)},
           "names": [p.name for p, _ in subset], "reps": args.reps,
           "contenders": _rows(results, mb, len(subset) * args.subset_copies,
                               own={"published": (one_mb, len(subset))})}
    if lzma_alone is not None:
        out["lzma_only"] = lzma_alone
    c = out["contenders"]
    cmp = variant_comparisons(c)
    if "dcmfs" in c and "published" in c:
        cmp["stored_size_vs_published"] = (c["dcmfs"]["ratio"]["median"]
                                           / c["published"]["ratio"]["median"])
        cmp["speed_vs_published"] = (c["dcmfs"]["at_rest_mb_s"]
                                     / c["published"]["ingest_mb_s"])
    out["comparisons"] = cmp
    return out


def goals(out: dict) -> list[dict]:
    """The figures against the targets of issue 3 (reported, never enforced)."""
    res = []

    def goal(what, value, target, met):
        res.append({"goal": what, "value": value, "target": target, "met": bool(met)})

    s = out.get("subset", {})
    c = s.get("contenders", {})
    if "dcmfs" in c:
        r = c["dcmfs"]["ratio"]["median"]
        goal("subset stored/original, DICOM-aware, re-encoded", r, "<= 0.29", r <= 0.29)
        if "published" in c:
            lz = c["published"]["ratio"]["median"]
            goal("subset stored/original, DICOM-aware vs published LZMA", r / lz, "< 1", r < lz)
        v = c["dcmfs"]["read_mb_s"]
        goal("subset cold read MB/s of re-encoded files", v, ">= 100", v >= 100)
    cmp = s.get("comparisons", {})
    if "ingest_running_vs_dicom0" in cmp:
        v = cmp["ingest_running_vs_dicom0"]
        goal("subset ingest, re-encoder running vs -o dicom=0", v, ">= 0.90", v >= 0.9)
    if "ingest_running_vs_paused" in cmp:
        v = cmp["ingest_running_vs_paused"]
        goal("subset ingest, re-encoder running vs paused", v, ">= 0.90", v >= 0.9)
    ct = out["contenders"].get("dcmfs")
    if ct:
        v = ct["read_mb_s"]
        goal("CT series cold read MB/s of re-encoded files", v, ">= 100", v >= 100)
    for tag, label in (("dicom0", "-o dicom=0"), ("paused", "paused")):
        v = out.get("dcmfs_vs_variants", {}).get(f"ingest_running_vs_{tag}")
        if v is not None:
            goal(f"CT series ingest, re-encoder running vs {label}", v, ">= 0.90", v >= 0.9)
    return res


def _cell(r: dict, key: str, fmt: str = "{:.0f}") -> str:
    v = r.get(key)
    if isinstance(v, dict):
        v = v["median"]
    return "-" if v is None else fmt.format(v)


def render(out: dict) -> str:
    lines = [f"CT series: {out['files']} files, {out['series_mb']} MB; 1 file of "
             f"{out['big_mib']} MiB; medians of {out['reps']} repetitions", "",
             "| contender | ingest MB/s | files/s | ms/file (median, p99) | at rest MB/s "
             "| stored/original | cold read MB/s | daemon CPU s | peak RSS MiB | 1 GiB write MB/s "
             "| 1 GiB read MB/s | 1 GiB peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in out["contenders"].items():
        def g(key, fmt="{:.0f}"):
            return _cell(r, key, fmt)
        lines.append(f"| {name} | {g('ingest_mb_s')} | {g('ingest_files_s')} | "
                     f"{g('file_ms_median', '{:.2f}')}, {g('file_ms_p99', '{:.2f}')} | "
                     f"{g('at_rest_mb_s')} | {g('ratio', '{:.3f}')} | {g('read_mb_s')} | {g('ingest_cpu_s', '{:.1f}')} | "
                     f"{g('ingest_peak_rss_mib')} | {g('big_write_mb_s')} | {g('big_read_mb_s')} | "
                     f"{g('big_write_peak_rss_mib')} |")
    for key in ("dcmfs_vs_published", "dcmfs_vs_gocryptfs", "dcmfs_vs_variants"):
        if key in out:
            lines.append("")
            lines.append(key + ": " + ", ".join(f"{k} {v:.3f}" if "size" in k
                                                 else f"{k} {v:.2f}×"
                                                 for k, v in out[key].items()))
    s = out.get("subset")
    if s:
        mods = list(s["modalities"])
        lines += ["", f"Native subset of pydicom-data: {s['files']} files "
                  f"({', '.join(f'{m} {n}' for m, n in s['modalities'].items())}) × "
                  f"{s['copies']} copies, {s['mb']} MB; medians of {s['reps']} repetitions", "",
                  "| contender | ingest MB/s | at rest MB/s | stored/original | "
                  + " | ".join(mods) + " | cold read MB/s | daemon CPU s | JPEG-LS extents |",
                  "|---|---|---|---|" + "---|" * len(mods) + "---|---|---|"]
        for name, r in s["contenders"].items():
            lines.append(f"| {name} | {_cell(r, 'ingest_mb_s')} | {_cell(r, 'at_rest_mb_s')} | "
                         f"{_cell(r, 'ratio', '{:.3f}')} | "
                         + " | ".join(_cell(r, f"ratio_{m}", "{:.3f}") for m in mods)
                         + f" | {_cell(r, 'read_mb_s')} | {_cell(r, 'ingest_cpu_s', '{:.1f}')} | "
                         f"{_cell(r, 'frames_coded')} |")
        if "lzma_only" in s:
            lines += ["", "LZMA alone (xz preset 6, no base64, no AES; once): stored/original "
                      f"{s['lzma_only']['ratio']:.3f} at {s['lzma_only']['mb_s']:.1f} MB/s"]
        if s["comparisons"]:
            lines += ["", "subset: " + ", ".join(f"{k} {v:.3f}" if "size" in k else f"{k} {v:.2f}×"
                                                  for k, v in s["comparisons"].items())]
    if out.get("goals"):
        lines += ["", "| goal (issue 3) | measured | target | met |", "|---|---|---|---|"]
        for g in out["goals"]:
            lines.append(f"| {g['goal']} | {g['value']:.3g} | {g['target']} | "
                         f"{'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--subset-copies", type=int, default=5,
                   help="times the native pydicom-data subset is written (0: skip it)")
    p.add_argument("--codecs", nargs="*", default=[],
                   help="extra dcmfs variants for the CT series, e.g. inline dicom0 paused "
                        "lzma zstd:3")
    p.add_argument("--only", nargs="*", help="run only these contenders (plain, dcmfs, "
                   "dcmfs-paused, dcmfs-dicom0, dcmfs-zstd:1, gocryptfs, published, …)")
    p.add_argument("--workdir", default=None, help="where stores and mounts go (default /tmp)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for CI: 20 files, 1 repetition, 16 MiB, plain + dcmfs + "
                        "published; the subset's smallest file of each modality, once, with "
                        "dcmfs-paused and dcmfs-dicom0 besides (figures are not meaningful, "
                        "the code path is)")
    args = p.parse_args()
    if args.quick:
        args.files, args.reps, args.big_mib, args.subset_copies = 20, 1, 16, 1
        args.only = args.only or ["plain", "dcmfs", "dcmfs-paused", "dcmfs-dicom0", "published"]
    out = run(args)
    print(render(out))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
