"""POSIX semantics of issue 16 in the core, without a kernel."""

from __future__ import annotations

import os

import pytest

from dcmfs import errors as E

from .test_core import write_file

LONG = "/" + "n" * 256


def test_a_name_over_255_bytes_is_too_long_for_every_operation(make_fs):
    fs = make_fs()
    write_file(fs, "/f", b"x")
    fs.mkdir("/d", 0o755, 0, 0)
    calls = [lambda: fs.getattr(LONG), lambda: fs.getattr(LONG + "/f"),
             lambda: fs.chmod(LONG, 0o600), lambda: fs.chown(LONG, 1, 1),
             lambda: fs.utimens(LONG, 1, 2), lambda: fs.truncate(LONG, 0),
             lambda: fs.unlink(LONG), lambda: fs.rmdir(LONG),
             lambda: fs.rename(LONG, "/g"), lambda: fs.rename("/f", LONG),
             lambda: fs.link(LONG, "/g"), lambda: fs.link("/f", LONG),
             lambda: fs.open(LONG, os.O_RDONLY), lambda: fs.opendir(LONG),
             lambda: fs.readlink(LONG), lambda: fs.readdir(LONG),
             lambda: fs.getxattr(LONG, "user.a"), lambda: fs.setxattr(LONG, "user.a", b"1"),
             lambda: fs.listxattr(LONG), lambda: fs.removexattr(LONG, "user.a"),
             lambda: fs.create(LONG + "/f", 0o644, os.O_WRONLY, 0, 0)]
    for call in calls:
        with pytest.raises(E.NameTooLong):
            call()
    # a file in the way is "not a directory" first, as on ext4
    with pytest.raises(E.NotADirectory):
        fs.getattr("/f" + LONG)
    assert sorted(n for n, _ in fs.readdir("/")) == ["d", "f"]
