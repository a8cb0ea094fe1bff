"""One writer per bucket prefix: the lease objects of an S3 store.

A read-write opening holds ``PREFIX/lease-N`` (N a decimal generation),
created with a conditional PUT (``If-None-Match: *``), so of two machines
creating the same N exactly one wins.  The lease is JSON: ``holder`` (a
random id of this opening), ``host``, ``pid``, ``expires`` (Unix seconds of
the holder's clock).  The holder renews it every :data:`TTL` / 3 seconds
(``expires`` = now + :data:`TTL`), and at a clean close writes it back
with ``expires`` 0 (released: the next writer takes ``lease-(N+1)`` at once,
so generations only grow).

The rule for a stale lease, explicit: a lease whose ``expires`` lies more
than :data:`SKEW` seconds in the past by the taker's clock is stale, and is
taken over by creating ``lease-(N+1)`` (conditional again, so of several
takers one wins); the others, and any opening that finds a lease that is
not stale, are refused with :class:`~dcmfs.errors.LeaseHeldError`.  Before
every renewal the holder checks that no ``lease-(N+1)`` exists: one that
does means its lease was taken over (it was away longer than TTL + SKEW),
and it uploads nothing from then on (its objects stay in its cache).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

from ..errors import LeaseHeldError, StoreIOError
from ..storage.backend import Backend, BackendMissing

log = logging.getLogger("dcmfs.s3")

PREFIX = "lease-"
#: seconds a lease lasts without renewal
TTL = 60.0
#: seconds of clock difference between machines a taker allows for
SKEW = 30.0


def _leases(remote: Backend) -> list[int]:
    out = []
    for name in remote.list(PREFIX):
        tail = name[len(PREFIX):]
        if tail.isdigit():
            out.append(int(tail))
    return sorted(out)


class Lease:
    """The lease of one read-write opening; :meth:`release` at close."""

    def __init__(self, remote: Backend, url: str, ttl: float = TTL, skew: float = SKEW,
                 clock=time.time) -> None:
        self.remote = remote
        self.url = url
        self.ttl = ttl
        self.skew = skew
        self.clock = clock
        self.holder = secrets.token_hex(8)
        #: set when another machine took the lease over: upload nothing more
        self.lost = threading.Event()
        self._stop = threading.Event()
        self.generation = self._acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="dcmfs-lease",
                                        daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "host": socket.gethostname(),
                           "pid": os.getpid(), "expires": self.clock() + self.ttl}).encode()

    def _acquire(self) -> int:
        gens = _leases(self.remote)
        n = gens[-1] if gens else 0
        if gens:
            try:
                info = json.loads(self.remote.get(f"{PREFIX}{n}"))
                expires = float(info["expires"])
            except BackendMissing:
                info, expires = {}, 0.0  # released meanwhile
            except (ValueError, KeyError, TypeError):
                info, expires = {}, 0.0  # unreadable: treated as expired
            if expires + self.skew > self.clock():
                self._refuse(info)
            n += 1
        if not self.remote.create(f"{PREFIX}{n}", self._body()):
            try:
                info = json.loads(self.remote.get(f"{PREFIX}{n}"))
            except (BackendMissing, ValueError):
                info = {}
            self._refuse(info)
        for old in gens:  # superseded leases: nobody needs them any more
            self.remote.delete(f"{PREFIX}{old}")
        return n

    def _refuse(self, info: dict) -> None:
        host, pid = info.get("host", "?"), info.get("pid", "?")
        raise LeaseHeldError(
            f"{self.url} is in use by a writer on {host} (pid {pid}); a second writer is "
            f"refused. Mount it read-only (-o ro), or wait: a lease not renewed for "
            f"{self.ttl + self.skew:.0f} s is taken over.")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.remote.head(f"{PREFIX}{self.generation + 1}") is not None:
                    log.error("the lease of %s was taken over by another writer; this mount "
                              "uploads nothing more (unmount it)", self.url)
                    self.lost.set()
                    return
                self.remote.put(f"{PREFIX}{self.generation}", self._body())
            except StoreIOError as exc:
                log.warning("renewing the lease failed (%s); retrying", exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost.is_set():
            try:
                info = json.loads(self._body())
                info["expires"] = 0
                self.remote.put(f"{PREFIX}{self.generation}", json.dumps(info).encode())
            except StoreIOError as exc:
                log.warning("could not release the lease (%s); it expires by itself", exc)
