"""The systemd side without systemd: instance files, credentials, sd_notify
(READY=1 only once the mount answers, STATUS=, STOPPING=1), journald log
lines, the mount(8) helper with config= and umount(8), metrics, status,
install-systemd.  tests/test_systemd.py runs the same in a booted systemd."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dcmfs import errors as E
from dcmfs.app import instance
from dcmfs.adapter import metrics
from dcmfs.app.mount import find_mount

from .conftest import Mount


def _toml(path, store, mnt, key_line, extra=""):
    path.write_text(f'store = "{store}"\nmountpoint = "{mnt}"\n{extra}\n'
                    f'[options]\nzstd_level = 2\nreencode = false\n[key]\n{key_line}\n')
    return path


# --- instance files -------------------------------------------------------------------
def test_instance_file(tmp_path):
    p = _toml(tmp_path / "pacs.toml", "/srv/s", "/srv/m", 'credential = "dcmfs.key"',
              'metrics = "127.0.0.1:9641"')
    inst = instance.load(str(p))
    assert (inst.name, inst.store, inst.mountpoint, inst.metrics) == ("pacs", "/srv/s", "/srv/m",
                                                                       "127.0.0.1:9641")
    assert inst.options == ("zstd_level=2", "reencode=0")
    assert inst.key_source == "credential" and inst.key_kind == "keyfile"


@pytest.mark.parametrize("text, what", [
    ('store = "/s"\nmountpoint = "/m"\n', "[key]"),
    ('store = "s"\nmountpoint = "/m"\n[key]\nfile = "/k"\n', "absolute"),
    ('store = "/s"\nmountpoint = "/m"\nstroe = 1\n[key]\nfile = "/k"\n', "unknown keys"),
    ('store = "/s"\nmountpoint = "/m"\n[key]\nfile = "/k"\ncredential = "x"\n', "exactly one"),
    ('store = "/s"\nmountpoint = [\n', "not valid TOML"),
    ('store = "/s"\nmountpoint = "/m"\ncodec = "htj2k"\n[key]\nfile = "/k"\n', "general codec"),
])
def test_instance_file_errors(tmp_path, text, what):
    p = tmp_path / "x.toml"
    p.write_text(text)
    with pytest.raises(E.UsageError, match=what.replace("[", r"\[")):
        instance.load(str(p))


def test_credentials(tmp_path, monkeypatch):
    inst = instance.Instance(str(tmp_path / "a.toml"), "a", "/s", "/m")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(E.SecretError, match="CREDENTIALS_DIRECTORY"):
        instance.read_key(inst)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(E.SecretError, match="LoadCredential=dcmfs.key"):
        instance.read_key(inst)
    (tmp_path / "dcmfs.key").write_bytes(b"k" * 32)
    (tmp_path / "dcmfs.key").chmod(0o400)  # as systemd leaves a credential
    assert instance.read_key(inst) == ("keyfile", b"k" * 32)


# --- logs -----------------------------------------------------------------------------
_LOG_SNIPPET = ("import logging; from dcmfs.app import logsetup; logsetup.setup(False); "
                "logging.getLogger('dcmfs.x').info('hello'); "
                "logging.getLogger('dcmfs.x').error('bad\\nsecond line'); "
                "logging.getLogger('fuse').debug('raw /a/patient/name')")


def test_journal_lines_have_priorities_and_no_timestamp(tmp_path):
    err = tmp_path / "err"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        subprocess.run([sys.executable, "-c", _LOG_SNIPPET], stderr=f, check=True,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert err.read_text().splitlines() == ["<6>dcmfs.x: hello", "<3>dcmfs.x: bad",
                                            "<3>second line"]
    with open(err, "wb") as f:  # elsewhere: timestamps, no prefixes
        subprocess.run([sys.executable, "-c", _LOG_SNIPPET], stderr=f, check=True,
                       env={**os.environ, "JOURNAL_STREAM": "1:2"})
    lines = err.read_text().splitlines()
    assert lines[0][:2] == "20" and lines[0].endswith("dcmfs.x INFO: hello")
    assert "patient" not in err.read_text()


# --- a foreground daemon as systemd runs it ----------------------------------------------
class Notify:
    """A $NOTIFY_SOCKET that collects the daemon's datagrams."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)

    def wait_for(self, word: str, timeout: float = 30.0, proc=None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                assert proc is None or proc.poll() is None, proc.stderr.read()
                continue
            if word in msg:
                return msg
        raise AssertionError(f"no {word} from the daemon")


@pytest.fixture
def service(tmp_path):
    m = Mount(tmp_path)
    m.init()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dcmfs.key").write_bytes(m.key.read_bytes())
    (creds / "dcmfs.key").chmod(0o400)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = _toml(tmp_path / "t.toml", m.store, m.mnt, 'credential = "dcmfs.key"',
                 f'metrics = "127.0.0.1:{port}"')
    notify = Notify(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "CREDENTIALS_DIRECTORY": str(creds)}
    proc = subprocess.Popen([sys.executable, "-m", "dcmfs.cli", "-v", "mount", "--config",
                             str(conf), "-f"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        yield m, proc, notify, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        proc.stderr.close()
        notify.sock.close()
        m.cleanup()


def test_foreground_daemon_speaks_sd_notify(service):
    m, proc, notify, port = service
    ready = notify.wait_for("READY=1", proc=proc)
    # READY=1 comes only once the mount answers
    assert find_mount(str(m.mnt)) is not None
    assert os.listdir(m.mnt) == []
    assert "STATUS=mounted at" in ready and "files" in ready and "ratio" in ready
    (m.mnt / "DOE^JOHN").mkdir()
    (m.mnt / "DOE^JOHN" / "study").write_bytes(b"x" * 200_000)
    assert (m.mnt / "DOE^JOHN" / "study").read_bytes() == b"x" * 200_000
    os.rename(m.mnt / "DOE^JOHN" / "study", m.mnt / "DOE^JOHN" / "study")
    assert not (m.mnt / "missing-JOHN").exists()

    ops = json.loads(os.getxattr(m.mnt, metrics.OPS_XATTR))
    assert ops["written_bytes"] == 200_000 and ops["read_bytes"] == 200_000
    assert ops["ops"]["write"] >= 1 and ops["pid"] == proc.pid
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "dcmfs_written_bytes_total 200000.0" in page
    assert 'dcmfs_fuse_operation_duration_seconds_count{op="write"}' in page
    assert "dcmfs_logical_bytes 200000.0" in page and "dcmfs_stored_bytes" in page
    assert "study" not in page  # labels are operation and errno names only

    r = m.cli("status", m.mnt, "--json")
    report = json.loads(r.stdout)
    assert report["pid"] == proc.pid and report["written_bytes"] == 200_000
    assert report["uptime_seconds"] >= 0 and report["rss_bytes"] > 0 and report["files"] == 1
    assert report["errors"].get("getattr:ENOENT", 0) >= 1
    text = m.cli("status", m.mnt).stdout
    assert "through the mount since start" in text and f"pid {proc.pid}, up 00:00:" in text
    assert "errors: getattr ENOENT" in text

    proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert proc.wait(timeout=60) == 0
    assert find_mount(str(m.mnt)) is None
    err = proc.stderr.read()
    assert "closed cleanly" in err and "Traceback" not in err
    assert "DEBUG" in err  # -v is on, and still no plaintext name at any level
    assert "JOHN" not in err and "study" not in err


def test_wrong_credential_fails_with_one_clear_line(tmp_path):
    m = Mount(tmp_path)
    m.init()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dcmfs.key").write_bytes(os.urandom(32))
    (creds / "dcmfs.key").chmod(0o400)
    conf = _toml(tmp_path / "t.toml", m.store, m.mnt, 'credential = "dcmfs.key"')
    r = m.cli("mount", "--config", conf, "-f", env={**os.environ,
                                                     "CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == E.WrongKeyError.exit_code
    assert r.stderr.strip().startswith("dcmfs: The key does not open the store")
    assert not m.is_mounted()


# --- the mount(8) helper: fstab and .mount units ----------------------------------------------
def test_mount_helper_with_config_and_umount8(tmp_path):
    m = Mount(tmp_path)
    m.init()
    conf = _toml(tmp_path / "fs.toml", "/nowhere", "/nowhere", f'file = "{m.key}"')
    helper = [sys.executable, "-c",
              "import sys; from dcmfs.app.cli import mount_helper_main; sys.exit(mount_helper_main())"]
    try:
        # mount(8): SOURCE and MOUNTPOINT win over the file's; fstab-only options are ignored
        r = subprocess.run(helper + [str(m.store), str(m.mnt), "-o",
                                     f"config={conf},_netdev,nofail,x-systemd.requires=/x"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert m.is_mounted()  # the helper returns only once the mount answers
        (m.mnt / "a").write_text("via fstab")
        pid = m.daemon_pid()
        assert pid
        pidfd = os.pidfd_open(pid)
        try:
            # plain umount(8): the daemon sees its connection go and exits by
            # itself; its last log line comes after it lets go of the store's
            # lock, so the test waits for the process, not for the lock
            subprocess.run(["umount", str(m.mnt)], check=True, timeout=30)
            assert select.select([pidfd], [], [], 30)[0], "the daemon did not exit"
        finally:
            os.close(pidfd)
        assert m.daemon_pid() is None and not m.is_mounted()
        assert "closed cleanly" in m.log()
        m.mount()
        assert (m.mnt / "a").read_text() == "via fstab"
    finally:
        m.cleanup()


def test_stale_mount_of_the_same_store_is_detached(mount_env):
    m = mount_env
    m.mount()
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)  # a crash: the kernel mount stays, dead
    deadline = time.monotonic() + 10
    while m.daemon_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.is_mounted()
    r = m.mount()  # what Restart=on-failure does
    assert m.is_mounted() and os.listdir(m.mnt) == []
    assert "detaching the stale mount" in r.stderr
    assert "not cleanly unmounted" in m.log()


# --- install ---------------------------------------------------------------------------------
def test_install_systemd(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcmfs.cli", "install-systemd", "--root",
                        str(tmp_path), "--python", "/opt/py/bin/python3"],
                       capture_output=True, text=True, check=True)
    unit = (tmp_path / "etc/systemd/system/dcmfs@.service").read_text()
    assert "ExecStart=/opt/py/bin/python3 -m dcmfs.cli mount --config /etc/dcmfs/%i.toml" in unit
    assert "Type=notify" in unit and "LoadCredential=dcmfs.key:" in unit
    for bad in ("ProtectSystem", "PrivateTmp", "PrivateMounts", "NoNewPrivileges=yes"):
        assert f"\n{bad}" not in unit, bad
    for name in ("mount.fuse.dcmfs", "mount.dcmfs"):
        helper = tmp_path / "usr/sbin" / name
        assert os.access(helper, os.X_OK) and "/opt/py/bin/python3" in helper.read_text()
    assert (tmp_path / "etc/dcmfs/example.toml.sample").exists()
    assert "installed" in r.stdout
    # the shipped example is a valid instance file
    sample = instance.load(str(tmp_path / "etc/dcmfs/example.toml.sample"))
    assert sample.key_source == "credential"


def test_ask_password_runs_systemd_ask_password(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "systemd-ask-password"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "correct horse"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    inst = instance.Instance("/etc/dcmfs/pacs.toml", "pacs", "/s", "/m",
                             key_source="ask_password", key_value="")
    assert instance.read_key(inst) == ("passphrase", b"correct horse")
    assert "--id=dcmfs:pacs" in (fake.parent / "args").read_text()


def test_status_reporter_sends_status_and_explains_a_slow_close(tmp_path, monkeypatch, caplog):
    from dcmfs.app.mount import _StatusReporter

    class FakeFs:
        reencoder = None

        class index:
            pending_records = 7

        def live_status(self):
            return {"files": 3, "logical_bytes": 2_000_000_000, "stored_bytes": 800_000_000,
                    "backlog_files": 1}

    notify = Notify(tmp_path / "n")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    rep = _StatusReporter(FakeFs(), 0.02)
    rep.start()
    try:
        msg = notify.wait_for("STATUS=", timeout=5)
        assert msg == "STATUS=3 files, 2.00 GB logical, ratio 0.400, backlog 1 files"
        rep.closing_since = time.monotonic()
        deadline = time.monotonic() + 5
        while "still closing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "still closing after" in caplog.text and "7 journal records" in caplog.text
    finally:
        rep.stop.set()
        rep.join()
        notify.sock.close()
