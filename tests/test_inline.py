"""Small chunks' objects kept in the index (feature ``inline-small-v1``,
format 8): the same sealed bytes as an object file, put and deleted with
their chunk records, detected as an object file is when swapped, moved,
rolled back or altered, and found by every reader, fsck and verify."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading

import pytest

from dcmfs import errors as E
from dcmfs import format as fmt
from dcmfs.app import admin
from dcmfs.core.filesystem import FileSystem
from dcmfs.index.inline import row_key
from dcmfs.storage import damage
from dcmfs.storage.header import open_store
from dcmfs.storage.objects import ObjectDamaged, stored_bytes

from .conftest import SMALL, assert_no_dangling, crash
from .test_core import read_file, write_file

CS = SMALL.chunk_size
INLINE = fmt.CHUNK_FLAG_INLINE
MANUAL = dataclasses.replace(SMALL, checkpoint_interval=0)
QUIET = io.StringIO()


def refs_of(fs, path):
    """(inode, {chunk index: ref}) of ``path``."""
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, path)
        return ino, txn.chunks(ino)


def row(fs, path, idx=None):
    """(row key, stored bytes, ref) of the last (or ``idx``) chunk of ``path``, inline."""
    ino, table = refs_of(fs, path)
    ref = table[max(table) if idx is None else idx]
    assert ref.flags & INLINE
    with fs.lock, fs.index.begin() as txn:
        blob = txn.get_inline(ino, ref.oid)
    assert blob is not None
    return row_key(ino, ref.oid), blob, ref


def put_raw(fs, key, value) -> None:
    """Damage: a value put straight into the ``inline`` database, past the
    index's accounting, then committed (what a reader in another thread sees)."""
    with fs.lock:
        db = fs.index.dbs["inline"]
        batch = fs.index._parent()
        if value is None:
            batch.delete(key, db=db)
        else:
            batch.put(key, value, db=db)
    fs.checkpoint()


def forget(fs) -> None:
    fs.data.cache = type(fs.data.cache)(1 << 20)  # decoded chunks forgotten


@pytest.fixture
def small(make_fs):
    """/a: a full chunk (a file) and 1000 bytes (inline); /b, /c: 1000 and
    2000 random bytes, one inline object each."""
    fs = make_fs()
    data = {"/a": os.urandom(CS + 1000), "/b": os.urandom(1000), "/c": os.urandom(2000)}
    for path, content in data.items():
        write_file(fs, path, content)
    fs.checkpoint()
    return fs, data


def assert_damaged(fs, path, data, kind, caplog):
    """Reading ``path`` fails (EIO through the adapter), the damage is
    logged naming its inode and object; the other files still read."""
    forget(fs)
    ino, table = refs_of(fs, path)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(E.IntegrityError) as err:
            read_file(fs, path)
    assert isinstance(err.value, ObjectDamaged) and err.value.kind == kind, err.value
    assert f"inode {ino}" in caplog.text and err.value.oid.hex() in caplog.text
    for other, content in data.items():
        if other != path:
            assert read_file(fs, other) == content


def test_small_chunks_are_inline_and_no_object_file(small, make_fs, secret):
    fs, data = small
    ino, table = refs_of(fs, "/a")
    assert [bool(table[i].flags & INLINE) for i in sorted(table)] == [False, True]
    for path in ("/b", "/c"):
        _, table = refs_of(fs, path)
        (ref,) = table.values()
        assert ref.flags & INLINE and stored_bytes(ref) <= fmt.INLINE_MAX
        assert not os.path.exists(fs.objects.path(ref.oid))
    assert fmt.INLINE_FEATURE in fs.opened.store.features
    assert_no_dangling(fs)
    fs.close()
    fs = make_fs()
    for path, content in data.items():
        assert read_file(fs, path) == content
    fs.close()
    root = str(make_fs.root)
    assert admin.verify(root, lambda: secret, SMALL, out=QUIET)["findings"] == []
    assert admin.fsck(root, lambda: secret, SMALL, False, False, out=QUIET)["clean"]


def test_the_threshold_is_the_stored_size(make_fs):
    """An object of INLINE_MAX bytes as stored is inline, one byte more is a file."""
    fs = make_fs(dataclasses.replace(SMALL, reencode=False))
    overhead = fmt.OBJ_HEADER_LEN + fmt.TAG_LEN
    for n, inline in ((fmt.INLINE_MAX - overhead, True), (fmt.INLINE_MAX - overhead + 1, False)):
        write_file(fs, f"/{n}", os.urandom(n))
        _, table = refs_of(fs, f"/{n}")
        (ref,) = table.values()
        assert stored_bytes(ref) == n + overhead
        assert bool(ref.flags & INLINE) == inline
        assert os.path.exists(fs.objects.path(ref.oid)) != inline


def test_the_rows_of_one_inode_are_listed_alone(small):
    fs, _ = small
    rows = {path: row(fs, path) for path in ("/a", "/b", "/c")}
    with fs.lock, fs.index.begin() as txn:
        every = set(txn.iter_inline())
        for path, (key, _, ref) in rows.items():
            ino = int.from_bytes(key[:8], "big")
            assert list(txn.iter_inline(ino)) == [(ino, ref.oid)], path
        assert list(txn.iter_inline(10**9)) == []
    assert every == {(int.from_bytes(k[:8], "big"), ref.oid) for k, _, ref in rows.values()}


def test_unlink_and_overwrite_remove_the_row_in_the_same_operation(small):
    fs, data = small
    key_b, _, ref_b = row(fs, "/b")
    fs.unlink("/b")
    with fs.lock, fs.index.begin() as txn:
        assert txn.get_inline(int.from_bytes(key_b[:8], "big"), ref_b.oid) is None
    assert ref_b.oid not in fs.data.superseded()  # nothing left for a later deletion
    key_c, _, ref_c = row(fs, "/c")
    fresh = os.urandom(1500)
    fh = fs.open("/c", os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, fresh, 0)
    fs.release(fh)
    key_c2, _, ref_c2 = row(fs, "/c")
    assert ref_c2.oid != ref_c.oid
    with fs.lock, fs.index.begin() as txn:
        ino_c = int.from_bytes(key_c[:8], "big")
        assert txn.get_inline(ino_c, ref_c.oid) is None
        assert {k for k in txn.iter_inline()} >= {(ino_c, ref_c2.oid)}
    fs.truncate("/a", 100)  # the inline last chunk goes with its record
    _, table = refs_of(fs, "/a")
    assert table[0].flags & INLINE  # 100 bytes now
    fs.checkpoint()  # (the file object chunk 0 was is deleted after it)
    assert_no_dangling(fs)
    assert read_file(fs, "/c") == fresh and read_file(fs, "/a") == data["/a"][:100]


def test_swapped_between_two_files(small, caplog):
    fs, data = small
    key_b, blob_b, _ = row(fs, "/b")
    key_c, blob_c, _ = row(fs, "/c")
    put_raw(fs, key_b, blob_c)
    assert_damaged(fs, "/b", data, damage.SWAPPED, caplog)


def test_moved_to_another_object_id(small, caplog):
    fs, data = small
    key_b, blob_b, ref_b = row(fs, "/b")
    put_raw(fs, key_b, None)
    put_raw(fs, key_b[:8] + bytes(16), blob_b)  # found under another id only
    assert_damaged(fs, "/b", data, damage.MISSING, caplog)
    put_raw(fs, key_b, blob_b)  # put back: it reads again
    forget(fs)
    assert read_file(fs, "/b") == data["/b"]


def test_rolled_back_to_an_older_version(small, caplog):
    fs, data = small
    _, old_blob, _ = row(fs, "/b")
    fh = fs.open("/b", os.O_RDWR)
    fs.write(fh, b"new", 10)  # a new generation of the chunk
    fs.release(fh)
    key, _, ref = row(fs, "/b")
    data["/b"] = data["/b"][:10] + b"new" + data["/b"][13:]
    put_raw(fs, key, old_blob)
    assert_damaged(fs, "/b", data, damage.ROLLED_BACK, caplog)


@pytest.mark.parametrize("where", ["header", "context", "payload", "tag"])
def test_altered_in_the_index(small, caplog, where):
    fs, data = small
    key, blob, _ = row(fs, "/c")
    at = {"header": 1, "context": 30, "payload": 120, "tag": len(blob) - 1}[where]
    bad = bytearray(blob)
    bad[at] ^= 0xFF
    put_raw(fs, key, bytes(bad))
    forget(fs)
    with pytest.raises(ObjectDamaged) as err:
        read_file(fs, "/c")
    assert err.value.oid == key[8:]
    assert read_file(fs, "/b") == data["/b"]


def test_altered_while_unmounted_is_refused_by_the_index_sums(small, make_fs):
    """A row changed in data.mdb behind dcmfs's back: the file's group no
    longer matches its sealed sum, before the object is even opened."""
    import lmdb
    fs, data = small
    key, blob, _ = row(fs, "/c")
    fs.close()
    env = lmdb.open(str(make_fs.root / "index"), max_dbs=16, lock=False)
    with env.begin(write=True) as txn:
        db = env.open_db(b"inline", txn=txn)
        bad = bytearray(blob)
        bad[150] ^= 0xFF
        txn.put(key, bytes(bad), db=db)
    env.close()
    fs = make_fs()
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/c")
    fs.close()


def test_the_flag_is_bound_in_the_sealed_context(small):
    """A record saying 'object file' for an inline object (or the other
    way) does not match the object's context."""
    fs, data = small
    ino, table = refs_of(fs, "/b")
    ref = table[0]
    key, blob, _ = row(fs, "/b")
    with fs.lock, fs.index.begin() as txn:
        inode = txn.get_inode(ino)
    cipher = fs.objects.file_cipher(inode.file_id, inode.secret)
    with pytest.raises(ObjectDamaged) as err:
        fs.objects.read(cipher, inode.file_id, ino, 0, ref._replace(flags=ref.flags & ~INLINE),
                        blob)
    assert err.value.kind == damage.MISMATCH
    assert fs.objects.read(cipher, inode.file_id, ino, 0, ref) == data["/b"]


def test_a_daemon_crash_after_close_loses_nothing(make_fs):
    """The row is in the journal record of the commit: replayed with it."""
    fs = make_fs(MANUAL)
    content = {f"/f{i}": os.urandom(100 + 37 * i) for i in range(20)}
    for path, data in content.items():
        write_file(fs, path, data)
    fh = fs.open("/f3", os.O_RDWR)
    fs.write(fh, b"xyz", 0)  # replaced: the old row goes in the same record
    fs.release(fh)
    content["/f3"] = b"xyz" + content["/f3"][3:]
    fs.unlink("/f4")
    del content["/f4"]
    crash(fs)
    fs = make_fs(MANUAL)
    for path, data in content.items():
        assert read_file(fs, path) == data
    assert_no_dangling(fs)
    fs.close()


def test_readers_in_other_threads_meet_checkpoints(make_fs):
    """Reads outside the core's lock (the FUSE reader threads) find the
    bytes while the batch holding them commits and the next one writes."""
    fs = make_fs(MANUAL)
    content = {f"/r{i}": os.urandom(300 + i) for i in range(30)}
    for path, data in content.items():
        write_file(fs, path, data)
    refs = {}
    with fs.lock, fs.index.begin() as txn:
        for path in content:
            ino = fs._resolve(txn, path)
            inode = txn.get_inode(ino)
            refs[path] = (ino, inode, txn.chunks(ino)[0])
    stop, errors, done = threading.Event(), [], [0]

    def reader():
        try:
            while not stop.is_set():
                for path, (ino, inode, ref) in refs.items():
                    cipher = fs.objects.file_cipher(inode.file_id, inode.secret)
                    got = fs.objects.read(cipher, inode.file_id, ino, 0, ref)
                    assert got == content[path]
                    done[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for round_ in range(15):
            for i in range(10):
                write_file(fs, f"/w{round_}-{i}", os.urandom(200))
            fs.checkpoint()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert done[0] > 0
    fs.close()


def test_fsck_finds_a_stray_row_and_a_damaged_one(make_fs, secret):
    """(rows written as records, counted in the sums: what a bug would leave)"""
    fs = make_fs()
    write_file(fs, "/ok", os.urandom(900))
    write_file(fs, "/bad", os.urandom(800))
    key, blob, _ = row(fs, "/ok")
    bad_key, bad_blob, _ = row(fs, "/bad")
    damaged = bytearray(bad_blob)
    damaged[200] ^= 0xFF
    with fs.lock, fs.index.begin(write=True) as txn:
        txn._write("inline", key[:8] + bytes(16), blob)  # a row no record names
        txn._write("inline", bad_key, bytes(damaged))
    fs.close()
    root = str(make_fs.root)
    report = admin.verify(root, lambda: secret, SMALL, out=QUIET)
    kinds = sorted(f["kind"] for f in report["findings"])
    assert len(kinds) == 2, report
    result = admin.fsck(root, lambda: secret, SMALL, True, False, out=QUIET)
    checks = {p["check"] for p in result["problems"]}
    assert "unreferenced" in checks and "contents" in checks, result
    assert admin.verify(root, lambda: secret, SMALL, out=QUIET)["findings"] == []
    assert os.path.exists(os.path.join(root, fmt.QUARANTINE_DIR, bytes(16).hex()))
    fs = make_fs()
    assert len(read_file(fs, "/ok")) == 900
    assert_no_dangling(fs)
    fs.close()


def test_rebuild_from_snapshots_and_journal_keeps_inline_files(make_fs, secret):
    """The index lost: its snapshots and journal bring the rows back."""
    import shutil
    fs = make_fs()
    content = {"/x": os.urandom(700), "/y": os.urandom(CS + 10)}
    for path, data in content.items():
        write_file(fs, path, data)
    fs.close()
    root = str(make_fs.root)
    fs = make_fs()  # a second session: the first one's snapshot, then more records
    write_file(fs, "/z", os.urandom(333))
    content["/z"] = read_file(fs, "/z")
    fs.close()
    shutil.rmtree(os.path.join(root, "index"))
    result = admin.fsck(root, lambda: secret, SMALL, True, True, out=QUIET)
    assert result["clean"], result
    fs = make_fs()
    for path, data in content.items():
        assert read_file(fs, path) == data
    fs.close()


def test_key_rotation_finish_reseals_inline_objects(tmp_path):
    from dcmfs.storage import keyring
    from dcmfs.storage.header import Secret, init_store
    key = Secret("keyfile", bytes(range(32)))
    root = str(tmp_path / "s")
    init_store(root, key, SMALL)
    data = os.urandom(CS + 900)
    fs = FileSystem(open_store(root, key, for_writing=True), SMALL)
    write_file(fs, "/f", data)
    _, before = refs_of(fs, "/f")
    fs.close()
    keyring.rotate(root, key)
    result = admin.finish_rotation(root, lambda: key, SMALL, out=io.StringIO())
    assert result["after"] == {"1": 2}
    fs = FileSystem(open_store(root, key), SMALL)
    try:
        ino, after = refs_of(fs, "/f")
        assert after[1].flags & INLINE and after[1].oid != before[1].oid
        assert fs.objects.epochs_of(after[1].oid, ino) == {1}
        assert read_file(fs, "/f") == data
        assert_no_dangling(fs)
    finally:
        fs.close()


def test_a_file_whose_inline_chunks_are_current_needs_no_rekey(small):
    """A rotation's finish tries again the files that were open; one whose
    chunks are all under the current epoch needs nothing more (its inline
    object was looked for as an object file: "damaged", so the finish
    waited 30 s for it and counted it as left open)."""
    from dcmfs.core.rekey import _needs_rekey
    fs, _ = small
    for path in ("/a", "/b"):
        ino, _ = refs_of(fs, path)
        assert not _needs_rekey(fs, ino)
    fs.close()


def test_a_reader_whose_read_meets_an_index_swap(small, monkeypatch):
    """A thread reading a row outside the core lock (the re-encoder's pool,
    a scrub, read-ahead) while a compaction swaps the index's environment
    in between its two steps: it reads the new one (it held the old
    environment's database handle: lmdb.Error, "Database handle belongs to
    another environment")."""
    import contextlib
    fs, data = small
    ino, table = refs_of(fs, "/b")
    (ref,) = table.values()
    rows = fs.objects.inline
    assert rows.get(ino, ref.oid) is not None and not rows._staged and not rows._placed
    real, swapped = type(rows)._reading, []

    @contextlib.contextmanager
    def swap_first(self):
        if not swapped:
            swapped.append(True)
            with fs.lock:
                fs.index.compact()
        with real(self):
            yield
    monkeypatch.setattr(type(rows), "_reading", swap_first)
    blob = rows.get(ino, ref.oid)
    assert swapped and blob is not None and len(blob) == stored_bytes(ref)
    monkeypatch.undo()
    forget(fs)
    assert read_file(fs, "/b") == data["/b"]
    fs.close()


def test_a_store_without_the_feature_writes_files(make_fs):
    fs = make_fs(dataclasses.replace(SMALL, inline_max=0))
    write_file(fs, "/s", os.urandom(100))
    _, table = refs_of(fs, "/s")
    assert not table[0].flags & INLINE
    assert os.path.exists(fs.objects.path(table[0].oid))
    fs.close()


def test_a_shred_pass_leaves_no_copy_of_a_deleted_files_inline_object(make_fs):
    """The rows of deleted files leave the index with them; after the
    pass (index compacted, one compacted snapshot) no byte of the store
    holds them (the live ones are still there)."""
    from .test_shred import _everything
    fs = make_fs()
    blobs = {}
    for i in range(40):
        write_file(fs, f"/s{i:02d}", os.urandom(600))
        blobs[i] = row(fs, f"/s{i:02d}")[1]
    fs.checkpoint()
    for i in range(0, 40, 2):
        fs.unlink(f"/s{i:02d}")
    fs.checkpoint()
    assert fs.shred_now()["deletions"] == 20
    held = _everything(make_fs.root)
    assert not [i for i in range(0, 40, 2) if blobs[i] in held]
    assert all(blobs[i] in held for i in range(1, 40, 2))
    fs.close()


def test_read_ahead_asks_the_backend_for_object_files_only(small):
    """An inline object is in the index: fetching it from the store's
    backend (a bucket) would only miss."""
    fs, data = small
    _, table = refs_of(fs, "/a")
    assert fs.readahead._wanted(table, 0, 2 * CS) == [table[0].oid]
    _, table = refs_of(fs, "/b")
    assert fs.readahead._wanted(table, 0, CS) == []
