"""Issue 17: a reader walking a directory of a local store gets the next
files decoded ahead (dcmfs.core.readahead with the core's decoding threads);
a reader that jumps from file to file gets nothing decoded it did not ask for.
Core level, no kernel: what matters is what lands in the decoded cache."""

from __future__ import annotations

import dataclasses
import os
import time

from dcmfs.core.readahead import DIRECTORIES, LOCAL_FETCH_FILES, LOCAL_FILES

from .conftest import SMALL
from .test_s3 import read_file, write_file

FILES = {f"/d/f{i:02}": os.urandom(100_000 + i * 4099) for i in range(8)}
#: no sandbox, so no background pass of the de-identified view's records
#: (it reads every file's first bytes once the mount is quiet: not a walk)
CONFIG = dataclasses.replace(SMALL, read_cache_bytes=16 << 20, sandbox=False)


def written(make_fs):
    fs = make_fs(CONFIG)
    fs.mkdir("/d", 0o755, 0, 0)
    for path, data in FILES.items():
        write_file(fs, path, data)
    fs.close()
    return make_fs(CONFIG)  # a fresh daemon: nothing decoded yet


def decoded(fs, path: str) -> int:
    """How many of ``path``'s objects are in the decoded cache, and of how many."""
    with fs.lock, fs.index.begin() as txn:
        refs = txn.chunks(fs._resolve(txn, path))
    return sum(fs.data.cache.get(r.oid) is not None for r in refs.values()), len(refs)


def settle(fs) -> None:
    for fut in list(fs.data._prefetching.values()):
        fut.exception(timeout=30)


def test_a_directory_read_in_order_is_decoded_ahead(make_fs):
    fs = written(make_fs)
    names = sorted(FILES)
    assert read_file(fs, names[0]) == FILES[names[0]]
    settle(fs)
    assert decoded(fs, names[1])[0] == 0  # one file read: not yet a walk
    assert read_file(fs, names[1]) == FILES[names[1]]  # the one after it: a walk
    settle(fs)
    for path in names[2:2 + LOCAL_FILES]:
        have, of = decoded(fs, path)
        assert have == of > 1, f"{path}: {have} of {of} objects decoded ahead"
    assert decoded(fs, names[2 + LOCAL_FILES])[0] == 0, "more files decoded than asked"
    for path in names[2:]:  # and what was decoded ahead reads back as written
        assert read_file(fs, path) == FILES[path]
        settle(fs)


def test_a_reader_jumping_between_files_gets_nothing_decoded_ahead(make_fs):
    fs = written(make_fs)
    names = sorted(FILES)
    with fs.lock, fs.index.begin() as txn:  # the directory's own order (keyed tags: any)
        own = ["/d/" + os.fsdecode(n) for n, _ in txn.list_dir(fs._resolve(txn, "/d"))]
    after = {a: {b} for a, b in zip(names, names[1:])}
    for a, b in zip(own, own[1:]):
        after.setdefault(a, set()).add(b)
    order = jumping(names, after)  # never the file after the one before, in either order
    for i, path in enumerate(order):
        assert read_file(fs, path) == FILES[path]
        settle(fs)
        for other in order[i + 1:]:
            assert decoded(fs, other)[0] == 0, f"{other} decoded before it was read"


def jumping(names: list[str], after: dict) -> list[str]:
    """An order of ``names`` in which no name is one of ``after[previous]``."""
    def extend(order: list[str], left: list[str]) -> list[str] | None:
        if not left:
            return order
        for n in left:
            if not order or n not in after.get(order[-1], ()):
                found = extend(order + [n], [m for m in left if m != n])
                if found:
                    return found
        return None
    order = extend([], names[::-1])
    assert order is not None
    return order


def test_a_walk_asks_for_each_file_once(make_fs, monkeypatch):
    """Each open of a walk asked again for the files the open before had
    asked for (their inode and chunk lookups, on the request's path): the
    next open asks only for the one file new to the walk."""
    fs = written(make_fs)
    asked = []
    decode = fs.readahead.decode
    monkeypatch.setattr(fs.readahead, "decode",
                        lambda ino, *a: (asked.append(ino), decode(ino, *a))[1])
    names = sorted(FILES)
    for path in names:
        assert read_file(fs, path) == FILES[path]
        settle(fs)
    assert len(asked) == len(set(asked)), asked
    # every file after the first two was asked for before it was opened
    with fs.lock, fs.index.begin() as txn:
        inos = [fs._resolve(txn, p) for p in names]
    assert set(inos[2:]) <= set(asked)


def resident(path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of it), by mincore(2)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_a_walk_has_the_next_files_objects_read_from_the_disk_ahead(make_fs):
    """A store read cold (a prior not read for days, or after a reboot) is
    one small file per object, read from the disk by the decoding threads
    one at a time while they decoded nothing (issue 17: the CT series' 1 200
    objects took 0.5-0.7 ms each).  A reader walking a directory has the
    objects of the next files read into the page cache ahead of it; a file
    it did not walk to is left alone."""
    from dcmfs.storage.objects import object_name
    fs = written(make_fs)
    names = sorted(FILES)

    def objects(path):
        with fs.lock, fs.index.begin() as txn:
            refs = txn.chunks(fs._resolve(txn, path))
        return [os.path.join(fs.objects.backend.root, object_name(r.oid))
                for r in refs.values()]

    os.sync()
    for path in names:  # out of the page cache, as after a reboot
        for obj in objects(path):
            fd = os.open(obj, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    cold = [obj for path in names[2:] for obj in objects(path)]
    assert all(resident(obj)[0] == 0 for obj in cold), "the page cache kept the objects"
    ahead = [obj for path in names[2:2 + LOCAL_FETCH_FILES] for obj in objects(path)]
    beyond = [obj for path in names[2 + LOCAL_FETCH_FILES:] for obj in objects(path)]
    assert beyond, "the test needs files past those read ahead"
    assert read_file(fs, names[0]) == FILES[names[0]]
    fs.objects.backend.wait_idle()  # (close() would drop what was not started)
    assert all(resident(obj)[0] == 0 for obj in cold), "read ahead before a walk"
    assert read_file(fs, names[1]) == FILES[names[1]]  # the one after it: a walk
    fs.objects.backend.wait_idle()
    # the advice starts the disk reads and returns: they land soon after
    deadline = time.monotonic() + 10
    while not all(resident(obj)[0] == resident(obj)[1] for obj in ahead) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    for obj in ahead:
        have, pages = resident(obj)
        assert have == pages, f"{have} of {pages} pages of an object read ahead"
    assert all(resident(obj)[0] == 0 for obj in beyond), "more files read ahead than asked"


def test_walks_of_many_directories_leave_a_bounded_record(make_fs):
    """The read-ahead kept, for every directory a reader ever walked in,
    the last file read through and the files asked for ahead: a daemon
    whose readers walk a million series grew by a name and a set of inode
    numbers a series for as long as it ran (a local store too since it reads
    ahead from the disk).  It follows the last :data:`DIRECTORIES` walks."""
    fs = make_fs(CONFIG)
    dirs = [f"/s{i:03}" for i in range(DIRECTORIES + 8)]
    for d in dirs:
        fs.mkdir(d, 0o755, 0, 0)
        for n in range(3):
            write_file(fs, f"{d}/f{n}", b"%d" % n * 1000)
    fs.close()
    fs = make_fs(CONFIG)
    for d in dirs:
        for n in range(3):  # a walk: the second file follows the first
            assert read_file(fs, f"{d}/f{n}") == b"%d" % n * 1000
        settle(fs)
    ra = fs.readahead
    assert len(ra._asked) <= DIRECTORIES and len(ra._last) <= DIRECTORIES, \
        (len(ra._asked), len(ra._last))
    assert dirs[-1] in ra._asked and dirs[-1] in ra._last  # the newest walk is followed


def test_closing_the_backend_ends_its_warm_threads_and_kept_files(tmp_path):
    """LocalBackend had two ``close`` methods after a merge: the later
    (kept files only) hid the one that ends the page-cache warmers, so an
    unmount left their threads running and the walk test above did not
    wait for the reads it asked for."""
    import threading
    from dcmfs.storage.backend import LocalBackend
    b = LocalBackend(str(tmp_path))
    (tmp_path / "o").write_bytes(b"x" * 10000)
    assert b.prefetch(["o"]) == 1
    assert b.get_kept("o", 0, 4) == b"xxxx" and len(b.kept) == 1
    b.close()
    assert [t for t in threading.enumerate() if t.name.startswith("dcmfs-warm")] == []
    assert len(b.kept) == 0
