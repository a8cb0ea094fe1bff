"""Key operations in the sealed audit trail (``dcmfs key add|remove|change|
rotate [--finish]``): one ``key`` record per change, by this process (uid,
gid, pid, process name), with the action, slot id, its kind and label, the
authorising slot's id and kind, epochs; never a secret.

Whoever holds the store lock owns the trail: a mounted store's daemon is
asked through its control attribute (``key {JSON}``; it checks the change
against the store's authentic header, then records it as the caller's); an
unmounted store's trail is appended to here, under the store lock, taken
before the header is changed and held until the record is durable.  A store
open in another process that is not a mount (fsck, verify, recompress)
refuses the change: nothing would record it.

A record that cannot be written (a daemon mounted with ``-o audit=0``
records nothing; read-only media) is a warning, never a failure: the key
change is made by then, and ``STORE/dcmfs.log`` holds it too.
"""

from __future__ import annotations

import json
import logging
import os

from .. import format as fmt
from ..errors import DcmfsError, StoreLockedError
from ..storage.header import StoreLock

log = logging.getLogger("dcmfs")


class KeyRecord:
    """The route of one key change's record (a context manager): the store
    lock, or the mounted daemon."""

    def __init__(self, store_root: str) -> None:
        from .admin import mountpoint_of
        self.root = store_root
        self.lock: StoreLock | None = None
        self.mountpoint: str | None = None
        try:
            self.lock = StoreLock(store_root)
        except StoreLockedError as exc:
            self.mountpoint = mountpoint_of(store_root)
            if self.mountpoint is None:
                raise StoreLockedError(
                    f"The store {store_root} is open in another dcmfs process that is not a "
                    "mount (fsck, verify, recompress); try again when it is done.") from exc

    def __enter__(self) -> "KeyRecord":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def record(self, report: dict) -> None:
        """Record the change ``report`` describes (what :mod:`dcmfs.storage.keyring`
        filled in; its ``master`` and ``store_id`` seal an unmounted store's
        record and are not part of it)."""
        fields = {k: v for k, v in report.items()
                  if k not in ("master", "store_id", "keys", "master_epoch")}
        try:
            if self.mountpoint is not None:
                from .admin import _xattr
                _xattr(self.mountpoint, fmt.CONTROL_XATTR,
                       b"key " + json.dumps(fields, separators=(",", ":")).encode())
            else:
                self._append(self._index_key(report), report["store_id"], fields,
                             tuple(report.get("keys", {}).values()))
        except (DcmfsError, OSError) as exc:
            log.warning("the audit trail could not record the key change (%s): %s",
                        fields.get("action"), exc)

    def _index_key(self, report: dict) -> bytes:
        """The key of the index (and so of the trail): the report's master,
        or the epoch the index names (:mod:`dcmfs.index.keygen`)."""
        if "keys" not in report:
            return report["master"]
        from ..index import keygen
        return keygen.key_for(os.path.join(self.root, fmt.INDEX_DIR), report["keys"],
                              report["master_epoch"])[1]

    def _append(self, master: bytes, store_id: bytes, fields: dict, older: tuple = ()) -> None:
        from ..audit.check import index_head
        from ..audit.trail import AuditTrail
        head = index_head(self.root, master, store_id)
        trail = AuditTrail(self.root, master, store_id, head if isinstance(head, dict) else None,
                           older=older)
        try:
            trail.record("key", None, **fields)
        finally:
            trail.close()
