"""A full backing disk: ENOSPC to the writer, the store stays consistent and
mountable, and writing resumes once space is free again."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from .conftest import Mount, file_sha256, sha256


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {r.stderr}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path, chunk=1 << 20):
    """Write until the disk is full; returns the bytes written."""
    n = 0
    with open(path, "wb") as f:
        try:
            while True:
                f.write(os.urandom(chunk))
                f.flush()
                n += chunk
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return n


def test_disk_full_gives_enospc_and_recovers(small_disk, tmp_path):
    m = Mount(tmp_path)
    m.store = small_disk / "store"
    m.init()
    try:
        m.mount()
        kept = {}
        for i in range(5):
            data = os.urandom(2 << 20)
            (m.mnt / f"ok{i}").write_bytes(data)
            kept[f"ok{i}"] = sha256(data)
        filler = small_disk / "filler"
        fill(filler)
        big = os.urandom(6 << 20)
        with pytest.raises(OSError) as e:
            with open(m.mnt / "big", "wb") as f:
                f.write(big)
        assert e.value.errno == errno.ENOSPC
        r = m.cli("verify", m.store)  # the store stays consistent while full
        assert r.returncode == 0, r.stdout + r.stderr
        for name, digest in kept.items():  # everything closed before reads back
            assert file_sha256(m.mnt / name) == digest
        os.unlink(filler)  # space comes back
        (m.mnt / "big").write_bytes(big)
        assert file_sha256(m.mnt / "big") == sha256(big)
        m.umount()
        m.mount()
        for name, digest in {**kept, "big": sha256(big)}.items():
            assert file_sha256(m.mnt / name) == digest
        m.umount()
        r = m.cli("fsck", m.store, "--key-file", m.key)
        assert r.returncode == 0 and "clean." in r.stdout, r.stdout + r.stderr
        assert "Traceback" not in m.log()
    finally:
        m.cleanup()


def test_missing_libfuse_is_a_clear_error(mount_env):
    env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse_does_not_exist"}
    r = mount_env.cli("mount", mount_env.store, mount_env.mnt, "--key-file", mount_env.key,
                      env=env)
    from dcmfs.errors import FuseUnavailableError
    assert r.returncode == FuseUnavailableError.exit_code
    assert "apt-get install fuse3" in r.stderr
