"""Operation counters of a running daemon, and the optional Prometheus endpoint.

The FUSE adapter counts every operation it translates (count, latency
histogram, errors by errno name, bytes read and written through the mount)
in an :class:`OpStats`; nothing in the core imports this module.  The
figures reach admins two ways:

* ``dcmfs status`` reads :data:`OPS_XATTR` (JSON) from the mount's root;
* with ``-o metrics=127.0.0.1:PORT`` the daemon serves them, with the core's
  live figures (logical and stored bytes, files, backlog), in the Prometheus
  text format through ``prometheus-client`` (scraped, never pushed).

The FUSE loop is single-threaded (``nothreads``) and a scrape only reads
ints, so the hot path takes no lock.  Labels are operation and errno names,
never a path.
"""

from __future__ import annotations

import bisect
import errno as _errno
import json
import logging
import os
import time
from typing import Callable

log = logging.getLogger("dcmfs.metrics")

#: a virtual attribute of the mount root: JSON of :meth:`OpStats.snapshot`
OPS_XATTR = "user.dcmfs.ops"
#: latency bucket upper bounds, seconds
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class OpStats:
    """Counters since the daemon started."""

    def __init__(self) -> None:
        self.started = time.time()
        self.pid = os.getpid()
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.buckets: dict[str, list[int]] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.read_bytes = 0
        self.written_bytes = 0

    def done(self, op: str, seconds: float, result=None) -> None:
        """One operation finished (successfully or not)."""
        self.counts[op] = self.counts.get(op, 0) + 1
        self.seconds[op] = self.seconds.get(op, 0.0) + seconds
        b = self.buckets.get(op)
        if b is None:
            b = self.buckets[op] = [0] * (len(BUCKETS) + 1)
        b[bisect.bisect_left(BUCKETS, seconds)] += 1
        if op == "read" and isinstance(result, (bytes, bytearray, memoryview)):
            self.read_bytes += len(result)
        elif op == "write" and isinstance(result, int):
            self.written_bytes += result

    def failed(self, op: str, seconds: float, code: int) -> None:
        self.done(op, seconds)
        kind = _errno.errorcode.get(code, str(code))
        self.errors[(op, kind)] = self.errors.get((op, kind), 0) + 1

    def snapshot(self) -> dict:
        return {"pid": self.pid, "started": self.started,
                "ops": dict(self.counts), "op_seconds": {k: round(v, 6)
                                                         for k, v in self.seconds.items()},
                "errors": {f"{op}:{kind}": n for (op, kind), n in self.errors.items()},
                "read_bytes": self.read_bytes, "written_bytes": self.written_bytes}

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
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        o = self.ops
        c = CounterMetricFamily("dcmfs_fuse_operations", "FUSE operations served",
                                labels=["op"])
        for op, n in sorted(o.counts.items()):
            c.add_metric([op], n)
        yield c
        e = CounterMetricFamily("dcmfs_fuse_errors", "FUSE operations that returned an error, "
                                "by errno name", labels=["op", "errno"])
        for (op, kind), n in sorted(o.errors.items()):
            e.add_metric([op, kind], n)
        yield e
        h = HistogramMetricFamily("dcmfs_fuse_operation_duration_seconds",
                                  "Time to serve a FUSE operation", labels=["op"])
        for op, counts in sorted(o.buckets.items()):
            cumulative, acc = [], 0
            for bound, n in zip(list(BUCKETS) + [float("inf")], counts):
                acc += n
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", acc))
            h.add_metric([op], cumulative, o.seconds.get(op, 0.0))
        yield h
        yield CounterMetricFamily("dcmfs_read_bytes", "Plaintext bytes read through the mount",
                                  value=o.read_bytes)
        yield CounterMetricFamily("dcmfs_written_bytes", "Plaintext bytes written through the "
                                  "mount", value=o.written_bytes)
        try:
            live = self.live()
        except Exception as exc:  # noqa: BLE001 — a scrape must not kill the daemon
            log.warning("live figures unavailable for metrics: %s", exc)
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
                                value=o.started)


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
