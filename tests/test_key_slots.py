"""Key slots (issue 18): several secrets open one store; slots are added,
changed and removed by rewrapping the master key only, crash-safely, while
the store is mounted; the last slot stays; a slot put back after its removal
is refused; single-wrap headers of older formats become slot tables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from dcmfs import errors as E
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage import keyring
from dcmfs.storage.header import Secret, init_store, open_store, read_header

from .conftest import CHEAP_KDF, SMALL, Mount, file_sha256, sha256

KDF = {"memory_kib": CHEAP_KDF.memory_kib, "iterations": CHEAP_KDF.iterations,
       "lanes": CHEAP_KDF.lanes}
PW1 = Secret("passphrase", b"first admin's passphrase")
PW2 = Secret("passphrase", b"second admin's passphrase")
COMPAT = os.path.join(os.path.dirname(__file__), "compat")


def write(root, secret, files: dict) -> None:
    fs = FileSystem(open_store(str(root), secret, for_writing=True), SMALL)
    try:
        for path, data in files.items():
            fh = fs.create(path, 0o600, os.O_WRONLY, 0, 0)
            fs.write(fh, data, 0)
            fs.release(fh)
    finally:
        fs.close()


def read_all(root, secret, files: dict, for_writing: bool = True) -> dict:
    """Every file reads back byte-exact (through a read-write opening by
    default); returns {key epoch: chunks} of the store."""
    from dcmfs.core.rekey import epochs_in_use
    fs = FileSystem(open_store(str(root), secret, for_writing=for_writing), SMALL)
    try:
        for path, data in files.items():
            fh = fs.open(path, os.O_RDONLY)
            try:
                assert fs.read(fh, len(data) + 1, 0) == data, path
            finally:
                fs.release(fh)
        return epochs_in_use(fs)
    finally:
        fs.close()


def check_manifest(root, secret, manifest: dict, for_writing: bool = False) -> None:
    """Every file of a frozen store's manifest reads back byte-exact."""
    fs = FileSystem(open_store(str(root), secret, for_writing=for_writing), SMALL)
    try:
        for path, digest in manifest["files"].items():
            fh = fs.open(path, os.O_RDONLY)
            try:
                assert sha256(fs.read(fh, 1 << 24, 0)) == digest, path
            finally:
                fs.release(fh)
    finally:
        fs.close()


@pytest.fixture
def three(tmp_path):
    """A store with two passphrase slots and a key-file slot, and a file."""
    root = tmp_path / "s"
    key = Secret("keyfile", os.urandom(32))
    init_store(str(root), PW1, SMALL, label="alice")
    assert keyring.add_slot(str(root), PW1, PW2, "bob", KDF) == 2
    assert keyring.add_slot(str(root), PW2, key, "boot", KDF) == 3
    files = {"/a.bin": os.urandom(200_000), "/b.bin": b"dcmfs" * 1000}
    write(root, key, files)
    return root, key, files


def test_two_passphrases_and_a_key_file_open_the_same_store(three):
    root, key, files = three
    masters = {open_store(str(root), s).master_key for s in (PW1, PW2, key)}
    assert len(masters) == 1
    for s in (PW1, PW2, key):
        read_all(root, s, files)
    rows = keyring.list_slots(str(root))
    assert [(r["id"], r["kind"], r["label"]) for r in rows] == [
        (1, "passphrase", "alice"), (2, "passphrase", "bob"), (3, "keyfile", "boot")]
    text = (root / "dcmfs.store").read_text()
    for s in (PW1, PW2, key):  # never a secret, in any form we know
        assert s.value.hex() not in text and s.value.decode(errors="replace") not in text


def test_removing_a_slot_leaves_the_others_and_the_last_one_stays(three):
    root, key, files = three
    keyring.remove_slot(str(root), PW1, 2)  # bob leaves; alice authorises it
    with pytest.raises(E.WrongKeyError, match="wrong passphrase"):
        open_store(str(root), PW2)
    read_all(root, PW1, files)
    read_all(root, key, files)
    keyring.remove_slot(str(root), key, 3)  # a slot removed by its own key
    with pytest.raises(E.WrongKeyError, match="no slot that a key file opens"):
        open_store(str(root), key)
    with pytest.raises(E.KeySlotError, match="last key slot"):
        keyring.remove_slot(str(root), PW1, 1)
    with pytest.raises(E.KeySlotError, match="no key slot 7"):
        keyring.remove_slot(str(root), PW1, 7)
    read_all(root, PW1, files)


def test_change_gives_a_slot_a_new_secret(three):
    root, key, files = three
    new = Secret("passphrase", b"bob's new passphrase")
    keyring.change_slot(str(root), PW1, 2, new, None, KDF)
    with pytest.raises(E.WrongKeyError):
        open_store(str(root), PW2)
    read_all(root, new, files)
    # a slot may change kind: the key file's slot becomes a key command's
    cmd = Secret("command", b"0123456789abcdef" * 4)
    keyring.change_slot(str(root), new, 3, cmd, "kms", KDF)
    row = keyring.list_slots(str(root))[2]
    assert (row["id"], row["kind"], row["label"]) == (3, "command", "kms") and row["changed"]
    read_all(root, cmd, files)
    with pytest.raises(E.WrongKeyError):
        open_store(str(root), key)


def test_a_removed_slot_put_back_is_refused(three):
    root, key, files = three
    before = json.loads((root / "dcmfs.store").read_text())
    keyring.remove_slot(str(root), PW1, 2)
    header = json.loads((root / "dcmfs.store").read_text())
    header["slots"].append(before["slots"][1])  # someone who kept a copy puts bob back
    (root / "dcmfs.store").write_text(json.dumps(header))
    for s in (PW1, PW2, key):
        with pytest.raises(E.HeaderAlteredError, match="altered"):
            open_store(str(root), s)
    # any other field edited in place fails the same way
    header = json.loads(json.dumps(before))
    header["chunk_size"] = 4096
    (root / "dcmfs.store").write_text(json.dumps(header))
    with pytest.raises(E.HeaderAlteredError):
        open_store(str(root), PW1)


def test_a_slot_moved_to_another_store_does_not_open(tmp_path, three):
    root, key, files = three
    other = tmp_path / "other"
    init_store(str(other), PW1, SMALL)
    header = json.loads((other / "dcmfs.store").read_text())
    header["slots"] = [json.loads((root / "dcmfs.store").read_text())["slots"][2]]
    header["next_slot"] = 4
    (other / "dcmfs.store").write_text(json.dumps(header))
    with pytest.raises(E.WrongKeyError):
        open_store(str(other), key)


def test_failed_unlocks_are_logged_with_the_slot_kind_only(three, caplog):
    root, key, files = three
    bad = Secret("passphrase", b"CANARY-guessed-passphrase")
    with pytest.raises(E.WrongKeyError):
        open_store(str(root), bad)
    with pytest.raises(E.WrongKeyError):
        open_store(str(root), Secret("keyfile", b"K" * 32))
    lines = [r.getMessage() for r in caplog.records if "unlock failed" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "2 passphrase slot(s)" in lines[0] and "1 keyfile/credential slot(s)" in lines[1]
    assert not any("CANARY" in r.getMessage() or "KKKK" in r.getMessage()
                   for r in caplog.records)


# --- crash safety: a SIGKILL at each step ----------------------------------------------
CRASH = textwrap.dedent("""
    import os, signal, sys
    from dcmfs.storage import keyring
    from dcmfs.storage.header import Secret
    root, op, at = sys.argv[1:4]
    pw1 = Secret("passphrase", b"first admin's passphrase")
    new = Secret("keyfile", bytes(range(32)))
    kdf = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
    def step(name):
        if name == at:
            os.kill(os.getpid(), signal.SIGKILL)
    if op == "add":
        keyring.add_slot(root, pw1, new, "new", kdf, step=step)
    elif op == "remove":
        keyring.remove_slot(root, pw1, 2, step=step)
    else:
        keyring.change_slot(root, pw1, 2, new, None, kdf, step=step)
""")


@pytest.mark.parametrize("at", ["written", "synced", "renamed", "done"])
@pytest.mark.parametrize("op", ["add", "remove", "change"])
def test_sigkill_at_each_step_leaves_the_old_or_the_new_slot_set(three, op, at):
    root, key, files = three
    before = [s["id"] for s in read_header(str(root))["slots"]]
    r = subprocess.run([sys.executable, "-c", CRASH, str(root), op, at], capture_output=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    header = read_header(str(root))
    ids = [s["id"] for s in header["slots"]]
    new = Secret("keyfile", bytes(range(32)))
    kinds2 = {s["kind"] for s in header["slots"] if s["id"] == 2}
    if at == "written" or at == "synced":  # the rename had not happened: the old set
        assert ids == before and kinds2 == {"passphrase"}
    else:  # renamed: the new set (durable at "done", and visible at once)
        assert ids == {"add": before + [4], "remove": [1, 3], "change": before}[op]
    # a store that opens and holds every file, with the authorising key and
    # with the new one if the change landed
    read_all(root, PW1, files)
    if ids != before or kinds2 == {"keyfile"}:
        if op != "remove":
            read_all(root, new, files)
    leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert len(leftovers) <= 1  # an interrupted temp file is harmless, never read
    keyring.add_slot(str(root), PW1, Secret("passphrase", b"after the crash"), "later", KDF)
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # the next one cleans


# --- older formats: the single wrap becomes slot 1 ------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_a_single_wrap_header_becomes_a_slot_table(tmp_path, version):
    with open(os.path.join(COMPAT, version, "manifest.json")) as f:
        manifest = json.load(f)
    root = tmp_path / "store"
    shutil.copytree(os.path.join(COMPAT, version, "store"), root)
    old = Secret("passphrase", manifest["passphrase"].encode())
    assert "key" in read_header(str(root))
    assert keyring.list_slots(str(root))[0]["kind"] == "passphrase"
    keyring.add_slot(str(root), old, PW2, "bob", KDF)
    header = read_header(str(root))
    assert "key" not in header and "key-slots-v1" in header["features"]
    assert [(s["id"], s["label"]) for s in header["slots"]] == [(1, "initial"), (2, "bob")]
    assert open_store(str(root), old).master_key == open_store(str(root), PW2).master_key
    check_manifest(root, PW2, manifest)


# --- through the command line and a real mount ----------------------------------------
def _private(path, data: bytes):
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_key_commands_while_mounted(mount_env, tmp_path):
    m = mount_env
    pw = _private(tmp_path / "pw", b"a passphrase for carol\n")
    m.mount()
    data = os.urandom(300_000)
    (m.mnt / "before.bin").write_bytes(data)
    r = m.cli("key", "add", m.store, "--label", "carol", "--key-file", m.key,
              "--new-passphrase-file", pw)
    assert r.returncode == 0 and "Added key slot 2" in r.stdout, r.stderr
    r = m.cli("key", "add", m.store, "--label", "kms", "--passphrase-file", pw,
              "--new-key-command", f"{sys.executable} -c \"print('7' * 64)\"")
    assert r.returncode == 0, r.stderr
    (m.mnt / "after.bin").write_bytes(data[::-1])  # the mount goes on meanwhile
    r = m.cli("key", "remove", m.store, "1", "--key-file", m.key)
    assert r.returncode == 0, r.stderr
    r = m.cli("key", "list", m.store, "--json")
    assert [(s["id"], s["kind"], s["label"]) for s in json.loads(r.stdout)["slots"]] == [
        (2, "passphrase", "carol"), (3, "command", "kms")]
    r = m.cli("key", "remove", m.store, "3", "--passphrase-file", pw)
    r = m.cli("key", "remove", m.store, "2", "--passphrase-file", pw)
    assert r.returncode == E.KeySlotError.exit_code == 36, r.stderr
    assert r.stderr.startswith("dcmfs: ") and r.stderr.count("\n") == 1, r.stderr
    m.umount()
    r = m.mount(check=False)  # the removed key file no longer opens it
    assert r.returncode == E.WrongKeyError.exit_code, r.stderr
    r = m.cli("mount", m.store, m.mnt, "--passphrase-file", pw)
    assert r.returncode == 0, r.stderr
    assert file_sha256(m.mnt / "before.bin") == sha256(data)
    assert file_sha256(m.mnt / "after.bin") == sha256(data[::-1])
    m.umount()
    log = m.log()
    assert "slot 2 (passphrase, label 'carol') added" in log
    assert "slot 1 (keyfile, label 'initial') removed" in log
    assert "unlock failed: a key file opened none of the store's 0 keyfile/credential" in log
    assert "a passphrase for carol" not in log and m.key.read_bytes().hex() not in log


def test_key_command_and_credential_slots_mount(mount_env, tmp_path):
    m = mount_env
    creds = tmp_path / "creds"
    creds.mkdir()
    _private(creds / "dcmfs.key", os.urandom(32))
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    r = m.cli("key", "add", m.store, "--label", "unit", "--key-file", m.key,
              "--new-credential", "dcmfs.key", env=env)
    assert r.returncode == 0, r.stderr
    cmd = f"{sys.executable} -c \"print('k' * 40)\""
    r = m.cli("key", "add", m.store, "--label", "vault", "--credential", "dcmfs.key",
              "--new-key-command", cmd, env=env)
    assert r.returncode == 0, r.stderr
    for how in (["--credential", "dcmfs.key"], ["--key-command", cmd]):
        r = m.cli("mount", m.store, m.mnt, *how, env=env)
        assert r.returncode == 0, r.stderr
        (m.mnt / f"f{len(how[1])}").write_bytes(b"x" * 1000)
        m.umount()
    r = m.cli("mount", m.store, m.mnt, "--key-command", "false")
    assert r.returncode == E.SecretError.exit_code and "failed" in r.stderr, r.stderr
    short = f"{sys.executable} -c \"print('short')\""
    r = m.cli("mount", m.store, m.mnt, "--key-command", short)
    assert r.returncode == E.SecretError.exit_code and "fewer than 32" in r.stderr, r.stderr
    r = m.cli("mount", m.store, m.mnt, "--credential", "../etc/passwd", env=env)
    assert r.returncode == E.SecretError.exit_code, r.stderr


def test_an_instance_file_names_a_key_command(tmp_path):
    m = Mount(tmp_path)
    script = tmp_path / "kms-key"
    script.write_text(f"#!{sys.executable}\nprint('c' * 48)\n")
    script.chmod(0o700)
    toml = tmp_path / "pacs.toml"
    toml.write_text(f'store = "{m.store}"\nmountpoint = "{m.mnt}"\n'
                    f'[key]\ncommand = "{script} --site pacs"\n')
    try:
        r = m.cli("init", "--config", toml)
        assert r.returncode == 0, r.stderr
        assert [s["kind"] for s in keyring.list_slots(str(m.store))] == ["command"]
        r = m.cli("mount", "--config", toml)
        assert r.returncode == 0, r.stderr
        (m.mnt / "a").write_bytes(b"through a key command")
        m.umount()
        assert open_store(str(m.store), Secret("command", b"c" * 48)).master_key
    finally:
        m.cleanup()


@pytest.mark.parametrize("at", ["written", "renamed"])
def test_sigkill_while_an_old_header_becomes_a_slot_table(tmp_path, at):
    """The upgrade and the new slot are one replace: old header or both."""
    with open(os.path.join(COMPAT, "v3", "manifest.json")) as f:
        manifest = json.load(f)
    root = tmp_path / "store"
    shutil.copytree(os.path.join(COMPAT, "v3", "store"), root)
    script = CRASH.replace("first admin's passphrase", manifest["passphrase"])
    r = subprocess.run([sys.executable, "-c", script, str(root), "add", at],
                       capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    header = read_header(str(root))
    old = Secret("passphrase", manifest["passphrase"].encode())
    if at == "written":
        assert "key" in header and "slots" not in header
    else:
        assert [s["id"] for s in header["slots"]] == [1, 2]
        assert (open_store(str(root), Secret("keyfile", bytes(range(32)))).master_key
                == open_store(str(root), old).master_key)
    check_manifest(root, old, manifest, for_writing=True)
    assert "slots" in read_header(str(root))


def test_concurrent_key_commands_lose_no_slot(three):
    """Two commands at once: the header lock serialises them, each reads the
    header the other wrote."""
    root, key, files = three
    add = textwrap.dedent("""
        import sys
        from dcmfs.storage import keyring
        from dcmfs.storage.header import Secret
        kdf = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
        for i in range(5):
            keyring.add_slot(sys.argv[1], Secret("passphrase", b"first admin's passphrase"),
                             Secret("passphrase", f"{sys.argv[2]}-{i}".encode()),
                             f"{sys.argv[2]}-{i}", kdf)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", add, str(root), name])
             for name in ("x", "y")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    labels = sorted(r["label"] for r in keyring.list_slots(str(root)))
    assert labels == sorted(["alice", "bob", "boot"] + [f"{n}-{i}" for n in "xy"
                                                        for i in range(5)])
    assert open_store(str(root), Secret("passphrase", b"y-4")).master_key == \
        open_store(str(root), key).master_key


@pytest.mark.parametrize("damage", [
    lambda h: h["slots"][0].update(public=7),
    lambda h: h["epochs"][0]["sealed"].update({"1": ["not", "hex"]}),
    lambda h: h.update(epoch=5),
    lambda h: h.update(slots=[]),
    lambda h: h["slots"].append(dict(h["slots"][0])),  # the same id twice
])
def test_a_malformed_slot_table_is_refused_in_one_sentence(tmp_path, damage):
    init_store(str(tmp_path / "s"), PW1, SMALL)
    path = tmp_path / "s" / "dcmfs.store"
    header = json.loads(path.read_text())
    damage(header)
    path.write_text(json.dumps(header))
    with pytest.raises(E.ForeignStoreError, match="no valid key slot table"):
        open_store(str(tmp_path / "s"), PW1)
