"""The filesystem core driven directly, without a kernel."""

from __future__ import annotations

import os
import random
import stat

import pytest

from dcmfs import errors as E
from dcmfs.storage.digest import TreeHasher
from dcmfs.core.handles import XATTR_CREATE, XATTR_REPLACE
from dcmfs.core.names import RENAME_EXCHANGE, RENAME_NOREPLACE

from .conftest import SMALL, assert_no_dangling, crash, sha256

CS = SMALL.chunk_size


def write_file(fs, path, data, step=None, mode=0o644):
    fh = fs.create(path, mode, os.O_WRONLY, 0, 0)
    step = step or len(data) or 1
    for off in range(0, len(data), step):
        fs.write(fh, data[off:off + step], off)
    fs.flush(fh)
    fs.release(fh)


def read_file(fs, path):
    fh = fs.open(path, os.O_RDONLY)
    try:
        return fs.read(fh, fs.getattr(path)["st_size"] + 10, 0)
    finally:
        fs.release(fh)


def index_sha(fs, path):
    """The file's digest in the index (storage.digest: a tree over its blocks)."""
    with fs.lock, fs.index.begin() as txn:
        return txn.get_inode(fs._resolve(txn, path)).digest.hex()


def content_digest(data: bytes) -> str:
    """What index_sha must be for a file holding ``data``."""
    hasher = TreeHasher(CS)
    hasher.update(data)
    return hasher.digest().hex()


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS, 5 * CS + 17])
def test_roundtrip_sizes_and_whole_file_hash(make_fs, size):
    fs = make_fs()
    data = os.urandom(size)
    write_file(fs, "/f", data, step=4096 + 7)
    assert read_file(fs, "/f") == data
    assert index_sha(fs, "/f") == content_digest(data)
    fs.close()
    fs = make_fs()
    assert read_file(fs, "/f") == data
    assert fs.getattr("/f")["st_size"] == size


def test_random_writes_truncates_and_holes_match_a_model(make_fs):
    fs = make_fs()
    rng = random.Random(1234)
    model = bytearray()
    fh = fs.create("/r", 0o644, os.O_RDWR, 0, 0)
    for step in range(400):
        op = rng.random()
        if op < 0.75:
            off = rng.randrange(0, 6 * CS)
            data = rng.randbytes(rng.randrange(1, 3 * CS // 2))
            fs.write(fh, data, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
        elif op < 0.9:
            length = rng.randrange(0, 7 * CS)
            _truncate_both(fs, fh, model, length)
        else:
            fs.flush(fh)
        if step % 50 == 0:
            assert fs.read(fh, len(model) + 100, 0) == bytes(model)
    _closed_and_reopened_match(make_fs, fs, fh, "/r", model)


def _truncate_both(fs, fh, model: bytearray, length: int) -> None:
    fs.truncate(None, length, fh)
    if length < len(model):
        del model[length:]
    else:
        model.extend(bytes(length - len(model)))


def _closed_and_reopened_match(make_fs, fs, fh, path: str, model: bytearray) -> None:
    """After close the file, its index digest and a reopened store's copy
    are the model's bytes."""
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, path) == bytes(model)
    assert index_sha(fs, path) == content_digest(bytes(model))
    fs.close()
    assert read_file(make_fs(), path) == bytes(model)


def test_chunk_aligned_writes_kept_as_they_came_match_a_model(make_fs):
    """A write that starts a chunk holding nothing yet keeps its bytes as
    they came (no copy into a buffer: issue 17); later writes into the same
    chunk, truncates, reads before the commit and a caller's buffer changed
    after its write must all behave as with a copied buffer."""
    fs = make_fs()
    rng = random.Random(17)
    model = bytearray()
    fh = fs.create("/a", 0o644, os.O_RDWR, 0, 0)
    for step in range(300):
        op = rng.random()
        if op < 0.5:  # at a chunk start, often at or past the end of the file
            off = CS * rng.randrange(0, 6)
            size = rng.choice((1, CS // 3, CS - 1, CS, CS + 5, 2 * CS + 9))
            data = rng.randbytes(size)
            kind = rng.randrange(3)
            given = data if kind == 0 else bytearray(data) if kind == 1 else memoryview(data)
            fs.write(fh, given, off)
            if kind == 1:  # the caller reuses its buffer: the file keeps what was written
                given[:] = bytes(len(given))
        elif op < 0.8:  # anywhere, into what the aligned writes left
            off = rng.randrange(0, 6 * CS)
            data = rng.randbytes(rng.randrange(1, CS))
            fs.write(fh, data, off)
        elif op < 0.9:
            length = rng.randrange(0, 7 * CS)
            _truncate_both(fs, fh, model, length)
            off, data = length, b""
        else:
            fs.flush(fh)
            off, data = 0, b""
        if data:
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
        if step % 20 == 0:
            assert fs.read(fh, len(model) + 100, 0) == bytes(model)
    _closed_and_reopened_match(make_fs, fs, fh, "/a", model)


def test_holes_read_as_zeros_and_cost_no_objects(make_fs):
    fs = make_fs()
    fh = fs.create("/sparse", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, b"end", 10 * CS)
    fs.flush(fh)
    fs.release(fh)
    data = read_file(fs, "/sparse")
    assert data == bytes(10 * CS) + b"end"
    with fs.lock, fs.index.begin() as txn:
        assert len(txn.chunks(fs._resolve(txn, "/sparse"))) == 1


def test_truncate_by_path_up_and_down(make_fs):
    fs = make_fs()
    data = os.urandom(3 * CS + 5)
    write_file(fs, "/t", data)
    fs.truncate("/t", CS + 3)
    assert read_file(fs, "/t") == data[:CS + 3]
    fs.truncate("/t", 2 * CS)
    assert read_file(fs, "/t") == data[:CS + 3] + bytes(CS - 3)
    assert index_sha(fs, "/t") == content_digest(data[:CS + 3] + bytes(CS - 3))
    fs.truncate("/t", 0)
    assert read_file(fs, "/t") == b""


def test_open_o_trunc_and_append(make_fs):
    fs = make_fs()
    write_file(fs, "/a", b"hello")
    fh = fs.open("/a", os.O_WRONLY | os.O_APPEND)
    fs.write(fh, b" world", 0)  # O_APPEND: the offset is ignored
    fs.release(fh)
    assert read_file(fs, "/a") == b"hello world"
    fh = fs.open("/a", os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, b"new", 0)
    fs.release(fh)
    assert read_file(fs, "/a") == b"new"


def test_two_handles_see_one_content(make_fs):
    fs = make_fs()
    write_file(fs, "/s", b"0123456789")
    h1 = fs.open("/s", os.O_RDWR)
    h2 = fs.open("/s", os.O_RDONLY)
    fs.write(h1, b"AB", 3)
    assert fs.read(h2, 100, 0) == b"012AB56789"
    fs.release(h1)
    fs.release(h2)


def test_directories_and_names(make_fs):
    fs = make_fs()
    fs.mkdir("/d", 0o750, 1000, 1000)
    fs.mkdir("/d/e", 0o755, 0, 0)
    write_file(fs, "/d/f", b"x")
    assert sorted(n for n, _ in fs.readdir("/d")) == ["e", "f"]
    assert fs.getattr("/d")["st_nlink"] == 3
    assert stat.S_IMODE(fs.getattr("/d")["st_mode"]) == 0o750
    with pytest.raises(E.Exists):
        fs.mkdir("/d/e", 0o755, 0, 0)
    with pytest.raises(E.DirectoryNotEmpty):
        fs.rmdir("/d")
    with pytest.raises(E.NotADirectory):
        fs.rmdir("/d/f")
    with pytest.raises(E.IsADirectory):
        fs.unlink("/d/e")
    with pytest.raises(E.NotFound):
        fs.getattr("/nope")
    with pytest.raises(E.NotADirectory):
        fs.getattr("/d/f/x")
    with pytest.raises(E.NameTooLong):
        fs.mkdir("/" + "n" * 256, 0o755, 0, 0)
    fs.rmdir("/d/e")
    assert fs.getattr("/d")["st_nlink"] == 2


def test_rename_semantics(make_fs):
    fs = make_fs()
    write_file(fs, "/a", b"A")
    write_file(fs, "/b", b"B")
    fs.mkdir("/d", 0o755, 0, 0)
    fs.mkdir("/e", 0o755, 0, 0)
    with pytest.raises(E.Exists):
        fs.rename("/a", "/b", RENAME_NOREPLACE)
    fs.rename("/a", "/b", RENAME_EXCHANGE)
    assert read_file(fs, "/a") == b"B" and read_file(fs, "/b") == b"A"
    fs.rename("/a", "/b")  # over an existing file
    assert read_file(fs, "/b") == b"B"
    with pytest.raises(E.NotFound):
        fs.getattr("/a")
    with pytest.raises(E.IsADirectory):
        fs.rename("/b", "/d")
    with pytest.raises(E.NotADirectory):
        fs.rename("/d", "/b")
    with pytest.raises(E.InvalidArgument):
        fs.rename("/d", "/d/sub")
    fs.rename("/b", "/d/b")  # across directories
    fs.rename("/d", "/e")  # over an empty directory
    assert read_file(fs, "/e/b") == b"B"
    assert fs.getattr("/")["st_nlink"] == 3
    files, logical, _ = fs.stats()
    assert (files, logical) == (1, 1)


def test_hard_links_symlinks_and_times(make_fs):
    fs = make_fs()
    write_file(fs, "/f", b"data")
    fs.link("/f", "/g")
    assert fs.getattr("/f")["st_nlink"] == 2
    assert fs.getattr("/g")["st_ino"] == fs.getattr("/f")["st_ino"]
    fs.unlink("/f")
    assert read_file(fs, "/g") == b"data" and fs.getattr("/g")["st_nlink"] == 1
    fs.symlink("/l", "target/with/√unicode", 0, 0)
    assert fs.readlink("/l") == "target/with/√unicode"
    assert stat.S_ISLNK(fs.getattr("/l")["st_mode"])
    fs.utimens("/g", 1_000_000_000_123, 2_000_000_000_456)
    st = fs.getattr("/g")
    assert (st["st_atime"], st["st_mtime"]) == (1_000_000_000_123, 2_000_000_000_456)
    fs.chmod("/g", 0o600)
    fs.chown("/g", 1234, -1)
    st = fs.getattr("/g")
    assert stat.S_IMODE(st["st_mode"]) == 0o600 and st["st_uid"] == 1234


def test_xattrs(make_fs):
    fs = make_fs()
    write_file(fs, "/x", b"")
    fs.setxattr("/x", "user.a", b"1")
    with pytest.raises(E.Exists):
        fs.setxattr("/x", "user.a", b"2", XATTR_CREATE)
    with pytest.raises(E.NoAttribute):
        fs.setxattr("/x", "user.b", b"2", XATTR_REPLACE)
    fs.setxattr("/x", "user.b", b"\x00bin", 0)
    assert fs.getxattr("/x", "user.b") == b"\x00bin"
    assert sorted(fs.listxattr("/x")) == ["user.a", "user.b"]
    fs.removexattr("/x", "user.a")
    with pytest.raises(E.NoAttribute):
        fs.getxattr("/x", "user.a")
    with pytest.raises(E.NotSupported):
        fs.setxattr("/x", "system.posix_acl_access", b"")


def test_unlink_while_open_then_release_frees_everything(make_fs):
    fs = make_fs()
    write_file(fs, "/u", os.urandom(3 * CS))
    fh = fs.open("/u", os.O_RDWR)
    fs.unlink("/u")
    fs.write(fh, b"still writable", 0)
    assert fs.read(fh, 14, 0) == b"still writable"
    fs.release(fh)
    fs.sync_all()
    assert list(fs.objects.iter_oids()) == []
    assert fs.stats() == (0, 0, 0)


def test_crash_leaves_old_or_new_and_recovery_cleans_up(make_fs):
    fs = make_fs()
    old = os.urandom(4 * CS)
    write_file(fs, "/f", old)
    fh = fs.open("/f", os.O_RDWR)
    fs.write(fh, os.urandom(3 * CS), 0)  # sealed objects exist, not committed
    fh2 = fs.create("/orphan", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh2, b"x" * CS, 0)
    fs.flush(fh2)
    fs.unlink("/orphan")
    crash(fs)
    fs = make_fs()
    assert fs.recovered is not None
    assert fs.recovered.orphan_inodes == 1
    assert fs.recovered.unreferenced_objects >= 1
    assert read_file(fs, "/f") == old
    assert_no_dangling(fs)


def test_disk_full_reports_enospc_keeps_data_and_retries(make_fs, monkeypatch):
    from dcmfs.storage import backend as objectstore  # objects are written there
    fs = make_fs()
    real = objectstore.write_new
    full = {"on": True}

    def fake(path, data, **kw):
        if full["on"]:
            raise E.NoSpaceError("The disk under the store is full.")
        return real(path, data, **kw)

    monkeypatch.setattr(objectstore, "write_new", fake)
    data = os.urandom(2 * CS + 100)
    fh = fs.create("/big", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, data[:CS], 0)
    with pytest.raises(E.NoSpaceError):
        fs.flush(fh)
    full["on"] = False
    fs.write(fh, data[CS:], CS)
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, "/big") == data
    assert index_sha(fs, "/big") == content_digest(data)


def test_read_only_refuses_writes(make_fs):
    import dataclasses
    fs = make_fs()
    write_file(fs, "/f", b"abc")
    fs.close()
    fs = make_fs(dataclasses.replace(SMALL, read_only=True))
    assert read_file(fs, "/f") == b"abc"
    with pytest.raises(E.ReadOnlyError):
        fs.mkdir("/d", 0o755, 0, 0)
    with pytest.raises(E.ReadOnlyError):
        fs.open("/f", os.O_WRONLY)


def test_store_is_locked_while_open(make_fs):
    make_fs()
    with pytest.raises(E.StoreLockedError):
        make_fs()


@pytest.mark.parametrize("codec", ["zstd", "lzma", "none"])
def test_codecs(tmp_path, secret, codec):
    import dataclasses
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage.header import init_store, open_store
    cfg = dataclasses.replace(SMALL, codec=codec)
    init_store(str(tmp_path / "s"), secret, cfg)
    fs = FileSystem(open_store(str(tmp_path / "s"), secret), cfg)
    try:
        data = (b"DICOM-ish " * 50000) + os.urandom(1000)
        write_file(fs, "/c", data)
        assert read_file(fs, "/c") == data
        files, logical, stored = fs.stats()
        assert logical == len(data)
        if codec == "none":
            assert stored > logical
        else:
            assert stored < logical / 10
    finally:
        fs.close()


def test_clean_close_leaves_a_sealed_index_snapshot(make_fs):
    from dcmfs.index import Index
    fs = make_fs()
    write_file(fs, "/kept", b"k" * 1000)
    fs.close()
    snaps = sorted((make_fs.root / "snapshots").iterdir())
    assert len(snaps) == 1 and (snaps[0] / "data.mdb").exists()
    ix = Index(str(snaps[0]), fs.store.master_key, fs.store.store_id, 1 << 30, read_only=True)
    try:
        with ix.begin() as txn:
            ino = txn.lookup(1, b"kept")
            assert txn.get_inode(ino).size == 1000
    finally:
        ix.close()
    fs = make_fs()
    write_file(fs, "/more", b"m")
    fs.close()
    fs = make_fs()
    fs.close()
    assert len(list((make_fs.root / "snapshots").iterdir())) == 2


def _fail_once(monkeypatch, cls, name):
    """Make cls.name raise NoSpaceError on its next call only."""
    real = getattr(cls, name)
    state = {"armed": True}

    def wrapper(self, *args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise E.NoSpaceError("The disk under the store is full.")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def test_failed_index_commit_after_last_chunk_reseal_retries_cleanly(make_fs, monkeypatch):
    import dataclasses
    from dcmfs.index import Txn
    fs = make_fs(dataclasses.replace(SMALL, read_cache_bytes=1))  # nothing stays cached
    data = os.urandom(2 * CS)  # ends on a chunk boundary: the last chunk is resealed
    fh = fs.create("/f", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, data, 0)
    _fail_once(monkeypatch, Txn, "put_inode")
    with pytest.raises(E.NoSpaceError):
        fs.flush(fh)
    assert fs.read(fh, 3 * CS, 0) == data
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, "/f") == data and index_sha(fs, "/f") == content_digest(data)
    fs.close()
    fs = make_fs()
    assert read_file(fs, "/f") == data
    assert_no_dangling(fs)


def test_failed_unlink_leaves_names_and_link_counts_intact(make_fs, monkeypatch):
    from dcmfs.index import Txn
    fs = make_fs()
    write_file(fs, "/g", b"keep me")
    fs.link("/g", "/h")
    fh = fs.open("/g", os.O_RDWR)
    fs.unlink("/h")
    _fail_once(monkeypatch, Txn, "add_orphan")
    with pytest.raises(E.NoSpaceError):
        fs.unlink("/g")
    assert fs.getattr("/g")["st_nlink"] == 1
    fs.release(fh)
    assert read_file(fs, "/g") == b"keep me"
    _fail_once(monkeypatch, Txn, "put_inode")
    with pytest.raises(E.NoSpaceError):
        fs.mkdir("/d", 0o755, 0, 0)
    assert fs.getattr("/")["st_nlink"] == 2


def test_unlinked_file_never_committed_leaves_no_objects(make_fs):
    fs = make_fs()
    fh = fs.create("/tmp", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, os.urandom(10 * CS), 0)  # sealed early, never committed
    fs.unlink("/tmp")
    fs.release(fh)
    fs.sync_all()
    assert list(fs.objects.iter_oids()) == []
    assert fs.stats() == (0, 0, 0)


def test_open_o_trunc_updates_mtime(make_fs):
    fs = make_fs()
    write_file(fs, "/t", b"x" * 100)
    fs.utimens("/t", 1_000_000_000, 1_000_000_000)
    fh = fs.open("/t", os.O_WRONLY | os.O_TRUNC)
    fs.release(fh)
    st = fs.getattr("/t")
    assert st["st_size"] == 0 and st["st_mtime"] > 1_000_000_000 and st["st_ctime"] > 1_000_000_000


def test_missing_last_chunk_entry_is_an_integrity_error(make_fs):
    fs = make_fs()
    write_file(fs, "/f", os.urandom(2 * CS + 10))
    with fs.lock, fs.index.begin(write=True) as txn:
        txn.delete_chunk(fs._resolve(txn, "/f"), 2)
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/f")


def test_the_checkpoint_thread_deletes_superseded_objects_without_the_core_lock(make_fs):
    """Issue 17: an unlink burst waited 30 % of its time on the checkpoint
    thread deleting objects under the core lock.  The thread commits under
    the lock, then deletes; the objects are gone all the same, and verify
    never counts the ones waiting as orphans."""
    import dataclasses
    import threading
    import time
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=0.05))
    for n in range(20):
        write_file(fs, f"/f{n}", os.urandom(2 * CS))
    fs.sync_all()
    held = []
    deleted_by = set()
    real = fs.objects.delete

    def delete(oid):
        if threading.current_thread().name == "dcmfs-checkpoint":
            held.append(fs._lock._is_owned())
        deleted_by.add(threading.current_thread().name)
        assert oid in fs.data.superseded()  # still counted while it waits
        return real(oid)

    fs.objects.delete = delete
    for n in range(20):
        fs.unlink(f"/f{n}")
    deadline = time.monotonic() + 30
    while list(fs.objects.iter_oids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(fs.objects.iter_oids()) == []
    assert "dcmfs-checkpoint" in deleted_by and held and not any(held)
    assert fs.data.superseded() == []


def test_a_request_that_finds_the_journal_grown_leaves_the_checkpoint_to_the_thread(make_fs):
    """Issue 17: a request that found the journal grown checkpointed itself
    and deleted every superseded object while holding the core's lock (an
    unlink burst's getattrs waited 1.2 ms each on it).  It wakes the
    checkpoint thread instead, long before that thread's interval, and the
    thread deletes them without the lock."""
    import dataclasses
    import threading
    import time
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=3600))
    for n in range(20):
        write_file(fs, f"/f{n}", os.urandom(2 * CS))
    fs.sync_all()
    fs.index.checkpoint_records = 10  # due after a few unlinks
    held = []
    real = fs.objects.delete

    def delete(oid):
        held.append((threading.current_thread().name, fs._lock._is_owned()))
        return real(oid)

    fs.objects.delete = delete
    for n in range(20):
        fs.unlink(f"/f{n}")
    # the files of the first checkpoint's unlinks (each file has 2 objects)
    deadline = time.monotonic() + 30
    while len(held) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(held) >= 10
    assert {name for name, _ in held} == {"dcmfs-checkpoint"}
    assert not any(owned for _, owned in held)
    fs.close()  # the rest: the last checkpoint's
    assert list(fs.objects.iter_oids()) == []


def test_a_request_checkpoints_itself_when_the_thread_falls_behind(make_fs):
    """The journal stays bounded: past twice its bound (the checkpoint
    thread held up, here by the core's lock it needs) the request
    checkpoints itself; its deletions still wait for the thread."""
    import dataclasses
    import threading
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=3600))
    for n in range(30):
        write_file(fs, f"/f{n}", os.urandom(2 * CS))
    fs.sync_all()
    fs.index.checkpoint_records = 10
    held = []
    real = fs.objects.delete

    def delete(oid):
        held.append(fs._lock._is_owned())
        return real(oid)

    fs.objects.delete = delete
    with fs._lock:  # the thread cannot commit meanwhile
        for n in range(30):
            fs.unlink(f"/f{n}")
            assert fs.index.pending_records < 2 * 10 + 5
    assert not any(held)
    fs.close()  # (an unmount deletes what is left, under the lock)
    assert list(fs.objects.iter_oids()) == []


@pytest.mark.parametrize("backlog", [20000, 5])
def test_superseded_objects_wait_for_a_pause_in_the_requests(make_fs, backlog):
    """Issue 17: removing an object's file costs the disk about what
    creating it did, so the checkpoint thread's deletions competed with an
    unlink burst for the cores.  During a burst of requests they wait (the
    checkpoint itself does not); once requests pause they go, and past
    DELETE_BACKLOG they go regardless."""
    import dataclasses
    import time
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=0.05))
    fs.DELETE_BACKLOG = backlog
    for n in range(10):
        write_file(fs, f"/f{n}", os.urandom(2 * CS))
    fs.sync_all()
    for n in range(10):
        fs.unlink(f"/f{n}")
    deadline = time.monotonic() + 2 * fs.DELETE_QUIET
    while time.monotonic() < deadline:  # a burst
        fs.getattr("/")
    assert fs.index.pending_records == 0  # checkpointed meanwhile
    left = len(list(fs.objects.iter_oids()))
    if backlog > 20:
        assert left == 20 and len(fs.data.superseded()) == 20
    else:
        assert left <= backlog
    deadline = time.monotonic() + 30
    # (the thread takes an object off its books just after deleting it)
    while (list(fs.objects.iter_oids()) or fs.data.superseded()) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(fs.objects.iter_oids()) == [] and fs.data.superseded() == []


def test_close_seals_a_lone_chunk_in_the_closing_thread(make_fs):
    """Issue 17: close handed a small file's only chunk to a sealing thread
    and waited for it - two thread switches per file, on a loaded machine
    more than the sealing itself.  The closing thread seals it (without the
    core's lock); chunks that fill up while written still go to the pool."""
    import threading
    fs = make_fs()
    sealed_by = []
    real = fs.objects.write

    def spy(*args, **kwargs):
        sealed_by.append(threading.current_thread())
        return real(*args, **kwargs)

    fs.objects.write = spy
    write_file(fs, "/small", b"x" * 1000)
    assert sealed_by == [threading.current_thread()]
    assert read_file(fs, "/small") == b"x" * 1000
    sealed_by.clear()
    cs = fs.data.chunk_size
    fh = fs.create("/big", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, b"y" * (cs + 10), 0)  # the full first chunk goes to the pool
    fs.flush(fh)  # the tail alone is sealed here
    fs.release(fh)
    assert len(sealed_by) == 2 and sealed_by.count(threading.current_thread()) == 1
    assert read_file(fs, "/big") == b"y" * (cs + 10)


def test_name_tags_kept_in_memory_follow_a_new_name_key(make_fs):
    """The tags of names asked for again are kept (issue 17); a key
    generation move must not find them under the old key."""
    import hmac
    fs = make_fs()
    ix = fs.index
    tag = ix.name_tag(7, b"name")
    assert ix.name_tag(7, b"name") == tag == hmac.new(ix._name_key, (7).to_bytes(8, "big")
                                                       + b"name", "sha256").digest()[:16]
    ix.set_name_key(b"k" * 32)
    assert ix.name_tag(7, b"name") == hmac.new(b"k" * 32, (7).to_bytes(8, "big") + b"name",
                                               "sha256").digest()[:16] != tag
