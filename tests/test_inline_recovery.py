"""Recovery of inline objects (feature ``inline-small-v1``): an index
rebuilt from the objects alone (index and snapshots lost) or from a
snapshot and the journals; a content commit that fails, meets a
checkpoint, and is retried."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys

import pytest

from dcmfs import errors as E
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
READ_ONLY = dataclasses.replace(SMALL, read_only=True)


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
        inos = {p: fs._resolve(txn, p) for p in content}
        flags = {p: [bool(r.flags & INLINE) for _, r in sorted(txn.chunks(ino).items())]
                 for p, ino in inos.items()}
    assert flags == {"/small": [True], "/large": [False, False, False, True],
                     "/plain": [False, False, False]}
    fs.close()
    return content, inos


def rebuild_from_the_objects_alone(root: str, secret, tmp_path) -> subprocess.CompletedProcess:
    """index/ and snapshots/ lost: `dcmfs fsck --rebuild-index`."""
    shutil.rmtree(os.path.join(root, "snapshots"))
    shutil.rmtree(os.path.join(root, "index"))
    key = tmp_path / "key"
    key.write_bytes(secret.value)
    key.chmod(0o600)
    return subprocess.run([sys.executable, "-m", "dcmfs.cli", "fsck", root, "--rebuild-index",
                           "--key-file", str(key)], capture_output=True, text=True, timeout=300)


def lost_found(fs) -> dict[str, bytes]:
    return {name: read_file(fs, "/lost+found/" + name) for name, _ in fs.readdir("/lost+found")}


def test_rebuild_from_the_objects_alone(make_fs, secret, tmp_path):
    """index/ and snapshots/ lost: /plain comes back byte-exact; /large
    comes back incomplete (its three object files, its inline end lost),
    named, reported and noted so, and the run is not called clean; /small
    is gone without a trace, which the report says can happen.  (Files
    made before file-secrets-v1: a file's secret is in the lost index.)"""
    from dcmfs.storage.header import damage_mark
    content, inos = three_files(make_fs, legacy=True)
    root = str(make_fs.root)
    run = rebuild_from_the_objects_alone(root, secret, tmp_path)
    assert run.returncode == E.DamageFound.exit_code, run.stderr
    text = run.stdout
    large, small = inos["/large"], inos["/small"]
    assert "inline objects" in text and "files made only of them (small files) are lost" \
        in text, text
    assert f"/lost+found/{large}.incomplete: the file's end is lost" in text, text
    assert f"inodes {large};" in text and f"'dcmfs fsck {root}'" in text, text
    assert "incomplete" in damage_mark(root)["reason"], damage_mark(root)
    fs = make_fs(dataclasses.replace(BIG, read_only=True))  # (marked damaged)
    got = lost_found(fs)
    assert got == {str(inos["/plain"]): content["/plain"],
                   f"{large}.incomplete": content["/large"][:3 * CS]}
    note = fs.getxattr(f"/lost+found/{large}.incomplete", "user.dcmfs.fsck")
    assert b"INCOMPLETE" in note and b"inline object" in note
    assert b"INCOMPLETE" not in fs.getxattr(f"/lost+found/{inos['/plain']}", "user.dcmfs.fsck")
    assert small not in {fs.getattr("/lost+found/" + n)["st_ino"] for n in got}
    fs.close()
    # what the rebuild made is consistent: a check finds nothing more, and
    # clears the mark the rebuild left
    again = admin.fsck(root, lambda: secret, BIG, False, False, out=QUIET)
    assert again["clean"] and again["problems"] == [], again
    assert damage_mark(root) is None
    assert admin.verify(root, lambda: secret, BIG, out=QUIET)["findings"] == []


def test_a_rebuild_that_lost_only_small_files_is_not_called_clean(make_fs, secret, tmp_path):
    """index/ and snapshots/ lost, every file of the store inline only: the
    rebuild brings nothing back and cannot name what it lost, so it exits
    34 and leaves the store marked damaged until a check is run again (it
    said "fsck: clean." and cleared the mark)."""
    from dcmfs.storage.header import damage_mark
    fs = make_fs(BIG)
    for i in range(3):
        write_file(fs, f"/note{i}.txt", os.urandom(700))
    fs.close()
    root = str(make_fs.root)
    run = rebuild_from_the_objects_alone(root, secret, tmp_path)
    assert run.returncode == E.DamageFound.exit_code, (run.stdout, run.stderr)
    assert "files made only of them (small files) are lost" in run.stdout, run.stdout
    assert "fsck: clean." not in run.stdout and f"'dcmfs fsck {root}'" in run.stdout
    assert "may be lost" in damage_mark(root)["reason"], damage_mark(root)
    again = admin.fsck(root, lambda: secret, BIG, False, False, out=QUIET)
    assert again["clean"] and damage_mark(root) is None, again


def test_rebuild_from_the_objects_alone_names_holes_of_lost_inline_chunks(make_fs, secret):
    """A chunk of repeated bytes compresses into an inline object (at 64 KiB
    chunks; the default chunk size frames full chunks, never inline): in a
    rebuild from the objects alone its bytes are zeros, which the rebuild
    cannot tell from a hole: it says so."""
    cs = SMALL.chunk_size
    fs = make_fs(SMALL)
    fs._secrets = False
    data = os.urandom(cs) + b"x" * cs + os.urandom(cs + 5000)
    write_file(fs, "/f", data)
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, "/f")
        flags = [bool(r.flags & INLINE) for _, r in sorted(txn.chunks(ino).items())]
    assert flags == [False, True, False, False]
    fs.close()
    root = str(make_fs.root)
    shutil.rmtree(os.path.join(root, "snapshots"))
    shutil.rmtree(os.path.join(root, "index"))
    result = admin.fsck(root, lambda: secret, SMALL, False, True, out=QUIET)
    assert not result["clean"] and result["unrecovered"] == [ino], result
    said = [p for p in result["problems"] if p["ino"] == ino and "no object" in p["what"]]
    assert said and f"{cs}-{2 * cs - 1}" in said[0]["what"], result["problems"]
    fs = make_fs(READ_ONLY)
    assert lost_found(fs) == {str(ino): data[:cs] + bytes(cs) + data[2 * cs:]}
    assert b"are zeros" in fs.getxattr(f"/lost+found/{ino}", "user.dcmfs.fsck")
    fs.close()


def test_rebuild_from_the_objects_alone_brings_a_reencoded_dicom_file_back(make_fs, secret):
    """The re-encoder writes object files whatever their size (its small
    header extent too): a DICOM file it stored as extents comes back whole
    from the objects alone, byte-exact (the run not clean: what only the
    index held may be lost with it)."""
    from .conftest import ct_file
    from .test_dicom import REAL
    cfg = dataclasses.replace(REAL, reencode=True)
    fs = make_fs(cfg)
    fs._secrets = False
    data = ct_file().read_bytes()
    write_file(fs, "/ct.dcm", data)
    fs.recompress()
    assert fs.reencoder.wait_idle(timeout=600)
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, "/ct.dcm")
        table = txn.chunks(ino)
    assert all(r.flags & fmt.CHUNK_FLAG_EXTENT and not r.flags & INLINE
               for r in table.values()) and len(table) > 1
    fs.close()
    root = str(make_fs.root)
    shutil.rmtree(os.path.join(root, "snapshots"))
    shutil.rmtree(os.path.join(root, "index"))
    result = admin.fsck(root, lambda: secret, cfg, False, True, out=QUIET)
    assert result["remaining"] == [] and result["unrecovered"] == [], result
    assert not result["clean"] and result["rebuilt"]["inline_lost"], result
    assert admin.fsck(root, lambda: secret, cfg, False, False, out=QUIET)["clean"]
    fs = make_fs(cfg)
    assert lost_found(fs) == {str(ino): data}
    fs.close()


def test_the_beginning_of_a_version_whose_end_is_lost():
    """assemble_partial: fixed chunks, the newest object of each; extents
    from the first while they follow one another, at their offsets."""
    from dcmfs.integrity.repair import assemble_partial
    from dcmfs.storage.objects import ChunkContext
    ext = fmt.CHUNK_FLAG_EXTENT

    def ctx(index, gen, flags=0, plain=100):
        return ChunkContext(bytes([index, gen]) * 8, b"f" * 16, 5, index, gen, 1, flags,
                            plain, 50)

    fixed = assemble_partial([ctx(0, 1), ctx(1, 1), ctx(1, 3), ctx(3, 2)], 100)
    assert {i: r.generation for i, r in fixed.items()} == {0: 1, 1: 3, 3: 2}
    extents = assemble_partial([ctx(0, 4, ext, 30), ctx(1, 4, ext, 70), ctx(3, 4, ext),
                                ctx(0, 2, ext)], 100)
    assert {i: (r.generation, r.offset) for i, r in extents.items()} == {0: (4, 0), 1: (4, 30)}
    assert assemble_partial([ctx(1, 4, ext), ctx(2, 4, ext)], 100) is None
    assert assemble_partial([], 100) is None


def test_rebuild_from_a_snapshot_and_the_journals_keeps_every_inline_chunk(make_fs, secret):
    """index/ lost, snapshots/ kept: the snapshot and the journal records
    after it (an overwrite replacing an inline chunk, an unlink, a new
    file) bring every file back byte-exact, under its name."""
    content, inos = three_files(make_fs, legacy=False)
    fs = make_fs(BIG)  # a second session: after the close's snapshot
    for path, data in (("/small", os.urandom(800)), ("/large", os.urandom(2 * CS + 300))):
        fh = fs.open(path, os.O_WRONLY | os.O_TRUNC)  # inline chunks replaced
        fs.write(fh, data, 0)
        fs.release(fh)
        content[path] = data
    content["/new"] = os.urandom(400)
    write_file(fs, "/new", content["/new"])
    fs.unlink("/plain")
    del content["/plain"]
    fs.close()
    root = str(make_fs.root)
    shutil.rmtree(os.path.join(root, "index"))
    result = admin.fsck(root, lambda: secret, BIG, False, True, out=QUIET)
    assert result["clean"] and not result.get("unrecovered"), result
    assert result["rebuilt"]["snapshot"] and not result["rebuilt"].get("inline_lost")
    fs = make_fs(BIG)
    for path, data in content.items():
        assert read_file(fs, path) == data, path
    assert_no_dangling(fs)
    fs.close()
    assert admin.verify(root, lambda: secret, BIG, out=QUIET)["findings"] == []


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


def forget(fs) -> None:
    fs.data.cache = type(fs.data.cache)(1 << 20)  # decoded chunks forgotten


def assert_rows_match_records(fs):
    """The inline rows are exactly those the chunk records name."""
    with fs.lock, fs.index.begin() as txn:
        named = {(ino, r.oid) for ino, _, r in txn.iter_all_chunks() if r.flags & INLINE}
        rows = set(txn.iter_inline())
    assert rows == named


@pytest.mark.parametrize("fault", ["index full", "journal write"])
@pytest.mark.parametrize("case", ["new", "overwrite", "written again"])
def test_a_commit_retried_after_a_checkpoint(make_fs, secret, monkeypatch, fault, case):
    """The commit fails after its chunk record took the staged inline
    object (the disk full as the inode record is put; the journal write
    failing), the batch is checkpointed, the retry commits: the rows are
    those of the records, the file reads back after a remount, verify and
    fsck are clean.  (Before the fix the checkpoint forgot the object the
    aborted operation had taken: the chunk no longer read, and the
    retry failed, "not sealed in this session".)"""
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
    forget(fs)
    assert fs.read(fh, len(data) + 10, 0) == data  # the uncommitted chunk still reads
    if case == "written again":  # before the retry: a new object for the chunk
        data = data[:100] + os.urandom(50) + data[150:]
        fs.write(fh, data[100:150], 100)
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, "/f") == data
    assert_rows_match_records(fs)
    assert_no_dangling(fs)
    fs.checkpoint()
    rows = fs.index.inline
    assert not rows._staged and not rows._placed  # nothing held back in memory
    fs.close()
    fs = make_fs(SMALL)
    assert read_file(fs, "/f") == data
    assert_rows_match_records(fs)
    assert_no_dangling(fs)
    fs.close()
    root = str(make_fs.root)
    assert admin.verify(root, lambda: secret, SMALL, out=QUIET)["findings"] == []
    assert admin.fsck(root, lambda: secret, SMALL, False, False, out=QUIET)["clean"]
