"""The de-identified view's profile against the standard's own table.

DICOM PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile)
as parsed from the standard's DocBook by innolitics' ``dicom-standard``
package (its ``confidentiality_profile_attributes.json``): every attribute
it lists has an action in the table the view applies (from
``dicom-anonymizer``), a compatible one, and the option columns the view
offers are the standard's.
"""

from __future__ import annotations

import io
import json
import pathlib
import sys

import pydicom
import pytest

from dcmfs.storage import deid


def _standard() -> list[dict]:
    path = pathlib.Path(sys.prefix) / "standard" / "confidentiality_profile_attributes.json"
    if not path.exists():
        pytest.skip("dicom-standard (the test extra) is not installed")
    return json.loads(path.read_text())


def _tag(entry: dict) -> int | None:
    ident = entry["id"]
    if len(ident) != 8 or not all(c in "0123456789abcdefABCDEF" for c in ident):
        return None  # a repeating group (50xx, 60xx) or "odd groups"
    return int(ident, 16)


def _action_of(tag: int) -> str | None:
    exact, masked = deid.table()
    if tag in exact:
        return exact[tag]
    return next((code for value, mask, code in masked if tag & mask == value), None)


def test_every_attribute_of_the_standard_table_has_its_action():
    entries = _standard()
    checked = 0
    wrong = []
    for entry in entries:
        tag = _tag(entry)
        if tag is None:
            continue
        action = _action_of(tag)
        std = entry["basicProfile"]
        # the table may be newer than the parsed standard (2020): an action may
        # have become stricter (e.g. X/Z -> X) but never weaker than removing,
        # emptying, a dummy or remapping
        if action is None or (std == "U" and action not in ("U", "X/Z/U*", "D")) \
                or (std == "X" and not action.startswith("X")):
            wrong.append((entry["tag"], entry["name"], std, action))
        checked += 1
    assert checked > 400
    assert not wrong, wrong


def test_curves_overlays_and_private_groups():
    # 50xx curves and 60xx overlay data and comments are removed
    assert _action_of(0x50020010) == "X"
    assert _action_of(0x60003000) == "X" and _action_of(0x60024000) == "X"
    entries = _standard()
    assert any("odd" in e["id"].lower() for e in entries)  # private: handled in clean()


@pytest.mark.parametrize("column, ours", [
    ("rtnPatCharsOpt", deid.RETAIN_CHARACTERISTICS),
    ("rtnDevIdOpt", deid.RETAIN_DEVICE),
    ("rtnLongModifDatesOpt", deid.MODIFIED_DATES),
])
def test_option_columns_are_the_standards(column, ours):
    wanted = "C" if column == "rtnLongModifDatesOpt" else "K"
    standard = {_tag(e) for e in _standard() if e.get(column) == wanted and _tag(e)}
    assert set(ours) == standard


def test_the_method_code_sequence_says_what_was_applied():
    from pydicom.sr.codedict import codes
    raw, facts = _ct_facts()
    mapping = {u: "2.25.1" + str(i) for i, u in enumerate(facts["uids"])}
    header = deid.rewrite(raw[:facts["value_at"]], facts["element_at"], facts["value_at"],
                          mapping, "PX", 10, True, True)
    ds = pydicom.dcmread(io.BytesIO(header + raw[facts["value_at"]:facts["pixel_end"]]))
    got = {(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence}
    want = {(c.value, c.scheme_designator) for c in (
        codes.DCM.BasicApplicationConfidentialityProfile,
        codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
        codes.DCM.RetainPatientCharacteristicsOption, codes.DCM.RetainDeviceIdentityOption)}
    assert got == want
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    methods = list(ds.DeidentificationMethod)
    assert "Basic Application Confidentiality Profile" in methods[0] and len(methods) == 4
    assert all(len(m) <= 64 for m in methods)  # LO


def test_an_unmapped_uid_is_an_error_not_a_leak():
    raw, facts = _ct_facts()
    with pytest.raises(KeyError):
        deid.rewrite(raw[:facts["value_at"]], facts["element_at"], facts["value_at"], {},
                     "PX", None, False, False)


def _ct_facts():
    from .conftest import ct_file
    raw = ct_file().read_bytes()
    facts = deid.facts(raw[:deid.HEADER_CAP], len(raw))
    assert facts["reason"] == "" and facts["withheld"] == ""
    return raw, facts
