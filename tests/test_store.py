"""Store creation, keys, format versions and refusals."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dcmfs import errors as E
from dcmfs.storage.header import Secret, init_store, open_store, read_header

from .conftest import SMALL


def test_wrong_key_is_refused(tmp_path, secret):
    init_store(str(tmp_path / "s"), secret, SMALL)
    with pytest.raises(E.WrongKeyError):
        open_store(str(tmp_path / "s"), Secret("keyfile", os.urandom(32)))
    with pytest.raises(E.WrongKeyError):
        open_store(str(tmp_path / "s"), Secret("passphrase", b"guess"))


def test_passphrase_store(tmp_path):
    init_store(str(tmp_path / "s"), Secret("passphrase", b"correct horse"), SMALL)
    header = read_header(str(tmp_path / "s"))
    assert header["slots"][0]["argon2id"]["memory_kib"] == SMALL.kdf.memory_kib
    assert open_store(str(tmp_path / "s"), Secret("passphrase", b"correct horse"))
    with pytest.raises(E.WrongKeyError):
        open_store(str(tmp_path / "s"), Secret("passphrase", b"correct horsE"))


def test_tampered_header_parameters_do_not_open(tmp_path, secret):
    init_store(str(tmp_path / "s"), secret, SMALL)
    path = tmp_path / "s" / "dcmfs.store"
    header = json.loads(path.read_text())
    header["chunk_size"] = 4096
    path.write_text(json.dumps(header))
    with pytest.raises(E.WrongKeyError):
        open_store(str(tmp_path / "s"), secret)


def test_missing_foreign_newer_and_unknown_feature(tmp_path, secret):
    with pytest.raises(E.StoreMissingError):
        open_store(str(tmp_path / "none"), secret)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("hi")
    with pytest.raises(E.ForeignStoreError):
        open_store(str(tmp_path / "foreign"), secret)
    init_store(str(tmp_path / "s"), secret, SMALL)
    path = tmp_path / "s" / "dcmfs.store"
    original = path.read_text()
    header = json.loads(original)
    path.write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(E.UnsupportedFormatError, match="99"):
        open_store(str(tmp_path / "s"), secret)
    path.write_text(json.dumps({**header, "features": header["features"] + ["time-travel"]}))
    with pytest.raises(E.UnsupportedFormatError, match="time-travel"):
        open_store(str(tmp_path / "s"), secret)


def test_init_refuses_non_empty_and_sets_safe_modes(tmp_path, secret):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(E.StoreNotEmptyError):
        init_store(str(tmp_path / "full"), secret, SMALL)
    init_store(str(tmp_path / "s"), secret, SMALL)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "dcmfs.store").st_mode) == 0o600


def test_every_error_has_a_distinct_exit_code():
    import inspect
    classes = [c for _, c in inspect.getmembers(E, inspect.isclass)
               if issubclass(c, E.DcmfsError) and not issubclass(c, E.FsError)]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), sorted(zip(codes, [c.__name__ for c in classes]))
    assert all(c.__doc__ for c in classes)


@pytest.mark.parametrize("into", [True, False])
def test_gcm_seal_after_is_the_head_then_what_seal_gives(monkeypatch, into):
    """Objects are sealed into one buffer (encrypt_into, or a join with a
    cryptography that lacks it): the head, then a blob that opens like one
    from seal, under the same associated data only."""
    from dcmfs.storage import crypto
    monkeypatch.setattr(crypto, "_INTO", into and crypto._INTO)
    gcm = crypto.Gcm(os.urandom(32))
    head, plain = b"HEAD-and-context", os.urandom(300_001)
    out = gcm.seal_after(head, plain, b"aad")
    assert out[:len(head)] == head
    assert len(out) == len(head) + crypto.NONCE_LEN + len(plain) + crypto.TAG_LEN
    assert gcm.open(out[len(head):], b"aad") == plain
    with pytest.raises(crypto.AuthenticationFailed):
        gcm.open(out[len(head):], b"other")


def test_digester_hashes_long_blocks_on_its_thread_and_ends_it_at_close():
    """A chunk's SHA-256 is taken on the digest thread while the chunk is
    sealed (issue 17); the result is the same as hashing in place, and
    close leaves no thread behind."""
    import threading
    from dcmfs.storage.digest import Digester, block_digest
    digests = Digester()
    short, long_ = os.urandom(Digester.APART - 1), os.urandom(Digester.APART)
    assert digests.later(short)() == block_digest(short)
    assert not any(t.name.startswith("dcmfs-digest") for t in threading.enumerate())
    assert digests.later(long_)() == block_digest(long_)
    assert any(t.name.startswith("dcmfs-digest") for t in threading.enumerate())
    digests.close()
    assert not any(t.name.startswith("dcmfs-digest") for t in threading.enumerate())


def test_digester_hashes_in_place_while_another_caller_seals():
    """With two callers at work at once no core is free for the digest
    thread: the second hashes in place (no hand-off); alone again, the
    digest thread is used."""
    import threading
    from dcmfs.storage.digest import Digester, block_digest
    digests = Digester()
    block = os.urandom(Digester.APART)
    try:
        with digests.sealing(), digests.sealing():
            assert digests.later(block)() == block_digest(block)
        assert not any(t.name.startswith("dcmfs-digest") for t in threading.enumerate())
        with digests.sealing():
            assert digests.later(block)() == block_digest(block)
        assert any(t.name.startswith("dcmfs-digest") for t in threading.enumerate())
    finally:
        digests.close()
