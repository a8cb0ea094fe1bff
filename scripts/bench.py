"""dcmfs benchmark: one run, contenders interleaved, medians of repetitions.

Workloads
  ct      a CT series of N files (~513 KB each) made from pydicom-data's
          693_UNCR.dcm with distinct UIDs, written file by file (open, write,
          close) into each contender, then read back cold (remount and
          drop_caches between ingest and read) and compared byte for byte.
  big     one 1 GiB file written in 1 MiB writes, then read back cold; its
          content is the CT series repeated, so it compresses like real data
          (--big-for: plain, dcmfs and gocryptfs by default).
  corpus  every file of pydicom-data (68 files, 58 MB, 8 modalities), file by
          file: write, then wait until the contender has it at rest (dcmfs:
          re-encoded and checkpointed), with the daemon's CPU seconds and RSS
          per file; then stored size, ratio by modality and a cold read.
  small   --small-files (5000) files of 1 KiB: create, stat, unlink, each
          phase timed (plain, dcmfs, gocryptfs; --small-reps repetitions).
  writers the CT series written by N writers at once (threads, each every
          N-th file), for each N of --writers (1 4 8), into one store (plain,
          dcmfs, dcmfs-paused with --codecs paused, gocryptfs); with each contender's ratio to gocryptfs per
          repetition (median, min-max).
  random  random 4 KiB reads (--rand-reads of them) in a --rand-mib (256) MiB
          file, cold, with fio when installed, else a Python os.pread loop.
  quality the cipher-quality figures of the image-encryption literature on
          what dcmfs stores (entropy, NPCR, UACI, adjacent-byte correlation)
          and the losslessness proof (hashes, MSE, PSNR, SSIM of decoded pixel
          arrays) of every corpus file read back through a mount; once.
  subset  the native subset issue 3 measured: every file of pydicom-data and
          of pydicom's own test files whose transfer syntax is neither
          compressed nor deflated, whose Modality is CT, MR, CR or US and which
          has PixelData, less pydicom-data's implicit-VR twins *_UNCI of its
          *_UNCR files (28 files, 24.5 MB with pydicom-data 1.0.0 and pydicom
          3.0; whole-file zstd -3 stores 0.446 and xz -6 0.356 of it, as the
          issue says), written --subset-copies times (byte-identical copies under other
          names; no contender deduplicates) into fresh stores, settled, read
          back cold and compared byte for byte.  --quick takes the smallest
          file of each modality, once.

Contenders
  plain         a directory on the same disk (no encryption, no compression)
  dcmfs         a real dcmfs mount with the default policy: close seals
                uncompressed, the background re-encoder lays DICOM files with
                native pixel data out in extents (header zstd, each frame in
                bands, each in the smallest of HTJ2K, JPEG XL and zstd) and compresses anything
                else with zstd level 1; "at rest" is when the writer is done
                *and* the backlog is re-encoded and checkpointed; the stored
                size and the cold read are measured at rest
  dcmfs-paused  the same, with the re-encoder paused (user.dcmfs.control) while
                the files are written and resumed after: ingest without any
                background work, then the whole backlog at once
  dcmfs-j2k     -o image_codecs=htj2k+jpegxl+jpeg2k: OpenJPEG's JPEG 2000 is
                offered each frame too (smallest at rest, slowest to read)
  dcmfs-htj2k   -o image_codecs=htj2k: HTJ2K only (the fastest of the dense codecs)
  dcmfs-cold    -o hot_days=0: DICOM coded densely at once (JPEG XL under the
                cost rule), what a study reads like once it has turned cold;
                dcmfs itself measures the hot (fresh: blosc2, HTJ2K where it saves much) coding
  dcmfs-inproc  -o sandbox=0: the DICOM analysis and image encoders in the daemon
                instead of in parser worker processes (what isolation costs)
  dcmfs-audit0  -o audit=0: no audit trail (what recording every open, create,
                write-close and unlink costs; also on the small-file workload
                when asked for with --codecs audit0)
  dcmfs-dicom0  -o dicom=0: the re-encoder compresses with zstd only (the
                policy before the DICOM-aware codec)
  dcmfs-lzma    a store inited with --codec lzma (xz preset 6 where the
                default policy uses zstd)
  dcmfs-rotating the default policy during a master-key rotation: the store
                holds 192 MiB at rest, each write starts with 'dcmfs key
                rotate' and 'rotate --finish' on the mounted store (the
                daemon re-encrypts the older epoch meanwhile)
                (--codecs picks the variants of the ct and corpus workloads,
                default cold dicom0 lzma; also paused, rotating, inline = -o
                reencode=0, zstd at close, no re-encoder; zstd:N)
  dcmfs-wonly   a write-only mount (-o recipient=FILE, the store's public key
                only) on the CT series: ingest and its CPU are the write-only
                daemon's; at rest adds its unmount, the import by a keyed mount
                and that mount's re-encoding; read through the keyed mount
                (--codecs wonly; not on the corpus)
  published     the method of the study dcmfs grew from, faithfully: per file
                base64 -> LZMA (xz preset 6) -> AES-256, in this one process;
                on the subset it runs on one copy (the copies are identical),
                and plain LZMA (preset 6, no base64) is measured once besides
  dcmfs-s3      dcmfs on an S3 store, a throwaway one-node Ceph RGW on loopback
                (tests/ceph.py, installed with apt-get when missing; skipped with
                the reason printed when it cannot be), against dcmfs on its
                local backend, on the CT series: ingest, seconds until every
                object is uploaded, cold read with an empty object cache, PUTs,
                requests and bytes uploaded per GB (scripts/bench_s3.py)
  gocryptfs     Debian's gocryptfs, with -scryptn 10 (./scripts/bench installs it
                and fio with apt-get when missing; without it the contender is
                skipped with a note)

Every workload runs its contenders in an order that rotates with the
repetition.  The subset runs plain, dcmfs, dcmfs-paused, dcmfs-dicom0, dcmfs-j2k, dcmfs-cold and
published.  Stored sizes are the store's files (objects and index); the
per-modality ratios of dcmfs come from its user.dcmfs.stats (object bytes).
"Goals" compares the figures with the targets of issue 3; nothing fails on them.

Usage: ./scripts/bench [--files 400] [--reps 3] [--big-mib 1024] [--subset-copies 5]
                       [--codecs dicom0 lzma] [--json out.json] [--report DIR]
       ./scripts/bench --quick      (under a minute; tests/test_bench.py runs it in CI)
--report DIR writes DIR/README.md with tables and PNG plots (matplotlib).
"""


from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from bench_contenders import Dcmfs, Gocryptfs, Plain, lzma_only
from bench_data import copy_subset, corpus, make_series, native_subset
from bench_quality import cipher_quality
from bench_report import write_report
from bench_s3 import render_s3, s3_contenders
from bench_view import render_view, view_cold_read
from bench_tables import ct_comparisons, goals, paired_ratios, render, summarize, summarize_corpus, summarize_rows, summarize_subset
from bench_workloads import (add_published, measure, measure_corpus, published_corpus,
                             parallel_writers, random_reads, small_files)


def adder(results: dict, name: str):
    def add(key, value):
        results[name].setdefault(key, []).append(value)
    return add


def rotate(items: list, rep: int) -> list:
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]


def _tool_version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    r = subprocess.run(cmd, capture_output=True, text=True)
    return (r.stdout or r.stderr).split("\n")[0].strip()


def run(args) -> dict:
    started = time.monotonic()
    last = [started]

    def lap(what: str) -> None:
        now = time.monotonic()
        if what != "start":
            print(f"  {what}: {now - last[0]:.1f} s", file=sys.stderr)
        last[0] = now

    base = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-bench-", dir=args.workdir))
    try:
        for d in ("src", "ct", "corpus-src", "corpus", "small", "writers", "random", "quality"):
            (base / d).mkdir()
        files = make_series(base / "src", args.files)
        logical = sum(p.stat().st_size for p in files)
        block = b"".join(p.read_bytes() for p in files[:64])
        have_gocryptfs = shutil.which("gocryptfs") is not None
        if not have_gocryptfs:
            print("note: gocryptfs is not installed, its contender is skipped "
                  "(./scripts/bench installs it with apt-get)", file=sys.stderr)

        def mounted(where: pathlib.Path, variants) -> list:
            cs = [Plain(where), Dcmfs(where)] + [Dcmfs(where, v) for v in variants]
            if have_gocryptfs:
                cs.append(Gocryptfs(where))
            return [c for c in cs if not args.only or c.name in args.only]

        run_published = not args.only or "published" in args.only
        pub = ["published"] if run_published else []
        ct = mounted(base / "ct", args.codecs)
        results: dict[str, dict[str, list]] = {c.name: {} for c in ct}
        results.update({p: {} for p in pub})

        corpus_files, modality, cc, cresults, cpoints = [], {}, [], {}, {}
        if args.corpus:
            corpus_files, modality = corpus(base / "corpus-src", quick=args.quick)
            cc = [c for c in mounted(base / "corpus", args.codecs) if c.name != "dcmfs-wonly"]
            cresults = {c.name: {} for c in cc} | {p: {} for p in pub}
            cpoints = {name: [] for name in cresults}

        lean = [c for c in mounted(base / "small", [v for v in args.codecs if v == "audit0"])
                if c.name in ("plain", "dcmfs", "dcmfs-audit0", "gocryptfs")]
        sresults_small = {c.name: {} for c in lean} if args.small_files else {}
        par = [c for c in mounted(base / "writers", [v for v in args.codecs if v == "paused"])
               if c.name in ("plain", "dcmfs", "dcmfs-paused", "gocryptfs")]
        wresults = {c.name: {} for c in par} if args.writers else {}
        rand = [c for c in mounted(base / "random", []) if c.name in ("plain", "dcmfs", "gocryptfs")]
        rresults = {c.name: {} for c in rand} if args.rand_mib else {}
        rand_tool = None

        # the native subset: fresh stores of their own
        subset, sub, sresults, lzma_alone = [], [], {}, None
        if args.subset_copies:
            subset = native_subset(quick=args.quick)
            if not subset:
                raise SystemExit("no native CT/MR/CR/US file found in pydicom-data")
            (base / "subset-src").mkdir()
            (base / "subset").mkdir()
            sub_files, smod = copy_subset(subset, base / "subset-src", args.subset_copies)
            one_copy = sub_files[:len(subset)]
            sub_logical = sum(p.stat().st_size for p in sub_files)
            sub = [Plain(base / "subset"), Dcmfs(base / "subset"),
                   Dcmfs(base / "subset", "paused"), Dcmfs(base / "subset", "dicom0"),
                   Dcmfs(base / "subset", "j2k"), Dcmfs(base / "subset", "cold")]
            sub = [c for c in sub if not args.only or c.name in args.only]
            sresults = {c.name: {} for c in sub} | {p: {} for p in pub}

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            lap("start")
            for c in rotate(ct + pub, rep) if files or args.big_mib else []:
                if c == "published":
                    add_published(adder(results, "published"), files)
                else:
                    measure(c, files, logical, adder(results, c.name),
                            args.big_mib if c.name in args.big_for else 0, block)
            lap("ct")
            for c in rotate(cc + pub, rep) if cc else []:
                if c == "published":
                    cpoints[c].append(published_corpus(corpus_files, modality,
                                                       adder(cresults, c)))
                else:
                    cpoints[c.name].append(measure_corpus(c, corpus_files, modality,
                                                          adder(cresults, c.name)))
            lap("corpus")
            for c in rotate(sub + pub, rep) if sresults else []:
                if c == "published":
                    add_published(adder(sresults, "published"), one_copy, smod)
                    if lzma_alone is None:
                        lzma_alone = lzma_only(one_copy)
                else:
                    measure(c, sub_files, sub_logical, adder(sresults, c.name))
            lap("subset")
            if rep < args.small_reps:
                for c in rotate(lean, rep) if sresults_small else []:
                    small_files(c, args.small_files, adder(sresults_small, c.name))
            lap("small files")
            for c in rotate(par, rep) if wresults else []:
                parallel_writers(c, files, logical, args.writers, adder(wresults, c.name))
            lap("parallel writers")
            for c in rotate(rand, rep) if rresults else []:
                rand_tool = random_reads(c, args.rand_mib, args.rand_reads, block,
                                         adder(rresults, c.name))
            lap("random reads")
        out = summarize(results, logical, args)
        if args.view and (not args.only or "dcmfs-deid" in args.only):
            print("de-identified view against the normal mount", file=sys.stderr)
            (base / "view").mkdir()
            out["view"] = view_cold_read(base / "view", files, args.reps)
            lap("view")
        if args.s3 and (not args.only or "dcmfs-s3" in args.only):
            print("S3 backend (Ceph RGW on loopback) against the local backend", file=sys.stderr)
            (base / "s3").mkdir()
            # quick: uploads start after 1 s instead of 10 (the figure is not
            # meaningful there, the code path is)
            out["s3"] = s3_contenders(base / "s3", files, args.reps,
                                      ["s3_upload_delay=1"] if args.quick else [])
            if "skipped" in out["s3"]:
                print(f"note: the S3 contenders are skipped: {out['s3']['skipped']}",
                      file=sys.stderr)
            lap("s3")
        if cresults:
            out["corpus"] = summarize_corpus(cresults, cpoints, corpus_files, modality, args)
        if sresults:
            out["subset"] = summarize_subset(sresults, subset, sub_logical, args, lzma_alone)
        if sresults_small:
            out["small_files"] = {"files": args.small_files, "file_bytes": 1024,
                                  "reps": min(args.reps, args.small_reps),
                                  "contenders": summarize_rows(sresults_small, {
                                      "create_files_s": ("create_s", args.small_files),
                                      "stat_files_s": ("stat_s", args.small_files),
                                      "unlink_files_s": ("unlink_s", args.small_files)})}
        if wresults:
            out["parallel_writers"] = {
                "files": args.files, "writers": args.writers, "reps": args.reps,
                "contenders": summarize_rows(wresults, {
                    f"w{n}_mb_s": (f"w{n}_s", logical / 1e6) for n in args.writers}),
                "dcmfs_vs_gocryptfs": paired_ratios(wresults, "dcmfs", "gocryptfs",
                                                    [f"w{n}_s" for n in args.writers])}
        if rresults:
            out["random_reads"] = {"file_mib": args.rand_mib, "reads": args.rand_reads,
                                   "tool": rand_tool, "reps": args.reps,
                                   "contenders": summarize_rows(rresults, {})}
        if args.quality and "dcmfs" in results:
            print("cipher quality and losslessness", file=sys.stderr)
            qfiles = corpus_files or [p for p, _ in native_subset(quick=True)]
            out["quality"] = cipher_quality(base / "quality", files[0], qfiles)
            lap("quality")
        out["goals"] = goals(out)
        out["runtime_s"] = time.monotonic() - started
        out["machine"] = {"cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
                          "gocryptfs": _tool_version(["gocryptfs", "-version"]),
                          "fio": _tool_version(["fio", "--version"]),
                          "drop_caches": os.geteuid() == 0}
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--big-for", nargs="*", default=["plain", "dcmfs", "gocryptfs"],
                   help="contenders that write the big file (default plain dcmfs gocryptfs)")
    p.add_argument("--subset-copies", type=int, default=5,
                   help="times the native pydicom-data subset is written (0: skip it)")
    p.add_argument("--no-corpus", dest="corpus", action="store_false",
                   help="skip the whole-corpus workload")
    p.add_argument("--small-files", type=int, default=5000, help="0: skip the small-file workload")
    p.add_argument("--small-reps", type=int, default=3, help="repetitions of the small-file workload")
    p.add_argument("--writers", type=int, nargs="*", default=[1, 4, 8],
                   help="parallel writers: the CT series written by N threads at once, "
                        "for each N (plain, dcmfs, gocryptfs; none: skip)")
    p.add_argument("--rand-mib", type=int, default=256, help="0: skip the random-read workload")
    p.add_argument("--rand-reads", type=int, default=8192)
    p.add_argument("--no-view", dest="view", action="store_false",
                   help="skip the de-identified view's cold read against the normal mount "
                        "(contender name dcmfs-deid for --only)")
    p.add_argument("--no-s3", dest="s3", action="store_false",
                   help="skip the S3 contenders (dcmfs on a throwaway Ceph RGW on loopback "
                        "against the local backend; contender name dcmfs-s3 for --only)")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the cipher-quality and losslessness figures")
    p.add_argument("--codecs", nargs="*", default=["cold", "dicom0", "lzma"],
                   help="dcmfs variants besides the default for the ct and corpus workloads: "
                        "cold dicom0 lzma paused rotating inline htj2k j2k zstd:N")
    p.add_argument("--only", nargs="*", help="run only these contenders (plain, dcmfs, "
                   "dcmfs-paused, dcmfs-dicom0, dcmfs-lzma, gocryptfs, published, …)")
    p.add_argument("--workdir", default=None, help="where stores and mounts go (default /tmp)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--report", metavar="DIR",
                   help="write DIR/README.md with tables and PNG plots (needs matplotlib: the "
                        "bench extra)")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: print the tables (and --report) of the JSON of a run")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for CI: 8 CT files, 1 repetition, 16 MiB, dcmfs-lzma besides dcmfs, the smallest corpus "
                        "file of each modality, 200 small files, 256 random reads in 16 MiB; the "
                        "subset's smallest file of each modality, once, with dcmfs-paused and "
                        "dcmfs-dicom0 besides (figures are not meaningful, the code path is)")
    args = p.parse_args()
    if args.quick:
        args.reps, args.big_mib, args.subset_copies = 1, 16, 1
        args.files, args.small_files, args.rand_mib, args.rand_reads = 8, 200, 16, 256
        args.writers = [w for w in args.writers if w <= 4][:2]
        if args.codecs == p.get_default("codecs"):
            args.codecs = ["lzma"]  # dicom=0 runs in the subset
    args.small_reps = min(args.small_reps, args.reps)
    if args.from_json:  # re-render the tables and the report of an earlier run
        out = json.loads(pathlib.Path(args.from_json).read_text())
        out.update(ct_comparisons(out["contenders"]))
        out["rendered_from"] = args.from_json
    else:
        command = "./scripts/bench " + shlex.join(sys.argv[1:])
        out = run(args)
        out["command"] = command
    print(render(out))
    if "view" in out:
        print(render_view(out["view"]))
    if "s3" in out:
        print(render_s3(out["s3"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    if args.report:
        write_report(out, pathlib.Path(args.report))
        print(f"report: {args.report}/README.md", file=sys.stderr)


if __name__ == "__main__":
    main()
