"""Recovery of inline objects (feature ``inline-small-v1``): an index
rebuilt from the objects alone (index and snapshots lost) or from a
snapshot and the journals; a content commit that fails, meets a
checkpoint, and is retried."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil

import pytest

from dcmfs import format as fmt
from dcmfs.app import admin
from dcmfs.config import Config

from .conftest import SMALL, assert_no_dangling
from .test_core import read_file, write_file

QUIET = io.StringIO()
INLINE = fmt.CHUNK_FLAG_INLINE
#: the default chunk size (1 MiB): a larger file's last chunk is inline
BIG = dataclasses.replace(SMALL, chunk_size=Config().chunk_size)
CS = BIG.chunk_size


def three_files(make_fs, legacy: bool):
    """/small: inline only; /large: 3 full chunks (object files) and an
    inline last chunk; /plain: object files only (its last chunk too)."""
    fs = make_fs(BIG)
    fs._secrets = not legacy
    content = {"/small": os.urandom(900), "/large": os.urandom(3 * CS + 700),
               "/plain": os.urandom(2 * CS + 9000)}
    for path, data in content.items():
        write_file(fs, path, data)
    with fs.lock, fs.index.begin() as txn:
        flags = {p: [bool(r.flags & INLINE) for _, r in sorted(txn.chunks(fs._resolve(txn, p)).items())]
                 for p in content}
        inos = {p: fs._resolve(txn, p) for p in content}
    assert flags == {"/small": [True], "/large": [False, False, False, True],
                     "/plain": [False, False, False]}
    fs.close()
    return content, inos


# --- a content commit that fails, a checkpoint, the retry ----------------------

def _fail_once(monkeypatch, cls, name, exc):
    """cls.name raises ``exc`` on its next call only."""
    real = getattr(cls, name)
    state = {"armed": True}

    def wrapper(self, *args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def assert_rows_match_records(fs):
    """The inline rows are exactly those the chunk records name."""
    with fs.lock, fs.index.begin() as txn:
        named = {(ino, r.oid) for ino, _, r in txn.iter_all_chunks() if r.flags & INLINE}
        rows = set(txn.iter_inline())
    assert rows == named


@pytest.mark.parametrize("fault", ["index full", "journal write"])
@pytest.mark.parametrize("case", ["new", "overwrite"])
def test_a_commit_retried_after_a_checkpoint(make_fs, secret, monkeypatch, fault, case):
    """The commit fails after its chunk record took the staged inline
    object (the disk full as the inode record is put; the journal write
    failing), the batch is checkpointed, the retry commits: the rows are
    those of the records, the file reads back after a remount, verify and
    fsck are clean.  (Before the fix the checkpoint forgot the object the
    aborted operation had taken: the retry failed, "not sealed in this
    session".)"""
    from dcmfs import errors as E
    from dcmfs.index import Txn
    from dcmfs.index.journal import Journal
    fs = make_fs(SMALL)
    old = os.urandom(1200)
    if case == "overwrite":  # an inline chunk replaced by another one
        write_file(fs, "/f", old)
        fh = fs.open("/f", os.O_WRONLY | os.O_TRUNC)
    else:
        fh = fs.create("/f", 0o644, os.O_WRONLY, 0, 0)
    write_file(fs, "/other", os.urandom(700))  # a neighbour in the same batch
    data = os.urandom(1500)
    fs.write(fh, data, 0)
    if fault == "index full":
        exc = E.NoSpaceError("The disk under the store is full.")
        _fail_once(monkeypatch, Txn, "put_inode", exc)
    else:
        exc = E.StoreIOError("injected fault")
        _fail_once(monkeypatch, Journal, "append", exc)
    with pytest.raises(type(exc)):
        fs.flush(fh)
    fs.checkpoint()
    assert_rows_match_records(fs)
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, "/f") == data
    assert_rows_match_records(fs)
    assert_no_dangling(fs)
    fs.close()
    fs = make_fs(SMALL)
    assert read_file(fs, "/f") == data
    assert_rows_match_records(fs)
    assert_no_dangling(fs)
    fs.close()
    root = str(make_fs.root)
    assert admin.verify(root, lambda: secret, SMALL, out=QUIET)["findings"] == []
    assert admin.fsck(root, lambda: secret, SMALL, False, False, out=QUIET)["clean"]
