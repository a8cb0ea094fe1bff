"""verify, scrub and fsck through the command line, on real mounts: the
daemon verifies while it serves, the first integrity error marks the store,
read-write mounts wait for fsck, read-only mounts still work."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time

import pytest

from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import Secret, damage_mark, open_store

from .conftest import SMALL, dicom_files, file_sha256, flip_byte
from .test_integrity import chunk_paths

SECRET_NAME = "Patient-Doe-John-CT-0042.dcm"


def objects_of(m, path: str) -> list[str]:
    secret = Secret("keyfile", m.key.read_bytes())
    fs = FileSystem(open_store(str(m.store), secret), dataclasses.replace(SMALL, read_only=True))
    try:
        return chunk_paths(fs, path)
    finally:
        fs.close()


def test_mounted_verify_names_the_damaged_file_and_rw_mounts_wait_for_fsck(mount_env):
    m = mount_env
    m.expect_log_errors = True
    m.mount("-o", "reencode=0")
    (m.mnt / "dir").mkdir()
    (m.mnt / "dir" / SECRET_NAME).write_bytes(os.urandom(3 << 20))
    (m.mnt / "ok.bin").write_bytes(b"intact " * 100000)
    r = m.cli("verify", m.store)
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr
    m.umount()

    flip_byte(objects_of(m, "/dir/" + SECRET_NAME)[1], 4000)
    m.mount("-o", "reencode=0")
    r = m.cli("verify", m.store, "--json")
    assert r.returncode == 34, r.stderr
    report = json.loads(r.stdout)
    assert {p for f in report["findings"] for p in f["paths"]} == {"/dir/" + SECRET_NAME}
    assert {f["kind"] for f in report["findings"]} == {"failed authentication"}
    r = m.cli("verify", m.store)
    assert f"DAMAGED /dir/{SECRET_NAME}" in r.stdout and "ok.bin" not in r.stdout
    with pytest.raises(OSError) as exc:
        (m.mnt / "dir" / SECRET_NAME).read_bytes()
    assert exc.value.errno == errno.EIO
    assert (m.mnt / "ok.bin").read_bytes() == b"intact " * 100000  # still served
    status = json.loads(m.cli("status", m.mnt, "--json", check=True).stdout)
    assert status["needs_fsck"] and status["integrity_errors"] == 1
    m.umount()
    log = m.log()
    assert log.count("marked as needing") == 1 and SECRET_NAME not in log

    r = m.mount(check=False)
    assert r.returncode == 19 and "dcmfs fsck" in r.stderr, r.stderr
    m.mount("-o", "ro")  # read-only still works, and verify there too
    assert (m.mnt / "ok.bin").read_bytes() == b"intact " * 100000
    r = m.cli("verify", m.store)
    assert r.returncode == 34 and f"DAMAGED /dir/{SECRET_NAME}" in r.stdout, r.stdout + r.stderr
    m.umount()

    r = m.cli("fsck", m.store, "--key-file", m.key)
    assert r.returncode == 34 and "--repair" in r.stdout, r.stdout
    r = m.cli("fsck", m.store, "--key-file", m.key, "--repair")
    assert r.returncode == 0 and "clean." in r.stdout, r.stdout + r.stderr
    assert damage_mark(str(m.store)) is None
    m.mount()
    lost = os.listdir(m.mnt / "lost+found")
    assert lost == [f"{lost[0].split('-')[0]}-{SECRET_NAME}"]
    assert os.path.getsize(m.mnt / "lost+found" / lost[0]) == 3 << 20
    assert m.cli("verify", m.store).returncode == 0


def test_offline_verify_sample_paths_and_exit_codes(mount_env):
    m = mount_env
    m.mount()
    for i in range(10):
        (m.mnt / f"f{i}").write_bytes(os.urandom(10000 + i))
    m.umount()
    r = m.cli("verify", m.store, "--key-file", m.key, "--json", "--sample", "30%")
    assert r.returncode == 0 and json.loads(r.stdout)["files"] == 3, r.stderr
    r = m.cli("verify", m.store, "/f3", "/nope", "--key-file", m.key, "--json")
    assert r.returncode == 34
    report = json.loads(r.stdout)
    assert report["files"] == 1 and report["missing_paths"] == ["/nope"]
    assert m.cli("verify", m.store, "--key-file", os.devnull).returncode == 16


def test_scrubber_finds_damage_while_mounted(mount_env):
    m = mount_env
    m.expect_log_errors = True
    m.mount("-o", "reencode=0")
    for i in range(5):
        (m.mnt / f"f{i}").write_bytes(os.urandom(200000))
    m.umount()
    flip_byte(objects_of(m, "/f3")[0], 500)
    m.mount("-o", "reencode=0,scrub_interval=1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(m.cli("status", m.mnt, "--json", check=True).stdout)
        if status["scrub"]["rounds"] >= 1:
            break
        time.sleep(0.2)
    assert status["scrub"]["findings"] == 1 and status["scrub"]["verified_files"] >= 4, status
    assert status["needs_fsck"]
    assert "scrub" in m.cli("status", m.mnt, check=True).stdout
    m.umount()
    secret = Secret("keyfile", m.key.read_bytes())
    fs = FileSystem(open_store(str(m.store), secret), dataclasses.replace(SMALL, read_only=True))
    try:  # when each file was last found intact is recorded; never for the damaged one
        with fs.lock, fs.index.begin() as txn:
            seen = {name: txn.scrubbed(fs._resolve(txn, "/" + name)) for name in
                    ("f0", "f1", "f2", "f3", "f4")}
    finally:
        fs.close()
    assert seen["f3"] is None
    assert all(abs(seen[n] / 1e9 - time.time()) < 120 for n in ("f0", "f1", "f2", "f4"))


@pytest.mark.slow  # the whole corpus through a mount: ~7-14 s
def test_index_loss_of_the_pydicom_corpus_rebuilds_every_file_and_name(mount_env):
    """Delete index/data.mdb of a store holding the real DICOM corpus: it is
    refused (never an empty index over the data), rebuilt by fsck, and every
    file comes back under its name with the same SHA-256."""
    m = mount_env
    m.mount()
    want = {}
    for i, p in enumerate(dicom_files()):
        sub = m.mnt / f"series{i % 7}"
        sub.mkdir(exist_ok=True)
        shutil.copyfile(p, sub / p.name)
        want[f"series{i % 7}/{p.name}"] = file_sha256(p)
    r = m.cli("recompress", m.store, timeout=600)  # DICOM-coded extents too
    assert r.returncode == 0, r.stderr
    m.umount()
    (m.store / "index" / "data.mdb").unlink()
    r = m.mount(check=False)
    assert r.returncode == 17 and "--rebuild-index" in r.stderr, r.stderr
    r = m.cli("fsck", m.store, "--key-file", m.key, "--rebuild-index", timeout=600)
    assert r.returncode == 0 and "index rebuilt" in r.stdout, r.stdout + r.stderr
    m.mount()
    got = {str(p.relative_to(m.mnt)): file_sha256(p) for p in m.mnt.rglob("*") if p.is_file()}
    assert got == want
    assert m.cli("verify", m.store).returncode == 0


def test_mounted_verify_while_files_are_written_and_reencoded_finds_nothing(mount_env):
    """No false alarms: verify runs while a writer creates and rewrites files
    and the re-encoder swaps layouts and checkpoints collect old objects."""
    import threading
    from .conftest import ct_file
    m = mount_env
    m.mount("-o", "checkpoint_interval=0.2")
    ct = ct_file().read_bytes()
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        try:
            while not stop.is_set():
                data = ct[:-64] + os.urandom(64) if i % 2 else os.urandom(300000)
                (m.mnt / f"w{i % 12}.dcm").write_bytes(data)
                i += 1
        except OSError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(4):
            r = m.cli("verify", m.store, "--json")
            report = json.loads(r.stdout)
            assert r.returncode == 0 and report["findings"] == [], report
            assert report["files"] + report["skipped_busy"] >= 1
    finally:
        stop.set()
        t.join()
    assert not errors
    assert damage_mark(str(m.store)) is None
