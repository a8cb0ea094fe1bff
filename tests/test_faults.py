"""Crashes at every step: the object write, the objects' sync, a directory
fsync, the journal append, the journal sync and the LMDB commit are made to
fail at their k-th call, for every k a mixed workload reaches (creates,
overwrites, truncates, renames, unlinks, fsyncs, checkpoints); the daemon
then dies.  After the next open (journal replay, unclean-store check) every
file is its old or its new version, never a mix, verify is clean and no
object is dangling."""

from __future__ import annotations

import dataclasses
import errno
import os
import random

import lmdb
import pytest

from dcmfs.index import index as index_mod, journal
from dcmfs.storage import backend as backend_mod, objects as objectstore
from dcmfs.errors import DcmfsError, StoreIOError
from dcmfs.core.filesystem import FileSystem
from dcmfs.storage.header import open_store
from dcmfs.integrity.verify import Verifier

from .conftest import SMALL, assert_no_dangling, crash

CS = SMALL.chunk_size
#: no background checkpoints: the workload checkpoints where it says so, and
#: a small journal limit so that archiving (rotate, fsync_dir) is reached too
CFG = dataclasses.replace(SMALL, checkpoint_interval=0)
ABSENT = None


class Injected(Exception):
    pass


def _oserror(*_):
    return OSError(errno.EIO, "injected fault")


def _store_io(*_):
    return StoreIOError("injected fault")


#: name -> (object, attribute, the error the real call raises when the disk fails)
POINTS = {
    "object write": (backend_mod, "write_new", _store_io),
    "object sync": (objectstore, "sync_filesystem", _oserror),
    "directory fsync": (journal, "fsync_dir", _oserror),
    "journal append": (journal.Journal, "_write_at", _store_io),
    "journal sync": (journal.Journal, "sync", _store_io),
    "lmdb commit": (index_mod.Index, "_commit_batch", lambda *_: lmdb.DiskError("injected")),
}


class Counter:
    def __init__(self, monkeypatch, point: str, fail_at: int | None) -> None:
        owner, attr, make = POINTS[point]
        real = getattr(owner, attr)
        self.calls = 0

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == fail_at:
                raise make()
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)


def workload(fs: FileSystem, seed: int) -> dict[str, set]:
    """Random operations; returns path -> the contents it may have afterwards
    (old or new where an operation failed, ABSENT for no file)."""
    rng = random.Random(seed)
    model: dict[str, set] = {}
    names = [f"/f{i}" for i in range(6)]

    def attempt(paths_before: dict[str, set], fn, after: dict[str, object]) -> None:
        try:
            fn()
        except (DcmfsError, OSError):
            for p, content in after.items():  # old or new
                model[p] = paths_before.get(p, {ABSENT}) | {content}
            return
        for p, content in after.items():
            model[p] = {content}

    for step in range(28):
        path = rng.choice(names)
        exists = model.get(path, {ABSENT}) != {ABSENT}
        kind = rng.choice(["write", "write", "overwrite", "truncate", "rename", "unlink",
                           "fsync", "checkpoint"])
        before = {p: set(v) for p, v in model.items()}
        if kind == "write" or not exists and kind in ("overwrite", "truncate", "rename",
                                                       "unlink", "fsync"):
            data = os.urandom(rng.choice([0, 100, CS - 1, CS, 2 * CS + 7, 4 * CS]))

            def write(path=path, data=data):
                fh = fs.create(path, 0o644, os.O_WRONLY, 0, 0) if path not in fs_names(fs) \
                    else fs.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    fs.write(fh, data, 0)
                    fs.flush(fh)
                finally:
                    fs.release(fh)
            if not exists:  # created, then its data failed: an empty file
                before[path] = before.get(path, {ABSENT}) | {b""}
            attempt(before, write, {path: data})
        elif kind == "overwrite":
            old = next(iter(model[path]))
            if old is ABSENT or len(model[path]) > 1:
                continue
            off = rng.randrange(0, max(1, len(old)))
            patch = os.urandom(rng.choice([1, 500, CS]))
            new = (old[:off] + patch + old[off + len(patch):]) if off <= len(old) else old

            def overwrite(path=path, off=off, patch=patch):
                fh = fs.open(path, os.O_WRONLY)
                try:
                    fs.write(fh, patch, off)
                    fs.flush(fh)
                finally:
                    fs.release(fh)
            attempt(before, overwrite, {path: new})
        elif kind == "truncate":
            old = next(iter(model[path]))
            if old is ABSENT or len(model[path]) > 1:
                continue
            n = rng.randrange(0, len(old) + CS)
            attempt(before, lambda path=path, n=n: fs.truncate(path, n),
                    {path: old[:n] + bytes(max(0, n - len(old)))})
        elif kind == "rename":
            old = next(iter(model[path]))
            dst = rng.choice(names)
            if old is ABSENT or len(model[path]) > 1 or dst == path:
                continue
            attempt(before, lambda a=path, b=dst: fs.rename(a, b), {path: ABSENT, dst: old})
        elif kind == "unlink":
            attempt(before, lambda path=path: fs.unlink(path), {path: ABSENT})
        elif kind == "fsync":
            def fsync(path=path):
                fh = fs.open(path, os.O_RDONLY)
                try:
                    fs.fsync(fh)
                finally:
                    fs.release(fh)
            try:
                fsync()
            except (DcmfsError, OSError):
                pass
        else:
            try:
                fs.checkpoint()
            except (DcmfsError, OSError):
                pass
    return model


def fs_names(fs) -> set[str]:
    return {"/" + n for n, _ in fs.readdir("/")}


def check_after_crash(root, secret, model) -> None:
    fs = FileSystem(open_store(root, secret), CFG)
    try:
        names = fs_names(fs)
        for path, allowed in model.items():
            if path in names:
                fh = fs.open(path, os.O_RDONLY)
                try:
                    got = fs.read(fh, 1 << 30, 0)
                finally:
                    fs.release(fh)
            else:
                got = ABSENT
            assert got in allowed, (path, None if got is None else len(got),
                                    [None if a is None else len(a) for a in allowed])
        assert names <= set(model)
        v = Verifier(fs.index, fs.objects, CS, fs._lock)
        try:
            report = v.run(v.files())
        finally:
            v.close()
        assert report.findings == []
        assert_no_dangling(fs)
    finally:
        fs.close()


def run_once(tmp_path, secret, monkeypatch, point, k, seed) -> int:
    root = str(tmp_path / f"s-{k}")
    from dcmfs.storage.header import init_store
    init_store(root, secret, CFG)
    with monkeypatch.context() as mp:
        counter = Counter(mp, point, k)
        try:
            fs = FileSystem(open_store(root, secret), dataclasses.replace(CFG))
        except DcmfsError:  # the fault hit the opening: it refused, nothing written
            model = {}
        else:
            fs.index._journal_limit = 4096  # archive segments are written too
            try:
                model = workload(fs, seed)
            finally:
                crash(fs)
    check_after_crash(root, secret, model)
    return counter.calls


@pytest.mark.parametrize("point", list(POINTS))
def test_a_fault_at_every_step_leaves_old_or_new_never_a_mix(tmp_path, secret, monkeypatch,
                                                            point):
    seed = 7
    total = run_once(tmp_path, secret, monkeypatch, point, None, seed)  # counts the calls
    assert total > 0, f"the workload never reached {point}"
    ks = range(1, total + 1) if total <= 40 else sorted(random.Random(1).sample(
        range(1, total + 1), 40))
    for k in ks:
        run_once(tmp_path, secret, monkeypatch, point, k, seed)
