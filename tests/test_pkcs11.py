"""A PKCS#11 key slot (issue 18) against SoftHSM2, a real PKCS#11 module:
the token is set up by the test in a temp dir (SOFTHSM2_CONF); the master key
is sealed by a non-extractable AES key generated inside it; the PIN comes
like any other secret."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dcmfs import errors as E

from .conftest import Mount, file_sha256, sha256

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "dcmfs-test"
KEY = "dcmfs-master"
PIN = "1234-pin"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(MODULE) or shutil.which("softhsm2-util") is None,
                       reason="SoftHSM2 is not installed (apt-get install softhsm2; "
                       "./scripts/test installs it)"),
]


@pytest.fixture
def token(tmp_path):
    """A fresh SoftHSM2 token of our own; the environment that finds it."""
    pytest.importorskip("pkcs11", reason="python-pkcs11 is missing (the 'pkcs11' extra)")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin",
                    "so-87654321", "--pin", PIN], env=env, check=True, capture_output=True)
    pin = tmp_path / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    return env, pin, tokens


def test_a_pkcs11_slot_mounts_the_store(tmp_path, token):
    env, pin, tokens = token
    m = Mount(tmp_path)
    try:
        m.init()
        r = m.cli("key", "add", m.store, "--label", "hsm", "--key-file", m.key,
                  "--new-pkcs11-module", MODULE, "--new-pkcs11-token", TOKEN,
                  "--new-pkcs11-key", KEY, "--new-passphrase-file", pin, env=env)
        assert r.returncode == 0 and "Added key slot 2 (pkcs11" in r.stdout, r.stderr
        header = json.loads((m.store / "dcmfs.store").read_text())
        slot = header["slots"][1]
        assert (slot["kind"], slot["token"], slot["key_label"]) == ("pkcs11", TOKEN, KEY)
        assert "module" not in slot and PIN not in json.dumps(header)
        # the token now holds the only way in: the key file's slot goes
        hsm = ["--pkcs11-module", MODULE, "--passphrase-file", pin]
        r = m.cli("key", "remove", m.store, "1", *hsm, env=env)
        assert r.returncode == 0, r.stderr
        data = os.urandom(500_000)
        r = m.cli("mount", m.store, m.mnt, *hsm, env=env)
        assert r.returncode == 0, r.stderr
        (m.mnt / "scan.bin").write_bytes(data)
        m.umount()
        r = m.cli("mount", m.store, m.mnt, *hsm, env=env)
        assert r.returncode == 0, r.stderr
        assert file_sha256(m.mnt / "scan.bin") == sha256(data)
        m.umount()
        # a wrong PIN: one sentence, exit 16, an audit line without the PIN
        bad = tmp_path / "badpin"
        bad.write_text("9999\n")
        bad.chmod(0o600)
        r = m.cli("mount", m.store, m.mnt, "--pkcs11-module", MODULE, "--passphrase-file", bad,
                  env=env)
        assert r.returncode == E.SecretError.exit_code, r.stderr
        assert "PIN" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "unlock failed: a PKCS#11 token could not be used for slot 2" in m.log()
        assert "9999" not in m.log() and PIN not in m.log()
        # the header and the PIN without the token open nothing
        shutil.rmtree(tokens)
        tokens.mkdir()
        r = m.cli("mount", m.store, m.mnt, *hsm, env=env)
        assert r.returncode == E.SecretError.exit_code, r.stderr
        assert not m.is_mounted()
    finally:
        m.cleanup()


def test_the_token_key_is_generated_inside_and_never_extractable(tmp_path, token):
    env, pin, tokens = token
    m = Mount(tmp_path)
    m.init()
    r = m.cli("key", "add", m.store, "--label", "hsm", "--key-file", m.key,
              "--new-pkcs11-module", MODULE, "--new-pkcs11-token", TOKEN,
              "--new-pkcs11-key", KEY, "--new-passphrase-file", pin, env=env)
    assert r.returncode == 0, r.stderr
    # asked in a process of its own: SoftHSM2 reads SOFTHSM2_CONF once per process
    probe = f"""
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
tok = pkcs11.lib({MODULE!r}).get_token(token_label={TOKEN!r})
with tok.open(user_pin={PIN!r}) as s:
    k = s.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label={KEY!r})
    print(k[Attribute.EXTRACTABLE], k[Attribute.SENSITIVE], k[Attribute.VALUE_LEN])
    try:
        k[Attribute.VALUE]
        print("readable")
    except pkcs11.exceptions.PKCS11Error:
        print("sealed")
"""
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["False", "True", "32", "sealed"], out.stderr
