"""The one durable-write helper (restic ``backend/local``).

Everything that must survive a crash is written through :func:`write_file`
(temp file in the same directory, write, fsync, close, rename, fsync the
directory, temp removed on any error), through the index (journal and LMDB
checkpoints), or - chunk objects - written once under a fresh name and made
durable in bulk by :func:`sync_filesystem` before any durable index state
refers to them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets

from ..errors import NoSpaceError, StoreIOError

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str) -> None:
    """fsync a directory so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(fd: int) -> None:
    """Make every write to the filesystem holding open ``fd`` durable (syncfs(2)).

    One call instead of an fsync per object: the objects written since the
    last durability point are flushed together, as ext4 would in one
    journal commit.  Keep ``fd`` open for the whole session: syncfs reports
    writeback errors only to descriptors opened before they happened.
    Falls back to sync(2) where syncfs is missing.
    """
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
    elif syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_new(path: str, data: bytes | memoryview, mode: int = 0o600) -> None:
    """Write a file under a name that must not exist yet, without fsync.

    For immutable objects under random names: a crash can leave a partial
    file, but no durable index state refers to it (the caller syncs before
    that), and the unclean-store check removes what nothing refers to.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        _raise_os(exc, os.path.basename(path))
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        _raise_os(exc, os.path.basename(path))
    os.close(fd)


def _raise_os(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"The disk under the store is full while writing {what}; "
                           "free space there and retry.") from exc
    raise StoreIOError(f"Writing {what} failed: {exc.strerror}.") from exc


def write_file(path: str, data: bytes | memoryview, mode: int = 0o600,
               sync_dir: bool = True, step=None) -> None:
    """Atomically and durably replace ``path`` with ``data``.

    ``step``: a fault hook for crash tests, called with ``"written"``,
    ``"synced"``, ``"renamed"`` and ``"done"`` as each step ends.

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
            step and step("written")
            os.fsync(fd)
            step and step("synced")
        finally:
            os.close(fd)
        os.rename(tmp, path)
        step and step("renamed")
        if sync_dir:
            fsync_dir(directory)
        step and step("done")
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _raise_os(exc, os.path.basename(path))
