"""The CLI contract: exit codes, one-sentence errors, secrets, status."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dcmfs import errors as E


def test_exit_codes_and_messages(mount_env, tmp_path):
    m = mount_env
    bad_key = tmp_path / "bad"
    bad_key.write_bytes(os.urandom(32))
    bad_key.chmod(0o600)
    r = m.cli("mount", m.store, m.mnt, "--key-file", bad_key)
    assert r.returncode == E.WrongKeyError.exit_code, r.stderr
    assert "wrong key" in r.stderr and r.stderr.count("\n") == 1
    r = m.cli("mount", tmp_path / "nowhere", m.mnt, "--key-file", m.key)
    assert r.returncode == E.StoreMissingError.exit_code
    (tmp_path / "foreign").mkdir()
    r = m.cli("mount", tmp_path / "foreign", m.mnt, "--key-file", m.key)
    assert r.returncode == E.ForeignStoreError.exit_code
    r = m.cli("mount", m.store, tmp_path / "no-mnt", "--key-file", m.key)
    assert r.returncode == E.MountpointMissingError.exit_code and "mkdir" in r.stderr
    (m.mnt / "hidden").write_text("x")
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key)
    assert r.returncode == E.MountpointBusyError.exit_code and "not empty" in r.stderr
    (m.mnt / "hidden").unlink()
    r = m.cli("umount", m.mnt)
    assert r.returncode == E.NotMountedError.exit_code
    r = m.cli("init", m.store, "--key-file", m.key)
    assert r.returncode == E.StoreNotEmptyError.exit_code
    m.mount()
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key)
    assert r.returncode == E.StoreLockedError.exit_code
    other = tmp_path / "other"
    other.mkdir()
    r = m.cli("mount", m.store, other, "--key-file", m.key)
    assert r.returncode == E.StoreLockedError.exit_code and "in use" in r.stderr
    assert not m.log().count("Traceback")


def test_init_creates_key_file_0600_and_passphrase_fd(tmp_path):
    from .conftest import Mount
    m = Mount(tmp_path)
    m.init()
    assert stat.S_IMODE(os.stat(m.key).st_mode) == 0o600 and len(m.key.read_bytes()) == 32
    rfd, wfd = os.pipe()
    os.write(wfd, b"a long passphrase\n")
    os.close(wfd)
    r = m.cli("init", tmp_path / "p", "--passphrase-fd", rfd, pass_fds=(rfd,))
    os.close(rfd)
    assert r.returncode == 0, r.stderr
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    r = m.cli("status", tmp_path / "p", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["mounted"] is False
    r = m.cli("init", tmp_path / "q")  # no key and no terminal
    assert r.returncode == E.SecretError.exit_code


def test_status_and_mount_helper_options(mounted):
    import time
    (mounted.mnt / "f").write_bytes(b"a" * 100_000)
    deadline = time.monotonic() + 20
    while True:  # live figures; the re-encoder compresses the file soon after close
        r = mounted.cli("status", "--json")
        reports = json.loads(r.stdout)
        mine = [x for x in reports if x["mountpoint"] == str(mounted.mnt)]
        assert mine and mine[0]["files"] == 1 and mine[0]["logical_bytes"] == 100_000
        if mine[0]["backlog_files"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine[0]["backlog_files"] == 0 and mine[0]["backlog_bytes"] == 0
    assert mine[0]["stored_bytes"] < 1000
    text = mounted.cli("status", mounted.mnt).stdout
    assert "ratio" in text and "pid" in text
    from dcmfs.app.options import parse_o
    ours, fuse = parse_o(["_netdev,nofail,key_file=/k,allow_other,x-systemd.requires=/srv,ro"])
    assert ours == {"key_file": "/k"} and fuse == {"allow_other": True, "ro": True}


def test_image_codecs_option():
    from dcmfs.app.options import make_config as _config, parse_o
    from dcmfs.errors import UsageError
    ours, fuse = parse_o(["image_codecs=jpeg2k+htj2k,allow_other"])
    assert _config(ours, fuse).image_codecs == ("jpeg2k", "htj2k")
    for bad in ("zstd", "htj2k+htj2k", "jpegls+webp"):
        with pytest.raises(UsageError, match="image_codecs"):
            _config(*parse_o([f"image_codecs={bad}"]))


def test_read_only_mount(mount_env):
    import errno
    import pytest
    m = mount_env
    m.mount()
    (m.mnt / "f").write_bytes(b"before")
    m.umount()
    m.mount("-o", "ro")
    assert (m.mnt / "f").read_bytes() == b"before"
    for action in (lambda: (m.mnt / "g").write_bytes(b"x"), lambda: (m.mnt / "f").unlink(),
                   lambda: open(m.mnt / "f", "ab")):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS
