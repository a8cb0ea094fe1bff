"""Fixtures: stores driven through the core, and real FUSE mounts.

Every mount is unmounted at teardown, also when the test failed, and the
daemon's log must hold no traceback unless the test says it expects errors.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dcmfs.config import Config, KdfParams
from dcmfs.format import CHUNK_FLAG_INLINE
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import Secret, init_store, open_store

#: cheap Argon2id for tests, passed through Config (never a global switch)
CHEAP_KDF = KdfParams(memory_kib=1024, iterations=1, lanes=1)
#: small chunks so that core tests cross chunk boundaries with little data
#: and compression inline, so that chunk objects do not change behind a test's
#: back (tests/test_reencoder.py turns the re-encoder on)
SMALL = Config(chunk_size=64 * 1024, kdf=CHEAP_KDF, dirty_limit=256 * 1024,
               read_cache_bytes=1 << 20, reencode=False)


# --- deselection under pytest-xdist (./scripts/test --quick) ----------------------
# The controller collects nothing, so its summary would say "143 passed" with
# no word of what -m "not slow" left out; each worker passes on the node ids it
# deselected and the controller counts them (the line ends "N deselected").
def pytest_deselected(items):
    if items and hasattr(items[0].config, "workeroutput"):
        items[0].config.workeroutput.setdefault("deselected", []).extend(
            item.nodeid for item in items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    reporter = node.config.pluginmanager.get_plugin("terminalreporter")
    ids = getattr(node, "workeroutput", {}).get("deselected", [])
    if reporter is not None and ids:
        seen = reporter.stats.setdefault("deselected", [])
        seen.extend(sorted(set(ids) - set(seen)))


@pytest.fixture(autouse=True)
def _witness_dir(tmp_path_factory, monkeypatch):
    """Each test its own state directory for store witnesses (inherited by
    the daemons it starts): tests copy one frozen store many times, which a
    shared witness would rightly call a rollback."""
    monkeypatch.setenv("DCMFS_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def crash(fs: FileSystem) -> None:
    """Drop a FileSystem the way a killed daemon would: nothing flushed,
    nothing marked clean (only OS resources are released)."""
    fs.closed = True
    fs._stop.set()
    if fs.reencoder is not None:
        fs.reencoder.stop()
    fs.data.shutdown()
    fs.objects.close()
    fs.index.close()
    fs.store_lock.release()


def assert_no_dangling(fs: FileSystem) -> None:
    """Every object in the store is referenced and every reference exists
    (object files, and inline objects in the index: feature inline-small-v1)."""
    with fs.lock, fs.index.begin() as txn:
        refs = [(ino, r) for ino, _, r in txn.iter_all_chunks()]
        inline = set(txn.iter_inline())
    assert set(fs.objects.iter_oids()) == {r.oid for _, r in refs
                                           if not r.flags & CHUNK_FLAG_INLINE}
    assert inline == {(ino, r.oid) for ino, r in refs if r.flags & CHUNK_FLAG_INLINE}


def flip_byte(path, offset: int) -> None:
    """Damage by XOR 0xFF (a fixed overwrite is a no-op one time in 256)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def secret() -> Secret:
    return Secret("keyfile", os.urandom(32))


@pytest.fixture
def make_fs(tmp_path, secret):
    """make_fs(config=SMALL) -> FileSystem on one store per test."""
    opened: list[FileSystem] = []
    root = tmp_path / "store"

    def make(config: Config = SMALL) -> FileSystem:
        if not (root / "dcmfs.store").exists():
            init_store(str(root), secret, config)
        fs = FileSystem(open_store(str(root), secret), config)
        opened.append(fs)
        return fs

    make.root = root
    yield make
    for fs in opened:
        fs.close()


def dicom_files() -> list[pathlib.Path]:
    """Real DICOM: the pydicom-data corpus and pydicom's own test files."""
    import data_store
    import pydicom.data
    files = []
    # pydicom's get_testdata_files() would try to download more: read the folders
    for base in (pathlib.Path(data_store.__file__).parent / "data",
                 pathlib.Path(pydicom.data.__file__).parent / "test_files"):
        files += sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    return files


def ct_file() -> pathlib.Path:
    import data_store
    return pathlib.Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"


class Mount:
    """A store with a key file and a mountpoint, driven through the CLI."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.store = base / "store"
        self.key = base / "key"
        self.mnt = base / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.expect_log_errors = False

    def cli(self, *args, check=False, timeout=120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dcmfs.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, check=check,
                              **kw)

    def init(self, *extra) -> None:
        self.cli("init", self.store, "--key-file", self.key, *extra, check=True)

    def mount(self, *extra, check=True) -> subprocess.CompletedProcess:
        r = self.cli("mount", self.store, self.mnt, "--key-file", self.key, *extra)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def is_mounted(self) -> bool:
        from dcmfs.app.mount import find_mount
        return find_mount(str(self.mnt)) is not None

    def daemon_pid(self) -> int | None:
        from dcmfs.storage.header import read_lock_pid
        return read_lock_pid(str(self.store))

    def umount(self) -> None:
        r = self.cli("umount", self.mnt, timeout=300)
        assert r.returncode == 0, r.stderr

    def log(self) -> str:
        try:
            return (self.store / "dcmfs.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        if self.is_mounted():
            pid = self.daemon_pid()
            self.cli("umount", self.mnt, "--timeout", "60", timeout=90)
            if self.is_mounted():
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
            if pid and self.daemon_pid():
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.daemon_pid() and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def mount_env(tmp_path):
    """An initialised store and an empty mountpoint, not mounted yet."""
    m = Mount(tmp_path)
    m.init()
    try:
        yield m
    finally:
        m.cleanup()
        if not m.expect_log_errors:
            assert "Traceback" not in m.log() and " ERROR" not in m.log(), m.log()


@pytest.fixture
def mounted(mount_env):
    mount_env.mount()
    return mount_env


# --- a real S3 server: a one-node Ceph cluster (tests/ceph.py) ----------------------
@pytest.fixture(scope="session")
def ceph_s3():
    """A throwaway Ceph cluster with radosgw on loopback for the whole session
    (installed with apt when missing; skipped, with the reason, only where it
    cannot be installed or started)."""
    from .ceph import CephS3, ensure_installed
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    try:
        import obstore  # noqa: F401
    except ImportError:
        pytest.skip("obstore (the s3 extra) is not installed")
    cluster = CephS3()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def s3_url(ceph_s3, request):
    """s3://BUCKET/PREFIX, a prefix of its own for each test."""
    return f"s3://{ceph_s3.bucket}/{request.node.name[:40]}-{os.urandom(4).hex()}"


@pytest.fixture
def s3_settings(ceph_s3):
    from dcmfs.storage.s3 import S3Settings
    return S3Settings(ceph_s3.endpoint, "us-east-1", ceph_s3.access_key, ceph_s3.secret_key)
