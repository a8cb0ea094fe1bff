"""The index journal: daemon crashes lose nothing closed, power loss keeps a
consistent prefix, fsync'ed files always survive."""

from __future__ import annotations

import dataclasses
import os

import pytest

from dcmfs import errors as E
from dcmfs.index import witness
from dcmfs.index.journal import DELETE, PUT, Journal

from .conftest import SMALL, assert_no_dangling, crash
from .test_core import CS, read_file, write_file
from .test_integrity import chunk_paths

#: no background checkpoints: the tests decide when the index is durable
MANUAL = dataclasses.replace(SMALL, checkpoint_interval=0)
#: every chunk an object file (no small one kept in the index): what a power
#: cut does to an object file that did not reach the disk
FILES = dataclasses.replace(MANUAL, inline_max=0)


def test_journal_records_roundtrip_and_stop_at_damage(tmp_path):
    key, sid = os.urandom(32), os.urandom(16)
    j = Journal(str(tmp_path / "j"), key, sid)
    ops1 = [(PUT, 1, b"k1", b"v1"), (DELETE, 2, b"k2", None)]
    ops2 = [(PUT, 0, b"stats", b"x" * 1000)]
    j.append(1, ops1)
    j.append(2, ops2)
    size_after_two = j.size
    j.append(3, [(PUT, 1, b"k3", b"v3")])
    j.close()

    j = Journal(str(tmp_path / "j"), key, sid)
    assert list(j.records(0)) == [(1, ops1), (2, ops2), (3, [(PUT, 1, b"k3", b"v3")])]
    assert [s for s, _ in j.records(2)] == [3]
    j.close()

    # a torn tail (power loss in the middle of a write) ends the records there
    with open(tmp_path / "j", "r+b") as f:
        f.truncate(size_after_two + 10)
    j = Journal(str(tmp_path / "j"), key, sid)
    assert [s for s, _ in j.records(0)] == [1, 2]
    j.close()

    # an altered record ends them too, and nothing after it is believed
    with open(tmp_path / "j", "r+b") as f:
        f.seek(size_after_two - 5)
        b = f.read(1)
        f.seek(size_after_two - 5)
        f.write(bytes([b[0] ^ 1]))
    j = Journal(str(tmp_path / "j"), key, sid)
    assert [s for s, _ in j.records(0)] == [1]
    j.close()

    # the wrong key, or another store's journal, yields nothing / is refused
    assert list(Journal(str(tmp_path / "j"), os.urandom(32), sid).records(0)) == []
    with pytest.raises(E.StoreIOError):
        Journal(str(tmp_path / "j"), key, os.urandom(16))


def test_records_out_of_sequence_are_not_replayed(tmp_path):
    key, sid = os.urandom(32), os.urandom(16)
    j = Journal(str(tmp_path / "j"), key, sid)
    j.append(1, [(PUT, 1, b"a", b"1")])
    j.append(3, [(PUT, 1, b"b", b"2")])  # 2 is missing: 3 must not be applied
    assert [s for s, _ in j.records(0)] == [1]


def test_daemon_crash_without_checkpoint_loses_nothing_closed(make_fs):
    fs = make_fs(MANUAL)
    files = {f"/f{i}": os.urandom(i * 7000 + 1) for i in range(12)}
    for path, data in files.items():
        write_file(fs, path, data)
    fs.mkdir("/d", 0o755, 0, 0)
    fs.rename("/f0", "/d/moved")
    files["/d/moved"] = files.pop("/f0")
    fs.unlink("/f1")
    del files["/f1"]
    assert fs.index.pending_records > 0
    crash(fs)  # nothing checkpointed: only the journal knows

    fs = make_fs(MANUAL)
    for path, data in files.items():
        assert read_file(fs, path) == data
    with pytest.raises(E.NotFound):
        fs.getattr("/f1")
    assert fs.stats()[0] == len(files)
    assert fs.index.pending_records == 0  # replayed and checkpointed
    assert_no_dangling(fs)


def _power_loss(fs, journal_size: int, lost_objects: list[str], monkeypatch) -> None:
    """What a power cut does: the journal keeps what was synced, objects
    written since the last sync may be gone, and the machine boots again
    (the witness then requires only what was synced)."""
    path = fs.index.journal.path
    crash(fs)
    boot = os.urandom(16)
    monkeypatch.setattr(witness, "boot_id", lambda: boot)
    with open(path, "r+b") as f:
        f.truncate(journal_size)
    for p in lost_objects:
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)


def test_power_loss_keeps_fsynced_files_and_old_versions(make_fs, monkeypatch):
    fs = make_fs(FILES)
    old = os.urandom(2 * CS + 5)
    write_file(fs, "/old", old)
    fs.checkpoint()

    synced = os.urandom(CS + 9)
    fh = fs.create("/synced", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, synced, 0)
    fs.fsync(fh)
    fs.release(fh)

    fh = fs.open("/old", os.O_WRONLY)  # rewritten, closed, never fsynced
    fs.write(fh, os.urandom(CS), 0)
    fs.release(fh)
    write_file(fs, "/unsynced", os.urandom(3000))
    lost = chunk_paths(fs, "/unsynced")
    _power_loss(fs, fs.index.journal.size + 0, lost, monkeypatch)

    fs = make_fs(FILES)
    # the journal said more, but an object it names did not survive: the
    # replay stops before that record, so the index is a consistent prefix
    assert read_file(fs, "/synced") == synced
    # its creation was intact, its content was not: an empty file, as ext4
    # leaves a file that was written but not fsynced before a power cut
    assert fs.getattr("/unsynced")["st_size"] == 0
    assert read_file(fs, "/old") != old  # its rewrite came before the lost object
    assert_no_dangling(fs)
    fs.close()

    # and when the journal itself was cut at the last fsync
    fs = make_fs(FILES)
    write_file(fs, "/a", b"a" * 100)
    fs.checkpoint()
    fh = fs.open("/a", os.O_WRONLY)
    fs.write(fh, b"b" * 100, 0)
    fs.fsync(fh)
    fs.release(fh)
    durable_size = fs.index.journal.size
    fh = fs.open("/a", os.O_WRONLY)
    fs.write(fh, b"c" * 100, 0)
    fs.release(fh)
    _power_loss(fs, durable_size, [], monkeypatch)
    fs = make_fs(FILES)
    assert read_file(fs, "/a") == b"b" * 100  # the fsync'ed version, not a mix
    assert_no_dangling(fs)


def test_superseded_objects_stay_until_the_checkpoint(make_fs):
    fs = make_fs(MANUAL)
    write_file(fs, "/f", os.urandom(CS))
    fs.checkpoint()
    first = chunk_paths(fs, "/f")
    fh = fs.open("/f", os.O_WRONLY)
    fs.write(fh, os.urandom(CS), 0)
    fs.release(fh)
    assert all(os.path.exists(p) for p in first)  # the durable index still names them
    fs.checkpoint()
    assert not any(os.path.exists(p) for p in first)
    assert_no_dangling(fs)


def test_journal_growth_triggers_a_checkpoint(make_fs):
    fs = make_fs(dataclasses.replace(MANUAL))
    fs.index._journal_limit = 20_000
    for i in range(60):
        write_file(fs, f"/f{i}", b"x" * 10)
    assert fs.index.journal.size < 20_000 + 4096
    fs.close()


def test_read_only_open_refuses_an_unreplayed_journal(make_fs):
    fs = make_fs(MANUAL)
    write_file(fs, "/f", b"data")
    crash(fs)
    with pytest.raises(E.NeedsRecoveryError) as info:
        make_fs(dataclasses.replace(MANUAL, read_only=True))
    assert "read-write once" in str(info.value)
    fs = make_fs(MANUAL)  # replays
    fs.close()
    fs = make_fs(dataclasses.replace(MANUAL, read_only=True))
    assert read_file(fs, "/f") == b"data"


def test_background_checkpoint_runs(make_fs):
    import time
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=0.05))
    write_file(fs, "/f", b"x" * 1000)
    deadline = time.monotonic() + 10
    while fs.index.pending_records and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fs.index.pending_records == 0
    crash(fs)
    fs = make_fs(MANUAL)
    assert fs.recovered is not None  # unclean, but nothing needed replaying
    assert read_file(fs, "/f") == b"x" * 1000


def test_a_torn_tail_is_cut_so_later_records_survive_the_next_crash(make_fs):
    """A power cut tore the journal's last record; the next mount must cut it
    before appending, or what it appends (fsynced files too) would sit behind
    the torn bytes and be invisible to the replay after the next crash."""
    fs = make_fs(MANUAL)
    write_file(fs, "/a", b"A" * 1000)
    crash(fs)
    jpath = os.path.join(make_fs.root, "index", "journal")
    with open(jpath, "ab") as f:  # a torn record: a header and too few bytes
        f.write((500).to_bytes(4, "big") + (999).to_bytes(8, "big") + bytes(40))
    fs = make_fs(MANUAL)
    write_file(fs, "/b", b"B" * 1000)
    fh = fs.open("/b", os.O_RDONLY)
    fs.fsync(fh)
    fs.release(fh)
    crash(fs)
    fs = make_fs(MANUAL)
    assert read_file(fs, "/a") == b"A" * 1000 and read_file(fs, "/b") == b"B" * 1000
    assert_no_dangling(fs)


def test_records_a_replay_dropped_are_never_rolled_forward_by_a_rebuild(make_fs, secret):
    """An overwrite whose object never reached the disk is dropped by the
    replay; if the index is lost later, the rebuild must not bring that
    overwrite back (it would name a missing object and zero the file)."""
    import glob

    from dcmfs.app import admin
    fs = make_fs(FILES)
    write_file(fs, "/a", b"old" * 300)
    fs.close()
    fs = make_fs(FILES)
    with fs.lock, fs.index.begin() as txn:
        before = {r.oid for _, _, r in txn.iter_all_chunks()}
    fh = fs.open("/a", os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, b"new" * 300, 0)
    fs.release(fh)
    with fs.lock, fs.index.begin() as txn:
        new = {r.oid for _, _, r in txn.iter_all_chunks()} - before
    crash(fs)
    for oid in new:  # the power cut: the new object never reached the disk
        os.unlink(glob.glob(f"{make_fs.root}/objects/*/{oid.hex()}")[0])
    fs = make_fs(FILES)
    assert read_file(fs, "/a") == b"old" * 300
    crash(fs)
    os.unlink(os.path.join(make_fs.root, "index", "data.mdb"))
    import io
    result = admin.fsck(str(make_fs.root), lambda: secret, MANUAL, True, True, out=io.StringIO())
    assert result["clean"], result
    fs = make_fs(FILES)
    assert read_file(fs, "/a") == b"old" * 300
