"""``dcmfs mount -o recipient=FILE STORE MNT``: a write-only ingest mount.

No key is asked or held: the daemon has the store's recipient public key
only (the file ``dcmfs key recipient STORE --export FILE`` wrote) and serves
:class:`dcmfs.core.ingest.IngestFS`.  It does not take the store lock (a key
holder may have the store mounted meanwhile) and touches nothing of the
store but its own session directory under ``STORE/inbox/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..adapter.fuse_ops import require_fuse, serve
from ..core.ingest import IngestFS
from ..errors import SecretError, UsageError
from ..storage import inbox
from ..storage.header import read_header
from . import s3creds
from .keys import forbid_core_dumps
from .options import make_config

log = logging.getLogger("dcmfs")


def load_recipient(path: str, store_root: str) -> inbox.Recipient:
    """The recipient in ``path``, checked against the store's header (its
    id and recipient public key: a file for another store is refused).

    Raises
    ------
    SecretError
        Not a recipient file, or not this store's.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as exc:
        raise SecretError(f"The recipient file {path} cannot be read ({exc.strerror}).") from exc
    recipient = inbox.Recipient.from_json(data, path)
    header = read_header(store_root)
    entry = header.get("ingest")
    if (recipient.store_id.hex() != header["store_id"] or entry is None
            or entry.get("public") != recipient.public.hex()):
        raise SecretError(f"The recipient file {path} is not the recipient of the store at "
                          f"{store_root} (another store, or its recipient was never made "
                          "there): export it again with 'dcmfs key recipient'.")
    return recipient


def cmd_ingest(args, ours: dict, fuse: dict, inst) -> int:
    from .mount import _spawn, check_mountpoint
    store_root = os.path.abspath(args.store or (inst.store if inst else ""))
    mp_arg = args.mountpoint or (inst.mountpoint if inst else None)
    if not args.store or not mp_arg:
        raise UsageError("A write-only mount needs STORE and MOUNTPOINT.")
    if ours.get("key_file") or getattr(args, "key_file", None) or args.view:
        raise UsageError("A write-only mount (-o recipient=) takes no key and no view.")
    recipient = load_recipient(ours["recipient"], store_root)
    config = dataclasses.replace(make_config(ours, fuse), s3=s3creds.settings(args))
    options = dict(fuse)
    nonempty = bool(options.pop("nonempty", False))
    mp = check_mountpoint(mp_arg, nonempty=nonempty, store_root=store_root)
    require_fuse()

    def runner(store, mountpoint, config, options, on_ready=None, **_):
        run_ingest(store_root, recipient, mountpoint, config, options, on_ready)

    if args.foreground:
        run_ingest(store_root, recipient, mp, config, options)
        return 0
    _spawn(type("IngestStore", (), {"root": store_root})(), mp, config, options,
           ours.get("log_file"), None, runner=runner)
    print(f"Mounted {store_root} write-only at {mp}. Unmount with: dcmfs umount {mp}")
    return 0


def run_ingest(store_root: str, recipient: inbox.Recipient, mountpoint: str, config,
               options: dict, on_ready=None) -> None:
    forbid_core_dumps()
    fs = IngestFS(store_root, recipient, config)
    try:
        def ready() -> None:
            log.info("mounted store %s write-only at %s (pid %d)", store_root, mountpoint,
                     os.getpid())
            if on_ready is not None:
                on_ready()
        serve(fs, mountpoint, options, ready)
    finally:
        fs.close()
        log.info("write-only mount of %s closed", store_root)


def umount_write_only(info, timeout: float) -> bool:
    """``dcmfs umount`` of a write-only mount (False if ``info`` is not one):
    its daemon is signalled once proven - the mount names its pid and
    session, the kernel names that pid as holding the session's lock, and
    its command line is dcmfs's - and waited for.

    Raises
    ------
    DaemonUnprovenError
        The proof fails; nothing was signalled.
    """
    import signal
    import time
    from ..errors import DaemonUnprovenError, MountFailedError
    from ..storage.header import lock_holders
    from .mount import _not_the_daemon, find_mount
    if not any(lock_holders(d) for _, d in inbox.sessions(info.store)):
        return False  # no write-only mount of this store runs: do not ask
    from .viewmount import status_in_thread
    status = status_in_thread(info.mountpoint, timeout)
    session = status.get("write_only", {}).get("session") if isinstance(status, dict) else None
    if not isinstance(session, str) or len(session) != 32 or \
            not all(c in "0123456789abcdef" for c in session):
        return False
    sdir = os.path.join(info.store, inbox.INBOX_DIR, session)
    pid = status.get("pid")
    try:
        pidfd = os.pidfd_open(int(pid))
    except (OSError, TypeError, ValueError) as exc:
        raise DaemonUnprovenError(f"The write-only daemon of {info.mountpoint} cannot be "
                                  "signalled (gone?); nothing was signalled.") from exc
    try:
        why = _not_the_daemon(int(pid), sdir, None)
        if why:
            raise DaemonUnprovenError(f"Process {pid} is not proven to be the write-only "
                                      f"daemon of {info.mountpoint} ({why}); nothing was "
                                      "signalled.")
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(pid) not in (lock_holders(sdir) or set()) and find_mount(info.mountpoint) is None:
            return True
        time.sleep(0.05)
    raise MountFailedError(f"The write-only daemon (pid {pid}) did not finish unmounting "
                           f"{info.mountpoint} within {timeout:.0f} s; see its log.")
