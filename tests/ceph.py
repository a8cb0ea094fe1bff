"""A throwaway one-node Ceph cluster serving S3 on loopback, for the tests.

One monitor, one bluestore OSD on a sparse file and radosgw, no ceph-mgr and
no systemd; every file, key, socket, log and pid lives in one short directory
and :meth:`CephS3.stop` kills exactly the daemons it started (checked
against their command line) and removes it.  Start to first PUT takes about
5 s and ~150 MiB RSS.  Needs root and Debian's ``ceph-mon ceph-osd radosgw
ceph-common`` (:func:`ensure_installed` installs them with apt when missing).

The settings that make it start fast and stay put: the monitor proposes map
changes every 50 ms (each pool radosgw creates waited ~2 s), radosgw starts
only once the OSD is up (else it sits out a 5 s timer), bluestore skips its
fsck at mkfs and polls aio every 20 ms, the cluster log stays in the
directory, the monitor ignores a nearly full disk, and every ``ceph`` call
has a connect timeout (with no mgr, some commands would hang).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import string
import subprocess
import tempfile
import time
import uuid

PACKAGES = ["ceph-mon", "ceph-osd", "radosgw", "ceph-common"]


def ensure_installed() -> str | None:
    """Install Ceph with apt when missing; the reason it cannot be, or None."""
    if all(shutil.which(b) for b in ("ceph-mon", "ceph-osd", "radosgw", "ceph")):
        return None
    if os.geteuid() != 0:
        return "Ceph is not installed and installing it needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y",
           "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"], env=env,
                       capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return f"apt-get could not install Ceph: {r.stderr.strip().splitlines()[-1:]}"
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephS3:
    """``start()`` a cluster in a fresh directory; ``endpoint``, ``access_key``,
    ``secret_key`` and ``bucket`` describe its S3 service."""

    def __init__(self) -> None:
        # unix socket paths are limited to ~107 characters: keep it short
        self.dir = tempfile.mkdtemp(prefix="dcmfs-ceph-", dir="/tmp")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.pids: dict[str, int] = {}
        self.bucket = "dcmfs-test"
        self.access_key = "".join(secrets.choice(string.ascii_uppercase + string.digits)
                                  for _ in range(20))
        self.secret_key = secrets.token_urlsafe(30)
        self.rgw_port = _port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"

    def _ceph(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ceph", "-c", self.conf, "--connect-timeout", "30", *args],
                              check=True, capture_output=True, text=True, timeout=120, **kw)

    def _run(self, name: str, *cmd: str) -> None:
        with open(os.path.join(self.dir, "log", f"{name}.out"), "wb") as out:
            p = subprocess.Popen([*cmd, "-c", self.conf, "-f"], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out, start_new_session=True)
        self.pids[name] = p.pid
        self._procs = getattr(self, "_procs", {})
        self._procs[name] = p

    def start(self) -> None:
        d = self.dir
        for sub in ("mon", "osd/0", "run", "log"):
            os.makedirs(os.path.join(d, sub))
        mon_port = _port()
        fsid = str(uuid.uuid4())
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
ms bind msgr1 = false
keyring = {d}/$name.keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
[mon]
mon data = {d}/mon/$id
mon cluster log file = default={d}/log/cluster.$channel.log cluster={d}/log/cluster.log
paxos propose interval = 0.05
mon data avail crit = 0
mon data avail warn = 1
[osd]
osd data = {d}/osd/$id
keyring = {d}/osd/$id/keyring
osd objectstore = bluestore
bluestore block size = 21474836480
osd memory target = 939524096
bdev aio poll ms = 20
bluestore fsck on mkfs = false
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
""")
        q = dict(check=True, capture_output=True, timeout=120)
        mon_kr, admin_kr = f"{d}/mon.keyring", f"{d}/client.admin.keyring"
        subprocess.run(["ceph-authtool", "--create-keyring", mon_kr, "--gen-key", "-n", "mon.",
                        "--cap", "mon", "allow *"], **q)
        subprocess.run(["ceph-authtool", "--create-keyring", admin_kr, "--gen-key", "-n",
                        "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                        "--cap", "mgr", "allow *", "--cap", "mds", "allow *"], **q)
        subprocess.run(["ceph-authtool", mon_kr, "--import-keyring", admin_kr], **q)
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                        f"[v2:127.0.0.1:{mon_port}]", f"{d}/monmap"], **q)
        subprocess.run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap",
                        f"{d}/monmap", "--keyring", mon_kr], **q)
        self._run("mon.a", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_key = subprocess.run(["ceph-authtool", "--gen-print-key"], text=True,
                                 **q).stdout.strip()
        with open(f"{d}/osd-secret.json", "w") as f:
            f.write('{"cephx_secret": "%s"}' % osd_key)
        osd_id = self._ceph("osd", "new", osd_uuid, "-i", f"{d}/osd-secret.json").stdout.strip()
        assert osd_id == "0", osd_id
        subprocess.run(["ceph-authtool", "--create-keyring", f"{d}/osd/0/keyring", "-n", "osd.0",
                        "--add-key", osd_key], **q)
        subprocess.run(["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid",
                        osd_uuid], **q)
        self._run("osd.0", "ceph-osd", "-i", "0")
        self._ceph("auth", "get-or-create", "client.rgw.a", "mon", "allow rw", "osd", "allow rwx",
                   "-o", f"{d}/client.rgw.a.keyring")
        for _ in range(240):
            if "1 up" in self._ceph("osd", "stat").stdout:
                break
            if self._procs["osd.0"].poll() is not None:
                raise RuntimeError(f"ceph-osd died, see {d}/log")
            time.sleep(0.5)
        self.start_rgw()
        subprocess.run(["radosgw-admin", "-c", self.conf, "user", "create", "--uid=ci",
                        "--display-name=ci", f"--access-key={self.access_key}",
                        f"--secret-key={self.secret_key}"], **q)
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        """A boto3 client of the cluster (tests only: fixtures, tampering)."""
        import boto3
        from botocore.config import Config as BotoConfig
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=BotoConfig(retries={"max_attempts": 2}))

    def start_rgw(self) -> None:
        self._run("rgw.a", "radosgw", "-n", "client.rgw.a")
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", self.rgw_port), timeout=1):
                    return
            except OSError:
                if self._procs["rgw.a"].poll() is not None:
                    raise RuntimeError(f"radosgw died, see {self.dir}/log")
                time.sleep(0.2)
        raise RuntimeError("radosgw does not answer after 120 s")

    def stop_rgw(self) -> None:
        self._stop("rgw.a")

    def _stop(self, name: str) -> None:
        p = getattr(self, "_procs", {}).pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def credentials_text(self, bucket_region: str = "us-east-1") -> str:
        """The credentials file ``dcmfs init --s3-credentials-file`` reads."""
        return (f"endpoint = {self.endpoint}\nregion = {bucket_region}\n"
                f"access_key_id = {self.access_key}\nsecret_access_key = {self.secret_key}\n")

    def stop(self) -> None:
        for name in ("rgw.a", "osd.0", "mon.a"):  # reverse start order
            self._stop(name)
        shutil.rmtree(self.dir, ignore_errors=True)
