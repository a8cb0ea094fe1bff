"""The environment items of issue 16: dcmfs loads libfuse3 whatever else is
installed, and ``dcmfs status`` is not stalled by a mount that does not answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _libfuse2_installed() -> bool:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return "libfuse.so.2" in out


def test_mount_loads_libfuse3_without_fuse_library_name(mount_env):
    """A pip-installed dcmfs has no scripts/_setup.sh exporting
    FUSE_LIBRARY_NAME=fuse3; with libfuse2 installed beside libfuse3
    (gocryptfs and Ceph pull it in) mfusepy alone would load libfuse2.  The
    test reproduces that only where libfuse2 is installed (it is here:
    ``ldconfig -p | grep libfuse``), and passes either way once dcmfs loads
    libfuse3 itself."""
    m = mount_env
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUSE_LIBRARY_NAME", "FUSE_LIBRARY_PATH")}
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key, env=env)
    assert r.returncode == 0, (r.stderr, "libfuse2 installed: %s" % _libfuse2_installed())
    (m.mnt / "f").write_bytes(b"through libfuse3")
    assert (m.mnt / "f").read_bytes() == b"through libfuse3"
    r = m.cli("status", m.mnt, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["files"] == 1, r.stderr
    # the library name is dcmfs's choice inside its own process only
    probe = ("import os, dcmfs.adapter.fuse_ops as f; "
             "print(f.mfusepy.fuse_version_major, os.environ.get('FUSE_LIBRARY_NAME'))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["3", "None"], out


def test_status_without_argument_is_not_stalled_by_a_mount_that_does_not_answer(mounted):
    """A daemon that answers nothing (stopped here with SIGSTOP: its requests
    wait in the kernel) must not stall 'dcmfs status': the mount is shown as
    not answering, within a few seconds."""
    m = mounted
    (m.mnt / "f").write_bytes(b"x")
    pid = m.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        try:
            r = m.cli("status", "--json", timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("dcmfs status waited for the stopped daemon") from None
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    mine = [x for x in json.loads(r.stdout) if x["mountpoint"] == str(m.mnt)]
    assert len(mine) == 1 and mine[0]["answering"] is False, mine
    assert "did not answer" in mine[0]["error"]
    assert took < 20, took
    from dcmfs.app.status import render
    assert "did not answer" in render(mine)
    # answering again once the daemon runs
    r = m.cli("status", m.mnt, "--json", timeout=60)
    report = json.loads(r.stdout)
    assert report["answering"] is True and report["files"] == 1
