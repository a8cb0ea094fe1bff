"""The de-identified view's cost (issue 21): cold reads of the CT series
through the view against the same store's normal mount, side by side.

One store (the default policy) holds the series, re-encoded and at rest;
each repetition reads it cold both ways, in alternating order (the view
first in the first repetition: its headers are made by the parser workers
then, and kept sealed in the index for later mounts): unmount,
``drop_caches``, mount (normally, or ``--view deid``), then list the tree
and read every file in 1 MiB reads (timed: listing, opens and reads).  The
view reads the same pixel extents and rewrites only the headers (in the
parser workers), so its target is >= 80 % of the normal mount's MB/s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench_contenders import Dcmfs, drop_caches
from bench_data import write_files


def _read_tree(root) -> tuple[float, int, int]:
    """(seconds, bytes, files): list the tree, read every file."""
    t = time.perf_counter()
    n = files = 0
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            with open(os.path.join(dirpath, name), "rb") as f:
                while b := f.read(1 << 20):
                    n += len(b)
            files += 1
    return time.perf_counter() - t, n, files


def view_cold_read(base, files, reps: int) -> dict:
    c = Dcmfs(base)
    secret = base / "view.secret"
    c.setup()
    try:
        write_files(files, c.mnt())
        c.settle()
        subprocess.run([sys.executable, "-m", "dcmfs.cli", "new-view-secret", str(secret)],
                       check=True, stdout=subprocess.DEVNULL)
        normal, view = [], []
        normal_files = view_files = 0
        view_mount = ["mount", c.store, c.mp, "--key-file", c.key, "--view", "deid",
                      "--view-secret-file", secret]
        # the first view mount looks at every file once (the index records):
        # done before the timed repetitions, like the re-encoding
        c.cli("umount", c.mp)
        c.cli(*view_mount)
        for rep in range(reps):
            for which in (("normal", "view") if rep % 2 else ("view", "normal")):
                c.cli("umount", c.mp)
                drop_caches()
                if which == "view":
                    c.cli(*view_mount)
                    s, n, view_files = _read_tree(c.mp)
                    view.append(n / s / 1e6)
                else:
                    c.cli("mount", c.store, c.mp, "--key-file", c.key, *c.options)
                    s, n, normal_files = _read_tree(c.mp)
                    normal.append(n / s / 1e6)
        out = {"files": len(files), "reps": reps, "normal_files": normal_files,
               "view_files": view_files, "normal_mb_s": normal, "view_mb_s": view,
               "ratio": [v / m for v, m in zip(view, normal)]}
        out["ratio_median"] = statistics.median(out["ratio"])
        # the view is read first in repetition 1: its headers are made by the
        # workers then (and kept, sealed, in the index); later mounts read them
        out["first_ratio"] = out["ratio"][0]
        if reps > 1:
            out["kept_ratio_median"] = statistics.median(out["ratio"][1:])
        return out
    finally:
        c.teardown()


def render_view(v: dict) -> str:
    med = statistics.median
    lines = ["", f"De-identified view, CT series ({v['files']} files), cold reads side by side "
             f"(medians of {v['reps']}):", "",
             "| mount | files | MB/s (median, min, max) |", "|---|---|---|"]
    for name, key, count in (("normal", "normal_mb_s", "normal_files"),
                             ("--view deid", "view_mb_s", "view_files")):
        xs = v[key]
        lines.append(f"| {name} | {v[count]} | {med(xs):.1f}, {min(xs):.1f}, {max(xs):.1f} |")
    lines.append(f"\nview / normal, per repetition: "
                 f"{', '.join(f'{r:.2f}' for r in v['ratio'])}; median {v['ratio_median']:.2f} "
                 f"(target >= 0.80)")
    if "kept_ratio_median" in v:
        lines.append(f"first view read (headers made by the parser workers): "
                     f"{v['first_ratio']:.2f}; later view mounts (headers kept, sealed, in the "
                     f"index): median {v['kept_ratio_median']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":  # ./scripts/bench runs it; alone: bench_view.py DIR N REPS
    import pathlib
    from bench_data import make_series
    work = pathlib.Path(sys.argv[1])
    (work / "src").mkdir(parents=True, exist_ok=True)
    print(render_view(view_cold_read(work, make_series(work / "src", int(sys.argv[2])),
                                     int(sys.argv[3]))))
