"""The filesystem core's background checkpoint loops (a mixin of
:class:`~dcmfs.core.filesystem.FileSystem`): objects synced before the core's
lock is taken, superseded objects deleted after it is let go."""

from __future__ import annotations

import logging

from ..errors import DcmfsError, loggable
from ..opened.regen import move_generation
from ..opened.shred import shred, shred_state

log = logging.getLogger("dcmfs.fs")


class SyncLoops:
    """``_sync_loop`` of a read-write opening, ``_audit_sync_loop`` of a
    read-only one (each runs in the thread ``dcmfs-checkpoint``), and the
    requests' ``_maybe_checkpoint``."""

    #: a checkpoint the journal asks for is the checkpoint thread's until
    #: the journal has grown this many times past its bounds
    CHECKPOINT_SLACK = 2

    def _maybe_checkpoint(self) -> None:
        """When the journal has grown: wake the checkpoint thread, which
        syncs the objects before it takes the core's lock and deletes the
        superseded ones after (measured, issue 17: a request that
        checkpointed itself deleted thousands of objects while every other
        request waited: an unlink burst's getattrs took 1.2 ms each).  Only
        without that thread, or when it falls behind, the request
        checkpoints itself, its deletions still left to the thread.  A
        failure does not fail the operation that triggered it (the journal
        keeps its changes)."""
        index = self.index
        if not (index.pending_records and index.needs_checkpoint()):
            return
        thread = not self.read_only and self._syncer is not None and self._syncer.is_alive()
        if thread:
            self._checkpoint_due.set()
            if not index.needs_checkpoint(self.CHECKPOINT_SLACK):
                return
        try:
            self.checkpoint(delete_later=thread)
        except DcmfsError as exc:
            log.error("checkpoint failed: %s", exc)

    def _sync_loop(self) -> None:
        """Checkpoint every ``checkpoint_interval`` seconds while there are
        changes, and at once when a request finds the journal grown
        (``_checkpoint_due``).

        The objects are flushed before the lock is taken, so file operations
        wait only for the short index commit, and the superseded objects are
        deleted after it is let go.
        """
        import time
        inbox_due = time.monotonic() + self.config.inbox_interval
        interval = self.config.checkpoint_interval
        next_round = time.monotonic() + interval
        while not self._stop.is_set():  # (a checkpoint may have cleared close()'s wake-up)
            wait = next_round - time.monotonic()
            if self.data.set_aside_count():  # look for a pause in the requests soon
                wait = min(wait, self.DELETE_QUIET)
            asked = self._checkpoint_due.wait(max(wait, 0))
            self._checkpoint_due.clear()
            if self._stop.is_set():
                break
            if not asked and time.monotonic() < next_round:
                self._delete_superseded_logged()
                continue
            next_round = time.monotonic() + interval
            if self.config.inbox_interval and time.monotonic() >= inbox_due:
                inbox_due = time.monotonic() + self.config.inbox_interval
                self._import_inbox()
            audit = self.opened.audit
            if self.index.pending_records or self.opened.damage_pending is not None \
                    or (audit is not None and audit.pending()):
                try:
                    synced_at = self.index.seq
                    self.objects.sync()
                    with self._lock:
                        self._checkpoint_due.clear()  # this checkpoint is the one asked for
                        if not self.closed:
                            self.checkpoint(delete_later=True, synced_at=synced_at)
                except Exception as exc:  # noqa: BLE001 — the journal keeps the changes
                    log.error("background checkpoint failed: %s", loggable(exc))
                    continue
            self._delete_superseded_logged()  # also what a request's own checkpoint set aside
            if self.config.shred_after:
                self._shred_if_due()

    #: superseded objects left for a pause in the requests at most (an
    #: unmount deletes them all)
    DELETE_BACKLOG = 20000
    #: seconds without file I/O or a burst of requests that make a pause
    DELETE_QUIET = 1.0

    def _delete_superseded_logged(self) -> None:
        try:
            self._delete_superseded()  # file operations go on meanwhile
        except Exception as exc:  # noqa: BLE001 — the next round tries again
            log.error("deleting superseded objects failed: %s", loggable(exc))

    def _delete_superseded(self) -> None:
        """Delete the superseded objects set aside, while requests pause:
        removing an object's file costs the disk about what creating it did
        (measured, issue 17: 0.4 ms of CPU each on this machine's ext4), so
        during an unlink burst the deletions competed with it for the
        cores.  Past DELETE_BACKLOG of them they go regardless."""
        import time
        data = self.data
        data.delete_set_aside(lambda: data.set_aside_count() > self.DELETE_BACKLOG or
                              time.monotonic() - data.last_activity >= self.DELETE_QUIET)

    def _shred_if_due(self) -> None:
        """A shred pass once the first pending deletion is ``shred_after`` old."""
        try:
            with self._lock:
                due = not self.closed and shred_state(self.opened).due(self.config.shred_after)
            if due:
                self.shred_now(wait=False)
        except Exception as exc:  # noqa: BLE001 — the next round tries again
            log.error("shred pass failed: %s", loggable(exc))

    def shred_now(self, wait: bool = True) -> dict:
        """A shred pass (:mod:`dcmfs.opened.shred`) under the core's lock."""
        with self._lock:
            return shred(self.opened, checkpoint=self.checkpoint, wait=wait)

    def move_generation(self, gen: int) -> dict:
        """The index side sealed again under epoch ``gen``
        (:mod:`dcmfs.opened.regen`) under the core's lock: file operations
        wait for it, none fails."""
        with self._lock:
            return move_generation(self.opened, gen, checkpoint=self.checkpoint, wait=False)

    def final_snapshot(self) -> None:
        """At a clean unmount: a shred pass when deletions are pending (its
        snapshot is the only one kept), else a snapshot."""
        if shred_state(self.opened).pending:
            self.shred_now()
        else:
            self.snapshot()

    def _import_inbox(self) -> None:
        """What write-only mounts wrote meanwhile (:mod:`dcmfs.core.importer`)."""
        from .importer import import_inbox
        if self.store.ingest is None or self.read_only:
            return
        try:
            import_inbox(self)
        except Exception as exc:  # noqa: BLE001 — the inbox keeps the files; next round
            log.error("importing the inbox failed: %s", loggable(exc))

    def _audit_sync_loop(self) -> None:
        """A read-only store's checkpoints: the audit trail (and the count
        of folded opens) made durable every ``checkpoint_interval``."""
        while not self._stop.wait(self.config.checkpoint_interval):
            audit = self.opened.audit
            try:
                if audit is not None and audit.unsynced():
                    audit.sync()
            except Exception as exc:  # noqa: BLE001 — the next round tries again
                log.error("syncing the audit trail failed: %s", loggable(exc))
