"""Mounting, daemonising, unmounting and finding dcmfs mounts.

``mount`` checks everything it can in the calling process (store, key,
mountpoint, libfuse), then forks a daemon that opens the index, mounts and
serves.  The parent returns only once the mount answers, or reports the
daemon's error with its exit code.  The daemon flushes, unmounts and exits 0
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from .. import format as fmt
from ..storage.codec import warm_up
from ..config import Config
from ..errors import (DaemonUnprovenError, DcmfsError, MountFailedError, MountpointBusyError,
                      MountpointMissingError, NotMountedError, StoreIOError)
from ..core.filesystem import FileSystem
from ..adapter.fuse_ops import require_fuse, serve
from .keys import forbid_core_dumps, limit_malloc_arenas
from .viewmount import AlongsideView, deid_view, umount_alongside
from .logsetup import stderr_is_journal
from ..adapter.metrics import MetricsServer, OpStats
from ..opened.store import OpenedStore, preflight
from ..storage.header import (Secret, Store, lock_file_pid, lock_holders, open_store,
                              read_lock_pid)

log = logging.getLogger("dcmfs.mount")


@dataclasses.dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    store: str
    fstype: str
    #: the superblock options (FUSE: ``user_id=``, ``group_id=``, ...)
    super_options: str = ""

    @property
    def user_id(self) -> int | None:
        """The uid of the process that mounted it (FUSE's ``user_id=``)."""
        for item in self.super_options.split(","):
            if item.startswith("user_id=") and item[8:].isdigit():
                return int(item[8:])
        return None


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
                out.append(MountInfo(_unescape(fields[4]), _unescape(rfields[1]), rfields[0],
                                     rfields[2] if len(rfields) >= 3 else ""))
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


def run_daemon(store: Store, mountpoint: str, config: Config,
               fuse_options: dict, on_ready=None, metrics: str | None = None,
               status_interval: float = 5.0, view_secret: bytes | None = None,
               view_mount: str | None = None) -> None:
    """Open the store (checked by :func:`mount`), serve the mount until it
    ends, close cleanly.  With ``config.view`` the de-identified view is
    served instead of the files (``view_secret``: its secret), with
    ``view_mount`` beside them at that mountpoint (:mod:`.viewmount`)."""
    forbid_core_dumps()  # the master key is in this process (also when -f)
    limit_malloc_arenas()
    fs = FileSystem(OpenedStore(store, config, checked=True))
    trail = fs.opened.audit
    if trail is not None:
        trail.record("mount", None, mountpoint=mountpoint, key=store.unlocked_by or "unknown",
                     options=_changed_options(config, fuse_options))
    served, alongside = fs, None
    if config.view:
        served = deid_view(fs, config, view_secret)
    elif view_mount:
        try:
            alongside = AlongsideView(fs, config, view_secret, view_mount, mountpoint,
                                      fuse_options)
        except BaseException:
            fs.close()
            raise
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

        if alongside is not None:
            alongside.start()  # first: libfuse's signal handlers then go to the main mount
        serve(served, mountpoint, fuse_options, ready, ops)
    finally:
        _notify("STOPPING=1\nSTATUS=unmounted; committing open files and the index")
        log.info("unmounted %s; closing the store", mountpoint)
        started = time.monotonic()
        if reporter is not None:
            reporter.closing_since = started
        if server is not None:
            server.close()
        trail = fs.opened.audit  # a new one after a key generation move
        if trail is not None:
            trail.record("unmount", None, mountpoint=mountpoint)
        try:
            if alongside is not None:
                alongside.stop()
            served.close()
        finally:
            if reporter is not None:
                reporter.stop.set()
        log.info("store %s closed cleanly in %.1f s", store.root, time.monotonic() - started)


def _changed_options(config: Config, fuse_options: dict) -> dict:
    """The options of a mount that differ from the defaults (audit record)."""
    out = {k: v for k, v in fuse_options.items() if isinstance(v, (bool, int, float, str))}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (bool, int, float, str)) and value != f.default:
            out[f.name] = value
    return out


def mount(store_root: str, secret: Secret, mountpoint: str, config: Config,
          fuse_options: dict, foreground: bool, log_file: str | None,
          metrics: str | None = None, view_secret: bytes | None = None,
          view_mount: str | None = None) -> None:
    """Mount a store; returns once the mount is live (or, with
    ``foreground``, once it has been unmounted again); ``view_mount``: the
    de-identified view beside it there."""
    store_root = os.path.abspath(store_root)
    # wrong key, missing, foreign, damaged or busy store: fail here, before
    # the fork; the daemon opens the store checked here (the key is
    # unwrapped once)
    store = open_store(store_root, secret, for_writing=not config.read_only)
    preflight(store, config)
    options = dict(fuse_options)
    nonempty = bool(options.pop("nonempty", False))
    mp = check_mountpoint(mountpoint, nonempty=nonempty, store_root=store_root)
    if view_mount:
        view_mount = check_mountpoint(view_mount, nonempty=nonempty, store_root=store_root)
        if view_mount == mp:
            raise MountpointBusyError("The view needs a mountpoint of its own.")
    require_fuse()
    if foreground:
        run_daemon(store, mp, config, options, metrics=metrics, view_secret=view_secret,
                   view_mount=view_mount)
        return
    _spawn(store, mp, config, options, log_file, metrics, view_secret, view_mount)


def _spawn(store, mp, config, options, log_file, metrics, view_secret=None,
           view_mount=None, runner=None) -> None:
    store_root = store.root
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
                    else log_file or os.path.join(store_root, fmt.LOG_NAME),
                    in_store=log_file is None)
            (runner or run_daemon)(store, mp, config, options,
                                   on_ready=lambda: os.write(wfd, b"R"), metrics=metrics,
                                   view_secret=view_secret, view_mount=view_mount)
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


def _detach(log_file: str | None, in_store: bool = False) -> None:
    """Point stdin/stdout of the daemon at /dev/null and its log at
    ``log_file`` (None: stderr stays, it is the journal; ``in_store``: the
    store's own ``dcmfs.log``)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    if log_file is None:
        return
    # the store's own log is never followed through a symlink (whoever can
    # write the store must not make a root daemon append to another file);
    # one the admin named (-o log_file=) may be one, /dev/stderr say
    try:
        logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                        | (os.O_NOFOLLOW if in_store else 0), 0o600)
    except OSError as exc:
        raise StoreIOError(f"The log file {log_file} cannot be opened ({exc.strerror}); "
                           "remove it if it is a symlink, or choose one with -o "
                           "log_file=.") from exc
    os.dup2(logfd, 2)
    os.close(logfd)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def umount(mountpoint: str, timeout: float = 300.0) -> None:
    """Flush, unmount and wait for the daemon to exit.

    Only a process proven to be the daemon of that mount is signalled
    (:func:`proven_daemon`); the pid in the lock file is a hint anyone who
    can write the store can change, and is never signalled on its word.

    Raises
    ------
    NotMountedError
        ``mountpoint`` is not a dcmfs mount.
    DaemonUnprovenError
        No process could be proven to be its daemon; nothing was signalled.
    """
    info = find_mount(mountpoint)
    if info is None:
        raise NotMountedError(f"{os.path.abspath(mountpoint)} is not a dcmfs mountpoint.")
    from .ingestmount import umount_write_only
    if umount_write_only(info, timeout):  # a write-only mount: no store lock
        return
    if read_lock_pid(info.store) is None:
        # the daemon is gone: only a stale kernel mount is left
        _fusermount(info.mountpoint)
        return
    if umount_alongside(info, timeout):  # a view beside the files: the files stay
        return
    pidfd, pid = proven_daemon(info, wait=min(timeout, 30.0))
    try:
        named = lock_file_pid(info.store)
        if named is not None and named != pid:
            log.warning("the lock file of %s names pid %d, which is not the daemon of %s "
                        "(pid %d); only the daemon is signalled", info.store, named,
                        info.mountpoint, pid)
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in (lock_holders(info.store) or set()) and find_mount(info.mountpoint) is None:
            return
        time.sleep(0.05)
    raise MountFailedError(f"The daemon (pid {pid}) did not finish unmounting "
                           f"{info.mountpoint} within {timeout:.0f} s; see its log.")


def proven_daemon(info: MountInfo, wait: float = 30.0) -> tuple[int, int]:
    """(a pidfd, the pid) of the process proven to be the daemon of this mount.

    The proof: the mount itself names the process that answers it (the
    ``pid`` of its status attribute; a caller the mount refuses, such as
    root on another user's mount without ``allow_root``, or a daemon of an
    older dcmfs whose status has no pid, takes the lock's holder and
    requires it to run as the user who mounted it), the kernel
    names that process as holding the ``flock`` on the store's lock file,
    and its command line is dcmfs's.  The pidfd is opened before the checks,
    so the pid cannot be reused by another process before it is signalled.

    Raises
    ------
    DaemonUnprovenError
        Any part of the proof is missing.
    """
    store, mp = info.store, info.mountpoint
    answer, pid_or_why = _mount_answers(mp, wait)
    if answer == "pid":
        pid = pid_or_why
    elif answer == "refused":
        holders = (lock_holders(store) or set()) - {0}
        if len(holders) != 1:
            raise DaemonUnprovenError(f"The mount at {mp} does not name its daemon to you and "
                                      f"the lock of {store} has no single holder; nothing was "
                                      "signalled (unmount it as its owner or with 'umount').")
        pid = holders.pop()
    else:
        raise DaemonUnprovenError(f"The mount at {mp} does not say which process serves it "
                                  f"({pid_or_why}), so its daemon cannot be proven and nothing "
                                  f"was signalled; if it hangs, stop it yourself or detach the "
                                  f"mount with 'fusermount3 -u -z {mp}'.")
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise DaemonUnprovenError(f"The daemon of {mp} (pid {pid}) is gone or cannot be "
                                  f"signalled ({exc.strerror}); nothing was signalled.") from exc
    try:
        why = _not_the_daemon(pid, store, None if answer == "pid" else info.user_id)
        if why:
            raise DaemonUnprovenError(f"Process {pid} is not proven to be the dcmfs daemon of "
                                      f"{mp} ({why}); nothing was signalled.")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd, pid


def _mount_answers(mp: str, wait: float) -> tuple[str, int | str | None]:
    """("pid", the pid the mount's status attribute names), ("refused",
    None) when the mount refuses the caller (or answers without a pid: a
    daemon of an older dcmfs), or ("none", why there is no answer).  Asked
    in a thread: a hung daemon must not hang ``umount``."""
    result: list = []

    def ask() -> None:
        try:
            result.append(("pid", int(json.loads(os.getxattr(mp, fmt.STATUS_XATTR))["pid"])))
        except PermissionError:
            result.append(("refused", None))
        except OSError as exc:
            result.append(("none", exc.strerror or str(exc.errno)))
        except (ValueError, KeyError, TypeError):  # a daemon of an older dcmfs
            result.append(("refused", None))

    t = threading.Thread(target=ask, name="dcmfs-umount-ask", daemon=True)
    t.start()
    t.join(wait)
    return result[0] if result else ("none", f"no answer within {wait:.0f} s")


def _not_the_daemon(pid: int, store: str, user_id: int | None) -> str:
    """Why ``pid`` is not proven to be the dcmfs daemon of ``store`` ('' if it is)."""
    holders = lock_holders(store)
    if holders is None:
        return "the kernel's lock table (/proc/locks) cannot be read"
    if pid not in holders:
        return f"it does not hold the lock of {store}"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/status", "rb") as f:
            real = next((int(line.split()[1]) for line in f if line.startswith(b"Uid:")), -1)
    except (OSError, ValueError, IndexError):
        return "its /proc entry cannot be read"
    if not any(b"dcmfs" in os.path.basename(a) for a in argv):
        return "its command line is not dcmfs's"
    if user_id is not None and real != user_id:
        return f"it runs as uid {real}, the mount belongs to uid {user_id}"
    return ""


def _fusermount(mp: str) -> None:
    import subprocess
    subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
