"""Crashes and damage seen through a real mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import Secret, open_store

from .conftest import SMALL, assert_no_dangling, file_sha256, flip_byte, sha256


@pytest.mark.slow  # a kill workload: ~3-7 s
def test_sigkill_during_copy_keeps_every_closed_file(mount_env, tmp_path):
    m = mount_env
    m.mount()
    closed = {}
    for i in range(30):
        data = os.urandom(200_000 + i * 1000)
        (m.mnt / f"done{i}").write_bytes(data)
        closed[f"done{i}"] = sha256(data)
    # a writer that keeps going while the daemon is killed
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os
i = 0
while True:
    try:
        with open({str(m.mnt)!r} + f"/busy{{i}}", "wb") as f:
            for _ in range(40):
                f.write(os.urandom(100_000))
    except OSError:
        break
    i += 1
"""])
    time.sleep(1.5)
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    writer.wait(timeout=30)
    subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=True)
    deadline = time.monotonic() + 10
    while m.daemon_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    m.mount()
    assert "recovered after an unclean shutdown" in m.log()
    for name, digest in closed.items():
        assert file_sha256(m.mnt / name) == digest, name
    for p in m.mnt.glob("busy*"):  # closed ones are whole, the last one empty or whole
        assert p.stat().st_size in (0, 4_000_000), p
    m.umount()
    # nothing dangles: every object is referenced, every reference exists
    secret = Secret("keyfile", m.key.read_bytes())
    fs = FileSystem(open_store(str(m.store), secret), SMALL)
    try:
        assert_no_dangling(fs)
    finally:
        fs.close()


def test_flipped_bit_gives_eio_on_that_file_only(mount_env):
    m = mount_env
    m.mount()
    a, b = os.urandom(3 << 20), os.urandom(3 << 20)
    (m.mnt / "a").write_bytes(a)
    (m.mnt / "b").write_bytes(b)
    m.umount()
    secret = Secret("keyfile", m.key.read_bytes())
    fs = FileSystem(open_store(str(m.store), secret), SMALL)
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, "/a")
        table = txn.chunks(ino)
    victim = fs.objects.path(table[1].oid)
    fs.close()
    flip_byte(victim, 500)
    m.mount()
    m.expect_log_errors = True
    with pytest.raises(OSError) as e:
        (m.mnt / "a").read_bytes()
    assert e.value.errno == errno.EIO
    with open(m.mnt / "a", "rb") as f:  # the intact first chunk still reads
        assert f.read(1 << 20) == a[:1 << 20]
    assert file_sha256(m.mnt / "b") == sha256(b)
    log = m.log()
    assert f"inode {ino}" in log and table[1].oid.hex() in log
    assert "/a" not in log.replace(str(m.store), "").replace(str(m.mnt), "")


def test_sigterm_flushes_files_still_open(mount_env):
    m = mount_env
    m.mount()
    data = os.urandom(5 << 20)
    fd = os.open(m.mnt / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while m.daemon_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.close(fd)
    except OSError:
        pass
    assert not m.is_mounted()
    assert "closed cleanly" in m.log()
    m.mount()
    assert file_sha256(m.mnt / "open") == sha256(data)
