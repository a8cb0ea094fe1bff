"""POSIX behaviour through a real mount (issue 16): each reproduction of the
issue, with what ext4 answers."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import socket
import stat
import subprocess
import threading
import time

import pytest

from .conftest import file_sha256

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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


KEEP, PUNCH, ZERO, COLLAPSE, INSERT = 0x01, 0x02, 0x10, 0x08, 0x20
MiB = 1 << 20


def test_fallocate_modes_match_a_plain_file(mounted, tmp_path):
    """fallocate(2) was not supported at all (issue 16): mode 0, KEEP_SIZE,
    PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE against ext4, byte for byte; the
    modes dcmfs cannot do are EOPNOTSUPP."""
    rng = random.Random(6)
    plain, mine = tmp_path / "plain", mounted.mnt / "mine"
    fp = os.open(plain, os.O_RDWR | os.O_CREAT, 0o644)
    fm = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(120):
            off = rng.randrange(0, 6 * MiB)
            if rng.random() < 0.35:
                data = rng.randbytes(rng.randrange(1, 2 * MiB))
                for fd in (fp, fm):
                    os.pwrite(fd, data, off)
            else:
                mode = rng.choice([0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP])
                length = rng.choice([1, 4096, MiB, 2 * MiB + 3, rng.randrange(1, 4 * MiB)])
                for fd in (fp, fm):
                    _fallocate(fd, mode, off, length)
            assert os.fstat(fm).st_size == os.fstat(fp).st_size, step
            if step % 20 == 19:
                size = os.fstat(fp).st_size
                assert os.pread(fm, size + 1, 0) == os.pread(fp, size + 1, 0), step
        os.posix_fallocate(fm, 20 * MiB, MiB)  # glibc's call: native, not emulated
        os.posix_fallocate(fp, 20 * MiB, MiB)
        for mode in (COLLAPSE, INSERT, PUNCH):  # PUNCH_HOLE needs KEEP_SIZE
            with pytest.raises(OSError) as e:
                _fallocate(fm, mode, 0, MiB)
            assert e.value.errno == errno.EOPNOTSUPP, mode
    finally:
        os.close(fp)
        os.close(fm)
    assert file_sha256(mine) == file_sha256(plain)
    # fallocate(1) too: -l (mode 0), -n (KEEP_SIZE), -p (punch), -z (zero range)
    for args in (["-l", "30MiB"], ["-n", "-o", "31MiB", "-l", "1MiB"],
                 ["-p", "-o", "1000", "-l", "3MiB"], ["-z", "-o", "5MiB", "-l", "26MiB"]):
        for path in (plain, mine):
            subprocess.run(["fallocate", *args, str(path)], check=True)
    r = subprocess.run(["fallocate", "-c", "-o", "0", "-l", "1MiB", str(mine)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "not supported" in r.stderr, r.stderr
    mounted.umount()
    mounted.mount()
    assert os.path.getsize(mine) == os.path.getsize(plain) == 31 * MiB
    assert file_sha256(mine) == file_sha256(plain)


def test_fstat_of_an_open_unlinked_file(mounted):
    """fstat of an open, unlinked file returned ESTALE (issue 16): it gives
    nlink 0 and the file's attributes, and the descriptor keeps working; no
    hidden name shows in the directory, and the file is gone at the last close."""
    m = mounted.mnt
    (m / "u").write_bytes(b"hello world")
    fd = os.open(m / "u", os.O_RDWR)
    before = os.fstat(fd)
    os.unlink(m / "u")
    st = os.fstat(fd)
    assert (st.st_nlink, st.st_size, st.st_ino, st.st_mode) == \
        (0, 11, before.st_ino, before.st_mode)
    assert os.pread(fd, 11, 0) == b"hello world"
    os.pwrite(fd, b"HELLO", 0)
    os.ftruncate(fd, 20)
    os.fchmod(fd, 0o600)
    os.setxattr(fd, "user.k", b"v")
    assert os.getxattr(fd, "user.k") == b"v"
    st = os.fstat(fd)
    assert (st.st_nlink, st.st_size, st.st_mode & 0o777) == (0, 20, 0o600)
    assert os.pread(fd, 20, 0) == b"HELLO world" + bytes(9)
    assert os.listdir(m) == []
    # a file replaced by a rename while open: the same
    (m / "a").write_bytes(b"old")
    fa = os.open(m / "a", os.O_RDONLY)
    (m / "b").write_bytes(b"new")
    os.rename(m / "b", m / "a")
    assert os.fstat(fa).st_nlink == 0 and os.pread(fa, 3, 0) == b"old"
    assert (m / "a").read_bytes() == b"new"
    # one name of two gone: nlink 1
    (m / "x").write_bytes(b"linked")
    os.link(m / "x", m / "y")
    fx = os.open(m / "x", os.O_RDONLY)
    os.unlink(m / "x")
    assert os.fstat(fx).st_nlink == 1
    time.sleep(1.1)  # the attributes time out: a read past the end asks by handle
    os.pread(fx, 10, 100)
    assert os.fstat(fx).st_nlink == 1
    # the directory that held an unlinked open file can go
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"in d")
    fd2 = os.open(m / "d" / "f", os.O_RDONLY)
    os.unlink(m / "d" / "f")
    os.rmdir(m / "d")
    assert os.pread(fd2, 4, 0) == b"in d"
    for f in (fd, fa, fx, fd2):
        os.close(f)
    assert sorted(os.listdir(m)) == ["a", "y"]
    mounted.umount()
    mounted.mount()
    assert sorted(os.listdir(m)) == ["a", "y"]
    r = mounted.cli("status", m, "--json")
    assert json.loads(r.stdout)["files"] == 2, r.stdout


OTHER_UID = 12345


class OtherUid:
    """A process of another uid that opens names in a directory (an inherited
    descriptor: no path from / to walk) when told to, at once (it is
    started beforehand: a check must not wait for an interpreter to start)."""

    CODE = ("import os, sys\n"
            "for name in sys.stdin:\n"
            "    try:\n"
            "        os.read(os.open(name.strip(), os.O_RDONLY, dir_fd=int(sys.argv[1])), 1)\n"
            "        print('ok', flush=True)\n"
            "    except OSError as exc:\n"
            "        print(exc.errno, flush=True)\n")

    def __init__(self, directory) -> None:
        self.dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        # the system's Python: the test's may live where that uid cannot go
        self.proc = subprocess.Popen(["/usr/bin/python3", "-c", self.CODE, str(self.dirfd)],
                                     pass_fds=(self.dirfd,), user=OTHER_UID, group=OTHER_UID,
                                     extra_groups=[], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self, name: str) -> int | None:
        """errno of its open(2) of ``name``, None if it could read."""
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, "the other uid's process died"
        return None if answer == "ok" else int(answer)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()
        os.close(self.dirfd)


def _linked(m) -> tuple:
    """``a`` (0644, b"AAAA"), stat'ed (its kernel inode caches attributes), and
    a second name ``b``."""
    a, b = m.mnt / "a", m.mnt / "b"
    a.write_bytes(b"AAAA")
    os.chmod(a, 0o644)
    before = os.stat(a)
    assert before.st_nlink == 1
    os.link(a, b)
    return a, b, before


# The high-level libfuse API gives each name its own kernel inode, which
# cached attributes and pages per name for the attribute timeout (issue 16).

def test_a_link_shows_in_nlink_and_ctime_of_the_other_name_at_once(mounted):
    a, b, before = _linked(mounted)
    after = os.stat(a)
    assert after.st_nlink == 2 and after.st_ctime_ns > before.st_ctime_ns
    ctime = after.st_ctime_ns
    os.setxattr(b, "user.k", b"v")
    assert os.stat(a).st_ctime_ns > ctime
    os.utime(a, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(b).st_mtime_ns == 2_000_000_000
    fd = os.open(a, os.O_RDONLY)
    try:
        os.rename(b, mounted.mnt / "c")
        os.unlink(mounted.mnt / "c")
        assert os.stat(a).st_nlink == 1 and os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)


def test_a_permission_change_through_one_name_is_enforced_on_the_other_at_once(mount_env):
    """chmod 600 and chown 65534 of b: another uid reading a gets EACCES at
    once (it could read it for about a second: a permission bypass)."""
    m = mount_env
    m.mount("-o", "allow_other")
    a, b, _ = _linked(m)
    other = OtherUid(m.mnt)
    try:
        assert other.read("a") is None  # 0644: readable
        os.chmod(b, 0o600)
        os.chown(b, 65534, 65534)
        assert other.read("a") == errno.EACCES
        st = os.stat(a)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 65534, 65534)
        os.chmod(a, 0o644)  # and back, through the other name
        assert other.read("b") is None
    finally:
        other.close()


def test_a_write_through_one_name_is_read_through_a_descriptor_of_the_other(mounted):
    a, b, _ = _linked(mounted)
    fd = os.open(a, os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 0) == b"AAAA"  # in a's page cache now
        fb = os.open(b, os.O_WRONLY)
        try:
            os.pwrite(fb, b"BB", 0)
            assert os.pread(fd, 4, 0) == b"BBAA"
            os.pwrite(fb, b"CCCCCC", 4)
            assert os.fstat(fd).st_size == 10 and os.pread(fd, 20, 0) == b"BBAACCCCCC"
        finally:
            os.close(fb)
        os.truncate(b, 3)
        assert os.stat(a).st_size == 3 and os.pread(fd, 20, 0) == b"BBA"
    finally:
        os.close(fd)


def test_du_shows_what_files_take_in_the_store(mount_env):
    """st_blocks counts the bytes a file's objects take in the store: a sparse
    10 GiB file with 9 bytes written is a few KiB, a compressible file a
    fraction of its size, and du sums that (issue 16: both showed the
    logical size)."""
    m = mount_env
    m.mount("-o", "reencode=0")
    sparse = m.mnt / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)
        f.seek(5 << 30)
        f.write(b"123456789")
    text = m.mnt / "text"
    text.write_bytes(b"the same line again and again\n" * 70000)  # 2.1 MB, compresses well
    st = os.stat(sparse)
    assert st.st_size == 10 << 30 and 0 < st.st_blocks * 512 < 64 * 1024, st.st_blocks
    st = os.stat(text)
    assert 0 < st.st_blocks * 512 < st.st_size // 10, (st.st_blocks, st.st_size)
    du = int(subprocess.run(["du", "-s", "--block-size=1", str(m.mnt)], capture_output=True,
                            text=True, check=True).stdout.split()[0])
    assert du < 1 << 20, du
    m.umount()
    m.mount()
    assert 0 < os.stat(sparse).st_blocks * 512 < 64 * 1024  # kept in the index


def test_the_kernel_keeps_names_and_attributes_past_a_second(mounted):
    """Issue 17: a stat of a file the kernel looked up a while ago costs no
    request (libfuse's default kept names and attributes for 1 s, and
    ``stat`` of 5 000 files ran at 0.44 of gocryptfs); a change through
    another name of a hard-linked file still shows at once."""
    f = mounted.mnt / "kept"
    f.write_bytes(b"x")
    os.stat(f)

    def getattrs():
        return json.loads(os.getxattr(mounted.mnt, "user.dcmfs.ops"))["ops"].get("getattr", 0)

    time.sleep(1.5)
    before = getattrs()
    for _ in range(20):
        assert os.stat(f).st_size == 1
    assert getattrs() == before
    os.link(f, mounted.mnt / "other")
    os.chmod(mounted.mnt / "other", 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600 and os.stat(f).st_nlink == 2
