"""Read-only followers of an S3 store against a real Ceph RGW: a writer
mount writes files, a follower mount of the same bucket on "another
machine" (a store made by ``dcmfs attach``, a state directory of its own)
sees them within the stated delay, byte-exact, and refuses writes."""

from __future__ import annotations

import errno
import os
import time

import pytest

from .conftest import Mount, ct_file
from .test_s3 import s3_fs  # noqa: F401 (fixture)
from .test_s3_mount import s3_mount  # noqa: F401 (fixture)

#: the test's settings: publish every 1 s, upload after 1 s, follow every 1 s
FAST = "s3_publish_interval=1,s3_upload_delay=1"
#: what docs/format.md states for these settings, with room for a loaded machine
DELAY = 30.0


def _wait_for(path, data: bytes, deadline: float) -> float:
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            if path.read_bytes() == data:
                return time.monotonic() - started
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path.name} did not show on the follower in time")


def test_a_follower_sees_new_files_within_the_delay_and_refuses_writes(s3_mount, tmp_path,
                                                                       monkeypatch):
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds, "-o", FAST)
    first = os.urandom(200_000)
    (m.mnt / "first.bin").write_bytes(first)
    m.umount()
    follower_store = tmp_path / "viewer"
    monkeypatch.setenv("DCMFS_STATE_DIR", str(tmp_path / "viewer-state"))  # another machine
    r = m.cli("attach", m.url, follower_store, "--key-file", m.key, "--s3-credentials-file",
              m.creds, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    monkeypatch.delenv("DCMFS_STATE_DIR")
    m.mount("--s3-credentials-file", m.creds, "-o", FAST)  # the writer again
    (tmp_path / "v").mkdir()
    viewer = Mount(tmp_path / "v")
    viewer.store, viewer.key = follower_store, m.key
    monkeypatch.setenv("DCMFS_STATE_DIR", str(tmp_path / "viewer-state"))
    viewer.mount("--s3-credentials-file", m.creds, "-o", "ro,follow=1")
    try:
        assert (viewer.mnt / "first.bin").read_bytes() == first
        ct = ct_file().read_bytes()
        os.makedirs(m.mnt / "series")
        want = {}
        for i in range(6):
            data = ct[:-8] + i.to_bytes(8, "big")
            (m.mnt / "series" / f"{i:03d}.dcm").write_bytes(data)
            want[f"{i:03d}.dcm"] = data
        big = os.urandom(3_000_000)
        (m.mnt / "big.bin").write_bytes(big)
        written = time.monotonic()
        deadline = written + DELAY
        for name, data in want.items():
            _wait_for(viewer.mnt / "series" / name, data, deadline)
        _wait_for(viewer.mnt / "big.bin", big, deadline)
        took = time.monotonic() - written
        assert took < DELAY
        assert sorted(os.listdir(viewer.mnt / "series")) == sorted(want)
        r = viewer.cli("status", viewer.mnt)
        assert r.returncode == 0 and "follower    at change" in r.stdout, r.stdout + r.stderr
        # a change and a removal follow too
        (m.mnt / "big.bin").unlink()
        deadline = time.monotonic() + DELAY
        while (viewer.mnt / "big.bin").exists():
            assert time.monotonic() < deadline, "the removal did not show on the follower"
            time.sleep(0.2)
        # the follower refuses writes
        for attempt in (lambda: (viewer.mnt / "new.bin").write_bytes(b"x"),
                        lambda: open(viewer.mnt / "first.bin", "r+b"),
                        lambda: os.mkdir(viewer.mnt / "d")):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        assert (m.mnt / "first.bin").read_bytes() == first  # the writer is untouched
    finally:
        viewer.cleanup()
    assert "Traceback" not in viewer.log() and " ERROR" not in viewer.log(), viewer.log()


def test_a_follower_applies_authentic_records_in_sequence_only(s3_fs, tmp_path, secret,
                                                               s3_settings, ceph_s3):
    """A flipped byte in the published journal stops the follower before
    that record; an older copy put back (a rollback) takes it nowhere; the
    genuine journal brings it to the writer's state, byte-exact."""
    import dataclasses

    from dcmfs.app.attach import attach
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.errors import NotFound
    from dcmfs.storage.header import open_store

    from .conftest import SMALL
    from .test_s3 import read_file, write_file

    writer = s3_fs()
    first = os.urandom(150_000)
    write_file(writer, "/first", first)
    writer.close()
    viewer_root = str(tmp_path / "viewer")
    viewer_cfg = dataclasses.replace(SMALL, s3=s3_settings, state_dir=str(tmp_path / "vstate"))
    attach(s3_fs.url, viewer_root, lambda: secret, viewer_cfg)
    writer = s3_fs()
    viewer = FileSystem(open_store(viewer_root, secret),
                        dataclasses.replace(viewer_cfg, read_only=True, follow=3600))
    try:
        follower = viewer.opened.follower
        client = ceph_s3.client()
        bucket, prefix = s3_fs.url[5:].split("/", 1)
        live = f"{prefix}/follow/live"

        def publish():
            writer.opened.remote.drain()
            writer.opened.checkpoint()
            writer.opened.publisher.publish()
            return client.get_object(Bucket=bucket, Key=live)["Body"].read()

        second = os.urandom(200_000)
        write_file(writer, "/second", second)
        older = publish()
        assert follower.follow() > 0
        assert read_file(viewer, "/second") == second
        seen = viewer.index.seq

        third = os.urandom(120_000)
        write_file(writer, "/third", third)
        genuine = publish()
        assert writer.index.seq > seen
        # a rollback: the older copy back in the bucket
        client.put_object(Bucket=bucket, Key=live, Body=older)
        assert follower.follow() == 0 and viewer.index.seq == seen
        with pytest.raises(NotFound):
            viewer.getattr("/third")
        assert read_file(viewer, "/second") == second
        # a flipped byte in the last record: the records before it only
        flipped = bytearray(genuine)
        flipped[-1] ^= 0xFF
        client.put_object(Bucket=bucket, Key=live, Body=bytes(flipped))
        follower.follow()
        assert seen <= viewer.index.seq < writer.index.seq
        # the genuine journal: the writer's state
        client.put_object(Bucket=bucket, Key=live, Body=genuine)
        follower.follow()
        assert viewer.index.seq == writer.index.seq
        assert read_file(viewer, "/third") == third
        assert read_file(viewer, "/first") == first
    finally:
        viewer.close()


def test_a_writer_that_lost_its_lease_publishes_no_journal(s3_fs, ceph_s3):
    from .test_s3 import write_file
    writer = s3_fs()
    client = ceph_s3.client()
    bucket, prefix = s3_fs.url[5:].split("/", 1)

    def live():
        return client.get_object(Bucket=bucket, Key=f"{prefix}/follow/live")["Body"].read()
    write_file(writer, "/a", os.urandom(100_000))
    writer.opened.publisher.publish()
    before = live()
    writer.opened.remote.fence.set()  # what a lease taken over does
    try:
        write_file(writer, "/b", os.urandom(100_000))
        writer.opened.publisher.publish()
        assert live() == before
    finally:
        writer.opened.remote.fence.clear()  # (else its close waits out the drain)
    writer.opened.publisher.publish()
    assert live() != before
