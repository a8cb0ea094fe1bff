"""S3 stores end to end through the CLI and real FUSE mounts against a real
Ceph RGW: a CT series and the pydicom-data corpus read back byte-exact
after unmount, cache wipe and remount; ``dcmfs attach`` on an empty
directory recovers every file; credentials never come from argv."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import Mount, ct_file, dicom_files, file_sha256


@pytest.fixture
def s3_mount(tmp_path, ceph_s3, s3_url):
    m = Mount(tmp_path)
    m.creds = tmp_path / "s3.creds"
    m.creds.write_text(ceph_s3.credentials_text())
    m.creds.chmod(0o600)
    m.url = s3_url
    r = m.cli("init", m.store, "--key-file", m.key, "--backend", s3_url,
              "--s3-credentials-file", m.creds)
    assert r.returncode == 0, r.stderr
    try:
        yield m
    finally:
        m.cleanup()
        assert "Traceback" not in m.log() and " ERROR" not in m.log(), m.log()


def _copy_corpus(mnt) -> dict[str, str]:
    ct = ct_file().read_bytes()
    want = {}
    os.makedirs(mnt / "ct")
    for i in range(20):  # a CT series: the same slice with its bytes made distinct
        data = ct[:-8] + i.to_bytes(8, "big")
        (mnt / "ct" / f"{i:03d}.dcm").write_bytes(data)
        want[f"ct/{i:03d}.dcm"] = file_sha256(mnt / "ct" / f"{i:03d}.dcm")
    os.makedirs(mnt / "corpus")
    for n, src in enumerate(dicom_files()[:40]):
        dest = mnt / "corpus" / f"{n:03d}-{src.name}"
        shutil.copyfile(src, dest)
        want[f"corpus/{dest.name}"] = file_sha256(src)
    return want


def _check(mnt, want) -> None:
    for rel, digest in want.items():
        assert file_sha256(mnt / rel) == digest, rel


def test_ct_series_and_corpus_byte_exact_after_cache_wipe_and_attach(s3_mount, tmp_path):
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds)
    want = _copy_corpus(m.mnt)
    _check(m.mnt, want)
    r = m.cli("status", m.mnt)
    assert "s3 upload" in r.stdout, r.stdout
    m.umount()
    shutil.rmtree(m.store / "objects")
    os.mkdir(m.store / "objects", 0o700)
    m.mount("--s3-credentials-file", m.creds)
    _check(m.mnt, want)
    m.umount()
    # a new machine: the bucket, the key and the credentials only
    new = tmp_path / "attached"
    r = m.cli("attach", m.url, new, "--key-file", m.key, "--s3-credentials-file", m.creds,
              timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "second").mkdir()
    other = Mount(tmp_path / "second")
    other.store, other.key = new, m.key
    other.mount("--s3-credentials-file", m.creds)
    try:
        _check(other.mnt, want)
    finally:
        other.cleanup()


def test_credentials_from_the_environment_and_a_clear_error_without(s3_mount, ceph_s3):
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds)
    (m.mnt / "f").write_bytes(b"x" * 300_000)
    m.umount()
    env = dict(os.environ, AWS_ENDPOINT_URL=ceph_s3.endpoint, AWS_REGION="us-east-1",
               AWS_ACCESS_KEY_ID=ceph_s3.access_key, AWS_SECRET_ACCESS_KEY=ceph_s3.secret_key,
               AWS_ALLOW_HTTP="true")
    r = m.cli("verify", m.store, "--key-file", m.key, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    wrong = m.creds.parent / "wrong.creds"
    wrong.write_text(ceph_s3.credentials_text().replace(ceph_s3.secret_key, "x" * 40))
    wrong.chmod(0o600)
    r = m.cli("verify", m.store, "--key-file", m.key, "--s3-credentials-file", wrong)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and ceph_s3.secret_key not in r.stderr
    m.creds.chmod(0o644)
    r = m.cli("verify", m.store, "--key-file", m.key, "--s3-credentials-file", m.creds)
    assert r.returncode == 16 and "chmod 600" in r.stderr


def test_second_writer_refused_with_its_exit_code(s3_mount, tmp_path, monkeypatch):
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds)
    (m.mnt / "f").write_bytes(b"y" * 1000)
    (tmp_path / "other").mkdir()
    other = Mount(tmp_path / "other")
    other.key = m.key
    (other.store / "objects").mkdir(parents=True)
    shutil.copyfile(m.store / "dcmfs.store", other.store / "dcmfs.store")
    # another machine: its own state directory (witnesses)
    monkeypatch.setenv("DCMFS_STATE_DIR", str(tmp_path / "other-state"))
    r = other.mount("--s3-credentials-file", m.creds, check=False)
    assert r.returncode == 37, r.stderr
    assert "second writer is refused" in r.stderr and "Traceback" not in r.stderr
    assert not other.is_mounted()
    m.umount()
    other.mount("--s3-credentials-file", m.creds)  # released at unmount: the next writer
    try:
        assert (other.mnt / "f").exists() is False  # its own index: empty (attach restores)
    finally:
        other.cleanup()


def test_key_changes_while_mounted_reach_the_bucket(s3_mount, tmp_path, ceph_s3):
    """A slot added and a rotation while the writer is mounted: the writer
    replaces the bucket's copy of the header (before, only 'init' and an
    offline finish put it), so a machine attaching from the bucket with the
    new slot's key only opens the store, the new epoch's files too."""
    import time
    m = s3_mount
    m.mount("--s3-credentials-file", m.creds, "-o", "s3_publish_interval=1")
    (m.mnt / "before").write_bytes(b"under epoch 0" * 1000)
    newkey = tmp_path / "second.key"
    newkey.write_bytes(os.urandom(32))
    newkey.chmod(0o600)
    r = m.cli("key", "add", m.store, "--label", "second admin", "--new-key-file", newkey,
              "--key-file", m.key)
    assert r.returncode == 0, r.stderr
    r = m.cli("key", "rotate", m.store, "--key-file", m.key)
    assert r.returncode == 0, r.stderr
    (m.mnt / "after").write_bytes(b"under epoch 1" * 1000)
    local = (m.store / "dcmfs.store").read_bytes()
    from .bucket import Bucket
    bucket = Bucket(ceph_s3.client(), m.url)
    deadline = time.monotonic() + 30
    while bucket.get("dcmfs.store") != local and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bucket.get("dcmfs.store") == local  # while mounted, within a publish round
    m.umount()
    new = tmp_path / "attached"
    r = m.cli("attach", m.url, new, "--key-file", newkey, "--s3-credentials-file", m.creds,
              timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "second").mkdir()
    other = Mount(tmp_path / "second")
    other.store, other.key = new, newkey
    other.mount("--s3-credentials-file", m.creds)
    try:
        assert (other.mnt / "before").read_bytes() == b"under epoch 0" * 1000
        assert (other.mnt / "after").read_bytes() == b"under epoch 1" * 1000
    finally:
        other.cleanup()
