"""The de-identified view as a mount: instead of the files (``--view deid``,
``-o view=deid``) or beside them (``-o view_mount=PATH``), served by the
same read-write daemon at a second mountpoint.

Beside the files, one daemon holds the store's lock, index, caches and
re-encoder for both mounts: a file written through the normal mount gets
its view record from the daemon's record filler once it is written (and
re-encoded) and appears in the view then; nothing is opened twice.  A
second, read-only process could not follow the writer safely (it would see
the index only as of the writer's last checkpoint, read objects the
re-encoder is replacing and, on S3, miss objects that are still in the
writer's cache), and would cost a second Python with its own parser
workers (docs/cli.md gives the figures).

The view's FUSE loop runs in a thread of its own and is mounted before the
main one (libfuse's signal handlers then belong to the main session, see
:func:`dcmfs.adapter.fuse_ops.serve`).  The main mount's end (SIGTERM,
``dcmfs umount MAIN``) detaches the view; ``dcmfs umount VIEW`` detaches
only the view, the files stay mounted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import threading
import time

from .. import format as fmt
from ..adapter.fuse_ops import serve
from ..adapter.metrics import OpStats
from ..errors import MountFailedError, UsageError
from . import keys

log = logging.getLogger("dcmfs.mount")

#: seconds the view's mount may take to come up
READY_TIMEOUT = 60.0


def view_settings(args, ours: dict, config, fuse: dict, secret):
    """The view's part of ``dcmfs mount``: (config, FUSE options, the view's
    secret or None, the view's mountpoint or None)."""
    view_mount = ours.get("view_mount")
    if not (args.view or config.view or view_mount):
        return config, fuse, None, None
    if view_mount and (args.view or config.view):
        raise UsageError("Choose one: --view deid serves the view instead of the files, "
                         "-o view_mount=PATH beside them.")
    path = args.view_secret_file or ours.get("view_secret_file")
    if not path:
        raise UsageError("A view needs its secret: pass --view-secret-file PATH (create "
                         "one with 'dcmfs new-view-secret PATH').")
    secret_bytes = keys.view_secret(path, getattr(args, "allow_open_key_file", False),
                                    secret.value if secret.kind == "keyfile" else None)
    if view_mount:
        if config.read_only:
            raise UsageError("-o view_mount serves the view beside a read-write mount; for "
                             "the view alone use --view deid.")
        return config, fuse, secret_bytes, os.path.abspath(view_mount)
    config = dataclasses.replace(config, view=args.view or config.view)
    return config, dict(fuse, ro=True), secret_bytes, None  # the kernel refuses changes


def deid_view(fs, config, secret: bytes | None):
    """The view of an opened store, its tree built (the store is closed if
    that fails)."""
    from ..core.deidview import DeidView, ViewKeys, ViewOptions
    try:
        view = DeidView(fs, ViewKeys(secret or b""), ViewOptions(
            config.deid_dates, config.deid_characteristics, config.deid_device,
            config.deid_burned_in, config.deid_safe_private))
        view.build()
    except BaseException:
        fs.close()
        raise
    return view


class AlongsideView:
    """The view served by the read-write daemon at a second mountpoint."""

    def __init__(self, fs, config, secret: bytes, mountpoint: str, main: str,
                 fuse_options: dict) -> None:
        self.mountpoint = mountpoint
        self.options = dict(fuse_options, ro=True)
        self.view = deid_view(fs, config, secret)
        self.view.alongside = main
        self._ready = threading.Event()
        self._connection: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="dcmfs-view-mount",
                                        daemon=True)

    def _serve(self) -> None:
        try:
            serve(self.view, self.mountpoint, self.options, self._ready.set, OpStats(),
                  primary=False)
        except BaseException as exc:  # noqa: BLE001 — start() reports it
            self._error = exc
        log.info("the de-identified view at %s is unmounted", self.mountpoint)

    def start(self) -> None:
        """Mount the view; returns once it answers."""
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MountFailedError(
                    f"The de-identified view could not be mounted at {self.mountpoint} "
                    f"({self._error or 'no answer'}); see the daemon's log.")
        try:  # the view's FUSE connection (to end it, should a file of it stay open)
            self._connection = os.minor(os.stat(self.mountpoint).st_dev)
        except OSError:
            self._connection = None
        log.info("de-identified view mounted at %s", self.mountpoint)

    def stop(self) -> None:
        """Detach the view (the main mount has ended) and close it; the
        store stays open for the caller to close."""
        if self._thread.is_alive():
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False,
                           capture_output=True)
            self._thread.join(10)
        if self._thread.is_alive():  # a view file still open: end its FUSE connection
            _abort(self._connection)
            self._thread.join(10)
        self.view.close(store=False)


def _abort(connection: int | None) -> None:
    if connection is None:
        return
    try:
        with open(f"/sys/fs/fuse/connections/{connection}/abort", "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("the view's FUSE connection could not be ended: %s", exc.strerror)


def status_in_thread(mountpoint: str, timeout: float) -> object:
    """The daemon's status document of ``mountpoint`` (parsed JSON), asked in
    a thread so that a hung daemon cannot hang the caller (umount): None if
    it did not answer within ``timeout`` (at most 30 s) or not as JSON."""
    result: list = []

    def ask() -> None:
        try:
            result.append(json.loads(os.getxattr(mountpoint, fmt.STATUS_XATTR)))
        except (OSError, ValueError):
            result.append(None)

    t = threading.Thread(target=ask, daemon=True, name="dcmfs-umount-ask")
    t.start()
    t.join(min(timeout, 30.0))
    return result[0] if result else None


def umount_alongside(info, timeout: float) -> bool:
    """``dcmfs umount VIEW`` of a view served beside the files: detach it
    (the daemon goes on serving the files); False if ``info`` is not such a
    view."""
    status = status_in_thread(info.mountpoint, timeout)
    if not isinstance(status, dict) or not (status.get("deid_view") or {}).get("alongside"):
        return False
    r = subprocess.run(["fusermount3", "-u", info.mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        raise MountFailedError(f"The view at {info.mountpoint} could not be unmounted "
                               f"({r.stderr.strip() or r.returncode}); is a file of it open?")
    return True
