"""S3 stores against a real Ceph RGW (tests/ceph.py): the write-back cache,
reads after the cache is wiped, the bound on the cache, the server going
away during an ingest, tampered bucket objects, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import pytest

from dcmfs.core.filesystem import FileSystem
from dcmfs.errors import IntegrityError
from dcmfs.opened.remote import publish_header
from dcmfs.storage.header import init_store, open_store

from .bucket import Bucket
from .conftest import SMALL, assert_no_dangling


@pytest.fixture
def s3_fs(tmp_path, secret, s3_url, s3_settings):
    """s3_fs(config=...) -> FileSystem on an S3 store (one bucket prefix per test)."""
    root = str(tmp_path / "store")
    opened: list[FileSystem] = []
    base = dataclasses.replace(SMALL, s3=s3_settings, s3_drain_timeout=60, s3_upload_delay=0)

    def make(**changes) -> FileSystem:
        config = dataclasses.replace(base, **changes)
        if not os.path.exists(os.path.join(root, "dcmfs.store")):
            init_store(root, secret, config, backend=s3_url)
            publish_header(root, s3_url, s3_settings)
        fs = FileSystem(open_store(root, secret), config)
        opened.append(fs)
        return fs

    make.root = root
    make.url = s3_url
    yield make
    for fs in opened:
        fs.close()


def write_file(fs: FileSystem, path: str, data: bytes) -> None:
    fh = fs.create(path, 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, data, 0)
    fs.release(fh)


def read_file(fs: FileSystem, path: str) -> bytes:
    fh = fs.open(path, os.O_RDONLY)
    try:
        return fs.read(fh, 1 << 30, 0)
    finally:
        fs.release(fh)


def wipe_cache(root: str) -> None:
    shutil.rmtree(os.path.join(root, "objects"))
    os.mkdir(os.path.join(root, "objects"), 0o700)


def test_objects_reach_the_bucket_and_read_back_with_an_empty_cache(s3_fs, ceph_s3):
    fs = s3_fs()
    files = {f"/f{i}": os.urandom(100_000 + i * 7919) for i in range(8)}
    for path, data in files.items():
        write_file(fs, path, data)
    fs.close()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    in_bucket = {oid.hex() for oid in bucket.objects()}
    local = {n.split("/")[-1] for n in fs.objects.backend.cache.list("objects/")}
    assert local and local <= in_bucket  # everything cached is uploaded
    names = set(bucket.keys())
    assert "dcmfs.store" in names
    assert any(n.startswith("snapshots/snapshot-") for n in names)
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    for path, data in files.items():
        assert read_file(fs, path) == data
    assert fs.opened.remote.stats()["downloads"] > 0
    assert_no_dangling(fs)


def test_cache_is_bounded_and_writers_wait_never_fail(s3_fs):
    """A cache of 1 MB: uploaded objects are evicted, writers of more than
    the cache holds wait for the uploads, nothing fails, all reads back."""
    fs = s3_fs(cache_size=1 << 20)
    files = {f"/g{i}": os.urandom(300_000) for i in range(12)}
    for path, data in files.items():
        write_file(fs, path, data)
    fs.objects.backend.drain(60)
    stats = fs.opened.remote.stats()
    assert stats["evictions"] > 0
    assert stats["cache_bytes"] <= 1 << 20
    cached = sum(os.path.getsize(fs.objects.backend.cache.path(n))
                 for n in fs.objects.backend.cache.list("objects/"))
    assert cached <= 1 << 20
    for path, data in files.items():
        assert read_file(fs, path) == data


def test_objects_replaced_within_the_upload_delay_are_never_uploaded(s3_fs):
    fs = s3_fs(s3_upload_delay=30)
    write_file(fs, "/gone", os.urandom(100_000))
    write_file(fs, "/r", os.urandom(100_000))
    fs.make_durable()
    fs.unlink("/gone")
    fs.checkpoint()  # its objects are deleted
    stats = fs.opened.remote.stats()
    assert stats.get("uploads", 0) == 0 and stats["backlog_objects"] > 0
    assert fs.objects.backend.drain(60)  # a drain does not wait for the delay
    stats = fs.opened.remote.stats()
    with fs.lock, fs.index.begin() as txn:
        live = len(txn.chunks(fs._resolve(txn, "/r")))
    assert stats["uploaded_objects"] == live  # only the chunks of the version that stayed


def test_queueing_an_object_behind_others_wakes_no_uploader(tmp_path, s3_url, s3_settings,
                                                             monkeypatch):
    """An object queued behind others (due later) leaves the uploaders
    asleep (issue 20: a wakeup per object doubled the CPU of a create,
    measured in-process); the objects still go up when due,
    without a drain."""
    import threading
    from dcmfs.storage.backend import LocalBackend
    from dcmfs.storage.cache import CachedBackend
    from dcmfs.storage.s3 import S3Backend

    class Counting(threading.Condition):
        notified = 0

        def notify(self, n=1):
            Counting.notified += 1
            super().notify(n)

    monkeypatch.setattr(threading, "Condition", Counting)
    cached = CachedBackend(LocalBackend(str(tmp_path)), S3Backend(s3_url, s3_settings),
                           cache_size=64 << 20, upload_delay=1.0)
    monkeypatch.undo()
    try:
        before = Counting.notified
        names = [f"objects/{i:02x}/{i:02x}{os.urandom(15).hex()}" for i in range(50)]
        for name in names:
            assert cached.create(name, os.urandom(1000))
        assert Counting.notified - before <= 2  # the first of the queue; 50 before the fix
        deadline = time.monotonic() + 30
        while cached.stats()["backlog_objects"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cached.stats()["backlog_objects"] == 0
        assert set(cached.remote.list("objects/")) == set(names)
    finally:
        cached.close()


def test_uploaded_mark_survives_a_restart(s3_fs):
    """Objects not yet uploaded when a mount ends are found by the next one."""
    fs = s3_fs(s3_uploaders=1, s3_drain_timeout=0.2)
    fs.opened.remote._abandon.set()  # no upload goes out in this session
    write_file(fs, "/late", os.urandom(200_000))
    fs.close()
    cache = fs.objects.backend.cache
    modes = {os.stat(cache.path(n)).st_mode & 0o777 for n in cache.list("objects/")}
    assert 0o600 in modes  # waiting
    fs = s3_fs(s3_drain_timeout=60)
    assert fs.objects.backend.drain(60)
    modes = {os.stat(cache.path(n)).st_mode & 0o777 for n in cache.list("objects/")}
    assert modes == {0o400}
    wipe_cache(s3_fs.root)
    fs.close()
    fs = s3_fs()
    assert len(read_file(fs, "/late")) == 200_000


def test_server_down_during_ingest_no_writer_error_nothing_lost(s3_fs, ceph_s3):
    fs = s3_fs()
    write_file(fs, "/before", b"b" * 100_000)
    assert fs.objects.backend.drain(60)
    ceph_s3.stop_rgw()
    try:
        files = {f"/during{i}": os.urandom(150_000) for i in range(6)}
        for path, data in files.items():
            write_file(fs, path, data)  # no error: the cache takes them
        fs.make_durable()
        time.sleep(1.5)
        stats = fs.opened.remote.stats()
        assert stats["backlog_objects"] > 0 and stats["errors"] > 0
    finally:
        ceph_s3.start_rgw()
    assert fs.objects.backend.drain(120)
    assert fs.opened.remote.stats()["backlog_objects"] == 0
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    for path, data in files.items():
        assert read_file(fs, path) == data


@pytest.mark.parametrize("damage", ["flip", "delete", "swap"])
def test_tampered_bucket_object_gives_integrity_error(s3_fs, ceph_s3, damage):
    fs = s3_fs()
    write_file(fs, "/a", os.urandom(200_000))
    assert fs.opened.remote.drain(60)  # /a and /b in packs of their own
    write_file(fs, "/b", os.urandom(200_000))
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    with fs.lock, fs.index.begin() as txn:
        ref_a = txn.chunks(fs._resolve(txn, "/a"))[0]
        ref_b = txn.chunks(fs._resolve(txn, "/b"))[0]
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    assert bucket.where(ref_a.oid)[0] != bucket.where(ref_b.oid)[0]
    if damage == "flip":
        bucket.flip(ref_a.oid, ref_a.stored_len // 2)
    elif damage == "delete":
        bucket.remove(ref_a.oid)
    else:
        bucket.replace(ref_a.oid, bucket.read(ref_b.oid))
    what = {"flip": "failed authentication", "delete": "missing", "swap": "swapped"}[damage]
    with pytest.raises(IntegrityError, match=what):
        read_file(fs, "/a")
    assert len(read_file(fs, "/b")) == 200_000


def test_rolled_back_bucket_object_gives_integrity_error(s3_fs, ceph_s3):
    """An older object of the same chunk put in the bucket where the current
    one is (a rollback) is told from the current one."""
    fs = s3_fs()
    write_file(fs, "/a", os.urandom(200_000))
    fs.opened.remote.drain()
    with fs.lock, fs.index.begin() as txn:
        old = txn.chunks(fs._resolve(txn, "/a"))[0]
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    old_body = bucket.read(old.oid)
    fh = fs.open("/a", os.O_WRONLY)  # a new generation of chunk 0
    fs.write(fh, os.urandom(1000), 0)
    fs.release(fh)
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    with fs.lock, fs.index.begin() as txn:
        new = txn.chunks(fs._resolve(txn, "/a"))[0]
    assert new.oid != old.oid and new.generation > old.generation
    bucket.replace(new.oid, old_body)
    with pytest.raises(IntegrityError, match="rolled back"):
        read_file(fs, "/a")


def _second_store(tmp_path, first_root: str) -> str:
    """Another machine's store directory on the same bucket prefix."""
    second = tmp_path / "second"
    (second / "objects").mkdir(parents=True)
    shutil.copyfile(os.path.join(first_root, "dcmfs.store"), second / "dcmfs.store")
    return str(second)


def test_one_writer_per_prefix_and_the_stale_lease_rule(s3_fs, tmp_path, secret, ceph_s3,
                                                        monkeypatch):
    from dcmfs.errors import LeaseHeldError
    from dcmfs.opened import lease as lease_mod
    fs = s3_fs()
    write_file(fs, "/x", b"x" * 1000)
    second = _second_store(tmp_path, s3_fs.root)
    # another machine: its own state directory (witnesses)
    config = dataclasses.replace(SMALL, s3=fs.config.s3, state_dir=str(tmp_path / "other"))
    with pytest.raises(LeaseHeldError) as info:
        FileSystem(open_store(second, secret), config)
    assert info.value.exit_code == 37 and "second writer is refused" in str(info.value)
    fs.close()  # releases: the next writer takes over at once
    other = FileSystem(open_store(second, secret), config)
    other.close()
    # a lease left by a crashed writer: refused until it is older than TTL + SKEW
    client = ceph_s3.client()
    bucket, prefix = s3_fs.url[5:].split("/", 1)
    names = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/lease-")
             .get("Contents", [])]
    top = max(int(n.rsplit("-", 1)[1]) for n in names)
    crashed = {"holder": "dead", "host": "elsewhere", "pid": 1,
               "expires": time.time() - lease_mod.SKEW + 5}
    client.put_object(Bucket=bucket, Key=f"{prefix}/lease-{top + 1}",
                      Body=json.dumps(crashed).encode())
    with pytest.raises(LeaseHeldError, match="elsewhere"):
        FileSystem(open_store(second, secret), config)
    crashed["expires"] = time.time() - lease_mod.SKEW - 1
    client.put_object(Bucket=bucket, Key=f"{prefix}/lease-{top + 1}",
                      Body=json.dumps(crashed).encode())
    taken = FileSystem(open_store(second, secret), config)
    assert taken.opened.remote is not None
    taken.close()
    names = {o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(
        Bucket=bucket, Prefix=prefix + "/lease-").get("Contents", [])}
    assert names == {f"lease-{top + 2}"}  # the takeover's own; the superseded are gone


def test_tampered_objects_are_named_by_verify(s3_fs, ceph_s3, secret):
    from dcmfs.app.admin import verify
    fs = s3_fs()
    write_file(fs, "/a", os.urandom(200_000))
    with fs.lock, fs.index.begin() as txn:
        ref = txn.chunks(fs._resolve(txn, "/a"))[1]
    fs.close()
    wipe_cache(s3_fs.root)
    Bucket(ceph_s3.client(), s3_fs.url).flip(ref.oid, -5)
    report = verify(s3_fs.root, lambda: secret, fs.config, None, None)
    assert ref.oid.hex() in json.dumps(report["findings"])
    assert "failed authentication" in json.dumps(report["findings"])


def test_nothing_leaks_into_the_bucket(s3_fs, ceph_s3):
    """No file name and no plaintext run appears in any object of the bucket
    (objects, header, snapshots, lease)."""
    fs = s3_fs()
    name = "PATIENT_Leakcheck_Doe"
    plain = (b"SECRET-DICOM-ATTRIBUTE-" * 40)[:900] + os.urandom(100)
    fs.mkdir(f"/{name}", 0o755, 0, 0)
    write_file(fs, f"/{name}/{name}.dcm", plain * 50)  # one small object: in the index
    write_file(fs, f"/{name}/big.bin", plain * 40 + os.urandom(100_000))  # object files
    fs.close()
    client = ceph_s3.client()
    bucket, prefix = s3_fs.url[5:].split("/", 1)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
            .get("Contents", [])]
    assert any("/packs/" in k for k in keys) and any("/snapshots/" in k for k in keys)
    for key in keys:
        assert name not in key
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert name.encode() not in body, key
        assert b"SECRET-DICOM-ATTRIBUTE" not in body, key


def test_random_reads_of_framed_objects_are_ranged_gets(s3_fs, ceph_s3):
    """A random 4 KiB read of an object not in the cache GETs the header,
    the frame table and one frame (nothing is cached whole); a flipped
    frame in the bucket fails its own reads, never its neighbour's."""
    from dcmfs.storage import frames
    from dcmfs.storage.damage import object_name
    cs, fsz = 4 * frames.FRAME_SIZE, frames.FRAME_SIZE
    fs = s3_fs(chunk_size=cs)
    data = os.urandom(3 * cs)
    write_file(fs, "/r", data)
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs(chunk_size=cs)
    fs.data.SEQUENTIAL_SLACK = -1  # every read is a random reader's
    with fs.lock, fs.index.begin() as txn:
        refs = txn.chunks(fs._resolve(txn, "/r"))
    assert all(r.flags & 0x04 for r in refs.values())  # framed
    fh = fs.open("/r", os.O_RDONLY)
    try:
        off = cs + fsz + 100
        assert fs.read(fh, 4096, off) == data[off:off + 4096]
        assert fs.objects.backend.cache.head(object_name(refs[1].oid)) is None
        # inside frame 0 of chunk 2 (in its pack, or loose)
        Bucket(ceph_s3.client(), s3_fs.url).flip(refs[2].oid, frames.table_end(cs) + 1000)
        off = 2 * cs + fsz + 10
        assert fs.read(fh, 4096, off) == data[off:off + 4096]
        with pytest.raises(IntegrityError):
            fs.read(fh, 4096, 2 * cs + 10)
    finally:
        fs.release(fh)
