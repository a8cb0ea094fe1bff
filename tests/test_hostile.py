"""Every file written into the mount is hostile input (issue 14): the DICOM
analysis and the image encoders run in keyless, capped worker processes;
nothing of a file's content reaches a log; a worker past a limit is killed
and its file stays with the general codec, once; stopping is bounded.

The cases come from tests/fuzz_dicom.py (seeded mutations of pydicom-data
and the crafted files of the issue); DCMFS_FUZZ_CASES sets how many.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import psutil
import pytest

from dcmfs.config import Config
from dcmfs.integrity.verify import Verifier
from dcmfs.sandbox import pool as pool_mod
from dcmfs.sandbox.pool import LIMIT, CRASHED, ParserPool, checked_plan, ParserFailure
from dcmfs.storage import dicom

from . import fuzz_dicom as F
from .conftest import file_sha256, sha256
from .test_core import read_file, write_file
from .test_dicom import REAL, content

HOSTILE = dataclasses.replace(REAL, sandbox=True, parser_timeout=30.0)
#: the daemon's (here: the test process's) memory bound of the issue
RSS_LIMIT = 300 * 1024 * 1024


class _Records(logging.Handler):
    """Every log line any dcmfs logger emits, formatted as it would be."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines():
    handler = _Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _no_canary_anywhere(root, lines) -> None:
    for line in lines:
        assert F.CANARY.decode() not in line and "DOB1970" not in line, line
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert F.CANARY not in f.read(), os.path.join(dirpath, name)


def _drain(fs, timeout: float = 600) -> None:
    fs.recompress()
    assert fs.reencoder.wait_idle(timeout=timeout), "the backlog did not drain"


def _check(fs, files: dict[str, bytes], lines) -> None:
    for path, data in files.items():
        assert read_file(fs, path) == data, path
    v = Verifier.of(fs)
    try:
        report = v.run(v.files())
    finally:
        v.close()
    assert not report.findings, report.findings[:3]
    _no_canary_anywhere(fs.store.root, lines)


def test_fuzz_quick(make_fs, log_lines):
    """A few hundred mutated files through the core: exact, verified, no
    canary (the daemon's memory is measured through a mount, below)."""
    fs = make_fs(HOSTILE)
    files = {}
    for name, data in F.cases(300):
        write_file(fs, f"/{name}.dcm", data)
        files[f"/{name}.dcm"] = data
    _drain(fs)
    _check(fs, files, log_lines)
    reasons = {content(fs, p)["reason"] for p in files}
    assert "" in reasons and len(reasons) > 5, reasons  # frames coded, and refusals


@pytest.mark.slow
def test_fuzz_thousands_through_a_mount(mounted):
    """The CI fuzz run through a real mount: a few thousand cases
    (DCMFS_FUZZ_CASES for more), each read back exactly; the daemon's peak
    RSS under 300 MB; the backlog drains; verify clean; no canary."""
    m = mounted
    n = int(os.environ.get("DCMFS_FUZZ_CASES", "2000"))
    digests = {}
    for i, (name, data) in enumerate(F.cases(n)):
        sub = m.mnt / f"d{i // 500}"
        sub.mkdir(exist_ok=True)
        (sub / f"{name}.dcm").write_bytes(data)
        digests[f"d{i // 500}/{name}.dcm"] = sha256(data)
    r = m.cli("recompress", m.store, timeout=1200)
    assert r.returncode == 0, r.stderr
    for rel, digest in digests.items():
        assert file_sha256(m.mnt / rel) == digest, rel
    assert _peak_rss(m.daemon_pid()) < RSS_LIMIT
    r = m.cli("verify", m.store, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(os.getxattr(m.mnt, "user.dcmfs.status"))
    assert status["backlog_files"] == 0
    stats = m.cli("stats", m.store, "--json", check=True).stdout
    assert F.CANARY.decode() not in stats
    m.umount()
    assert F.CANARY.decode() not in m.log() and "DOB1970" not in m.log()
    _no_canary_anywhere(m.store, [])


def test_crafted_files_of_the_issue(make_fs, log_lines):
    """PHI quoted by a malformed BitsAllocated, a deflate bomb, 5 million
    empty elements, sequences nested 100 000 deep: each read back exactly,
    analysed once, refused for a fixed reason, nothing in a log."""
    fs = make_fs(HOSTILE)
    files = {f"/{name}.dcm": data for name, data in F.crafted()}
    for path, data in files.items():
        write_file(fs, path, data)
    _drain(fs, timeout=120)
    assert fs.reencoder.backlog == (0, 0)
    _check(fs, files, log_lines)
    reasons = {p: content(fs, p)["reason"] for p in files}
    assert reasons == {"/phi-bits-allocated.dcm": "unreadable as DICOM (BytesLengthException)",
                       "/deflate-bomb.dcm": "deflated transfer syntax",
                       "/5M-empty-elements.dcm": "too many elements",
                       "/nested-100000.dcm": "nesting too deep"}
    # analysed once: a second recompress queues nothing
    assert fs.recompress() == 0


def test_precheck_refuses_before_parsing():
    assert dicom.precheck(F.deflate_bomb(1 << 20), 1 << 20) == "deflated transfer syntax"
    assert dicom.precheck(F.deep_sequences(100), 10 ** 6) == "nesting too deep"
    assert dicom.precheck(F.empty_elements(600_000), 10 ** 8) == "too many elements"
    ct = F.sources(1)[0].read_bytes()
    assert dicom.precheck(ct, len(ct)) == ""
    assert dicom.precheck(ct[:600], len(ct)) == "header larger than the analysis reads"
    assert dicom.precheck(ct[:500], 500) in ("", "value longer than the file")


def test_a_plan_from_a_worker_is_checked():
    good = {"info": {"kind": "dicom", "modality": "CT"}, "reason": "", "pixel_offset": 100,
            "frames": 1, "frame": [4, 4, 1, 16, 12, True, False, False]}
    assert checked_plan(good, 132).codes_frames
    for bad in ({**good, "pixel_offset": 101},                      # frames past the end
                {**good, "frame": [0, 4, 1, 16, 12, True, False, False]},
                {**good, "info": {"kind": "dicom", "PatientName": "X"}},
                {**good, "info": {"kind": "dicom", "modality": "CT\nsecret"}},
                {**good, "reason": "x" * 200}, {**good, "frames": "1"}, None, []):
        with pytest.raises(ParserFailure):
            checked_plan(bad, 132)


def test_worker_limits_give_fixed_reasons(tmp_path):
    """Memory: MemoryError in the worker; time: killed at the deadline;
    a crash: the reason says so; each time a fresh worker follows."""
    p = ParserPool(1, memory=256 * 1000 * 1000, timeout=2.0)
    try:
        many = F.empty_elements(450_000, distinct=True)
        with pytest.raises(ParserFailure) as exc:
            p.analyse(many, len(many))
        assert exc.value.reason == LIMIT
        ct = F.sources(1)[0].read_bytes()
        p.timeout = 30.0  # a fresh worker's start-up is not what this call tests
        assert p.analyse(ct, len(ct)).codes_frames  # a new worker took over
        p.timeout = 2.0
        worker = p._idle[0]
        os.kill(worker.proc.pid, signal.SIGSTOP)  # hangs: the deadline kills it
        t = time.monotonic()
        with pytest.raises(ParserFailure) as exc:
            p.analyse(ct, len(ct))
        assert exc.value.reason == LIMIT and time.monotonic() - t < 10
        assert worker.proc.poll() is not None
        real_call = pool_mod._Worker.call

        def crash_first(self, request, blob, timeout):
            os.kill(self.proc.pid, signal.SIGSEGV)
            self.proc.wait()
            return real_call(self, request, blob, timeout)

        pool_mod._Worker.call = crash_first
        try:
            with pytest.raises(ParserFailure) as exc:
                p.analyse(ct, len(ct))
        finally:
            pool_mod._Worker.call = real_call
        assert exc.value.reason == CRASHED
        p.timeout = 30.0
        assert p.analyse(ct, len(ct)).codes_frames
    finally:
        p.close()


def test_the_worker_holds_no_key_and_cannot_write(tmp_path):
    p = ParserPool(1)
    try:
        p.warm()
        pid = p._idle[0].proc.pid
        proc = psutil.Process(pid)
        if os.getuid() == 0:
            assert proc.uids().effective == 65534
        with open(f"/proc/{pid}/limits") as f:  # prlimit(2) needs ptrace rights
            limits = {line[:26].strip(): line[26:].split()[:2] for line in f}
        assert limits["Max file size"] == ["0", "0"]
        assert limits["Max core file size"] == ["0", "0"]
        assert limits["Max data size"][0] == str(Config().parser_memory)
        assert limits["Max cpu time"][0] != "unlimited"
    finally:
        p.close()


def test_a_failed_file_is_recorded_once_and_retried_only_on_request(make_fs, monkeypatch):
    fs = make_fs(dataclasses.replace(HOSTILE, parser_timeout=1.0))
    ct = F.sources(1)[0].read_bytes()
    write_file(fs, "/a.dcm", ct)
    real_call = pool_mod._Worker.call

    def hang(self, request, blob, timeout):
        if request.get("op") == "analyse":
            os.kill(self.proc.pid, signal.SIGSTOP)
        return real_call(self, request, blob, timeout)

    monkeypatch.setattr(pool_mod._Worker, "call", hang)
    _drain(fs, timeout=60)
    info = content(fs, "/a.dcm")
    assert info["kind"] == "failed" and info["reason"] == LIMIT
    assert fs.recompress() == 0  # never retried by itself
    assert fs.content_stats()["groups"][0]["fallbacks"] == {LIMIT: 1}
    monkeypatch.setattr(pool_mod._Worker, "call", real_call)
    # the retry must not meet the 1 s deadline on a loaded machine (it failed
    # there 1 run in 3 at load 12-15): the limit was what the part above tested
    fs.reencoder.parsers.timeout = 30.0
    assert fs.recompress(retry_failed=True) == 1
    assert fs.reencoder.wait_idle(timeout=60)
    assert content(fs, "/a.dcm")["path"] == "frames"
    assert read_file(fs, "/a.dcm") == ct


def test_close_is_bounded_while_a_worker_hangs(make_fs, monkeypatch):
    """A worker stuck in analysis is abandoned and killed at close; the file
    stays in the backlog for the next opening."""
    fs = make_fs(dataclasses.replace(HOSTILE, parser_timeout=600.0))
    ct = F.sources(1)[0].read_bytes()
    write_file(fs, "/a.dcm", ct)
    started = []
    real_call = pool_mod._Worker.call

    def hang(self, request, blob, timeout):
        if request.get("op") == "analyse":
            os.kill(self.proc.pid, signal.SIGSTOP)
            started.append(self.proc)
        return real_call(self, request, blob, timeout)

    monkeypatch.setattr(pool_mod._Worker, "call", hang)
    fs.recompress()
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started
    t = time.monotonic()
    fs.close()
    assert time.monotonic() - t < 10
    assert started[0].poll() is not None  # killed
    monkeypatch.setattr(pool_mod._Worker, "call", real_call)
    fs2 = make_fs(HOSTILE)
    assert fs2.reencoder.backlog[0] == 1
    _drain(fs2, timeout=60)
    assert content(fs2, "/a.dcm")["path"] == "frames" and read_file(fs2, "/a.dcm") == ct


def test_in_process_analysis_still_works(make_fs):
    """-o sandbox=0 (for the benchmark's side-by-side): same plans."""
    fs = make_fs(dataclasses.replace(REAL, sandbox=False))
    ct = F.sources(1)[0].read_bytes()
    write_file(fs, "/a.dcm", ct)
    _drain(fs, timeout=60)
    assert content(fs, "/a.dcm")["path"] == "frames" and read_file(fs, "/a.dcm") == ct


def test_mounted_reproductions_of_the_issue(mounted):
    """Through a real mount and daemon: the three reproductions leave no
    canary in the log, the daemon under 300 MB, every file exact, the
    backlog empty, and umount within its bound."""
    m = mounted
    files = dict(F.crafted())
    for name, data in files.items():
        (m.mnt / f"{name}.dcm").write_bytes(data)
    pid = m.daemon_pid()
    r = m.cli("recompress", m.store, timeout=300)
    assert r.returncode == 0, r.stderr
    for name, data in files.items():
        assert file_sha256(m.mnt / f"{name}.dcm") == sha256(data)
    peak = _peak_rss(pid)  # the daemon's high-water mark since it started
    assert peak < RSS_LIMIT, peak
    t = time.monotonic()
    m.umount()
    assert time.monotonic() - t < 30
    log = m.log()
    assert F.CANARY.decode() not in log and "DOB1970" not in log
    _no_canary_anywhere(m.store, [])
    r = m.cli("stats", m.store, "--key-file", m.key, "--json")
    assert r.returncode == 0 and F.CANARY.decode() not in r.stdout


def test_background_workers_give_way_to_the_pacs(tmp_path):
    """The re-encoder's workers (and their ~0.4 s start-up) run at a lower
    CPU priority than the daemon; the view's on-demand workers do not."""
    from dcmfs.sandbox.pool import BACKGROUND_NICE
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, want in ((BACKGROUND_NICE, min(19, mine + BACKGROUND_NICE)), (0, mine)):
        p = ParserPool(1, nice=nice)
        try:
            p.warm()
            assert psutil.Process(p._idle[0].proc.pid).nice() == want
        finally:
            p.close()
    assert BACKGROUND_NICE > 0
