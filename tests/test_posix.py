"""POSIX behaviour through a real mount (issue 16): each reproduction of the
issue, with what ext4 answers."""

from __future__ import annotations

import errno
import os

import pytest

LONG = "n" * 256  # one byte over NAME_MAX


def _errno_of(call) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def test_every_operation_on_a_name_over_255_bytes_is_enametoolong(mounted):
    m = mounted.mnt
    (m / "f").write_bytes(b"x")
    (m / "d").mkdir()
    long, deep = m / LONG, m / LONG / "f"
    calls = {
        "stat": lambda: os.stat(long),
        "lstat": lambda: os.lstat(long),
        "stat below": lambda: os.stat(deep),
        "access": lambda: os.access(long, os.R_OK) or os.stat(long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 1, 1),
        "utime": lambda: os.utime(long, ns=(1, 2)),
        "truncate": lambda: os.truncate(long, 0),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
        "rename from": lambda: os.rename(long, m / "g"),
        "rename to": lambda: os.rename(m / "f", long),
        "link from": lambda: os.link(long, m / "g"),
        "link to": lambda: os.link(m / "f", long),
        "symlink to": lambda: os.symlink("f", long),
        "open": lambda: os.close(os.open(long, os.O_RDONLY)),
        "create": lambda: os.close(os.open(long, os.O_WRONLY | os.O_CREAT, 0o644)),
        "create below": lambda: os.close(os.open(deep, os.O_WRONLY | os.O_CREAT, 0o644)),
        "mkdir": lambda: os.mkdir(long),
        "readlink": lambda: os.readlink(long),
        "getxattr": lambda: os.getxattr(long, "user.a"),
        "setxattr": lambda: os.setxattr(long, "user.a", b"1"),
        "listxattr": lambda: os.listxattr(long),
        "removexattr": lambda: os.removexattr(long, "user.a"),
        "opendir": lambda: os.listdir(long),
    }
    got = {name: _errno_of(call) for name, call in calls.items()}
    assert {k: errno.errorcode.get(v, v) for k, v in got.items()
            if v != errno.ENAMETOOLONG} == {}
    # the same operations on a 255-byte name are ordinary
    ok = m / ("n" * 255)
    ok.write_bytes(b"y")
    os.chmod(ok, 0o600)
    os.rename(ok, m / "d" / ("n" * 255))
    assert (m / "d" / ("n" * 255)).read_bytes() == b"y"
    assert sorted(os.listdir(m)) == ["d", "f"]
