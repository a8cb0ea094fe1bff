"""Key operations in the sealed audit trail (``dcmfs key add|remove|change|
rotate [--finish]``), on an unmounted store (appended under the store lock)
and on a mounted one (through the daemon): one ``key`` record each, by the
command's uid, pid and process name, with slot kinds and never a secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dcmfs import errors as E
from dcmfs.storage.header import StoreLock


def _private(path, data: bytes):
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def _key_cmd(m, *args) -> int:
    """Run ``dcmfs key ARGS`` and return its pid (the audit names it)."""
    p = subprocess.Popen([sys.executable, "-m", "dcmfs.cli", "key", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return p.pid


def _audit_text(m) -> str:
    r = m.cli("audit", m.store, "--key-file", m.key, "--json")
    assert r.returncode == 0, r.stderr
    return r.stdout


def _key_records(m) -> list[dict]:
    return [r for r in map(json.loads, _audit_text(m).splitlines()) if r["event"] == "key"]


def _verify(m) -> dict:
    r = m.cli("audit", "verify", m.store, "--key-file", m.key, "--json")
    return json.loads(r.stdout)


def _run_every_key_command(m, tmp_path) -> tuple[list[int], list[bytes]]:
    """add (passphrase), change (to a key file), remove, rotate, rotate
    --finish: (the pids, the secrets used)."""
    pw = _private(tmp_path / "pw", b"carol's passphrase\n")
    newkey = _private(tmp_path / "newkey", os.urandom(32))
    pids = [
        _key_cmd(m, "add", m.store, "--label", "carol", "--key-file", m.key,
                 "--new-passphrase-file", pw),
        _key_cmd(m, "change", m.store, "2", "--key-file", m.key, "--new-key-file", newkey),
        _key_cmd(m, "remove", m.store, "2", "--key-file", m.key),
        _key_cmd(m, "rotate", m.store, "--key-file", m.key),
        _key_cmd(m, "rotate", m.store, "--finish", "--key-file", m.key),
    ]
    return pids, [b"carol's passphrase", newkey.read_bytes(), m.key.read_bytes()]


def _check(m, pids, secrets, mounted: bool) -> None:
    recs = _key_records(m)
    comm = os.path.basename(sys.executable)[:15]
    got = [(r["action"], r["uid"], r["gid"], r["pid"], r["process"], r.get("slot"),
            r.get("kind"), r["by"] if "by" in r else None, r.get("mounted", False))
           for r in recs]
    assert got == [
        ("add", 0, 0, pids[0], comm, 2, "passphrase", 1, mounted),
        ("change", 0, 0, pids[1], comm, 2, "keyfile", 1, mounted),
        ("remove", 0, 0, pids[2], comm, 2, "keyfile", 1, mounted),
        ("rotate", 0, 0, pids[3], comm, None, None, 1, mounted),
        ("rotate-finish", 0, 0, pids[4], comm, None, None, None, mounted),
    ], recs
    assert [r.get("by_kind") for r in recs[:4]] == ["keyfile"] * 4
    assert recs[0]["label"] == "carol" and recs[1]["old_kind"] == "passphrase"
    assert recs[3]["epoch"] == 1 and recs[4]["epoch"] == 1
    # epoch 0 went with the finish: the trail (these records) was sealed
    # again under epoch 1 before it, and verifies below
    assert recs[4]["destroyed"] == [0] and isinstance(recs[4]["chunks"], int), (recs[4], m.log())
    # never a secret: no passphrase, no key file, no epoch key (64 hex digits)
    text = _audit_text(m)
    for s in secrets:
        assert s.decode("latin-1") not in text and s.hex() not in text
    assert not re.search(r"[0-9a-f]{64}", text), text
    report = _verify(m)
    assert report["intact"], report


def test_key_commands_on_an_unmounted_store_are_recorded(mount_env, tmp_path):
    m = mount_env
    pids, secrets = _run_every_key_command(m, tmp_path)
    _check(m, pids, secrets, mounted=False)


def test_key_commands_on_a_mounted_store_are_recorded_by_the_daemon(mount_env, tmp_path):
    m = mount_env
    m.mount("-o", "reencode=0")
    (m.mnt / "scan.dcm").write_bytes(os.urandom(200_000))
    pids, secrets = _run_every_key_command(m, tmp_path)
    m.umount()
    _check(m, pids, secrets, mounted=True)
    # the rotation's epoch key went through the daemon's control attribute
    # ("rekey EPOCH KEY"): no admin record of that command, only the key record
    admin = [r["command"] for r in map(json.loads, _audit_text(m).splitlines())
             if r["event"] == "admin"]
    assert admin == ["rekey-finish"], admin


def test_the_daemon_refuses_a_key_record_the_header_does_not_show(mount_env):
    m = mount_env
    m.mount()
    for claim in ({"action": "add", "slot": 7, "kind": "passphrase"},  # no slot 7
                  {"action": "remove", "slot": 1, "kind": "keyfile"},  # slot 1 is there
                  {"action": "add", "slot": 1, "kind": "keyfile", "key": "00" * 32},
                  {"action": "rotate", "epoch": 3}):
        with pytest.raises(OSError):
            os.setxattr(m.mnt, "user.dcmfs.control", b"key " + json.dumps(claim).encode())
    m.umount()
    assert _key_records(m) == []
    assert _verify(m)["intact"]


def test_a_key_change_waits_for_a_store_open_elsewhere(mount_env, tmp_path):
    """A store open in a process that is not a mount (fsck, verify) has no
    daemon to record the change: it is refused, the header unchanged."""
    m = mount_env
    pw = _private(tmp_path / "pw", b"pw\n")
    lock = StoreLock(str(m.store))
    try:
        r = m.cli("key", "add", m.store, "--label", "x", "--key-file", m.key,
                  "--new-passphrase-file", pw)
    finally:
        lock.release()
    assert r.returncode == E.StoreLockedError.exit_code, r.stderr
    assert "not a mount" in r.stderr
    slots = json.loads(m.cli("key", "list", m.store, "--json").stdout)["slots"]
    assert [s["id"] for s in slots] == [1]
    assert _key_records(m) == []


def test_a_failed_unlock_of_a_key_command_is_recorded(mount_env, tmp_path):
    m = mount_env
    wrong = _private(tmp_path / "wrong", os.urandom(32))
    pw = _private(tmp_path / "pw", b"pw\n")
    r = m.cli("key", "add", m.store, "--label", "x", "--key-file", wrong,
              "--new-passphrase-file", pw)
    assert r.returncode == E.WrongKeyError.exit_code, r.stderr
    noted = [json.loads(x) for x in _audit_text(m).splitlines()]
    assert [(n["event"], n["command"], n["sealed"]) for n in noted] == [
        ("unlock-failed", "key", False)]
    pid = _key_cmd(m, "add", m.store, "--label", "x", "--key-file", m.key,
                   "--new-passphrase-file", pw)  # appends: the note is sealed first
    recs = [json.loads(x) for x in _audit_text(m).splitlines()]
    assert [(r["event"], r.get("command"), "sealed" in r) for r in recs] == [
        ("unlock-failed", "key", False), ("key", None, False)]
    assert recs[1]["pid"] == pid and recs[1]["kind"] == "passphrase"
    assert _verify(m)["intact"]
