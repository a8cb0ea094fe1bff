"""Crypto-shredding (issue 18): a file's payload key needs its random secret,
kept only in its sealed inode record; after a deleted file's shred horizon
(a shred pass) no file of the store holds that secret any more, so copies of
its objects kept elsewhere (S3 versions, replicas, backups of the object
tree) cannot be opened with the master key and everything the store holds.

The attacker here is as strong as the issue says: the master key (opened
from the store's header, as the code does) and every byte of the store
after the horizon - the index file (free pages included), the snapshots, the
live and archived journals (decrypted with the journal key) and the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import pytest

from dcmfs.config import Config
from dcmfs.index import index_sealer, sealed_aad
from dcmfs.index.journal import PUT, Journal
from dcmfs.index.schema import DB_ID, Inode, ino_key
from dcmfs.storage.codec import Codecs
from dcmfs.storage.header import Secret, open_store
from dcmfs.storage.objects import ChunkRef, ObjectDamaged, ObjectStore
from dcmfs.storage import crypto

from dcmfs.opened.shred import shred_state

from .conftest import SMALL, ct_file, sha256
from .test_core import read_file, write_file
from .test_s3 import s3_fs  # noqa: F401 (a fixture)

#: a sealed inode record with a secret: 169 bytes + nonce + tag
SEALED_INODE = 169 + 12 + 16


def store_secrets(root, key: Secret, inos: set[int], scan=None) -> set[bytes]:
    """Every file secret of the inodes ``inos`` that anything in the store
    directory (or ``scan``: a copy of a bucket) still holds, found with the
    master key: each window of every file (objects aside) tried as a sealed
    inode record of each of those inodes - LMDB's free pages, snapshots,
    anything - and every record of every journal (live, archived, a
    follower's part) decrypted and its inode puts opened."""
    store = open_store(str(root), key)
    root = scan or root
    siv = index_sealer(store.master_key, store.store_id)
    aads = [sealed_aad("inodes", ino_key(ino)) for ino in inos]
    found: set[bytes] = set()

    def opened(blob: bytes, aad: bytes) -> None:
        try:
            inode = Inode.decode(siv.open(blob, aad))
        except (crypto.AuthenticationFailed, ValueError):
            return
        found.add(inode.secret)

    for base, dirs, names in os.walk(root):
        if os.path.relpath(base, root).split(os.sep)[0] == "objects":
            continue
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                data = f.read()
            for at in range(len(data) - SEALED_INODE + 1):
                window = data[at:at + SEALED_INODE]
                for aad in aads:
                    opened(window, aad)
            if name == "journal" or name.startswith(("journal-", "part-")):
                j = Journal(path, store.master_key, store.store_id, read_only=True)
                try:
                    for _, ops in j.records(0):
                        for kind, db, k, value in ops:
                            if kind == PUT and db == DB_ID["inodes"] and \
                                    sealed_aad("inodes", k) in aads:
                                opened(value, sealed_aad("inodes", k))
                finally:
                    j.close()
    found.discard(b"")
    return found


def _objects(root, key: Secret) -> ObjectStore:
    store = open_store(str(root), key)
    return ObjectStore(str(root), store.store_id, store.master_key, Codecs.of(Config()),
                       epoch_keys=store.epoch_keys, epoch=store.epoch)


def open_object(root, key: Secret, oid: bytes, blob: bytes, secrets: set[bytes]) -> bytes | None:
    """The plaintext of a copied-aside object, opened with the master key
    and any of ``secrets`` (or none, as for files made before the feature);
    None if nothing opens it."""
    objects = _objects(root, key)
    ctx = objects.open_context(oid, blob)  # the context block: the master key suffices
    ref = ChunkRef(ctx.oid, ctx.generation, ctx.codec, ctx.flags, ctx.plain_len,
                   ctx.stored_len)
    for secret in [b"", *secrets]:
        try:
            return objects.read(objects.file_cipher(ctx.file_id, secret), ctx.file_id,
                                ctx.ino, ctx.index, ref, blob)
        except ObjectDamaged:
            continue
    return None


def copy_objects(root, key: Secret) -> dict[int, dict[bytes, bytes]]:
    """A copy of the object tree (a backup, S3 versions): {ino: {oid: bytes}}."""
    objects = _objects(root, key)
    out: dict[int, dict[bytes, bytes]] = {}
    for base, _, names in os.walk(root / "objects"):
        for name in names:
            if len(name) == 32:
                with open(os.path.join(base, name), "rb") as f:
                    blob = f.read()
                oid = bytes.fromhex(name)
                out.setdefault(objects.open_context(oid, blob).ino, {})[oid] = blob
    return out


def status(m) -> dict:
    r = m.cli("status", m.store, "--json", check=True)
    return json.loads(r.stdout)


def write_files(mnt, files: dict) -> None:
    for name, data in files.items():
        with open(mnt / name, "wb") as f:
            f.write(data)


def test_deleted_files_objects_open_with_nothing_the_store_holds_after_the_horizon(mount_env):
    m = mount_env
    key = Secret("keyfile", m.key.read_bytes())
    m.mount("-o", "shred_after=0")  # the horizon comes from 'dcmfs shred' here
    victims = {"ct.dcm": ct_file().read_bytes(), "random.bin": os.urandom(2_500_000)}
    kept = {"kept.bin": os.urandom(700_000)}
    write_files(m.mnt, {**victims, **kept})
    victim_inos = {os.stat(m.mnt / n).st_ino for n in victims}
    kept_ino = os.stat(m.mnt / "kept.bin").st_ino
    time.sleep(1)
    aside = copy_objects(m.store, key)  # a backup of the object tree, S3 versioning
    assert victim_inos <= set(aside) and kept_ino in aside
    for name in victims:
        os.unlink(m.mnt / name)
    time.sleep(1.5)  # a checkpoint: the deletions are in data.mdb too
    s = status(m)["shred"]
    assert s["pending"] == 2 and s["first_deleted"] and "deadline" not in s
    text = m.cli("status", m.store, check=True).stdout
    assert "2 deleted files still readable" in text
    assert not any(n in text for n in ("ct.dcm", "random.bin"))

    # the control: before the horizon the store still holds the secrets, and
    # they open every copied object of the deleted files
    held = store_secrets(m.store, key, victim_inos)
    assert len(held) == 2
    for ino in victim_inos:
        for oid, blob in aside[ino].items():
            assert open_object(m.store, key, oid, blob, held) is not None, oid.hex()

    r = m.cli("shred", m.store, "--json", check=True)
    assert json.loads(r.stdout)["deletions"] == 2 and json.loads(r.stdout)["mounted"]
    s = status(m)["shred"]
    assert s["pending"] == 0 and s["last_pass"]
    assert "nothing pending" in m.cli("status", m.store, check=True).stdout
    assert_shredded(m.store, key, victim_inos, kept_ino, aside)
    assert sha256((m.mnt / "kept.bin").read_bytes()) == sha256(kept["kept.bin"])
    m.umount()
    assert_shredded(m.store, key, victim_inos, kept_ino, aside)
    verify = m.cli("verify", m.store, "--key-file", m.key)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    fsck = m.cli("fsck", m.store, "--key-file", m.key)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def assert_shredded(root, key, victim_inos, kept_ino, aside) -> None:
    """With the key and every byte the store holds: no secret of a deleted
    file, and none of its copied objects opens (tried with every secret the
    store holds and with none); the file that lives on still opens."""
    assert store_secrets(root, key, victim_inos) == set()
    live = store_secrets(root, key, {kept_ino})
    assert len(live) == 1
    for ino in victim_inos:
        for oid, blob in aside[ino].items():
            assert open_object(root, key, oid, blob, live) is None
    assert all(open_object(root, key, oid, blob, live) is not None
               for oid, blob in aside[kept_ino].items())


def _everything(root) -> bytes:
    """Every byte of the store directory but the objects."""
    out = []
    for base, _, names in os.walk(root):
        if os.path.relpath(base, root).split(os.sep)[0] != "objects":
            for name in names:
                with open(os.path.join(base, name), "rb") as f:
                    out.append(f.read())
    return b"\0".join(out)


def test_the_pass_removes_index_copies_an_interrupted_process_left(make_fs):
    """Review finding: a crash during a snapshot, a compaction or a follower
    round leaves a whole index copy (named by the dead process's pid) that
    holds every secret; the pass removes it."""
    fs = make_fs()
    write_file(fs, "/gone", b"x" * 1000)
    fs.unlink("/gone")
    root = make_fs.root
    mdb = (root / "index" / "data.mdb").read_bytes()
    left = [root / "snapshots" / ".tmp-0000000000000007-999999", root / "index" / ".compact-999999",
            root / ".follow-abc123"]
    left[0].mkdir(parents=True)
    (left[0] / "data.mdb").write_bytes(mdb)
    left[1].write_bytes(mdb)
    left[2].mkdir()
    (left[2] / "part").write_bytes(mdb)
    fs.shred_now()
    assert not [p for p in left if os.path.lexists(p)]


def _every_other_sealed(fs, n: int, byte: bytes) -> list[bytes]:
    """Write /f000../f{n-1} (10 bytes each), checkpoint, and return the
    sealed inode records of every other one (the files a test deletes)."""
    for i in range(n):
        write_file(fs, f"/f{i:03d}", byte * 10)
    fs.checkpoint()
    with fs.lock, fs.index.begin() as txn:
        victims = {fs._resolve(txn, f"/f{i:03d}") for i in range(0, n, 2)}
    return [bytes(v) for k, v in fs.index.raw_items("inodes")
            if int.from_bytes(bytes(k), "big") in victims]


def test_the_pass_leaves_no_freed_page_holding_a_deleted_files_record(make_fs):
    """LMDB does not clear the pages it frees: after the deletions are
    checkpointed, data.mdb still holds the deleted files' sealed records
    (the control); after the pass (the live index compacted, one compacted
    snapshot, no journal record before it) no byte of the store does."""
    fs = make_fs()
    sealed = _every_other_sealed(fs, 300, b"x")
    assert len(sealed) == 150
    for i in range(0, 300, 2):
        fs.unlink(f"/f{i:03d}")
    fs.checkpoint()
    mdb = (make_fs.root / "index" / "data.mdb").read_bytes()
    assert sum(s in mdb for s in sealed) > 0  # freed pages keep them
    assert shred_state(fs.opened).pending == 150
    result = fs.shred_now()
    assert result["deletions"] == 150
    held = _everything(make_fs.root)
    assert not [s for s in sealed if s in held]
    assert [n for n in os.listdir(make_fs.root / "snapshots")] == [
        f"snapshot-{result['seq']:016d}"]
    state = shred_state(fs.opened)
    assert state.pending == 0 and state.done_seq == result["seq"]
    for i in range(1, 300, 2):  # the others are untouched
        assert read_file(fs, f"/f{i:03d}") == b"x" * 10
    fs.close()
    fs = make_fs()
    assert fs.getattr("/f001")["st_size"] == 10 and len(fs.readdir("/")) == 150
    assert fs.index.auth_state == "ok"  # the compacted index matches its sealed sums


def test_a_mounted_daemon_shreds_by_itself_within_shred_after(mount_env):
    m = mount_env
    m.mount("-o", "shred_after=15,checkpoint_interval=0.5")  # room for a loaded machine
    write_files(m.mnt, {"a.bin": os.urandom(300_000), "b.bin": os.urandom(1000)})
    os.unlink(m.mnt / "a.bin")
    s = status(m)["shred"]
    assert s["pending"] == 1 and s["deadline"] - s["first_deleted"] == pytest.approx(15)
    assert "at the latest" in m.cli("status", m.store, check=True).stdout
    deadline = time.monotonic() + 60
    while status(m)["shred"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.3)
    s = status(m)["shred"]
    assert s["pending"] == 0 and s["last_pass"]
    assert "shred pass: 1 deleted files" in m.log()
    m.umount()
    s = status(m)["shred"]  # from the index's plain record, no key
    assert s["pending"] == 0 and s["last_pass"]
    audit = m.cli("audit", m.store, "--key-file", m.key, "--event", "admin", "--json",
                  check=True).stdout
    records = [json.loads(line) for line in audit.splitlines() if line.strip()]
    assert any(r.get("command") == "shred" and r.get("deletions") == 1 for r in records)


def _mounted_one_gone(m, key, size: int, options: str):
    """Mount with ``options``, write gone.bin (``size`` bytes) and kept.bin,
    copy the objects aside, delete gone.bin: (its inode, kept's, the copy)."""
    m.mount("-o", options)
    # (kept.bin an object file: copy_objects copies the object tree)
    write_files(m.mnt, {"gone.bin": os.urandom(size), "kept.bin": os.urandom(5000)})
    gone, kept = os.stat(m.mnt / "gone.bin").st_ino, os.stat(m.mnt / "kept.bin").st_ino
    time.sleep(1)
    aside = copy_objects(m.store, key)
    os.unlink(m.mnt / "gone.bin")
    return gone, kept, aside


def test_unmount_shreds_pending_deletions(mount_env):
    m = mount_env
    key = Secret("keyfile", m.key.read_bytes())
    gone, kept, aside = _mounted_one_gone(m, key, 200_000, "shred_after=0")
    m.umount()
    assert status(m)["shred"]["pending"] == 0
    assert_shredded(m.store, key, {gone}, kept, aside)


def test_a_hard_link_shares_the_secret_and_only_the_last_name_counts(make_fs):
    fs = make_fs()
    write_file(fs, "/a", b"shared" * 1000)
    fs.link("/a", "/b")
    fs.mkdir("/d", 0o755, 0, 0)
    with fs.lock, fs.index.begin() as txn:
        a, d = txn.get_inode(fs._resolve(txn, "/a")), txn.get_inode(fs._resolve(txn, "/d"))
        assert len(a.secret) == 32 and a.secret == txn.get_inode(fs._resolve(txn, "/b")).secret
        assert len(d.secret) == 32 and d.secret != a.secret  # records of one length
    fs.unlink("/a")
    assert shred_state(fs.opened).pending == 0
    assert read_file(fs, "/b") == b"shared" * 1000
    fs.unlink("/b")
    assert shred_state(fs.opened).pending == 1
    fs.rmdir("/d")  # a directory's secret keys no object: no pass for it
    assert shred_state(fs.opened).pending == 1


def test_a_crash_keeps_the_deletions_pending_and_dcmfs_shred_shreds_them(mount_env):
    m = mount_env
    key = Secret("keyfile", m.key.read_bytes())
    gone, kept, aside = _mounted_one_gone(m, key, 100_000, "shred_after=0,checkpoint_interval=0.5")
    time.sleep(1.5)  # checkpointed: the plain record says it without the key
    os.kill(m.daemon_pid(), signal.SIGKILL)
    m.cleanup()
    assert status(m)["shred"]["pending"] == 1
    r = m.cli("shred", m.store, "--key-file", m.key, "--json", check=True)
    result = json.loads(r.stdout)
    assert result["deletions"] == 1 and result["mounted"] is False
    assert status(m)["shred"]["pending"] == 0
    assert_shredded(m.store, key, {gone}, kept, aside)
    fsck = m.cli("fsck", m.store, "--key-file", m.key)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _bucket_copy(ceph_s3, url: str, dest) -> None:
    """Everything of the store's prefix in the bucket but the objects."""
    client = ceph_s3.client()
    bucket, prefix = url[5:].split("/", 1)
    for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        rel = o["Key"][len(prefix) + 1:]
        if rel.startswith("objects/"):
            continue
        os.makedirs(dest / os.path.dirname(rel), exist_ok=True)
        (dest / rel).write_bytes(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())


def test_an_s3_bucket_keeps_no_secret_of_a_shredded_file(s3_fs, ceph_s3, secret, tmp_path):
    """The bucket's snapshots, journal segments and followers' parts held the
    deleted file's secret (the control); after the pass at unmount, nothing
    in the bucket but the objects is left that holds it."""
    fs = s3_fs()
    write_file(fs, "/gone", os.urandom(200_000))
    write_file(fs, "/kept", os.urandom(1000))
    with fs.lock, fs.index.begin() as txn:
        gone = fs._resolve(txn, "/gone")
    fs.checkpoint()
    fs.snapshot()  # uploaded: it holds /gone's record
    fs.opened.publisher.publish()  # the journal for followers, too
    before = tmp_path / "before"
    _bucket_copy(ceph_s3, s3_fs.url, before)
    assert len(store_secrets(s3_fs.root, secret, {gone}, scan=before)) == 1
    fs.unlink("/gone")
    fs.opened.publisher.grace = 0  # followers' time to fetch the parts (60 s) over
    fs.close()
    after = tmp_path / "after"
    _bucket_copy(ceph_s3, s3_fs.url, after)
    assert store_secrets(s3_fs.root, secret, {gone}, scan=after) == set()
    assert store_secrets(s3_fs.root, secret, {gone}) == set()
    assert [n for n in os.listdir(after / "snapshots")] == [
        os.listdir(os.path.join(s3_fs.root, "snapshots"))[0]]


def test_the_reencoder_keeps_the_files_secret(make_fs):
    fs = make_fs(dataclasses.replace(SMALL, reencode=True, checkpoint_interval=0, dicom=False))
    fs.reencoder.pause()
    ct = ct_file().read_bytes()
    write_file(fs, "/ct", ct)

    def state():
        with fs.lock, fs.index.begin() as txn:
            ino = fs._resolve(txn, "/ct")
            return (txn.get_inode(ino).secret,
                    {r.oid: r.codec for r in txn.chunks(ino).values()})
    secret, raw = state()
    assert len(secret) == 32 and set(raw.values()) == {0}
    fs.reencoder.resume()
    assert fs.reencoder.wait_idle(timeout=60)
    again, coded = state()
    assert again == secret and not set(coded) & set(raw) and set(coded.values()) == {1}
    assert read_file(fs, "/ct") == ct


def _publish_and_follow(writer, viewer) -> None:
    """The writer publishes, the follower follows, and reaches the writer's
    sequence number: under the writer's lock, so that none of its
    background threads commits a record between the publish and the
    comparison (a run of the suite once saw the follower one behind)."""
    with writer.lock:
        writer.opened.publisher.publish()
        viewer.opened.follower.follow()
        assert viewer.index.seq == writer.index.seq


def test_a_follower_lets_go_of_a_shredded_files_records_too(s3_fs, tmp_path, secret,
                                                             s3_settings, ceph_s3):
    """A follower's index is another copy: when it applies the writer's
    shred pass it compacts, so its freed pages keep no deleted record."""
    from .test_s3_follow import _writer_and_follower
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings)
    try:
        sealed = _every_other_sealed(writer, 200, b"y")
        writer.opened.remote.drain()
        _publish_and_follow(writer, viewer)
        viewer_mdb = tmp_path / "viewer" / "index" / "data.mdb"
        assert all(s in viewer_mdb.read_bytes() for s in sealed)  # the control
        for i in range(0, 200, 2):
            writer.unlink(f"/f{i:03d}")
        writer.shred_now()
        _publish_and_follow(writer, viewer)
        held = _everything(tmp_path / "viewer")
        assert not [s for s in sealed if s in held]
        assert read_file(viewer, "/f001") == b"y" * 10
        assert len(viewer.readdir("/")) == 100
    finally:
        viewer.close()
