"""The workloads: each takes one contender from a fresh store to its teardown
and adds its raw measurements (seconds, bytes, ratios) to the results."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import time

from bench_contenders import Sampler, published_method
from bench_data import read_files, write_big, write_files

def read_back_cold(c, files, logical: int) -> float:
    """Remount (cold caches), read every file back and compare; seconds."""
    c.remount()
    read_s, n, wrong = read_files(files, c.mnt())
    if n != logical or wrong:
        raise RuntimeError(f"{c.name}: read back {n} of {logical} bytes; differing: "
                           f"{wrong[:5]}")
    return read_s


def _series(c, files, logical: int, add) -> None:
    """The series part of ``measure``: ingest, settle, stored size, cold read."""
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
    add("read_s", read_back_cold(c, files, logical))


def measure(c, files, logical: int, add, big_mib: int = 0, block: bytes = b"") -> None:
    """One contender through one workload, from a fresh store to its teardown:
    ingest (timed), settle (at rest), stored size, remount + drop_caches, cold
    read (timed, then compared byte for byte); then the big file if asked."""
    c.setup()
    try:
        if files:
            _series(c, files, logical, add)
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


def add_published(add, files, modality=None) -> dict:
    """The published pipeline over ``files``: its figures added; returns its
    raw measurements."""
    pub = published_method(files)
    add("ingest_s", sum(pub["lat"]))
    add("file_ms_median", statistics.median(pub["lat"]) * 1000)
    add("file_ms_p99", sorted(pub["lat"])[int(0.99 * len(pub["lat"]))] * 1000)
    add("ratio", pub["stored"] / pub["logical"])
    add("ingest_cpu_s", sum(pub["cpu"]))
    add("ingest_peak_rss_mib", max(pub["rss"]) / 2**20)
    if modality:
        for mod in sorted(set(modality.values())):
            sizes = [v for k, v in pub["sizes"].items() if modality[k] == mod]
            add(f"ratio_{mod}", sum(s for _, s in sizes) / sum(n for n, _ in sizes))
    return pub



def p99(values) -> float:
    return sorted(values)[int(0.99 * len(values))]


def measure_corpus(c, files, modality: dict, add) -> list[tuple]:
    """The corpus file by file: write one file (timed: open, write, close), let
    the contender bring it to rest (timed: for dcmfs until it is re-encoded and
    checkpointed), with the daemon's CPU seconds and RSS over both; then the
    stored size, the ratio by modality, remount + drop_caches and the cold
    read.  Returns per file (bytes, write s, at-rest s, CPU s, RSS bytes)."""
    c.setup()
    points = []
    try:
        pid = c.pid()
        for p in files:
            data = p.read_bytes()
            with Sampler(pid) as s:
                t = time.perf_counter()
                with open(c.mnt() / p.name, "wb") as f:
                    f.write(data)
                written = time.perf_counter() - t
                c.settle(poll=0.002)
                rest = time.perf_counter() - t
            points.append((len(data), written, rest, s.cpu_seconds, s.peak))
        logical = sum(pt[0] for pt in points)
        add("ingest_s", sum(pt[1] for pt in points))
        add("at_rest_s", sum(pt[2] for pt in points))
        add("file_ms_median", statistics.median(pt[1] for pt in points) * 1000)
        add("file_ms_p99", p99([pt[1] for pt in points]) * 1000)
        add("ingest_cpu_s", sum(pt[3] for pt in points))
        add("ingest_peak_rss_mib", max(pt[4] for pt in points) / 2**20)
        add("ratio", c.stored() / logical)
        for mod, (plain_bytes, stored_bytes) in (c.modality_stats(every=True) or {}).items():
            add(f"ratio_{mod}", stored_bytes / plain_bytes)
        if c.name == "plain":
            for mod in set(modality.values()):
                add(f"ratio_{mod}", 1.0)
        add("read_s", read_back_cold(c, files, logical))
    finally:
        c.teardown()
    return points


def published_corpus(files, modality: dict, add) -> list[tuple]:
    """The published pipeline over the corpus: the same figures as
    ``measure_corpus`` (at rest = written: it has no background work)."""
    pub = add_published(add, files, modality)
    add("at_rest_s", sum(pub["lat"]))
    return [(n, t, t, cpu, rss) for (n, _), t, cpu, rss
            in zip(pub["sizes"].values(), pub["lat"], pub["cpu"], pub["rss"])]


def small_files(c, n: int, add, size: int = 1024) -> None:
    """``n`` files of ``size`` bytes: create (open, write, close) each, stat
    each, unlink each; each phase timed."""
    c.setup()
    try:
        d = c.mnt() / "small"
        d.mkdir()
        payload = bytes(range(256)) * (size // 256)
        names = [d / f"f{i:05d}" for i in range(n)]
        with Sampler(c.pid()) as s:
            t = time.perf_counter()
            for p in names:
                with open(p, "wb") as f:
                    f.write(payload)
            add("create_s", time.perf_counter() - t)
            t = time.perf_counter()
            for p in names:
                os.stat(p)
            add("stat_s", time.perf_counter() - t)
            t = time.perf_counter()
            for p in names:
                os.unlink(p)
            add("unlink_s", time.perf_counter() - t)
        add("cpu_s", s.cpu_seconds)
        add("peak_rss_mib", s.peak / 2**20)
    finally:
        c.teardown()


def parallel_writers(c, files, logical: int, writers: list[int], add) -> None:
    """The CT series written by N writers at once (N threads, each writing
    every N-th file: open, write, close), for each N of ``writers``, into a
    fresh directory of one store; seconds from the first open to the last
    close.  Several PACS associations or copy jobs writing at once."""
    import threading
    c.setup()
    try:
        for n in writers:
            d = c.mnt() / f"w{n}"
            d.mkdir()
            parts = [files[i::n] for i in range(n)]
            errors: list[BaseException] = []

            def write(part) -> None:
                try:
                    write_files(part, d)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=write, args=(part,)) for part in parts]
            c.before_write()  # dcmfs-paused: the re-encoder held while they write
            with Sampler(c.pid()) as s:
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                if c.name == "plain":
                    os.sync()
                spent = time.perf_counter() - t
            if errors:
                raise RuntimeError(f"{c.name}: a writer failed: {errors[0]!r}")
            wrote = sum(p.stat().st_size for p in d.iterdir())
            if wrote != logical:
                raise RuntimeError(f"{c.name}: {n} writers left {wrote} of {logical} bytes")
            add(f"w{n}_s", spent)
            add(f"w{n}_cpu_s", s.cpu_seconds)
            c.after_write()
            c.settle()  # the next N starts from rest (dcmfs: re-encoded)
    finally:
        c.teardown()


def random_reads(c, mib: int, reads: int, block: bytes, add) -> str:
    """Random 4 KiB reads in a file of ``mib`` MiB (CT content, so it
    compresses like real data), cold: written, brought to rest, remount +
    drop_caches, then ``reads`` reads at random 4 KiB-aligned offsets (the
    same for every contender) with fio when installed, else a Python loop of
    os.pread.  Returns the tool used."""
    c.setup()
    try:
        write_big(c.mnt(), block, mib)
        c.settle()
        c.remount()
        path = c.mnt() / "big.bin"
        with Sampler(c.pid()) as s:
            if shutil.which("fio"):
                tool = "fio"
                iops, p50, p99_ms = _fio(path, mib, reads)
            else:
                tool = "python"
                iops, p50, p99_ms = _pread_loop(path, mib, reads)
        add("iops", iops)
        add("read_mb_s", iops * 4096 / 1e6)
        add("lat_ms_median", p50)
        add("lat_ms_p99", p99_ms)
        add("cpu_s", s.cpu_seconds)
        add("peak_rss_mib", s.peak / 2**20)
    finally:
        c.teardown()
    return tool


def _fio(path, mib: int, reads: int) -> tuple[float, float, float]:
    r = subprocess.run(["fio", "--name=randread", f"--filename={path}", "--rw=randread",
                        "--bs=4k", f"--size={mib}M", f"--io_size={reads * 4}k",
                        "--ioengine=psync", "--invalidate=1", "--randrepeat=1",
                        "--output-format=json"], check=True, capture_output=True, text=True)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return job["iops"], pct["50.000000"] / 1e6, pct["99.000000"] / 1e6


def _pread_loop(path, mib: int, reads: int) -> tuple[float, float, float]:
    rng = random.Random(42)
    offsets = [rng.randrange(mib * 256) * 4096 for _ in range(reads)]
    lat = []
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            t = time.perf_counter()
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"short read at {off}")
            lat.append(time.perf_counter() - t)
        spent = time.perf_counter() - t0
    finally:
        os.close(fd)
    return reads / spent, statistics.median(lat) * 1000, p99(lat) * 1000
