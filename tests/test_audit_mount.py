"""The audit trail through real mounts: who copied and who read which file
(uids, pids, process names), failed unlocks, a SIGKILLed daemon, admin
commands, ``dcmfs audit`` mounted and not, ``dcmfs status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

NOBODY = 65534


def _audit(m, *args) -> list[dict]:
    r = m.cli("audit", m.store, "--key-file", m.key, "--json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _verify(m) -> dict:
    r = m.cli("audit", "verify", m.store, "--key-file", m.key, "--json")
    report = json.loads(r.stdout)
    assert (r.returncode == 0) == report["intact"]
    return report


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"img{i:02d}.dcm").write_bytes(os.urandom(1000 + 977 * i))
        os.chmod(src / f"img{i:02d}.dcm", 0o644)
    return sorted(src.iterdir())


def test_copy_by_one_uid_and_reads_by_another(mount_env, sources):
    m = mount_env
    m.mount("-o", "allow_other")
    cp = subprocess.Popen(["cp", *map(str, sources), str(m.mnt)])
    assert cp.wait(60) == 0
    names = [p.name for p in sources]
    # relative names from inside the mount: nobody may not enter pytest's
    # private tmp_path (the child changes directory before it gives up root)
    cat = subprocess.Popen(["cat", *names[:5]], cwd=m.mnt, stdout=subprocess.DEVNULL,
                           user=NOBODY, group=NOBODY, extra_groups=[])
    assert cat.wait(60) == 0
    mounted = _audit(m)  # readable while mounted
    assert [r["event"] for r in mounted].count("create") == 20
    status = json.loads(m.cli("status", m.store, "--json", check=True).stdout)
    assert status["audit"]["seq"] == mounted[-1]["seq"] and status["audit"]["bytes"] > 0
    m.umount()
    recs = [r for r in _audit(m) if r["event"] not in ("mount", "unmount")]
    expected = []
    for n, src in zip(names, sources):
        expected += [("create", 0, 0, cp.pid, "cp", f"/{n}", None),
                     ("write-close", 0, 0, cp.pid, "cp", f"/{n}", src.stat().st_size)]
    expected += [("open", NOBODY, NOBODY, cat.pid, "cat", f"/{n}", None) for n in names[:5]]
    got = [(r["event"], r["uid"], r["gid"], r["pid"], r["process"], r["path"], r.get("size"))
           for r in recs]
    assert got == expected
    assert all(r["access"] == "r" for r in recs if r["event"] == "open")
    # the same files by inode: the creates name the inodes the reads name
    inos = {r["path"]: r["ino"] for r in recs if r["event"] == "create"}
    assert all(r["ino"] == inos[r["path"]] for r in recs)
    # the filters
    assert [r["path"] for r in _audit(m, "--uid", str(NOBODY))] == [f"/{n}" for n in names[:5]]
    assert len(_audit(m, "--path", "/img0*", "--event", "write-close")) == 10
    assert _audit(m, "--until", "2000-01-01T00:00:00Z") == []
    whole = _audit(m)
    assert whole[0]["event"] == "mount" and whole[-1]["event"] == "unmount"
    assert whole[0]["time"].endswith("Z") and "T" in whole[0]["time"]
    report = _verify(m)
    assert report["intact"] and report["records"] == len(whole), report
    unmounted = json.loads(m.cli("status", m.store, "--json", check=True).stdout)
    assert unmounted["audit"]["seq"] == whole[-1]["seq"]
    assert unmounted["audit"]["head"] == report["head"]


def test_failed_unlock_and_admin_commands_are_recorded(mount_env, tmp_path):
    m = mount_env
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    os.chmod(wrong, 0o600)
    r = m.cli("mount", m.store, m.mnt, "--key-file", wrong)
    assert r.returncode == 10, r.stderr
    pending = _audit(m, "--event", "unlock-failed")
    assert [(p["uid"], p["command"], p["sealed"]) for p in pending] == [(0, "mount", False)]
    m.mount()
    m.cli("verify", m.store, "--key-file", m.key, check=True)  # through the daemon
    m.umount()
    m.cli("verify", m.store, "--key-file", m.key, check=True)  # unmounted
    m.cli("fsck", m.store, "--key-file", m.key, check=True)
    sealed = _audit(m, "--event", "unlock-failed")
    assert [(s["uid"], s["command"], "sealed" in s) for s in sealed] == [(0, "mount", False)]
    assert isinstance(sealed[0]["seq"], int)
    admin = [(a["command"], a.get("mounted", False)) for a in _audit(m, "--event", "admin")]
    assert admin == [("verify", True), ("verify", False), ("fsck", False)]
    assert _verify(m)["intact"]


def test_sigkill_loses_no_record_of_a_returned_operation(mount_env):
    m = mount_env
    m.mount()
    for i in range(30):
        with open(m.mnt / f"f{i}", "wb") as f:
            f.write(os.urandom(5000))
    with open(m.mnt / "f0", "rb") as f:
        f.read()
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=False)
    deadline = time.monotonic() + 30
    while m.daemon_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    m.mount()  # the unclean store is recovered; the trail goes on
    (m.mnt / "after").write_bytes(b"x")
    m.umount()
    recs = _audit(m)
    creates = [r["path"] for r in recs if r["event"] == "create"]
    assert creates == [f"/f{i}" for i in range(30)] + ["/after"]
    assert len([r for r in recs if r["event"] == "write-close"]) == 31
    assert [r["path"] for r in recs if r["event"] == "open"] == ["/f0"]
    assert [r["event"] for r in recs].count("mount") == 2
    assert _verify(m)["intact"]


def test_reads_through_a_read_only_mount_are_recorded(mount_env, sources):
    m = mount_env
    m.mount()
    for src in sources[:3]:
        (m.mnt / src.name).write_bytes(src.read_bytes())
    m.umount()
    m.mount("-o", "ro,allow_other")
    names = [p.name for p in sources[:3]]
    cat = subprocess.Popen(["cat", *names], cwd=m.mnt, stdout=subprocess.DEVNULL,
                           user=NOBODY, group=NOBODY, extra_groups=[])
    assert cat.wait(60) == 0
    m.cli("verify", m.store, "--key-file", m.key, check=True)  # through the read-only daemon
    status = json.loads(m.cli("status", m.store, "--json", check=True).stdout)
    m.umount()
    recs = _audit(m)
    last_mount = max(i for i, r in enumerate(recs) if r["event"] == "mount")
    session = recs[last_mount:]
    assert session[0]["options"].get("ro") is True, session[0]
    assert [(r["event"], r.get("uid"), r.get("pid"), r.get("process"), r.get("path"),
             r.get("access")) for r in session[1:4]] == [
        ("open", NOBODY, cat.pid, "cat", f"/{n}", "r") for n in names]
    assert [(r["event"], r.get("command")) for r in session[4:]] == [
        ("admin", "verify"), ("unmount", None)]
    assert status["audit"]["seq"] >= session[3]["seq"]
    report = _verify(m)
    assert report["intact"] and report["head_seq"] == session[-1]["seq"], report
    m.mount()  # read-write: the read-only session's records go into the index's head
    m.umount()
    report = _verify(m)
    assert report["intact"] and report["index_head_seq"] == report["head_seq"], report
