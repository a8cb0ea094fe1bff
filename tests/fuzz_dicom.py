"""Hostile DICOM, made from real files (seeded, reproducible; nothing is
committed but this generator).

:func:`cases` yields ``(name, bytes)``: mutations of pydicom-data's native
files - bit flips in the header, wrong length fields, wrong VRs,
truncations, lying geometry - and the crafted files of issue 14: a deflate
bomb, millions of empty elements, sequences nested 100 000 deep, a PHI
canary quoted by a malformed BitsAllocated.  Every text element of every
case carries :data:`CANARY`, which must never appear outside the encrypted
store.

``python tests/fuzz_dicom.py --cases N --seed S OUT`` writes N cases to OUT
for a longer run by hand.
"""

from __future__ import annotations

import io
import pathlib
import random
import struct
import sys
import zlib

CANARY = b"PATIENT^CANARY^X7Q"
PHI = CANARY + b"^DOB19700101^MRN12345678"

_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"OB", b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM",
        b"UI", b"UL", b"UN", b"US", b"UT", b"ZZ"]


def sources(limit: int = 12, max_size: int = 1 << 20) -> list[pathlib.Path]:
    """Small DICOM files of pydicom-data (native ones first)."""
    import data_store  # pydicom-data
    root = pathlib.Path(data_store.__file__).parent / "data"
    picked = []
    for pattern in ("*_UNCR.dcm", "*_UNCI.dcm", "*.dcm"):
        for p in sorted(root.glob(pattern)):
            if p not in picked and p.stat().st_size < max_size:
                picked.append(p)
    return picked[:limit]


def with_canary(path: pathlib.Path) -> bytes:
    """The file with the canary in every text element (pixels untouched)."""
    import warnings

    import pydicom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the canary is longer than some VRs allow
        ds = pydicom.dcmread(path)

        def put(dataset, elem):
            if elem.VR in ("PN", "LO", "LT", "ST", "UT", "UC"):
                elem.value = CANARY.decode()
        ds.walk(put)
        ds.PatientName = CANARY.decode()
        ds.PatientID = CANARY.decode()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_start(data: bytes) -> int:
    i = data.rfind(b"\xe0\x7f\x10\x00")
    return i if i > 0 else len(data)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a header; returns (kind, bytes)."""
    end = _pixel_start(data)
    kind = rng.choice(["flip", "flip", "length", "length", "vr", "truncate", "geometry"])
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(132, end)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "length":
        i = rng.randrange(132, max(133, end - 8))
        # the length field of an element near i: explicit VR, 2- or 4-byte
        j = data.find(b"\x00", i)  # any position: lengths, tags and values alike
        j = i if j < 0 or j > end - 4 else j
        value = rng.choice([0, 1, 45, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32),
                            len(data) * 4])
        struct.pack_into("<I" if value > 0xFFFF else "<H", buf, j,
                         value if value <= 0xFFFF else value & 0xFFFFFFFF)
    elif kind == "vr":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(132, max(133, end - 2))
            buf[i:i + 2] = rng.choice(_VRS)
    elif kind == "truncate":
        buf = buf[:rng.randrange(1, len(buf))]
    else:  # geometry that lies about the pixel length
        for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00", b"\x28\x00\x00\x01"):
            i = data.find(tag, 132, end)
            if i > 0 and data[i + 4:i + 6] == b"US":
                struct.pack_into("<H", buf, i + 8, rng.choice([1, 3, 255, 4096, 65535]))
        i = data.find(b"\x28\x00\x08\x00", 132, end)  # NumberOfFrames
        if i > 0 and data[i + 4:i + 6] == b"IS":
            n = struct.unpack_from("<H", data, i + 6)[0]
            buf[i + 8:i + 8 + n] = b"9" * n
    return kind, bytes(buf)


def _meta(ts: bytes) -> bytes:
    """A Part 10 preamble and file meta with transfer syntax ``ts``."""
    def el(tag: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        g, e = tag >> 16, tag & 0xFFFF
        if vr in (b"OB", b"UN"):
            return struct.pack("<HH2sHI", g, e, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", g, e, vr, len(value)) + value
    body = (el(0x00020001, b"OB", b"\0\1") + el(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
            + el(0x00020003, b"UI", b"1.2.3.4") + el(0x00020010, b"UI", ts))
    return b"\0" * 128 + b"DICM" + el(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    g, e = tag >> 16, tag & 0xFFFF
    return struct.pack("<HH2sH", g, e, vr, len(value)) + value


def phi_in_bits_allocated() -> bytes:
    """Issue 14's reproduction: BitsAllocated (US) with value length 45, so
    pydicom's error quotes the bytes after it (the canary)."""
    ts = b"1.2.840.10008.1.2.1"
    body = (_explicit(0x00080060, b"CS", b"CT") + _explicit(0x00100010, b"PN", CANARY + b"  ")
            + _explicit(0x00280010, b"US", struct.pack("<H", 16))
            + _explicit(0x00280011, b"US", struct.pack("<H", 16))
            + struct.pack("<HH2sH", 0x0028, 0x0100, b"US", 45) + b"\x10\x00" + PHI + b"\0"
            + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 512) + bytes(512))
    return _meta(ts) + body


def deflate_bomb(inflated: int = 1 << 30) -> bytes:
    """Deflated transfer syntax whose dataset inflates to ``inflated`` bytes
    (1 GiB by default, about 1 MB on disk)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = _explicit(0x00100010, b"PN", CANARY + b"  ") \
        + struct.pack("<HH2sHI", 0x0009, 0x0010, b"UN", 0, inflated)
    out = [comp.compress(head)]
    block = bytes(1 << 20)
    for _ in range(inflated >> 20):
        out.append(comp.compress(block))
    out.append(comp.flush())
    return _meta(b"1.2.840.10008.1.2.1.99") + b"".join(out)


def empty_elements(count: int = 5_000_000, distinct: bool = False) -> bytes:
    """``count`` empty private elements (8 bytes each) after a canary; with
    ``distinct`` each has a tag of its own (pydicom then keeps every one)."""
    head = _meta(b"1.2.840.10008.1.2.1") + _explicit(0x00100010, b"PN", CANARY + b"  ")
    if not distinct:
        return head + struct.pack("<HH2sH", 0x0009, 0x1000, b"LO", 0) * count
    return head + b"".join(struct.pack("<HH2sH", 0x0011 + 2 * (i >> 16), i & 0xFFFF, b"LO", 0)
                           for i in range(count))


def deep_sequences(depth: int = 100_000) -> bytes:
    """Sequences of undefined length nested ``depth`` deep."""
    seq = struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (_meta(b"1.2.840.10008.1.2.1") + _explicit(0x00100010, b"PN", CANARY + b"  ")
            + (seq + item) * depth + (item_end + seq_end) * depth)


def crafted() -> list[tuple[str, bytes]]:
    """The crafted files of issue 14, at the sizes it names."""
    return [("phi-bits-allocated", phi_in_bits_allocated()), ("deflate-bomb", deflate_bomb()),
            ("5M-empty-elements", empty_elements()), ("nested-100000", deep_sequences())]


def cases(n: int, seed: int = 14, limit: int = 12):
    """``n`` mutations of canary-carrying real files, seeded (a generator:
    a few thousand cases are a gigabyte)."""
    rng = random.Random(seed)
    bases = [(p.stem, with_canary(p)) for p in sources(limit)]
    for i in range(n):
        stem, data = bases[i % len(bases)]
        kind, mutated = mutate(data, rng)
        yield f"{i:05d}-{stem}-{kind}", mutated


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=14)
    a = p.parse_args()
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, data in list(cases(a.cases, a.seed)) + crafted():
        (outdir / f"{name}.dcm").write_bytes(data)
    sys.exit(0)
