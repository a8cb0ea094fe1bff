"""The damage mark (issue 15, the small ones): ``STORE/needs-fsck`` is
authenticated (an HMAC under a key derived from the master key for this
store) and the index keeps a sealed copy, so an attacker who can write the
store but has no key cannot make a damaged store mount read-write again by
deleting the file, nor pass a mark off as genuine; ``dcmfs fsck`` clears
both.  What is not detected is in docs/security.md."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from dcmfs import errors as E
from dcmfs.storage.header import damage_mark, init_store, open_store

from .conftest import SMALL, flip_byte
from .test_core import read_file
from .test_fsck import Store
from .test_verify_mount import objects_of

RO = dataclasses.replace(SMALL, read_only=True)


@pytest.fixture
def store(make_fs, secret):
    return Store(make_fs, secret)


def _meet_damage(store: Store) -> None:
    """A daemon reads a damaged object: the first integrity error marks the
    store (the file at once, the index at the next checkpoint)."""
    flip_byte(store.objects("/a")[1], 300)
    fs = store.open()
    try:
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/a")
    finally:
        fs.close()
    mark = damage_mark(store.root)
    assert mark is not None
    from dcmfs.storage.header import mark_authentic
    assert mark_authentic(open_store(store.root, store.secret), mark)


def test_deleting_the_mark_file_does_not_allow_read_write_again(store):
    _meet_damage(store)
    os.unlink(os.path.join(store.root, "needs-fsck"))  # no key needed for that
    with pytest.raises(E.StoreDamagedError, match="mark file needs-fsck is missing"):
        store.open()
    fs = store.open(RO)  # read-only mounts still work
    try:
        assert read_file(fs, "/b") == store.content["/b"]
    finally:
        fs.close()
    from dcmfs.app.status import store_report
    assert store_report(store.root, None)["needs_fsck"]  # status sees it without the key
    assert not store.fsck()["clean"]  # the damage itself is still there
    assert damage_mark(store.root) is not None  # ... and fsck marked it again
    store.assert_repaired_clean(["/b", "/d/c"], lost="/a")
    store.open().close()  # a clean fsck cleared the index's record as well


def test_a_clean_fsck_clears_the_record_too(store):
    _meet_damage(store)
    os.unlink(os.path.join(store.root, "needs-fsck"))
    with pytest.raises(E.StoreDamagedError):
        store.open()
    result = store.fsck(repair=True)
    assert result["clean"], result
    store.open().close()
    assert damage_mark(store.root) is None


def test_offline_verify_marks_the_index_as_well(store):
    flip_byte(store.objects("/b")[0], 200)
    assert store.verify()["findings"]
    os.unlink(os.path.join(store.root, "needs-fsck"))
    with pytest.raises(E.StoreDamagedError, match="missing"):
        store.open()


def test_forged_copied_and_old_marks(tmp_path, secret, store):
    """Any mark refuses read-write openings; one that does not authenticate
    is named as such, a plain one from an older dcmfs as such."""
    path = os.path.join(store.root, "needs-fsck")
    # a mark from an older dcmfs (plain JSON): still damaged
    with open(path, "w") as f:
        json.dump({"since": "2026-01-01", "reason": "integrity errors", "errors": 1}, f)
    with pytest.raises(E.StoreDamagedError, match="older dcmfs"):
        store.open()
    assert store.fsck()["clean"] and damage_mark(store.root) is None  # fsck clears it
    # a genuine mark of another store, copied in
    other = tmp_path / "other"
    init_store(str(other), secret, SMALL)
    from dcmfs.storage.header import set_damage_mark
    set_damage_mark(open_store(str(other), secret), "integrity errors")
    shutil.copy(other / "needs-fsck", path)
    with pytest.raises(E.StoreDamagedError, match="does not authenticate"):
        store.open()
    # our own genuine mark, altered
    os.unlink(path)
    set_damage_mark(open_store(store.root, secret), "integrity errors")
    with open(path) as f:
        mark = json.load(f)
    with pytest.raises(E.StoreDamagedError, match="integrity errors"):
        store.open()
    mark["reason"] = "\x1b]0;owned\x07nothing to see"
    with open(path, "w") as f:
        json.dump(mark, f)
    with pytest.raises(E.StoreDamagedError, match="does not authenticate") as exc:
        store.open()
    assert "\x1b" not in str(exc.value) and "owned" not in str(exc.value)
    assert store.fsck()["clean"] and damage_mark(store.root) is None
    store.open().close()


def test_deleting_the_mark_of_a_mounted_store(mount_env):
    """The attack of issue 15 through the command line: damage met by the
    daemon, the mark file deleted, a read-write mount refused (exit 19)."""
    m = mount_env
    m.expect_log_errors = True
    m.mount("-o", "reencode=0")
    (m.mnt / "f").write_bytes(os.urandom(200_000))
    (m.mnt / "g").write_bytes(b"intact")
    m.umount()
    flip_byte(objects_of(m, "/f")[0], 300)
    m.mount("-o", "reencode=0")
    with pytest.raises(OSError):
        (m.mnt / "f").read_bytes()
    m.umount()
    (m.store / "needs-fsck").unlink()
    r = m.mount(check=False)
    assert r.returncode == E.StoreDamagedError.exit_code == 19, r.stderr
    assert "is missing" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    status = json.loads(m.cli("status", m.store, "--json", check=True).stdout)
    assert status["needs_fsck"]
    m.mount("-o", "ro")
    assert (m.mnt / "g").read_bytes() == b"intact"
    m.umount()
    r = m.cli("fsck", m.store, "--key-file", m.key, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount()
    assert (m.mnt / "g").read_bytes() == b"intact"
