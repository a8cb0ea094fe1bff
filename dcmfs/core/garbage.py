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
        #: taken off ``_set_aside`` by a deleter, not all gone yet
        self._deleting: list[bytes] = []
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
            return self._garbage + self._set_aside + self._deleting

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
        False leaves the rest for later.  Returns how many were deleted.

        The checkpoint thread runs this without the core's lock while a
        request's checkpoint (:meth:`checkpointed`) may run it under it:
        each batch is taken off the list before its deletion, so no object
        is deleted by both or dropped from the list by the one that did not
        delete it."""
        with self._aside_lock:
            todo = len(self._set_aside)
        done = 0
        while done < todo and (go_on is None or go_on()):
            with self._aside_lock:
                batch = self._set_aside[:min(64, todo - done)]
                del self._set_aside[:len(batch)]
                self._deleting.extend(batch)  # counted as superseded until gone
            if not batch:
                break
            gone = 0
            try:
                for oid in batch:
                    self.objects.delete(oid)
                    gone += 1
            finally:
                with self._aside_lock:
                    for oid in batch:
                        self._deleting.remove(oid)
                    self._set_aside[:0] = batch[gone:]  # a failure: kept for the next round
            done += len(batch)
        return done
