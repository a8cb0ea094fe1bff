"""Fault injection (S3QL's recipe): inject one fault, verify finds it and names
the file, the other files still read, fsck --repair mends it, a full check
afterwards is clean.  Faults are made by flipping bits (XOR 0xFF), by
truncating, swapping, rolling back and deleting objects, and by damaging or
deleting the index."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil

import pytest

from dcmfs import errors as E
from dcmfs.app import admin
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import damage_mark, open_store

from .conftest import SMALL, flip_byte
from .test_core import read_file, write_file
from .test_integrity import chunk_paths

CS = SMALL.chunk_size
QUIET = io.StringIO()
#: every chunk an object file: the faults below are made to object files
#: (small chunks kept in the index have their own, tests/test_inline.py)
FILES = dataclasses.replace(SMALL, inline_max=0)


class Store:
    """A closed store holding three files, and the calls the admin would make."""

    def __init__(self, make_fs, secret, legacy: bool = False, config=FILES):
        self.make_fs = make_fs
        self.config = config
        self.root = str(make_fs.root)
        self.secret = secret
        #: files made as before file-secrets-v1 (no secret: the objects alone
        #: hold everything a rebuild needs)
        self.legacy = legacy
        fs = make_fs(config)
        fs._secrets = not legacy
        self.damaged: set[str] = set()
        self.content = {"/a": os.urandom(3 * CS + 100), "/b": os.urandom(2 * CS),
                        "/d/c": os.urandom(CS // 2)}
        fs.mkdir("/d", 0o755, 0, 0)
        for path, data in self.content.items():
            write_file(fs, path, data)
        fs.close()

    def verify(self, **kw) -> dict:
        report = admin.verify(self.root, lambda: self.secret, SMALL, out=QUIET, **kw)
        self.damaged = self.damaged_paths(report)
        return report

    def fsck(self, repair=False, rebuild=False) -> dict:
        return admin.fsck(self.root, lambda: self.secret, SMALL, repair, rebuild, out=QUIET)

    def open(self, config=None) -> FileSystem:
        fs = FileSystem(open_store(self.root, self.secret), config or self.config)
        fs._secrets = fs._secrets and not self.legacy
        return fs

    def assert_content(self) -> None:
        """Every file the fixture wrote reads back as written."""
        fs = self.open()
        try:
            for path, data in self.content.items():
                assert read_file(fs, path) == data, path
        finally:
            fs.close()

    def damaged_paths(self, report) -> set[str]:
        return {p for f in report["findings"] if f["ino"] for p in f["paths"]}

    def kinds(self, report) -> set[str]:
        return {f["kind"] for f in report["findings"]}

    def objects(self, path) -> list[str]:
        fs = self.open(SMALL.__class__(**{**SMALL.__dict__, "read_only": True}))
        try:
            return chunk_paths(fs, path)
        finally:
            fs.close()

    def assert_repaired_clean(self, intact: list[str], lost: str | None = None,
                              index_damage: bool = False):
        """--repair, then a full check is clean; intact files read back exactly,
        a damaged one is in /lost+found with its surviving bytes.

        ``index_damage``: an index record was damaged; before the repair the
        files of its group (here: all) give EIO, since damage and tampering
        cannot be told apart within a group (docs/security.md)."""
        ro = self.open(SMALL.__class__(**{**SMALL.__dict__, "read_only": True}))
        try:  # before the repair, the intact files read back (read-only mount)
            for path in set(intact) - self.damaged:
                if index_damage:
                    with pytest.raises(E.IntegrityError):
                        read_file(ro, path)
                else:
                    assert read_file(ro, path) == self.content[path], path
        finally:
            ro.close()
        result = self.fsck(repair=True)
        assert result["problems"] and result["clean"], result
        assert damage_mark(self.root) is None
        assert self.verify()["findings"] == []
        fs = self.open()
        try:
            for path in intact:
                assert read_file(fs, path) == self.content[path], path
            if lost is not None:
                found = fs.readdir("/lost+found")
                names = [n for n, _ in found if n.endswith("-" + lost.rsplit("/", 1)[1])]
                assert names, found
                data = read_file(fs, "/lost+found/" + names[0])
                assert len(data) == len(self.content[lost])
                note = fs.getxattr("/lost+found/" + names[0], "user.dcmfs.fsck")
                assert b"zeros" in note
                # the unreadable chunk is zeros, the rest survived
                original = self.content[lost]
                same = sum(1 for i in range(0, len(data), CS)
                           if data[i:i + CS] == original[i:i + CS])
                assert same >= len(range(0, len(data), CS)) - 1
        finally:
            fs.close()
        return result


@pytest.fixture
def store(make_fs, secret):
    return Store(make_fs, secret)


@pytest.fixture
def legacy_store(make_fs, secret):
    """Files made before file-secrets-v1 (crypto-shredding): their keys come
    from the master key alone, so their objects alone rebuild them."""
    return Store(make_fs, secret, legacy=True)


def test_clean_store_verifies_and_fscks_clean(store):
    report = store.verify()
    assert report["findings"] == [] and report["files"] == 3
    assert report["bytes"] == sum(len(v) for v in store.content.values())
    assert store.fsck()["clean"]
    repaired = store.fsck(repair=True)  # nothing to repair: both passes clean
    assert repaired["clean"] and repaired["problems"] == [] and repaired["remaining"] == []
    assert store.verify(sample=0.34)["files"] == 1
    assert store.verify(paths=["/d"])["files"] == 1


def test_bit_flipped_object(store):
    flip_byte(store.objects("/a")[1], 300)
    report = store.verify()
    assert store.damaged_paths(report) == {"/a"}
    assert store.kinds(report) == {"failed authentication"}
    assert damage_mark(store.root) is not None
    with pytest.raises(E.StoreDamagedError):  # read-write mounts wait for fsck
        store.open()
    fs = store.open(SMALL.__class__(**{**SMALL.__dict__, "read_only": True}))
    try:
        assert read_file(fs, "/b") == store.content["/b"]  # the others still read
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/a")
    finally:
        fs.close()
    assert not store.fsck()["clean"]
    store.assert_repaired_clean(["/b", "/d/c"], lost="/a")


def test_truncated_object(store):
    path = store.objects("/b")[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    report = store.verify()
    assert store.damaged_paths(report) == {"/b"}
    assert store.kinds(report) <= {"wrong length", "failed authentication"}
    store.assert_repaired_clean(["/a", "/d/c"], lost="/b")


def test_two_objects_of_one_file_swapped_are_put_back(store):
    p0, p1 = store.objects("/a")[:2]
    tmp = p0 + ".x"
    os.rename(p0, tmp)
    os.rename(p1, p0)
    os.rename(tmp, p1)
    report = store.verify()
    assert store.damaged_paths(report) == {"/a"}
    assert store.kinds(report) == {"swapped or moved"}
    # nothing was lost: fsck puts both back, and /a is whole again
    store.assert_repaired_clean(["/a", "/b", "/d/c"])


def test_objects_of_two_files_swapped_are_put_back(store):
    pa, pb = store.objects("/a")[2], store.objects("/b")[1]
    tmp = pa + ".x"
    os.rename(pa, tmp)
    os.rename(pb, pa)
    os.rename(tmp, pb)
    report = store.verify()
    assert store.damaged_paths(report) == {"/a", "/b"}
    assert store.kinds(report) == {"swapped or moved"}
    store.assert_repaired_clean(["/a", "/b", "/d/c"])


def test_object_rolled_back_to_an_older_generation(store):
    fs = store.open()
    old = read_bytes(chunk_paths(fs, "/d/c")[0])
    new = os.urandom(CS // 2)
    overwrite(fs, "/d/c", new)  # a new generation of the same chunk
    target = chunk_paths(fs, "/d/c")[0]
    fs.close()
    store.content["/d/c"] = new
    with open(target, "wb") as f:  # the older object put back in its place
        f.write(old)
    report = store.verify()
    assert store.damaged_paths(report) == {"/d/c"}
    assert store.kinds(report) == {"rolled back"}
    store.assert_repaired_clean(["/a", "/b"], lost="/d/c")


def test_deleted_object(store):
    os.unlink(store.objects("/a")[3])
    report = store.verify()
    assert store.damaged_paths(report) == {"/a"}
    assert store.kinds(report) == {"missing object"}
    store.assert_repaired_clean(["/b", "/d/c"], lost="/a")


def test_orphan_object_is_reported_and_removed_only_if_garbage(store):
    fs = store.open()
    stale = read_bytes(chunk_paths(fs, "/b")[0])
    overwrite(fs, "/b", store.content["/b"][::-1])
    store.content["/b"] = store.content["/b"][::-1]
    fs.close()
    # an old version of /b's first chunk is back under its own name: an orphan
    fs = store.open(SMALL.__class__(**{**SMALL.__dict__, "read_only": True}))
    oid_ctx = fs.objects.open_context(b"\0" * 16, stale).oid
    fs.close()
    os.makedirs(os.path.dirname(store_path(store, oid_ctx)), exist_ok=True)
    with open(store_path(store, oid_ctx), "wb") as f:
        f.write(stale)
    report = store.verify()
    assert store.kinds(report) == {"orphan object"} and not store.damaged_paths(report)
    result = store.assert_repaired_clean(["/a", "/b", "/d/c"])
    assert any(p["repaired"] == "deleted" for p in result["problems"])
    assert not os.path.exists(store_path(store, oid_ctx))


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def overwrite(fs, path, data):
    fh = fs.open(path, os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, data, 0)
    fs.flush(fh)
    fs.release(fh)


def store_path(store, oid: bytes) -> str:
    return os.path.join(store.root, "objects", oid.hex()[:2], oid.hex())


def test_an_object_named_twice_is_found_and_repaired(store):
    fs = store.open()
    with fs.lock, fs.index.begin(write=True) as txn:
        a, b = fs._resolve(txn, "/a"), fs._resolve(txn, "/b")
        txn.put_chunk(b, 1, txn.chunks(a)[1])  # /b's chunk 1 now names /a's object
    fs.close()
    assert "tables" in {p["check"] for p in store.fsck()["problems"]}
    report = store.verify()
    assert store.damaged_paths(report) == {"/b"}
    assert "does not match its index entry" in store.kinds(report)
    # /b's own chunk-1 object is still there, unnamed: the repair puts it back
    result = store.assert_repaired_clean(["/a", "/b", "/d/c"])
    assert any("restored" in p["repaired"] for p in result["problems"])


def flip_in_index_value(store, db: str, path: str, key_suffix: bytes, at: int) -> None:
    """Flip one bit inside the sealed value of ``db`` for ``path`` in data.mdb."""
    fs = store.open()
    with fs.lock, fs.index.begin() as txn:
        key = fs._resolve(txn, path).to_bytes(8, "big") + key_suffix
        sealed = bytes(txn.txn.get(key, db=fs.index.dbs[db]))
    fs.close()
    mdb = os.path.join(store.root, "index", "data.mdb")
    blob = read_bytes(mdb)
    assert blob.count(sealed) >= 1  # a freed page may hold an older copy of it
    start = 0
    while (pos := blob.find(sealed, start)) >= 0:
        flip_byte(mdb, pos + at)
        start = pos + 1


def test_chunk_entry_bit_flipped_is_restored_from_its_object(store):
    """A flipped bit in a sealed chunk entry: the entry goes, and the repair
    finds the file's own object again (its context says where it belongs)."""
    flip_in_index_value(store, "chunks", "/a", (2).to_bytes(8, "big"), 30)
    report = store.verify()
    assert store.damaged_paths(report) == {"/a"}
    result = store.assert_repaired_clean(["/a", "/b", "/d/c"], index_damage=True)
    assert any("restored" in p["repaired"] for p in result["problems"])
    assert not os.path.exists(os.path.join(store.root, "quarantine"))


def test_deleted_file_is_not_brought_back(store):
    """A file unlinked, its deletion checkpointed, the daemon killed before its
    objects went: they are garbage, and fsck deletes them (never resurrects)."""
    fs = store.open()
    with fs.lock, fs.index.begin() as txn:
        oids = [r.oid for r in txn.chunks(fs._resolve(txn, "/b")).values()]
    fs.data.checkpointed = lambda: None  # the kill comes before the objects go
    fs.unlink("/b")
    fs.checkpoint()
    from .conftest import crash
    crash(fs)
    assert all(os.path.exists(store_path(store, o)) for o in oids)
    result = store.fsck(repair=True)
    assert result["clean"], result
    assert not any(os.path.exists(store_path(store, o)) for o in oids)
    fs = store.open()
    try:
        assert "lost+found" not in {n for n, _ in fs.readdir("/")}
    finally:
        fs.close()
    del store.content["/b"]


def test_index_value_bit_flipped(store):
    """A flipped bit inside the sealed inode record of /b: verify names /b; the
    repair rebuilds /b from its objects into /lost+found; others intact."""
    flip_in_index_value(store, "inodes", "/b", b"", 20)
    report = store.verify()
    assert store.damaged_paths(report) == {"/b"}
    assert "index entry" in store.kinds(report)
    result = store.fsck(repair=True)
    assert result["clean"], result
    fs = store.open()
    try:
        assert read_file(fs, "/a") == store.content["/a"]
        (name, _), = fs.readdir("/lost+found")
        assert read_file(fs, f"/lost+found/{name}") == store.content["/b"]
    finally:
        fs.close()


def test_deleted_index_is_refused_then_rebuilt_with_every_name(store):
    os.unlink(os.path.join(store.root, "index", "data.mdb"))
    with pytest.raises(E.IndexDamagedError, match="rebuild-index"):
        store.open()  # never an empty index over the objects
    with pytest.raises(E.IndexDamagedError):
        store.verify()
    result = store.fsck(rebuild=True)
    assert result["clean"], result
    assert result["rebuilt"]["snapshot"] is not None
    store.assert_content()


def test_index_rebuilt_from_the_journal_and_the_objects_without_any_snapshot(store):
    fs = store.open()
    write_file(fs, "/late", b"written after the last snapshot" * 999)
    store.content["/late"] = b"written after the last snapshot" * 999
    from .conftest import crash
    crash(fs)  # no clean close: no new snapshot, the journal holds the rest
    shutil.rmtree(os.path.join(store.root, "snapshots"))
    os.unlink(os.path.join(store.root, "index", "data.mdb"))
    result = store.fsck(rebuild=True)
    assert result["clean"], result
    assert result["rebuilt"]["snapshot"] is None and result["rebuilt"]["journal_records"] > 0
    store.assert_content()


def test_objects_alone_rebuild_every_file_into_lost_found(legacy_store):
    store = legacy_store
    shutil.rmtree(os.path.join(store.root, "snapshots"))
    shutil.rmtree(os.path.join(store.root, "index"))
    result = store.fsck(rebuild=True)
    # from the objects alone: what only the index held may be lost, so not clean
    assert not result["clean"] and result["rebuilt"]["inline_lost"], result
    assert result["remaining"] == [] and not result["unrecovered"], result
    assert store.fsck()["clean"]  # the check asked for after it clears the mark
    fs = store.open()
    try:
        names = [n for n, _ in fs.readdir("/lost+found")]
        got = sorted(read_file(fs, "/lost+found/" + n) for n in names)
        assert got == sorted(store.content.values())
    finally:
        fs.close()



def test_verify_and_control_attributes_are_for_root_and_the_owner(make_fs):
    fs = make_fs()
    for name in ("user.dcmfs.verify", 'user.dcmfs.verify:{"sample":0.5}'):
        with pytest.raises(E.PermissionDenied):
            fs.getxattr("/", name, caller=4321)
    with pytest.raises(E.PermissionDenied):
        fs.setxattr("/", "user.dcmfs.control", b"verify", caller=4321)
    for name in ("user.dcmfs.status", "user.dcmfs.stats"):  # issue 15: these too
        with pytest.raises(E.PermissionDenied):
            fs.getxattr("/", name, caller=4321)
        assert fs.getxattr("/", name, caller=os.getuid())  # the mount's owner
    assert fs.getxattr("/", "user.dcmfs.verify", caller=0) == b"{}"


def _late_file_then_index_lost(store) -> bytes:
    """Write /late after the last snapshot, crash, lose index/, rebuild
    (not clean: the witness knows the journal records lost with index/);
    returns /late's content."""
    fs = store.open()
    late = os.urandom(5000)
    write_file(fs, "/late", late)
    fs.checkpoint()
    from .conftest import crash
    crash(fs)
    shutil.rmtree(os.path.join(store.root, "index"))
    result = store.fsck(rebuild=True)
    assert not result["clean"] and result["rebuilt"]["records_missing"] > 0, result
    assert store.fsck()["clean"]  # what the report asks for: the damage mark goes
    return late


def test_lost_index_directory_brings_new_files_back_into_lost_found(legacy_store):
    """index/ lost with the journal: a file created after the last snapshot
    comes back from its objects into /lost+found (with its own inode number:
    /lost+found must not take it), a file deleted after it stays as it was.
    (Files made before file-secrets-v1; with secrets, see the next test.)"""
    store = legacy_store
    late = _late_file_then_index_lost(store)
    assert not os.path.exists(os.path.join(store.root, "quarantine"))
    fs = store.open()
    try:
        for path, data in store.content.items():
            assert read_file(fs, path) == data
        (name, _), = fs.readdir("/lost+found")
        assert read_file(fs, "/lost+found/" + name) == late
        assert b"assembled from objects" in fs.getxattr("/lost+found/" + name,
                                                        "user.dcmfs.fsck")
    finally:
        fs.close()


def test_files_with_secrets_need_their_history_to_be_rebuilt(store):
    """The price of crypto-shredding (docs/format.md): a file's key needs its
    secret, which only the index and its history (snapshots, journals)
    hold.  index/ lost: the files in the snapshot come back with their
    names; one created after it, whose records were in the lost journal,
    does not - its objects go to quarantine, never deleted; with
    snapshots/ lost too, no file comes back, every object is kept."""
    _late_file_then_index_lost(store)
    store.assert_content()
    quarantined = os.listdir(os.path.join(store.root, "quarantine"))
    assert len(quarantined) == 1  # /late's one object
    fs = store.open()
    try:
        assert "lost+found" not in {n for n, _ in fs.readdir("/")}
    finally:
        fs.close()
    n_objects = sum(len(f) for _, _, f in os.walk(os.path.join(store.root, "objects")))
    shutil.rmtree(os.path.join(store.root, "snapshots"))
    shutil.rmtree(os.path.join(store.root, "index"))
    result = store.fsck(rebuild=True)
    # from the objects alone: what only the index held may be lost, so not clean
    assert not result["clean"] and result["rebuilt"]["inline_lost"], result
    assert result["remaining"] == [] and not result["unrecovered"], result
    assert store.fsck()["clean"]  # the check asked for after it clears the mark
    assert {p["repaired"] for p in result["problems"] if p["check"] == "unreferenced"} == {
        "moved to quarantine"}
    assert len(os.listdir(os.path.join(store.root, "quarantine"))) == 1 + n_objects
    fs = store.open()
    try:
        assert {n for n, _ in fs.readdir("/")} <= {".", "..", "lost+found"}
    finally:
        fs.close()


def test_a_damaged_inode_record_is_rebuilt_with_the_secret_its_history_holds(store):
    """The record of /b fails authentication: its secret is gone from the
    index, but the snapshot (and the journal) still hold it, so the repair
    rebuilds /b into /lost+found byte-exact (test_index_value_bit_flipped
    does the same through verify)."""
    flip_in_index_value(store, "inodes", "/b", b"", 20)
    result = store.fsck(repair=True)
    assert result["clean"], result
    fs = store.open()
    try:
        (name, _), = fs.readdir("/lost+found")
        assert read_file(fs, f"/lost+found/{name}") == store.content["/b"]
        with fs.lock, fs.index.begin() as txn:
            assert len(txn.get_inode(fs._resolve(txn, f"/lost+found/{name}")).secret) == 32
    finally:
        fs.close()


def test_a_repair_that_is_not_clean_keeps_the_mark(store, monkeypatch):
    from dcmfs.integrity import fsck as fsck_mod
    flip_byte(store.objects("/a")[0], 400)
    real = fsck_mod.Fsck.run

    def second_pass_finds_more(self):  # a problem the repair could not mend
        problems = real(self)
        if not self.repair:
            problems.append(fsck_mod.Problem("contents", "still damaged", 2))
        return problems
    monkeypatch.setattr(fsck_mod.Fsck, "run", second_pass_finds_more)
    result = store.fsck(repair=True)
    assert not result["clean"] and damage_mark(store.root) is not None


def _two_snapshots(store) -> list[str]:
    """A second clean close (a second snapshot) with one more file; the
    snapshot directories, oldest first."""
    fs = store.open()
    write_file(fs, "/second", b"after the first snapshot" * 500)
    store.content["/second"] = b"after the first snapshot" * 500
    fs.close()
    snaps = sorted(os.listdir(os.path.join(store.root, "snapshots")))
    snaps = [os.path.join(store.root, "snapshots", n) for n in snaps
             if n.startswith("snapshot-")]
    assert len(snaps) == 2, snaps
    return snaps


def test_rebuild_falls_back_past_a_snapshot_that_lost_its_data_file(store):
    """issue 16: a snapshot directory without data.mdb made the rebuild die
    with FileNotFoundError; it must take the older snapshot and the journal
    records after it, and say what it used and what it skipped."""
    older, newer = _two_snapshots(store)
    os.unlink(os.path.join(newer, "data.mdb"))
    os.unlink(os.path.join(store.root, "index", "data.mdb"))
    result = store.fsck(rebuild=True)
    assert result["clean"], result
    rebuilt = result["rebuilt"]
    assert rebuilt["snapshot"] == os.path.basename(older)
    assert rebuilt["skipped_snapshots"] == [
        {"snapshot": os.path.basename(newer), "why": "its data.mdb is missing"}]
    assert rebuilt["journal_records"] > 0
    text = admin.render_fsck(result)
    assert f"{os.path.basename(newer)} skipped (its data.mdb is missing)" in text
    assert f"snapshot {os.path.basename(older)}" in text
    store.assert_content()


def test_rebuild_falls_back_past_every_damaged_snapshot_to_the_journals(store):
    """Both snapshots unusable (one lost its data file, one is torn): every
    journal record is rolled forward onto an empty index, names included."""
    older, newer = _two_snapshots(store)
    os.unlink(os.path.join(newer, "data.mdb"))
    with open(os.path.join(older, "data.mdb"), "r+b") as f:
        f.truncate(100)  # a torn copy: not an LMDB file any more
    os.unlink(os.path.join(store.root, "index", "data.mdb"))
    result = store.fsck(rebuild=True)
    assert result["clean"], result
    rebuilt = result["rebuilt"]
    assert rebuilt["snapshot"] is None and rebuilt["journal_records"] > 0
    assert [s["snapshot"] for s in rebuilt["skipped_snapshots"]] == [
        os.path.basename(newer), os.path.basename(older)]
    assert rebuilt["skipped_snapshots"][1]["why"].startswith("it does not open")
    assert "no snapshot could be used" in admin.render_fsck(result)
    store.assert_content()


def test_rebuild_with_damaged_snapshots_and_no_journal_uses_the_objects(legacy_store):
    store = legacy_store
    older, newer = _two_snapshots(store)
    shutil.rmtree(newer)  # gone altogether, and the other one torn
    with open(os.path.join(older, "data.mdb"), "r+b") as f:
        f.truncate(100)
    shutil.rmtree(os.path.join(store.root, "index"))  # the journal with it
    result = store.fsck(rebuild=True)
    # from the objects alone: what only the index held may be lost, so not clean
    assert not result["clean"] and result["rebuilt"]["inline_lost"], result
    assert result["remaining"] == [] and not result["unrecovered"], result
    assert store.fsck()["clean"]  # the check asked for after it clears the mark
    assert result["rebuilt"]["snapshot"] is None
    fs = store.open()
    try:  # the content comes back from the objects, into /lost+found
        names = [n for n, _ in fs.readdir("/lost+found")]
        got = sorted(read_file(fs, "/lost+found/" + n) for n in names)
        assert got == sorted(store.content.values())
    finally:
        fs.close()
