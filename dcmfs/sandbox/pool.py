"""Parser workers for the daemon: DICOM analysis and image encoding of
hostile files, outside the daemon's address space.

Every file written into the mount is hostile input.  What parses file
content - pydicom's analysis of a header, the image codecs' encoders given a
frame of untrusted geometry - runs in :mod:`dcmfs.sandbox.worker` processes
that hold no key, cannot write files, run as ``nobody`` when the daemon is
root, and are capped in memory and CPU time; the daemon adds a wall-clock
limit per request.  A worker that breaches a limit, crashes or answers
nonsense is killed and replaced, and the caller gets a
:class:`ParserFailure` with a fixed reason (:data:`LIMIT`, :data:`CRASHED`),
never a message from the parser.  Workers stay warm between files.

The daemon trusts nothing a worker says: a plan's fields are checked
against the file's size and the codec's limits here, and every payload is
decoded and compared with the original bytes before it is stored (as the
read path decodes it), so a worker taken over by a crafted file can make
dcmfs store a file with the general codec, never store something else.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

from ..errors import DcmfsError
from ..storage.codec import IMAGE_CODECS, NONE, ZSTD, FrameSpec
from ..storage.deid import WITHHELD_REASONS
from ..storage.dicom import MAX_FRAME, Plan
from . import protocol

log = logging.getLogger("dcmfs.sandbox")

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: pipe buffers to the workers (a 256 KiB band crosses in one write; measured:
#: a whole-file analysis 1.72 -> 0.92 ms, a band's round trip 5.77 -> 5.57 ms)
PIPE_SIZE = 1 << 20
#: the analysis first sends this much of a file: a header is a few kilobytes
#: (1.72 ms for a 513 KB CT slice sent whole, 0.72 ms for 64 KiB); only when
#: the Pixel Data does not start within it is the rest up to HEADER_CAP sent
FIRST_BYTES = 64 * 1024

#: nice value of the re-encoder's workers (the view's answer reads: 0)
BACKGROUND_NICE = 10

#: fixed reasons a file stays with the general codec when its worker failed
LIMIT = "analysis limit"
CRASHED = "analysis crashed"
UNREADABLE = "unreadable"
REASONS = (LIMIT, CRASHED, UNREADABLE)

_INFO_KEYS = {"kind": str, "modality": str, "ts": str, "photometric": str,
              "bits_allocated": int, "bits_stored": int, "samples": int, "frames": int}
_REASON = re.compile(r"^[A-Za-z0-9 ()._+-]{0,80}$")
_TEXT = re.compile(r"^[A-Za-z0-9 ._?-]{0,64}$")
#: a UID as the de-identified view maps it (PS3.5: digits and dots, at most
#: 64; a malformed one is still mapped, never passed through)
_UID = re.compile(r"^[^\x00-\x1f]{1,128}$")


class ParserFailure(DcmfsError):
    """A worker breached a limit, crashed or answered nonsense (``reason``
    is one of :data:`REASONS`), or the pool was closed (``stopped``)."""

    def __init__(self, reason: str, stopped: bool = False) -> None:
        super().__init__(f"the parser worker failed: {reason}")
        self.reason = reason
        self.stopped = stopped


class _Worker:
    def __init__(self, memory: int, nice: int = 0) -> None:
        self.memory = memory
        env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG", "LC_ALL")
               if k in os.environ}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcmfs.sandbox.worker", str(memory), str(nice)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True, cwd="/", env=env, start_new_session=True)
        self.wfd = self.proc.stdin.fileno()
        os.set_blocking(self.wfd, False)  # a worker that stops reading must not block us
        self.rfd = self.proc.stdout.fileno()
        for fd in (self.wfd, self.rfd):  # a band in one write, not sixteen
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: 64 KiB pipes still work
        self.requests = 0

    def call(self, request: dict, blob: bytes, timeout: float) -> tuple[dict, bytes]:
        """Send one request, wait at most ``timeout`` seconds for the reply
        to begin (a worker writes its reply in one go once it is done)."""
        self.requests += 1
        deadline = time.monotonic() + timeout
        protocol.send(self.wfd, request, blob, deadline)
        # wait for the reply, watching the worker's memory from outside (its
        # own RLIMIT_DATA may have been refused by a seccomp filter)
        while not select.select([self.rfd], [], [], min(0.1, max(0.0, deadline -
                                                                 time.monotonic())))[0]:
            if time.monotonic() >= deadline:
                raise TimeoutError
            if self.rss() > self.memory:
                raise MemoryError
        return protocol.recv(self.rfd)

    def rss(self) -> int:
        """The worker's resident bytes (0 once it is gone)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    def signal_kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def kill(self) -> None:
        """Kill the worker and close its pipes (by the thread that owns it)."""
        self.signal_kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def died_by_limit(self) -> bool:
        code = self.proc.poll()
        return code in (-signal.SIGXCPU, -signal.SIGKILL, -signal.SIGXFSZ)


class ParserPool:
    """Up to ``size`` warm workers, started on first use; thread-safe."""

    def __init__(self, size: int = 2, memory: int = 1024 * 1024 * 1024,
                 timeout: float = 30.0, nice: int = 0) -> None:
        self.size = max(1, size)
        #: added to the workers' nice value: background work (the
        #: re-encoder's) gives way to the PACS, from the workers' start-up on
        self.nice = nice
        self.memory = memory
        self.timeout = timeout
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._warned = False
        #: counters for status and tests
        self.started = 0
        self.failures = 0

    # --- workers ---------------------------------------------------------------
    def _checkout(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise ParserFailure("stopped", stopped=True)
                if self._idle:
                    w = self._idle.pop()
                    break
                if len(self._busy) < self.size:
                    w = None
                    break
                self._cond.wait(0.5)
            if w is None:
                self.started += 1
            placeholder = w or object()
            self._busy.add(placeholder)
        if w is None:
            try:
                w = _Worker(self.memory, self.nice)
            except OSError as exc:
                with self._cond:
                    self._busy.discard(placeholder)
                    self._cond.notify()
                raise ParserFailure(CRASHED) from exc
            with self._cond:
                self._busy.discard(placeholder)
                self._busy.add(w)
        return w

    def _checkin(self, w: _Worker, ok: bool) -> None:
        with self._cond:
            self._busy.discard(w)
            if ok and not self._closed:
                self._idle.append(w)
                w = None
            self._cond.notify()
        if w is not None:
            w.kill()

    def _call(self, request: dict, blob: bytes, timeout: float) -> tuple[dict, bytes]:
        w = self._checkout()
        ok = False
        try:
            try:
                reply, out = w.call(request, blob, timeout)
            except (TimeoutError, MemoryError):
                raise ParserFailure(LIMIT) from None
            except (protocol.ProtocolError, OSError, ValueError):
                if self._closed:
                    raise ParserFailure("stopped", stopped=True) from None
                w.kill()
                raise ParserFailure(LIMIT if w.died_by_limit() else CRASHED) from None
            if "error" in reply:
                limit = reply["error"] in ("MemoryError", "RecursionError")
                ok = not limit  # past a limit the worker is replaced
                raise ParserFailure(LIMIT if limit else UNREADABLE)
            ok = True
            return reply, out
        except ParserFailure as exc:
            if not exc.stopped:
                self.failures += 1
            raise
        finally:
            self._checkin(w, ok)

    def close(self) -> None:
        """Kill every worker now (bounded stop: a request in flight fails
        with ``stopped``; its file stays in the backlog)."""
        with self._cond:
            self._closed = True
            idle, busy = list(self._idle), [w for w in self._busy if isinstance(w, _Worker)]
            self._idle.clear()
            self._cond.notify_all()
        for w in busy:  # their threads see the pipe break and close it themselves
            w.signal_kill()
        for w in idle:
            w.kill()

    # --- requests ----------------------------------------------------------------
    def warm_all(self) -> None:
        """Start every worker now, at once (the first files need not wait for
        Python to import pydicom and imagecodecs, ~0.4 s each)."""
        threads = [threading.Thread(target=self._warm_quietly, daemon=True)
                   for _ in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _warm_quietly(self) -> None:
        try:
            self.warm()
        except ParserFailure:
            pass  # the first file will say so

    def warm(self) -> dict:
        """Start a worker now (a warm worker answers in about a millisecond);
        returns which confinements took effect, and says once in the log
        when one did not (a hardened unit may refuse some)."""
        reply, _ = self._call({"op": "ping"}, b"", self.timeout)
        confined = reply.get("confined") if isinstance(reply.get("confined"), dict) else {}
        missing = sorted(k for k, v in confined.items() if v is not True)
        if missing and not self._warned:
            self._warned = True
            log.warning("parser workers run without %s (refused here); the daemon still "
                        "bounds their memory and time", ", ".join(missing))
        return confined

    def analyse(self, head: bytes, size: int) -> Plan:
        """The :class:`~dcmfs.storage.dicom.Plan` of a file whose first
        bytes are ``head`` (checked: a plan that does not fit the file is
        :data:`UNREADABLE`)."""
        return analyse_in_two_steps(head, size, self._analyse_once)

    def _analyse_once(self, head: bytes, size: int) -> Plan:
        reply, _ = self._call({"op": "analyse", "size": size}, head, self.timeout)
        return checked_plan(reply.get("plan"), size)

    def encode(self, plaintext: bytes, frame: FrameSpec, zstd_level: int,
               image: tuple[int, ...], hot: bool = False) -> tuple[int, bytes]:
        """(codec, payload) of one band: the cheapest exact result of the
        image codecs and zstd (``hot``: the hot tier's codecs and weight,
        :data:`~dcmfs.storage.codec.HOT`).  The caller decodes and compares
        it before it stores it."""
        # encoders take ~20 ms per MB each; the limit scales with the band
        timeout = self.timeout + len(plaintext) / 1e6
        reply, payload = self._call({"op": "encode", "frame": list(frame),
                                     "zstd_level": zstd_level, "image": list(image),
                                     "hot": bool(hot)},
                                    plaintext, timeout)
        used = reply.get("codec")
        if used not in IMAGE_CODECS | {ZSTD, NONE} or not isinstance(payload, bytes):
            self.failures += 1
            raise ParserFailure(UNREADABLE)
        return used, payload


    def deid_facts(self, head: bytes, size: int) -> dict:
        """What the de-identified view lists of a file (checked, see
        :func:`checked_facts`)."""
        reply, _ = self._call({"op": "deid-facts", "size": size}, head, self.timeout)
        return checked_facts(reply.get("facts"), size)

    def deid_rewrite(self, header: bytes, facts: dict, mapping: dict, pseudonym: str,
                     shift: int | None, characteristics: bool, device: bool,
                     safe_private: bool = False) -> bytes:
        """The de-identified header of a file (``header``: its bytes up to
        the Pixel Data value); checked to end with the file's own Pixel Data
        element header and to hold none of the file's original UIDs."""
        reply, out = self._call({"op": "deid-rewrite", "element_at": facts["element_at"],
                                 "value_at": facts["value_at"], "mapping": mapping,
                                 "pseudonym": pseudonym, "shift": shift,
                                 "characteristics": characteristics, "device": device,
                                 "safe_private": safe_private},
                                header, self.timeout)
        element = header[facts["element_at"]:facts["value_at"]]
        if reply.get("ok") is not True or not out.endswith(element) \
                or len(out) > 2 * len(header) + 65536 or out[128:132] != b"DICM" \
                or any(uid.encode() in out for uid in facts["uids"]):
            self.failures += 1
            raise ParserFailure(UNREADABLE)
        return out


def checked_facts(raw, size: int) -> dict:
    """A worker's facts, field by field (a worker taken over by a crafted
    file can make the view withhold the file or show its own bytes, never
    make the daemon misread another file)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("reason"), str) \
            or not _REASON.match(raw["reason"]):
        raise ParserFailure(UNREADABLE)
    out = {"dicom": raw.get("dicom") is True, "reason": raw["reason"]}
    if raw["reason"]:
        return out
    if raw.get("withheld") not in WITHHELD_REASONS:  # shown by 'dcmfs stats': a fixed text only
        raise ParserFailure(UNREADABLE)
    texts = {"withheld": 100, "patient": 1024, "study": 64, "series": 64, "sop": 64,
             "modality": 16}
    for key, limit in texts.items():
        if not isinstance(raw.get(key), str) or len(raw[key]) > limit:
            raise ParserFailure(UNREADABLE)
        out[key] = raw[key]
    ints = [raw.get(k) for k in ("element_at", "value_at", "pixel_end")]
    if not all(isinstance(v, int) for v in ints) or not 0 <= ints[0] < ints[1] <= ints[2] <= size:
        raise ParserFailure(UNREADABLE)
    out.update(element_at=ints[0], value_at=ints[1], pixel_end=ints[2])
    uids = raw.get("uids")
    if not isinstance(uids, list) or not all(isinstance(u, str) and _UID.match(u)
                                             for u in uids):
        raise ParserFailure(UNREADABLE)
    out["uids"] = uids
    return out


def analyse_in_two_steps(head: bytes, size: int, analyse) -> Plan:
    """``analyse(first bytes, size)`` on the first :data:`FIRST_BYTES`; a
    plan that codes frames is kept (the parser stops at the Pixel Data, so
    the rest of the file could not change it), any other answer is asked
    again of all of ``head`` (a header longer than the first bytes, or one
    the parser could not finish in them)."""
    if len(head) > FIRST_BYTES:
        plan = analyse(head[:FIRST_BYTES], size)
        if plan.codes_frames:
            return plan
    return analyse(head, size)


def checked_plan(raw, size: int) -> Plan:
    """A plan from a worker's JSON, or :class:`ParserFailure` when any field
    is not what :func:`dcmfs.storage.dicom.analyse` can return for a file
    of ``size`` bytes."""
    try:
        info = raw["info"]
        if not isinstance(info, dict) or not set(info) <= set(_INFO_KEYS):
            raise ValueError
        for key, value in info.items():
            if type(value) is not _INFO_KEYS[key] or (
                    isinstance(value, str) and not _TEXT.match(value)):
                raise ValueError
        reason = raw["reason"]
        offset, frames = raw["pixel_offset"], raw["frames"]
        if not isinstance(reason, str) or not _REASON.match(reason) \
                or type(offset) is not int or type(frames) is not int:
            raise ValueError
        spec = None
        if raw["frame"] is not None:
            f = raw["frame"]
            if not isinstance(f, list) or len(f) != 8 \
                    or not all(type(v) is int for v in f[:5]) \
                    or not all(type(v) is bool for v in f[5:]):
                raise ValueError
            spec = FrameSpec(*f)
            if not (0 < spec.rows < 65536 and 0 < spec.columns < 65536
                    and spec.samples in (1, 3) and spec.bits_allocated in (8, 16)
                    and 0 < spec.nbytes <= MAX_FRAME):
                raise ValueError
        plan = Plan(info, reason, offset, frames, spec)
        if plan.codes_frames and not (0 <= offset and frames > 0
                                      and offset + frames * spec.nbytes <= size):
            raise ValueError
        return plan
    except (KeyError, TypeError, ValueError):
        raise ParserFailure(UNREADABLE) from None
