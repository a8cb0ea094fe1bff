"""The de-identified research view (issue 21): a CT series with a canary in
every identifying attribute, and the pydicom-data corpus, served through
the view; no canary and no original UID in any byte or name of it, pixel
data equal, pseudonyms stable per secret, dates shifted consistently per
patient, burned-in files withheld and listed, every change refused."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import os
import pathlib
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dcmfs.core.deidview import DeidView, ViewKeys, ViewOptions
from dcmfs.errors import ReadOnlyError

from .conftest import SMALL, ct_file, dicom_files

CANARY = b"CANARY"
BIRTH = "19450317"
ON = dataclasses.replace(SMALL, reencode=True, checkpoint_interval=0, dicom=True)
#: (patient, study, study date) of each file of the series; the last two
#: are withheld by the burned-in rule
LAYOUT = [("A", 0, "20200615"), ("A", 0, "20200615"), ("A", 1, "20210310"),
          ("B", 2, "20191201"), ("B", 2, "20191201"), ("A", 0, "20200615"),
          ("B", 2, "20191201")]
WITHHELD = {5: "burned-in annotation", 6: "ultrasound"}


def canary_series(tmp: pathlib.Path) -> tuple[list[bytes], set[str]]:
    """The CT slice of pydicom-data as a small series of two patients with
    canaries in names, IDs, birth date, accession number, institution,
    physicians, descriptions, comments, device, a request sequence and
    private tags, and fresh UIDs (returned, with every other UID in the
    files)."""
    base = pydicom.dcmread(ct_file())
    files, uids = [], set()
    salt = os.urandom(4).hex()

    def uid(*parts) -> str:
        digest = int(hashlib.sha256(repr((salt,) + parts).encode()).hexdigest()[:24], 16)
        return f"1.2.826.0.1.3680043.8.498.{digest}"

    for i, (patient, study, date) in enumerate(LAYOUT):
        ds = copy.deepcopy(base)
        ds.PatientName = f"CANARYNAME{patient}^ZQX"
        ds.PatientID = f"CANARYPID{patient}"
        ds.OtherPatientIDs = f"CANARYOTHER{patient}"
        ds.PatientBirthDate = BIRTH
        ds.PatientAddress = "CANARYADDRESS"
        ds.AccessionNumber = f"CANARYACC{study}"
        ds.InstitutionName = "CANARYINST"
        ds.InstitutionAddress = "CANARYINSTADDR"
        ds.ReferringPhysicianName = "CANARYREF^DOC"
        ds.PerformingPhysicianName = "CANARYPERF^DOC"
        ds.OperatorsName = "CANARYOPERATOR"
        ds.StudyDescription = "CANARYSTUDYDESC"
        ds.SeriesDescription = "CANARYSERIESDESC"
        ds.ImageComments = "CANARYCOMMENT"
        ds.PatientComments = "CANARYPATIENTCOMMENT"
        ds.StudyID = "CANARYSID"
        ds.StationName = "CANARYSTATION"
        ds.DeviceSerialNumber = "CANARYSERIAL"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = "101010"
        req = Dataset()
        req.RequestedProcedureID = "CANARYREQ"
        req.ScheduledProcedureStepID = "CANARYSPS"
        ds.RequestAttributesSequence = Sequence([req])
        ds.add_new(0x00090010, "LO", "CANARYCREATOR")
        ds.add_new(0x00091001, "LO", "CANARYPRIVATE")
        ds.StudyInstanceUID = uid("study", study)
        ds.SeriesInstanceUID = uid("series", study)
        ds.SOPInstanceUID = uid("sop", i)
        ds.FrameOfReferenceUID = uid("for", study)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = uid("sop", (i + 1) % len(LAYOUT))
        ds.ReferencedImageSequence = Sequence([ref])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pixels = ds.pixel_array.copy()
        pixels.flat[:4] = i  # each slice its own image: a view file finds its original
        ds.PixelData = pixels.tobytes()
        if i == 5:
            ds.BurnedInAnnotation = "YES"
        if i == 6:
            ds.Modality = "US"
        for elem in ds.iterall():
            if elem.VR == "UI" and not pydicom.uid.UID(str(elem.value)).is_transfer_syntax \
                    and str(elem.value) not in pydicom.uid.UID_dictionary:
                uids.add(str(elem.value))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files, uids


def _write(fs, path: str, data: bytes) -> None:
    fh = fs.create(path, 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, data, 0)
    fs.release(fh)


def _walk(view, path="/"):
    for name, _ in view.readdir(path, None):
        p = path.rstrip("/") + "/" + name
        st = view.getattr(p)
        if st["st_mode"] & 0o040000:
            yield from _walk(view, p)
        else:
            yield p, st


def _read_all(view) -> dict[str, bytes]:
    out = {}
    for path, st in _walk(view):
        fh = view.open(path, os.O_RDONLY)
        try:
            data = b"".join(view.read(fh, 100_000, off) for off in range(0, st["st_size"] + 1,
                                                                         100_000))
        finally:
            view.release(fh)
        assert len(data) == st["st_size"], path  # stat's size is exact
        out[path] = data
    return out


def _assert_clean(files: dict[str, bytes], uids: set[str]) -> None:
    for path, data in files.items():
        assert CANARY not in path.upper().encode()
        assert not any(u in path for u in uids), path
        upper = data.upper()
        assert CANARY not in upper, (path, data[upper.find(CANARY) - 40:upper.find(CANARY) + 40])
        assert BIRTH.encode() not in data, path
        leaked = [u for u in uids if u.encode() in data]
        assert not leaked, (path, leaked)


def _dates(ds) -> list[datetime.date]:
    return [datetime.datetime.strptime(ds.get(k), "%Y%m%d").date()
            for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")]


@pytest.fixture
def series_store(make_fs, tmp_path):
    fs = make_fs(ON)
    files, uids = canary_series(tmp_path)
    fs.mkdir("/CANARYNAMEA^ZQX", 0o755, 0, 0)
    for i, data in enumerate(files):
        _write(fs, f"/CANARYNAMEA^ZQX/{i}.dcm", data)
    assert fs.reencoder.wait_idle(timeout=60)
    return fs, files, uids


def test_the_view_of_a_canary_series(series_store):
    fs, files, uids = series_store
    view = DeidView(fs, ViewKeys(b"s" * 32), ViewOptions(dates="shift"))
    try:
        view.build()
        assert view.wait_filled(120)
        served = _read_all(view)
        assert len(served) == len(files) - len(WITHHELD)
        _assert_clean(served, uids)
        originals = {hashlib.sha256(pydicom.dcmread(io.BytesIO(f)).PixelData).hexdigest(): f
                     for f in files}
        shifts: dict[str, set] = {}
        patients = set()
        for path, data in served.items():
            ds = pydicom.dcmread(io.BytesIO(data))
            orig = pydicom.dcmread(io.BytesIO(originals[
                hashlib.sha256(ds.PixelData).hexdigest()]))
            assert (ds.pixel_array == orig.pixel_array).all()
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.PatientName == ds.PatientID == path.split("/")[1]
            assert ds.StudyInstanceUID == path.split("/")[2]
            assert ds.StudyInstanceUID.startswith("2.25.")
            assert ds.SeriesInstanceUID == path.split("/")[3]
            assert ds.SOPInstanceUID + ".dcm" == path.split("/")[4]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
            # dates move by one offset per patient, the same for every attribute
            moved = {o - n for o, n in zip(_dates(orig), _dates(ds))}
            assert len(moved) == 1 and next(iter(moved)).days >= 1
            shifts.setdefault(str(orig.PatientID), set()).update(moved)
            patients.add((str(orig.PatientID), ds.PatientName))
        assert all(len(v) == 1 for v in shifts.values()), shifts
        assert len({p for p, _ in patients}) == len(patients) == 2  # one pseudonym each
        # the same study of the same patient: one directory
        assert len({p.rsplit("/", 2)[0] for p in served}) == 3
        assert sorted(map(len, view.withheld.values())) == [1, 1], view.withheld
        assert {"burned-in annotation", "ultrasound or secondary capture not declared free "
                "of burned-in text"} == set(view.withheld)
        with pytest.raises(ReadOnlyError):
            view.open(next(iter(served)), os.O_RDWR)
        with pytest.raises(ReadOnlyError):
            view.mkdir("/x", 0o755, 0, 0)
    finally:
        view.close()


def test_pseudonyms_are_stable_per_secret_and_unlinkable_across_secrets(series_store,
                                                                        make_fs):
    fs, files, uids = series_store
    fs.close()  # each view below opens the store anew (a remount)
    trees = []
    for secret in (b"a" * 32, b"a" * 32, b"b" * 32):
        fs = make_fs(ON)
        view = DeidView(fs, ViewKeys(secret), ViewOptions())
        try:
            view.build()
            assert view.wait_filled(120)
            trees.append(sorted(p for p, _ in _walk(view)))
        finally:
            view.close()
    assert trees[0] == trees[1] and len(trees[0]) == 5
    parts = [{part for p in tree for part in p.split("/")[1:]} for tree in trees]
    assert not parts[0] & parts[2]  # nothing in common with another secret


def test_withheld_files_are_listed_and_can_be_included(series_store):
    from dcmfs.core.control import content_stats
    from dcmfs.app.admin import render_stats
    fs, files, uids = series_store
    view = DeidView(fs, ViewKeys(b"c" * 32), ViewOptions(burned_in=True))
    try:
        view.build()
        assert view.wait_filled(120)
        assert view.withheld == {}
        served = _read_all(view)
        assert len(served) == len(files)
        _assert_clean(served, uids)
        with fs.lock:
            stats = content_stats(fs.index)
        text = render_stats(stats)
        assert "withholds 2 DICOM files" in text and "burned-in annotation" in text
        assert CANARY not in text.upper().encode()
    finally:
        view.close()


def test_retained_characteristics_and_device(series_store):
    fs, files, uids = series_store
    view = DeidView(fs, ViewKeys(b"d" * 32), ViewOptions(characteristics=True, device=True))
    try:
        view.build()
        assert view.wait_filled(120)
        data = next(iter(_read_all(view).values()))
        ds = pydicom.dcmread(io.BytesIO(data))
        orig = pydicom.dcmread(io.BytesIO(files[0]))
        assert ds.PatientSex == orig.PatientSex
        assert ds.DeviceSerialNumber == "CANARYSERIAL"  # kept on purpose: the option
        assert "StudyDate" not in ds or not ds.StudyDate  # dates removed by default
        assert "InstitutionName" not in ds or not ds.InstitutionName
    finally:
        view.close()


# --- through real mounts ------------------------------------------------------------------
def _mount_view(m, mnt, secret_file, *extra, wait=True):
    r = m.cli("mount", m.store, mnt, "--key-file", m.key, "--view", "deid",
              "--view-secret-file", secret_file, *extra)
    assert r.returncode == 0, r.stderr
    if wait:
        _wait_filled(mnt)


def view_status(mnt) -> dict:
    from dcmfs import format as fmt
    return json.loads(os.getxattr(mnt, fmt.STATUS_XATTR))


def _wait_filled(mnt, timeout=120.0) -> dict:
    """Until the view's first pass has looked at every file (it fills in
    the background); its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = view_status(mnt)
        if (status.get("deid_records") or {}).get("first_pass_done"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _view_mount_env(mount_env, tmp_path, files: dict[str, bytes]):
    m = mount_env
    m.mount()
    for name, data in files.items():
        path = m.mnt / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    r = m.cli("recompress", m.store, "--key-file", m.key, timeout=600)
    assert r.returncode == 0, r.stderr
    m.umount()
    secret = tmp_path / "view.secret"
    r = m.cli("new-view-secret", secret)
    assert r.returncode == 0 and oct(secret.stat().st_mode & 0o777) == "0o600", r.stderr
    return secret


def test_a_view_mount_of_the_canary_series(mount_env, tmp_path):
    m = mount_env
    files, uids = canary_series(tmp_path)
    secret = _view_mount_env(m, tmp_path, {f"CANARYNAMEA^ZQX/{i}.dcm": d
                                           for i, d in enumerate(files)})
    other = tmp_path / "other.secret"
    m.cli("new-view-secret", other, check=True)
    trees = []
    for key in (secret, secret, other):
        if key == other:  # the -o form (fstab lines, instance files)
            r = m.cli("mount", m.store, m.mnt, "--key-file", m.key, "-o",
                      f"view=deid,view_secret_file={key},deid_dates=shift")
            assert r.returncode == 0, r.stderr
            _wait_filled(m.mnt)
        else:
            _mount_view(m, m.mnt, key, "-o", "deid_dates=shift")
        try:
            served = _tree(m.mnt)
            assert len(served) == len(files) - len(WITHHELD)
            _assert_clean(served, uids)
            for data in served.values():
                ds = pydicom.dcmread(io.BytesIO(data))
                assert any(pydicom.dcmread(io.BytesIO(f)).PixelData == ds.PixelData
                           for f in files)
            trees.append(sorted(served))
            some = m.mnt / sorted(served)[0]
            for attempt in (lambda: open(some, "r+b"), lambda: (m.mnt / "new").write_bytes(b"x"),
                            lambda: (m.mnt / "d").mkdir(), lambda: some.unlink(),
                            lambda: os.chmod(some, 0o666)):
                with pytest.raises(OSError) as err:
                    attempt()
                assert err.value.errno == errno.EROFS
            stats = m.cli("stats", m.store)
            assert stats.returncode == 0 and "withholds 2 DICOM files" in stats.stdout
        finally:
            m.umount()
    assert trees[0] == trees[1]
    assert not {p.split("/")[0] for p in trees[0]} & {p.split("/")[0] for p in trees[2]}
    # reads through the view are in the audit trail, with the view's name and path
    r = m.cli("audit", m.store, "--key-file", m.key, "--event", "open", "--json", check=True)
    opens = [json.loads(line) for line in r.stdout.splitlines()]
    viewed = [o for o in opens if o.get("view") == "deid"]
    assert {o["path"].lstrip("/") for o in viewed} >= set(trees[0]), viewed[:3]
    assert all("CANARY" not in o["path"] for o in viewed)
    for path in m.store.rglob("*"):  # nothing of the canaries in the store or the log
        if path.is_file():
            assert CANARY not in path.read_bytes().upper(), path
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key, "--view", "deid")
    assert r.returncode == 2 and "view-secret" in r.stderr  # a view needs its own secret
    r = m.cli("mount", m.store, m.mnt, "--key-file", m.key, "--view", "deid",
              "--view-secret-file", m.key)
    assert r.returncode == 16 and "key" in r.stderr  # ... never the store's key


@pytest.mark.slow
def test_a_view_mount_of_the_corpus(mount_env, tmp_path):
    """Every DICOM file of pydicom-data and pydicom's test files through the
    view (burned-in ones included): every file parses, its pixel data is an
    original's byte for byte, and no original UID is in any byte or name."""
    from dcmfs.storage import deid
    m = mount_env
    corpus = {f"{i:03d}-{p.name}": p.read_bytes() for i, p in enumerate(dicom_files())}
    uids, pixels, listed = set(), set(), 0
    for data in corpus.values():
        facts = deid.facts(data[:deid.HEADER_CAP], len(data))
        if facts.get("dicom") and not facts.get("reason"):
            listed += 1
            uids.update(u for u in facts["uids"] if len(u) > 12)
            pixels.add(hashlib.sha256(data[facts["value_at"]:facts["pixel_end"]]).hexdigest())
    # what pydicom writes as ImplementationClassUID of a file that has none
    # is in some originals too: not an identifying UID
    uids.discard(pydicom.uid.PYDICOM_IMPLEMENTATION_UID)
    secret = _view_mount_env(m, tmp_path, corpus)
    _mount_view(m, m.mnt, secret, "-o", "deid_burned_in=1")
    try:
        served = _tree(m.mnt)
    finally:
        m.umount()
    assert len(served) == listed > 40
    _assert_clean(served, uids)
    for data in served.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert hashlib.sha256(_pixel_bytes(data)).hexdigest() in pixels
        assert ds.PatientIdentityRemoved == "YES"


def _pixel_bytes(data: bytes) -> bytes:
    from dcmfs.storage import deid
    facts = deid.facts(data[:deid.HEADER_CAP], len(data))
    assert facts["reason"] == ""
    return data[facts["value_at"]:facts["pixel_end"]]



def test_a_normal_mount_fills_the_records_after_re_encoding(make_fs, tmp_path, monkeypatch):
    """The view's first mount finds the records made: a normal mount fills
    them once the re-encoder is idle and file I/O quiet.  The pass looks at
    the index a slice at a time (2 inodes here: the root, files and slices
    that end between them)."""
    from dcmfs.core import deidrecords
    monkeypatch.setattr(deidrecords, "SLICE", 2)
    monkeypatch.setattr(deidrecords.RecordFiller, "INTERVAL", 0.2)
    monkeypatch.setattr(deidrecords.RecordFiller, "QUIET", 0.1)
    fs = make_fs(ON)
    files, _ = canary_series(tmp_path)
    for i, data in enumerate(files[:3]):
        _write(fs, f"/{i}.dcm", data)
    _write(fs, "/notes.txt", b"CANARY notes, not DICOM")
    assert fs.reencoder.wait_idle(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with fs.lock, fs.index.begin() as txn:  # the filler's thread uses the index too
            records = dict(txn.iter_deid())
        if len(records) == 4:
            break
        time.sleep(0.1)
    assert sorted(r["dicom"] for r in records.values()) == [False, True, True, True]
    with fs.lock, fs.index.begin() as txn:
        assert all(r["generation"] == txn.get_inode(ino).generation
                   for ino, r in records.items())


def test_hostile_files_through_the_view(make_fs, caplog):
    """Fuzzed DICOM (bit flips, wrong lengths and VRs, truncations, lying
    geometry, a canary in every text element) and a crafted file: the view
    lists what it can serve, every listed file reads back at its stat size or
    answers EIO, and nothing of a file reaches the log."""
    from dcmfs.errors import StoreIOError

    from .fuzz_dicom import CANARY as FUZZ_CANARY
    from .fuzz_dicom import cases, deep_sequences, phi_in_bits_allocated
    fs = make_fs(ON)
    hostile = list(cases(60, seed=21)) + [("phi", phi_in_bits_allocated()),
                                          ("deep", deep_sequences(20_000))]
    for name, data in hostile:
        _write(fs, f"/{name}.dcm", data)
    assert fs.reencoder.wait_idle(timeout=120)
    view = DeidView(fs, ViewKeys(b"h" * 32), ViewOptions(burned_in=True))
    served = failed = 0
    try:
        view.build()
        assert view.wait_filled(120)
        for path in _paths(view):
            assert FUZZ_CANARY not in path.encode()
            try:
                st = view.getattr(path)
                fh = view.open(path, os.O_RDONLY)
                data = view.read(fh, st["st_size"] + 1, 0)
                view.release(fh)
                assert len(data) == st["st_size"]
                served += 1
            except StoreIOError:
                failed += 1  # a header the worker could not rewrite: EIO, said once
        with fs.lock, fs.index.begin() as txn:
            records = dict(txn.iter_deid())
        assert len(records) == len(hostile)
    finally:
        view.close()
    assert served > 10, (served, failed)
    assert FUZZ_CANARY not in caplog.text.encode()


def _paths(view, path="/"):
    for name, _ in view.readdir(path, None):
        p = path.rstrip("/") + "/" + name
        node = view._node(p)
        if node.children is not None:
            yield from _paths(view, p)
        else:
            yield p


def test_the_record_of_a_file_that_is_not_dicom_reads_only_its_first_bytes(make_fs):
    """The records' pass reads a file's first 64 KiB and reads on (up to
    16 MiB) only for a DICOM header longer than that: a file its first
    bytes say is not DICOM was read to 16 MiB and sent to a worker again,
    for every such file in the store, in the background."""
    from dcmfs.core import deidrecords
    from dcmfs.sandbox.pool import ParserPool

    fs = make_fs(ON)
    _write(fs, "/scan.bin", os.urandom(3 << 20))
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, "/scan.bin")
    read = []
    real = fs.read
    fs.read = lambda fh, size, offset, ahead=True: read.append(size) or real(fh, size, offset,
                                                                               ahead)
    parsers = ParserPool(1)
    try:
        facts = deidrecords._facts(fs, parsers, ino, 3 << 20)
    finally:
        parsers.close()
        del fs.read
    assert facts == {"dicom": False, "reason": "not DICOM"}
    assert read == [deidrecords.FIRST_BYTES]
