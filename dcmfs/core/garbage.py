"""Superseded objects of the filesystem core: kept until a checkpoint has
made the index that no longer names them durable, then deleted (by the
checkpoint thread after it has let go of the core's lock)."""

from __future__ import annotations

import threading
from typing import Callable


class Garbage:
    """The superseded objects of a :class:`~dcmfs.core.contents.FileData`."""

    def __init__(self, objects) -> None:
        self.objects = objects
        #: superseded objects, deleted once a checkpoint made that durable
        self._garbage: list[bytes] = []
        #: superseded by a checkpoint, to be deleted outside the core's lock
        #: (by the checkpoint thread, once it has let go of it)
        self._set_aside: list[bytes] = []
        self._aside_lock = threading.Lock()

    def after_commit(self, oids: list[bytes]) -> None:
        """Called after every index commit with the objects it superseded.

        They stay until the next checkpoint: until then the durable index
        (the last checkpoint) may still refer to them.
        """
        self._garbage.extend(oids)

    def superseded(self) -> list[bytes]:
        """Objects superseded since the last checkpoint, or set aside for
        deletion (still on disk)."""
        with self._aside_lock:
            return self._garbage + self._set_aside

    def checkpointed(self) -> None:
        """Called after a checkpoint: delete what the durable index no longer names."""
        garbage, self._garbage = self._garbage, []
        for oid in garbage:
            self.objects.delete(oid)
        self.delete_set_aside()  # what a failed later deletion left

    def set_aside(self) -> None:
        """Called after a checkpoint, instead of :meth:`checkpointed`, by a
        caller that deletes them later without the core's lock
        (:meth:`delete_set_aside`): an unlink burst need not wait on a
        checkpoint deleting thousands of files (or S3 objects)."""
        with self._aside_lock:
            self._set_aside.extend(self._garbage)
        self._garbage = []

    def set_aside_count(self) -> int:
        return len(self._set_aside)

    def delete_set_aside(self, go_on: Callable[[], bool] | None = None) -> int:
        """Delete the objects :meth:`set_aside` kept (no core lock needed:
        nothing names them any more); ``go_on`` is asked before each batch,
        False leaves the rest for later.  Returns how many were deleted."""
        with self._aside_lock:
            oids = list(self._set_aside)
        done = 0
        while done < len(oids) and (go_on is None or go_on()):
            batch = oids[done:done + 64]
            for oid in batch:
                self.objects.delete(oid)
            with self._aside_lock:  # counted as superseded until gone
                del self._set_aside[:len(batch)]
            done += len(batch)
        return done
