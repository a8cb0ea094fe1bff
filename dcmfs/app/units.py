"""Sizes for people, in one unit system: SI decimal units (1 kB = 1000 B,
1 MB = 10^6 B), as in every rate dcmfs prints (MB/s) and in ``-o
scrub_rate=MB``."""

from __future__ import annotations

#: bytes in a megabyte (``-o scrub_rate`` is in MB/s)
MB = 1_000_000


def size_text(n: float | None) -> str:
    """``512 B``, ``1.5 kB``, ``33.6 MB``, ``2.0 GB``, … (``-`` for None)."""
    if n is None:
        return "-"
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
