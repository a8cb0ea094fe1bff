"""Issue 15's attacks on the index, each as someone with write access to the
store directory but no key would make it: a file's records spliced in from
an older copy of the index, plain records injected (orphans, next inode
number), the sealed checksum deleted, the whole store rolled back, the
journal cut after a crash.  Each must be refused or answered with EIO,
never served as if nothing happened."""

from __future__ import annotations

import dataclasses
import os
import shutil

import lmdb
import pytest

from dcmfs import errors as E
from dcmfs.index import witness
from dcmfs.storage.header import damage_mark
from dcmfs.index.auth import GROUP_BITS, STATE, group_of, key_range

from .conftest import SMALL, crash
from .test_core import read_file, write_file
from .test_fsck import Store

RO = dataclasses.replace(SMALL, read_only=True)
MANUAL = dataclasses.replace(SMALL, checkpoint_interval=0)
DBS = ("meta", "inodes", "dirents", "chunks", "xattrs", "orphans", "backlog", "content",
       "scrubbed")


@pytest.fixture
def store(make_fs, secret):
    return Store(make_fs, secret)


def _env(root: str) -> tuple[lmdb.Environment, dict]:
    env = lmdb.open(os.path.join(root, "index"), max_dbs=16, lock=False)
    return env, {n: env.open_db(n.encode()) for n in DBS}


def _ino(store, path: str) -> int:
    fs = store.open(RO)
    try:
        with fs.lock, fs.index.begin() as txn:
            return fs._resolve(txn, path)
    finally:
        fs.close()


def _records_of(root: str, ino: int) -> dict[tuple[str, bytes], bytes]:
    """Every record keyed by ``ino`` (inode, chunks, content, ...), as stored."""
    env, dbs = _env(root)
    out = {}
    with env.begin() as txn:
        for name in DBS[1:]:
            cur = txn.cursor(db=dbs[name])
            if cur.set_range(ino.to_bytes(8, "big")):
                for k, v in cur:
                    if k[:8] != ino.to_bytes(8, "big"):
                        break
                    out[(name, bytes(k))] = bytes(v)
    env.close()
    return out


def _object_files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(os.path.join(root, "objects")):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


def test_one_file_spliced_from_an_older_index_is_never_served(store, tmp_path):
    """Attack 1: /b's sealed records and objects from an older copy put back
    in place of the newer ones (each record still opens, each object still
    authenticates): read-write openings are refused, a read-only one answers
    /b (and the files of its group) with EIO and the other files as before,
    verify and fsck name /b."""
    fs = store.open()
    with fs.lock, fs.index.begin(write=True) as txn:  # the next file in another group
        txn.meta_put("next_ino", (5 << GROUP_BITS).to_bytes(8, "big"))
    far = os.urandom(5000)
    write_file(fs, "/far", far)
    fs.close()
    ino = _ino(store, "/b")
    old_records = _records_of(store.root, ino)
    old_objects = _object_files(store.root)
    fs = store.open()
    newer = os.urandom(len(store.content["/b"]))  # same size: the totals stay true
    fh = fs.open("/b", os.O_WRONLY)
    fs.write(fh, newer, 0)
    fs.release(fh)
    fs.close()
    new_records = _records_of(store.root, ino)
    assert new_records.keys() == old_records.keys() and new_records != old_records
    env, dbs = _env(store.root)
    with env.begin(write=True) as txn:
        for (name, key), value in old_records.items():
            txn.put(key, value, db=dbs[name])
    env.close()
    now = _object_files(store.root)
    for p in set(now) - set(old_objects):
        os.unlink(p)
    for p, blob in old_objects.items():
        if p not in now:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(blob)

    fs = store.open()  # the store's state records are its own: it mounts
    try:
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/b")  # never the old content
        assert read_file(fs, "/far") == far  # another group: served
    finally:
        fs.close()
    assert damage_mark(store.root) is not None  # read-write mounts wait for fsck
    with pytest.raises(E.StoreDamagedError):
        store.open()
    fs = store.open(RO)
    try:
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/b")
        assert read_file(fs, "/far") == far
    finally:
        fs.close()
    report = store.verify()
    assert "/b" in store.damaged_paths(report) and "/far" not in store.damaged_paths(report)
    assert "index checksum" in store.kinds(report)
    result = store.fsck(repair=True)
    assert not result["clean"]
    assert any("rebuild-index" in p["what"] for p in result["problems"])
    assert any(p["check"] == "index checksum" and "/b" in p["paths"]
               for p in result["problems"])


def test_injected_orphan_and_mounted_state_delete_nothing(store):
    """Attack 2a: meta/state=mounted and orphans/<ino of /a> make a recovery
    delete /a: the opening is refused before any recovery runs."""
    ino = _ino(store, "/a")
    before = _object_files(store.root)
    env, dbs = _env(store.root)
    with env.begin(write=True) as txn:
        txn.put(b"state", b"mounted", db=dbs["meta"])
        txn.put(ino.to_bytes(8, "big"), b"", db=dbs["orphans"])
    env.close()
    with pytest.raises(E.IndexNotAuthenticError):
        store.open()
    assert _object_files(store.root) == before  # nothing deleted
    fs = store.open(RO)
    try:
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/a")  # its group differs: EIO, not a deletion
    finally:
        fs.close()
    problems = store.fsck(repair=True)["problems"]
    assert any(p["check"] == "index checksum" and "/a" in p["paths"] for p in problems)
    assert _object_files(store.root) == before


def test_injected_next_inode_number_is_refused(store):
    """Attack 2b: meta/next_ino set to an existing file's inode would make the
    next created file overwrite it."""
    ino = _ino(store, "/a")
    env, dbs = _env(store.root)
    with env.begin(write=True) as txn:
        txn.put(b"next_ino", ino.to_bytes(8, "big"), db=dbs["meta"])
    env.close()
    with pytest.raises(E.IndexNotAuthenticError):
        store.open()
    report = store.verify()
    assert any(f["kind"] == "index checksum" and f["ino"] == 0 and "state records" in f["detail"]
               for f in report["findings"])


def test_deleted_checksum_is_refused_where_the_witness_saw_it(store):
    """The sealed sums deleted (to pass the index off as one of format 3): a
    machine whose witness saw the store refuses it."""
    env, dbs = _env(store.root)
    with env.begin(write=True) as txn:
        assert txn.delete(b"auth", db=dbs["meta"])
    env.close()
    with pytest.raises(E.IndexNotAuthenticError):
        store.open()


def test_a_bit_flip_is_repaired_and_the_checksum_sealed_again(store):
    """Damage (a record failing its own seal) explains its group's
    difference: fsck --repair mends it and seals the sums again."""
    from .test_fsck import flip_in_index_value
    flip_in_index_value(store, "inodes", "/b", b"", 20)
    fs = store.open(RO)
    try:
        with pytest.raises(E.IntegrityError):
            read_file(fs, "/a")  # its group: damage and tampering look alike
    finally:
        fs.close()
    assert store.fsck(repair=True)["clean"]
    fs = store.open()  # read-write again
    try:
        assert read_file(fs, "/a") == store.content["/a"]
        assert fs.index.auth_state == "ok"
    finally:
        fs.close()


def test_whole_store_rolled_back_is_refused_until_accepted(store, tmp_path, caplog):
    """Attack 3a: an older copy of the whole store directory put back."""
    backup = tmp_path / "backup"
    shutil.copytree(store.root, backup)
    fs = store.open()
    write_file(fs, "/late", b"written after the backup")
    fs.close()
    shutil.rmtree(store.root)
    shutil.copytree(backup, store.root)
    with pytest.raises(E.RollbackError, match="older than this machine's witness"):
        store.open()
    with pytest.raises(E.RollbackError):
        store.open(RO)
    with pytest.raises(E.RollbackError):
        store.verify()
    fs = store.open(dataclasses.replace(SMALL, accept_rollback=True))
    try:
        assert read_file(fs, "/a") == store.content["/a"]
        assert "late" not in {n for n, _ in fs.readdir("/")}
    finally:
        fs.close()
    assert "accepted (--accept-rollback)" in caplog.text
    store.open().close()  # the witness starts again from the accepted store


def _closed_then_journal_cut(make_fs) -> None:
    """A file checkpointed, another closed (its records only in the
    journal), the daemon killed, the journal cut back to the checkpoint."""
    fs = make_fs(MANUAL)
    write_file(fs, "/kept", b"checkpointed")
    fs.checkpoint()
    size = fs.index.journal.size
    write_file(fs, "/closed", b"closed, never synced")
    path = fs.index.journal.path
    crash(fs)
    with open(path, "r+b") as f:
        f.truncate(size)


def test_journal_cut_after_a_crash_is_refused(make_fs):
    """Attack 3b: in the same boot the witness knows what was written."""
    _closed_then_journal_cut(make_fs)
    with pytest.raises(E.RollbackError, match="journal was cut"):
        make_fs(MANUAL)


def test_a_reboot_requires_only_what_was_synced(make_fs, monkeypatch):
    """The same cut is what a power loss may do to a journal never synced:
    after a reboot (another boot id) the store opens without the file."""
    _closed_then_journal_cut(make_fs)
    monkeypatch.setattr(witness, "boot_id", lambda: os.urandom(16))
    fs = make_fs(MANUAL)
    assert "closed" not in {n for n, _ in fs.readdir("/")}
    assert read_file(fs, "/kept") == b"checkpointed"


def test_a_damaged_witness_is_refused(store):
    fs = store.open()
    fs.close()
    directory = os.path.join(os.environ["DCMFS_STATE_DIR"], "witness")
    (name,) = os.listdir(directory)
    with open(os.path.join(directory, name), "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(E.StoreIOError, match="witness"):
        store.open()


def test_every_record_lies_in_its_groups_key_range(store):
    """A group is checked by reading its key range in each database: every
    record must lie in the range of the group it is counted in."""
    env, dbs = _env(store.root)
    seen = 0
    with env.begin() as txn:
        for name in DBS[1:]:
            for k, _ in txn.cursor(db=dbs[name]):
                g = group_of(name, bytes(k))
                assert g != STATE
                first, end, dirents_only = key_range(g)
                assert first <= bytes(k[:8]) < end and (dirents_only == (name == "dirents"))
                seen += 1
    env.close()
    assert seen > 10


def test_directory_entries_do_not_show_their_directory(store):
    """Keys of directory entries start with a keyed tag of the directory, not
    its inode number, and the sealed values are padded to 32 bytes."""
    inos = {_ino(store, p) for p in ("/", "/d")}
    env, dbs = _env(store.root)
    with env.begin() as txn:
        items = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=dbs["dirents"])]
    env.close()
    assert len(items) == 4  # /a /b /d /d/c
    for k, v in items:
        assert len(k) == 32 and int.from_bytes(k[:8], "big") not in inos
        assert (len(v) - 12 - 16) % 32 == 0  # nonce + SIV(padded) + tag


def test_cli_exit_codes_for_rollback_and_foreign_records(mount_env, tmp_path):
    """Through the command line: one sentence and exit codes 29 and 28."""
    m = mount_env
    m.mount()
    (m.mnt / "f").write_bytes(b"x")
    m.umount()
    backup = tmp_path / "backup"
    shutil.copytree(m.store, backup)
    m.mount()
    (m.mnt / "g").write_bytes(b"y")
    m.umount()
    shutil.rmtree(m.store)
    shutil.copytree(backup, m.store)
    r = m.mount(check=False)
    assert r.returncode == 29, r.stderr
    assert "--accept-rollback" in r.stderr and "Traceback" not in r.stderr
    r = m.mount("--accept-rollback")
    assert (m.mnt / "f").read_bytes() == b"x" and not (m.mnt / "g").exists()
    m.umount()
    env, dbs = _env(str(m.store))
    with env.begin(write=True) as txn:
        txn.put(b"next_ino", (2).to_bytes(8, "big"), db=dbs["meta"])
    env.close()
    r = m.mount(check=False)
    assert r.returncode == 28, r.stderr
    assert "sealed checksum" in r.stderr
    m.expect_log_errors = True
