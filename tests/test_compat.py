"""Format stability (gocryptfs keeps a sample filesystem per version): every
frozen store under tests/compat/ - one per released format version, made by
tests/compat/make_store.py - must open, read back exactly and verify clean
with this dcmfs, read-only and after a read-write opening."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil

import pytest

from dcmfs.app import admin
from dcmfs.storage import codec
from dcmfs.config import Config
from dcmfs.core.filesystem import FileSystem
from dcmfs.format import CHUNK_FLAG_FRAMED, CHUNK_FLAG_INLINE, WRITE_FEATURES
from dcmfs.storage.header import Secret, StoreLock, open_store
from dcmfs.integrity.verify import Verifier

from .conftest import sha256

COMPAT = pathlib.Path(__file__).resolve().parent / "compat"
VERSIONS = sorted(p for p in COMPAT.iterdir() if (p / "manifest.json").exists())


def test_there_is_a_frozen_store_for_the_current_format():
    from dcmfs.format import FORMAT_VERSION
    assert (COMPAT / f"v{FORMAT_VERSION}" / "manifest.json").exists()


def test_the_format_document_names_the_current_version():
    from dcmfs.format import FORMAT_VERSION
    doc = (COMPAT.parent.parent / "docs" / "format.md").read_text()
    assert doc.splitlines()[0] == f"# dcmfs store format, version {FORMAT_VERSION}"
    assert f"version {FORMAT_VERSION} released" in doc


def read(fs, path) -> bytes:
    fh = fs.open(path, os.O_RDONLY)
    try:
        return fs.read(fh, 1 << 30, 0)
    finally:
        fs.release(fh)


def check(fs, manifest) -> None:
    for path, digest in manifest["files"].items():
        assert sha256(read(fs, path)) == digest, path
    a, b = manifest["hardlink"]
    assert fs.getattr(a)["st_ino"] == fs.getattr(b)["st_ino"]
    assert fs.getattr(a)["st_nlink"] == 2
    link, target = manifest["symlink"]
    assert fs.readlink(link) == target
    path, name, value = manifest["xattr"]
    assert fs.getxattr(path, name) == value.encode()
    path, mtime = manifest["mtime_ns"]
    assert fs.getattr(path)["st_mtime"] == mtime
    coded = manifest.get("image") or {manifest["jpegls"]: "jpegls"}  # (v1, v2: only JPEG-LS)
    for path, name in coded.items():  # the DICOM-coded layouts are really read
        with fs.lock, fs.index.begin() as txn:
            table = txn.chunks(fs._resolve(txn, path))
        assert any(r.codec == codec.NAMES[name] and r.offset >= 0 for r in table.values()), path
    v = Verifier(fs.index, fs.objects, fs.data.chunk_size, fs._lock)
    try:
        report = v.run(v.files())
        assert report.findings == [] and report.files == len(manifest["files"])
        assert v.orphan_objects() == []
    finally:
        v.close()


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: p.name)
def test_frozen_store_opens_reads_and_verifies(tmp_path, version):
    manifest = json.loads((version / "manifest.json").read_text())
    root = tmp_path / "store"
    shutil.copytree(version / "store", root)  # never change the committed copy
    secret = Secret("passphrase", manifest["passphrase"].encode())
    cfg = Config(chunk_size=manifest["chunk_size"], checkpoint_interval=0)
    fs = FileSystem(open_store(str(root), secret), dataclasses.replace(cfg, read_only=True))
    try:
        check(fs, manifest)
    finally:
        fs.close()
    header = json.loads((root / "dcmfs.store").read_text())
    before = set(header["features"])
    gen = manifest.get("key_generation")  # v6 on: the index under epoch 1, epoch 0 gone
    if gen is not None:
        assert header["master"] == gen["master"] and fs.index.generation == gen["master"]
        assert [d["epoch"] for d in header["destroyed"]] == gen["destroyed"]
        assert [e["epoch"] for e in header["epochs"]] == gen["epochs"]
    if version.name in ("v1", "v2"):  # made before the image codecs 4-6
        assert not WRITE_FEATURES <= before
        lock = StoreLock(str(root))  # in use: the header is left alone
        try:
            open_store(str(root), secret, for_writing=True)
        finally:
            lock.release()
        assert set(json.loads((root / "dcmfs.store").read_text())["features"]) == before
    # read-write: new objects are new; the header first gains what this
    # dcmfs may write (an older dcmfs then refuses the store in one sentence)
    fs = FileSystem(open_store(str(root), secret, for_writing=True), cfg)
    after = set(json.loads((root / "dcmfs.store").read_text())["features"])
    assert after == before | WRITE_FEATURES
    try:
        # the index gains its sealed checksum, the journal the GCM-SIV layout
        assert fs.index.auth_state == "ok" and fs.index.journal.version == 2
        # v5 on: what a write-only mount left in the inbox is imported now
        inbox = manifest.pop("inbox", {})
        assert fs.imported["imported"] == len(inbox), fs.imported
        manifest["files"].update(inbox)
        check(fs, manifest)
        if "framed-chunks-v1" in before:  # v7 on: the store holds framed objects
            with fs.lock, fs.index.begin() as txn:
                refs = txn.chunks(fs._resolve(txn, "/dir/text.txt"))
            assert any(r.flags & CHUNK_FLAG_FRAMED for r in refs.values())
        if "inline-small-v1" in before:  # v8 on: small chunks' objects in the index
            with fs.lock, fs.index.begin() as txn:
                refs = txn.chunks(fs._resolve(txn, "/dir/inline-tail.bin"))
                small = txn.chunks(fs._resolve(txn, "/small.txt"))
            assert [bool(refs[i].flags & CHUNK_FLAG_INLINE) for i in sorted(refs)] == \
                [False, True]
            assert small[0].flags & CHUNK_FLAG_INLINE
        fh = fs.create("/new.bin", 0o600, os.O_WRONLY, 0, 0)
        fs.write(fh, b"written by this dcmfs" * 5000, 0)
        fs.release(fh)
        fh = fs.create("/new-small.bin", 0o600, os.O_WRONLY, 0, 0)
        fs.write(fh, b"small" * 100, 0)
        fs.release(fh)
        manifest["files"]["/new-small.bin"] = sha256(b"small" * 100)
        with fs.lock, fs.index.begin() as txn:  # every store upgraded writes inline objects
            (ref,) = txn.chunks(fs._resolve(txn, "/new-small.bin")).values()
        assert ref.flags & CHUNK_FLAG_INLINE
        manifest["files"]["/new.bin"] = sha256(b"written by this dcmfs" * 5000)
        # a file of the old version changed in place: its unchanged chunks
        # gain their digests, its inode the tree digest (the lazy upgrade)
        path = "/dir/sub/multi.bin"
        old = read(fs, path)
        fh = fs.open(path, os.O_WRONLY)
        fs.write(fh, b"changed", len(old) // 2)
        fs.release(fh)
        new = old[:len(old) // 2] + b"changed" + old[len(old) // 2 + 7:]
        manifest["files"][path] = sha256(new)
        with fs.lock, fs.index.begin() as txn:
            ino = fs._resolve(txn, path)
            assert txn.get_inode(ino).tree
            assert all(r.digest is not None for r in txn.chunks(ino).values())
            # file-secrets-v1: a file of a version before 5 keeps its key (no
            # secret), a new one gets a secret (crypto-shredding)
            made_with_secrets = "file-secrets-v1" in before  # v5 on
            assert len(txn.get_inode(ino).secret) == (32 if made_with_secrets else 0)
            assert len(txn.get_inode(fs._resolve(txn, "/new.bin")).secret) == 32
    finally:
        fs.close()
    result = admin.fsck(str(root), lambda: secret, cfg, repair=False, rebuild=False,
                        out=io.StringIO())
    assert result["clean"], result
    fs = FileSystem(open_store(str(root), secret), dataclasses.replace(cfg, read_only=True))
    try:
        check(fs, manifest)
    finally:
        fs.close()
