"""Issue 17: a file read through the mount from start to end costs few FUSE
requests: the mount has the kernel read 1 MiB ahead (``-o read_ahead_kb``,
where the kernel's own 128 KiB made five READs of a CT slice), and closing a
descriptor opened read-only sends no FLUSH (a writer's close still does:
that is where its data is committed)."""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

from dcmfs.adapter.metrics import OPS_XATTR

SIZE = 600_000


def ops(m) -> dict:
    return json.loads(os.getxattr(m.mnt, OPS_XATTR))["ops"]


def read_ahead_file(mnt: pathlib.Path) -> pathlib.Path:
    dev = os.stat(mnt).st_dev
    return pathlib.Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")


def wait_read_ahead(mnt: pathlib.Path, kib: int) -> None:
    """The daemon sets it from a thread once the mount answers."""
    path = read_ahead_file(mnt)
    deadline = time.monotonic() + 10
    while int(path.read_text()) != kib:
        assert time.monotonic() < deadline, f"read_ahead_kb is {path.read_text().strip()}"
        time.sleep(0.01)


@pytest.mark.parametrize("kib", [1024, 0])
def test_a_sequential_reader_costs_few_requests(mount_env, kib):
    m = mount_env
    data = os.urandom(SIZE)
    m.mount()
    before = ops(m)
    (m.mnt / "f").write_bytes(data)
    after = ops(m)
    assert after.get("flush", 0) > before.get("flush", 0), "a writer's close must flush"
    m.umount()  # a new mount: nothing of the file in the page cache

    m.mount("-o", f"read_ahead_kb={kib}")
    wait_read_ahead(m.mnt, kib or 128)  # 0: the kernel's own value stays
    before = ops(m)
    with open(m.mnt / "f", "rb") as f:
        parts = []
        while chunk := f.read(1 << 20):
            parts.append(chunk)
    after = ops(m)
    assert b"".join(parts) == data
    reads = after["read"] - before.get("read", 0)
    assert after.get("flush", 0) == before.get("flush", 0), "read-only close sent a FLUSH"
    if kib:
        assert reads == 1, f"{reads} READs for {SIZE} bytes with {kib} KiB read-ahead"
    else:  # what every mount did before: 128 KiB READs
        assert reads == -(-SIZE // (128 << 10)), reads
    m.umount()


def test_read_ahead_is_a_mount_option(mount_env):
    r = mount_env.mount("-o", "read_ahead_kb=-1", check=False)
    assert r.returncode != 0 and "read_ahead_kb" in r.stderr
    assert not mount_env.is_mounted()
