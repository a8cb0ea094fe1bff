"""Real FUSE mounts: real DICOM, ordinary tools, POSIX behaviour."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import threading
import warnings

import pydicom
import pytest

from .conftest import dicom_files, file_sha256, sha256


@pytest.mark.slow  # the whole corpus through a mount: ~5-10 s
def test_every_dicom_file_reads_back_identical_and_parses(mounted, tmp_path):
    files = dicom_files()
    assert len(files) > 100
    for i, src in enumerate(files):
        shutil.copyfile(src, mounted.mnt / f"{i:04d}_{src.name}")
    mounted.umount()
    mounted.mount()
    parsed = 0
    for i, src in enumerate(files):
        dst = mounted.mnt / f"{i:04d}_{src.name}"
        assert file_sha256(dst) == file_sha256(src), src.name
        with warnings.catch_warnings():
            # pydicom warns about the deliberately odd values of its test files
            warnings.simplefilter("ignore")
            try:
                want = pydicom.dcmread(src, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 — deliberately malformed test files
                continue
            assert pydicom.dcmread(dst, stop_before_pixels=True) == want
        parsed += 1
    assert parsed > 100
    import json
    import time
    deadline = time.monotonic() + 120  # the re-encoder yields to the reads above
    while True:
        report = json.loads(mounted.cli("status", mounted.mnt, "--json", check=True).stdout)
        if report["backlog_files"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["files"] == len(files)
    assert report["logical_bytes"] == sum(p.stat().st_size for p in files)
    assert 0 < report["ratio"] < 0.8
    assert report["pid"] and report["rss_bytes"] > 0


def make_tree(root):
    rng = random.Random(7)
    (root / "a" / "b").mkdir(parents=True)
    for i in range(40):
        d = root / ("a" if i % 2 else "a/b")
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randrange(0, 300_000)))
    os.symlink("b/f0.bin", root / "a" / "link")
    os.link(root / "a" / "f1.bin", root / "a" / "hard")
    os.utime(root / "a" / "f3.bin", ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.chmod(root / "a" / "f5.bin", 0o600)


def tree_digest(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[rel] = ("file", file_sha256(p), st.st_mode, st.st_mtime_ns, st.st_nlink)
            else:
                out[rel] = ("dir", st.st_mode)
    return out


def test_cp_rsync_tar(mounted, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    want = tree_digest(src)
    subprocess.run(["cp", "-a", f"{src}/.", str(mounted.mnt / "cp")], check=True)
    subprocess.run(["rsync", "-aH", f"{src}/", str(mounted.mnt / "rsync")], check=True)
    subprocess.run(["tar", "--format=posix", "-C", str(src), "-cf", str(tmp_path / "t.tar"), "."], check=True)
    (mounted.mnt / "tar").mkdir()
    subprocess.run(["tar", "-C", str(mounted.mnt / "tar"), "-xf", str(tmp_path / "t.tar")],
                   check=True)
    # libfuse's path API gives each name of a hard link its own kernel inode,
    # so the other name's cached st_nlink is stale for up to attr_timeout:
    # compare on fresh caches
    mounted.umount()
    mounted.mount()
    for name in ("rsync", "tar"):
        assert tree_digest(mounted.mnt / name) == want, name
    got = tree_digest(mounted.mnt / "cp")
    # cp -a without --preserve=links copies a hard link as a second file
    assert {k: v[:4] for k, v in got.items()} == {k: v[:4] for k, v in want.items()}
    # and back out again
    subprocess.run(["rsync", "-aH", f"{mounted.mnt / 'rsync'}/", str(tmp_path / "back")],
                   check=True)
    assert tree_digest(tmp_path / "back") == want


def test_sqlite(mounted):
    db = sqlite3.connect(mounted.mnt / "t.db")
    db.execute("create table t (i integer primary key, v text)")
    for i in range(10_000):
        db.execute("insert into t (v) values (?)", (f"value {i}" * 3,))
        if i % 1000 == 999:
            db.commit()
    db.commit()
    db.execute("delete from t where i % 3 = 0")
    db.commit()
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()
    mounted.umount()
    mounted.mount()
    db = sqlite3.connect(mounted.mnt / "t.db")
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert db.execute("select count(*) from t").fetchone() == (6667,)
    db.close()


def test_git(mounted):
    repo = mounted.mnt / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "one"]):
        if args[0] == "add":
            for i in range(20):
                (repo / f"f{i}.txt").write_text(f"line {i}\n" * i)
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    subprocess.run(["git", "fsck", "--strict"], cwd=repo, check=True, env=env,
                   capture_output=True)
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, check=True, env=env,
                         capture_output=True, text=True)
    assert "one" in log.stdout


def test_random_offset_writes_match_a_plain_file(mounted, tmp_path):
    rng = random.Random(99)
    plain, mine = tmp_path / "plain", mounted.mnt / "mine"
    with open(plain, "w+b") as fp, open(mine, "w+b") as fm:
        for _ in range(300):
            op = rng.random()
            if op < 0.8:
                off = rng.randrange(0, 5 << 20)
                data = rng.randbytes(rng.randrange(1, 400_000))
                for f in (fp, fm):
                    f.seek(off)
                    f.write(data)
            else:
                length = rng.randrange(0, 6 << 20)
                for f in (fp, fm):
                    f.flush()
                    f.truncate(length)
        fp.flush()
        fm.flush()
        fp.seek(0)
        fm.seek(0)
        assert sha256(fm.read()) == sha256(fp.read())
    assert file_sha256(mine) == file_sha256(plain)
    assert os.path.getsize(mine) == os.path.getsize(plain)


def test_posix_details(mounted):
    m = mounted.mnt
    (m / "f").write_bytes(b"12345")
    os.truncate(m / "f", 2)
    assert (m / "f").read_bytes() == b"12"
    os.truncate(m / "f", 4)
    assert (m / "f").read_bytes() == b"12\0\0"
    with open(m / "f", "ab") as f:
        f.write(b"app")
    assert (m / "f").read_bytes() == b"12\0\0app"
    with open(m / "h", "wb") as f:  # write past the end: a hole
        f.seek(3 << 20)
        f.write(b"x")
    assert (m / "h").read_bytes() == bytes(3 << 20) + b"x"
    (m / "g").write_bytes(b"other")
    os.rename(m / "g", m / "f")
    assert (m / "f").read_bytes() == b"other" and not (m / "g").exists()
    os.link(m / "f", m / "f2")
    assert os.stat(m / "f").st_nlink == 2 and os.stat(m / "f").st_ino == os.stat(m / "f2").st_ino
    os.symlink("f", m / "s")
    assert os.readlink(m / "s") == "f" and (m / "s").read_bytes() == b"other"
    os.setxattr(m / "f", "user.study", b"1.2.3")
    assert os.getxattr(m / "f", "user.study") == b"1.2.3"
    assert "user.study" in os.listxattr(m / "f")
    os.utime(m / "f", ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_002))
    assert os.stat(m / "f").st_mtime_ns == 1_100_000_000_000_000_002
    os.chmod(m / "f", 0o640)
    assert os.stat(m / "f").st_mode & 0o777 == 0o640
    os.makedirs(m / "x" / "y")
    os.rename(m / "x", m / "z")
    assert (m / "z" / "y").is_dir()
    with pytest.raises(OSError) as e:
        os.rmdir(m / "z")
    assert e.value.errno == 39  # ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        os.stat(m / "missing")
    # unlink of an open file: the handle keeps working
    fd = os.open(m / "f2", os.O_RDWR)
    os.unlink(m / "f2")
    os.unlink(m / "f")
    assert os.pread(fd, 5, 0) == b"other"
    os.pwrite(fd, b"still", 0)
    assert os.pread(fd, 5, 0) == b"still"
    os.close(fd)
    assert sorted(os.listdir(m)) == ["h", "s", "z"]
    st = os.statvfs(m)
    assert st.f_bavail > 0 and st.f_namemax == 255
    dfd = os.open(m / "z", os.O_RDONLY | os.O_DIRECTORY)  # fstat/fchmod by handle
    try:
        assert os.fstat(dfd).st_ino == os.stat(m / "z").st_ino
        os.fsync(dfd)
    finally:
        os.close(dfd)
    with open(m / "h", "r+b") as f:
        os.fchmod(f.fileno(), 0o604)
        os.ftruncate(f.fileno(), 10)
        assert os.fstat(f.fileno()).st_size == 10
        os.utime(f.fileno(), ns=(5, 6_000_000_007))
    st = os.stat(m / "h")
    assert (st.st_mode & 0o777, st.st_mtime_ns, st.st_size) == (0o604, 6_000_000_007, 10)


def test_parallel_writers(mounted):
    blobs = {i: random.Random(i).randbytes(3_000_000 + i) for i in range(4)}
    errors = []

    def writer(i):
        try:
            with open(mounted.mnt / f"w{i}", "wb") as f:
                for off in range(0, len(blobs[i]), 65536):
                    f.write(blobs[i][off:off + 65536])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, blob in blobs.items():
        assert file_sha256(mounted.mnt / f"w{i}") == sha256(blob)


def test_fsync_and_empty_files(mounted):
    fd = os.open(mounted.mnt / "e", os.O_WRONLY | os.O_CREAT, 0o644)
    os.fsync(fd)
    os.close(fd)
    with open(mounted.mnt / "d", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())
    mounted.umount()
    mounted.mount()
    assert (mounted.mnt / "e").read_bytes() == b""
    assert (mounted.mnt / "d").read_bytes() == b"durable"
