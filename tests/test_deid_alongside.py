"""The de-identified view through real mounts: the first view mount answers
at once and fills in (its one-time pass runs in the background), and the
view served beside the normal read-write mount by the same daemon
(``-o view_mount=PATH``): a file written through the normal mount appears
de-identified in the view."""

from __future__ import annotations

import copy
import errno
import io
import os
import pathlib
import subprocess
import tempfile
import time

import pydicom
import pytest

from .conftest import ct_file
from .test_deid_view import (CANARY, _assert_clean, _mount_view, _wait_filled,
                             canary_series, view_status)


def _tree(root) -> dict[str, bytes]:
    """Every file of a view and its bytes, read while the tree may change
    (a file the filler removed between the listing and the read is left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        try:
            if p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
        except FileNotFoundError:
            continue
    return out


def patients(n: int) -> dict[str, bytes]:
    """``n`` copies of pydicom-data's CT slice, each of its own patient,
    study, series and instance."""
    base = pydicom.dcmread(ct_file())
    out = {}
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.PatientID = f"CANARYPID{i:04d}"
        ds.PatientName = f"CANARYNAME{i:04d}"
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, kw, pydicom.uid.generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[f"CANARYNAME{i:04d}.dcm"] = buf.getvalue()
    return out


def test_the_first_view_mount_answers_at_once_and_fills_in(mount_env, tmp_path):
    m = mount_env
    n = 200
    # sandbox=0: no parser workers, so this mount makes no view records
    m.mount("-o", "sandbox=0")
    for name, data in patients(n).items():
        (m.mnt / name).write_bytes(data)
    m.umount()
    secret = tmp_path / "view.secret"
    m.cli("new-view-secret", secret, check=True)
    _mount_view(m, m.mnt, secret, wait=False)
    try:
        started = time.monotonic()
        first = os.listdir(m.mnt)
        listed_in = time.monotonic() - started
        early = view_status(m.mnt)
        assert listed_in < 2.0, listed_in
        # the mount did not wait for the pass: it was still looking at files
        assert len(first) < n and not early["deid_records"]["first_pass_done"], early
        r = m.cli("status", m.mnt, check=True)
        assert "deid view" in r.stdout and "deid pass" in r.stdout, r.stdout
        final = _wait_filled(m.mnt)
        assert len(os.listdir(m.mnt)) == n and final["deid_view"]["files"] == n
        assert final["deid_records"]["pending_files"] == 0
        r = m.cli("status", m.mnt, check=True)
        assert f"deid view   {n} files shown" in r.stdout and "deid pass   done" in r.stdout
    finally:
        m.umount()


@pytest.fixture
def beside(mount_env, tmp_path):
    """The store mounted read-write with the view beside it."""
    m = mount_env
    secret = tmp_path / "view.secret"
    m.cli("new-view-secret", secret, check=True)
    # a mountpoint another user can reach (pytest's tmp_path is root's alone)
    view = pathlib.Path(tempfile.mkdtemp(prefix="dcmfs-view-"))
    view.chmod(0o755)
    m.mount("-o", f"allow_other,view_mount={view},view_secret_file={secret},"
                  "deid_dates=shift")
    try:
        yield m, view
    finally:
        m.cleanup()
        if os.path.ismount(view):  # a daemon killed before it detached the view
            subprocess.run(["fusermount3", "-u", "-z", str(view)], check=False)
        view.rmdir()


def test_a_file_written_through_the_normal_mount_appears_de_identified(beside, tmp_path):
    m, view = beside
    files, uids = canary_series(tmp_path)
    assert _wait_filled(view)["deid_view"]["files"] == 0
    (m.mnt / "CANARYNAMEA^ZQX").mkdir()
    for i, data in enumerate(files[:3]):
        (m.mnt / f"CANARYNAMEA^ZQX/{i}.dcm").write_bytes(data)
    deadline = time.monotonic() + 120
    while len(served := _tree(view)) < 3:
        assert time.monotonic() < deadline, view_status(view)
        time.sleep(0.2)
    _assert_clean(served, uids)
    originals = {pydicom.dcmread(io.BytesIO(f)).PixelData for f in files[:3]}
    for data in served.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.PatientIdentityRemoved == "YES" and ds.PixelData in originals
    # another user reads the view (allow_other, as the normal mount)
    name = sorted(served)[0]
    r = subprocess.run(["cat", str(view / name)], capture_output=True, user=65534, group=65534)
    assert r.returncode == 0 and r.stdout == served[name], r.stderr
    # the normal mount keeps its plaintext; the view refuses changes
    assert (m.mnt / "CANARYNAMEA^ZQX/0.dcm").read_bytes() == files[0]
    some = view / sorted(served)[0]
    with pytest.raises(OSError) as err:
        some.write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    # a file deleted through the normal mount leaves the view, a new one enters
    (m.mnt / "CANARYNAMEA^ZQX/0.dcm").unlink()
    deadline = time.monotonic() + 120
    while len(now := _tree(view)) != 2:
        assert time.monotonic() < deadline, view_status(view)
        time.sleep(0.2)
    assert set(now) < set(served)
    (m.mnt / "CANARYNAMEA^ZQX/3.dcm").write_bytes(files[3])
    while len(now := _tree(view)) != 3:
        assert time.monotonic() < deadline, view_status(view)
        time.sleep(0.2)
    _assert_clean(now, uids)
    # dcmfs umount of the view detaches it alone; the files stay mounted
    r = m.cli("umount", view)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(view) and m.is_mounted()
    assert (m.mnt / "CANARYNAMEA^ZQX/1.dcm").read_bytes() == files[1]
    # ... and the daemon still stops cleanly on SIGTERM (umount of the files)
    m.umount()
    assert not m.is_mounted() and m.daemon_pid() is None
    assert "closed cleanly" in m.log().split("the de-identified view at")[-1], m.log()


def test_unmounting_the_files_detaches_the_view(beside):
    m, view = beside
    (m.mnt / "note.txt").write_bytes(b"CANARY, not DICOM")
    assert view_status(view)["deid_view"]["alongside"] == str(m.mnt)
    m.umount()
    assert not os.path.ismount(view) and not m.is_mounted()
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key, "-o", f"view_mount={m.mnt}")
    assert r.returncode != 0  # a view needs its secret, and a mountpoint of its own
    for path in m.store.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_bytes(), path
