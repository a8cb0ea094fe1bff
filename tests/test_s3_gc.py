"""Packs nothing needs any more leave the bucket (dcmfs.storage.packs,
dcmfs.storage.packcache), against the real Ceph RGW: a pack an opening left
dirty (its objects deleted, the close came before its rewrite) and a pack a
crash left between its PUT and the map's write (its objects uploaded again
at the next opening) are deleted by the next writer, and the files read
back from the bucket alone."""

from __future__ import annotations

import json
import os

from dcmfs.storage.packs import PackMap, build, new_pack_name

from .bucket import Bucket
from .test_s3 import read_file, s3_fs, wipe_cache, write_file  # noqa: F401 (fixture)
from .test_s3_packs import named


def packs_of(fs, *paths) -> set[str]:
    return {fs.opened.remote.packs.where(oid).pack for oid in named(fs, *paths)}


def test_a_pack_left_dirty_by_an_opening_that_ended_is_deleted_by_the_next(
        s3_fs, ceph_s3, secret):
    """The deletes of /a and /b left their pack holding nothing named, and
    the opening ended before the rewrite that deletes it (a crash; here the
    rewrite is skipped).  The mark lived in memory only: the pack stayed in
    the bucket for good (fails before)."""
    from dcmfs.app.admin import verify
    fs = s3_fs(s3_upload_delay=30)
    files = {p: os.urandom(150_000) for p in ("/a", "/b", "/c")}
    write_file(fs, "/a", files["/a"])
    write_file(fs, "/b", files["/b"])
    remote = fs.opened.remote
    assert remote.drain(60)
    write_file(fs, "/c", files["/c"])
    assert remote.drain(60)
    (dead,) = packs_of(fs, "/a", "/b")
    (kept,) = packs_of(fs, "/c")
    assert dead != kept

    def ended_before_the_rewrite() -> None:
        with remote._cv:
            remote._dirty.clear()
            remote._repacking -= 1
            remote._cv.notify_all()
    remote._repack_dirty = ended_before_the_rewrite
    fs.make_durable()
    fs.unlink("/a")
    fs.unlink("/b")
    fs.checkpoint()
    assert remote.drain(60)
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    assert dead in bucket.keys("packs/")  # the control: nothing deleted it
    fs.close()
    fs = s3_fs()
    assert fs.opened.remote.drain(60)
    assert bucket.keys("packs/") == [kept]
    assert set(bucket.objects()) == named(fs, "/c")
    fs.close()
    wipe_cache(s3_fs.root)
    report = verify(s3_fs.root, lambda: secret, fs.config, None, None)
    assert not report["findings"], json.dumps(report["findings"])
    fs = s3_fs()
    assert read_file(fs, "/c") == files["/c"]


def test_a_pack_put_before_a_crash_and_put_again_is_deleted(s3_fs, ceph_s3, secret):
    """A crash between a pack's PUT and the map's write: the objects are
    still waiting in the cache (mode 0600) and go up again at the next
    opening, in a new pack; the first one's objects are all elsewhere now,
    and it must not stay in the bucket (fails before: it stayed)."""
    fs = s3_fs(s3_drain_timeout=1)
    remote = fs.opened.remote
    remote._released.clear()  # the PUT below is the one that went through
    data = os.urandom(300_000)
    write_file(fs, "/f", data)
    oids = named(fs, "/f")
    fs.close()  # the backlog stays in the cache
    members = []
    for oid in sorted(oids):
        path = os.path.join(s3_fs.root, "objects", oid.hex()[:2], oid.hex())
        assert os.stat(path).st_mode & 0o200  # still waiting
        with open(path, "rb") as f:
            members.append((oid, f.read()))
    packs = PackMap(s3_fs.root)
    orphan = new_pack_name(packs.newest())
    packs.close()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    bucket.put(orphan, build(members)[0])
    fs = s3_fs()
    assert fs.opened.remote.drain(60)
    assert orphan not in bucket.keys("packs/")
    assert oids <= set(bucket.objects())
    assert fs.opened.remote.stats()["pack_deletes"] >= 1
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    assert read_file(fs, "/f") == data


def test_an_object_deleted_before_its_upload_costs_no_request(s3_fs):
    """A chunk sealed uncompressed for the re-encoder and replaced before its
    upload was never in the bucket: its delete sent a DELETE anyway, 60 s
    later, one per file ingested (400 for a CT series, ~0.9 s of radosgw
    CPU) (fails before)."""
    fs = s3_fs(s3_upload_delay=3600)
    remote = fs.opened.remote
    name = f"objects/ab/{os.urandom(16).hex()}"
    assert remote.create(name, os.urandom(5000), hold=True)
    before = remote.remote.requests
    remote.delete(name)
    assert remote.drain(30)
    assert remote.remote.requests == before
    assert remote.stats()["deletes_unsent"] == 1
    assert not os.path.exists(remote.cache.path(name))



def cached_copies(root: str, oids) -> list[tuple[bytes, bytes]]:
    out = []
    for oid in sorted(oids):
        with open(os.path.join(root, "objects", oid.hex()[:2], oid.hex()), "rb") as f:
            out.append((oid, f.read()))
    return out


def test_fsck_repair_sweeps_the_packs_the_map_does_not_know(s3_fs, ceph_s3, secret):
    """Packs no opening's listing found (named long before the newest the
    map knows: a crash between their PUT and the map's write, the listing
    after it failed): one holding copies of objects the map has elsewhere,
    one holding the objects of a file deleted since.  fsck names both;
    --repair deletes the first and takes the second into the map, whose
    objects it then finds to be a deleted file's and deletes, so neither
    pack stays in the bucket; every file reads back (fails before: fsck
    saw neither)."""
    from dcmfs.app.admin import fsck
    fs = s3_fs()
    data = os.urandom(200_000)
    write_file(fs, "/k", data)
    write_file(fs, "/gone", os.urandom(200_000))
    assert fs.opened.remote.drain(60)
    kept = cached_copies(s3_fs.root, named(fs, "/k"))
    gone = cached_copies(s3_fs.root, named(fs, "/gone"))
    fs.make_durable()
    fs.unlink("/gone")
    fs.checkpoint()
    config = fs.config
    fs.close()
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    dup = f"packs/{1:016x}{os.urandom(8).hex()}"
    old = f"packs/{2:016x}{os.urandom(8).hex()}"
    bucket.put(dup, build(kept)[0])
    bucket.put(old, build(gone)[0])
    check = fsck(s3_fs.root, lambda: secret, config, repair=False, rebuild=False)
    said = json.dumps(check)
    assert dup in said and old in said
    result = fsck(s3_fs.root, lambda: secret, config, repair=True, rebuild=False)
    assert not result["remaining"], json.dumps(result["remaining"])
    keys = bucket.keys("packs/")
    assert dup not in keys and old not in keys, keys
    assert not {oid for oid, _ in gone} & set(bucket.objects())
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    assert read_file(fs, "/k") == data


def test_the_writer_reads_an_object_whose_pack_it_rewrites_meanwhile(s3_fs, ceph_s3):
    """The writer looks up where an object is (pack P), and its own rewrite
    of P (P lost /a's objects) puts the live objects into a new pack and
    deletes P before the ranged GET goes out: the GET finds P gone.  The
    map already names the new pack, so reading the bucket's pack list
    again adds nothing, and the read failed (EIO for a file that is
    intact; fails before).  The rewrite is run at that moment through the
    real remote's get (the interleaving, not the server, is arranged)."""
    from dcmfs.storage.damage import object_name
    fs = s3_fs(s3_upload_delay=30)
    files = {p: os.urandom(150_000) for p in ("/a", "/b")}
    for path, data in files.items():
        write_file(fs, path, data)
    assert fs.opened.remote.drain(60)
    fs.close()
    wipe_cache(s3_fs.root)  # /b is read from the bucket
    fs = s3_fs(s3_upload_delay=30)
    remote = fs.opened.remote
    assert remote.drain(60)
    (pack,) = packs_of(fs, "/a", "/b")
    b_oids = named(fs, "/b")
    a_oids = named(fs, "/a")
    with remote._pack_lock:  # /a deleted: its pack loses objects
        for oid in a_oids:
            remote._remove(object_name(oid))
    real_get = remote.remote.get
    rewrote = []

    def get(name, start=0, end=None):
        if name == pack and not rewrote:
            rewrote.append(name)
            with remote._pack_lock:
                remote._repack(pack)  # the new pack in the map, P deleted
        return real_get(name, start, end)
    remote.remote.get = get
    try:
        oid = sorted(b_oids)[0]
        remote.get(object_name(oid))
    finally:
        remote.remote.get = real_get
    assert rewrote == [pack]
    assert remote.packs.where(oid).pack != pack
    assert read_file(fs, "/b") == files["/b"]


def test_a_sweep_keeps_a_pack_the_writer_uploads_while_it_lists(s3_fs, ceph_s3):
    """fsck --repair's sweep (PackedCache.sweep_packs) takes the map's packs,
    then lists the bucket.  A pack the writer's upload pool puts and records
    meanwhile is listed, is not among the packs taken before, and its objects
    all sit in a pack of the map (itself): it was deleted as "copies only",
    the only copy in the bucket of a file written a moment before (fails
    before: the file no longer reads once the cache is gone)."""
    fs = s3_fs()
    remote = fs.opened.remote
    write_file(fs, "/a", os.urandom(150_000))
    assert remote.drain(60)
    data = os.urandom(150_000)
    real_list = remote.remote.list
    uploaded = []

    def listing(prefix):
        if not uploaded:  # the upload lands between the map's packs and the LIST
            uploaded.append(prefix)
            write_file(fs, "/b", data)
            assert remote.drain(60)
        return real_list(prefix)
    remote.remote.list = listing
    try:
        found = remote.sweep_packs(apply=True)
    finally:
        remote.remote.list = real_list
    assert uploaded
    bucket = Bucket(ceph_s3.client(), s3_fs.url)
    assert packs_of(fs, "/b") <= set(bucket.keys("packs/")), found
    fs.close()
    wipe_cache(s3_fs.root)
    fs = s3_fs()
    assert read_file(fs, "/b") == data
