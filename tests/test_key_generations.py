"""Key generations (issue 18's last guarantee, feature ``key-generations-v1``):
after ``dcmfs key rotate --finish`` a stolen old store key reads nothing of
the store - no index value, no name, no journal record, no snapshot, no
object, no audit record, not the recipient's private key - because the
index side is sealed again under the newest epoch and epoch 0 is destroyed.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import lmdb
import pytest

from dcmfs.app import admin
from dcmfs.audit import segments as S
from dcmfs.config import Config
from dcmfs.core.filesystem import FileSystem
from dcmfs.core.ingest import IngestFS
from dcmfs.index import index_sealer, sealed_aad
from dcmfs.index.journal import Journal
from dcmfs.index.schema import DATABASES, U64
from dcmfs.storage import crypto, inbox, keyring
from dcmfs.storage.codec import Codecs
from dcmfs.storage.header import Secret, open_store, read_header
from dcmfs.storage.objects import ObjectDamaged, ObjectStore

from .conftest import SMALL, ct_file, sha256
from .test_ingest import ingest_write, read_all
from .test_pkcs11 import token  # noqa: F401 (a fixture)
from .test_s3 import s3_fs  # noqa: F401 (a fixture)

KDF = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
PW = Secret("passphrase", b"a second admin")
_SEALED_META = (b"auth", b"damage", b"audit_head")


def thief_reads(root, stolen: bytes, scan=None) -> dict[str, int]:
    """What ``stolen`` (a store key) opens of everything the store directory
    holds now: every value of every LMDB file (the index, snapshots, any
    copy), directory entries keyed by its name tags, every journal record
    (live and archived, followers' parts), every object's context block and
    payload, every audit segment and record, the recipient's private key.
    ``scan``: a copy of a bucket, walked instead of the store directory for
    all but the objects and the header."""
    root = str(root)
    header = read_header(root)
    sid = bytes.fromhex(header["store_id"])
    siv = index_sealer(stolen, sid)
    name_key = crypto.derive(stolen, b"names", sid)
    root_tag = hmac.new(name_key, b"directory\x00" + U64.pack(1), hashlib.sha256).digest()[:16]
    got = dict.fromkeys(("index", "names", "journal", "objects", "payloads", "audit", "ingest",
                         "epoch0"), 0)
    top = str(scan or root)
    for base, _, names in os.walk(top):
        rel = os.path.relpath(base, top).split(os.sep)[0]
        if rel == "objects":
            continue
        if "data.mdb" in names:
            env = lmdb.open(base, readonly=True, lock=False, max_dbs=len(DATABASES))
            try:
                with env.begin() as txn:
                    for db in DATABASES:
                        try:
                            handle = env.open_db(db.encode(), txn=txn, create=False)
                        except lmdb.NotFoundError:
                            continue
                        for k, v in txn.cursor(db=handle):
                            if db == "dirents" and k[:16] == root_tag:
                                got["names"] += 1
                            if db in ("meta",) and k not in _SEALED_META:
                                continue
                            try:
                                siv.open(v, sealed_aad(db, k))
                                got["index"] += 1
                            except crypto.AuthenticationFailed:
                                pass
            finally:
                env.close()
        for name in names:
            if name == "journal" or name.startswith(("journal-", "part-")):
                j = Journal(os.path.join(base, name), stolen, sid, read_only=True)
                try:
                    got["journal"] += sum(1 for _ in j.records(0))
                finally:
                    j.close()
            if name.startswith(S.PREFIX):
                data = S.read_file(os.path.join(base, name))
                aead = S.audit_key(stolen, sid)
                got["audit"] += bool(S.Header(data, aead).authentic)
                h = S.Header(data, None)
                digest = h.prev_hash
                for item in S.frames(data):
                    if isinstance(item, S.Torn):
                        break
                    try:
                        S.open_frame(aead, sid, h.number, digest, item[2])
                        got["audit"] += 1
                    except (crypto.AuthenticationFailed, ValueError):
                        pass
                    digest = S.chain(digest, item[2])
    thief = ObjectStore(root, sid, stolen, Codecs.of(Config()))
    for base, _, names in os.walk(os.path.join(root, "objects")):
        for name in names:
            oid = bytes.fromhex(name)
            blob = S.read_file(os.path.join(base, name))
            try:
                ctx = thief.open_context(oid, blob)
            except ObjectDamaged:
                continue
            got["objects"] += 1
            try:  # a file without a secret (older than file-secrets-v1) opens with the key
                from dcmfs.storage.objects import ChunkRef
                thief.read(thief.file_cipher(ctx.file_id, b""), ctx.file_id, ctx.ino,
                           ctx.index, ChunkRef(oid, ctx.generation, ctx.codec, ctx.flags,
                                               ctx.plain_len, ctx.stored_len), blob)
                got["payloads"] += 1
            except ObjectDamaged:
                pass
    if header.get("ingest"):
        try:
            inbox.open_entry(stolen, sid, header["ingest"])
            got["ingest"] = 1
        except crypto.AuthenticationFailed:
            pass
    got["epoch0"] = int(any(e["epoch"] == 0 for e in header["epochs"]))
    return got


def mounted_files(m, files: dict) -> None:
    for name, data in files.items():
        assert sha256((m.mnt / name).read_bytes()) == sha256(data), name


#: reads all through a mounted finish: every name listed and stat'ed (index
#: reads), and the file written after the rotation read whole (the others
#: are being sealed again: an open file waits for the next pass)
READER = textwrap.dedent("""
    import hashlib, os, sys, time
    mnt, stop, digest = sys.argv[1:4]
    names = set(sys.argv[4:])
    rounds = 0
    while not os.path.exists(stop) or rounds < 3:
        assert names <= set(os.listdir(mnt))
        for name in names:
            os.stat(os.path.join(mnt, name))
        with open(os.path.join(mnt, "after-rotation.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
        rounds += 1
    print(rounds)
""")


@pytest.mark.parametrize("mounted", [False, True], ids=["offline", "mounted"])
def test_a_stolen_store_key_reads_nothing_after_finish(mount_env, mounted):
    m = mount_env
    key = Secret("keyfile", m.key.read_bytes())
    root = str(m.store)
    keyring.add_slot(root, key, PW, "bob", KDF)
    rcp = keyring.recipient(root, key)
    stolen = open_store(root, key).master_key  # epoch 0, the store key made with the store
    files = {"ct.dcm": ct_file().read_bytes(), "notes-of-jane-doe.txt": b"secret" * 5000}
    m.mount()
    (m.mnt / "dir").mkdir()
    for name, data in files.items():
        (m.mnt / name).write_bytes(data)
    os.setxattr(m.mnt / "ct.dcm", "user.patient", b"jane doe")
    m.umount()
    r = m.cli("key", "rotate", m.store, "--key-file", m.key)
    assert r.returncode == 0, r.stderr
    m.mount("-o", "reencode=0")  # the older files keep their epoch-0 objects
    files["after-rotation.bin"] = os.urandom(300_000)
    (m.mnt / "after-rotation.bin").write_bytes(files["after-rotation.bin"])
    mounted_files(m, files)
    m.umount()
    # the control: before --finish the stolen key reads the index, names,
    # objects' contexts, the audit trail and the recipient's key
    before = thief_reads(root, stolen)
    assert before["index"] > 0 and before["names"] > 0 and before["objects"] > 0
    assert before["audit"] > 0 and before["ingest"] == 1 and before["epoch0"] == 1

    if mounted:  # files are read all through the finish: no read fails
        m.mount()
        stop = m.base / "stop"
        reader = subprocess.Popen([sys.executable, "-c", READER, str(m.mnt), str(stop),
                                   sha256(files["after-rotation.bin"]), *files],
                                  stdout=subprocess.PIPE, text=True)
    r = m.cli("key", "rotate", m.store, "--finish", "--key-file", m.key)
    assert r.returncode == 0, r.stderr
    assert "epoch keys destroyed: 0" in r.stdout and "sealed under epoch 1" in r.stdout
    if mounted:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
        assert reader.returncode == 0 and int(out) >= 3
        mounted_files(m, files)
        m.umount()
        # the daemon's trail went on under epoch 1: the unmount is recorded
        r = m.cli("audit", m.store, "--key-file", m.key, "--json")
        events = [json.loads(line)["event"] for line in r.stdout.splitlines()]
        assert events[-1] == "unmount" and "key" in events, events[-6:]
    assert thief_reads(root, stolen) == dict.fromkeys(before, 0)
    epochs = json.loads(m.cli("key", "list", m.store, "--json", check=True).stdout)["epochs"]
    assert {e["epoch"]: e["state"] for e in epochs} == {0: "destroyed", 1: "current"}
    assert [e["epoch"] for e in epochs if e.get("master")] == [1]
    text = m.cli("key", "list", m.store, check=True).stdout
    assert "destroyed" in text and "(the store key made with the store)" in text
    assert "current" in text and "(the master key: index and names" in text
    header = read_header(root)
    assert header["master"] == 1 and "key-generations-v1" in header["features"]
    assert [e["epoch"] for e in header["epochs"]] == [1]

    # every slot still opens the store, every file reads back, the trail verifies
    m.mount()
    mounted_files(m, files)
    assert os.getxattr(m.mnt / "ct.dcm", "user.patient") == b"jane doe"
    assert sorted(os.listdir(m.mnt)) == sorted([*files, "dir"])
    m.umount()
    store = open_store(root, PW)
    assert store.master_epoch == 1 and set(store.epoch_keys) == {1}
    for cmd in (("verify", m.store, "--key-file", m.key), ("fsck", m.store, "--key-file", m.key),
                ("audit", "verify", m.store, "--key-file", m.key)):
        r = m.cli(*cmd)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    # the write-only recipient works on: its private key moved to epoch 1
    ing = IngestFS(root, rcp, Config())
    ingest_write(ing, "/ingested.bin", b"from the modality" * 1000)
    ing.close()
    fs = FileSystem(open_store(root, PW, for_writing=True), SMALL)
    try:
        assert read_all(fs, "/ingested.bin") == b"from the modality" * 1000
    finally:
        fs.close()
    assert thief_reads(root, stolen) == dict.fromkeys(before, 0)


KEY = Secret("keyfile", bytes(range(32)))

KILL = textwrap.dedent("""
    import io, os, signal, sys
    from dcmfs.app import admin
    from dcmfs.audit import rekey as audit_rekey
    from dcmfs.index import keygen
    from dcmfs.opened import regen
    from dcmfs.storage import keyring
    from dcmfs.storage.header import Secret
    from tests.conftest import SMALL
    at = sys.argv[2]

    def kill_after(module, name):
        real = getattr(module, name)
        def wrapper(*a, **kw):
            out = real(*a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(module, name, wrapper)

    if at == "copied":
        kill_after(keygen, "_copy")   # the index copy aside written, not renamed in
    elif at == "index":
        kill_after(regen, "rekey_index")
    elif at == "exchanged":
        kill_after(audit_rekey, "exchange")  # the old trail not removed yet
    elif at == "trail":
        kill_after(regen, "reseal_trail")  # the index's head not mapped yet
    elif at == "snapshot":
        kill_after(regen, "take_snapshot")
    else:  # "written" / "renamed": the header replace
        real = keyring.move_master
        def move_master(*a, **kw):
            def step(name):
                if name == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, step=step, **kw)
        keyring.move_master = move_master
    admin.finish_rotation(sys.argv[1], lambda: Secret("keyfile", bytes(range(32))), SMALL,
                          out=io.StringIO())
""")


@pytest.mark.parametrize("at", ["copied", "index", "exchanged", "trail", "snapshot", "written",
                                "renamed"])
def test_sigkill_at_each_step_of_the_move_loses_nothing_and_finish_completes(tmp_path, at):
    from dcmfs.storage.header import init_store
    from .test_key_slots import read_all as check, write
    root = tmp_path / "s"
    init_store(str(root), KEY, SMALL)
    keyring.add_slot(str(root), KEY, PW, "bob", KDF)
    files = {"/a.bin": os.urandom(150_000), "/b": b"b" * 1000}
    write(root, KEY, files)
    stolen = open_store(str(root), KEY).master_key
    keyring.rotate(str(root), KEY)
    more = {"/c.bin": os.urandom(80_000)}
    write(root, KEY, more)
    files.update(more)
    r = subprocess.run([sys.executable, "-c", KILL, str(root), at], capture_output=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    header = read_header(str(root))
    assert header.get("master", 0) == (1 if at == "renamed" else 0)
    # every file reads, through either slot, whatever step the kill hit
    for secret in (KEY, PW):
        assert check(root, secret, files, for_writing=False) == {1: 6}
    result = admin.finish_rotation(str(root), lambda: KEY, SMALL, out=io.StringIO())
    assert result["destroyed"] == ([] if at == "renamed" else [0])
    assert thief_reads(root, stolen) == dict.fromkeys(thief_reads(root, stolen), 0)
    assert [e["epoch"] for e in read_header(str(root))["epochs"]] == [1]
    assert check(root, PW, files) == {1: 6}
    fsck = admin.fsck(str(root), lambda: KEY, SMALL, repair=False, rebuild=False,
                      out=io.StringIO())
    assert fsck["clean"], fsck
    # the trail holds every opening's records without a break, whichever
    # key its segments were under at the kill
    from dcmfs.app import audit as audit_app
    report = audit_app.verify(str(root), lambda: KEY)
    assert report["intact"], report["problems"]


@pytest.mark.parametrize("version", ["v1", "v3", "v4", "v5", "v6"])
def test_frozen_stores_move_to_a_new_generation(tmp_path, version):
    """A store of every format is upgraded in place by a rotation and a
    finish: its files read back, epoch 0 is gone, its store key opens
    nothing, verify and fsck stay clean (v5: the inbox it holds is imported
    first, its recipient key moves to the new master)."""
    import dataclasses
    import shutil
    from .test_key_slots import COMPAT, check_manifest
    with open(os.path.join(COMPAT, version, "manifest.json")) as f:
        manifest = json.load(f)
    root = tmp_path / "store"
    shutil.copytree(os.path.join(COMPAT, version, "store"), root)
    old = Secret("passphrase", manifest["passphrase"].encode())
    cfg = dataclasses.replace(SMALL, chunk_size=manifest["chunk_size"])
    stolen = open_store(str(root), old).master_key
    # v6 was made with its index under epoch 1 (0 destroyed) and epoch 2 current
    new_epoch, gone = (3, [1, 2]) if version == "v6" else (1, [0])
    assert keyring.rotate(str(root), old)[0] == new_epoch
    result = admin.finish_rotation(str(root), lambda: old, cfg, out=io.StringIO())
    assert sorted(result["destroyed"]) == gone and result["generation"]["index"]
    got = thief_reads(root, stolen)
    assert got == dict.fromkeys(got, 0), got
    check_manifest(root, old, manifest)
    for path, digest in manifest.get("inbox", {}).items():  # imported at the finish
        check_manifest(root, old, {"files": {path: digest}})
    if version in ("v5", "v6"):
        assert open_store(str(root), old).ingest is not None  # its wrap opens
    report = admin.verify(str(root), lambda: old, cfg, out=io.StringIO())
    assert not report["findings"], report
    fsck = admin.fsck(str(root), lambda: old, cfg, repair=False, rebuild=False,
                      out=io.StringIO())
    assert fsck["clean"], fsck


def test_a_pkcs11_slot_opens_the_store_after_finish(tmp_path, token):
    from .conftest import Mount, file_sha256
    from .test_pkcs11 import KEY as TOKEN_KEY, MODULE, TOKEN
    env, pin, _ = token
    m = Mount(tmp_path)
    try:
        m.init()
        r = m.cli("key", "add", m.store, "--label", "hsm", "--key-file", m.key,
                  "--new-pkcs11-module", MODULE, "--new-pkcs11-token", TOKEN,
                  "--new-pkcs11-key", TOKEN_KEY, "--new-passphrase-file", pin, env=env)
        assert r.returncode == 0, r.stderr
        hsm = ["--pkcs11-module", MODULE, "--passphrase-file", pin]
        data = os.urandom(300_000)
        m.mount()
        (m.mnt / "scan.bin").write_bytes(data)
        m.umount()
        for args in (("key", "rotate", m.store, *hsm), ("key", "rotate", m.store, "--finish",
                                                        *hsm)):
            r = m.cli(*args, env=env)
            assert r.returncode == 0, r.stderr
        epochs = json.loads(m.cli("key", "list", m.store, "--json", check=True).stdout)
        assert {e["epoch"]: e["state"] for e in epochs["epochs"]} == {0: "destroyed",
                                                                       1: "current"}
        for opener in (hsm, ["--key-file", m.key]):
            r = m.cli("mount", m.store, m.mnt, *opener, env=env)
            assert r.returncode == 0, r.stderr
            assert file_sha256(m.mnt / "scan.bin") == sha256(data)
            m.umount()
    finally:
        m.cleanup()


def test_an_s3_bucket_keeps_nothing_under_the_old_generation(s3_fs, ceph_s3, secret, tmp_path):
    """The bucket's snapshots, archived segments and followers' parts were
    under the store key (the control); after the move and the upload, and
    once followers had their time, nothing in the bucket opens with it."""
    from dcmfs.core.rekey import rekey_all
    from .test_s3 import read_file, write_file
    from .test_shred import _bucket_copy
    fs = s3_fs()
    root = s3_fs.root
    stolen = open_store(root, secret).master_key
    data = {"/a": os.urandom(150_000), "/b": b"b" * 3000}
    for path, blob in data.items():
        write_file(fs, path, blob)
    fs.checkpoint()
    fs.snapshot()
    fs.opened.publisher.publish()
    before = tmp_path / "before"
    _bucket_copy(ceph_s3, s3_fs.url, before)
    got = thief_reads(root, stolen, scan=before)
    assert got["index"] > 0 and got["journal"] > 0, got
    # rotate --finish on the writer, as the daemon does it
    epoch, key = keyring.rotate(root, secret, lock_held=True)
    fs.objects.add_epoch(epoch, key)
    rekey_all(fs)
    fs.checkpoint()
    moved = fs.move_generation(epoch)
    assert moved["index"]
    assert keyring.move_master(root, stolen, dict(fs.objects.epoch_keys), epoch, {0}) == [0]
    data["/c"] = os.urandom(70_000)
    write_file(fs, "/c", data["/c"])
    for path, blob in data.items():
        assert read_file(fs, path) == blob
    fs.opened.publisher.grace = 0  # followers' time to fetch the parts (60 s) over
    fs.close()
    after = tmp_path / "after"
    _bucket_copy(ceph_s3, s3_fs.url, after)
    got = thief_reads(root, stolen, scan=after)
    assert got == dict.fromkeys(got, 0), got
    # only snapshots taken since the move (the one it took, the unmount's)
    assert sorted(int(n.split("-")[1]) >= moved["seq"] for n in os.listdir(after / "snapshots")
                  if n.startswith("snapshot-")) == [True, True]
    fs = s3_fs()
    for path, blob in data.items():
        assert read_file(fs, path) == blob


def test_an_index_rebuilt_after_the_move_is_under_the_new_generation(tmp_path):
    """fsck --rebuild-index from the snapshot the move left (it names its
    generation), and with no snapshot at all (a new index under the master)."""
    import shutil
    from dcmfs.index.keygen import generation_of
    from dcmfs.storage.header import init_store
    from .test_key_slots import read_all as check, write
    root = tmp_path / "s"
    init_store(str(root), KEY, SMALL)
    files = {"/a.bin": os.urandom(100_000)}
    write(root, KEY, files)
    keyring.rotate(str(root), KEY)
    assert admin.finish_rotation(str(root), lambda: KEY, SMALL, out=io.StringIO())[
        "destroyed"] == [0]
    more = {"/b.bin": os.urandom(50_000)}
    write(root, KEY, more)
    files.update(more)
    shutil.rmtree(root / "index")  # the snapshot the move left and the journal remain
    result = admin.fsck(str(root), lambda: KEY, SMALL, repair=False, rebuild=True,
                        out=io.StringIO())
    assert result["clean"], result
    assert generation_of(str(root / "index")) == 1
    assert check(root, KEY, files) == {1: 3}
    # nothing to start from but the objects: a new index, made under the master
    shutil.rmtree(root / "index")
    shutil.rmtree(root / "snapshots")
    admin.fsck(str(root), lambda: KEY, SMALL, repair=False, rebuild=True, out=io.StringIO())
    assert generation_of(str(root / "index")) == 1


def test_retiring_keeps_the_master_epoch_after_a_move(tmp_path):
    """Without a move (a chunk left under an older epoch), the master - no
    longer epoch 0 after an earlier move - is marked retired, not destroyed."""
    from dcmfs.storage.header import init_store
    root = str(tmp_path / "s")
    init_store(root, KEY, SMALL)
    keyring.rotate(root, KEY)
    assert admin.finish_rotation(root, lambda: KEY, SMALL, out=io.StringIO())[
        "destroyed"] == [0]
    keyring.rotate(root, KEY)
    master = open_store(root, KEY).master_key
    assert keyring.retire(root, master, {1}) == []
    states = {e["epoch"]: e["state"] for e in keyring.list_epochs(root)}
    assert states == {0: "destroyed", 1: "retired", 2: "current"}
    assert open_store(root, KEY).master_epoch == 1


def test_an_s3_store_attached_after_the_finish_reads_everything(s3_fs, secret, tmp_path,
                                                                s3_settings):
    """The finish puts the new header into the bucket too: a store attached
    from the bucket afterwards opens the snapshot under the new generation
    and every file (before, the bucket kept the header of 'dcmfs init')."""
    import dataclasses
    from dcmfs.app.attach import attach
    from .test_s3 import read_file, write_file
    fs = s3_fs()
    root = s3_fs.root
    data = {"/a": os.urandom(150_000), "/b": b"b" * 3000}
    for path, blob in data.items():
        write_file(fs, path, blob)
    fs.close()
    keyring.rotate(root, secret)
    cfg = dataclasses.replace(SMALL, s3=s3_settings, s3_drain_timeout=60, s3_upload_delay=0)
    assert admin.finish_rotation(root, lambda: secret, cfg, out=io.StringIO())[
        "destroyed"] == [0]
    viewer_root = str(tmp_path / "viewer")
    viewer_cfg = dataclasses.replace(cfg, state_dir=str(tmp_path / "vstate"))
    attach(s3_fs.url, viewer_root, lambda: secret, viewer_cfg, follower=True)
    assert read_header(viewer_root)["master"] == 1
    viewer = FileSystem(open_store(viewer_root, secret),
                        dataclasses.replace(viewer_cfg, read_only=True))
    try:
        for path, blob in data.items():
            assert read_file(viewer, path) == blob
    finally:
        viewer.close()


def test_a_mounted_move_keeps_every_name_reachable_in_the_running_core(make_fs, secret):
    """The core moves to the new generation while it runs (a mounted
    finish: SyncLoops.move_generation).  The index cached each directory's
    tag (index/tags.py) under the names key of the old generation and kept
    it: after the move a lookup in a directory used before found nothing
    (ENOENT for files that are there), and a file made there was keyed
    under the old key's tag, lost to the next opening (fails before)."""
    import dataclasses
    from dcmfs.core.rekey import rekey_all
    from .test_core import read_file, write_file
    fs = make_fs(dataclasses.replace(SMALL, checkpoint_interval=0))
    fs.mkdir("/d", 0o755, 0, 0)
    data = {"/top": os.urandom(3000), "/d/f": os.urandom(70_000)}
    for path, blob in data.items():
        write_file(fs, path, blob)
    for path, blob in data.items():  # each directory's tag is cached now
        assert read_file(fs, path) == blob
    root = str(make_fs.root)
    epoch, key = keyring.rotate(root, secret, lock_held=True)
    fs.objects.add_epoch(epoch, key)
    rekey_all(fs)
    fs.checkpoint()
    assert fs.move_generation(epoch)["index"]
    for path, blob in data.items():
        assert read_file(fs, path) == blob
    data["/d/new"] = os.urandom(5000)
    write_file(fs, "/d/new", data["/d/new"])
    assert {name for name, _ in fs.readdir("/d")} - {".", ".."} == {"f", "new"}
    fs.close()
    fs = make_fs()
    for path, blob in data.items():
        assert read_file(fs, path) == blob
