"""POSIX behaviour through a real mount (issue 16): each reproduction of the
issue, with what ext4 answers."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest

LONG = "n" * 256  # one byte over NAME_MAX


def _errno_of(call) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def test_every_operation_on_a_name_over_255_bytes_is_enametoolong(mounted):
    m = mounted.mnt
    (m / "f").write_bytes(b"x")
    (m / "d").mkdir()
    long, deep = m / LONG, m / LONG / "f"
    calls = {
        "stat": lambda: os.stat(long),
        "lstat": lambda: os.lstat(long),
        "stat below": lambda: os.stat(deep),
        "access": lambda: os.access(long, os.R_OK) or os.stat(long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 1, 1),
        "utime": lambda: os.utime(long, ns=(1, 2)),
        "truncate": lambda: os.truncate(long, 0),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
        "rename from": lambda: os.rename(long, m / "g"),
        "rename to": lambda: os.rename(m / "f", long),
        "link from": lambda: os.link(long, m / "g"),
        "link to": lambda: os.link(m / "f", long),
        "symlink to": lambda: os.symlink("f", long),
        "open": lambda: os.close(os.open(long, os.O_RDONLY)),
        "create": lambda: os.close(os.open(long, os.O_WRONLY | os.O_CREAT, 0o644)),
        "create below": lambda: os.close(os.open(deep, os.O_WRONLY | os.O_CREAT, 0o644)),
        "mkdir": lambda: os.mkdir(long),
        "readlink": lambda: os.readlink(long),
        "getxattr": lambda: os.getxattr(long, "user.a"),
        "setxattr": lambda: os.setxattr(long, "user.a", b"1"),
        "listxattr": lambda: os.listxattr(long),
        "removexattr": lambda: os.removexattr(long, "user.a"),
        "opendir": lambda: os.listdir(long),
    }
    got = {name: _errno_of(call) for name, call in calls.items()}
    assert {k: errno.errorcode.get(v, v) for k, v in got.items()
            if v != errno.ENAMETOOLONG} == {}
    # the same operations on a 255-byte name are ordinary
    ok = m / ("n" * 255)
    ok.write_bytes(b"y")
    os.chmod(ok, 0o600)
    os.rename(ok, m / "d" / ("n" * 255))
    assert (m / "d" / ("n" * 255)).read_bytes() == b"y"
    assert sorted(os.listdir(m)) == ["d", "f"]


def _special(m) -> dict:
    out = {}
    for name in ("fifo", "fifo2", "chr", "blk", "sock", "chr-link"):
        st = os.lstat(m / name)
        out[name] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_rdev, st.st_uid,
                     st.st_gid, st.st_nlink, st.st_ino)
    return out


def test_special_files_through_the_mount_survive_remount_fsck_and_rebuild(mount_env):
    """mkfifo, mknod of character and block devices and FIFOs, bind(2) of an
    AF_UNIX socket returned ENOSYS (issue 16); they are stored with their
    rdev and survive rename, link, chmod/chown, remount, fsck and an index
    rebuild."""
    m = mount_env
    m.mount()
    mnt = m.mnt
    os.mkfifo(mnt / "fifo", 0o640)
    os.mknod(mnt / "fifo2", stat.S_IFIFO | 0o600)
    os.mknod(mnt / "chr0", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(mnt / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 1234))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(mnt / "sock"))
        server.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(mnt / "sock"))  # the kernel's socket, found by its name
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        client.close()
    finally:
        server.close()
    # a FIFO carries data (the kernel's pipe, named in dcmfs)
    got = []
    reader = threading.Thread(target=lambda: got.append((mnt / "fifo").read_bytes()))
    reader.start()
    with open(mnt / "fifo", "wb") as f:
        f.write(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]
    os.rename(mnt / "chr0", mnt / "chr")
    os.link(mnt / "chr", mnt / "chr-link")
    os.chmod(mnt / "blk", 0o640)
    os.chown(mnt / "fifo2", 65534, 65534)
    os.chown(mnt / "sock", 1234, 5678, follow_symlinks=False)
    want = _special(mnt)
    assert want["chr"][:3] == (stat.S_IFCHR, 0o600, os.makedev(1, 3)), want
    assert want["blk"][:3] == (stat.S_IFBLK, 0o640, os.makedev(7, 1234)), want
    assert want["fifo"][:2] == (stat.S_IFIFO, 0o640) and want["fifo2"][3] == 65534
    assert want["sock"][0] == stat.S_IFSOCK and want["sock"][3:5] == (1234, 5678)
    assert want["chr"][5] == want["chr-link"][5] == 2 and want["chr"][6] == want["chr-link"][6]
    m.umount()
    r = m.cli("fsck", m.store, "--key-file", m.key)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    m.mount()
    assert _special(mnt) == want
    m.umount()
    os.unlink(m.store / "index" / "data.mdb")
    r = m.cli("fsck", m.store, "--key-file", m.key, "--rebuild-index")
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount()
    assert _special(mnt) == want
    for name in want:
        os.unlink(mnt / name)
    assert os.listdir(mnt) == []
