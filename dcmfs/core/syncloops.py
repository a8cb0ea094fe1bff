"""The filesystem core's background checkpoint loops (a mixin of
:class:`~dcmfs.core.filesystem.FileSystem`): objects synced before the core's
lock is taken, superseded objects deleted after it is let go."""

from __future__ import annotations

import logging

from ..errors import loggable
from ..opened.shred import shred, shred_state

log = logging.getLogger("dcmfs.fs")


class SyncLoops:
    """``_sync_loop`` of a read-write opening, ``_audit_sync_loop`` of a
    read-only one (each runs in the thread ``dcmfs-checkpoint``)."""

    def _sync_loop(self) -> None:
        """Checkpoint every ``checkpoint_interval`` seconds while there are changes.

        The objects are flushed before the lock is taken, so file operations
        wait only for the short index commit.
        """
        import time
        inbox_due = time.monotonic() + self.config.inbox_interval
        while not self._stop.wait(self.config.checkpoint_interval):
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
                        if not self.closed:
                            self.checkpoint(delete_later=True, synced_at=synced_at)
                    self.data.delete_set_aside()  # file operations go on meanwhile
                except Exception as exc:  # noqa: BLE001 — the journal keeps the changes
                    log.error("background checkpoint failed: %s", loggable(exc))
                    continue
            if self.config.shred_after:
                self._shred_if_due()

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
