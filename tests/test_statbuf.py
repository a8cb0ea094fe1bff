"""The adapter fills ``struct stat`` in one pack_into (issue 17): byte for
byte what mfusepy's field-by-field fill writes, padding zeroed."""

from __future__ import annotations

import ctypes
import stat
import struct

import pytest

from dcmfs.adapter import fuse_ops
from dcmfs.adapter.statbuf import stat_packer

mfusepy = fuse_ops.mfusepy
pytestmark = pytest.mark.skipif(mfusepy is None, reason="libfuse3 is missing")

NS = 1_000_000_000
ANSWERS = [
    {"st_ino": 12345, "st_mode": stat.S_IFREG | 0o644, "st_nlink": 3, "st_uid": 1000,
     "st_gid": 2000, "st_size": 1024, "st_blocks": 2, "st_blksize": 1 << 20,
     "st_atime": 1733220000 * NS + 123456789, "st_mtime": 1733220001 * NS + 7,
     "st_ctime": 1733220002 * NS + NS - 1},
    {"st_ino": 2**63 + 5, "st_mode": stat.S_IFCHR | 0o600, "st_nlink": 1, "st_uid": 2**32 - 2,
     "st_gid": 0, "st_size": 0, "st_blocks": 0, "st_blksize": 4096, "st_rdev": (8 << 8) | 1,
     "st_atime": 0, "st_mtime": 5, "st_ctime": NS},
    {"st_ino": 1, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_uid": 0, "st_gid": 0,
     "st_size": 0, "st_atime": -NS - 1, "st_mtime": 0, "st_ctime": 0},  # before 1970
]


@pytest.mark.parametrize("attrs", ANSWERS)
def test_one_pack_writes_what_mfusepy_writes(attrs):
    pack = stat_packer(mfusepy.c_stat)
    ours, theirs = mfusepy.c_stat(), mfusepy.c_stat()
    ctypes.memset(ctypes.byref(ours), 0xAB, ctypes.sizeof(ours))  # stale bytes are zeroed
    pack(ours, attrs)
    mfusepy.set_st_attrs(theirs, attrs, use_ns=True)
    assert bytes(ours) == bytes(theirs)
    assert ours.st_ino == attrs["st_ino"] and ours.st_mtimespec.tv_nsec == attrs["st_mtime"] % NS


def test_an_answer_of_another_shape_is_refused_not_misread():
    """Float times (or a missing field) raise, and the adapter falls back
    to mfusepy's own fill."""
    pack = stat_packer(mfusepy.c_stat)
    st = mfusepy.c_stat()
    with pytest.raises((TypeError, struct.error)):  # what the adapter catches
        pack(st, dict(ANSWERS[0], st_mtime=1.5))
    with pytest.raises(KeyError):
        pack(st, {"st_ino": 1})
