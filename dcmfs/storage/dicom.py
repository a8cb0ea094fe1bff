"""What a file is, as far as storage cares: DICOM, where its pixels are, how
they are laid out (a leaf below the core: imports codec and errors only).

:func:`analyse` reads a file through any seekable binary file object with
pydicom, never loading a large value (``defer_size``), and returns a
:class:`Plan`: where the Pixel Data value starts, how many frames it holds
and their :class:`~dcmfs.codec.FrameSpec`, or why the frames cannot go to
the image codec (a fixed vocabulary, counted in ``dcmfs stats``).  Only
attributes that describe the encoding are kept (modality, transfer syntax,
photometric interpretation, bits); no patient attribute ever leaves this
module, and pydicom's own warnings (which quote values) are silenced.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import BinaryIO, NamedTuple

from .codec import FrameSpec

#: frames larger than this stay with the general codec (memory bound of the
#: re-encoder and of a read that decodes one frame)
MAX_FRAME = 64 * 1024 * 1024
#: frames are coded in bands of whole rows of about this size (measured on
#: 693_UNCI, a 512 KiB CT frame: one band 0.223, two 0.228; decoding two
#: bands on two cores reads a re-encoded CT series ~1.7x faster)
BAND_BYTES = 256 * 1024

DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
_UID = re.compile(r"^[0-9.]{1,64}$")
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


class Plan(NamedTuple):
    """How the re-encoder should store one file."""

    info: dict                # kind, modality, ts, photometric, bits_allocated, bits_stored, ...
    reason: str = ""          # why the frames go to the general codec ("" = they do not)
    pixel_offset: int = -1    # file offset of the Pixel Data value
    frames: int = 0
    frame: FrameSpec | None = None

    @property
    def codes_frames(self) -> bool:
        return not self.reason and self.frame is not None and self.frames > 0


def sniff(head: bytes) -> bool:
    """Could these first bytes start a DICOM file (Part 10, or a bare dataset)?"""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # a bare dataset (no preamble) starts with a group 0x0002 or 0x0008 element,
    # little or big endian
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _code(value, pattern=_CODE) -> str:
    text = str(value or "").strip()
    return text if pattern.match(text) else ("" if not text else "?")


def _int(ds, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return -1


def analyse(fp: BinaryIO, size: int) -> Plan:
    """Look at one file.  Never raises for bad input: a file pydicom cannot
    read is reported as such."""
    fp.seek(0)
    head = fp.read(132)
    if not sniff(head):
        return Plan({"kind": "other"}, "not DICOM")
    part10 = head[128:132] == b"DICM"
    fp.seek(0)
    import pydicom
    from pydicom import config as pdconfig

    logger = logging.getLogger("pydicom")
    logger.propagate = False       # pydicom's messages quote attribute values
    logger.addHandler(logging.NullHandler())
    pdconfig.settings.reading_validation_mode = pdconfig.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, defer_size=4096, force=not part10)
            pixel = ds.get_item(0x7FE00010, keep_deferred=True)
            implicit, little = ds.original_encoding
    except Exception as exc:  # noqa: BLE001 — whatever pydicom trips on
        kind = "dicom" if part10 else "other"
        return Plan({"kind": kind}, f"unreadable as DICOM ({type(exc).__name__})"
                    if part10 else "not DICOM")
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts and implicit is not None:
        ts = ("1.2.840.10008.1.2" if implicit else
              ("1.2.840.10008.1.2.1" if little else BIG_ENDIAN))
    info = {
        "kind": "dicom",
        "modality": _code(ds.get("Modality")) or "-",
        "ts": _code(ts, _UID) or "-",
        "photometric": _code(ds.get("PhotometricInterpretation")),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "bits_stored": _int(ds, "BitsStored"),
        "samples": _int(ds, "SamplesPerPixel", 1),
        "frames": _int(ds, "NumberOfFrames", 1) or 1,
    }
    if not part10 and pixel is None and "SOPClassUID" not in ds:
        return Plan({"kind": "other"}, "not DICOM")
    if ts == DEFLATED:
        return Plan(info, "deflated transfer syntax")
    if pixel is None:
        return Plan(info, "no pixel data")
    length = getattr(pixel, "length", None)
    tell = getattr(pixel, "value_tell", None)
    if length is None or tell is None:
        return Plan(info, "pixel data not located")
    if length == 0xFFFFFFFF:
        return Plan(info, "encapsulated pixel data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    spp, alloc = info["samples"], info["bits_allocated"]
    frames, photometric = info["frames"], info["photometric"]
    if rows <= 0 or cols <= 0 or frames <= 0 or alloc <= 0:
        return Plan(info, "no image geometry")
    if rows > 65535 or cols > 65535:  # US in the standard; a malformed file may say more
        return Plan(info, "rows or columns above 65535")
    if photometric == "PALETTE COLOR":
        return Plan(info, "palette colour")
    if photometric.startswith("YBR") and photometric.endswith(("422", "420")):
        return Plan(info, f"{photometric} subsampled")
    if alloc not in (8, 16):
        return Plan(info, f"{alloc}-bit samples")
    if spp not in (1, 3):
        return Plan(info, f"{spp} samples per pixel")
    spec = FrameSpec(rows, cols, spp, alloc, info["bits_stored"],
                     _int(ds, "PixelRepresentation") == 1,
                     spp == 3 and _int(ds, "PlanarConfiguration") == 1,
                     not little and alloc == 16)
    if spec.nbytes > MAX_FRAME:
        return Plan(info, "frame too large")
    if frames * spec.nbytes > length or tell + frames * spec.nbytes > size:
        return Plan(info, "pixel data shorter than its frames")
    return Plan(info, "", tell, frames, spec)
