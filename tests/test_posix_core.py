"""POSIX semantics of issue 16 in the core, without a kernel."""

from __future__ import annotations

import os
import stat
import time

import pytest

from dcmfs import errors as E
from dcmfs.core.names import RELEASE_RACE

from .test_core import write_file

LONG = "/" + "n" * 256


def test_a_name_over_255_bytes_is_too_long_for_every_operation(make_fs):
    fs = make_fs()
    write_file(fs, "/f", b"x")
    fs.mkdir("/d", 0o755, 0, 0)
    calls = [lambda: fs.getattr(LONG), lambda: fs.getattr(LONG + "/f"),
             lambda: fs.chmod(LONG, 0o600), lambda: fs.chown(LONG, 1, 1),
             lambda: fs.utimens(LONG, 1, 2), lambda: fs.truncate(LONG, 0),
             lambda: fs.unlink(LONG), lambda: fs.rmdir(LONG),
             lambda: fs.rename(LONG, "/g"), lambda: fs.rename("/f", LONG),
             lambda: fs.link(LONG, "/g"), lambda: fs.link("/f", LONG),
             lambda: fs.open(LONG, os.O_RDONLY), lambda: fs.opendir(LONG),
             lambda: fs.readlink(LONG), lambda: fs.readdir(LONG),
             lambda: fs.getxattr(LONG, "user.a"), lambda: fs.setxattr(LONG, "user.a", b"1"),
             lambda: fs.listxattr(LONG), lambda: fs.removexattr(LONG, "user.a"),
             lambda: fs.create(LONG + "/f", 0o644, os.O_WRONLY, 0, 0)]
    for call in calls:
        with pytest.raises(E.NameTooLong):
            call()
    # a file in the way is "not a directory" first, as on ext4
    with pytest.raises(E.NotADirectory):
        fs.getattr("/f" + LONG)
    assert sorted(n for n, _ in fs.readdir("/")) == ["d", "f"]


SPECIAL = {"/fifo": (stat.S_IFIFO | 0o640, 0), "/sock": (stat.S_IFSOCK | 0o755, 0),
           "/chr": (stat.S_IFCHR | 0o600, os.makedev(1, 3)),
           "/blk": (stat.S_IFBLK | 0o660, os.makedev(259, 1 << 20 | 7))}


def _kinds(fs, paths):
    return {p: (fs.getattr(p)["st_mode"], fs.getattr(p).get("st_rdev", 0),
                fs.getattr(p)["st_uid"], fs.getattr(p)["st_size"]) for p in paths}


def test_special_files_are_stored_with_their_rdev_and_survive_everything(make_fs, secret):
    """FIFOs, sockets, character and block devices (issue 16): stored like any
    inode with their rdev; rename, link, chmod/chown, reopening, fsck and an
    index rebuild keep them."""
    from dcmfs.app import admin
    from .conftest import SMALL
    import io
    fs = make_fs()
    for path, (mode, rdev) in SPECIAL.items():
        fs.mknod(path, mode, rdev, 7, 8)
    fs.mknod("/empty", stat.S_IFREG | 0o644, 0, 7, 8)  # mknod(2) of a regular file
    with pytest.raises(E.InvalidArgument):
        fs.mknod("/dir", stat.S_IFDIR | 0o755, 0, 0, 0)
    with pytest.raises(E.Exists):
        fs.mknod("/fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
    got = _kinds(fs, SPECIAL)
    assert got == {p: (m, r, 7, 0) for p, (m, r) in SPECIAL.items()}
    assert fs.getattr("/empty")["st_mode"] == stat.S_IFREG | 0o644
    assert fs.getattr("/empty")["st_size"] == 0 and fs.stats()[0] == 1
    for path in SPECIAL:  # the kernel opens them itself; they hold no data
        with pytest.raises(E.InvalidArgument):
            fs.open(path, os.O_RDONLY)
        with pytest.raises(E.InvalidArgument):
            fs.truncate(path, 10)
    fs.rename("/chr", "/chr2")
    fs.link("/chr2", "/chr")
    assert fs.getattr("/chr")["st_nlink"] == 2
    fs.chmod("/blk", 0o640)
    fs.chown("/fifo", 9, 10)
    fs.unlink("/chr2")
    want = {"/fifo": (stat.S_IFIFO | 0o640, 0, 9, 0), "/sock": got["/sock"],
            "/chr": got["/chr"], "/blk": (stat.S_IFBLK | 0o640, SPECIAL["/blk"][1], 7, 0)}
    assert _kinds(fs, want) == want
    fs.close()
    fs = make_fs()
    assert _kinds(fs, want) == want
    fs.close()
    root = str(make_fs.root)
    result = admin.fsck(root, lambda: secret, SMALL, repair=False, rebuild=False,
                        out=io.StringIO())
    assert result["clean"], result
    os.unlink(os.path.join(root, "index", "data.mdb"))
    result = admin.fsck(root, lambda: secret, SMALL, repair=False, rebuild=True,
                        out=io.StringIO())
    assert result["clean"], result
    fs = make_fs()
    assert _kinds(fs, want) == want
    assert sorted(n for n, _ in fs.readdir("/")) == ["blk", "chr", "empty", "fifo", "sock"]
    for path in want:
        fs.unlink(path)
    assert sorted(n for n, _ in fs.readdir("/")) == ["empty"]


def test_a_store_opened_for_writing_says_it_may_hold_special_files(make_fs):
    import json
    fs = make_fs()
    fs.close()
    header = json.loads((make_fs.root / "dcmfs.store").read_text())
    assert "special-files-v1" in header["features"]


KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10
CS = 64 * 1024  # SMALL's chunk size


def _model_fallocate(model: bytearray, mode: int, off: int, length: int) -> None:
    """What ext4 does (and dcmfs must): the reference for the tests."""
    end = off + length
    if mode & (PUNCH | ZERO):
        stop = min(end, len(model))
        if off < stop:
            model[off:stop] = bytes(stop - off)
    if not mode & KEEP and end > len(model):
        model.extend(bytes(end - len(model)))


def test_fallocate_modes_match_a_model_and_holes_cost_no_objects(make_fs):
    import random
    fs = make_fs()
    rng = random.Random(16)
    model = bytearray()
    fh = fs.create("/f", 0o644, os.O_RDWR, 0, 0)
    for step in range(300):
        op = rng.random()
        off = rng.randrange(0, 9 * CS)
        if op < 0.4:
            data = rng.randbytes(rng.randrange(1, 3 * CS))
            fs.write(fh, data, off)
            model[len(model):off] = bytes(max(0, off - len(model)))
            model[off:off + len(data)] = data
        else:
            mode = rng.choice([0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP])
            length = rng.choice([1, 100, CS, 2 * CS + 5, rng.randrange(1, 5 * CS)])
            fs.fallocate(fh, mode, off, length)
            _model_fallocate(model, mode, off, length)
        if step % 25 == 0:
            fs.flush(fh)
        assert fs.getattr("/f")["st_size"] == len(model), step
        if step % 10 == 0:
            assert fs.read(fh, len(model) + 10, 0) == bytes(model), step
    fs.release(fh)
    fs.close()
    fs = make_fs()
    fh = fs.open("/f", os.O_RDWR)
    assert fs.read(fh, len(model) + 10, 0) == bytes(model)
    # a punched range of whole chunks holds no object at all
    fs.write(fh, b"\xff" * (8 * CS), 0)
    fs.fallocate(fh, PUNCH | KEEP, CS // 2, 6 * CS)
    fs.flush(fh)
    with fs.lock, fs.index.begin() as txn:
        table = txn.chunks(fs._resolve(txn, "/f"))
    assert not {1, 2, 3, 4, 5} & set(table) and {0, 6, 7} <= set(table)
    want = b"\xff" * (CS // 2) + bytes(6 * CS) + b"\xff" * (CS + CS // 2)
    assert fs.read(fh, 8 * CS, 0) == want
    for mode in (0x08, 0x20, 0x40, PUNCH, PUNCH | ZERO | KEEP):  # collapse, insert, unshare
        with pytest.raises(E.NotSupported):
            fs.fallocate(fh, mode, 0, CS)
    for off, length in ((-1, 10), (0, 0), (0, -5)):
        with pytest.raises(E.InvalidArgument):
            fs.fallocate(fh, 0, off, length)
    with pytest.raises(E.TooBig):
        fs.fallocate(fh, 0, 1 << 50, 1)
    fs.release(fh)
    from .conftest import assert_no_dangling
    fs.checkpoint()
    assert_no_dangling(fs)


def test_fallocate_on_a_dicom_coded_file_copies_it_back_into_chunks(make_fs):
    from .conftest import ct_file
    from .test_dicom import REAL, layout, recompress
    from .test_core import read_file
    data = ct_file().read_bytes()
    fs = make_fs(REAL)
    write_file(fs, "/ct.dcm", data)
    recompress(fs)
    assert all(r.offset >= 0 for r in layout(fs, "/ct.dcm").values())
    fh = fs.open("/ct.dcm", os.O_RDWR)
    fs.fallocate(fh, PUNCH | KEEP, 1000, 200_000)
    fs.fallocate(fh, ZERO, len(data) - 10, 30)
    fs.release(fh)
    want = data[:1000] + bytes(200_000) + data[201_000:len(data) - 10] + bytes(30)
    assert read_file(fs, "/ct.dcm") == want
    assert all(r.offset < 0 for r in layout(fs, "/ct.dcm").values())


HIDDEN = "/.fuse_hidden0000000200000001"


def test_a_hidden_name_for_a_file_released_a_moment_ago_is_its_unlink(make_fs):
    """libfuse's multi-threaded loop: it finds a file open and hides it
    instead of unlinking it while the file's last release is still being
    served on another thread, so the core sees the hiding rename of a file
    it has just closed.  That is the unlink libfuse was asked for; taken as
    an ordinary rename, it left a .fuse_hidden file in the directory for
    good (seen after SQLite transactions, whose journal is closed and
    unlinked at once)."""
    fs = make_fs()
    write_file(fs, "/journal", b"pages")
    ino = fs.getattr("/journal")["st_ino"]
    fs.rename("/journal", HIDDEN)  # right after the release
    assert [n for n, _ in fs.readdir("/")] == []
    with pytest.raises(E.NotFound):
        fs.getattr(HIDDEN)
    with pytest.raises(E.NotFound):  # libfuse may still unlink the hidden name
        fs.unlink(HIDDEN)
    with fs.lock, fs.index.begin() as txn:
        assert txn.orphans() == [] and txn.get_inode(ino) is None


def test_a_hidden_name_is_an_unlink_that_keeps_the_open_file_reachable(make_fs):
    """libfuse (hard_remove off) renames an open file it is asked to unlink
    to a hidden name and unlinks that at the last close: in the core the
    rename is the unlink (journaled; the file is an orphan), and the hidden
    name reaches the open file until its last release."""
    from .conftest import crash
    fs = make_fs()
    write_file(fs, "/u", b"hello")
    fh = fs.open("/u", os.O_RDWR)
    fs.rename("/u", HIDDEN)
    assert sorted(n for n, _ in fs.readdir("/")) == []
    st = fs.getattr(HIDDEN)
    assert st["st_nlink"] == 0 and st["st_size"] == 5
    assert fs.hidden(HIDDEN) and not fs.hidden("/u")
    fs.chmod(HIDDEN, 0o600)
    fs.setxattr(HIDDEN, "user.k", b"v")
    assert fs.getxattr(HIDDEN, "user.k") == b"v"
    assert fs.read(fh, 10, 0) == b"hello"
    with fs.lock, fs.index.begin() as txn:
        assert txn.orphans() == [st["st_ino"]]  # a crash now: the file is gone
    fs.release(fh)
    with pytest.raises(E.NotFound):
        fs.getattr(HIDDEN)
    with pytest.raises(E.NotFound):  # libfuse's unlink after the release (it
        fs.unlink(HIDDEN)            # ignores the answer): the release forgot the name
    with fs.lock, fs.index.begin() as txn:
        assert txn.orphans() == [] and txn.get_inode(st["st_ino"]) is None
    # a file that is not open: an ordinary rename, the name is kept
    write_file(fs, "/v", b"x")
    time.sleep(RELEASE_RACE + 0.1)  # (not just released: see the next test)
    fs.rename("/v", HIDDEN)
    assert [n for n, _ in fs.readdir("/")] == [HIDDEN[1:]]
    fs.unlink(HIDDEN)
    # one of two names hidden: the other keeps the file
    write_file(fs, "/x", b"linked")
    fs.link("/x", "/y")
    fh = fs.open("/x", os.O_RDONLY)
    fs.rename("/x", HIDDEN)
    assert fs.getattr(HIDDEN)["st_nlink"] == 1 == fs.getattr("/y")["st_nlink"]
    fs.release(fh)
    assert fs.getattr("/y")["st_nlink"] == 1
    # the unlink survives a crash while the file is still open
    write_file(fs, "/z", b"gone")
    fh = fs.open("/z", os.O_RDONLY)
    fs.rename("/z", HIDDEN)
    crash(fs)
    fs = make_fs()
    assert [n for n, _ in fs.readdir("/")] == ["y"]


def _take(fs) -> set[str]:
    stale = set(fs.stale_names)
    fs.stale_names.clear()
    return stale


def test_a_change_to_a_hard_linked_file_names_its_other_kernel_names(make_fs):
    """The adapter has the kernel drop what it caches for the names listed
    in stale_names; a change through one name lists the others, followed
    through renames, and a file with one name never lists anything."""
    fs = make_fs()
    fs.mkdir("/d", 0o755, 0, 0)
    write_file(fs, "/d/a", b"AAAA")
    fs.getattr("/d/a")
    fs.chmod("/d/a", 0o600)
    assert _take(fs) == set()  # one name: nothing to keep coherent
    fs.link("/d/a", "/b")
    assert _take(fs) == {"/d/a"}  # the kernel's inode of a holds nlink 1
    fs.getattr("/b")
    fs.chmod("/b", 0o644)
    assert _take(fs) == {"/d/a"}
    fs.utimens("/d/a", 1, 2)
    assert _take(fs) == {"/b"}
    fh = fs.open("/d/a", os.O_RDWR)
    fs.write(fh, b"BB", 0)  # never the writer's own name: its pages are locked
    assert _take(fs) == {"/b"}
    fs.rename("/d", "/e")  # the directory: the names below it move
    fs.write(fh, b"CC", 0)
    fs.truncate("/b", 1)
    assert _take(fs) == {"/b", "/e/a"}
    fs.setxattr("/b", "user.k", b"v")
    fs.fallocate(fh, 0, 0, 100)
    assert _take(fs) == {"/e/a", "/b"}
    fs.chmod(None, 0o600, fh)
    assert _take(fs) == {"/b"}
    fs.link("/b", "/c")
    assert _take(fs) == {"/e/a", "/b"}
    fs.rename("/c", "/e/c")
    assert _take(fs) == {"/e/a", "/b"}
    fs.unlink("/e/c")
    assert _take(fs) == {"/e/a", "/b"}
    fb = fs.open("/b", os.O_RDONLY)
    fs.rename("/b", HIDDEN)  # libfuse: b unlinked while open through it
    assert _take(fs) == {"/e/a"}
    fs.chmod("/e/a", 0o600)
    assert _take(fs) == {HIDDEN}  # the descriptor of b is a kernel inode too
    fs.release(fb)
    fs.unlink(HIDDEN)  # libfuse, after b's last close
    fs.chmod("/e/a", 0o644)
    assert _take(fs) == set()  # one name again
    fs.release(fh)


def test_kernel_names_follow_renames_and_forget_single_names():
    from dcmfs.core.links import KernelNames, moved
    assert moved("/a/b", "/a", "/x") == "/x/b" and moved("/ab", "/a", "/x") is None
    assert moved("/a", "/a", "/x") == "/x"
    k = KernelNames()
    k.seen(5, "/a/f")
    k.seen(5, "/g")
    k.renamed("/a", "/b")
    k.changed(5, "/g")
    assert k.stale == ["/b/f"]
    k.gone(5, "/g")  # one name left
    k.stale.clear()
    k.changed(5)
    assert k.stale == [] and k._count == 0
    k.LIMIT = 2
    for i in range(5):
        k.seen(9, f"/{i}")
    assert k._count == 2
