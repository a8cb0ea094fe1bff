"""A mounted daemon among the other processes and users of the machine
(issue 15, the small ones): it dumps no core, its status, stats and ops
attributes answer root and the mount's owner only, the ``user.dcmfs.``
prefix is reserved, and ``dcmfs umount`` signals only a process proven to
be the daemon of that mount."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from dcmfs import errors as E

from .conftest import Mount

NOBODY = 65534


def as_user(uid: int, fn):
    """Run ``fn()`` in a child process that gave up root for ``uid``; its
    result, or ("errno", n) for an OSError.  (A fork, not a new interpreter:
    this one lives under /root, which nobody may enter.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = ["ok", fn()]
            except OSError as exc:
                out = ["errno", exc.errno]
            if isinstance(out[1], bytes):
                out[1] = out[1].decode("latin-1")
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return tuple(json.loads(data))


@pytest.fixture
def shared_mount():
    """A root-owned mount with allow_other, where another user can reach it
    (pytest's tmp_path is private to root)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-users-", dir="/tmp"))
    base.chmod(0o755)
    m = Mount(base)
    try:
        m.init()
        m.mount("-o", "allow_other")
        yield m
    finally:
        m.cleanup()
        log = m.log()
        shutil.rmtree(base, ignore_errors=True)
    assert "Traceback" not in log and " ERROR" not in log, log


# --- 6: the admin's attributes, the reserved prefix ---------------------------------------
def test_status_stats_and_ops_answer_only_root_and_the_owner(shared_mount):
    m = shared_mount
    (m.mnt / "f").write_bytes(b"x" * 1000)
    mp = str(m.mnt)
    assert as_user(NOBODY, lambda: os.listdir(mp)) == ("ok", ["f"])  # allow_other works
    for name in ("user.dcmfs.status", "user.dcmfs.stats", "user.dcmfs.ops",
                 "user.dcmfs.verify"):
        assert as_user(NOBODY, lambda: os.getxattr(mp, name)) == ("errno", errno.EACCES), name
        assert os.getxattr(mp, name)  # root
    assert as_user(NOBODY, lambda: os.setxattr(mp, "user.dcmfs.control", b"pause")) == \
        ("errno", errno.EACCES)
    status = json.loads(m.cli("status", m.mnt, "--json", check=True).stdout)  # as root
    assert status["mounted"] and status["files"] == 1 and "backlog_files" in status
    assert status["pid"] == m.daemon_pid() and "ops" in status


def test_the_user_dcmfs_prefix_is_reserved(shared_mount):
    m = shared_mount
    f = m.mnt / "f"
    f.write_bytes(b"data")
    os.setxattr(f, "user.note", b"kept")  # ordinary attributes work as before
    for path, name in ((f, "user.dcmfs.mine"), (f, "user.dcmfs.status"), (f, "user.dcmfs.fsck"),
                       (m.mnt, "user.dcmfs.mine"), (m.mnt, "user.dcmfs.ops"),
                       (m.mnt, "user.dcmfs.status"), (m.mnt, "user.dcmfs.verify")):
        with pytest.raises(OSError) as exc:
            os.setxattr(path, name, b"forged")
        assert exc.value.errno in (errno.ENOTSUP, errno.EPERM), (path, name)
    for name in ("user.dcmfs.mine", "user.dcmfs.status", "user.dcmfs.control"):
        for op in (lambda: os.getxattr(f, name), lambda: os.removexattr(f, name)):
            with pytest.raises(OSError) as exc:
                op()
            assert exc.value.errno in (errno.ENOTSUP, errno.EPERM), name
    with pytest.raises(OSError) as exc:
        os.getxattr(m.mnt, "user.dcmfs.control")
    assert exc.value.errno in (errno.ENOTSUP, errno.EPERM)
    assert os.listxattr(f) == ["user.note"] and os.listxattr(m.mnt) == []


def test_reserved_names_an_older_dcmfs_stored_stay_hidden(make_fs):
    fs = make_fs()
    fs.release(fs.create("/f", 0o644, os.O_WRONLY, 0, 0))
    with fs.lock, fs.index.begin(write=True) as txn:  # as an older dcmfs let a user do
        ino = fs._resolve(txn, "/f")
        txn.set_xattr(ino, b"user.dcmfs.old", b"x")
        txn.set_xattr(ino, b"user.dcmfs.fsck", b"fsck note")
    assert fs.listxattr("/f") == ["user.dcmfs.fsck"]
    assert fs.getxattr("/f", "user.dcmfs.fsck") == b"fsck note"  # fsck's note reads
    with pytest.raises(E.NotSupported):
        fs.getxattr("/f", "user.dcmfs.old")
    with pytest.raises(E.NotSupported):
        fs.setxattr("/f", "user.dcmfs.fsck", b"forged")
    fs.removexattr("/f", "user.dcmfs.fsck")  # and can be dropped
    assert fs.listxattr("/f") == []


# --- 5: no core dumps ----------------------------------------------------------------------
def test_the_daemon_dumps_no_core(mounted):
    m = mounted
    pid = m.daemon_pid()
    with open(f"/proc/{pid}/limits") as f:
        line = next(li for li in f if li.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"], line  # soft and hard
    live = json.loads(os.getxattr(m.mnt, "user.dcmfs.status"))
    assert live["pid"] == pid and live["dumpable"] is False and live["core_limit"] == 0
    status = json.loads(m.cli("status", m.mnt, "--json", check=True).stdout)
    assert status["core_dumps"] is False
    unit = (pathlib.Path(__file__).parent.parent / "systemd" / "dcmfs@.service").read_text()
    assert "\nLimitCORE=0\n" in unit


# --- 3: umount signals only the daemon ---------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(li.startswith("State:") and "Z" in li.split()[1] for li in f)
    except FileNotFoundError:
        return False


def _write_lock_pid(m: Mount, pid: int) -> None:
    # what anyone who can write the store can do (the daemon's flock stays)
    with open(m.store / "lock", "r+b") as f:
        f.truncate(0)
        f.write(f"{pid}\n".encode())


def test_umount_never_signals_the_pid_a_lock_file_names(mounted):
    m = mounted
    daemon = m.daemon_pid()
    victim = subprocess.Popen(["sleep", "300"])
    try:
        _write_lock_pid(m, victim.pid)
        r = m.cli("umount", m.mnt, "--timeout", "20", timeout=60)
        time.sleep(0.2)
        assert victim.poll() is None  # never signalled
        # the real daemon is proven (it answers the mount and holds the lock) and stopped
        assert r.returncode == 0, r.stderr
        assert f"names pid {victim.pid}, which is not the daemon" in r.stderr, r.stderr
        assert not m.is_mounted() and m.daemon_pid() is None
        assert "closed cleanly" in m.log()
        deadline = time.monotonic() + 30  # the daemon exits (or is a zombie) soon after
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(daemon)
    finally:
        victim.kill()
        victim.wait()


def test_umount_refuses_a_daemon_it_cannot_prove(mounted, monkeypatch):
    """A mount that names a process which does not hold the store lock (a
    forged mount, a tampered daemon): nothing is signalled, exit 27."""
    from dcmfs.app import mount as mountmod
    m = mounted
    victim = subprocess.Popen(["sleep", "300"])
    try:
        _write_lock_pid(m, victim.pid)
        monkeypatch.setattr(mountmod, "_mount_answers", lambda mp, wait: ("pid", victim.pid))
        with pytest.raises(E.DaemonUnprovenError, match="does not hold the lock"):
            mountmod.umount(str(m.mnt))
        monkeypatch.setattr(mountmod, "_mount_answers",
                            lambda mp, wait: ("none", "no answer within 30 s"))
        with pytest.raises(E.DaemonUnprovenError, match="no answer"):
            mountmod.umount(str(m.mnt))
        # a caller the mount refuses: the lock's holder, if it runs as the mount's user
        monkeypatch.setattr(mountmod, "_mount_answers", lambda mp, wait: ("refused", None))
        info = mountmod.find_mount(str(m.mnt))
        pidfd, pid = mountmod.proven_daemon(info)
        os.close(pidfd)
        assert pid == m.daemon_pid() != victim.pid
        assert E.DaemonUnprovenError.exit_code == 27
        assert victim.poll() is None and m.is_mounted()
    finally:
        victim.kill()
        victim.wait()
    monkeypatch.undo()
    m.umount()
    assert not m.is_mounted()


def test_the_lock_holder_is_the_kernels_word(mounted):
    m = mounted
    daemon = m.daemon_pid()
    _write_lock_pid(m, 1)
    assert m.daemon_pid() == daemon  # /proc/locks, not the file
    status = json.loads(m.cli("status", m.mnt, "--json", check=True).stdout)
    assert status["pid"] == daemon


def test_a_flock_on_another_file_proves_nothing(tmp_path):
    from dcmfs.storage.header import lock_holders, read_lock_pid
    (tmp_path / "lock").write_text("1\n")
    assert lock_holders(str(tmp_path)) == set() and read_lock_pid(str(tmp_path)) is None
    other = tmp_path / "other"
    other.write_text("")
    holder = subprocess.Popen(["flock", str(other), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and holder.pid not in _all_flock_pids():
            time.sleep(0.05)
        assert lock_holders(str(tmp_path)) == set()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _all_flock_pids() -> set[int]:
    with open("/proc/locks") as f:
        return {int(li.split()[4]) for li in f if li.split()[1] == "FLOCK"}


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path, secret):
    """Whoever can write the store must not make a root daemon truncate a
    file of their choice by putting a symlink where the lock file goes."""
    from dcmfs.storage.header import StoreLock, init_store, read_lock_pid
    from .conftest import SMALL
    init_store(str(tmp_path / "s"), secret, SMALL)
    victim = tmp_path / "precious"
    victim.write_bytes(b"do not truncate me")
    os.symlink(victim, tmp_path / "s" / "lock")
    with pytest.raises(E.StoreIOError):
        StoreLock(str(tmp_path / "s"))
    assert victim.read_bytes() == b"do not truncate me"
    assert read_lock_pid(str(tmp_path / "s")) is None


def test_the_store_log_is_never_followed_through_a_symlink(mount_env, tmp_path):
    m = mount_env
    victim = tmp_path / "precious"
    victim.write_bytes(b"do not append to me")
    os.symlink(victim, m.store / "dcmfs.log")
    r = m.mount(check=False)
    assert r.returncode == E.StoreIOError.exit_code and "symlink" in r.stderr, r.stderr
    assert victim.read_bytes() == b"do not append to me" and not m.is_mounted()
    os.unlink(m.store / "dcmfs.log")
