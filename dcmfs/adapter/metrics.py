"""Operation counters of a running daemon, and the optional Prometheus endpoint.

The FUSE adapter counts every operation it translates (count, latency
histogram, errors by errno name, bytes read and written through the mount)
in an :class:`OpStats`; nothing in the core imports this module.  The
figures reach admins two ways:

* ``dcmfs status`` reads :data:`OPS_XATTR` (JSON) from the mount's root;
* with ``-o metrics=127.0.0.1:PORT`` the daemon serves them, with the core's
  live figures (logical and stored bytes, files, backlog), in the Prometheus
  text format through ``prometheus-client`` (scraped, never pushed).

The counters are plain integers and floats under one lock of their own
(prometheus_client's Histogram cost 4-9 µs an operation, as much as a fifth
of a FUSE request's floor: measured, issue 17); a collector builds the
Prometheus families from them at scrape time, so a scrape from the server's
thread reads them consistently.  Labels are operation and errno names, never
a path.
"""

from __future__ import annotations

import bisect
import errno as _errno
import json
import logging
import os
import threading
import time
from typing import Callable

from ..errors import loggable

log = logging.getLogger("dcmfs.metrics")

#: a virtual attribute of the mount root: JSON of :meth:`OpStats.snapshot`
OPS_XATTR = "user.dcmfs.ops"
#: latency bucket upper bounds, seconds
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_DURATIONS = "dcmfs_fuse_operation_duration_seconds"
_ERRORS = "dcmfs_fuse_errors"


class OpStats:
    """Counters since the daemon started: per operation its count, latency
    sum and latency histogram (:data:`BUCKETS`), errors by operation and
    errno name, bytes read and written; each OpStats has a registry of its
    own, so two daemons in one process (tests) never share figures."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry
        self.started = time.time()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        #: op -> [count, seconds, then one count per bucket and +Inf (not cumulative)]
        self._ops: dict[str, list] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._read = 0
        self._written = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_OpCollector(self))

    def done(self, op: str, seconds: float, result=None) -> None:
        """One operation finished (successfully or not)."""
        at = 2 + bisect.bisect_left(BUCKETS, seconds)  # on a bound: that bucket (le)
        with self._lock:
            row = self._ops.get(op)
            if row is None:
                row = self._ops[op] = [0, 0.0] + [0] * (len(BUCKETS) + 1)
            row[0] += 1
            row[1] += seconds
            row[at] += 1
            if op == "read" and isinstance(result, (bytes, bytearray, memoryview)):
                self._read += len(result)
            elif op == "write" and isinstance(result, int):
                self._written += result

    def failed(self, op: str, seconds: float, code: int) -> None:
        self.done(op, seconds)
        key = (op, _errno.errorcode.get(code, str(code)))
        with self._lock:
            self._errors[key] = self._errors.get(key, 0) + 1

    def _copy(self) -> tuple[dict, dict, int, int]:
        with self._lock:
            return ({op: row[:] for op, row in self._ops.items()}, dict(self._errors),
                    self._read, self._written)

    def snapshot(self) -> dict:
        """The figures as :data:`OPS_XATTR` gives them (``dcmfs status``)."""
        ops, errors, read, written = self._copy()
        return {"pid": self.pid, "started": self.started,
                "ops": {op: row[0] for op, row in ops.items()},
                "op_seconds": {op: round(row[1], 6) for op, row in ops.items()},
                "errors": {f"{op}:{name}": n for (op, name), n in errors.items()},
                "read_bytes": read, "written_bytes": written}

    def snapshot_json(self) -> bytes:
        return json.dumps(self.snapshot(), sort_keys=True).encode()


class _OpCollector:
    """The Prometheus families of one :class:`OpStats`, built at scrape time."""

    def __init__(self, ops: OpStats) -> None:
        self.ops = ops

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString
        ops, errors, read, written = self.ops._copy()
        bounds = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]
        h = HistogramMetricFamily(_DURATIONS, "Time to serve a FUSE operation",
                                  labels=["op"])
        for op, row in sorted(ops.items()):
            total, buckets = 0, []
            for bound, n in zip(bounds, row[2:]):
                total += n
                buckets.append((bound, total))
            h.add_metric([op], buckets, row[1])
        yield h
        e = CounterMetricFamily(_ERRORS, "FUSE operations that returned an error, by errno "
                                "name", labels=["op", "errno"])
        for (op, name), n in sorted(errors.items()):
            e.add_metric([op, name], n)
        yield e
        yield CounterMetricFamily("dcmfs_read_bytes", "Plaintext bytes read through the mount",
                                  value=read)
        yield CounterMetricFamily("dcmfs_written_bytes", "Plaintext bytes written through the "
                                  "mount", value=written)


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"metrics address {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class _Collector:
    """Builds the metric families at scrape time from the live counters."""

    def __init__(self, ops: OpStats, live: Callable[[], dict]) -> None:
        self.ops = ops
        self.live = live

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        ops = self.ops.snapshot()["ops"]
        c = CounterMetricFamily("dcmfs_fuse_operations", "FUSE operations served",
                                labels=["op"])
        for op, n in sorted(ops.items()):
            c.add_metric([op], n)
        yield c
        yield from self.ops.registry.collect()
        try:
            live = self.live()
        except Exception as exc:  # noqa: BLE001 — a scrape must not kill the daemon
            log.warning("live figures unavailable for metrics: %s", loggable(exc))
            return
        for key, help_ in (("files", "Regular files in the store"),
                           ("logical_bytes", "Plaintext (logical) bytes of all files"),
                           ("stored_bytes", "Bytes the store's objects take (compressed, "
                            "sealed)"),
                           ("backlog_files", "Files waiting for the background re-encoder"),
                           ("backlog_bytes", "Logical bytes waiting for the re-encoder"),
                           ("journal_records", "Index journal records since the last "
                            "checkpoint")):
            if key in live:
                yield GaugeMetricFamily(f"dcmfs_{key}", help_, value=live[key])
        for key, help_ in (("reencoded_bytes", "Logical bytes the re-encoder finished"),
                           ("reencode_errors", "Files the re-encoder failed on")):
            if key in live:
                yield CounterMetricFamily(f"dcmfs_{key}", help_, value=live[key])
        yield GaugeMetricFamily("dcmfs_start_time_seconds", "When the daemon started (Unix time)",
                                value=self.ops.started)


class MetricsServer:
    """The Prometheus endpoint of one daemon (``-o metrics=HOST:PORT``)."""

    def __init__(self, address: str, ops: OpStats, live: Callable[[], dict]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(ops, live))
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        log.info("Prometheus metrics at http://%s/metrics", address)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
