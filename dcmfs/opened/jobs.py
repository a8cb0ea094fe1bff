"""The narrow interface background jobs see of the store they run in.

The re-encoder and the scrubber (:mod:`dcmfs.core`) and the verifier
(:mod:`dcmfs.integrity.verify`) run beside the request path.  They get a
:class:`JobHost` - the mounted filesystem, or an :class:`~dcmfs.opened.store.
OpenedStore` for an offline verify - and use only what it names here, never
private attributes of the core.
"""

from __future__ import annotations

import threading
from typing import ContextManager, Protocol

from ..index import Index, Txn
from ..storage.objects import ObjectStore


class JobHost(Protocol):
    """What a background job may use of an opened store."""

    #: the index; read it in ``with lock, index.begin()``
    index: Index
    #: the object store (its methods are thread-safe)
    objects: ObjectStore
    #: plaintext bytes per fixed-layout chunk
    chunk_size: int
    #: the store's general codec id (what chunks are compressed with)
    general_codec: int
    #: the core's lock: held only to read a file's index entries or to swap
    #: them, never across object I/O
    lock: threading.RLock
    #: set when the store is closing: jobs stop at the next file
    stopping: threading.Event
    #: True once the store is closed (a job that held no lock may see it)
    closed: bool

    def write_txn(self) -> ContextManager[Txn]:
        """A write transaction for one change (lock held by the caller)."""

    def is_open(self, ino: int) -> bool:
        """Is the file open (its contents may change under a job)? (lock held)"""

    def has_uncommitted(self, ino: int) -> bool:
        """Is the file open with changes not committed yet? (lock held)"""

    def objects_in_flight(self, candidates: list[bytes]) -> set[bytes]:
        """Those of ``candidates`` the store holds without the index naming
        them: being written, superseded and waiting for a checkpoint, or
        written by the re-encoder for the file it is on. (lock held)"""

    def damaged(self, ino: int, exc: Exception) -> None:
        """Report an integrity error in a file (thread-safe)."""


class ActiveJobHost(JobHost, Protocol):
    """A host that also serves file I/O (the mounted filesystem): jobs yield
    to it and hand it the objects they supersede."""

    def last_activity(self) -> float:
        """``time.monotonic()`` of the last file read or write."""

    def after_commit(self, superseded: list[bytes]) -> None:
        """Objects a committed change replaced: deleted after the next checkpoint."""

    def move_generation(self, gen: int) -> dict:
        """Seal the index side again under key epoch ``gen`` (``rotate --finish``)."""
