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

Here a request is served by the thread that read it, and only one thread
reads at a time (the *reader*).  Before a request the adapter knows to be
long (:func:`hand_over`: large reads and writes, fsync, the close of a
file that wrote much) the reader looks at the device: a request waiting
already goes to another thread at once; else the supervisor (the thread
that called :meth:`Loop.serve`) watches the device while the long request
runs, and gives the next request to another thread as soon as it comes.
Any other request that has run for ``stall`` seconds is treated the same
way.  The other thread is a parked one, or a new one (up to
``max_threads``); a thread whose request is done parks while another one
reads.  So one sequential client is served by one thread, and concurrency
comes where work is long, as with the pool.

Only ctypes here: the caller passes libfuse (``mfusepy._libfuse``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import select
import signal
import threading
import time

log = logging.getLogger("dcmfs.fuse")

_LOCAL = threading.local()
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


def _free(mem: int) -> None:
    _libc.free(mem)


class _FuseBuf(ctypes.Structure):
    # libfuse 3's struct fuse_buf, with room to spare for fields added later
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_longlong), ("spare", ctypes.c_byte * 64)]


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


def hand_over() -> None:
    """Called by the adapter before a request that may take long: if
    another request comes meanwhile, another thread reads and serves it (a
    no-op outside :class:`Loop`)."""
    loop = getattr(_LOCAL, "loop", None)
    if loop is not None:
        loop.long(threading.get_ident())


class Loop:
    """Serves one FUSE session (see the module's docstring)."""

    #: seconds a supervisor without requests to watch sleeps between looks
    DOZE = 0.25

    def __init__(self, lib, se, max_threads: int = 10, stall: float = 0.02) -> None:
        self._lib = lib
        self._se = se
        #: the device (looked at by a reader that starts a long request, and
        #: by the supervisor: each with a call of its own, since two readers
        #: may start long requests at once)
        self._fd = lib.fuse_session_fd(se)
        self._max = max_threads
        self.stall = stall
        self._lock = threading.Lock()
        self._workers = threading.Condition(self._lock)  # parked threads wait here
        self._watch = threading.Condition(self._lock)  # the supervisor waits here
        #: the thread that reads the next request (None: a parked or new one)
        self._reader: int | None = None
        #: when the reader's request started (None: it is reading)
        self._since: float | None = None
        #: (reader, since) of a request the adapter called long
        self._long: tuple[int, float] | None = None
        self._served = 0
        self._dozing = False
        self._parked = 0
        self._threads: list[threading.Thread] = []
        self._ended = False
        #: requests during which another thread took over the reading
        self.hand_overs = 0

    # --- the workers --------------------------------------------------------------
    def _start(self) -> None:
        """(under the lock) one more worker."""
        t = threading.Thread(target=self._serve, daemon=True,
                             name=f"dcmfs-fuse-{len(self._threads)}")
        self._threads.append(t)
        t.start()

    def _serve(self) -> None:
        me = threading.get_ident()
        buf = _FuseBuf()
        receive, process = self._lib.fuse_session_receive_buf, self._lib.fuse_session_process_buf
        se, ref = self._se, ctypes.byref(buf)
        _LOCAL.loop = self
        try:
            while True:
                with self._lock:
                    while self._reader not in (None, me) and not self._ended:
                        self._parked += 1
                        self._workers.wait()
                        self._parked -= 1
                    if self._ended:
                        return
                    self._reader, self._since, self._long = me, None, None
                res = receive(se, ref)
                if res <= 0:  # EINTR: a signal, perhaps the one that ends the session
                    if res != -errno.EINTR or self._lib.fuse_session_exited(se):
                        return
                    continue
                self._since = time.monotonic()
                self._served += 1
                if self._dozing:
                    with self._lock:
                        self._watch.notify()
                process(se, ref)
        finally:
            with self._lock:  # the session is over (or this loop broke): all stop
                self._ended = True
                self._workers.notify_all()
                self._watch.notify()
            if buf.mem:
                _free(buf.mem)

    def long(self, me: int) -> None:
        """The reader ``me`` starts a long request: the supervisor watches
        the device meanwhile."""
        with self._lock:
            if self._reader != me or self._since is None:
                return
            self._long = long = (me, self._since)
        if select.select([self._fd], [], [], 0)[0]:  # a request waits: another thread, now
            self._give(*long)
        else:
            with self._lock:
                self._watch.notify()

    def _give(self, reader: int, since: float) -> None:
        """Another thread reads instead of ``reader``, still at the request
        that started at ``since``."""
        with self._lock:
            if self._reader != reader or self._since != since or self._ended:
                return
            self.hand_overs += 1
            self._reader = self._long = None
            if self._parked:
                self._workers.notify()
            elif len(self._threads) < self._max:
                self._start()
            # else every thread is at a request: the next one waits for one

    # --- the supervisor -------------------------------------------------------------
    def serve(self) -> None:
        """Serve until the session ends (unmounted, or a signal), then wait
        for the requests being served.  While the reader is at a long
        request, a request waiting in the device gives the reading to
        another thread at once; at any other request, after ``stall``."""
        device = select.poll()
        device.register(self._fd, select.POLLIN)
        with self._lock:
            self._start()
        served = -1
        while True:
            with self._lock:
                if self._long is None and not self._ended:
                    busy = self._served != served or self._since is not None
                    served = self._served
                    self._dozing = not busy
                    self._watch.wait(self.stall / 2 if busy else self.DOZE)
                    self._dozing = False
                if self._ended:
                    break
                long, reader, since = self._long, self._reader, self._since
            if long is not None:
                # a request coming while the long one runs (it may end first:
                # then its thread reads on, and this look ends with the timeout)
                if device.poll(self.stall * 1000) and self._long == long:
                    self._give(*long)
            elif reader is not None and since is not None \
                    and time.monotonic() - since > self.stall:
                self._give(reader, since)
            if self._lib.fuse_session_exited(self._se):
                self._interrupt()
        for t in self._threads:
            t.join()

    def _interrupt(self) -> None:
        """The session was told to end by a signal that reached another
        thread than the reader: interrupt the reader's read (libfuse's
        handler again: the read returns EINTR and the loop sees the end)."""
        with self._lock:
            reader = None if self._ended or self._since is not None else self._reader
        if reader is not None:
            try:
                signal.pthread_kill(reader, signal.SIGTERM)
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
    for name in ("fuse_session_exited", "fuse_session_fd", "fuse_set_signal_handlers",
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
