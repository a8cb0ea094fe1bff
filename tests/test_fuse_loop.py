"""dcmfs's request loop (dcmfs.adapter.loop) through a real mount of a
do-nothing filesystem served in this process: a sequential client is served
by one thread, and a request that takes long holds up nobody else, whether
the adapter knows it to be long (fsync) or not (a slow getxattr)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from dcmfs import errors as E
from dcmfs.adapter import fuse_ops
from dcmfs.adapter.metrics import OpStats

from .floorfs import FloorFS


class Probe(FloorFS):
    def __init__(self) -> None:
        super().__init__()
        self.served_by: list[int] = []
        self.release = threading.Event()
        self.slow_started = threading.Event()

    def getattr(self, path, fh=None):
        if path.startswith("/probe"):
            self.served_by.append(threading.get_ident())
        return super().getattr(path, fh)

    def fsync(self, fh, datasync):
        self.slow_started.set()
        self.release.wait(30)

    def getxattr(self, path, name, caller=None):
        if name == "user.slow":
            self.slow_started.set()
            self.release.wait(30)
        raise E.NoAttribute("none")


@pytest.fixture
def served(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = Probe()
    t = threading.Thread(target=fuse_ops.serve, args=(fs, str(mnt), {}),
                         kwargs={"ops": OpStats()}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        assert time.monotonic() < deadline and t.is_alive(), "the mount did not come up"
        time.sleep(0.02)
    try:
        yield fs, mnt
    finally:
        fs.release.set()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        t.join(20)
        assert not t.is_alive(), "the loop did not end at the unmount"


def lookups(mnt, n: int, start: int = 0) -> list[float]:
    """Seconds each of ``n`` lookups of absent names took."""
    took = []
    for i in range(start, start + n):
        t = time.monotonic()
        assert not os.path.exists(mnt / f"probe{i}")
        took.append(time.monotonic() - t)
    return took


def test_a_sequential_client_is_served_by_one_thread(served):
    # libfuse's pool handed each request to the thread that had waited
    # longest: a sequential client's requests rotated over all of them
    fs, mnt = served
    with open(mnt / "f", "wb") as f:  # a write, a flush: the pool grows
        f.write(b"x" * 100)
    lookups(mnt, 200)
    assert len(fs.served_by) == 200
    assert len(set(fs.served_by)) == 1, len(set(fs.served_by))


@pytest.mark.parametrize("slow", ["fsync", "getxattr"])
def test_a_long_request_holds_up_no_other(served, slow):
    """fsync is long by the adapter's word (another thread takes the next
    request as soon as it comes); a slow getxattr is not, and the loop
    notices it after its stall time."""
    fs, mnt = served
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    errors = []

    def run():
        try:
            if slow == "fsync":
                os.fsync(fd)
            else:
                try:
                    os.getxattr(mnt / "f", "user.slow")
                except OSError:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert fs.slow_started.wait(10)
        took = lookups(mnt, 50)
        assert t.is_alive(), "the slow request ended before the lookups"
        assert max(took) < 1.0, max(took)
    finally:
        fs.release.set()
        t.join(10)
        os.close(fd)
    assert not errors, errors
