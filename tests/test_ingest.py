"""Write-only ingest (issue 18): a mount holding only the store's recipient
public key writes files it cannot read back; a key holder imports them."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pathlib
import subprocess
import time

import pydicom
import pytest

from dcmfs.config import Config
from dcmfs.core.filesystem import FileSystem
from dcmfs.core.ingest import IngestFS
from dcmfs.errors import PermissionDenied
from dcmfs.storage import inbox, keyring
from dcmfs.storage.header import open_store

from .conftest import SMALL, ct_file, flip_byte


def make_series(dst: pathlib.Path, n: int) -> list[pathlib.Path]:
    """A CT series: one real CT slice with new UIDs per instance."""
    ds = pydicom.dcmread(ct_file())
    series = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        p = dst / f"CT{i:05d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def ingest_write(ing: IngestFS, path: str, data: bytes, piece: int = 131072) -> None:
    fh = ing.create(path, 0o640, os.O_WRONLY, 0, 0)
    for off in range(0, len(data), piece):
        ing.write(fh, data[off:off + piece], off)
    ing.release(fh)


def read_all(fs: FileSystem, path: str) -> bytes:
    fh = fs.open(path, os.O_RDONLY)
    try:
        return fs.read(fh, fs.getattr(path)["st_size"] + 1, 0)
    finally:
        fs.release(fh)


def session_dirs(root) -> list[pathlib.Path]:
    return [pathlib.Path(p) for _, p in inbox.sessions(str(root))]


@pytest.mark.parametrize("kind", [None, "rsa-oaep-3072"])
def test_core_ingest_is_imported_byte_exact_and_unreadable_before(make_fs, secret, tmp_path,
                                                                  kind):
    fs = make_fs()
    fh = fs.create("/existing.dcm", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, b"old data", 0)
    fs.release(fh)
    fs.close()
    root = make_fs.root
    rcp = keyring.recipient(str(root), secret, kind)
    assert rcp.kind == (kind or "x25519")
    files = {f"/in/{p.name}": p.read_bytes() for p in make_series(tmp_path, 3)}
    files["/in/big-file-of-doe"] = os.urandom(3 * SMALL.chunk_size + 17)  # several chunks
    files["/empty-file-of-doe"] = b""  # names long enough never to occur by chance
    ing = IngestFS(str(root), rcp, Config())
    ing.mkdir("/in", 0o755, 0, 0)
    for path, data in files.items():
        ingest_write(ing, path, data)
    # the ingest node sees what it made, never the store's other files
    assert sorted(n for n, _ in ing.readdir("/")) == ["empty-file-of-doe", "in"]
    assert ing.getattr("/in/big-file-of-doe")["st_size"] == len(files["/in/big-file-of-doe"])
    for path in files:
        with pytest.raises(PermissionDenied):
            ing.open(path, os.O_RDONLY)
        with pytest.raises(PermissionDenied):
            ing.open(path, os.O_WRONLY)
    ing.close()
    unplaced = root / "inbox" / ("." + "ab" * 16)  # a mount that died before it was up
    unplaced.mkdir()
    (unplaced / "lock").touch()
    # nothing of a name or of the contents is in the inbox
    blobs = b"".join(p.read_bytes() for d in session_dirs(root) for p in d.iterdir())
    for path, data in files.items():
        assert os.path.basename(path).encode() not in blobs
        if data:
            assert data[200:264] not in blobs
    fs = make_fs()
    assert fs.imported["imported"] == len(files)
    for path, data in files.items():
        assert read_all(fs, path) == data
    assert read_all(fs, "/existing.dcm") == b"old data"
    assert fs.getattr("/in/big-file-of-doe")["st_mode"] & 0o777 == 0o640
    assert session_dirs(root) == []  # imported, removed
    assert list((root / "inbox").iterdir()) == []


def test_a_record_written_twice_is_imported_once_and_a_name_is_never_overwritten(
        make_fs, secret):
    fs = make_fs()
    fh = fs.create("/a", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, b"the store's own a", 0)
    fs.release(fh)
    fs.close()
    rcp = keyring.recipient(str(make_fs.root), secret)
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/tmpname", b"ingested a")
    ing.rename("/tmpname", "/a")  # a closed file renamed: its record written again
    ingest_write(ing, "/b", b"ingested b")
    ing.close()
    sdir = session_dirs(make_fs.root)[0]
    assert len(list(sdir.glob("*.rec"))) == 2
    fs = make_fs()
    assert read_all(fs, "/a") == b"the store's own a"
    assert read_all(fs, "/a.ingest-1") == b"ingested a"
    # a crash after the files were imported, before the records went: the
    # same records again import nothing new
    fs.close()
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/b", b"ingested b")
    ing.close()
    fs = make_fs()
    assert sorted(n for n, _ in fs.readdir("/")) == ["a", "a.ingest-1", "b"]
    assert read_all(fs, "/b") == b"ingested b"


def test_a_taken_name_at_name_max_is_imported_under_a_shortened_name(make_fs, secret):
    """A 255-byte name that is taken cannot take ``.ingest-N`` on top: the
    stem is shortened (whole characters) to leave room, and the record is
    imported once, not refused at every round."""
    long_name = "é" * 120 + "x" * 15  # 255 bytes in UTF-8
    assert len(long_name.encode()) == 255
    fs = make_fs()
    fh = fs.create("/" + long_name, 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, b"the store's own", 0)
    fs.release(fh)
    fs.close()
    rcp = keyring.recipient(str(make_fs.root), secret)
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/" + long_name, b"ingested")
    ing.close()
    fs = make_fs()
    names = sorted(n for n, _ in fs.readdir("/"))
    assert len(names) == 2 and long_name in names
    other = next(n for n in names if n != long_name)
    assert other.endswith(".ingest-1") and len(other.encode()) <= 255
    assert long_name.startswith(other[:-len(".ingest-1")])
    assert read_all(fs, "/" + other) == b"ingested"
    assert session_dirs(make_fs.root) == []  # imported, not refused
    fs.close()
    fs = make_fs()  # a second opening imports nothing again
    assert sorted(n for n, _ in fs.readdir("/")) == names


def test_a_tampered_or_swapped_record_or_chunk_is_refused_and_the_others_imported(
        make_fs, secret, caplog):
    fs = make_fs()
    fs.close()
    rcp = keyring.recipient(str(make_fs.root), secret)
    ing = IngestFS(str(make_fs.root), rcp, Config())
    for name in ("alpha", "bravo", "charlie", "delta"):
        ingest_write(ing, "/" + name, name.encode() * 1000)
    records = {}
    for fid, seqs in inbox.records(ing.dir).items():
        records[fid] = pathlib.Path(ing.dir) / inbox.record_name(fid, seqs[-1])
    ing.close()
    (r1, r2, r3, _) = sorted(records.values())
    flip_byte(r1, 60)  # a record altered
    r2.write_bytes(r3.read_bytes())  # a record swapped for another file's
    objs = sorted(pathlib.Path(r1.parent).glob("*.obj"))
    caplog.set_level("ERROR", logger="dcmfs.ingest")
    fs = make_fs()
    assert fs.imported == {"imported": 2, "refused": 2, "sessions": 0}
    names = sorted(n for n, _ in fs.readdir("/"))
    assert len(names) == 2
    for n in names:
        assert read_all(fs, "/" + n) == n.encode() * 1000
    assert r1.exists() and r2.exists()  # left where they were, no data lost
    assert "fails authentication" in caplog.text
    assert not any(n in caplog.text for n in ("alpha", "bravo", "charlie", "delta"))
    fs.close()
    # a damaged chunk of a good record: refused, the record stays
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/g", b"g" * 5000)
    ing.close()
    sdir = pathlib.Path(ing.dir)
    fresh = [p for p in sdir.glob("*.obj") if p not in objs]
    flip_byte(fresh[0], 20)
    fs = make_fs()
    assert fs.imported["refused"] == 3 and "g" not in [n for n, _ in fs.readdir("/")]
    fs.close()
    # a chunk swapped for another file's (same session, same index)
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/h1", b"1" * 5000)
    ingest_write(ing, "/h2", b"2" * 5000)
    h1, h2 = (ing.root.children[n] for n in ("h1", "h2"))
    ing.close()
    sdir = pathlib.Path(ing.dir)
    (sdir / (h1.chunks[0][0] + ".obj")).write_bytes((sdir / (h2.chunks[0][0] + ".obj"))
                                                    .read_bytes())
    fs = make_fs()
    names = [n for n, _ in fs.readdir("/")]
    assert "h1" not in names and read_all(fs, "/h2") == b"2" * 5000
    assert fs.imported["refused"] == 4


def test_a_recipient_is_made_once_survives_slot_changes_and_rotation(make_fs, secret):
    from dcmfs.storage.header import Secret
    fs = make_fs()
    fs.close()
    root = str(make_fs.root)
    first = keyring.recipient(root, secret)
    assert keyring.recipient(root, secret) == first
    from dcmfs.errors import KeySlotError
    with pytest.raises(KeySlotError):
        keyring.recipient(root, secret, "rsa-oaep-3072")
    other = Secret("keyfile", os.urandom(32))
    keyring.add_slot(root, secret, other, "second", {})
    keyring.rotate(root, secret)
    keyring.remove_slot(root, secret, 1)
    ing = IngestFS(root, first, Config())
    ingest_write(ing, "/x", b"x" * 100)
    ing.close()
    store = open_store(root, other)
    assert store.ingest[0]["public"] == first.public.hex()
    fs = FileSystem(store, SMALL)
    try:
        assert read_all(fs, "/x") == b"x" * 100
    finally:
        fs.close()


def test_a_file_counts_as_closed_at_close_before_the_kernel_releases_it(make_fs, secret):
    fs = make_fs()
    fs.close()
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    fh = ing.create("/f", 0o600, os.O_WRONLY, 0, 0)
    ing.write(fh, b"abc", 0)
    with pytest.raises(PermissionDenied):
        ing.read(fh, 3, 0)
    second = ing.open("/f", os.O_WRONLY)  # still open: another writer may join
    ing.flush(second)
    ing.release(second)
    ing.flush(fh)  # close(2); the release comes later
    for flags in (os.O_WRONLY, os.O_RDONLY, os.O_RDWR):
        with pytest.raises(PermissionDenied):
            ing.open("/f", flags)
    with pytest.raises(PermissionDenied):
        ing.truncate("/f", 0)
    ing.release(fh)
    with pytest.raises(PermissionDenied):
        ing.open("/f", os.O_WRONLY)
    # bytes sealed already (a chunk behind the end) cannot be rewritten
    fh = ing.create("/g", 0o600, os.O_WRONLY, 0, 0)
    ing.write(fh, b"x" * (2 * ing.recipient.chunk_size + 1), 0)
    ing.write(fh, b"y", 2 * ing.recipient.chunk_size)  # the last chunk is not sealed yet
    with pytest.raises(PermissionDenied):
        ing.write(fh, b"y", 0)
    ing.release(fh)
    ing.close()


COMPAT = pathlib.Path(__file__).resolve().parent / "compat"


@pytest.mark.parametrize("version", sorted(p for p in COMPAT.iterdir()
                                           if (p / "manifest.json").exists()),
                         ids=lambda p: p.name)
def test_frozen_stores_get_a_recipient_and_import(tmp_path, version):
    import json
    import shutil
    from dcmfs.storage.header import Secret
    manifest = json.loads((version / "manifest.json").read_text())
    root = tmp_path / "store"
    shutil.copytree(version / "store", root)
    secret = Secret("passphrase", manifest["passphrase"].encode())
    rcp = keyring.recipient(str(root), secret)  # a single-wrap header becomes slots first
    assert rcp.chunk_size == manifest["chunk_size"]
    ing = IngestFS(str(root), rcp, Config())
    ingest_write(ing, "/ingested.bin", b"new" * 70000)
    ing.close()
    cfg = Config(chunk_size=manifest["chunk_size"], checkpoint_interval=0)
    fs = FileSystem(open_store(str(root), secret, for_writing=True), cfg)
    try:
        assert read_all(fs, "/ingested.bin") == b"new" * 70000
        path, digest = next(iter(manifest["files"].items()))
        assert hashlib.sha256(read_all(fs, path)).hexdigest() == digest
    finally:
        fs.close()


# --- a real write-only FUSE mount -----------------------------------------------------
def json_kind(path) -> str:
    import json
    return json.loads(pathlib.Path(path).read_text())["kind"]


def wait_sessions_free(root: pathlib.Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for d in session_dirs(root):
        while time.monotonic() < deadline:
            fd = os.open(d / "lock", os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
            finally:
                os.close(fd)
        else:
            raise AssertionError("the ingest daemon did not end")


@pytest.mark.parametrize("rsa", [False, True], ids=["x25519", "rsa"])
def test_write_only_mount_writes_a_ct_series_a_key_holder_reads_byte_exact(mount_env,
                                                                          tmp_path, rsa):
    m = mount_env
    m.mount()
    (m.mnt / "earlier.dcm").write_bytes(ct_file().read_bytes())
    m.umount()
    rcp = tmp_path / "recipient.json"
    r = m.cli("key", "recipient", m.store, "--key-file", m.key, "--export", rcp,
              *(["--rsa"] if rsa else []))
    assert r.returncode == 0, r.stderr
    assert json_kind(rcp) == ("rsa-oaep-3072" if rsa else "x25519")
    series = make_series(tmp_path, 12)
    r = m.cli("mount", m.store, m.mnt, "-o", f"recipient={rcp}")
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(m.mnt) == []  # the store's files are not shown
        dest = m.mnt / "study" / "series1"
        dest.mkdir(parents=True)
        for p in series:
            with open(dest / p.name, "wb") as f:
                f.write(p.read_bytes())
        assert sorted(os.listdir(dest)) == [p.name for p in series]
        for p in series:
            assert os.stat(dest / p.name).st_size == p.stat().st_size
            for mode in ("rb", "r+b", "ab"):
                with pytest.raises(PermissionError) as exc:
                    open(dest / p.name, mode)
                assert exc.value.errno == errno.EACCES
        with pytest.raises(FileNotFoundError):
            open(m.mnt / "earlier.dcm", "rb")
    finally:
        subprocess.run(["fusermount3", "-u", str(m.mnt)], check=False)
    wait_sessions_free(m.store)
    inbox_bytes = b"".join(p.read_bytes() for d in session_dirs(m.store) for p in d.iterdir())
    assert inbox_bytes and b"CT00000" not in inbox_bytes and b"series1" not in inbox_bytes
    assert b"CT00000" not in (m.store / "dcmfs.log").read_bytes()
    m.mount()
    for p in series:
        got = (m.mnt / "study" / "series1" / p.name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(p.read_bytes()).digest()
    assert (m.mnt / "earlier.dcm").read_bytes() == ct_file().read_bytes()
    assert session_dirs(m.store) == []
    m.umount()
    r = m.cli("audit", m.store, "--key-file", m.key)
    ingested = [line for line in r.stdout.splitlines() if " ingest " in line]
    assert len(ingested) == len(series)
    assert any("/study/series1/CT00000.dcm session=" in line for line in ingested)


def test_a_recipient_of_another_store_or_a_store_without_one_is_refused(tmp_path, secret):
    from dcmfs.app.ingestmount import load_recipient
    from dcmfs.errors import SecretError
    from dcmfs.storage.header import init_store
    a, b = tmp_path / "a", tmp_path / "b"
    init_store(str(a), secret, SMALL)
    init_store(str(b), secret, SMALL)
    rcp = tmp_path / "a.json"
    rcp.write_bytes(keyring.recipient(str(a), secret).to_json())
    assert load_recipient(str(rcp), str(a)).store_id.hex() in rcp.read_text()
    with pytest.raises(SecretError):
        load_recipient(str(rcp), str(b))  # b has no recipient
    keyring.recipient(str(b), secret)
    with pytest.raises(SecretError):
        load_recipient(str(rcp), str(b))  # b's is another key
    (tmp_path / "junk.json").write_text('{"format": "x"}')
    with pytest.raises(SecretError):
        load_recipient(str(tmp_path / "junk.json"), str(a))


def keyed_and_write_only(m, tmp_path, options: str = ""):
    """The store mounted with its key (importing every second) and, beside
    it, write-only with its recipient (``options`` added); the latter's
    mountpoint."""
    rcp = tmp_path / "recipient.json"
    r = m.cli("key", "recipient", m.store, "--key-file", m.key, "--export", rcp)
    assert r.returncode == 0, r.stderr
    m.mount("-o", "inbox_interval=1,checkpoint_interval=0.2")
    ingest_mnt = tmp_path / "ingest"
    ingest_mnt.mkdir()
    r = m.cli("mount", m.store, ingest_mnt, "-o", f"recipient={rcp}{options}")
    assert r.returncode == 0, r.stderr
    return ingest_mnt


def test_a_mounted_store_imports_what_a_concurrent_write_only_mount_writes(mount_env,
                                                                           tmp_path):
    m = mount_env
    ingest_mnt = keyed_and_write_only(m, tmp_path)
    try:
        (ingest_mnt / "d").mkdir()
        (ingest_mnt / "d" / "slice.dcm").write_bytes(ct_file().read_bytes())
        with pytest.raises(PermissionError):
            open(ingest_mnt / "d" / "slice.dcm", "rb")
        time.sleep(3)  # three import rounds: a live session is left alone
        assert not (m.mnt / "d").exists()
        assert list(m.store.glob("inbox/*/*.rec")) and len(session_dirs(m.store)) == 1
        r = m.cli("status", ingest_mnt)
        assert r.returncode == 0 and "files       1" in r.stdout, r.stdout + r.stderr
        # dcmfs umount proves and stops the write-only daemon (no store lock)
        r = m.cli("umount", ingest_mnt)
        assert r.returncode == 0, r.stderr
        assert m.is_mounted()  # the keyed mount goes on
    finally:
        subprocess.run(["fusermount3", "-u", str(ingest_mnt)], check=False)
    wait_sessions_free(m.store)
    deadline = time.monotonic() + 30  # the session ended: imported at the next round
    while not (m.mnt / "d" / "slice.dcm").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (m.mnt / "d" / "slice.dcm").read_bytes() == ct_file().read_bytes()
    while session_dirs(m.store) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_dirs(m.store) == []  # removed once the import is durable
    m.umount()


def test_a_file_extended_after_an_fsync_is_imported_whole(make_fs, secret):
    """Review finding: a keyed opening imported a live session's fsync record
    and removed its chunks; the write-only mount then wrote the rest, and
    its final record named the removed chunks: the store kept the file
    short and refused the rest at every round.  Live sessions wait."""
    fs = make_fs()
    fs.close()
    cs = SMALL.chunk_size
    data = os.urandom(3 * cs + 5)
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    fh = ing.create("/f", 0o600, os.O_WRONLY, 0, 0)
    ing.write(fh, data[:2 * cs], 0)
    ing.fsync(fh)
    fs = make_fs()  # a keyed opening while the write-only mount lives
    assert fs.imported["imported"] == 0 and "f" not in [n for n, _ in fs.readdir("/")]
    fs.close()
    ing.write(fh, data[2 * cs:], 2 * cs)
    ing.flush(fh)
    ing.release(fh)
    ing.close()
    fs = make_fs()
    assert fs.imported == {"imported": 1, "refused": 0, "sessions": 1}
    assert read_all(fs, "/f") == data


def test_a_record_with_an_owner_out_of_range_is_refused_not_fatal(make_fs, secret):
    """Review finding: an authentic record whose uid does not fit 32 bits
    raised struct.error out of the opening, at every opening."""
    fs = make_fs()
    fs.close()
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    for path, uid in (("/bad", 1 << 32), ("/good", 0)):
        fh = ing.create(path, 0o600, os.O_WRONLY, uid, 0)
        ing.write(fh, path.encode() * 100, 0)
        ing.flush(fh)
        ing.release(fh)
    ing.close()
    fs = make_fs()  # opens
    assert fs.imported["imported"] == 1 and fs.imported["refused"] == 1
    assert [n for n, _ in fs.readdir("/") if n not in (".", "..")] == ["good"]
    assert read_all(fs, "/good") == b"/good" * 100


def test_a_rename_while_the_closes_record_is_being_written_wins(make_fs, secret, monkeypatch):
    import threading
    fs = make_fs()
    fs.close()
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    fh = ing.create("/old", 0o600, os.O_WRONLY, 0, 0)
    ing.write(fh, b"data", 0)
    node = ing._handles[fh]
    gate, real = threading.Event(), ing._sealer.commit

    def late(n, job):  # the release's record reaches the disk last
        if job[2]["path"] == "/old":
            gate.wait(10)
        real(n, job)

    monkeypatch.setattr(ing._sealer, "commit", late)
    closing = threading.Thread(target=ing.release, args=(fh,))
    closing.start()
    deadline = time.monotonic() + 10
    while node.issued == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    ing.rename("/old", "/new")
    gate.set()
    closing.join()
    ing.close()
    assert [p.name for p in pathlib.Path(ing.dir).glob("*.rec")] == \
        [inbox.record_name(node.file_id, 2)]
    fs = make_fs()
    assert [n for n, _ in fs.readdir("/")] == ["new"] and read_all(fs, "/new") == b"data"


def test_recompress_imports_the_inbox_and_codes_the_dicom_files(mount_env, tmp_path):
    """The key holder's 'dcmfs recompress' (unmounted) imports what the
    ingest node wrote and re-encodes it DICOM-aware (extents)."""
    m = mount_env
    r = m.cli("key", "recipient", m.store, "--key-file", m.key, "--export",
              tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    from dcmfs.app.ingestmount import load_recipient
    ing = IngestFS(str(m.store), load_recipient(str(tmp_path / "r.json"), str(m.store)),
                   Config())
    ingest_write(ing, "/slice.dcm", ct_file().read_bytes())
    ing.close()
    r = m.cli("recompress", m.store, "--key-file", m.key, timeout=300)
    assert r.returncode == 0, r.stderr
    from dcmfs.storage.header import Secret
    store = open_store(str(m.store), Secret("keyfile", m.key.read_bytes()))
    fs = FileSystem(store, Config(read_only=True))
    try:
        assert read_all(fs, "/slice.dcm") == ct_file().read_bytes()
        with fs.lock, fs.index.begin() as txn:
            table = txn.chunks(fs._resolve(txn, "/slice.dcm"))
        assert any(ref.offset >= 0 for ref in table.values())  # laid out in extents
    finally:
        fs.close()


@pytest.mark.parametrize("bad", ["/a/../../etc/x", "relative", "/.", "/a//b", "/",
                                 "huge chunk"])
def test_a_record_whose_path_leaves_the_tree_is_refused(make_fs, secret, bad):
    """An ingest node is hostile input: a record it sealed (with the public
    key anyone may have) naming a path outside a clean tree is refused."""
    fs = make_fs()
    fs.close()
    rcp = keyring.recipient(str(make_fs.root), secret)
    ing = IngestFS(str(make_fs.root), rcp, Config())
    ingest_write(ing, "/good", b"good")
    node = ing.root.children["good"]
    if bad == "huge chunk":  # more than a chunk in one (a zstd bomb's way), sealed right
        plain = bytes(4 * rcp.chunk_size)
        blob = inbox.seal_chunk(node.key, rcp.store_id, ing.session, node.file_id, 0, plain)
        (pathlib.Path(ing.dir) / ("ab" * 16 + ".obj")).write_bytes(blob)
        node.chunks = [["ab" * 16, len(plain), len(blob), hashlib.sha256(plain).hexdigest()]]
        node.tail_start = len(plain)
    else:
        node.path = bad
    ing._sealer.publish(node)  # the same file, renamed to ``bad`` in its record
    ing.close()
    fs = make_fs()
    assert fs.imported["refused"] == 1 and fs.imported["imported"] == 0
    assert [n for n, _ in fs.readdir("/")] == []


KILL_IMPORT = """
import os, signal, sys
from dcmfs.core import importer
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import Secret, open_store
from tests.conftest import SMALL
seen = [0]
def step(name):
    if name == sys.argv[2]:
        seen[0] += 1
        if seen[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
importer.STEP = step
FileSystem(open_store(sys.argv[1], Secret("keyfile", bytes(range(32)))), SMALL)
"""


@pytest.mark.parametrize("at", ["written", "placed", "synced", "removed"])
def test_sigkill_during_the_import_leaves_every_file_once(tmp_path, at):
    import signal
    import sys
    from dcmfs.storage.header import Secret, init_store
    key = Secret("keyfile", bytes(range(32)))
    root = tmp_path / "store"
    init_store(str(root), key, SMALL)
    ing = IngestFS(str(root), keyring.recipient(str(root), key), Config())
    files = {f"/d/f{i}": os.urandom(50_000 + i) for i in range(3)}
    ing.mkdir("/d", 0o755, 0, 0)
    for path, data in files.items():
        ingest_write(ing, path, data)
    ing.close()
    nth = "1" if at == "synced" else "2"  # one session; else at the second file
    r = subprocess.run([sys.executable, "-c", KILL_IMPORT, str(root), at, nth],
                       capture_output=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    fs = FileSystem(open_store(str(root), key), SMALL)
    try:
        assert sorted(n for n, _ in fs.readdir("/d")) == ["f0", "f1", "f2"]  # once each
        for path, data in files.items():
            assert read_all(fs, path) == data
        assert session_dirs(root) == []
    finally:
        fs.close()


def test_a_killed_write_only_daemon_loses_only_the_file_it_had_open(mount_env, tmp_path):
    import json
    import signal
    from dcmfs.format import STATUS_XATTR
    m = mount_env
    rcp = tmp_path / "recipient.json"
    r = m.cli("key", "recipient", m.store, "--key-file", m.key, "--export", rcp)
    assert r.returncode == 0, r.stderr
    r = m.cli("mount", m.store, m.mnt, "-o", f"recipient={rcp}")
    assert r.returncode == 0, r.stderr
    data = {f"s{i}.dcm": os.urandom(300_000 + i) for i in range(3)}
    try:
        for name, body in data.items():
            (m.mnt / name).write_bytes(body)
        pid = json.loads(os.getxattr(m.mnt, STATUS_XATTR))["pid"]
        fd = os.open(m.mnt / "partial.dcm", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, os.urandom(100_000))
        time.sleep(0.5)  # the kernel has released the closed files
        os.kill(pid, signal.SIGKILL)
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is dead
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=False)
    wait_sessions_free(m.store)
    m.mount()
    assert sorted(os.listdir(m.mnt)) == sorted(data)  # the open file is lost, nothing else
    for name, body in data.items():
        assert (m.mnt / name).read_bytes() == body
    assert session_dirs(m.store) == []
    m.umount()


def test_a_path_that_cannot_be_made_is_refused_and_the_opening_goes_on(make_fs, secret,
                                                                        caplog):
    fs = make_fs()
    fh = fs.create("/a", 0o644, os.O_WRONLY, 0, 0)  # a file where the ingest made a directory
    fs.release(fh)
    fs.close()
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    ing.mkdir("/a", 0o755, 0, 0)
    ingest_write(ing, "/a/secret-name-b", b"b")
    ingest_write(ing, "/c", b"c")
    ing.close()
    caplog.set_level("ERROR", logger="dcmfs.ingest")
    fs = make_fs()
    assert fs.imported == {"imported": 1, "refused": 1, "sessions": 0}
    assert read_all(fs, "/c") == b"c"
    assert "NotADirectory" in caplog.text and "secret-name-b" not in caplog.text


class _Interleaved:
    """``os`` and ``fcntl`` for :mod:`dcmfs.core.ingest`, with a key holder's
    sweep of unplaced sessions run at one instant of a session's making."""

    def __init__(self, real, at: str, base: str, **hooks) -> None:
        self._real, self._at, self._base, self._done = real, at, base, False
        for name, when in hooks.items():
            setattr(self, name, self._wrap(getattr(real, name), when))

    def _wrap(self, fn, when):
        def call(*args, **kwargs):
            if when == "after":
                out = fn(*args, **kwargs)
            if not self._done and self._at == fn.__name__ + ":" + when:
                self._done = True
                self._interfere(args)
            if when == "before":
                out = fn(*args, **kwargs)
            return out
        return call

    def _interfere(self, args) -> None:
        from dcmfs.core import importer
        if self._at == "rename:before":  # the sweep removed the lock, not yet the directory
            os.unlink(os.path.join(args[0], "lock"))
        else:
            importer._sweep_unplaced(self._base)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("at", ["makedirs:after", "flock:before", "rename:before"])
def test_a_sweep_of_unplaced_sessions_at_a_sessions_making_costs_a_new_session(
        make_fs, secret, monkeypatch, at):
    """A key holder's sweep of sessions never put in place, run in the
    instant a write-only mount makes its own, made the mount fail to start
    (or left its session without the lock that keeps it from being
    imported while live)."""
    from dcmfs.core import ingestfile as ingest_mod
    make_fs().close()
    base = str(make_fs.root / inbox.INBOX_DIR)
    hooks = {at.split(":")[0]: at.split(":")[1]}
    target = "fcntl" if at.startswith("flock") else "os"
    proxy = _Interleaved(getattr(ingest_mod, target), at, base, **hooks)
    monkeypatch.setattr(ingest_mod, target, proxy)
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret), Config())
    monkeypatch.undo()
    assert proxy._done  # the sweep did run in that instant
    lock = os.path.join(ing.dir, "lock")
    assert os.stat(lock).st_ino == os.fstat(ing._lock_fd).st_ino  # the lock it holds
    ingest_write(ing, "/f", b"after the sweep")
    fs = make_fs()  # while the mount is live: nothing imported, its session kept
    assert fs.imported["imported"] == 0 and os.path.exists(lock)
    # what the interrupted making left (empty, unlocked) is gone
    assert sorted(os.listdir(base)) == [os.path.basename(ing.dir)]
    fs.close()
    ing.close()
    fs = make_fs()
    assert read_all(fs, "/f") == b"after the sweep"


def test_a_live_write_only_mount_hands_closed_files_over(make_fs, secret):
    """A receiver that never unmounts: a file closed ``handover_after`` ago
    is handed over (its record final); a key holder imports it while the
    mount goes on, and the mount refuses to change it after; files still
    open, or closed lately, wait."""
    import dataclasses
    make_fs().close()
    ing = IngestFS(str(make_fs.root), keyring.recipient(str(make_fs.root), secret),
                   dataclasses.replace(Config(), handover_after=0))  # rounds by hand
    ing.config = dataclasses.replace(ing.config, handover_after=0.3)
    ing.mkdir("/d", 0o755, 0, 0)
    ingest_write(ing, "/d/early", b"closed early" * 1000)
    held = ing.create("/still-open", 0o644, os.O_WRONLY, 0, 0)
    ing.write(held, b"open", 0)
    time.sleep(0.4)
    ingest_write(ing, "/late", b"closed late")
    assert ing.hand_over_due() == 1  # /d/early only
    for change in (lambda: ing.rename("/d/early", "/d/other"),
                   lambda: ing.rename("/late", "/d/early"),  # replacing it
                   lambda: ing.rename("/d", "/e"),  # its directory
                   lambda: ing.unlink("/d/early"),
                   lambda: ing.chmod("/d/early", 0o600),
                   lambda: ing.utimens("/d/early", 0, 0)):
        with pytest.raises(PermissionDenied):
            change()
    ing.rename("/late", "/late2")  # not handed over yet: as before
    assert ing.getattr("/d/early")["st_size"] == 12000  # still listed
    fs = make_fs()  # the key holder, while the mount is live
    assert fs.imported["imported"] == 1
    assert read_all(fs, "/d/early") == b"closed early" * 1000
    assert sorted(n for n, _ in fs.readdir("/")) == ["d"]
    fs.close()
    sdir = pathlib.Path(ing.dir)
    assert len(list(sdir.glob("*.rec"))) == 1  # /late2's; /still-open has none yet
    ing.write(held, b" still", 4)
    ing.release(held)
    ing.close()  # the mount ends: the rest follows, /d/early not again
    fs = make_fs()
    assert fs.imported["imported"] == 2
    assert sorted(n for n, _ in fs.readdir("/")) == ["d", "late2", "still-open"]
    assert read_all(fs, "/still-open") == b"open still"
    assert sorted(n for n, _ in fs.readdir("/d")) == ["early"]
    assert session_dirs(make_fs.root) == []


def test_a_key_holder_imports_what_a_receiver_that_stays_mounted_hands_over(mount_env,
                                                                             tmp_path):
    m = mount_env
    ingest_mnt = keyed_and_write_only(m, tmp_path, ",handover_after=1")
    try:
        (ingest_mnt / "study").mkdir()
        (ingest_mnt / "study" / "slice.dcm").write_bytes(ct_file().read_bytes())
        deadline = time.monotonic() + 30
        while not (m.mnt / "study" / "slice.dcm").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (m.mnt / "study" / "slice.dcm").read_bytes() == ct_file().read_bytes()
        with pytest.raises(PermissionError):  # handed over: the receiver cannot change it
            os.rename(ingest_mnt / "study" / "slice.dcm", ingest_mnt / "study" / "x.dcm")
        assert os.listdir(ingest_mnt / "study") == ["slice.dcm"]  # still listed
        r = m.cli("status", ingest_mnt)
        assert r.returncode == 0 and "handed over 1" in r.stdout, r.stdout + r.stderr
        r = m.cli("umount", ingest_mnt)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(ingest_mnt)], check=False)
    wait_sessions_free(m.store)
    deadline = time.monotonic() + 30
    while session_dirs(m.store) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_dirs(m.store) == []
    assert sorted(os.listdir(m.mnt / "study")) == ["slice.dcm"]  # imported once
    m.umount()
