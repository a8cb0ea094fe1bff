"""The de-identified view's cost (issue 21): cold reads of the CT series
through the view against the same store's normal mount, side by side.

One store (the default policy) holds the series, re-encoded and at rest;
each repetition reads it cold three ways, the order rotating: the normal
mount, the view with its headers kept in the index by an earlier mount, and
the view under a secret never used (``-o ro``: every header made by the
parser workers, and not kept); each time unmount,
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
        _new_secret(secret)
        mb_s: dict[str, list] = {"normal": [], "view": [], "view-made": []}
        counts: dict[str, int] = {}
        view = ["--view", "deid", "--view-secret-file"]
        # the first view mount looks at every file once (the index records):
        # done before the timed repetitions, like the re-encoding; its
        # headers are made on first read and kept for later mounts
        c.cli("umount", c.mp)
        c.cli("mount", c.store, c.mp, "--key-file", c.key, *view, secret)
        _read_tree(c.mp)
        kinds = list(mb_s)
        for rep in range(reps):
            for which in kinds[rep % 3:] + kinds[:rep % 3]:  # the order rotates
                c.cli("umount", c.mp)
                drop_caches()
                if which == "normal":
                    c.cli("mount", c.store, c.mp, "--key-file", c.key, *c.options)
                elif which == "view":  # headers kept in the index by an earlier mount
                    c.cli("mount", c.store, c.mp, "--key-file", c.key, *view, secret)
                else:  # a secret never used: every header made by the parser workers
                    # (read-only: not kept, so the next repetition makes them again)
                    fresh = base / f"fresh-{rep}.secret"
                    _new_secret(fresh)
                    c.cli("mount", c.store, c.mp, "--key-file", c.key, *view, fresh, "-o", "ro")
                s, n, counts[which] = _read_tree(c.mp)
                mb_s[which].append(n / s / 1e6)
        out = {"files": len(files), "reps": reps, "counts": counts, "mb_s": mb_s,
               "ratio": [v / m for v, m in zip(mb_s["view"], mb_s["normal"])],
               "ratio_made": [v / m for v, m in zip(mb_s["view-made"], mb_s["normal"])]}
        out["ratio_median"] = statistics.median(out["ratio"])
        out["ratio_made_median"] = statistics.median(out["ratio_made"])
        return out
    finally:
        c.teardown()


def _new_secret(path) -> None:
    subprocess.run([sys.executable, "-m", "dcmfs.cli", "new-view-secret", str(path)],
                   check=True, stdout=subprocess.DEVNULL)


def render_view(v: dict) -> str:
    med = statistics.median
    lines = ["", f"De-identified view, CT series ({v['files']} files), cold reads side by side "
             f"(medians of {v['reps']}, order rotating):", "",
             "| mount | files | MB/s (median, min, max) | / normal (median) |", "|---|---|---|---|"]
    for name, key, ratio in (("normal", "normal", None),
                             ("--view deid, headers kept in the index", "view", "ratio_median"),
                             ("--view deid, headers made by the workers", "view-made",
                              "ratio_made_median")):
        xs = v["mb_s"][key]
        lines.append(f"| {name} | {v['counts'][key]} | {med(xs):.1f}, {min(xs):.1f}, "
                     f"{max(xs):.1f} | {v[ratio]:.2f} |" if ratio else
                     f"| {name} | {v['counts'][key]} | {med(xs):.1f}, {min(xs):.1f}, "
                     f"{max(xs):.1f} | 1 |")
    lines.append(f"\nview / normal per repetition: kept {', '.join(f'{r:.2f}' for r in v['ratio'])}"
                 f"; made {', '.join(f'{r:.2f}' for r in v['ratio_made'])} (target >= 0.80)")
    return "\n".join(lines)


if __name__ == "__main__":  # ./scripts/bench runs it; alone: bench_view.py DIR N REPS
    import pathlib
    from bench_data import make_series
    work = pathlib.Path(sys.argv[1])
    (work / "src").mkdir(parents=True, exist_ok=True)
    print(render_view(view_cold_read(work, make_series(work / "src", int(sys.argv[2])),
                                     int(sys.argv[3]))))
