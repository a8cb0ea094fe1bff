"""The request loop of a mount: one thread reads and serves requests in
turn, and another takes over the reading while a request takes long.

libfuse's multi-threaded loop keeps a pool of threads blocked in
``read(/dev/fuse)``, and the kernel hands each request to the one that has
waited longest: a sequential client's requests rotate over all of them,
each a sleeping thread woken on a core of its own (issue 17).  Measured
side by side, libfuse's single thread served stat 20-37 %, create 10-15 %
and unlink 6-14 % faster than its pool; but with one thread, a request that
waits (a fsync of a gigabyte, a cold object from S3) stalls every process
using the mount.

Here libfuse's single-threaded loop serves the mount on the thread that
mounted it (no Python between requests), and helper threads read and serve
requests only while that thread (or a helper) is at a long one.  Before a
request the adapter knows to be long (:func:`hand_over`: large reads and
writes, the close of a file that wrote much, fsync) the thread looks at
the device: a request waiting already is read by a helper at once (several
writers, or the kernel's read-ahead, keep requests waiting).  For one that
may take very long (fsync) a supervisor thread also watches the device
while it runs, and has a helper read as soon as a request comes; and any
request that has run for ``stall`` seconds gets a helper too.  A helper
reads on while another thread is still at its request, then waits to be
asked again (up to ``max_threads`` of them).  So one sequential client is
served by one thread, and concurrency comes where work is long, as with
the pool.

Only ctypes here: the caller passes libfuse (``mfusepy._libfuse``).
"""

from __future__ import annotations

import ctypes
import errno
import select
import signal
import threading
import time

_LOCAL = threading.local()
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


class _FuseBuf(ctypes.Structure):
    # libfuse 3's struct fuse_buf, with room to spare for fields added later
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_longlong), ("spare", ctypes.c_byte * 64)]


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


def hand_over(watch: bool = False) -> None:
    """Called by the adapter before a request that may take long: a request
    waiting already is read and served by another thread; with ``watch``
    (a request that may take very long), so is one that comes while this
    one runs (a no-op outside :class:`Loop`)."""
    loop = getattr(_LOCAL, "loop", None)
    if loop is not None:
        loop.long(watch)


def started() -> None:
    """The adapter starts serving a request on this thread."""
    slot = getattr(_LOCAL, "slot", None)
    if slot is not None:
        slot[0] = time.monotonic()


def ended() -> None:
    """The adapter has served it."""
    slot = getattr(_LOCAL, "slot", None)
    if slot is not None:
        slot[0] = None


class Loop:
    """Serves one FUSE session (see the module's docstring)."""

    #: seconds between the supervisor's looks at requests that run, and
    #: while none came for a second
    TICK = 0.01
    DOZE = 0.25

    def __init__(self, lib, se, max_threads: int = 10, stall: float = 0.02) -> None:
        self._lib = lib
        self._se = se
        #: the device (a select of its own for each look: two threads may look at once)
        self._fd = lib.fuse_session_fd(se)
        self._max = max_threads
        self.stall = stall
        self._lock = threading.Lock()
        self._summon = threading.Condition(self._lock)  # idle helpers wait here
        self._wake = threading.Condition(self._lock)  # the supervisor waits here
        #: per thread serving: [start of its request or None, reading]
        self._slots: dict[int, list] = {}
        #: helpers asked to read (and not reading yet)
        self._asked = 0
        self._idle = 0
        self._helpers: list[threading.Thread] = []
        #: long requests (by thread) that want the device watched while they run
        self._watched: dict[int, float] = {}
        self._ended = False

    # --- the main thread: libfuse's own loop ----------------------------------------
    def serve(self) -> None:
        """Serve until the session ends (unmounted, or a signal): libfuse's
        single-threaded loop on this thread (no Python between requests),
        helpers started and summoned by a supervisor thread."""
        me = threading.get_ident()
        _LOCAL.loop, _LOCAL.slot = self, self._slot(me, reading=True)
        supervisor = threading.Thread(target=self._supervise, args=(me,), daemon=True,
                                      name="dcmfs-fuse-watch")
        supervisor.start()
        try:
            self._lib.fuse_session_loop(self._se)
        finally:
            with self._lock:
                self._ended = True
                self._summon.notify_all()
                self._wake.notify()
            supervisor.join()
            for t in self._helpers:
                while t.is_alive():  # a helper in its read: the signal interrupts it
                    if self._slots.get(t.ident, (None, False))[1]:
                        self._kick(t.ident)
                    t.join(0.1)

    def _slot(self, ident: int, reading: bool) -> list:
        slot = self._slots[ident] = [None, reading]
        return slot

    # --- helpers ---------------------------------------------------------------------
    def long(self, watch: bool) -> None:
        """This thread starts a long request: a helper takes a request that
        waits already; with ``watch`` the supervisor watches the device
        while it runs."""
        if select.select([self._fd], [], [], 0)[0]:
            self._ask()
        elif watch:
            with self._lock:
                self._watched[threading.get_ident()] = time.monotonic()
                self._wake.notify()

    def _ask(self) -> None:
        """A helper reads the next request (unless one reads already)."""
        with self._lock:
            if self._ended or self._asked or any(
                    slot[1] and slot[0] is None for slot in self._slots.values()):
                return
            self._asked += 1
            if self._idle:
                self._summon.notify()
            elif len(self._helpers) < self._max:
                t = threading.Thread(target=self._help, daemon=True,
                                     name=f"dcmfs-fuse-{len(self._helpers)}")
                self._helpers.append(t)
                t.start()
            else:  # every thread is at a request: the next one waits for one
                self._asked -= 1

    def _busy(self, me: int) -> bool:
        """(under the lock) is a thread other than ``me`` at a request?"""
        return any(slot[0] is not None for ident, slot in self._slots.items() if ident != me)

    def _help(self) -> None:
        me = threading.get_ident()
        buf = _FuseBuf()
        receive, process = self._lib.fuse_session_receive_buf, self._lib.fuse_session_process_buf
        se, ref = self._se, ctypes.byref(buf)
        _LOCAL.loop = self
        with self._lock:
            _LOCAL.slot = slot = self._slot(me, reading=False)
        try:
            while True:
                with self._lock:
                    while not self._asked and not self._ended:
                        self._idle += 1
                        self._summon.wait()
                        self._idle -= 1
                    if self._ended:
                        return
                    self._asked -= 1
                    slot[1] = True
                while True:  # read while another thread is still at its request
                    res = receive(se, ref)
                    if res <= 0:
                        if res != -errno.EINTR or self._lib.fuse_session_exited(se):
                            return
                        continue
                    slot[1] = False
                    process(se, ref)
                    self._watched.pop(me, None)
                    with self._lock:
                        if not self._busy(me) or self._ended:
                            break
                        slot[1] = True
        finally:
            with self._lock:
                slot[1] = False
                self._slots.pop(me, None)
            if buf.mem:
                _libc.free(buf.mem)

    # --- the supervisor --------------------------------------------------------------
    def _supervise(self, main: int) -> None:
        """Asks a helper to read while a request runs for ``stall`` seconds,
        or while a watched one runs and a request comes; ends the session's
        loop when a signal that ended the session reached another thread."""
        device = select.poll()
        device.register(self._fd, select.POLLIN)
        recent = 0.0
        while True:
            with self._lock:
                # every TICK while requests come, else at DOZE (a watched
                # request wakes it at once)
                idle = time.monotonic() - recent > 1.0 and not self._watched
                if self._wake.wait_for(lambda: self._ended, self.DOZE if idle else self.TICK):
                    return
                now = time.monotonic()
                if any(slot[0] is not None for slot in self._slots.values()):
                    recent = now
                stalled = any(slot[0] is not None and now - slot[0] > self.stall
                              for slot in self._slots.values())
            for ident, since in list(self._watched.items()):
                slot = self._slots.get(ident)
                if slot is None or slot[0] is None or slot[0] > since:
                    self._watched.pop(ident, None)  # that request is done
                elif device.poll(0):
                    self._ask()
            if stalled:
                self._ask()
            if self._lib.fuse_session_exited(self._se):
                self._kick(main)

    @staticmethod
    def _kick(ident: int | None) -> None:
        """Interrupt a thread's read of the device (libfuse's handler again:
        the read returns EINTR, and the loop sees the session's end)."""
        if ident is not None:
            try:
                signal.pthread_kill(ident, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                pass


def main_real(lib, original):
    """A ``fuse_main_real`` for mfusepy: a mount with libfuse's single
    thread (``-s``) is left to ``original``; any other is served by
    :class:`Loop`."""
    lib.fuse_new.restype = ctypes.c_void_p
    lib.fuse_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fuse_get_session.restype = ctypes.c_void_p
    lib.fuse_get_session.argtypes = [ctypes.c_void_p]
    for name in ("fuse_mount", "fuse_unmount", "fuse_destroy"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] + ([ctypes.c_char_p]
                                                             if name == "fuse_mount" else [])
    for name in ("fuse_session_receive_buf", "fuse_session_process_buf"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
    lib.fuse_session_process_buf.restype = None
    for name in ("fuse_session_exited", "fuse_session_fd", "fuse_session_loop",
                 "fuse_set_signal_handlers",
                 "fuse_remove_signal_handlers"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.fuse_remove_signal_handlers.restype = None

    def run(argc, argv, ops, ops_size, user_data):
        args = [argv[i] for i in range(argc)]
        if b"-s" in args:
            return original(argc, argv, ops, ops_size, user_data)
        # what fuse_main_real does, with this loop: -f and -s are its own,
        # the mountpoint its last argument
        mountpoint = args[-1]
        keep = [a for a in args[:-1] if a not in (b"-f", b"-s")]
        c_argv = (ctypes.c_char_p * (len(keep) + 1))(*keep, None)
        fargs = _FuseArgs(len(keep), c_argv, 0)
        fuse = lib.fuse_new(ctypes.byref(fargs), ops, ops_size, user_data)
        if not fuse:
            return 3
        try:
            if lib.fuse_mount(fuse, mountpoint) != 0:
                return 4
            se = lib.fuse_get_session(fuse)
            if lib.fuse_set_signal_handlers(se) != 0:
                lib.fuse_unmount(fuse)
                return 5
            try:
                Loop(lib, se).serve()
            finally:
                lib.fuse_remove_signal_handlers(se)
                lib.fuse_unmount(fuse)
        finally:
            lib.fuse_destroy(fuse)
        return 0
    return run
