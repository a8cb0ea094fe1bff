"""The Retain Safe Private Option of DICOM PS3.15 (E.3.10) for the
de-identified view: the private attributes the standard lists as known to
be safe (Table E.3.10-1, "Safe Private Attributes"), kept with the private
creators that define them; every other private attribute goes.

No library holds this table: dicom-anonymizer (the view's Table E.1-1),
innolitics' dicom-standard (Table E.1-1 only), pydicom's deid, dicognito
and idiscore (a mechanism for safe-private definitions, an empty default)
were checked.  The rows below are transcribed from PS3.15 Annex E, Table
E.3.10-1 (the DICOM Standard, (c) NEMA; read from a reStructuredText
conversion of the standard's DocBook).  ``tests/test_deid_private.py``
checks this table's shape.

What the view keeps of the table, and why less than all of it (the
option lets a de-identifier decide what it knows to be safe; the table's
own Note 2 says bulk OB data "is particularly unsafe"):

* rows whose VR is OB or SQ, or left blank in the table, are never kept
  (OB: whole proprietary headers, possibly with the patient's name; SQ:
  their items hold what no row describes);
* an element is kept only when the file's own VR (explicit VR) is the
  table's, so a private creator string reused by someone else for other
  data is not trusted;
* numeric values (DS, IS) must be numbers, and UI values are remapped with
  the view's keyed hash like every other UID (one the daemon did not map
  is dropped, never passed through).
"""

from __future__ import annotations

#: (group, private creator, element byte within its block, VR)
TABLE_E_3_10_1: tuple[tuple[int, str, int, str], ...] = (
    (0x7053, "Philips PET Private Group", 0x00, "DS"),
    (0x7053, "Philips PET Private Group", 0x09, "DS"),
    (0x00E1, "ELSCINT1", 0x21, "DS"),
    (0x00E1, "ELSCINT1", 0x50, "DS"),
    (0x01E1, "ELSCINT1", 0x26, "CS"),
    (0x01F1, "ELSCINT1", 0x01, "CS"),
    (0x01F1, "ELSCINT1", 0x07, "DS"),
    (0x01F1, "ELSCINT1", 0x26, "DS"),
    (0x01F1, "ELSCINT1", 0x27, "DS"),
    (0x0019, "GEMS_ACQU_01", 0x23, "DS"),
    (0x0019, "GEMS_ACQU_01", 0x24, "DS"),
    (0x0019, "GEMS_ACQU_01", 0x27, "DS"),
    (0x0019, "GEMS_ACQU_01", 0x9E, "LO"),
    (0x0043, "GEMS_PARM_01", 0x27, "SH"),
    (0x0045, "GEMS_HELIOS_01", 0x01, "SS"),
    (0x0045, "GEMS_HELIOS_01", 0x02, "FL"),
    (0x0903, "GEIIS PACS", 0x10, "US"),
    (0x0903, "GEIIS PACS", 0x11, "US"),
    (0x0903, "GEIIS PACS", 0x12, "US"),
    (0x2001, "Philips Imaging DD 001", 0x03, "FL"),
    (0x2001, "Philips Imaging DD 001", 0x04, "CS"),
    (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
    (0x0019, "SIEMENS MR HEADER", 0x0D, "CS"),
    (0x0019, "SIEMENS MR HEADER", 0x0E, "FD"),
    (0x0019, "SIEMENS MR HEADER", 0x27, "FD"),
    (0x0043, "GEMS_PARM_01", 0x39, "IS"),
    (0x0043, "GEMS_PARM_01", 0x6F, "DS"),
    (0x0025, "GEMS_SERS_01", 0x07, "SL"),
    (0x7E01, "HOLOGIC, Inc.", 0x01, "LO"),
    (0x7E01, "HOLOGIC, Inc.", 0x02, "SH"),
    (0x7E01, "HOLOGIC, Inc.", 0x10, "SQ"),
    (0x7E01, "HOLOGIC, Inc.", 0x11, "SQ"),
    (0x7E01, "HOLOGIC, Inc.", 0x12, "OB"),
    (0x0099, "NQHeader", 0x01, "UI"),
    (0x0099, "NQHeader", 0x02, "UI"),
    (0x0099, "NQHeader", 0x04, "SS"),
    (0x0099, "NQHeader", 0x05, "LT"),
    (0x0099, "NQHeader", 0x10, "FL"),
    (0x0099, "NQHeader", 0x20, "SH"),
    (0x0099, "NQHeader", 0x21, "FL"),
    *((0x0199, "NQLeft", e, "FL") for e in range(0x01, 0x17)),
    *((0x0299, "NQRight", e, "FL") for e in range(0x01, 0x17)),
    (0x2005, "Philips MR Imaging DD 001", 0x0D, "FL"),
    (0x2005, "Philips MR Imaging DD 001", 0x0E, "FL"),
    *((0x0119, "SIEMENS Ultrasound SC2000", e, vr) for e, vr in (
        (0x00, "LO"), (0x01, "OB"), (0x02, "SQ"), (0x03, "SQ"), (0x04, "OB"), (0x05, "UL"),
        (0x06, "UL"), (0x07, "UL"), (0x08, "UL"), (0x09, "SS"), (0x10, "SH"), (0x11, ""),
        (0x12, ""), (0x13, "IS"), (0x21, "SH"))),
    *((0x0129, "SIEMENS Ultrasound SC2000", e, vr) for e, vr in (
        (0x00, "SQ"), (0x02, "UI"), (0x03, ""), (0x04, ""), (0x05, ""), (0x06, "SQ"),
        (0x07, "UI"), (0x08, "OB"), (0x09, "SQ"), (0x10, "OB"), (0x11, "SQ"), (0x12, "UI"),
        (0x20, "SQ"), (0x21, "OB"), (0x22, "OB"), (0x29, "OB"), (0x30, "CS"))),
    (0x0139, "SIEMENS Ultrasound SC2000", 0x01, "SL"),
    (0x0149, "SIEMENS Ultrasound SC2000", 0x01, "FD"),
    (0x0149, "SIEMENS Ultrasound SC2000", 0x02, "FD"),
    (0x0149, "SIEMENS Ultrasound SC2000", 0x03, "FD"),
    *((0x7FD1, creator, e, vr) for creator in ("SIEMENS Ultrasound SC2000",
                                               "SIEMENS SYNGO ULTRA-SOUND TOYON DATA STREAMING")
      for e, vr in ((0x01, "OB"), (0x09, "UI"), (0x10, "OB"), (0x11, "OB"))),
)

#: VRs never kept, whatever the table says (see the module's docstring)
NEVER = frozenset({"OB", "SQ", ""})
#: {(group, creator, element byte): VR} of the rows the view keeps
SAFE: dict[tuple[int, str, int], str] = {
    (group, creator, elem): vr for group, creator, elem, vr in TABLE_E_3_10_1 if vr not in NEVER}
#: the DCM code of CID 7050 for the option
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")


def safe_private_tags(ds) -> dict[int, str]:
    """The private tags of one dataset (not its sequences' items) that the
    option keeps, with the VR each must have: the safe data elements and
    the creators (LO) of their blocks."""
    creators: dict[int, str] = {}
    for tag in ds.keys():
        t = int(tag)
        if tag.is_private and 0x10 <= (t & 0xFFFF) <= 0xFF:
            value = ds.get_item(tag).value
            if isinstance(value, bytes):
                value = value.decode("latin-1", "replace")
            creators[t] = str(value or "").strip(" \0")
    keep: dict[int, str] = {}
    for tag in ds.keys():
        t = int(tag)
        group, elem = t >> 16, t & 0xFFFF
        if not tag.is_private or elem < 0x1000:
            continue
        creator_tag = (group << 16) | (elem >> 8)
        vr = SAFE.get((group, creators.get(creator_tag, ""), elem & 0xFF))
        if vr is None:
            continue
        raw = ds.get_item(tag)
        declared = getattr(raw, "VR", None)
        if declared not in (None, "UN", vr):
            continue  # another VR than the table's: not the attribute it lists
        keep[t] = vr
        keep[creator_tag] = "LO"
    return keep


def numeric(value: str) -> bool:
    """A DS or IS value made of numbers only (backslash-separated)."""
    text = value.strip(" \0")
    if not text:
        return True
    for part in text.split("\\"):
        try:
            float(part.strip())
        except ValueError:
            return False
    return True
