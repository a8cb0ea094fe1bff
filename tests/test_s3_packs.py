"""Packs (feature ``s3-packs-v1``, dcmfs.storage.packs) against the real Ceph
RGW: a CT series goes up in a few PUTs and comes back cold, byte-exact, in a
few GETs; deleted objects leave the bucket (a pack rewritten without them,
or deleted); the pack map is rebuilt from the bucket when it is lost; a
store made before the feature keeps reading its loose objects and packs the
new ones.  Tampering with packed objects: tests/test_s3.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import pytest

from dcmfs import format as fmt
from dcmfs.format import CHUNK_FLAG_INLINE
from dcmfs.core.filesystem import FileSystem
from dcmfs.errors import IntegrityError
from dcmfs.storage import slots
from dcmfs.storage.header import open_store, rewrite_header
from dcmfs.storage.packs import ENTRY, HEAD, PACKS, build, parse_table

from .bucket import Bucket
from .conftest import ct_file
from .test_s3 import read_file, s3_fs, wipe_cache, write_file  # noqa: F401 (fixture)


def named(fs, *paths) -> set[bytes]:
    """The ids of the object files the index names for ``paths`` (not those
    kept in the index: inline-small-v1)."""
    with fs.lock, fs.index.begin() as txn:
        return {ref.oid for p in paths for ref in txn.chunks(fs._resolve(txn, p)).values()
                if not ref.flags & CHUNK_FLAG_INLINE}


def test_a_ct_series_goes_up_in_packs_and_reads_back_cold_in_few_gets(s3_fs, ceph_s3):
    ct = ct_file().read_bytes()
    series = {f"/ct/CT{i:03}.dcm": ct[:-2000] + os.urandom(2000) for i in range(40)}
    fs = s3_fs(s3_upload_delay=30)  # the drain at close sends them together
    fs.mkdir("/ct", 0o755, 0, 0)
    for path, data in series.items():
        write_file(fs, path, data)
    oids = named(fs, *series)
    fs.close()
    stats = fs.opened.remote.stats()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    assert oids <= set(bucket.objects())
    assert not bucket.keys("objects/")  # nothing loose
    packs = bucket.keys("packs/")
    assert stats["uploaded_objects"] >= len(oids) >= 40
    assert stats["uploads"] == len(packs) <= len(oids) // 10, (stats, len(oids))
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    before = fs.opened.remote.remote.requests
    for path in sorted(series):  # a viewer loading the series
        assert read_file(fs, path) == series[path]
    gets = fs.opened.remote.remote.requests - before
    assert gets <= len(oids) // 4, (gets, len(oids))  # neighbours came along


def test_deleted_objects_leave_the_bucket(s3_fs, ceph_s3, secret):
    """A pack that lost objects is rewritten without them; one that holds
    nothing named any more is deleted; the bucket then holds exactly the
    objects the index names, and verify finds nothing."""
    from dcmfs.app.admin import verify
    fs = s3_fs(s3_upload_delay=30)
    files = {f"/f{i}": os.urandom(150_000) for i in range(4)}
    for path, data in files.items():
        write_file(fs, path, data)
    assert fs.opened.remote.drain(60)
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    assert len(bucket.keys("packs/")) == 1
    fs.make_durable()
    fs.unlink("/f1")
    fs.unlink("/f3")
    fs.checkpoint()  # their objects are deleted
    assert fs.opened.remote.drain(60)
    assert set(bucket.objects()) == named(fs, "/f0", "/f2")
    assert fs.opened.remote.stats()["repacks"] == 1
    for path in ("/f0", "/f2"):
        assert read_file(fs, path) == files[path]
    fs.close()
    wipe_cache(s3_fs.root)
    report = verify(s3_fs.root, lambda: secret, fs.config, None, None)
    assert not report["findings"], json.dumps(report["findings"])
    fs = s3_fs()
    for path in ("/f0", "/f2"):
        assert read_file(fs, path) == files[path]
    fs.make_durable()
    fs.unlink("/f0")
    fs.unlink("/f2")
    fs.checkpoint()
    assert fs.opened.remote.drain(60)
    assert bucket.keys("packs/") == [] and bucket.objects() == {}


def test_a_lost_pack_map_is_rebuilt_from_the_bucket(s3_fs):
    fs = s3_fs()
    files = {f"/m{i}": os.urandom(120_000 + i) for i in range(5)}
    for path, data in files.items():
        write_file(fs, path, data)
    fs.close()
    shutil.rmtree(os.path.join(s3_fs.root, "packs"))
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    assert not fs.opened.remote.packs.fresh
    for path, data in files.items():
        assert read_file(fs, path) == data


def test_a_store_made_before_packs_reads_its_loose_objects_and_packs_new_ones(
        s3_fs, ceph_s3, secret):
    fs = s3_fs()  # made now, then turned into a store of before the feature
    fs.close()
    master = fs.store.master_key

    def without(header: dict) -> dict:
        header["features"] = [f for f in header["features"] if f != fmt.S3_PACKS_FEATURE]
        return slots.seal_header(master, header)
    rewrite_header(s3_fs.root, without)
    old = open_store(s3_fs.root, secret)  # as a dcmfs before the feature opened it
    assert fmt.S3_PACKS_FEATURE not in old.features
    fs = FileSystem(old, fs.config)
    before = os.urandom(300_000)
    write_file(fs, "/before", before)
    fs.close()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    loose = bucket.keys("objects/")
    assert loose and not bucket.keys("packs/")
    upgraded = open_store(s3_fs.root, secret, for_writing=True)
    assert fmt.S3_PACKS_FEATURE in upgraded.features
    fs = FileSystem(upgraded, fs.config)
    after = os.urandom(300_000)
    write_file(fs, "/after", after)
    fs.close()
    assert bucket.keys("packs/") and sorted(bucket.keys("objects/")) == sorted(loose)
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    assert read_file(fs, "/before") == before and read_file(fs, "/after") == after


def test_a_follower_reads_objects_the_writer_moved_to_a_new_pack(s3_fs, tmp_path, secret,
                                                                 s3_settings):
    """The writer rewrites a pack without a deleted file's objects; a
    follower whose map still names the old pack finds it gone, reads the
    new packs' tables and reads the file that stayed, byte-exact."""
    from .test_s3_follow import _writer_and_follower
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings)
    try:
        writer.opened.remote.upload_delay = 30  # both files in one pack
        keep, gone = os.urandom(150_000), os.urandom(150_000)
        write_file(writer, "/keep", keep)
        write_file(writer, "/gone", gone)
        assert writer.opened.remote.drain(60)
        writer.opened.publisher.publish()
        viewer.opened.follower.follow()
        old = viewer.opened.remote.packs.where(next(iter(named(viewer, "/keep")))).pack
        writer.make_durable()
        writer.unlink("/gone")
        writer.checkpoint()
        assert writer.opened.remote.drain(60)
        assert writer.opened.remote.stats()["repacks"] == 1
        writer.opened.publisher.publish()
        viewer.opened.follower.follow()
        assert read_file(viewer, "/keep") == keep
        assert viewer.opened.remote.packs.where(next(iter(named(viewer, "/keep")))).pack != old
    finally:
        viewer.close()


def test_a_pack_gone_from_the_bucket_is_not_rewritten_and_uploads_go_on(
        s3_fs, ceph_s3, caplog):
    """A pack deleted behind the writer's back cannot be rewritten without
    a deleted file's objects: a warning says so, and the upload pool (one
    thread here) goes on uploading."""
    fs = s3_fs(s3_upload_delay=30, s3_uploaders=1)
    write_file(fs, "/keep", os.urandom(150_000))
    write_file(fs, "/gone", os.urandom(150_000))
    assert fs.opened.remote.drain(60)
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    kept = named(fs, "/keep")
    assert len(bucket.keys("packs/")) == 1, bucket.keys("packs/")
    bucket.remove(next(iter(kept)))  # the whole pack
    for oid in kept:  # and the cached copies: the rewrite must GET them
        os.remove(fs.objects.path(oid))
    fs.make_durable()
    fs.unlink("/gone")
    fs.checkpoint()
    assert fs.opened.remote.drain(60)
    assert "is missing from the bucket" in caplog.text
    write_file(fs, "/later", os.urandom(150_000))
    assert fs.opened.remote.drain(30)  # the uploader lives
    assert named(fs, "/later") <= set(bucket.objects())


def test_a_tampered_pack_table_gives_eio_and_is_named_by_verify(s3_fs, ceph_s3, secret):
    """The table in a pack is read only when the map is rebuilt from the
    bucket; an entry altered there (its offset) makes the read fetch the
    wrong bytes, which fail the object's own checks: EIO for that file,
    verify names the object, the other files read back."""
    from dcmfs.app.admin import verify
    fs = s3_fs()
    files = {"/a": os.urandom(150_000), "/b": os.urandom(150_000)}
    for path, data in files.items():
        write_file(fs, path, data)
    oid = sorted(named(fs, "/a"))[0]
    fs.close()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    key = bucket.where(oid)[0]
    body = bytearray(bucket.get(key))
    entries = [e[0] for e in parse_table(bytes(body), len(body))]
    body[HEAD.size + entries.index(oid) * ENTRY.size + 23] ^= 0xFF  # its offset's low byte
    bucket.put(key, bytes(body))
    shutil.rmtree(os.path.join(s3_fs.root, "packs"))  # the map comes from the tables
    wipe_cache(s3_fs.root)
    report = verify(s3_fs.root, lambda: secret, fs.config, None, None)
    assert oid.hex() in json.dumps(report["findings"])
    fs = s3_fs(read_only=True)  # verify marked the store damaged
    with pytest.raises(IntegrityError):
        read_file(fs, "/a")
    assert read_file(fs, "/b") == files["/b"]


def _ms(pack: str) -> int:
    return int(pack[len(PACKS):len(PACKS) + 16], 16)


def test_a_follower_finds_the_packs_of_a_writer_whose_clock_is_behind(
        s3_fs, ceph_s3, tmp_path, secret, s3_settings):
    """A follower lists only the packs named after the newest it knows,
    less 10 minutes.  The lease's previous holder ran 11 minutes ahead and
    left a pack: this writer's packs were named by its own clock, before
    that, so the follower never listed them and never saw the file (fails
    before).  They are named after the newest pack the writer knows, which
    it reads from the bucket when it opens."""
    from .test_s3_follow import _writer_and_follower
    s3_fs().close()
    ahead = f"{PACKS}{int((time.time() + 660) * 1000):016x}{os.urandom(8).hex()}"
    Bucket(ceph_s3.client(), s3_fs.url).put(ahead, build([])[0])
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings)
    try:
        assert ahead in viewer.opened.remote.packs.packs()  # attached after it
        data = os.urandom(150_000)
        write_file(writer, "/late", data)
        assert writer.opened.remote.drain(60)
        pack = writer.opened.remote.packs.where(next(iter(named(writer, "/late")))).pack
        assert pack > ahead
        writer.opened.publisher.publish()
        viewer.opened.follower.follow()
        assert read_file(viewer, "/late") == data
    finally:
        viewer.close()


def test_a_pack_is_named_when_its_put_goes_through_not_before_its_retries(s3_fs):
    """A pack named before a long run of failed PUTs sorted before packs
    uploaded meanwhile, out of a follower's listing once that run passed 10
    minutes (fails before: the name was taken before the first attempt)."""
    fs = s3_fs(s3_uploaders=1)
    remote = fs.opened.remote
    remote.fence.set()  # every PUT refused, retried with backoff
    write_file(fs, "/c", os.urandom(150_000))
    deadline = time.monotonic() + 30
    while remote.counts["errors"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.counts["errors"] >= 1  # its PUT was refused
    time.sleep(1.0)  # and retried meanwhile
    cleared = int(time.time() * 1000)
    remote.fence.clear()
    assert remote.drain(60)
    assert remote.counts["errors"] >= 3
    pack = remote.packs.where(next(iter(named(fs, "/c")))).pack
    assert _ms(pack) >= cleared, (pack, hex(cleared))


def test_the_feature_reaches_the_bucket_header_when_an_upgrade_adds_it(
        s3_fs, ceph_s3, secret, tmp_path, s3_settings, monkeypatch):
    """A store of before packs, bucket header and all, opened read-write by
    this version: ``s3-packs-v1`` is added to the local header, and the
    bucket's copy must have it before the first pack goes up.  Before, it
    came only with the first publication (10 s, or the snapshot at
    unmount), so a follower attached in that window by a dcmfs that knows
    no packs was let in and did not see the packed objects (fails before:
    the bucket's header lacked the feature; that attach was not refused)."""
    from dcmfs.app.attach import attach
    from dcmfs.errors import UnsupportedFormatError
    fs = s3_fs()
    fs.close()
    master = fs.store.master_key
    bucket = Bucket(ceph_s3.client(), s3_fs.url)

    def without(header: dict) -> dict:
        header["features"] = [f for f in header["features"] if f != fmt.S3_PACKS_FEATURE]
        return slots.seal_header(master, header)
    rewrite_header(s3_fs.root, without)
    with open(os.path.join(s3_fs.root, fmt.HEADER_NAME), "rb") as f:
        bucket.put(fmt.HEADER_NAME, f.read())  # as a dcmfs of before the feature left it
    upgraded = open_store(s3_fs.root, secret, for_writing=True)
    assert fmt.S3_PACKS_FEATURE in upgraded.features
    fs = FileSystem(upgraded, dataclasses.replace(fs.config, s3_publish_interval=0))
    try:
        assert fmt.S3_PACKS_FEATURE in json.loads(bucket.get(fmt.HEADER_NAME))["features"]
        write_file(fs, "/after", os.urandom(200_000))
        assert fs.opened.remote.drain(60)
        assert bucket.keys("packs/")
        # a dcmfs that knows no packs attaching a follower now is refused
        monkeypatch.setattr(fmt, "KNOWN_FEATURES", fmt.KNOWN_FEATURES - {fmt.S3_PACKS_FEATURE})
        config = dataclasses.replace(fs.config, read_only=True)
        with pytest.raises(UnsupportedFormatError):
            attach(s3_fs.url, str(tmp_path / "viewer"), lambda: secret, config, follower=True)
    finally:
        fs.close()


def test_an_opening_refused_by_the_lease_uploads_nothing(s3_fs, ceph_s3, secret, tmp_path):
    """A copy of the store directory with an object not yet uploaded in its
    cache (a machine that was the writer once) is opened while another
    holds the lease: it is refused, and its backlog stays in its cache.
    Before, the upload pool started before the lease was asked for and put
    the backlog into the bucket anyway (fails before: a pack went up)."""
    from dcmfs.errors import LeaseHeldError
    s3_fs().close()
    copy = str(tmp_path / "copy")
    shutil.copytree(s3_fs.root, copy)
    oid = os.urandom(16)
    pending = os.path.join(copy, "objects", oid.hex()[:2], oid.hex())
    os.makedirs(os.path.dirname(pending), exist_ok=True)
    with open(pending, "wb") as f:  # mode 0600: waiting for its upload
        f.write(os.urandom(50_000))
    os.chmod(pending, 0o600)
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    packs = set(bucket.keys("packs/"))
    writer = s3_fs()
    try:
        with pytest.raises(LeaseHeldError):
            FileSystem(open_store(copy, secret, for_writing=True), writer.config)
        time.sleep(1.0)  # an upload started before the refusal would be done
        assert set(bucket.keys("packs/")) == packs
        assert oid not in bucket.objects()
        assert os.stat(pending).st_mode & 0o777 == 0o600  # still waiting, in its cache
    finally:
        writer.close()
