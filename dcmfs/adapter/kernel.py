"""What the adapter tells the kernel besides the FUSE replies: the errno of
each dcmfs error, and the mount's read-ahead.  No mfusepy here (only
:mod:`dcmfs.adapter.fuse_ops` imports it)."""

from __future__ import annotations

import errno
import logging
import os

from .. import errors as E

log = logging.getLogger("dcmfs.fuse")

#: the one exception -> errno table (most specific class first)
ERRNO: list[tuple[type, int]] = [
    (E.NotFound, errno.ENOENT),
    (E.Exists, errno.EEXIST),
    (E.NotADirectory, errno.ENOTDIR),
    (E.IsADirectory, errno.EISDIR),
    (E.DirectoryNotEmpty, errno.ENOTEMPTY),
    (E.InvalidArgument, errno.EINVAL),
    (E.NoAttribute, errno.ENODATA),
    (E.NotSupported, errno.EOPNOTSUPP),
    (E.NameTooLong, errno.ENAMETOOLONG),
    (E.BadHandle, errno.EBADF),
    (E.TooBig, errno.EFBIG),
    (E.PermissionDenied, errno.EACCES),
    (E.ReadOnlyError, errno.EROFS),
    (E.NoSpaceError, errno.ENOSPC),
    (E.IntegrityError, errno.EIO),
    (E.IndexDamagedError, errno.EIO),
    (E.StoreIOError, errno.EIO),
]


def errno_of(exc: E.DcmfsError) -> int:
    for cls, code in ERRNO:
        if isinstance(exc, cls):
            return code
    return errno.EIO



def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Have the kernel read ``kib`` KiB ahead of sequential readers of the
    FUSE mount at ``mountpoint`` (its backing device info's
    ``read_ahead_kb``); False where it may not (not root) or cannot.

    The kernel gives a FUSE mount 128 KiB and takes no more from the INIT
    reply, so a sequential reader's READs are 128 KiB each: five requests
    for a 513 KB CT slice, each a round trip through Python (measured,
    issue 17).  The stat waits until the kernel has the INIT reply (a
    request waits for it), so the value set here is not overwritten."""
    try:
        dev = os.stat(mountpoint).st_dev
        parent = os.stat(os.path.dirname(os.path.abspath(mountpoint))).st_dev
        if os.major(dev) != 0 or dev == parent:  # not a FUSE mount (any more)
            return False
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
        return True
    except OSError as exc:
        log.debug("read-ahead of the mount left at the kernel's: %s", type(exc).__name__)
        return False
