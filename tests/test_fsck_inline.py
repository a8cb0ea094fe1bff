"""fsck --repair and inline objects (feature ``inline-small-v1``) whose
chunk records or inode record the repair has to drop: the object kept in
the index is salvaged exactly as an object file is (the file comes back in
/lost+found, byte-exact), never deleted without a copy; one that does not
authenticate is damage, and the run is not called clean."""

from __future__ import annotations

import dataclasses
import io
import os

from dcmfs import format as fmt
from dcmfs.app import admin
from dcmfs.storage.header import damage_mark

from .conftest import SMALL, assert_no_dangling
from .test_core import read_file, write_file
from .test_fsck import flip_in_index_value
from .test_inline_recovery import BIG, CS, lost_found

QUIET = io.StringIO()
INLINE = fmt.CHUNK_FLAG_INLINE


class _Store:
    """What flip_in_index_value needs of tests/test_fsck.py's Store."""

    def __init__(self, make_fs, config):
        self.root = str(make_fs.root)
        self.open = lambda: make_fs(config)


def _one_file(make_fs, config, data: bytes) -> tuple[int, list[int]]:
    fs = make_fs(config)
    write_file(fs, "/f", data)
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, "/f")
        flags = [r.flags for _, r in sorted(txn.chunks(ino).items())]
    fs.close()
    return ino, flags


def _repaired(make_fs, secret, config) -> dict:
    return admin.fsck(str(make_fs.root), lambda: secret, config, True, False, out=QUIET)


def _assert_back(make_fs, secret, config, ino: int, data: bytes) -> None:
    fs = make_fs(config)
    try:
        assert lost_found(fs) == {str(ino): data}
        assert_no_dangling(fs)
    finally:
        fs.close()
    root = str(make_fs.root)
    assert admin.verify(root, lambda: secret, config, out=QUIET)["findings"] == []
    again = admin.fsck(root, lambda: secret, config, False, False, out=QUIET)
    assert again["clean"] and again["problems"] == [], again


def test_an_inline_file_whose_inode_record_is_damaged_comes_back(make_fs, secret):
    """/f (900 bytes: one inline chunk), a bit flipped in its inode record:
    the repair drops the record, then the chunk record of no file; the
    object it named, kept in the index, makes the file again in
    /lost+found.  (Before the fix the chunk record's deletion took the
    inline object with it: nothing salvaged, nothing quarantined, and the
    run was called clean.)"""
    data = os.urandom(900)
    ino, flags = _one_file(make_fs, SMALL, data)
    assert flags == [INLINE | fmt.CHUNK_FLAG_LAST]
    flip_in_index_value(_Store(make_fs, SMALL), "inodes", "/f", b"", 20)
    result = _repaired(make_fs, secret, SMALL)
    assert result["clean"] and not result["unrecovered"], result
    assert any(p["ino"] == ino and "lost+found" in p["repaired"]
               for p in result["problems"]), result["problems"]
    assert damage_mark(str(make_fs.root)) is None
    _assert_back(make_fs, secret, SMALL, ino, data)


def test_a_file_whose_last_chunk_is_inline_comes_back_whole(make_fs, secret):
    """Three object files and an inline last chunk, the inode record
    damaged: the whole file comes back, byte-exact (before the fix:
    INO.incomplete, its end lost, exit 34)."""
    data = os.urandom(3 * CS + 700)
    ino, flags = _one_file(make_fs, BIG, data)
    assert [bool(f & INLINE) for f in flags] == [False, False, False, True]
    flip_in_index_value(_Store(make_fs, BIG), "inodes", "/f", b"", 20)
    result = _repaired(make_fs, secret, BIG)
    assert result["clean"] and not result["unrecovered"], result
    _assert_back(make_fs, secret, BIG, ino, data)


def test_inline_rows_of_a_missing_inode_are_salvaged(make_fs, secret):
    """The inode record and the chunk records gone, the inline object
    left (what check_totals saw as a stray entry and deleted): the file
    comes back from it."""
    data = os.urandom(1500)
    ino, _ = _one_file(make_fs, SMALL, data)
    fs = make_fs(SMALL)
    with fs.lock, fs.index.begin(write=True) as txn:
        txn._delete("chunks", ino.to_bytes(8, "big") + (0).to_bytes(8, "big"))
        txn._delete("inodes", ino.to_bytes(8, "big"))
        assert len([r for r in txn.iter_inline() if r[0] == ino]) == 1
    fs.close()
    result = _repaired(make_fs, secret, SMALL)
    assert result["clean"] and not result["unrecovered"], result
    _assert_back(make_fs, secret, SMALL, ino, data)


def test_an_inline_object_that_does_not_authenticate_is_damage(make_fs, secret):
    """An orphaned inline object altered (through the index, so its sums
    agree): not a file; its bytes are copied to the quarantine, and the
    run is not clean."""
    data = os.urandom(1500)
    ino, _ = _one_file(make_fs, SMALL, data)
    fs = make_fs(SMALL)
    with fs.lock, fs.index.begin(write=True) as txn:
        (oid,) = [o for i, o in txn.iter_inline() if i == ino]
        key = ino.to_bytes(8, "big") + oid
        bad = bytearray(txn.get_inline(ino, oid))
        bad[30] ^= 0xFF  # in the sealed context
        txn._write("inline", key, bytes(bad))
        txn._delete("chunks", ino.to_bytes(8, "big") + (0).to_bytes(8, "big"))
        txn._delete("inodes", ino.to_bytes(8, "big"))
    fs.close()
    result = _repaired(make_fs, secret, SMALL)
    assert not result["clean"] and result["unrecovered"] == [ino], result
    assert any(p["oid"] == oid.hex() and "authenticate" in p["what"]
               for p in result["problems"]), result["problems"]
    kept = os.path.join(str(make_fs.root), fmt.QUARANTINE_DIR, oid.hex())
    with open(kept, "rb") as f:
        assert f.read() == bytes(bad)
    fs = make_fs(dataclasses.replace(SMALL, read_only=True))
    with fs.lock, fs.index.begin() as txn:
        assert list(txn.iter_inline()) == []
    fs.close()


def test_a_file_whose_inline_chunk_record_is_damaged_is_restored(make_fs, secret):
    """The inode record intact, the inline chunk's record damaged: the
    file is mended in place from its own inline object (its SHA-256
    matches), not zeroed and moved to /lost+found."""
    data = os.urandom(2 * CS + 700)
    ino, flags = _one_file(make_fs, BIG, data)
    assert [bool(f & INLINE) for f in flags] == [False, False, True]
    flip_in_index_value(_Store(make_fs, BIG), "chunks", "/f", (2).to_bytes(8, "big"), 20)
    result = _repaired(make_fs, secret, BIG)
    assert result["clean"], result
    assert any("restored" in p["repaired"] for p in result["problems"]), result["problems"]
    fs = make_fs(BIG)
    try:
        assert read_file(fs, "/f") == data
        assert_no_dangling(fs)
    finally:
        fs.close()
    assert not os.path.exists(os.path.join(str(make_fs.root), fmt.QUARANTINE_DIR))
