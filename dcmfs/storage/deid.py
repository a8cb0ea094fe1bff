"""De-identification of a DICOM header (DICOM PS3.15 Annex E, Basic
Application Level Confidentiality Profile), for the research view.

This module parses hostile bytes: it runs in the parser workers
(:mod:`dcmfs.sandbox.worker`), never in the daemon, and holds no key.  It
does two things:

* :func:`facts` - what the view needs to list a file, from its header: the
  patient's identity (to derive a pseudonym from), the study, series and
  instance UIDs, every other UID the header holds (the daemon maps them
  with its keyed hash; the worker never sees the view's secret), where the
  Pixel Data element starts and ends, and whether the file is withheld
  (burned-in annotation).
* :func:`rewrite` - the de-identified header: the dataset up to the Pixel
  Data element with the profile's actions applied, written again in the
  file's own transfer syntax and ending with the original Pixel Data
  element header, so the pixel value itself follows byte for byte from the
  stored extents.

The attribute table and its actions are the standard's Table E.1-1 as
transcribed by the ``dicom-anonymizer`` package (its 2026c edition:
D dummy, Z empty, X remove, U remap, and the combined codes); the option
columns used here (retain patient characteristics, retain device identity,
retain longitudinal temporal information with modified dates) are the
standard's too, listed below and checked against the standard's table by
``tests/test_deid_profile.py``.  The library's own ``anonymize_dataset``
is not used: it walks its ~600 table entries per dataset (27 ms for a CT
header against ~1 ms for one pass over the dataset's elements here), and
its UIDs are random, not keyed.
"""

from __future__ import annotations

import datetime
import io
import logging
import re
import struct
import warnings

from .deidprivate import CODE_SAFE_PRIVATE, numeric, safe_private_tags
from .dicom import DEFLATED, HEADER_CAP, precheck, sniff

PIXEL_DATA = 0x7FE00010

#: the standard's option columns of Table E.1-1 (PS3.15): attributes kept
#: by "Retain Patient Characteristics Option" (K)
RETAIN_CHARACTERISTICS = frozenset({
    0x00100040, 0x00101010, 0x00101020, 0x00101030, 0x00102160, 0x001021A0,
    0x001021C0, 0x00102203})
#: ... by "Retain Device Identity Option" (K)
RETAIN_DEVICE = frozenset({
    0x00081010, 0x0016004E, 0x0016004F, 0x00160050, 0x00160051, 0x00181000, 0x00181002,
    0x00181004, 0x00181005, 0x00181007, 0x00181008, 0x00181009, 0x0018100A, 0x0018100B,
    0x0018700A, 0x00189367, 0x00189371, 0x00189373, 0x00321020, 0x00321021, 0x00400001,
    0x00400010, 0x00400011, 0x00400241, 0x00400242, 0x00404025, 0x00404027, 0x00404028,
    0x00404030, 0x00500020, 0x30080105, 0x300A00B2, 0x300A0216, 0x3010002D, 0x30100043})
#: ... and modified (C) by "Retain Longitudinal Temporal Information with
#: Modified Dates Option": dates are shifted, times kept
MODIFIED_DATES = frozenset({
    0x00080015, 0x00080020, 0x00080021, 0x00080022, 0x00080023, 0x00080024, 0x00080025,
    0x0008002A, 0x00080030, 0x00080031, 0x00080032, 0x00080033, 0x00080034, 0x00080035,
    0x00080201, 0x001021D0, 0x0016008D, 0x00189369, 0x0018936A, 0x00189516, 0x00189517,
    0x00340007, 0x00380020, 0x00380021, 0x00400002, 0x00400003, 0x00400004, 0x00400005,
    0x00400244, 0x00400245, 0x00400250, 0x00400251, 0x00404005, 0x00404008, 0x00404010,
    0x00404011, 0x00404050, 0x00404051, 0x00404052, 0x0040A192, 0x0040A193, 0x30080054,
    0x30080056, 0x30080250, 0x30080251, 0x300A0006, 0x300A0007, 0x3010004C, 0x3010004D})

#: file meta elements that may name the sender
_META_DROP = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
#: SOP classes whose images often carry burned-in text (withheld unless
#: BurnedInAnnotation is NO): ultrasound and secondary capture
_BURNED_CLASSES = frozenset(
    ["1.2.840.10008.5.1.4.1.1." + s for s in ("6", "6.1", "6.2", "3", "3.1", "7", "7.1",
                                              "7.2", "7.3", "7.4")])
_BURNED_MODALITIES = ("US", "SC")
#: why a file the view could serve is withheld (a fixed vocabulary)
BURNED_IN = "burned-in annotation"
MAY_BE_BURNED_IN = "ultrasound or secondary capture not declared free of burned-in text"
WITHHELD_REASONS = ("", BURNED_IN, MAY_BE_BURNED_IN)
#: the DCM codes of CID 7050 for what the view applies
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
CODE_DEVICE = ("113109", "Retain Device Identity Option")
#: at most this many UIDs in one header (an enhanced multi-frame header
#: holds a few per frame); more and the file is withheld
MAX_UIDS = 20_000

_TABLE: dict[int, str] | None = None
_MASKED: list[tuple[int, int, str]] = []


def table() -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """The profile: {tag: action} and [(value, mask, action)] for the
    repeating groups (curves 50xx, overlays 60xx).  Actions are the table's
    codes: D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*."""
    global _TABLE
    if _TABLE is None:
        t = _table_module()
        exact: dict[int, str] = {}
        for name, code in (("D_TAGS", "D"), ("Z_TAGS", "Z"), ("X_TAGS", "X"), ("U_TAGS", "U"),
                           ("Z_D_TAGS", "Z/D"), ("X_Z_TAGS", "X/Z"), ("X_D_TAGS", "X/D"),
                           ("X_Z_D_TAGS", "X/Z/D"), ("X_Z_U_STAR_TAGS", "X/Z/U*")):
            for entry in getattr(t, name):
                if len(entry) == 2:
                    exact[(entry[0] << 16) | entry[1]] = code
                else:
                    group, elem, gmask, emask = entry
                    _MASKED.append(((group << 16) | elem, (gmask << 16) | emask, code))
        _TABLE = exact
    return _TABLE, _MASKED


def _table_module():
    """The table's module alone (plain data), not the ``dicomanonymizer``
    package, whose import pulls argparse, tqdm and importlib.metadata into
    every parser worker."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("dicomanonymizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dicom-anonymizer is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "dicom_anonymization_databases",
                        "dicomfields_2026c.py")
    table_spec = importlib.util.spec_from_file_location("_dcmfs_ps315_table", path)
    module = importlib.util.module_from_spec(table_spec)
    table_spec.loader.exec_module(module)
    return module


def _quiet_pydicom():
    import pydicom
    from pydicom import config as pdconfig

    logger = logging.getLogger("pydicom")
    if logger.propagate:  # once: its messages quote values
        logger.propagate = False
        logger.addHandler(logging.NullHandler())
    pdconfig.settings.reading_validation_mode = pdconfig.IGNORE
    pdconfig.settings.writing_validation_mode = pdconfig.IGNORE
    return pydicom


def _read(head: bytes, stop: bool):
    pydicom = _quiet_pydicom()
    part10 = len(head) >= 132 and head[128:132] == b"DICM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(head), defer_size=None if stop else 4096,
                               force=not part10, stop_before_pixels=stop)


_UID = re.compile(rb"[0-9]+(\.[0-9]+){2,}")


def _known_uid(value: str) -> bool:
    from pydicom.uid import UID_dictionary
    return value in UID_dictionary


def _walk_uids(ds, out: set) -> None:
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                v = str(v).strip("\0 ")
                if v and not _known_uid(v):
                    out.add(v)
        elif elem.VR == "UN" and elem.tag.is_private and isinstance(elem.value, bytes) \
                and 8 <= len(elem.value) <= 64 * 8:
            # implicit VR: a private UID the safe-private option may keep
            for v in elem.value.split(b"\\"):
                v = v.strip(b"\0 ")
                if _UID.fullmatch(v) and not _known_uid(v.decode()):
                    out.add(v.decode())


def facts(head: bytes, size: int) -> dict:
    """What the view needs of one file (``head``: its first bytes, at most
    :data:`~dcmfs.storage.dicom.HEADER_CAP`).  ``{"listed": False,
    "reason": ...}`` for a file the view cannot serve; the reason is a fixed
    text, never a byte of the file."""
    if not sniff(head[:132]):
        return {"dicom": False, "reason": "not DICOM"}
    refused = precheck(head, size)
    if refused:
        return {"dicom": True, "reason": refused}
    try:
        ds = _read(head, stop=False)
        return _facts(ds, head, size)
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:  # noqa: BLE001 — the type only: messages quote bytes
        return {"dicom": True, "reason": f"unreadable ({type(exc).__name__})"}


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _facts(ds, head: bytes, size: int) -> dict:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts == DEFLATED:
        return {"dicom": True, "reason": "deflated transfer syntax"}
    pixel = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if pixel is None or getattr(pixel, "value_tell", None) is None:
        return {"dicom": True, "reason": "no pixel data"}
    implicit, little = ds.original_encoding
    value_at, length = pixel.value_tell, pixel.length
    explicit_long = not implicit
    element_at = value_at - (12 if explicit_long else 8)
    if element_at < 0 or struct.unpack_from("<HH" if little else ">HH", head, element_at) \
            != (0x7FE0, 0x0010):
        return {"dicom": True, "reason": "pixel data not located"}
    if length == 0xFFFFFFFF:
        end = _fragments_end(head, value_at, little)
        if end is None:
            return {"dicom": True, "reason": "pixel data beyond what the view reads"}
    else:
        end = value_at + length
    if end > size:
        return {"dicom": True, "reason": "pixel data longer than the file"}
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class or not _text(ds, "SOPInstanceUID"):
        return {"dicom": True, "reason": "no SOP class or instance UID"}
    modality = _text(ds, "Modality").upper()
    burned = _text(ds, "BurnedInAnnotation").upper()
    withheld = ""
    if burned == "YES":
        withheld = BURNED_IN
    elif burned != "NO" and (modality in _BURNED_MODALITIES
                             or sop_class in _BURNED_CLASSES):
        withheld = MAY_BE_BURNED_IN
    uids: set = set()
    _walk_uids(ds, uids)
    if meta is not None:
        _walk_uids(meta, uids)
    if len(uids) > MAX_UIDS:
        return {"dicom": True, "reason": "too many UIDs"}
    patient = _text(ds, "PatientID")
    patient = (f"id:{patient}^{_text(ds, 'IssuerOfPatientID')}" if patient else
               (f"name:{_text(ds, 'PatientName')}" if _text(ds, "PatientName") else
                f"study:{_text(ds, 'StudyInstanceUID')}"))
    return {"dicom": True, "reason": "", "withheld": withheld, "patient": patient,
            "study": _text(ds, "StudyInstanceUID"), "series": _text(ds, "SeriesInstanceUID"),
            "sop": _text(ds, "SOPInstanceUID"), "modality": modality[:16],
            "element_at": element_at, "value_at": value_at, "pixel_end": end,
            "uids": sorted(uids)}


def _fragments_end(head: bytes, pos: int, little: bool) -> int | None:
    """Where encapsulated pixel data ends (after its sequence delimiter), if
    within ``head``."""
    fmt = "<HHI" if little else ">HHI"
    while pos + 8 <= len(head):
        group, elem, length = struct.unpack_from(fmt, head, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return None
        pos += length
    return None


# --- the rewrite ------------------------------------------------------------------
def rewrite(head: bytes, element_at: int, value_at: int, mapping: dict, pseudonym: str,
            shift_days: int | None, characteristics: bool, device: bool,
            safe_private: bool = False) -> bytes:
    """The de-identified header of a file: every byte up to and including
    the Pixel Data element's header (tag, VR, length) of the view's file.
    ``mapping`` gives the new value of every UID :func:`facts` listed (a
    UID it does not map is an error, never passed through);
    ``shift_days``: None removes dates as the profile says, else dates are
    shifted back by that many days; ``safe_private``: the Retain Safe
    Private Option (:mod:`dcmfs.storage.deidprivate`)."""
    pydicom = _quiet_pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence

    ds = _read(head[:element_at], stop=True)
    implicit, little = ds.original_encoding
    exact, masked = table()
    ctx = _Context(exact, masked, mapping, shift_days, characteristics, device, safe_private)
    ctx.clean(ds)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientIdentityRemoved = "YES"
    codes = [CODE_BASIC]
    if shift_days is not None:
        codes.append(CODE_MODIFIED_DATES)
    if characteristics:
        codes.append(CODE_CHARACTERISTICS)
    if device:
        codes.append(CODE_DEVICE)
    if safe_private:
        codes.append(CODE_SAFE_PRIVATE)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift_days is not None \
        else "REMOVED"
    # LO, one value per method (at most 64 characters each)
    methods = ["dcmfs: PS3.15 Basic Application Confidentiality Profile"]
    methods += [meaning for _, meaning in codes[1:]]
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    items = []
    for value, meaning in codes:
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    for tag in _META_DROP:
        if tag in meta:
            del meta[tag]
    ctx.map_uids(meta)
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ("1.2.840.10008.1.2" if implicit else
                                  "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", ""))
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    return _write(ds, meta, head, implicit, little) + head[element_at:value_at]


#: explicit-VR value representations with a 4-byte length (a 12-byte header)
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _write(ds, meta, head: bytes, implicit: bool, little: bool) -> bytes:
    """Preamble, file meta and the dataset in the file's own encoding.  An
    element the profile left as it was (still raw, as read) is copied from
    the original bytes; pydicom writes the others (its writer costs ~0.1 ms
    an element, most of a CT header's rewrite)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element, write_file_meta_info

    out = DicomBytesIO()
    out.write(bytes(128) + b"DICM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(out, meta, enforce_standard=True)
        out.is_little_endian, out.is_implicit_VR = little, implicit
        encodings = ds._character_set
        for tag in sorted(ds.keys()):
            elem = ds.get_item(tag)
            raw = _raw_bytes(elem, head, implicit, little) \
                if isinstance(elem, RawDataElement) else None
            if raw is not None:
                out.write(raw)
            else:
                write_data_element(out, ds[tag], encodings)
    return out.getvalue()


def _raw_bytes(elem, head: bytes, implicit: bool, little: bool) -> bytes | None:
    """The element as it stands in the original, if it can be located
    exactly (defined length, its tag where its header should start)."""
    if elem.value_tell is None or elem.length == 0xFFFFFFFF:
        return None
    size = 8 if implicit or (elem.VR not in _LONG) else 12
    start = elem.value_tell - size
    end = elem.value_tell + elem.length
    tag = int(elem.tag)
    if start < 0 or end > len(head) or head[start:start + 4] != struct.pack(
            "<HH" if little else ">HH", tag >> 16, tag & 0xFFFF):
        return None
    if not implicit and head[start + 4:start + 6].decode("latin-1") != elem.VR:
        return None
    return head[start:end]


class _Context:
    def __init__(self, exact, masked, mapping, shift_days, characteristics, device,
                 safe_private=False) -> None:
        self.exact, self.masked, self.mapping = exact, masked, mapping
        self.safe_private = safe_private
        self.shift_days = shift_days
        self.keep = set()
        if characteristics:
            self.keep |= RETAIN_CHARACTERISTICS
        if device:
            self.keep |= RETAIN_DEVICE

    def action(self, tag: int) -> str | None:
        action = self.exact.get(tag)
        if action is None:
            for value, mask, code in self.masked:
                if tag & mask == value:
                    return code
        return action

    def clean(self, ds) -> None:
        """One pass over a dataset's elements; an element left as it is
        stays raw (never converted: a CT header takes ~1 ms)."""
        safe = safe_private_tags(ds) if self.safe_private else {}
        for tag in list(ds.keys()):
            t = int(tag)
            if tag.is_private or (t & 0xFFFF) == 0 and t >> 16 != 2:
                if t not in safe or not self.keep_private(ds, tag, safe[t]):
                    del ds[tag]  # private tags; group lengths (nobody recomputes them)
                continue
            raw = ds.get_item(tag)
            vr = getattr(raw, "VR", None)
            if vr in (None, "UN"):  # implicit VR, or UN that pydicom reads as the dictionary's
                vr = _dictionary_vr(t) or vr
            if t in self.keep:
                action = "K"
            elif self.shift_days is not None and t in MODIFIED_DATES:
                if vr in ("DA", "DT"):
                    self.shift(ds[tag])
                    continue
                action = "K"
            else:
                action = self.action(t) or "K"
            if action in ("K", "U"):
                if vr in ("SQ", "UI"):
                    self.map_value(ds[tag])
            elif action.startswith("X") and action != "X/Z/U*":
                del ds[tag]
            elif action in ("Z", "Z/D") or (action == "X/Z/U*" and vr != "SQ"):
                self.replace(ds, tag, vr, [] if vr == "SQ" else
                             (b"" if vr in _BINARY else ""))
            elif vr in ("SQ", "UI"):  # D, and X/Z/U* sequences: cleaned, UIDs mapped
                self.map_value(ds[tag])
            else:
                self.replace(ds, tag, vr, _DUMMY.get(vr, ""))
        for creator in [t for t, vr in safe.items() if vr == "LO" and t in ds]:
            group, block = creator >> 16, (creator & 0xFF) << 8
            if not any(t >> 16 == group and (t & 0xFF00) == block for t in map(int, ds.keys())):
                del ds[creator]  # none of its elements stayed

    def keep_private(self, ds, tag, vr: str) -> bool:
        """Whether a safe private element stays (a number that is one, a UID
        the daemon mapped: then replaced by its mapping)."""
        value = ds.get_item(tag).value
        if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            return True
        text = bytes(value).decode("latin-1") if isinstance(value, (bytes, bytearray)) \
            else "\\".join(map(str, value)) if isinstance(value, (list, tuple)) \
            else str(value or "")
        if vr in ("DS", "IS"):
            return numeric(text)
        if vr == "UI":
            uids = [u.strip("\0 ") for u in text.split("\\")]
            if not all(u in self.mapping or _known_uid(u) for u in uids if u):
                return False  # never pass an unmapped UID through
            new = [self._uid(u) for u in uids if u]
            self.replace(ds, tag, "UI", new[0] if len(new) == 1 else new)
        return True

    @staticmethod
    def replace(ds, tag, vr, value) -> None:
        from pydicom.dataelem import DataElement
        ds[tag] = DataElement(tag, vr or "UN", value)

    def map_value(self, elem) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self.clean(item)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [self._uid(str(v)) for v in values]
            elem.value = new if elem.VM > 1 else new[0]

    def map_uids(self, ds) -> None:
        for elem in ds:
            self.map_value(elem)

    def _uid(self, value: str) -> str:
        value = value.strip("\0 ")
        if not value or _known_uid(value):
            return value
        return self.mapping[value]  # KeyError: never pass an unmapped UID through

    def shift(self, elem) -> None:
        if elem.VR not in ("DA", "DT") or not elem.value:
            if elem.VR == "SQ":
                self.map_value(elem)
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        new = [_shift(str(v), self.shift_days) for v in values]
        elem.value = new if elem.VM > 1 else new[0]


def _dictionary_vr(tag: int) -> str | None:
    from pydicom.datadict import dictionary_VR
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return None


_BINARY = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
_DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED",
          "ST": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED",
          "AE": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
          "AS": "000D", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0,
          "FL": 0.0, "FD": 0.0, "UR": "", "OB": b"", "OW": b"", "UN": b""}


def _shift(value: str, days: int) -> str:
    """A DA or DT value moved back ``days`` days (the time of day and zone
    kept); a value that is not a date becomes empty."""
    value = value.strip()
    try:
        day = datetime.date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return ""
    moved = day - datetime.timedelta(days=days)
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}" + value[8:]


__all__ = ["facts", "rewrite", "table", "HEADER_CAP"]
