"""Keys and secrets (issue 15, the small ones): the store header's Argon2id
parameters are bounded before they are used; key files, passphrases and
their sources follow one set of rules (docs/cli.md, "Secrets")."""

from __future__ import annotations

import json
import os
import time

import pytest

from dcmfs import errors as E
from dcmfs.storage.header import Secret, init_store, open_store

from .conftest import SMALL, Mount


# --- Argon2id parameters --------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"memory_kib": 16 * 1024 * 1024, "iterations": 1, "lanes": 1},   # 16 GiB: would hang
    {"memory_kib": 1024, "iterations": 1_000_000, "lanes": 1},
    {"memory_kib": 1024, "iterations": 1, "lanes": 1000},
    {"memory_kib": 1024, "iterations": 0, "lanes": 1},
    {"memory_kib": "1024", "iterations": 1, "lanes": 1},
    {"memory_kib": 1024, "iterations": True, "lanes": 1},
    {"memory_kib": 1024, "iterations": 1},
])
def test_inflated_argon2id_parameters_are_refused_before_use(tmp_path, params):
    pw = Secret("passphrase", b"correct horse")
    init_store(str(tmp_path / "s"), pw, SMALL)
    path = tmp_path / "s" / "dcmfs.store"
    header = json.loads(path.read_text())
    header["slots"][0]["argon2id"] = params
    path.write_text(json.dumps(header))
    t0 = time.monotonic()
    with pytest.raises(E.KdfBoundsError, match="restore the header"):
        open_store(str(tmp_path / "s"), pw)
    assert time.monotonic() - t0 < 1  # refused, not derived


def test_inflated_argon2id_parameters_exit_26_from_verify(tmp_path):
    m = Mount(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    pw.chmod(0o600)
    m.cli("init", m.store, "--passphrase-file", pw, check=True)
    path = m.store / "dcmfs.store"
    header = json.loads(path.read_text())
    header["slots"][0]["argon2id"]["memory_kib"] = 16 * 1024 * 1024
    path.write_text(json.dumps(header))
    r = m.cli("verify", m.store, "--passphrase-file", pw, timeout=30)
    assert r.returncode == E.KdfBoundsError.exit_code == 26, r.stderr
    assert r.stderr.startswith("dcmfs: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Argon2id" in r.stderr and "Traceback" not in r.stderr


def test_init_writes_only_parameters_within_bounds(tmp_path):
    from dcmfs.config import Config, KdfParams, kdf_within_bounds
    import dataclasses
    assert kdf_within_bounds(dataclasses.asdict(KdfParams()))
    with pytest.raises(ValueError):
        init_store(str(tmp_path / "s"), Secret("passphrase", b"pw"),
                   Config(kdf=KdfParams(memory_kib=8 * 1024 * 1024)))


# --- secrets: one set of rules for every source ---------------------------------------------
def _args(**kw):
    import argparse
    base = dict(key_file=None, passphrase_file=None, passphrase_fd=None,
                allow_open_key_file=False)
    return argparse.Namespace(**{**base, **kw})


def _instance(tmp_path, source, value):
    from dcmfs.app import instance
    return instance.Instance(str(tmp_path / "i.toml"), "i", "/s", "/m", key_source=source,
                             key_value=value)


def test_key_files_open_to_group_or_others_are_refused(mount_env):
    m = mount_env
    m.mount()  # the first mount makes the index verify reads
    m.umount()
    assert m.cli("verify", m.store, "--key-file", m.key).returncode == 0
    for mode in (0o640, 0o604, 0o620):
        m.key.chmod(mode)
        r = m.cli("verify", m.store, "--key-file", m.key)
        assert r.returncode == E.SecretError.exit_code, (mode, r.stderr)
        assert "chmod 600" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = m.cli("verify", m.store, "--key-file", m.key, "--allow-open-key-file")
    assert r.returncode == 0 and "group or others" in r.stderr, r.stderr
    m.key.chmod(0o400)
    assert m.cli("verify", m.store, "--key-file", m.key).returncode == 0


def test_open_passphrase_files_and_credentials_are_refused(tmp_path, monkeypatch):
    from dcmfs.app import cli, instance
    pw = tmp_path / "pw"
    pw.write_bytes(b"a long passphrase\n")
    pw.chmod(0o644)
    with pytest.raises(E.SecretError, match="chmod 600"):
        cli._secret(_args(passphrase_file=str(pw)), creating=False)
    assert cli._secret(_args(passphrase_file=str(pw), allow_open_key_file=True),
                       creating=False).value == b"a long passphrase"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(E.SecretError, match="chmod 600"):
        instance.read_key(_instance(tmp_path, "passphrase_credential", "pw"))
    with pytest.raises(E.SecretError, match="chmod 600"):
        instance.read_key(_instance(tmp_path, "file", str(pw)))


def test_empty_passphrases_are_refused_from_every_source(tmp_path, monkeypatch):
    from dcmfs.app import cli, instance
    empty = tmp_path / "empty"
    for content in (b"", b"\n", b"\n\n"):
        empty.write_bytes(content)
        empty.chmod(0o600)
        with pytest.raises(E.SecretError, match="empty passphrase"):
            cli._secret(_args(passphrase_file=str(empty)), creating=False)
        rfd, wfd = os.pipe()
        os.write(wfd, content)
        os.close(wfd)
        try:
            with pytest.raises(E.SecretError, match="empty passphrase"):
                cli._secret(_args(passphrase_fd=rfd), creating=False)
        finally:
            os.close(rfd)
        with pytest.raises(E.SecretError, match="empty passphrase"):
            instance.read_key(_instance(tmp_path, "passphrase_file", str(empty)))
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        with pytest.raises(E.SecretError, match="empty passphrase"):
            instance.read_key(_instance(tmp_path, "passphrase_credential", "empty"))
    # systemd-ask-password answering an empty line
    import subprocess

    class Done:
        stdout = b"\n"
    with monkeypatch.context() as mp:
        mp.setattr(subprocess, "run", lambda *a, **k: Done())
        with pytest.raises(E.SecretError, match="empty passphrase"):
            instance.read_key(_instance(tmp_path, "ask_password", ""))
    # and through the command line: one sentence, exit 16
    m = Mount(tmp_path)
    empty.write_bytes(b"\n")
    r = m.cli("init", m.store, "--passphrase-file", empty)
    assert r.returncode == E.SecretError.exit_code and "empty passphrase" in r.stderr, r.stderr
    assert not m.store.exists()


def test_one_newline_rule_for_every_passphrase_source(tmp_path, monkeypatch):
    """Trailing line feeds go, nothing else: a file, a descriptor, a
    credential and an instance file give the same passphrase."""
    from dcmfs.app import cli, instance
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    def every_source(content: bytes) -> set[bytes]:
        f = tmp_path / "p"
        f.write_bytes(content)
        f.chmod(0o600)
        got = {cli._secret(_args(passphrase_file=str(f)), creating=False).value,
               instance.read_key(_instance(tmp_path, "passphrase_file", str(f)))[1],
               instance.read_key(_instance(tmp_path, "passphrase_credential", "p"))[1]}
        rfd, wfd = os.pipe()
        os.write(wfd, content)
        os.close(wfd)
        try:
            got.add(cli._secret(_args(passphrase_fd=rfd), creating=False).value)
        finally:
            os.close(rfd)
        return got

    for content in (b"pass word", b"pass word\n", b"pass word\n\n"):
        assert every_source(content) == {b"pass word"}
    assert every_source(b"pass word\r\n") == {b"pass word\r"}
    assert every_source(b" pass word \n") == {b" pass word "}
    # and docs/cli.md states that rule, not another one
    import pathlib
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert "with every trailing\n  line feed (`\\n`) removed" in doc
    assert "one trailing newline dropped" not in doc


def test_one_maximum_length_for_every_key_source(tmp_path, monkeypatch):
    """--key-file and an instance file read the same bytes of a key file,
    and both refuse one longer than 4096 bytes rather than cut it."""
    from dcmfs.app import cli, instance
    from dcmfs.app.keys import MAX_SECRET
    assert MAX_SECRET == 4096
    key = tmp_path / "key"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for size in (32, 4096):
        key.write_bytes(os.urandom(size))
        key.chmod(0o600)
        a = cli._secret(_args(key_file=str(key)), creating=False).value
        b = instance.read_key(_instance(tmp_path, "file", str(key)))[1]
        c = instance.read_key(_instance(tmp_path, "credential", "key"))[1]
        assert a == b == c == key.read_bytes()
    key.write_bytes(os.urandom(5000))
    for read in (lambda: cli._secret(_args(key_file=str(key)), creating=False),
                 lambda: instance.read_key(_instance(tmp_path, "file", str(key))),
                 lambda: instance.read_key(_instance(tmp_path, "credential", "key")),
                 lambda: cli._secret(_args(passphrase_file=str(key)), creating=False)):
        with pytest.raises(E.SecretError, match="longer than 4096 bytes"):
            read()
    rfd, wfd = os.pipe()
    os.write(wfd, b"x" * 5000)
    os.close(wfd)
    try:
        with pytest.raises(E.SecretError, match="longer than 4096 bytes"):
            cli._secret(_args(passphrase_fd=rfd), creating=False)
    finally:
        os.close(rfd)
