"""``dcmfs recompress`` and ``dcmfs stats``: admin commands that work on a
mounted store (through the daemon's virtual attributes on the mount root:
the daemon holds the key and the store lock) or an unmounted one (opened
here, with the key).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, TextIO

from . import format as fmt
from .config import Config
from .errors import StoreIOError
from .filesystem import FileSystem
from .mount import dcmfs_mounts
from .store import Secret, open_store


def mountpoint_of(store_root: str) -> str | None:
    root = os.path.abspath(store_root)
    return next((m.mountpoint for m in dcmfs_mounts() if m.store == root), None)


def _xattr(mp: str, name: str, value: bytes | None = None) -> bytes | None:
    try:
        if value is None:
            return os.getxattr(mp, name)
        os.setxattr(mp, name, value)
        return None
    except OSError as exc:
        raise StoreIOError(f"The dcmfs daemon at {mp} did not answer ({exc.strerror}); "
                           "check 'dcmfs status'.") from exc


class Progress:
    """A one-line progress bar with rate and ETA on a terminal, a final
    summary line otherwise."""

    def __init__(self, total_files: int, out: TextIO = sys.stderr) -> None:
        self.total = total_files
        self.out = out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, left: int, nbytes: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (not self.tty or now - self._last < 0.2):
            return
        self._last = now
        done = max(0, self.total - left)
        elapsed = max(now - self.start, 1e-6)
        rate = nbytes / elapsed / 1e6
        eta = (elapsed / done * left) if done else 0
        width = 30
        filled = width * done // self.total if self.total else width
        line = (f"recompress [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} files, "
                f"{rate:.1f} MB/s, ETA {eta:.0f} s")
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        elif final:
            self.out.write(line + "\n")
        self.out.flush()


def recompress(store_root: str, secret: Callable[[], Secret], config: Config,
               out: TextIO = sys.stderr) -> dict:
    """Run the re-encoder over every file that needs it, to completion."""
    mp = mountpoint_of(store_root)
    if mp is not None:
        before = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        _xattr(mp, fmt.CONTROL_XATTR, b"recompress")
        status = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        bar = Progress(status["backlog_files"], out)
        while status["backlog_files"]:
            bar.update(status["backlog_files"],
                       status["reencoded_bytes"] - before.get("reencoded_bytes", 0))
            time.sleep(0.2)
            status = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        bar.update(0, status["reencoded_bytes"] - before.get("reencoded_bytes", 0), final=True)
        return status
    fs = FileSystem(open_store(store_root, secret()), config)
    try:
        fs.recompress()
        reenc = fs.reencoder
        bar = Progress(reenc.backlog[0], out)
        while not reenc.wait_idle(timeout=0.2):
            bar.update(reenc.backlog[0], reenc.bytes_done)
        bar.update(0, reenc.bytes_done, final=True)
        return fs.live_status()
    finally:
        fs.close()


def content_stats(store_root: str, secret: Callable[[], Secret], config: Config) -> dict:
    mp = mountpoint_of(store_root)
    if mp is not None:
        return json.loads(_xattr(mp, fmt.STATS_XATTR))
    import dataclasses
    fs = FileSystem(open_store(store_root, secret()), dataclasses.replace(config, read_only=True))
    try:
        return fs.content_stats()
    finally:
        fs.close()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ts_name(uid: str) -> str:
    try:
        from pydicom.uid import UID
        name = UID(uid).name
        name = name if name and name != uid else uid
        return name if len(name) <= 40 else name[:39] + "…"
    except Exception:  # noqa: BLE001 — a name is a nicety
        return uid


def render_stats(stats: dict) -> str:
    rows = [("modality", "transfer syntax", "files", "logical", "stored", "ratio",
             "codecs (logical bytes)", "fallbacks")]
    tot_l = tot_s = tot_f = 0
    for g in stats["groups"]:
        ratio = g["stored_bytes"] / g["logical_bytes"] if g["logical_bytes"] else 0
        codecs = ", ".join(f"{k} {_size(v)}" for k, v in sorted(g["codecs"].items()))
        falls = ", ".join(f"{k} ({v})" for k, v in sorted(g["fallbacks"].items()))
        ts = g["transfer_syntax"]
        rows.append((g["modality"], _ts_name(ts) if ts != "-" else "-", str(g["files"]),
                     _size(g["logical_bytes"]), _size(g["stored_bytes"]), f"{ratio:.3f}",
                     codecs, falls or "-"))
        tot_f += g["files"]
        tot_l += g["logical_bytes"]
        tot_s += g["stored_bytes"]
    rows.append(("all", "", str(tot_f), _size(tot_l), _size(tot_s),
                 f"{tot_s / tot_l:.3f}" if tot_l else "-", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if stats.get("backlog_files"):
        lines.append(f"{stats['backlog_files']} files wait for the re-encoder "
                     "('dcmfs recompress STORE' finishes them now).")
    return "\n".join(lines)
