"""SIGKILL of the daemon at a random moment of a mixed workload (creates,
overwrites, truncates, renames, unlinks) through a real mount: afterwards
every file is its old or its new version and verify is clean after the
unclean-store check of the next mount."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import file_sha256

#: ./scripts/test --quick leaves it out (three kill workloads: ~10-20 s)
pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(r'''
    import hashlib, json, os, random, sys
    mnt, seed, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(seed)
    files = {}  # name -> bytes, as this writer last left it
    log = open(log_path, "a", buffering=1)
    sha = lambda b: hashlib.sha256(b).hexdigest()

    def note(**kw):
        log.write(json.dumps(kw) + "\n")
        log.flush()
        os.fsync(log.fileno())

    def blob(i, n):
        block = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        return (block * (n // 32 + 1))[:n]

    try:
        for i in range(100000):
            name = f"f{rng.randrange(8)}"
            path = os.path.join(mnt, name)
            kind = rng.choice(["write", "write", "overwrite", "truncate", "rename", "unlink"])
            if name not in files:
                kind = "write"
            if kind == "write":
                data = blob(i, rng.choice([0, 1000, 1 << 20, (1 << 20) + 5, 3 << 20]))
                # open(O_TRUNC) may empty the file before the data comes: a
                # kill in between leaves it empty, as on any filesystem
                note(i=i, op="set", path=name, old=sha(files[name]) if name in files else None,
                     new=sha(data), empty=sha(b""))
                with open(path, "wb") as f:
                    f.write(data)
                files[name] = data
            elif kind == "overwrite":
                old = files[name]
                off = rng.randrange(0, len(old) + 1)
                patch = blob(i, rng.choice([1, 4096, 1 << 20]))
                new = old[:off] + patch + old[off + len(patch):]
                note(i=i, op="set", path=name, old=sha(old), new=sha(new))
                with open(path, "r+b") as f:
                    f.seek(off)
                    f.write(patch)
                files[name] = new
            elif kind == "truncate":
                old = files[name]
                n = rng.randrange(0, len(old) + 70000)
                new = old[:n] + bytes(max(0, n - len(old)))
                note(i=i, op="set", path=name, old=sha(old), new=sha(new))
                os.truncate(path, n)
                files[name] = new
            elif kind == "rename":
                dst = f"f{rng.randrange(8)}"
                if dst == name:
                    continue
                note(i=i, op="rename", path=name, dst=dst, sha=sha(files[name]),
                     dst_old=sha(files[dst]) if dst in files else None)
                os.rename(path, os.path.join(mnt, dst))
                files[dst] = files.pop(name)
            else:
                note(i=i, op="unlink", path=name, old=sha(files[name]))
                os.unlink(path)
                del files[name]
            note(i=i, done=True)
    except OSError:
        pass  # the daemon is gone
''')


def allowed_states(log_path) -> dict[str, set]:
    """name -> the SHA-256s (None: no file) it may have after the kill."""
    state: dict[str, set] = {}
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    done = {r["i"] for r in records if r.get("done")}
    for r in records:
        if r.get("done"):
            continue
        finished = r["i"] in done
        if r["op"] == "set":
            changes = {r["path"]: (r["old"], r["new"])}
        elif r["op"] == "rename":
            changes = {r["path"]: (r["sha"], None), r["dst"]: (r["dst_old"], r["sha"])}
        else:
            changes = {r["path"]: (r["old"], None)}
        for name, (old, new) in changes.items():
            state[name] = {new} if finished else {old, new, r.get("empty", old)}
    return state


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_of_a_mixed_workload(mount_env, tmp_path, seed):
    m = mount_env
    m.expect_log_errors = True  # the next mount replays and reports what the kill left
    m.mount()
    log_path = tmp_path / "ops.log"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(seed),
                               str(log_path)])
    try:
        time.sleep(random.Random(seed).uniform(1.0, 3.0))
        os.kill(m.daemon_pid(), signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    m.cleanup()  # detaches the dead mount
    with open(log_path) as f:
        assert sum(1 for _ in f) > 10, "the workload had barely started"
    m.mount()  # replays the journal, runs the unclean-store check
    state = allowed_states(log_path)
    present = {p.name for p in m.mnt.iterdir()}
    for name, allowed in state.items():
        got = file_sha256(m.mnt / name) if name in present else None
        assert got in allowed, (name, got, allowed)
    assert present <= set(state)
    r = m.cli("verify", m.store, "--json")
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["findings"] == []
    assert "not cleanly unmounted" in m.log()
    m.umount()
    r = m.cli("fsck", m.store, "--key-file", m.key)
    assert r.returncode == 0 and "clean." in r.stdout, r.stdout
    assert not (m.store / "quarantine").exists()
