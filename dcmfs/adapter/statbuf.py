"""Filling a ``struct stat`` for libfuse in one ``struct.pack_into``.

mfusepy zeroes the buffer and sets each field through ctypes, a Python
attribute lookup and a conversion per field (measured, issue 17: 16 us a
getattr on a loaded machine; one ``pack_into``: about 2 us).  The layout is
read from mfusepy's own ``c_stat`` (field offsets and sizes), so it is the
one libfuse was built with; bytes of fields not named here (``st_dev``,
padding, reserved) are written as zeros.
"""

from __future__ import annotations

import ctypes
import operator
import struct
from typing import Callable

#: the fields filled from the core's answer, in ``c_stat``'s names
_SCALARS = ("st_ino", "st_nlink", "st_mode", "st_uid", "st_gid", "st_rdev", "st_size",
            "st_blksize", "st_blocks")
_TIMES = ("st_atime", "st_mtime", "st_ctime")
_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}
_NS = 1_000_000_000


def _code(ctype) -> str:
    code = _CODES[struct.calcsize(ctype._type_)]
    return code if ctype._type_.islower() else code.upper()


def stat_packer(c_stat) -> Callable[[object, dict], None]:
    """``pack(buffer, attrs)``: write ``attrs`` (the core's getattr answer:
    integer fields, times in nanoseconds) into a ``c_stat`` buffer.
    Raises KeyError, TypeError or struct.error for anything else."""
    types = {name: ctype for name, ctype, *_ in c_stat._fields_}
    slots = []  # (offset, struct code, place in the canonical tuple of pack)
    for i, name in enumerate(_SCALARS):
        slots.append((getattr(c_stat, name).offset, _code(types[name]), i))
    for i, name in enumerate(_TIMES):
        spec = types[name + "spec"]
        base = getattr(c_stat, name + "spec").offset
        parts = {n: t for n, t, *_ in spec._fields_}
        at = len(_SCALARS) + 2 * i
        slots.append((base + spec.tv_sec.offset, _code(parts["tv_sec"]), at))
        slots.append((base + spec.tv_nsec.offset, _code(parts["tv_nsec"]), at + 1))
    slots.sort(key=lambda s: s[0])
    fmt, at = ["="], 0
    for offset, code, _ in slots:
        fmt.append("x" * (offset - at) + code)
        at = offset + struct.calcsize("=" + code)
    fmt.append("x" * (ctypes.sizeof(c_stat) - at))
    pack_into = struct.Struct("".join(fmt)).pack_into
    in_layout = operator.itemgetter(*(s[2] for s in slots))

    def pack(buffer, attrs: dict) -> None:
        get = attrs.get
        pack_into(buffer, 0, *in_layout((
            attrs["st_ino"], attrs["st_nlink"], attrs["st_mode"], attrs["st_uid"],
            attrs["st_gid"], get("st_rdev", 0), attrs["st_size"], get("st_blksize", 0),
            get("st_blocks", 0), *divmod(attrs["st_atime"], _NS),
            *divmod(attrs["st_mtime"], _NS), *divmod(attrs["st_ctime"], _NS))))
    return pack
