"""The audit trail through the core (no kernel): what is recorded, folding,
the chain check naming every kind of damage, retention, crashes, remounts
and index rebuilds."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time

import pytest

from .conftest import SMALL, crash, flip_byte
from dcmfs.app import audit as app_audit
from dcmfs.audit import segments as S
from dcmfs.config import Config
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import init_store, open_store

#: small segments, so that a few dozen records make several
SEGMENTED = dataclasses.replace(SMALL, audit_segment_size=2048)
ME = (1000, 1000, os.getpid())


def _records(root, secret, **filters):
    return list(app_audit.records(str(root), lambda: secret, **filters))


def _verify(root, secret) -> dict:
    return app_audit.verify(str(root), lambda: secret)


def _write_files(fs: FileSystem, n: int, prefix: str = "f") -> None:
    for i in range(n):
        fh = fs.create(f"/{prefix}{i}", 0o644, os.O_WRONLY, 1000, 1000)
        fs.write(fh, b"x" * (100 + i), 0)
        fs.flush(fh)
        fs.release(fh)


def test_events_carry_caller_inode_and_path(make_fs, secret):
    fs = make_fs()
    fs.caller = ME
    fh = fs.create("/a", 0o644, os.O_WRONLY, 1000, 1000)
    fs.write(fh, b"hello", 0)
    fs.flush(fh)
    fs.release(fh)
    fs.caller = (2000, 2000, os.getpid())
    fs.release(fs.open("/a", os.O_RDONLY))
    fs.rename("/a", "/b")
    fs.chmod("/b", 0o600)
    fs.chown("/b", 3, 4)
    fs.setxattr("/b", "user.k", b"v")
    fs.removexattr("/b", "user.k")
    fs.truncate("/b", 2)
    fs.link("/b", "/c")
    fs.mkdir("/d", 0o755, 1, 1)
    fs.rmdir("/d")
    fs.unlink("/c")
    fs.close()
    recs = [r for r in _records(make_fs.root, secret) if r["event"] != "admin"]
    events = [r["event"] for r in recs]
    assert events == ["create", "write-close", "open", "rename", "chmod", "chown", "setxattr",
                      "removexattr", "truncate", "link", "mkdir", "rmdir", "unlink"]
    ino = recs[0]["ino"]
    assert all(r["ino"] == ino for r in recs if r["event"] not in ("mkdir", "rmdir"))
    assert [r["uid"] for r in recs[:2]] == [1000, 1000]
    assert all(r["uid"] == 2000 and r["pid"] == os.getpid() for r in recs[2:])
    me = pathlib.Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert {r["process"] for r in recs} == {me}
    assert recs[1]["size"] == 5 and len(recs[1]["digest"]) == 16
    assert recs[2]["access"] == "r"
    assert recs[3]["path"] == "/a" and recs[3]["to"] == "/b"
    assert recs[4]["mode"] == 0o600 and recs[5]["owner"] == 3
    assert [r["seq"] for r in recs] == sorted(r["seq"] for r in recs)
    assert _verify(make_fs.root, secret)["intact"]
    # filters
    assert [r["event"] for r in _records(make_fs.root, secret, uid=1000)] == \
        ["create", "write-close"]
    assert [r["event"] for r in _records(make_fs.root, secret, path="/c")] == ["link", "unlink"]
    assert len(_records(make_fs.root, secret, event="open")) == 1
    assert _records(make_fs.root, secret, since="2000-01-01T00:00:00Z",
                    until="2000-01-02T00:00:00Z") == []


def test_identical_opens_are_folded(make_fs, secret):
    fs = make_fs()
    fs.caller = ME
    _write_files(fs, 2)
    for _ in range(10):
        fs.release(fs.open("/f0", os.O_RDONLY))
    fs.release(fs.open("/f1", os.O_RDONLY))  # a different record ends the fold
    for _ in range(3):
        fs.release(fs.open("/f1", os.O_RDONLY))
    fs.close()  # a pending fold is written at close
    opens = _records(make_fs.root, secret, event="open")
    assert [(r["path"], r.get("n")) for r in opens] == [
        ("/f0", None), ("/f0", 9), ("/f1", None), ("/f1", 3)]
    assert opens[1]["folded"] == opens[0]["seq"]


def test_no_trail_with_audit_off(make_fs, secret):
    fs = make_fs(dataclasses.replace(SMALL, audit=False))
    _write_files(fs, 3)
    fs.close()
    assert S.list_segments(str(make_fs.root)) == []
    fs = make_fs()
    _write_files(fs, 1, prefix="h")
    fs.close()
    fs = make_fs(dataclasses.replace(SMALL, audit=False))  # a trail there: the gap shows
    _write_files(fs, 2, prefix="g")
    fs.close()
    events = [r["event"] for r in _records(make_fs.root, secret)]
    assert events == ["create", "write-close", "audit-off"]
    assert _verify(make_fs.root, secret)["intact"]


def _trail(make_fs, secret, n=40) -> tuple[str, list[tuple[int, str]]]:
    fs = make_fs(SEGMENTED)
    fs.caller = ME
    _write_files(fs, n)
    fs.close()
    root = str(make_fs.root)
    segs = S.list_segments(root)
    assert len(segs) >= 4, segs
    report = _verify(root, secret)
    assert report["intact"], report
    return root, segs


def _frame_offsets(path) -> list[int]:
    return [item[0] for item in S.frames(S.read_file(path))]


def test_verify_names_a_flipped_bit(make_fs, secret):
    root, segs = _trail(make_fs, secret)
    number, path = segs[1]
    offsets = _frame_offsets(path)
    flip_byte(path, offsets[2] + 30)
    problems = _verify(root, secret)["problems"]
    assert problems and f"segment {number}, record" in problems[0] and \
        "does not authenticate" in problems[0], problems


def test_verify_names_a_truncated_segment(make_fs, secret):
    root, segs = _trail(make_fs, secret)
    number, path = segs[1]
    offsets = _frame_offsets(path)
    os.truncate(path, offsets[-1] + 10)  # inside the last record
    problems = _verify(root, secret)["problems"]
    assert any(f"segment {number} is truncated" in p for p in problems), problems
    os.truncate(path, offsets[-1])  # at a record boundary: its end record is gone
    problems = _verify(root, secret)["problems"]
    assert any(f"segment {number} is truncated" in p and "without its end record" in p
               for p in problems), problems


def test_verify_names_a_removed_segment(make_fs, secret):
    root, segs = _trail(make_fs, secret)
    os.unlink(segs[2][1])
    problems = _verify(root, secret)["problems"]
    assert any(f"segments {segs[2][0]}..{segs[2][0]} are missing" in p for p in problems), \
        problems
    os.unlink(segs[0][1])  # the first one too: the index's head says where it starts
    problems = _verify(root, secret)["problems"]
    assert any("segments 1..1 are missing" in p for p in problems), problems
    shutil.rmtree(os.path.join(root, "index"))  # no head: the numbering says it
    problems = _verify(root, secret)["problems"]
    assert any(f"the trail starts at segment {segs[1][0]}" in p and "missing" in p
               for p in problems), problems


def test_verify_names_the_cut_tail(make_fs, secret):
    """The last segment cut at a record boundary: the index's head (stored
    at the checkpoint of the unmount) says records are missing."""
    root, segs = _trail(make_fs, secret)
    fs = make_fs()  # large segments: these records stay in the last one
    _write_files(fs, 2, prefix="g")
    fs.close()
    path = S.list_segments(root)[-1][1]
    os.truncate(path, _frame_offsets(path)[-1])
    problems = _verify(root, secret)["problems"]
    assert any("were removed (truncated)" in p for p in problems), problems


def test_verify_names_reordered_records_and_segments(make_fs, secret):
    root, segs = _trail(make_fs, secret)
    number, path = segs[1]
    data = S.read_file(path)
    offsets = _frame_offsets(path) + [len(data)]
    a, b = data[offsets[1]:offsets[2]], data[offsets[2]:offsets[3]]
    with open(path, "wb") as f:
        f.write(data[:offsets[1]] + b + a + data[offsets[3]:])
    problems = _verify(root, secret)["problems"]
    assert any(f"segment {number}, offset {offsets[1]}" in p and "reordered" in p
               for p in problems), problems
    with open(path, "wb") as f:
        f.write(data)
    assert _verify(root, secret)["intact"]
    # two segment files swapped by name
    p2, p3 = segs[2][1], segs[3][1]
    os.rename(p2, p2 + ".x")
    os.rename(p3, p2)
    os.rename(p2 + ".x", p3)
    problems = _verify(root, secret)["problems"]
    assert any(f"segment file {segs[2][0]} holds segment {segs[3][0]}" in p
               for p in problems), problems


def test_verify_names_a_segment_of_another_store(make_fs, secret, tmp_path):
    root, segs = _trail(make_fs, secret)
    other = tmp_path / "other"
    init_store(str(other), secret, SMALL)
    fs = FileSystem(open_store(str(other), secret), SEGMENTED)
    _write_files(fs, 40)
    fs.close()
    foreign = S.list_segments(str(other))[1][1]
    shutil.copyfile(foreign, segs[1][1])
    problems = _verify(root, secret)["problems"]
    assert any(f"segment {segs[1][0]} belongs to another store" in p for p in problems), \
        problems
    assert not any("missing" in p for p in problems), problems  # named once, as what it is


def test_retention_keeps_the_chain_verifiable(make_fs, secret):
    root, segs = _trail(make_fs, secret)
    for _, path in segs[:3]:  # three old segments
        os.utime(path, (1, 1))
    fs = make_fs(dataclasses.replace(SEGMENTED, audit_retention=3600.0))
    fs.close()
    left = S.list_segments(root)
    assert [n for n, _ in left][:1] == [segs[3][0]]
    report = _verify(root, secret)
    assert report["intact"], report
    retention = _records(root, secret, event="retention")
    assert retention and retention[0]["dropped"] == [segs[0][0], segs[2][0]]
    os.unlink(left[0][1])  # removing the retained start is named
    problems = _verify(root, secret)["problems"]
    assert any(f"segments {segs[3][0]}..{segs[3][0]} are missing" in p for p in problems), \
        problems


def test_a_crash_keeps_every_returned_record_and_the_trail_goes_on(make_fs, secret):
    fs = make_fs()
    fs.caller = ME
    _write_files(fs, 5)
    crash(fs)  # no checkpoint after the writes: the index's head is older
    fs.opened.audit._fd and os.close(fs.opened.audit._fd)
    fs = make_fs()
    fs.caller = ME
    _write_files(fs, 2, prefix="g")
    fs.close()
    paths = [r["path"] for r in _records(make_fs.root, secret, event="create")]
    assert paths == [f"/f{i}" for i in range(5)] + ["/g0", "/g1"]
    assert _verify(make_fs.root, secret)["intact"]


def test_a_torn_record_is_cut_at_the_next_opening(make_fs, secret):
    fs = make_fs()
    _write_files(fs, 3)
    fs.close()
    path = S.list_segments(str(make_fs.root))[-1][1]
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")  # a write(2) cut short by a power loss
    fs = make_fs()
    _write_files(fs, 1, prefix="g")
    fs.close()
    assert _verify(make_fs.root, secret)["intact"]
    assert len(_records(make_fs.root, secret, event="create")) == 4


def test_the_trail_survives_an_index_rebuild(make_fs, secret):
    from dcmfs.integrity.rebuild import rebuild_index
    from dcmfs.opened.store import OpenedStore
    fs = make_fs()
    fs.caller = ME
    _write_files(fs, 4)
    fs.close()
    with OpenedStore(open_store(str(make_fs.root), secret), SMALL, index=False) as opened:
        shutil.rmtree(os.path.join(opened.root, "index"))
        rebuild_index(opened)
    fs = make_fs()
    fs.caller = ME
    _write_files(fs, 2, prefix="g")
    fs.close()
    report = _verify(make_fs.root, secret)
    assert report["intact"], report
    assert len(_records(make_fs.root, secret, event="create")) == 6


def test_nothing_readable_in_the_trail(make_fs, secret):
    fs = make_fs()
    fs.caller = ME
    fh = fs.create("/PATIENT_DOE_JOHN.dcm", 0o644, os.O_WRONLY, 0, 0)
    fs.flush(fh)
    fs.release(fh)
    fs.close()
    for _, path in S.list_segments(str(make_fs.root)):
        data = S.read_file(path)
        assert b"DOE_JOHN" not in data and b"create" not in data


def test_a_damaged_trail_is_named_and_the_trail_goes_on(make_fs, secret, caplog):
    fs = make_fs()
    _write_files(fs, 3)
    fs.close()
    number, path = S.list_segments(str(make_fs.root))[-1]
    # altered behind the index's head: the opening resumes at the head, the
    # check names it
    flip_byte(path, _frame_offsets(path)[2] + 30)
    fs = make_fs()
    _write_files(fs, 1, prefix="g")
    fs.close()
    problems = _verify(make_fs.root, secret)["problems"]
    assert any(f"segment {number}, record" in p and "does not authenticate" in p
               for p in problems), problems
    # cut before the index's head: the opening says so and goes on in a new
    # segment linked to the head
    os.truncate(path, _frame_offsets(path)[-3])
    fs = make_fs()
    _write_files(fs, 1, prefix="h")
    fs.close()
    assert "audit trail damaged" in caplog.text
    assert S.list_segments(str(make_fs.root))[-1][0] == number + 1
    problems = _verify(make_fs.root, secret)["problems"]
    assert any(f"segment {number + 1} does not continue segment {number}" in p
               for p in problems), problems
    events = [r["event"] for r in _records(make_fs.root, secret)]
    assert "audit-break" in events and events[-2:] == ["create", "write-close"]


def test_forwarded_digests_hold_no_name(make_fs, secret, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="dcmfs.audit")
    fs = make_fs(dataclasses.replace(SMALL, audit_forward=True))
    fs.caller = ME
    _write_files(fs, 1, prefix="PATIENT_DOE")
    fs.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "dcmfs.audit"]
    recs = _records(make_fs.root, secret)
    create = next(r for r in recs if r["event"] == "create")
    assert f"audit record {create['seq']} create uid=1000 ino={create['ino']} chain=" in \
        "\n".join(lines)
    assert lines[-1].endswith(_verify(make_fs.root, secret)["head"])  # the chain head
    assert "PATIENT_DOE" not in caplog.text


def _store_files(root) -> dict:
    """Every file of a store but its trail, lock files and log, with its
    bytes (LMDB's reader table ``index/lock.mdb`` is made by any opening)."""
    out = {}
    for p in sorted(pathlib.Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("audit/") \
                and rel not in ("lock", "dcmfs.log", "index/lock.mdb"):
            out[rel] = p.read_bytes()
    return out


def test_a_read_only_opening_records_reads_and_changes_nothing_else(make_fs, secret):
    fs = make_fs()
    _write_files(fs, 3)
    fs.close()
    before = _store_files(make_fs.root)
    head_before = _verify(make_fs.root, secret)["index_head_seq"]
    fs = make_fs(dataclasses.replace(SMALL, read_only=True))
    fs.caller = ME
    for name in ("/f0", "/f2"):
        fh = fs.open(name, os.O_RDONLY)
        assert fs.read(fh, 4096, 0)
        fs.release(fh)
    fs.close()
    assert _store_files(make_fs.root) == before  # index, journal, objects, header
    opens = _records(make_fs.root, secret, event="open")
    assert [(r["path"], r["uid"], r["pid"], r["access"]) for r in opens] == [
        ("/f0", 1000, os.getpid(), "r"), ("/f2", 1000, os.getpid(), "r")]
    report = _verify(make_fs.root, secret)
    assert report["intact"], report
    # the index's head is where the read-write session left it; the next
    # read-write opening takes the read-only session's records into it
    assert report["index_head_seq"] == head_before < report["head_seq"]
    fs = make_fs()
    fs.close()
    report = _verify(make_fs.root, secret)
    assert report["intact"] and report["index_head_seq"] == report["head_seq"], report
    assert report["index_head_seq"] >= opens[-1]["seq"]


def test_a_read_only_opening_of_an_older_store_records_nothing(tmp_path):
    """A store of format 3 (no ``audit-v1``) opened read-only is left as it
    is: its first read-write opening upgrades it and starts the trail."""
    import json
    from dcmfs.storage.header import Secret
    version = pathlib.Path(__file__).parent / "compat" / "v3"
    manifest = json.loads((version / "manifest.json").read_text())
    root = tmp_path / "store"
    shutil.copytree(version / "store", root)
    secret = Secret("passphrase", manifest["passphrase"].encode())
    cfg = Config(chunk_size=manifest["chunk_size"], checkpoint_interval=0, read_only=True)
    fs = FileSystem(open_store(str(root), secret), cfg)
    try:
        assert "audit-v1" not in fs.store.features
        path = next(iter(manifest["files"]))
        fh = fs.open(path, os.O_RDONLY)
        fs.release(fh)
        assert fs.opened.audit is None
    finally:
        fs.close()
    assert not (root / "audit").exists()


def test_process_names_follow_exec_and_exit_with_few_fds(tmp_path):
    """Names are read again through a kept /proc/PID/comm descriptor (one
    pread): an exec shows the new name, a process gone shows "?" (never the
    name of a later process with its pid), and at most MAX_NAME_FDS are open."""
    import subprocess
    import sys
    from dcmfs.audit import trail as T
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(0.5)\n"
        "os.execvp('sleep', ['sleep', '2'])\n")])
    try:
        while not ready.exists():
            pass
        first = T.process_name(child.pid, fresh=True)
        assert first.startswith("python"), first
        fds_before = len(os.listdir("/proc/self/fd"))
        assert T.process_name(child.pid) == first  # cached within the second
        deadline = time.monotonic() + 10
        while T.process_name(child.pid, fresh=True) != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) == fds_before  # the same descriptor
    finally:
        child.kill()
        child.wait()
    assert T.process_name(child.pid, fresh=True) == "?"
    assert child.pid not in T._NAMES
    kids = [subprocess.Popen(["sleep", "5"]) for _ in range(T.MAX_NAME_FDS + 8)]
    try:
        for k in kids:
            # a vfork()ed child lets its parent go on (Popen returns) inside
            # execve before the kernel sets its new name: wait for it
            deadline = time.monotonic() + 10
            while T.process_name(k.pid, fresh=True) != "sleep":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert len(T._NAMES) <= T.MAX_NAME_FDS
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_record_nonces_are_unique_across_openings(make_fs, secret):
    for prefix in ("a", "b"):
        fs = make_fs()
        _write_files(fs, 5, prefix=prefix)
        fs.close()
    nonces = []
    for _, path in S.list_segments(str(make_fs.root)):
        for item in S.frames(S.read_file(path)):
            nonces.append(bytes(item[2][12:24]))  # length u32 | sequence u64 | nonce
    assert len(nonces) >= 20 and len(set(nonces)) == len(nonces)
    assert len({n[:8] for n in nonces}) == 2  # one random prefix per opening
    assert _verify(make_fs.root, secret)["intact"]
