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
import struct
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
#: the hot tier's bands (:mod:`dcmfs.core.tiers`): its blosc2 decodes a
#: 512 KiB CT frame in ~0.2 ms, so splitting it buys no speed, and each
#: object more costs a read, two authentications and a hand-off to a
#: decoding thread.  A CT slice in one band, not two (3 objects -> 2), read
#: through the mount cold (the 400-slice series, interleaved, load 12-15):
#: 4.3-4.4 ms of daemon CPU per slice instead of 4.7-4.85, the same stored
#: size (0.349).  The cold coding keeps BAND_BYTES
HOT_BAND_BYTES = 512 * 1024

#: the analysis reads at most this much of a file: the Pixel Data element
#: must start within it (real headers are kilobytes; an enhanced multi-frame
#: header with per-frame groups for a thousand frames a few megabytes)
HEADER_CAP = 16 * 1024 * 1024
#: elements (all nesting levels) before the Pixel Data beyond which a file
#: is not parsed (pydicom keeps ~350 bytes per element in memory)
MAX_ELEMENTS = 500_000
#: sequences and items open at once beyond which a file is not parsed
#: (pydicom recurses per level)
MAX_DEPTH = 64

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: explicit-VR value representations with a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
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


def precheck(head: bytes, size: int) -> str:
    """Is the file worth parsing?  ``head`` is the start of the file (at most
    :data:`HEADER_CAP` bytes), ``size`` its length.  Returns "" or a fixed
    reason, from the file meta and a walk over element headers that never
    inflates, allocates or reads a value: a deflated transfer syntax (a
    deflate bomb inflates without bound), a value longer than the file,
    more than :data:`MAX_ELEMENTS` elements or :data:`MAX_DEPTH` open
    sequences before the Pixel Data, or no Pixel Data within the bytes read.
    What the walk cannot judge (an unknown VR, an odd item) is left to the
    parser, which runs with limits of its own.
    """
    pos = 132 if len(head) >= 132 and head[128:132] == b"DICM" else 0
    ts = None
    while pos + 8 <= len(head):  # the file meta: explicit VR little endian
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            hdr, length = 12, struct.unpack_from("<I", head, pos + 8)[0]
        else:
            hdr, length = 8, struct.unpack_from("<H", head, pos + 6)[0]
        if length == _UNDEFINED or pos + hdr + length > size:
            return "value longer than the file"
        if elem == 0x0010:
            ts = head[pos + hdr:pos + hdr + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += hdr + length
    if ts == DEFLATED:
        return "deflated transfer syntax"
    explicit, endian = ts != IMPLICIT, (">" if ts == BIG_ENDIAN else "<")
    if ts is None and pos + 6 <= len(head):  # a bare dataset: look at the first VR
        explicit = head[pos + 4:pos + 6].isalpha() and head[pos + 4:pos + 6].isupper()
    count = 0
    #: where each open sequence or item ends (None: undefined length)
    stack: list[int | None] = []
    while True:
        while stack and stack[-1] is not None and pos >= stack[-1]:
            stack.pop()
        if pos + 8 > len(head):
            return "" if len(head) >= size else "header larger than the analysis reads"
        group, elem = struct.unpack_from(endian + "HH", head, pos)
        count += 1
        if count > MAX_ELEMENTS:
            return "too many elements"
        if group == 0xFFFE:  # items and delimiters: a 4-byte length, no VR
            length = struct.unpack_from(endian + "I", head, pos + 4)[0]
            pos += 8
            if elem == 0xE000:
                if length != _UNDEFINED and pos + length > size:
                    return "value longer than the file"
                stack.append(None if length == _UNDEFINED else pos + length)
            elif elem in (0xE00D, 0xE0DD) and stack:
                stack.pop()
            if len(stack) > MAX_DEPTH:
                return "nesting too deep"
            continue
        vr = head[pos + 4:pos + 6] if explicit else b""
        if not explicit:
            hdr, length = 8, struct.unpack_from(endian + "I", head, pos + 4)[0]
        elif vr in _LONG_VRS:
            if pos + 12 > len(head):
                return "" if len(head) >= size else "header larger than the analysis reads"
            hdr, length = 12, struct.unpack_from(endian + "I", head, pos + 8)[0]
        elif vr.isalpha() and vr.isupper():
            hdr, length = 8, struct.unpack_from(endian + "H", head, pos + 6)[0]
        else:
            return ""  # not a VR: the parser decides (it may read implicit VR)
        if (group, elem) == (0x7FE0, 0x0010) and not stack:
            return ""
        if length == _UNDEFINED:
            if vr not in (b"SQ", b"UN", b""):
                return ""  # e.g. encapsulated data out of place: the parser decides
            stack.append(None)
            pos += hdr
        elif pos + hdr + length > size:
            return "value longer than the file"
        elif vr == b"SQ":
            stack.append(pos + hdr + length)
            pos += hdr
        else:
            pos += hdr + length
        if len(stack) > MAX_DEPTH:
            return "nesting too deep"


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
    """Look at one file (``fp`` holds its first :data:`HEADER_CAP` bytes or
    all of it).  Never raises for bad input, and never carries a byte of the
    file out in a reason: a file pydicom cannot read is reported by the
    exception's type only."""
    fp.seek(0)
    head = fp.read(132)
    if not sniff(head):
        return Plan({"kind": "other"}, "not DICOM")
    part10 = head[128:132] == b"DICM"
    fp.seek(0)
    refused = precheck(fp.read(HEADER_CAP), size)
    if refused:
        return Plan({"kind": "dicom" if part10 else "other"}, refused if part10 else "not DICOM")
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
            return _plan(ds, pixel, implicit, little, part10, size)
    except (MemoryError, RecursionError):
        raise  # a limit, not a verdict on the file: the caller decides
    except Exception as exc:  # noqa: BLE001 — whatever pydicom trips on
        kind = "dicom" if part10 else "other"
        return Plan({"kind": kind}, f"unreadable as DICOM ({type(exc).__name__})"
                    if part10 else "not DICOM")


def _plan(ds, pixel, implicit, little, part10: bool, size: int) -> Plan:
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
