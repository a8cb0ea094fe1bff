"""Object files kept open for a random reader's frames
(:mod:`dcmfs.storage.keptfds`): what is read through a kept descriptor is
authenticated as before, the store's own deletes and moves drop it, and a
descriptor in use is closed only after its last read."""

from __future__ import annotations

import os

import pytest

from dcmfs import errors as E
from dcmfs.storage.backend import BackendMissing, LocalBackend
from dcmfs.storage.damage import object_name
from dcmfs.storage.keptfds import KeptFiles

from .conftest import flip_byte
from .test_core import write_file
from .test_frames import CS, FS, FRAMED, assert_range_fails, fresh, frame_spans, mixed, pread


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def kept_fs(make_fs):
    fs = make_fs(FRAMED)
    data = mixed(2 * CS, 3)
    write_file(fs, "/f", data)
    return fs, data


def oids_of(fs, path):
    with fs.lock, fs.index.begin() as txn:
        table = txn.chunks(fs._resolve(txn, path))
    return [table[i].oid for i in sorted(table)]


def test_random_reads_keep_their_object_files_open(kept_fs):
    fs, data = kept_fs
    kept = fs.objects.backend.kept
    fresh(fs)
    assert len(kept) == 0
    for off in (10, FS + 10, 3 * FS + 10, CS + 10):
        assert pread(fs, "/f", off, 4096) == data[off:off + 4096]
    assert len(kept) == 2  # one per object read, not one per read
    fs.objects.close()
    assert len(kept) == 0


def test_damage_in_place_is_seen_through_a_kept_descriptor(kept_fs):
    fs, data = kept_fs
    fresh(fs)
    assert pread(fs, "/f", FS + 10, 4096) == data[FS + 10:FS + 4106]  # kept open now
    obj, starts = frame_spans(fs, "/f", 0)
    flip_byte(obj, (starts[1] + starts[2]) // 2)
    fs.data.cache = type(fs.data.cache)(FRAMED.read_cache_bytes)  # decoded units only
    with pytest.raises(E.IntegrityError):
        pread(fs, "/f", FS + 10, 4096)
    # a failed frame drops its descriptor: fsck --repair may put the right file there
    assert object_name(oids_of(fs, "/f")[0]) not in fs.objects.backend.kept._open


def test_a_deleted_object_is_not_read_through_a_kept_descriptor(kept_fs):
    fs, data = kept_fs
    fresh(fs)
    oid = oids_of(fs, "/f")[1]
    assert pread(fs, "/f", CS + 10, 4096) == data[CS + 10:CS + 4106]
    name = object_name(oid)
    fs.objects.delete(oid)
    with pytest.raises(BackendMissing):
        fs.objects.backend.get_kept(name, 200, 300)


def test_quarantine_and_forget_drop_the_descriptor(kept_fs, tmp_path):
    fs, data = kept_fs
    fresh(fs)
    first, second = oids_of(fs, "/f")
    pread(fs, "/f", 10, 4096)
    pread(fs, "/f", CS + 10, 4096)
    kept = fs.objects.backend.kept
    fs.objects.quarantine(first, str(tmp_path))
    fs.objects.forget_kept(second)
    assert len(kept) == 0
    assert_range_fails(fs, "/f", 10)  # moved away: missing now, not read through an old fd
    assert pread(fs, "/f", CS + 10, 4096) == data[CS + 10:CS + 4106]  # opened again


def test_a_descriptor_dropped_while_read_is_closed_after_the_read(tmp_path):
    backend = LocalBackend(str(tmp_path))
    backend.put("objects/a", b"a" * 100)
    backend.put("objects/b", b"b" * 100)
    kept = KeptFiles(limit=1)
    held = kept._take("objects/a", backend.path("objects/a"))  # a read in progress
    assert kept.pread("objects/b", backend.path("objects/b"), 0, 3) == b"bbb"  # evicts a
    assert is_open(held.fd)  # still read through: not closed under its reader
    kept.forget("objects/b")
    kept._give(held)
    assert not is_open(held.fd)
    assert len(kept) == 0


def test_a_put_replaces_what_is_read(tmp_path):
    backend = LocalBackend(str(tmp_path))
    backend.put("objects/a", b"old" * 10)
    assert backend.get_kept("objects/a", 0, 3) == b"old"
    backend.put("objects/a", b"new" * 10)  # written to a new file, renamed over
    assert backend.get_kept("objects/a", 0, 3) == b"new"
    backend.close()
    assert len(backend.kept) == 0


def test_the_limit_follows_the_open_files_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert KeptFiles()._limit == 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert KeptFiles(limit=3)._limit == 3


def test_an_object_deleted_by_hand_is_read_until_its_descriptor_is_dropped(kept_fs):
    """What docs/security.md says of a swap under a mount holds for an
    object file deleted (or moved away) by hand: the random reader goes on
    reading the authentic object through the kept descriptor, a whole read
    opens the name afresh and finds it missing, and once the descriptor is
    dropped the random reader does too."""
    fs, data = kept_fs
    fresh(fs)
    oid = oids_of(fs, "/f")[1]
    assert pread(fs, "/f", CS + 10, 4096) == data[CS + 10:CS + 4106]  # kept open now
    os.unlink(fs.objects.path(oid))
    fs.data.cache = type(fs.data.cache)(FRAMED.read_cache_bytes)  # decoded units only
    off = CS + 2 * FS + 10
    assert pread(fs, "/f", off, 4096) == data[off:off + 4096]
    with pytest.raises(E.IntegrityError, match="missing"):
        fs.objects.load(oid)
    fs.objects.forget_kept(oid)
    assert_range_fails(fs, "/f", off)


def test_a_name_deleted_while_it_is_opened_is_not_kept(tmp_path, monkeypatch):
    """The open of a name not kept yet runs outside the lock: a delete (or
    a move) that dropped the name meanwhile found nothing to drop, and the
    descriptor opened before it was kept, holding the deleted file's space
    and answering later reads of the name from the file that is gone."""
    from dcmfs.storage import keptfds
    backend = LocalBackend(str(tmp_path))
    backend.put("objects/a", b"a" * 100)
    real = os.open
    opened = []

    def open_then_deleted(path, flags, *args):
        fd = real(path, flags, *args)
        opened.append(fd)
        monkeypatch.setattr(keptfds.os, "open", real)
        backend.delete("objects/a")  # another thread's delete, between open and keep
        return fd

    monkeypatch.setattr(keptfds.os, "open", open_then_deleted)
    assert backend.get_kept("objects/a", 0, 3) == b"aaa"  # begun before the delete
    assert len(backend.kept) == 0 and not is_open(opened[0])
    with pytest.raises(BackendMissing):
        backend.get_kept("objects/a", 0, 3)


def test_a_name_read_while_it_is_deleted_is_not_kept(tmp_path, monkeypatch):
    """The delete dropped the name's descriptor before it unlinked the
    file: a read between the two opened the name again and kept it."""
    from dcmfs.storage import backend as backend_module
    backend = LocalBackend(str(tmp_path))
    backend.put("objects/a", b"a" * 100)
    real = os.unlink

    def read_then_unlink(path, *args, **kwargs):
        monkeypatch.setattr(backend_module.os, "unlink", real)
        assert backend.get_kept("objects/a", 0, 3) == b"aaa"  # another thread's read
        real(path, *args, **kwargs)

    monkeypatch.setattr(backend_module.os, "unlink", read_then_unlink)
    backend.delete("objects/a")
    assert len(backend.kept) == 0
    with pytest.raises(BackendMissing):
        backend.get_kept("objects/a", 0, 3)
