"""The view's Retain Safe Private Option (PS3.15 E.3.10): the private
attributes Table E.3.10-1 lists as safe are kept with their creators, every
other private attribute (a canary in each) goes, through the core and a real
view mount."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom.dataelem import RawDataElement

from dcmfs.core.deidview import DeidView, ViewKeys, ViewOptions
from dcmfs.storage import deidprivate

from .conftest import ct_file
from .test_deid_view import CANARY, ON, _mount_view, _read_all, _tree, _view_mount_env, _write

#: a UID the NQHeader block holds (Analyzed Series UID, safe: kept, remapped)
ANALYZED = "1.2.826.0.1.3680043.8.498.777123456789"


def with_private(implicit: bool = False) -> bytes:
    """pydicom-data's CT slice with a safe GE block (table speed, DS), an
    unsafe element in the same block, a safe slot with another VR and one
    with a non-number, a safe NQHeader UID, and a block of an unknown
    creator: every unsafe one a canary."""
    ds = copy.deepcopy(pydicom.dcmread(ct_file()))
    for tag in [t for t in ds.keys() if t.is_private]:
        del ds[tag]
    ge = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    ge.add_new(0x23, "DS", "13.75")                 # Table Speed: safe
    ge.add_new(0x27, "DS", "0.8")                   # Rotation Speed: safe
    ge.add_new(0x30, "LO", "CANARYGEPRIVATE")       # not in the table
    ge.add_new(0x24, "LO", "CANARYWRONGVR")         # a safe slot, but not its VR (DS)
    parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    # a safe DS slot holding text (raw: pydicom refuses to make such a DS)
    tag = parm.get_tag(0x6F)
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), "DS", 16, b"CANARYNOTANUMBER", 0, False,
                             True)
    nq = ds.private_block(0x0099, "NQHeader", create=True)
    nq.add_new(0x02, "UI", ANALYZED)                # safe, a UID: remapped
    nq.add_new(0x10, "FL", 1.5)                     # MI: safe
    other = ds.private_block(0x0011, "CANARYCREATOR", create=True)
    other.add_new(0x01, "DS", "1.0")                # a number, but no creator it lists
    buf = io.BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    with pydicom.config.disable_value_validation():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_the_table_is_the_standards_shape():
    rows = deidprivate.TABLE_E_3_10_1
    assert len(rows) == 130  # the rows of the table as transcribed
    assert all(group % 2 == 1 and 0 <= elem <= 0xFF and creator == creator.strip()
               for group, creator, elem, _ in rows)
    assert len({(g, c, e) for g, c, e, _ in rows}) == len(rows)
    assert all(vr not in ("OB", "SQ", "") for vr in deidprivate.SAFE.values())
    assert deidprivate.SAFE[(0x0019, "GEMS_ACQU_01", 0x23)] == "DS"
    assert (0x7E01, "HOLOGIC, Inc.", 0x12) not in deidprivate.SAFE  # OB: never


@pytest.mark.parametrize("implicit", [False, True])
def test_safe_private_attributes_are_kept_and_no_other(make_fs, implicit):
    fs = make_fs(ON)
    data = with_private(implicit)
    _write(fs, "/ct.dcm", data)
    assert fs.reencoder.wait_idle(timeout=60)
    served = {}
    for safe in (False, True):
        if safe:
            fs = make_fs(ON)  # the view closed the store: a remount
        view = DeidView(fs, ViewKeys(b"p" * 32), ViewOptions(safe_private=safe))
        try:
            view.build()
            assert view.wait_filled(120)
            (served[safe],) = _read_all(view).values()
        finally:
            view.close()
    for out in served.values():
        assert CANARY not in out.upper()
        assert ANALYZED.encode() not in out
    off = pydicom.dcmread(io.BytesIO(served[False]))
    assert not [e for e in off if e.tag.is_private]
    on = pydicom.dcmread(io.BytesIO(served[True]))
    kept = {int(e.tag): e for e in on if e.tag.is_private}
    assert kept.keys() == {0x00190010, 0x00191023, 0x00191027, 0x00990010, 0x00991002,
                           0x00991010}
    assert str(kept[0x00190010].value).strip() == "GEMS_ACQU_01"
    # implicit VR: pydicom reads a private value it has no dictionary entry for as bytes
    text = lambda tag: (v.decode() if isinstance(v := kept[tag].value, bytes)  # noqa: E731
                        else str(v)).strip("\0 ")
    assert float(text(0x00191023)) == 13.75
    assert text(0x00991002).startswith("2.25.")  # remapped
    assert on.PatientIdentityRemoved == "YES"
    assert ("113111", "Retain Safe Private Option") in {
        (i.CodeValue, i.CodeMeaning) for i in on.DeidentificationMethodCodeSequence}
    orig = pydicom.dcmread(io.BytesIO(data))
    assert (on.pixel_array == orig.pixel_array).all()


def test_a_view_mount_with_deid_safe_private(mount_env, tmp_path):
    m = mount_env
    secret = _view_mount_env(m, tmp_path, {"CANARYNAME/ct.dcm": with_private()})
    _mount_view(m, m.mnt, secret, "-o", "deid_safe_private=1")
    try:
        (data,) = _tree(m.mnt).values()
    finally:
        m.umount()
    assert CANARY not in data.upper() and ANALYZED.encode() not in data
    ds = pydicom.dcmread(io.BytesIO(data))
    assert float(ds[0x00191023].value) == 13.75
    assert {int(e.tag) for e in ds if e.tag.is_private} == {
        0x00190010, 0x00191023, 0x00191027, 0x00990010, 0x00991002, 0x00991010}
