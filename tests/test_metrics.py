"""The adapter's operation counters: the user.dcmfs.ops snapshot and the
Prometheus page come from the same prometheus_client metrics."""

from __future__ import annotations

import errno
import json

from dcmfs.adapter.metrics import OpStats, _Collector


def _ops() -> OpStats:
    o = OpStats()
    o.done("getattr", 0.00005)
    o.done("getattr", 0.0005)
    o.done("write", 0.002, 4096)
    o.done("write", 0.001, 100)
    o.done("read", 0.003, b"x" * 1000)
    o.failed("getattr", 0.0001, errno.ENOENT)  # on a bound: in that bucket (le)
    o.failed("open", 0.01, 99999)  # no errno name: the number
    return o


def test_snapshot():
    o = _ops()
    snap = o.snapshot()
    assert snap == {"pid": o.pid, "started": o.started,
                    "ops": {"getattr": 3, "write": 2, "read": 1, "open": 1},
                    "op_seconds": {"getattr": 0.00065, "write": 0.003, "read": 0.003,
                                   "open": 0.01},
                    "errors": {"getattr:ENOENT": 1, "open:99999": 1},
                    "read_bytes": 1000, "written_bytes": 4196}
    assert json.loads(o.snapshot_json()) == snap
    assert OpStats().snapshot()["ops"] == {}  # a registry of its own per OpStats


def test_prometheus_page():
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(_ops(), lambda: {"files": 2, "logical_bytes": 5}))
    page = generate_latest(registry).decode()
    for line in ('dcmfs_fuse_operations_total{op="getattr"} 3.0',
                 'dcmfs_fuse_operation_duration_seconds_bucket{le="0.0001",op="getattr"} 2.0',
                 'dcmfs_fuse_operation_duration_seconds_bucket{le="0.0005",op="getattr"} 3.0',
                 'dcmfs_fuse_operation_duration_seconds_count{op="write"} 2.0',
                 'dcmfs_fuse_errors_total{errno="ENOENT",op="getattr"} 1.0',
                 "dcmfs_written_bytes_total 4196.0", "dcmfs_read_bytes_total 1000.0",
                 "dcmfs_files 2.0", "dcmfs_logical_bytes 5.0"):
        assert line in page, line
