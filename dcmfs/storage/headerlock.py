"""The header lock: an exclusive ``flock`` on the store directory itself
while ``dcmfs.store`` is rewritten (:func:`dcmfs.storage.header.rewrite_header`).

Not the store lock (``STORE/lock``): a running daemon holds that for its
whole session, and the key commands must work while the store is mounted.
"""

from __future__ import annotations

import fcntl
import os
import time

from .durable import TMP_PREFIX
from ..errors import StoreLockedError


class HeaderLock:
    """An exclusive ``flock`` on the store directory while the header is
    rewritten (waits up to ``timeout`` seconds for another rewrite)."""

    def __init__(self, root: str, timeout: float = 30.0) -> None:
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise StoreLockedError(f"The header of the store {root} is being changed "
                                           "by another dcmfs command; try again.") from exc
                time.sleep(0.05)

    def __enter__(self) -> "HeaderLock":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # drops the lock


def remove_torn_headers(root: str) -> None:
    """Temp files of header rewrites a crash interrupted (under the header
    lock no other rewrite is under way; a damage mark's temp file is told
    apart by its content and left alone)."""
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    torn = f.read(64).lstrip().startswith(b'{\n "chunk_size"')
                if torn:
                    os.unlink(path)
            except OSError:
                pass
