"""Master-key rotation (issue 18): key epochs.  New chunks are sealed under
the newest epoch at once; ``--finish`` seals the older ones again and
destroys the keys no chunk uses; a stolen old key reads nothing written
after the rotation, and a destroyed epoch's objects, copied aside before,
open with nothing the store holds afterwards."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dcmfs import errors as E
from dcmfs.app import admin
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage import keyring
from dcmfs.storage.header import Secret, StoreLock, init_store, open_store, read_header
from dcmfs.storage.objects import ObjectDamaged, ObjectStore

from .conftest import SMALL, file_sha256, sha256
from .test_key_slots import read_all, write as write_as

KEY = Secret("keyfile", bytes(range(32)))
PW = Secret("passphrase", b"a second admin")


def write(root, files: dict) -> None:
    write_as(root, KEY, files)


def check(root, files: dict, secret=KEY) -> dict:
    """Every file byte-exact (read-only opening); returns {epoch: chunks}."""
    return read_all(root, secret, files, for_writing=False)


def finish(root) -> dict:
    return admin.finish_rotation(str(root), lambda: KEY, SMALL, out=io.StringIO())


def chunk_oids(root, path) -> list[bytes]:
    fs = FileSystem(open_store(str(root), KEY), SMALL)
    try:
        with fs.lock, fs.index.begin() as txn:
            ino = fs._resolve(txn, path)
            return [ref.oid for ref in txn.chunks(ino).values()]
    finally:
        fs.close()


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "s"
    init_store(str(root), KEY, SMALL)
    keyring.add_slot(str(root), KEY, PW, "bob", {"memory_kib": 1024, "iterations": 1,
                                                 "lanes": 1})
    files = {"/old.bin": os.urandom(300_000), "/dir/small": b"x" * 1000}
    write(root, {"/old.bin": files["/old.bin"]})
    fs = FileSystem(open_store(str(root), KEY, for_writing=True), SMALL)
    fs.mkdir("/dir", 0o755, 0, 0)
    fh = fs.create("/dir/small", 0o600, os.O_WRONLY, 0, 0)
    fs.write(fh, files["/dir/small"], 0)
    fs.release(fh)
    fs.close()
    return root, files


def test_new_chunks_go_under_the_new_epoch_at_once(store):
    root, files = store
    stolen = open_store(str(root), KEY).master_key  # the key before the rotation
    assert keyring.rotate(str(root), PW)[0] == 1  # any slot authorises it
    header = read_header(str(root))
    assert header["epoch"] == 1 and "key-epochs-v1" in header["features"]
    new = {"/new.bin": os.urandom(200_000)}
    write(root, new)
    assert check(root, {**files, **new}) == {0: 6, 1: 4}  # 64 KiB chunks: 5 + 1 old, 4 new
    assert check(root, {**files, **new}, PW) == {0: 6, 1: 4}
    # the stolen old key opens the old chunks, never a new one
    fs = FileSystem(open_store(str(root), KEY), SMALL)
    thief = ObjectStore(str(root), bytes.fromhex(header["store_id"]), stolen, fs.opened.codecs)
    thief.inline = fs.index.inline  # the last chunk's object is in the index
    try:
        with fs.lock, fs.index.begin() as txn:
            for path, expect in (("/old.bin", True), ("/new.bin", False)):
                ino = fs._resolve(txn, path)
                inode = txn.get_inode(ino)
                for idx, ref in txn.chunks(ino).items():
                    cipher = thief.file_cipher(inode.file_id, inode.secret)
                    if expect:
                        assert thief.read(cipher, inode.file_id, ino, idx, ref)
                    else:  # no part of it: its context block is under epoch 1 too
                        with pytest.raises(ObjectDamaged, match="authentication of its context"):
                            thief.read(cipher, inode.file_id, ino, idx, ref)
    finally:
        fs.close()


def test_rotation_refused_while_an_admin_command_has_the_store_open(store):
    root, files = store
    lock = StoreLock(str(root))
    try:
        with pytest.raises(E.StoreLockedError, match="not a mount"):
            keyring.rotate(str(root), KEY)
    finally:
        lock.release()
    assert read_header(str(root))["epoch"] == 0


def test_finish_reseals_everything_and_destroys_the_unused_epoch(store):
    root, files = store
    keyring.rotate(str(root), KEY)
    new = {"/e1.bin": os.urandom(150_000)}
    write(root, new)
    files.update(new)
    keyring.rotate(str(root), KEY)  # epoch 2; epochs 0 and 1 hold chunks
    aside = {oid: (root / "objects" / oid.hex()[:2] / oid.hex()).read_bytes()
             for oid in chunk_oids(root, "/e1.bin")}  # S3 versioning keeps these
    result = finish(root)
    # epoch 0 too: the index side moved to epoch 2 (key-generations-v1)
    assert result["destroyed"] == [0, 1] and result["after"] == {"2": 9}
    assert result["before"] == {"0": 6, "1": 3}
    assert check(root, files) == {2: 9}
    epochs = {e["epoch"]: e["state"] for e in keyring.list_epochs(str(root))}
    assert epochs == {0: "destroyed", 1: "destroyed", 2: "current"}
    # a copy of an epoch-1 object opens with nothing the store now holds
    store_now = open_store(str(root), KEY)
    assert set(store_now.epoch_keys) == {2}
    fs = FileSystem(store_now, SMALL)
    try:
        with fs.lock, fs.index.begin() as txn:
            ino = fs._resolve(txn, "/e1.bin")
            inode = txn.get_inode(ino)
            table = txn.chunks(ino)
        cipher = fs.objects.file_cipher(inode.file_id, inode.secret)
        for (idx, ref), (oid, blob) in zip(sorted(table.items()), aside.items()):
            # its context block was under epoch 1 too (key-generations-v1)
            with pytest.raises(ObjectDamaged, match="authentication of its context"):
                fs.objects.read(cipher, inode.file_id, ino, idx, ref._replace(oid=oid), blob)
    finally:
        fs.close()
    fsck = admin.fsck(str(root), lambda: KEY, SMALL, repair=False, rebuild=False,
                      out=io.StringIO())
    assert fsck["clean"], fsck
    assert finish(root)["chunks"] == 0  # nothing left to do


KILL = textwrap.dedent("""
    import io, os, signal, sys
    from dcmfs.app import admin
    from dcmfs.core import rekey
    from dcmfs.storage.header import Secret
    from tests.conftest import SMALL
    seen = [0]
    real = rekey.rekey_file
    def rekey_file(host, ino):
        seen[0] += 1
        if seen[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(host, ino)
    rekey.rekey_file = rekey_file
    admin.finish_rotation(sys.argv[1], lambda: Secret("keyfile", bytes(range(32))), SMALL,
                          out=io.StringIO())
""")


@pytest.mark.parametrize("at", [2, 3])
def test_sigkill_during_finish_loses_nothing_and_finish_goes_on(store, at):
    root, files = store
    keyring.rotate(str(root), KEY)
    more = {f"/f{i}": os.urandom(70_000 + i) for i in range(3)}
    write(root, more)
    files.update(more)
    keyring.rotate(str(root), KEY)
    r = subprocess.run([sys.executable, "-c", KILL, str(root), str(at)], capture_output=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    counts = check(root, files)  # reads never fail: every epoch is still there
    assert counts.get(2, 0) > 0 and set(counts) <= {0, 1, 2}
    assert finish(root)["destroyed"] == [0, 1]
    assert check(root, files) == {2: sum(len(d) // 65536 + 1 for d in files.values())}


@pytest.mark.parametrize("at", ["written", "renamed"])
def test_sigkill_while_rotating_leaves_the_old_or_the_new_epoch(store, at):
    root, files = store
    script = textwrap.dedent("""
        import os, signal, sys
        from dcmfs.storage import keyring
        from dcmfs.storage.header import Secret
        def step(name):
            if name == sys.argv[2]:
                os.kill(os.getpid(), signal.SIGKILL)
        keyring.rotate(sys.argv[1], Secret("keyfile", bytes(range(32))), step=step)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(root), at], capture_output=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert read_header(str(root))["epoch"] == (0 if at == "written" else 1)
    write(root, {"/later": b"after the crash" * 100})
    files["/later"] = b"after the crash" * 100
    check(root, files)
    check(root, files, PW)


def test_rotate_while_mounted_takes_effect_at_once(mount_env):
    m = mount_env
    m.mount("-o", "reencode=0")
    data = os.urandom(400_000)
    (m.mnt / "scan.dcm").write_bytes(data)
    held = open(m.mnt / "held.bin", "wb")  # open across the rotation
    held.write(b"a" * 100_000)
    held.flush()
    r = m.cli("key", "rotate", m.store, "--key-file", m.key)
    assert r.returncode == 0 and "Key epoch 1 started" in r.stdout, r.stderr
    (m.mnt / "after.dcm").write_bytes(data[::-1])
    held.write(b"b" * 100_000)
    held.close()
    assert file_sha256(m.mnt / "scan.dcm") == sha256(data)  # reads of epoch 0 go on
    # a forged rekey (a key that is not the header's) is refused by the daemon
    with pytest.raises(OSError):
        os.setxattr(m.mnt, "user.dcmfs.control", b"rekey 1 " + b"00" * 32)
    m.umount()
    fs = FileSystem(open_store(str(m.store), Secret("keyfile", m.key.read_bytes())), SMALL)
    try:
        with fs.lock, fs.index.begin() as txn:
            by_path = {}
            for path in ("/scan.dcm", "/after.dcm", "/held.bin"):
                ino = fs._resolve(txn, path)
                by_path[path] = sorted(fs.objects.epoch_of(ref.oid)
                                       for ref in txn.chunks(ino).values())
    finally:
        fs.close()
    assert by_path["/scan.dcm"] == [0]
    assert by_path["/after.dcm"] == [1]
    assert by_path["/held.bin"] == [1]  # written again at its close, after the rotation
    m.mount()
    # --finish on the mounted store: the daemon reseals while files are written
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os
for i in range(40):
    with open({str(m.mnt)!r} + f"/busy{{i}}", "wb") as f:
        f.write(os.urandom(50_000))
"""])
    r = m.cli("key", "rotate", m.store, "--finish", "--key-file", m.key)
    assert writer.wait(timeout=60) == 0
    assert r.returncode == 0 and "under key epoch 1" in r.stdout, r.stderr
    assert file_sha256(m.mnt / "scan.dcm") == sha256(data)
    m.umount()
    r = m.cli("key", "list", m.store, "--json")
    epochs = {e["epoch"]: e["state"] for e in json.loads(r.stdout)["epochs"]}
    # the daemon moved the index side to epoch 1 as well: epoch 0 is gone
    assert epochs == {0: "destroyed", 1: "current"}
    m.mount()
    assert file_sha256(m.mnt / "scan.dcm") == sha256(data)
    assert file_sha256(m.mnt / "after.dcm") == sha256(data[::-1])
    assert file_sha256(m.mnt / "held.bin") == sha256(b"a" * 100_000 + b"b" * 100_000)
    m.umount()
    log = m.log()
    assert "rotation to epoch 1 started" in log and "sealed again under epoch 1" in log
    assert "new chunks are sealed under epoch 1 from now on" in log


def test_a_mounted_finish_waits_for_open_files_and_says_which_epoch_stays(mount_env):
    """The kernel sends RELEASE after close(2) has returned: a file just
    written can look open to the daemon for a moment (CI saw one stay so
    for 5 s under load). The finish waits for open files instead of giving
    up after three passes in a row, and says so when one stays open."""
    m = mount_env
    m.mount("-o", "reencode=0")
    data = os.urandom(200_000)
    (m.mnt / "scan.dcm").write_bytes(data)
    assert m.cli("key", "rotate", m.store, "--key-file", m.key).returncode == 0
    # held open throughout a short wait: its chunk stays under epoch 0
    held = open(m.mnt / "scan.dcm", "rb")
    try:
        r = m.cli("key", "rotate", m.store, "--finish", "--wait-open", "1", "--key-file", m.key)
        assert r.returncode == 0, r.stderr
        assert "epoch keys destroyed: none" in r.stdout, r.stdout
        assert ("1 files stayed open throughout the wait, so epoch 0 keeps its key: run "
                f"'dcmfs key rotate --finish {m.store}' again once they are closed.") in r.stdout
        # closed a moment after the finish started: it waits and goes on
        finish = subprocess.Popen([sys.executable, "-m", "dcmfs.cli", "key", "rotate",
                                   str(m.store), "--finish", "--key-file", str(m.key)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
    finally:
        held.close()
    out, _ = finish.communicate(timeout=120)
    assert finish.returncode == 0 and "epoch keys destroyed: 0" in out, out
    assert "stayed open" not in out
    assert file_sha256(m.mnt / "scan.dcm") == sha256(data)
    m.umount()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_frozen_stores_rotate_and_finish(tmp_path, version):
    """Objects of every layout (version-1 objects have no epoch field) are
    sealed again as version-2 objects of the new epoch; verify and fsck
    stay clean."""
    from .test_key_slots import COMPAT, check_manifest
    with open(os.path.join(COMPAT, version, "manifest.json")) as f:
        manifest = json.load(f)
    root = tmp_path / "store"
    shutil.copytree(os.path.join(COMPAT, version, "store"), root)
    old = Secret("passphrase", manifest["passphrase"].encode())
    cfg = dataclasses.replace(SMALL, chunk_size=manifest["chunk_size"])
    assert keyring.rotate(str(root), old)[0] == 1
    result = admin.finish_rotation(str(root), lambda: old, cfg, out=io.StringIO())
    assert result["chunks"] > 0 and set(result["after"]) == {"1"}
    check_manifest(root, old, manifest)
    report = admin.verify(str(root), lambda: old, cfg, out=io.StringIO())
    assert not report["findings"], report
    fsck = admin.fsck(str(root), lambda: old, cfg, repair=False, rebuild=False,
                      out=io.StringIO())
    assert fsck["clean"], fsck


def test_an_index_rebuilt_after_a_rotation_reads_every_epoch(store):
    root, files = store
    keyring.rotate(str(root), KEY)
    new = {"/after": os.urandom(100_000)}
    write(root, new)
    files.update(new)
    shutil.rmtree(root / "index")  # the index lost: snapshots, journals and objects remain
    result = admin.fsck(str(root), lambda: KEY, SMALL, repair=False, rebuild=True,
                        out=io.StringIO())
    assert result["clean"], result
    assert set(check(root, files)) == {0, 1}
