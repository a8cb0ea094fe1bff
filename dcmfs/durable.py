"""The one durable-write helper (restic ``backend/local``).

Everything that must survive a crash is written through :func:`write_file`
(temp file in the same directory, write, fsync, close, rename, fsync the
directory, temp removed on any error) or through an LMDB transaction.
"""

from __future__ import annotations

import errno
import os
import secrets

from .errors import NoSpaceError, StoreIOError

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str) -> None:
    """fsync a directory so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_os(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"The disk under the store is full while writing {what}; "
                           "free space there and retry.") from exc
    raise StoreIOError(f"Writing {what} failed: {exc.strerror}.") from exc


def write_file(path: str, data: bytes | memoryview, mode: int = 0o600,
               sync_dir: bool = True) -> None:
    """Atomically and durably replace ``path`` with ``data``.

    Raises
    ------
    NoSpaceError
        The backing disk is full; nothing at ``path`` changed.
    StoreIOError
        Any other I/O error; nothing at ``path`` changed.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if sync_dir:
            fsync_dir(directory)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _raise_os(exc, os.path.basename(path))
