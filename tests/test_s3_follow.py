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


def _writer_and_follower(s3_fs, tmp_path, secret, s3_settings, first: bytes | None = None,
                         **writer_changes):
    """A writer of the bucket (after one session that wrote ``first`` as
    /first, if given; ``writer_changes`` to its config) and a follower core
    attached from the bucket on "another machine" (its own state
    directory), following by hand; ``writer_changes`` apply to both of the
    writer's sessions."""
    import dataclasses

    from dcmfs.app.attach import attach
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage.header import open_store

    from .conftest import SMALL
    from .test_s3 import write_file

    writer = s3_fs(**writer_changes)
    if first is not None:
        write_file(writer, "/first", first)
    writer.close()
    viewer_root = str(tmp_path / "viewer")
    viewer_cfg = dataclasses.replace(SMALL, s3=s3_settings, state_dir=str(tmp_path / "vstate"))
    attach(s3_fs.url, viewer_root, lambda: secret, viewer_cfg)
    writer = s3_fs(**writer_changes)
    viewer = FileSystem(open_store(viewer_root, secret),
                        dataclasses.replace(viewer_cfg, read_only=True, follow=3600))
    return writer, viewer


def test_a_follower_sees_new_files_within_the_delay_and_refuses_writes(s3_mount, tmp_path,
                                                                       monkeypatch):
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds, "-o", FAST)
    first = os.urandom(200_000)
    (m.mnt / "first.bin").write_bytes(first)
    m.umount()
    m.mount("--s3-credentials-file", m.creds, "-o", FAST)  # the writer again, and stays
    (m.mnt / "while.bin").write_bytes(b"w" * 70_000)  # after the snapshot
    follower_store = tmp_path / "viewer"
    monkeypatch.setenv("DCMFS_STATE_DIR", str(tmp_path / "viewer-state"))  # another machine
    r = m.cli("attach", m.url, follower_store, "--follower", "--key-file", m.key,
              "--s3-credentials-file", m.creds, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "follower at change" in r.stdout
    (tmp_path / "v").mkdir()
    viewer = Mount(tmp_path / "v")
    viewer.store, viewer.key = follower_store, m.key
    viewer.mount("--s3-credentials-file", m.creds, "-o", "ro,follow=1")
    try:
        assert (viewer.mnt / "first.bin").read_bytes() == first
        _wait_for(viewer.mnt / "while.bin", b"w" * 70_000, time.monotonic() + DELAY)
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
    that record; the newest part withheld, or older records put back under
    a new name (a rollback), take it nowhere; the genuine part brings it to
    the writer's state, byte-exact."""
    from dcmfs.errors import NotFound

    from .test_s3 import read_file, write_file

    first = os.urandom(150_000)
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings, first)
    try:
        follower = viewer.opened.follower
        client = ceph_s3.client()
        bucket, prefix = s3_fs.url[5:].split("/", 1)

        def publish() -> tuple[str, bytes]:
            """The newest part's key and bytes after a publication."""
            writer.opened.remote.drain()
            writer.opened.checkpoint()
            writer.opened.publisher.publish()
            key = f"{prefix}/follow/part-{writer.index.seq:016d}"
            return key, client.get_object(Bucket=bucket, Key=key)["Body"].read()

        second = os.urandom(200_000)
        write_file(writer, "/second", second)
        _, older = publish()
        assert follower.follow() > 0
        assert read_file(viewer, "/second") == second
        seen = viewer.index.seq

        third = os.urandom(120_000)
        write_file(writer, "/third", third)
        key, genuine = publish()
        assert writer.index.seq > seen
        # withheld: the newest part gone; rolled back: older records in its place
        client.delete_object(Bucket=bucket, Key=key)
        assert follower.follow() == 0 and viewer.index.seq == seen
        client.put_object(Bucket=bucket, Key=key, Body=older)
        assert follower.follow() == 0 and viewer.index.seq == seen
        with pytest.raises(NotFound):
            viewer.getattr("/third")
        assert read_file(viewer, "/second") == second
        # a flipped byte in the last record: the records before it only
        flipped = bytearray(genuine)
        flipped[-1] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
        follower.follow()
        assert seen <= viewer.index.seq < writer.index.seq
        # the genuine part: the writer's state
        client.put_object(Bucket=bucket, Key=key, Body=genuine)
        follower.follow()
        assert viewer.index.seq == writer.index.seq
        assert read_file(viewer, "/third") == third
        assert read_file(viewer, "/first") == first
        # a file that is no journal of this store is skipped, the rest applied
        client.put_object(Bucket=bucket, Key=f"{prefix}/follow/part-{10**15:016d}",
                          Body=b"DCMJ" + os.urandom(200))
        fourth = os.urandom(50_000)
        write_file(writer, "/fourth", fourth)
        publish()
        assert follower.follow() > 0
        assert read_file(viewer, "/fourth") == fourth
    finally:
        viewer.close()


def test_a_writer_that_lost_its_lease_publishes_no_journal(s3_fs, ceph_s3):
    from .test_s3 import write_file
    writer = s3_fs()
    client = ceph_s3.client()
    bucket, prefix = s3_fs.url[5:].split("/", 1)

    def parts() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/follow/")
        return {o["Key"] for o in listed.get("Contents", [])}
    write_file(writer, "/a", os.urandom(100_000))
    writer.opened.publisher.publish()
    before = parts()
    assert before
    writer.opened.remote.fence.set()  # what a lease taken over does
    try:
        write_file(writer, "/b", os.urandom(100_000))
        writer.opened.publisher.publish()
        assert parts() == before
    finally:
        writer.opened.remote.fence.clear()  # (else its close waits out the drain)
    writer.opened.publisher.publish()
    assert parts() > before  # only the new records: one more part


def test_a_follower_follows_across_a_journal_rotation(s3_fs, tmp_path, secret, s3_settings,
                                                      ceph_s3):
    """The writer's journal is archived: the segment replaces the parts it
    holds in the bucket, and a follower behind it catches up from it."""
    from .test_s3 import read_file, write_file

    # no checkpoint thread: the test checkpoints and publishes by hand, and a
    # journal over its bound wakes that thread at once (issue 17), whose
    # checkpoint could add records after the publish below
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings,
                                          checkpoint_interval=0)
    client = ceph_s3.client()
    bucket, prefix = s3_fs.url[5:].split("/", 1)

    def names() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/follow/")
        return {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    try:
        files = {}
        for i in range(3):
            files[f"/f{i}"] = os.urandom(90_000)
            write_file(writer, f"/f{i}", files[f"/f{i}"])
            writer.opened.publisher.publish()
        assert len([n for n in names() if n.startswith("part-")]) >= 3
        writer.index._journal_limit = 1  # the next checkpoint archives the journal
        files["/g"] = os.urandom(90_000)
        write_file(writer, "/g", files["/g"])
        writer.opened.remote.drain()
        writer.opened.checkpoint()
        writer.opened.publisher.publish()
        now = names()
        segments = [n for n in now if n.startswith("journal-")]
        assert segments and not [n for n in now if n.startswith("part-")], now
        viewer.opened.follower.follow()
        assert viewer.index.seq == writer.index.seq
        for path, data in files.items():
            assert read_file(viewer, path) == data
    finally:
        viewer.close()


def test_a_follower_follows_a_key_rotation_and_says_when_it_cannot(s3_fs, tmp_path, secret,
                                                                   s3_settings):
    """The writer rotates its key: the follower opens the new epoch from the
    bucket's header with its slot's key and reads the files sealed under it
    (before, they failed authentication: EIO); a header it cannot check is
    not used; a finish that moved the index to a new generation is named."""
    import io
    import json

    from dcmfs.app import admin
    from dcmfs.errors import IntegrityError
    from dcmfs.storage import keyring

    from .conftest import SMALL
    from .test_s3 import read_file, write_file

    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings,
                                          first=b"epoch 0" * 1000, checkpoint_interval=0)
    root = s3_fs.root
    try:
        writer.close()
        keyring.rotate(root, secret)
        writer = s3_fs(checkpoint_interval=0)
        data = os.urandom(120_000)
        write_file(writer, "/after", data)
        writer.opened.remote.drain()
        writer.opened.checkpoint()
        writer.opened.publisher.publish()  # the header first, then the records
        assert viewer.opened.follower.follow() >= 1
        assert viewer.opened.follower.last_error is None
        assert read_file(viewer, "/after") == data
        assert read_file(viewer, "/first") == b"epoch 0" * 1000
        local = json.loads((tmp_path / "viewer" / "dcmfs.store").read_text())
        assert [e["epoch"] for e in local["epochs"]] == [0, 1]  # its next mount's
        # a header altered in the bucket (a fake epoch sealed to the slot's
        # public key, the mac made up) is not used
        bucket_header = writer.opened.remote.remote.get("dcmfs.store")
        forged = json.loads(bucket_header)
        forged["epoch"] = 7
        forged["mac"] = "00" * 32
        writer.opened.remote.remote.put("dcmfs.store", json.dumps(forged).encode())
        assert viewer.opened.follower.follow() == 0
        assert "cannot be checked" in viewer.opened.follower.last_error
        writer.opened.remote.remote.put("dcmfs.store", bucket_header)
        writer.close()
        cfg = writer.config
        admin.finish_rotation(root, lambda: secret, cfg, out=io.StringIO())
        assert viewer.opened.follower.follow() == 0
        assert "new key generation" in viewer.opened.follower.last_error
        assert read_file(viewer, "/after") == data  # what it has stays readable
    finally:
        viewer.close()


def _replace_and_follow(writer, viewer, content: bytes) -> None:
    """The writer replaces /first's content (the same inode), publishes,
    and the follower applies the records."""
    wh = writer.open("/first", os.O_WRONLY | os.O_TRUNC)
    writer.truncate("/first", 0, wh)
    writer.write(wh, content, 0)
    writer.release(wh)
    writer.opened.remote.drain()
    writer.opened.checkpoint()
    writer.opened.publisher.publish()
    assert viewer.opened.follower.follow() > 0


def test_a_file_closed_on_a_follower_after_the_writer_changed_it(s3_fs, tmp_path, secret,
                                                                 s3_settings):
    """A reader on a follower holds /first open while the writer replaces
    its content and the follower applies the records; when the reader
    closes, the follower answers the writer's size and content (the close
    kept the record the file was opened with: the old size, then the new
    chunks read under it)."""
    from .test_s3 import read_file

    first = os.urandom(150_000)
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings, first)
    try:
        fh = viewer.open("/first", os.O_RDONLY)
        assert viewer.read(fh, 100, 0) == first[:100]
        second = os.urandom(90_000)
        _replace_and_follow(writer, viewer, second)
        viewer.release(fh)
        assert viewer.getattr("/first")["st_size"] == len(second)
        assert read_file(viewer, "/first") == second
    finally:
        viewer.close()
        writer.close()


@pytest.mark.parametrize("inline_max", [0, 4096], ids=["object-files", "inline"])
def test_a_follower_reads_a_file_it_holds_open_after_the_writer_replaced_it(
        s3_fs, tmp_path, secret, s3_settings, inline_max):
    """A viewer on a follower holds a small report open; the writer replaces
    its content; the follower applies the records; the open handle still
    reads.  An object file stays in the bucket for the delete delay; an
    inline object's row is deleted by the very record the follower applies,
    so the follower keeps it while the file is open, and lets it go at
    release."""
    from .test_s3 import read_file

    first = b"first report, " * 70  # ~1 KB: one small chunk
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings, first,
                                          inline_max=inline_max)
    try:
        fh = viewer.open("/first", os.O_RDONLY)
        second = b"second report " * 70
        _replace_and_follow(writer, viewer, second)
        assert viewer.read(fh, 4096, 0) == first  # the version it opened
        viewer.release(fh)
        assert not viewer.index.inline.kept  # let go with the last handle
        assert read_file(viewer, "/first") == second
    finally:
        viewer.close()
        writer.close()


def test_attach_and_a_follower_keep_audit_trails_of_their_own(s3_fs, tmp_path, secret,
                                                              s3_settings, caplog):
    """The index a machine adopts holds the head of the writer's audit
    trail.  ``dcmfs attach`` starts this machine's trail after it (the chain
    continues; no break is reported); a follower, whose index keeps taking
    the writer's head, keeps its own trail apart from it: remounted after
    the writer went on, it reports no damage."""
    import dataclasses

    from dcmfs.app import audit
    from dcmfs.app.attach import attach
    from dcmfs.audit.check import walk
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage.header import open_store

    from .conftest import SMALL
    from .test_s3 import read_file, write_file

    writer = s3_fs()
    write_file(writer, "/first", b"x" * 1000)
    writer.close()
    viewer_root = str(tmp_path / "viewer")
    viewer_cfg = dataclasses.replace(SMALL, s3=s3_settings, state_dir=str(tmp_path / "vstate"))
    attach(s3_fs.url, viewer_root, lambda: secret, viewer_cfg, follower=True)
    viewer_cfg = dataclasses.replace(viewer_cfg, read_only=True, follow=3600)
    writer = s3_fs()
    viewer = FileSystem(open_store(viewer_root, secret), viewer_cfg)
    try:
        for i in range(3):
            write_file(writer, f"/f{i}", b"y" * 1000)
        writer.opened.remote.drain()
        writer.opened.checkpoint()
        writer.opened.publisher.publish()
        assert viewer.opened.follower.follow() > 0
        assert read_file(viewer, "/f2") == b"y" * 1000
    finally:
        viewer.close()
        writer.close()
    viewer = FileSystem(open_store(viewer_root, secret), viewer_cfg)  # remounted
    viewer.close()
    assert not [r for r in caplog.records if "audit trail" in r.getMessage()]
    found = list(walk(viewer_root, *_trail_key(viewer_root, secret)))
    assert not [v for k, v in found if k == "problem"]
    assert any(k == "record" and v["e"] == "open" for k, v in found)  # its own reads
    # 'dcmfs audit verify' compared the follower's trail with the writer's
    # head its index holds ("records 2..8 were removed"); its 'follower'
    # records say not to
    report = audit.verify(viewer_root, lambda: secret)
    assert report["intact"], report["problems"]
    assert report["index_head_seq"] > report["head_seq"]  # the writer's head is ahead
    # cut back to before its first follower record: compared with the head again
    from dcmfs.audit import segments as S
    (_, path), = S.list_segments(viewer_root)
    with open(path, "rb") as f:
        kept = f.read()
    os.truncate(path, S.HEADER_LEN)
    assert not audit.verify(viewer_root, lambda: secret)["intact"]
    with open(path, "wb") as f:
        f.write(kept)

    # a machine that attached (not a follower): its trail continues the
    # writer's chain, and is intact once it wrote its own head
    new_root = str(tmp_path / "new")
    cfg = dataclasses.replace(SMALL, s3=s3_settings, state_dir=str(tmp_path / "nstate"))
    attach(s3_fs.url, new_root, lambda: secret, cfg)
    fs = FileSystem(open_store(new_root, secret), cfg)
    assert read_file(fs, "/f0") == b"y" * 1000
    fs.close()
    assert not [r for r in caplog.records if "audit trail" in r.getMessage()]
    report = audit.verify(new_root, lambda: secret)
    assert report["intact"], report["problems"]
    events = [v["e"] for k, v in walk(new_root, *_trail_key(new_root, secret))
              if k == "record"]
    assert "admin" in events and "open" in events  # the attach's fsck, then the read


def _trail_key(root, secret):
    from dcmfs.index import index_key
    from dcmfs.storage.header import open_store
    store = open_store(root, secret)
    return index_key(os.path.join(root, "index"), store)[1], store.store_id


def test_a_follower_keeps_only_the_rows_of_the_version_an_open_file_reads(
        s3_fs, tmp_path, secret, s3_settings):
    """A viewer on a follower holds a small report open for long while the
    writer rewrites it again and again: every version's inline row deleted
    meanwhile was kept in memory (InlineRows.kept), though the open handle
    only ever reads the version it opened; memory grows with every rewrite
    until the viewer closes the file."""
    first = b"first report, " * 70
    writer, viewer = _writer_and_follower(s3_fs, tmp_path, secret, s3_settings, first,
                                          inline_max=4096)
    try:
        fh = viewer.open("/first", os.O_RDONLY)
        for i in range(5):
            _replace_and_follow(writer, viewer, (b"version %d " % i) * 100)
        assert viewer.read(fh, 4096, 0) == first
        assert len(viewer.index.inline.kept) <= 1, len(viewer.index.inline.kept)
        viewer.release(fh)
    finally:
        viewer.close()
        writer.close()
