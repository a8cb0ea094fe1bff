"""Damaged, swapped, moved and rolled-back objects are detected, never returned."""

from __future__ import annotations

import os
import shutil

import pytest

from dcmfs import errors as E

from .conftest import SMALL, flip_byte
from .test_core import read_file, write_file

CS = SMALL.chunk_size


def chunk_paths(fs, path):
    with fs.lock, fs.index.begin() as txn:
        table = txn.chunks(fs._resolve(txn, path))
    return [fs.objects.path(table[i].oid) for i in sorted(table)]


@pytest.fixture
def two_files(make_fs):
    fs = make_fs()
    a, b = os.urandom(3 * CS), os.urandom(3 * CS)
    write_file(fs, "/a", a)
    write_file(fs, "/b", b)
    return fs, a, b


def assert_only_a_damaged(fs, b):
    fs.data.cache = type(fs.data.cache)(1 << 20)  # forget decoded chunks
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/a")
    assert read_file(fs, "/b") == b


@pytest.mark.parametrize("where", ["header", "context", "payload", "tag"])
def test_flipped_bit(two_files, where):
    fs, a, b = two_files
    path = chunk_paths(fs, "/a")[1]
    offset = {"header": 1, "context": 30, "payload": 120, "tag": os.path.getsize(path) - 1}
    flip_byte(path, offset[where])
    assert_only_a_damaged(fs, b)


def test_truncated_object(two_files):
    fs, a, b = two_files
    path = chunk_paths(fs, "/a")[2]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    assert_only_a_damaged(fs, b)


def test_deleted_object(two_files):
    fs, a, b = two_files
    os.unlink(chunk_paths(fs, "/a")[0])
    assert_only_a_damaged(fs, b)


def test_swapped_objects_of_one_file(two_files):
    fs, a, b = two_files
    p0, p1, _ = chunk_paths(fs, "/a")
    tmp = p0 + ".swap"
    os.rename(p0, tmp)
    os.rename(p1, p0)
    os.rename(tmp, p1)
    assert_only_a_damaged(fs, b)


def test_object_of_another_file_copied_in(two_files):
    fs, a, b = two_files
    shutil.copyfile(chunk_paths(fs, "/b")[0], chunk_paths(fs, "/a")[0])
    assert_only_a_damaged(fs, b)


def test_rolled_back_object(two_files):
    fs, a, b = two_files
    old_path = chunk_paths(fs, "/a")[1]
    with open(old_path, "rb") as f:
        old_blob = f.read()
    fh = fs.open("/a", os.O_RDWR)
    fs.write(fh, os.urandom(10), CS + 5)  # chunk 1 gets a new generation
    fs.fsync(fh)
    fs.release(fh)
    fs.checkpoint()  # superseded objects are deleted at the next checkpoint
    new_path = chunk_paths(fs, "/a")[1]
    assert new_path != old_path and not os.path.exists(old_path)
    with open(new_path, "wb") as f:  # put the older version back in its place
        f.write(old_blob)
    assert_only_a_damaged(fs, b)


def test_tampered_index_value_is_refused(two_files):
    fs, a, b = two_files
    with fs.lock, fs.index.begin(write=True) as txn:
        ino_a = fs._resolve(txn, "/a")
        ino_b = fs._resolve(txn, "/b")
        db = fs.index.dbs["inodes"]
        raw_b = txn.txn.get(ino_b.to_bytes(8, "big"), db=db)
        txn.txn.put(ino_a.to_bytes(8, "big"), raw_b, db=db)  # b's record under a's key
    fs._inodes.clear()
    with pytest.raises(E.IntegrityError):
        fs.getattr("/a")
    assert read_file(fs, "/b") == b
