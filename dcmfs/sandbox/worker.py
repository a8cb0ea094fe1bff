"""A parser worker: ``python -m dcmfs.sandbox.worker MEMORY_BYTES``.

Started by :class:`dcmfs.sandbox.pool.ParserPool` with its requests on
stdin and its replies on stdout (:mod:`dcmfs.sandbox.protocol`), stderr on
/dev/null.  Before it reads a request it

* caps its heap (``RLIMIT_DATA``, MEMORY_BYTES) and forbids core dumps and
  writing any file (``RLIMIT_CORE``, ``RLIMIT_FSIZE`` = 0);
* sets ``PR_SET_NO_NEW_PRIVS`` and, started as root, gives up root for
  ``nobody`` (65534), so it cannot open the store (0700, root's);
* loads pydicom, numpy, imagecodecs and zstandard once (a warm worker
  answers a CT slice's analysis in about a millisecond).

It holds no key and is given no path: it sees the bytes the daemon sends
(the start of a file, one band of samples) and nothing else.  Each request
gets a CPU-time budget (``RLIMIT_CPU``: SIGXCPU ends the worker); the daemon
enforces a wall-clock limit too and kills the worker when it is past it.
"""

from __future__ import annotations

import ctypes
import io
import os
import resource
import sys

PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534
#: CPU seconds a request may use (the daemon's wall-clock limit is the real bound)
CPU_PER_REQUEST = 60
#: glibc malloc settings of a worker (mallopt): blocks below 4 MiB come from
#: the heap, and up to 16 MiB of freed heap is kept.  With glibc's defaults
#: every band's buffers (0.25-1 MiB: the request, the samples, the codestream)
#: were mapped and unmapped again: ~480 page faults per 256 KiB band; a CT
#: slice (analysis and two bands) took 9.5 ms of worker CPU, 6.5 ms with these
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 4 << 20), (M_TRIM_THRESHOLD, 16 << 20))


def confine(memory: int) -> dict:
    """Limits and privileges of a worker (see the module docstring); returns
    which of them took effect.  Each is best effort: a seccomp filter or a
    capability bounding set (a hardened unit) may refuse one, and the daemon
    enforces the memory and time limits from outside anyway."""
    done = {}
    for name, limit, value in (("core", resource.RLIMIT_CORE, 0),
                               ("fsize", resource.RLIMIT_FSIZE, 0),
                               ("data", resource.RLIMIT_DATA, memory)):
        try:
            resource.setrlimit(limit, (value, value))
            done[name] = True
        except (OSError, ValueError):
            done[name] = False
    try:
        done["no_new_privs"] = ctypes.CDLL(None, use_errno=True).prctl(
            PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        done["no_new_privs"] = False
    if os.getuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError:
            pass
    done["unprivileged"] = os.getuid() != 0 and os.geteuid() != 0
    return done


def steady_heap() -> None:
    """Keep a worker's band buffers in its heap (:data:`MALLOC_SETTINGS`;
    the heap cap, ``RLIMIT_DATA``, still holds)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: its own allocator's policy
    for param, value in MALLOC_SETTINGS:
        mallopt(param, value)


def _cpu_budget() -> None:
    try:
        _set_cpu_budget()
    except (OSError, ValueError):
        pass  # refused by a seccomp filter: the daemon's deadline remains


def _set_cpu_budget() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = used + CPU_PER_REQUEST
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


class _Prefix(io.BytesIO):
    """The start of a file: reads past it find the end of the file."""


#: what :func:`confine` achieved (the answer to a ping)
CONFINED: dict = {}


def handle(request: dict, blob: bytes) -> tuple[dict, bytes]:
    from ..storage import codec, dicom

    op = request.get("op")
    if op == "analyse":
        plan = dicom.analyse(_Prefix(blob), int(request["size"]))
        frame = list(plan.frame) if plan.frame is not None else None
        return {"plan": {"info": plan.info, "reason": plan.reason,
                         "pixel_offset": plan.pixel_offset, "frames": plan.frames,
                         "frame": frame}}, b""
    if op == "encode":
        spec = codec.FrameSpec(*request["frame"])
        codecs = codec.Codecs(int(request["zstd_level"]),
                              image=tuple(codec.IDS[i] for i in request["image"]))
        used, payload = codecs.compress(codec.IMAGE_HOT if request.get("hot") else codec.IMAGE,
                                        blob, spec)
        return {"codec": used}, payload
    if op == "deid-facts":
        from ..storage import deid
        return {"facts": deid.facts(blob, int(request["size"]))}, b""
    if op == "deid-rewrite":
        from ..storage import deid
        shift = request["shift"]
        return {"ok": True}, deid.rewrite(
            blob, int(request["element_at"]), int(request["value_at"]), request["mapping"],
            str(request["pseudonym"]), None if shift is None else int(shift),
            bool(request["characteristics"]), bool(request["device"]),
            bool(request.get("safe_private", False)))
    if op == "ping":
        return {"pong": True, "confined": CONFINED}, b""
    return {"error": "UnknownRequest"}, b""


def _load_charsets() -> None:
    """Import the codec of every DICOM character set now: Python imports
    them on first use, and a worker that gave up root may no longer read
    the interpreter's directory (a pyenv under /root), which made a header
    in ISO 2022 or Latin-2 'unreadable'."""
    import codecs

    from pydicom import charset
    for name in set(charset.python_encoding.values()):
        try:
            codecs.lookup(name)
        except LookupError:
            pass


def main(argv: list[str]) -> int:
    from . import protocol

    memory = int(argv[1])
    if len(argv) > 2 and int(argv[2]) > 0:
        # before the imports: starting a worker costs ~0.4 s of CPU, which
        # must not be taken from the files being written meanwhile
        try:
            os.nice(int(argv[2]))
        except OSError:
            pass  # a unit's syscall filter may refuse setpriority: full priority then
    steady_heap()
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    # nothing may print into the protocol stream
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    import imagecodecs  # noqa: F401  (loaded before the limits: shared code, no heap)
    import numpy  # noqa: F401
    import pydicom  # noqa: F401
    import zstandard  # noqa: F401
    from ..storage import codec, deid, dicom  # noqa: F401
    deid.table()  # the profile's table (plain data, ~5 ms)
    _load_charsets()  # as nobody the interpreter's own files may be out of reach later
    CONFINED.update(confine(memory))
    while True:
        try:
            request, blob = protocol.recv(rfd)
        except protocol.ProtocolError:
            return 0  # the daemon hung up
        _cpu_budget()
        try:
            reply, out = handle(request, blob)
        except Exception as exc:  # noqa: BLE001 — the type only: messages quote bytes
            reply, out = {"error": type(exc).__name__}, b""
        del blob
        protocol.send(wfd, reply, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
