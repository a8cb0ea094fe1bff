"""Operation counters of a running daemon, and the optional Prometheus endpoint.

The FUSE adapter counts every operation it translates (count, latency
histogram, errors by errno name, bytes read and written through the mount)
in an :class:`OpStats`; nothing in the core imports this module.  The
figures reach admins two ways:

* ``dcmfs status`` reads :data:`OPS_XATTR` (JSON) from the mount's root;
* with ``-o metrics=127.0.0.1:PORT`` the daemon serves them, with the core's
  live figures (logical and stored bytes, files, backlog), in the Prometheus
  text format through ``prometheus-client`` (scraped, never pushed).

The counters are prometheus_client's Histogram and Counters, whose values
take a short lock of their own (about 1 µs an operation), so a scrape from
the server's thread reads them consistently.  Labels are operation and errno
names, never a path.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
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
    """Counters since the daemon started, in prometheus_client's own types
    (a Histogram of latencies by operation, Counters of errors and bytes) on a
    registry of their own, so two daemons in one process (tests) never share
    figures."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.started = time.time()
        self.pid = os.getpid()
        self.registry = CollectorRegistry(auto_describe=False)
        self._durations = Histogram(_DURATIONS, "Time to serve a FUSE operation", ["op"],
                                    buckets=BUCKETS, registry=self.registry)
        self._errors = Counter(_ERRORS, "FUSE operations that returned an error, by errno name",
                               ["op", "errno"], registry=self.registry)
        self._read = Counter("dcmfs_read_bytes", "Plaintext bytes read through the mount",
                             registry=self.registry)
        self._written = Counter("dcmfs_written_bytes", "Plaintext bytes written through the "
                                "mount", registry=self.registry)
        #: op -> its histogram child (``labels()`` looks it up under a lock each time)
        self._by_op: dict = {}

    def done(self, op: str, seconds: float, result=None) -> None:
        """One operation finished (successfully or not)."""
        child = self._by_op.get(op)
        if child is None:
            child = self._by_op[op] = self._durations.labels(op)
        child.observe(seconds)
        if op == "read" and isinstance(result, (bytes, bytearray, memoryview)):
            self._read.inc(len(result))
        elif op == "write" and isinstance(result, int):
            self._written.inc(result)

    def failed(self, op: str, seconds: float, code: int) -> None:
        self.done(op, seconds)
        self._errors.labels(op, _errno.errorcode.get(code, str(code))).inc()

    def snapshot(self) -> dict:
        """The figures as :data:`OPS_XATTR` gives them (``dcmfs status``)."""
        out = {"pid": self.pid, "started": self.started, "ops": {}, "op_seconds": {},
               "errors": {}, "read_bytes": 0, "written_bytes": 0}
        for metric in self.registry.collect():
            for sample in metric.samples:
                op = sample.labels.get("op")
                if sample.name == _DURATIONS + "_count":
                    out["ops"][op] = int(sample.value)
                elif sample.name == _DURATIONS + "_sum":
                    out["op_seconds"][op] = round(sample.value, 6)
                elif sample.name == _ERRORS + "_total":
                    out["errors"][f"{op}:{sample.labels['errno']}"] = int(sample.value)
                elif sample.name in ("dcmfs_read_bytes_total", "dcmfs_written_bytes_total"):
                    out[sample.name[len("dcmfs_"):-len("_total")]] = int(sample.value)
        return out

    def snapshot_json(self) -> bytes:
        return json.dumps(self.snapshot(), sort_keys=True).encode()


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
