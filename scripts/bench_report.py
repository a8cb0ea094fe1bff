"""The benchmark's report: DIR/README.md with the tables of one run and PNG
plots made with matplotlib (the `bench` extra), small enough to commit."""

from __future__ import annotations

import pathlib

from bench_tables import _big, render

DPI = 90
#: one colour per contender in every plot
COLOURS = {"plain": "#7f7f7f", "dcmfs": "#1f77b4", "dcmfs-dicom0": "#17becf",
           "dcmfs-lzma": "#9467bd", "dcmfs-paused": "#aec7e8", "dcmfs-inline": "#c5b0d5",
           "dcmfs-j2k": "#8c564b", "dcmfs-htj2k": "#e377c2",
           "gocryptfs": "#ff7f0e", "published": "#d62728"}


def _colour(name: str) -> str:
    return COLOURS.get(name, "#2ca02c")


def _median(row: dict, key: str):
    v = row.get(key)
    return v["median"] if isinstance(v, dict) else v


def _bars(ax, groups: list[str], series: dict[str, list], ylabel: str, log: bool = False) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    import numpy as np
    names = list(series)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        vals = [v if v is not None else 0 for v in series[name]]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name,
                      color=_colour(name))
        for b, v in zip(bars, series[name]):
            if v:
                ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.0f}", (b.get_x() + b.get_width() / 2,
                            b.get_height()), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    top = max((v for vals in series.values() for v in vals if v), default=1)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(top=top * 20)  # room for the legend above the bars
    else:
        ax.set_ylim(0, top * 1.35)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center")


def plot_stored(out: dict, path: pathlib.Path, plt) -> None:
    workloads = [("CT series", out.get("contenders", {})),
                 ("pydicom-data corpus", out.get("corpus", {}).get("contenders", {})),
                 ("native subset", out.get("subset", {}).get("contenders", {}))]
    workloads = [(label, c) for label, c in workloads if c]
    names = list(dict.fromkeys(n for _, c in workloads for n in c))
    series = {n: [_median(c[n], "ratio") if n in c else None for _, c in workloads] for n in names}
    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, [w for w, _ in workloads], series, "stored bytes / original bytes")
    ax.set_title("Stored size by method (lower is smaller; 1.0 = uncompressed)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_per_file_time(per_file: dict, path: pathlib.Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label, k, marker in (("published", "published: base64+LZMA+AES", 1, "s"),
                                   ("dcmfs", "dcmfs: write (open, write, close)", 1, "o"),
                                   ("dcmfs", "dcmfs: write until re-encoded at rest", 2, "^"),
                                   ("gocryptfs", "gocryptfs: write", 1, "x")):
        pts = per_file.get(name)
        if pts:
            ax.scatter([p[0] / 1e6 for p in pts], [max(p[k], 1e-3) for p in pts], s=14,
                       marker=marker, label=label, color=_colour(name),
                       alpha=0.5 if k == 2 else 0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("time per file (ms)")
    ax.set_title("Per-file time against file size, pydicom-data corpus")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_cpu_rss(per_file: dict, path: pathlib.Path, plt) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"published": "published (its process)", "dcmfs": "dcmfs daemon",
              "dcmfs-lzma": "dcmfs-lzma daemon", "gocryptfs": "gocryptfs daemon"}
    for name, label in labels.items():
        pts = per_file.get(name)
        if not pts:
            continue
        x = [p[0] / 1e6 for p in pts]
        a1.scatter(x, [max(p[3], 1e-2) for p in pts], s=12, label=label, color=_colour(name))
        a2.scatter(x, [p[4] for p in pts], s=12, label=label, color=_colour(name))
    for ax, title, ylabel in ((a1, "CPU per file, write until at rest",
                               "CPU time (ms; 10 ms ticks, 0 drawn at 0.01)"),
                              (a2, "Resident memory after each file", "RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a1.set_yscale("log")
    fig.suptitle("CPU and memory against file size, pydicom-data corpus")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_throughput(out: dict, path: pathlib.Path, plt) -> None:
    ct, cp = out.get("contenders", {}), out.get("corpus", {}).get("contenders", {})
    names = list(ct)
    big = _big(out.get("big_mib", 0))
    groups = [("CT ingest", ct, "ingest_mb_s"), ("CT at rest", ct, "at_rest_mb_s"),
              ("CT cold read", ct, "read_mb_s"), ("corpus ingest", cp, "ingest_mb_s"),
              ("corpus at rest", cp, "at_rest_mb_s"),
              ("corpus cold read", cp, "read_mb_s"), (f"{big} write", ct, "big_write_mb_s"),
              (f"{big} cold read", ct, "big_read_mb_s")]
    groups = [g for g in groups if any(g[2] in r for r in g[1].values())]
    series = {n: [_median(c[n], key) if n in c else None for _, c, key in groups] for n in names}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _bars(ax, [g[0] for g in groups], series, "MB/s (log scale)", log=True)
    ax.set_title("Ingest and read throughput by contender (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_modality(out: dict, path: pathlib.Path, plt) -> bool:
    cp = out.get("corpus", {})
    c = cp.get("contenders", {})
    mods = [m for m in cp.get("modalities", {}) if m != "-"]
    names = [n for n in c if n != "plain" and any(f"ratio_{m}" in c[n] for m in mods)]
    if not names or not mods:
        return False
    series = {n: [_median(c[n], f"ratio_{m}") for m in mods] for n in names}
    fig, ax = plt.subplots(figsize=(9, 4))
    _bars(ax, [f"{m} ({cp['modalities'][m]})" for m in mods], series,
          "stored bytes / original bytes")
    ax.set_title("Compression ratio by modality, pydicom-data corpus (files per modality)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


WORKLOADS = """\
## What was measured

- **Contenders.** `plain`: a directory on the same disk. `dcmfs`: a real
  mount with the default policy (close seals uncompressed; the background
  re-encoder stores native DICOM pixel data in bands of rows, each in
  whichever of HTJ2K, JPEG XL (effort 1 or 2) and zstd costs least in
  stored bytes plus estimated decode time, and everything else in zstd
  level 1). `dcmfs-dicom0`:
  `-o dicom=0`, zstd only. `dcmfs-lzma`: a store inited with `--codec lzma`.
  `gocryptfs`: Debian's gocryptfs (`-scryptn 10`), encryption only.
  `published`: the method of the study dcmfs grew from, per file base64 →
  LZMA (xz preset 6) → AES-256-GCM, in the benchmark's own process.
- **CT series**: copies of pydicom-data's `693_UNCR.dcm` (513 KB) with
  distinct UIDs, written file by file (open, write, close = the per-file
  time), then read back cold (remount + `drop_caches`) and compared byte for
  byte. "At rest" is when the writer is done *and* dcmfs's backlog is
  re-encoded and checkpointed; stored sizes are measured at rest (objects and
  index). The big file is the series' bytes repeated, written in 1 MiB writes.
- **Corpus**: every file of pydicom-data, file by file: write, then wait
  until the contender has it at rest (for dcmfs: re-encoded and the index
  checkpointed with an `fsync` of the root, which costs a few ms a file); the
  daemon's CPU seconds over both and its RSS after each file (psutil). For
  `published` the CPU is its process's and the RSS is the benchmark
  process's (a Python interpreter, like the dcmfs daemon). Ratios by modality
  come from dcmfs's `user.dcmfs.stats` (object bytes; `-o dicom=0` does not
  read the DICOM header, so it has none) and from the published method's
  per-file sizes.
- **Native subset**: the files issue 3 measured, from pydicom-data and
  pydicom's own test files: native CT/MR/CR/US pixel data, without
  pydicom-data's implicit-VR twins `*_UNCI` (28 files, 24.5 MB), written
  `--subset-copies` times, brought to rest, read back cold.
- **Small files**: 1 KiB files created, stat'ed and unlinked in one
  directory. **Random reads**: 4 KiB reads at random aligned offsets of a cold
  file of CT content, the same offsets for every contender.
"""


EXPLAIN = """\
## What the cipher-quality figures mean

The image-encryption literature judges a cipher by statistics of its output:
byte entropy near 8 bits, NPCR near 99.61 % and UACI near 33.46 % between the
encryptions of two images that differ in one pixel, and adjacent values that
no longer correlate.  dcmfs's stored objects meet all of them, and the row
"the same file stored twice" shows why that proves little: two encryptions of
the *identical* file score the same, because every object is sealed with a
fresh random nonce under a key derived per file, so any two objects look like
independent random strings.  The figures only show that nothing of the
plaintext's structure leaks into the bytes in an obvious way; a cipher with a
published key or a reused nonce would score just as well.  dcmfs's
confidentiality and integrity rest instead on AES-256-GCM (a standard,
analysed AEAD), random 96-bit nonces under per-file keys far from the 2^32
limit, and the associated data that binds each object to its store, file,
position and generation (docs/format.md).  Objects are paired by size rank
for NPCR and UACI (object ids are random; pairs have equal or near-equal
lengths), over their common length, 100-byte headers included.

The losslessness figures (identical MD5 and SHA-256, MSE 0, PSNR infinite,
SSIM 1 on the decoded pixel arrays) are a consequence of dcmfs returning the
very bytes it was given, which the benchmark also checks byte for byte for
every file it reads back; pixel arrays are compared where pydicom can decode
them (files without pixel data, or in a syntax without an installed decoder,
are compared by hash only).  SSIM is the standard formula of Wang et al.
(2004), 11×11 Gaussian window, σ 1.5, over at most four planes per file,
implemented with numpy.
"""


def write_report(out: dict, outdir: pathlib.Path) -> list[pathlib.Path]:
    """Writes README.md and the PNGs into ``outdir``; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    outdir.mkdir(parents=True, exist_ok=True)
    figs = []

    def fig(name: str, title: str, draw) -> None:
        path = outdir / name
        if draw(path) is not False:
            figs.append((path, title))

    per_file = out.get("corpus", {}).get("per_file", {})
    fig("stored_size.png", "Stored size by method", lambda p: plot_stored(out, p, plt))
    if per_file:
        fig("per_file_time.png", "Per-file time against file size",
            lambda p: plot_per_file_time(per_file, p, plt))
        fig("cpu_rss.png", "CPU and RSS against file size",
            lambda p: plot_cpu_rss(per_file, p, plt))
    fig("throughput.png", "Ingest and read throughput", lambda p: plot_throughput(out, p, plt))
    fig("ratio_by_modality.png", "Compression ratio by modality",
        lambda p: plot_modality(out, p, plt))
    m = out.get("machine", {})
    lines = ["# dcmfs benchmark report", "",
             f"Produced by `{out.get('command', './scripts/bench')}` in "
             f"{out.get('runtime_s', 0) / 60:.1f} minutes on {m.get('date')} "
             f"({m.get('cpus')} CPUs; gocryptfs: {m.get('gocryptfs') or 'not installed'}; "
             f"fio: {m.get('fio') or 'not installed, Python loop'}; "
             f"cold reads after remount {'and drop_caches' if m.get('drop_caches') else 'only (not root: no drop_caches)'}).",
             "The machine is shared and noisy: contenders run interleaved in an order that "
             "rotates with each repetition, and every figure is the median of the "
             "repetitions (min and max are in the JSON). Ratios between contenders are "
             "from this one run."
             + (f" The tables and plots were rendered again from `{out['rendered_from']}` "
                "with `--from-json`." if out.get("rendered_from") else ""), "", WORKLOADS, "## Tables", "", render(out), "", "## Plots", ""]
    for path, title in figs:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    lines.append(EXPLAIN)
    (outdir / "README.md").write_text("\n".join(lines))
    return [p for p, _ in figs]
