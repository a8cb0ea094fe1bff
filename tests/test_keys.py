"""Keys and secrets (issue 15, the small ones): the store header's Argon2id
parameters are bounded before they are used; key files, passphrases and
their sources follow one set of rules (docs/cli.md, "Secrets")."""

from __future__ import annotations

import json
import os
import time

import pytest

from dcmfs import errors as E
from dcmfs.storage.header import Secret, init_store, open_store

from .conftest import SMALL, Mount


# --- Argon2id parameters --------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"memory_kib": 16 * 1024 * 1024, "iterations": 1, "lanes": 1},   # 16 GiB: would hang
    {"memory_kib": 1024, "iterations": 1_000_000, "lanes": 1},
    {"memory_kib": 1024, "iterations": 1, "lanes": 1000},
    {"memory_kib": 1024, "iterations": 0, "lanes": 1},
    {"memory_kib": "1024", "iterations": 1, "lanes": 1},
    {"memory_kib": 1024, "iterations": True, "lanes": 1},
    {"memory_kib": 1024, "iterations": 1},
])
def test_inflated_argon2id_parameters_are_refused_before_use(tmp_path, params):
    pw = Secret("passphrase", b"correct horse")
    init_store(str(tmp_path / "s"), pw, SMALL)
    path = tmp_path / "s" / "dcmfs.store"
    header = json.loads(path.read_text())
    header["key"]["argon2id"] = params
    path.write_text(json.dumps(header))
    t0 = time.monotonic()
    with pytest.raises(E.KdfBoundsError, match="restore the header"):
        open_store(str(tmp_path / "s"), pw)
    assert time.monotonic() - t0 < 1  # refused, not derived


def test_inflated_argon2id_parameters_exit_26_from_verify(tmp_path):
    m = Mount(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    pw.chmod(0o600)
    m.cli("init", m.store, "--passphrase-file", pw, check=True)
    path = m.store / "dcmfs.store"
    header = json.loads(path.read_text())
    header["key"]["argon2id"]["memory_kib"] = 16 * 1024 * 1024
    path.write_text(json.dumps(header))
    r = m.cli("verify", m.store, "--passphrase-file", pw, timeout=30)
    assert r.returncode == E.KdfBoundsError.exit_code == 26, r.stderr
    assert r.stderr.startswith("dcmfs: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Argon2id" in r.stderr and "Traceback" not in r.stderr


def test_init_writes_only_parameters_within_bounds(tmp_path):
    from dcmfs.config import Config, KdfParams, kdf_within_bounds
    import dataclasses
    assert kdf_within_bounds(dataclasses.asdict(KdfParams()))
    with pytest.raises(ValueError):
        init_store(str(tmp_path / "s"), Secret("passphrase", b"pw"),
                   Config(kdf=KdfParams(memory_kib=8 * 1024 * 1024)))
