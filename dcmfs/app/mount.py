"""Mounting, daemonising, unmounting and finding dcmfs mounts.

``mount`` checks everything it can in the calling process (store, key,
mountpoint, libfuse), then forks a daemon that opens the index, mounts and
serves.  The parent returns only once the mount answers, or reports the
daemon's error with its exit code.  The daemon flushes, unmounts and exits 0
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time

from .. import format as fmt
from ..storage.codec import Codecs, warm_up
from ..config import Config
from ..errors import (DcmfsError, MountFailedError, MountpointBusyError, MountpointMissingError,
                     NotMountedError, StoreLockedError)
from ..core.filesystem import FileSystem
from ..index.snapshots import refuse_if_missing
from ..adapter.fuse_ops import require_fuse, serve
from .logsetup import stderr_is_journal
from ..adapter.metrics import MetricsServer, OpStats
from ..storage.header import Secret, open_store, read_lock_pid, refuse_if_damaged

log = logging.getLogger("dcmfs.mount")


@dataclasses.dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    store: str
    fstype: str


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def dcmfs_mounts() -> list[MountInfo]:
    """Every dcmfs mount in this mount namespace (from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 2 and rfields[0] == "fuse.dcmfs":
                out.append(MountInfo(_unescape(fields[4]), _unescape(rfields[1]), rfields[0]))
    return out


def find_mount(mountpoint: str) -> MountInfo | None:
    mp = os.path.realpath(mountpoint)
    for m in dcmfs_mounts():
        if m.mountpoint == mp:
            return m
    return None


def check_mountpoint(mountpoint: str, nonempty: bool = False,
                     store_root: str | None = None) -> str:
    """The absolute mountpoint, checked.  A stale mount of ``store_root``
    itself (its daemon crashed: nobody holds the store lock) is detached,
    so that systemd's Restart= brings a crashed store back."""
    mp = os.path.abspath(mountpoint)
    info = find_mount(mp)
    if (info is not None and store_root is not None and info.store == store_root
            and read_lock_pid(store_root) is None):
        log.warning("detaching the stale mount at %s left by a daemon that died", mp)
        _fusermount(mp)
    try:
        is_dir = os.path.isdir(mp)
    except OSError:
        is_dir = False
    if find_mount(mp) is not None or os.path.ismount(mp):
        raise MountpointBusyError(f"{mp} is already a mountpoint; unmount it first "
                                  f"('dcmfs umount {mp}').")
    if not is_dir:
        try:
            os.stat(mp)
        except OSError as exc:
            if exc.errno == 107:  # ENOTCONN: a dead FUSE mount
                raise MountpointBusyError(f"{mp} is a stale mount whose daemon died; run "
                                          f"'dcmfs umount {mp}' first.") from exc
        raise MountpointMissingError(f"The mountpoint {mp} does not exist or is not a "
                                     f"directory; create it with 'mkdir -p {mp}'.")
    if os.listdir(mp) and not nonempty:
        raise MountpointBusyError(f"The mountpoint {mp} is not empty and the mount would hide "
                                  "its files; empty it or pass '-o nonempty'.")
    return mp


def _notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def status_line(live: dict) -> str:
    """The one-line STATUS= systemd shows in ``systemctl status``."""
    logical, stored = live.get("logical_bytes", 0), live.get("stored_bytes", 0)
    ratio = f"{stored / logical:.3f}" if logical else "-"
    return (f"{live.get('files', 0)} files, {logical / 1e9:.2f} GB logical, ratio {ratio}, "
            f"backlog {live.get('backlog_files', 0)} files")


class _StatusReporter(threading.Thread):
    """Sends STATUS= with live figures every ``interval`` seconds while
    mounted, and while closing says in the log what it still waits for (so a
    stop that runs into TimeoutStopSec leaves a reason in the journal)."""

    def __init__(self, fs: FileSystem, interval: float) -> None:
        super().__init__(name="dcmfs-status", daemon=True)
        self.fs = fs
        self.interval = interval
        self.stop = threading.Event()
        self.closing_since: float | None = None

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            if self.closing_since is not None:
                log.warning("still closing after %.0f s: committing open files and the index "
                            "journal (%s)", time.monotonic() - self.closing_since,
                            self._figures())
                continue
            try:
                _notify(f"STATUS={status_line(self.fs.live_status())}")
            except Exception as exc:  # noqa: BLE001 — a status line must not stop the daemon
                log.debug("no live status: %s", exc)

    def _figures(self) -> str:
        try:
            r = self.fs.reencoder
            return (f"{self.fs.index.pending_records} journal records, "
                    f"re-encoder backlog {r.backlog[0] if r else 0} files")
        except Exception:  # noqa: BLE001 — closing underneath us
            return "figures unavailable"


def run_daemon(store_root: str, secret: Secret, mountpoint: str, config: Config,
               fuse_options: dict, on_ready=None, metrics: str | None = None,
               status_interval: float = 5.0) -> None:
    """Open the store, serve the mount until it ends, close cleanly."""
    store = open_store(store_root, secret, for_writing=not config.read_only)
    fs = FileSystem(store, config)
    # the first read of a DICOM-coded file need not wait for the codecs to load
    threading.Thread(target=warm_up, daemon=True, name="dcmfs-warm-up").start()
    if fs.recovered is not None:
        r = fs.recovered
        log.warning("recovered after an unclean shutdown: %d temp files, %d orphan inodes, "
                    "%d unreferenced objects removed", r.temp_files, r.orphan_inodes,
                    r.unreferenced_objects)
    ops = OpStats()
    server = reporter = None
    try:
        if metrics:
            try:
                server = MetricsServer(metrics, ops, fs.live_status)
            except (OSError, ValueError) as exc:
                raise MountFailedError(f"The metrics endpoint {metrics} cannot be opened "
                                       f"({exc}); choose a free HOST:PORT.") from exc
        reporter = _StatusReporter(fs, status_interval)

        def ready() -> None:
            log.info("mounted store %s at %s (pid %d)", store.root, mountpoint, os.getpid())
            _notify(f"READY=1\nSTATUS=mounted at {mountpoint}; {status_line(fs.live_status())}"
                    f"\nMAINPID={os.getpid()}")
            reporter.start()
            if on_ready is not None:
                on_ready()

        serve(fs, mountpoint, fuse_options, ready, ops)
    finally:
        _notify("STOPPING=1\nSTATUS=unmounted; committing open files and the index")
        log.info("unmounted %s; closing the store", mountpoint)
        started = time.monotonic()
        if reporter is not None:
            reporter.closing_since = started
        if server is not None:
            server.close()
        try:
            fs.close()
        finally:
            if reporter is not None:
                reporter.stop.set()
        log.info("store %s closed cleanly in %.1f s", store.root, time.monotonic() - started)


def mount(store_root: str, secret: Secret, mountpoint: str, config: Config,
          fuse_options: dict, foreground: bool, log_file: str | None,
          metrics: str | None = None) -> None:
    """Mount a store; returns once the mount is live (or, with
    ``foreground``, once it has been unmounted again)."""
    store_root = os.path.abspath(store_root)
    open_store(store_root, secret)  # wrong key, missing or foreign store: fail here
    refuse_if_missing(store_root)
    if not config.read_only:
        refuse_if_damaged(store_root)
        if config.dicom:  # the re-encoder's image codecs must be there
            Codecs.of(config).check_image_codecs()
    pid = read_lock_pid(store_root)
    if pid is not None:
        raise StoreLockedError(f"The store {store_root} is already in use by dcmfs pid {pid}.")
    options = dict(fuse_options)
    mp = check_mountpoint(mountpoint, nonempty=bool(options.pop("nonempty", False)),
                          store_root=store_root)
    require_fuse()
    if foreground:
        run_daemon(store_root, secret, mp, config, options, metrics=metrics)
        return
    _spawn(store_root, secret, mp, config, options, log_file, metrics)


def _spawn(store_root, secret, mp, config, options, log_file, metrics) -> None:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        code = 0
        try:
            os.setsid()
            # under systemd (a .mount unit runs mount(8) with stderr on the
            # journal) the daemon keeps logging there; elsewhere to a file
            _detach(None if log_file is None and stderr_is_journal()
                    else log_file or os.path.join(store_root, fmt.LOG_NAME))
            run_daemon(store_root, secret, mp, config, options,
                       on_ready=lambda: os.write(wfd, b"R"), metrics=metrics)
        except DcmfsError as exc:
            log.error("%s", exc)
            _report(wfd, exc.exit_code, str(exc))
            code = exc.exit_code
        except BaseException as exc:  # noqa: BLE001 — the parent must hear of it
            log.exception("daemon failed")
            _report(wfd, MountFailedError.exit_code, f"the daemon failed: {exc!r}")
            code = MountFailedError.exit_code
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    data = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
        if data.startswith(b"R"):
            break
    os.close(rfd)
    if data.startswith(b"R"):
        os.stat(mp)  # blocks until the kernel's INIT exchange is done
        return
    os.waitpid(pid, 0)
    if data.startswith(b"E"):
        code, _, message = data[1:].decode(errors="replace").partition("\n")
        err = MountFailedError(message)
        err.exit_code = int(code)
        raise err
    raise MountFailedError(f"The dcmfs daemon exited before the mount came up; see "
                           f"{log_file or os.path.join(store_root, fmt.LOG_NAME)}.")


def _report(wfd: int, code: int, message: str) -> None:
    try:
        os.write(wfd, f"E{code}\n{message}".encode())
    except OSError:
        pass


def _detach(log_file: str | None) -> None:
    """Point stdin/stdout of the daemon at /dev/null and its log at
    ``log_file`` (None: stderr stays, it is the journal)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    if log_file is None:
        return
    logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(logfd, 2)
    os.close(logfd)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def umount(mountpoint: str, timeout: float = 300.0) -> None:
    """Flush, unmount and wait for the daemon to exit.

    Raises
    ------
    NotMountedError
        ``mountpoint`` is not a dcmfs mount.
    """
    info = find_mount(mountpoint)
    if info is None:
        raise NotMountedError(f"{os.path.abspath(mountpoint)} is not a dcmfs mountpoint.")
    pid = read_lock_pid(info.store)
    if pid is None:
        # the daemon is gone: only a stale kernel mount is left
        _fusermount(info.mountpoint)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_lock_pid(info.store) is None and find_mount(info.mountpoint) is None:
            return
        time.sleep(0.05)
    raise MountFailedError(f"The daemon (pid {pid}) did not finish unmounting "
                           f"{info.mountpoint} within {timeout:.0f} s; see its log.")


def _fusermount(mp: str) -> None:
    import subprocess
    subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
