"""Nothing leaks: no name, patient attribute or plaintext run in the store."""

from __future__ import annotations

import io
import os

import pydicom

from .conftest import ct_file

SECRET_NAMES = ["Zyxwvut^Qwertyuiop", "PID-7735-0042", "CHEST_ONCOLOGY_STUDY",
                "patient_Qwertyuiop_scan.dcm", "Oncology_Zyxwvut", "secret-xattr-value",
                "symlink-target-Qwertyuiop"]


def dicom_with_patient() -> bytes:
    ds = pydicom.dcmread(ct_file())
    ds.PatientName = SECRET_NAMES[0]
    ds.PatientID = SECRET_NAMES[1]
    ds.StudyDescription = SECRET_NAMES[2]
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def high_entropy_blocks(data: bytes, size: int = 16) -> set[bytes]:
    """Every 16-aligned 16-byte block with some variety: any 32-byte run of
    the plaintext at any offset contains one of them."""
    out = set()
    for off in range(0, len(data) - size + 1, size):
        block = data[off:off + size]
        if len(set(block)) >= 8:
            out.add(block)
    return out


def test_store_index_and_log_hold_no_names_attributes_or_plaintext(mounted):
    dcm = dicom_with_patient()
    text = b"Report for Zyxwvut: findings unremarkable. " * 200 + os.urandom(4096)
    d = mounted.mnt / SECRET_NAMES[4]
    d.mkdir()
    (d / SECRET_NAMES[3]).write_bytes(dcm)
    (d / "report.txt").write_bytes(text)
    os.setxattr(d / "report.txt", "user.note", SECRET_NAMES[5].encode())
    os.symlink(SECRET_NAMES[6], d / "link")

    def scan(tag):
        out = {}
        for dirpath, _, filenames in os.walk(mounted.store):
            for name in filenames:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    out[f"{tag}:{p}"] = f.read()
                assert not any(s in p for s in SECRET_NAMES), p
        return out

    # while mounted: the journal holds the changes, objects may be uncompressed
    blobs = scan("mounted")
    journal = [b for p, b in blobs.items() if p.endswith("index/journal")]
    assert journal and len(journal[0]) > 1000
    # the DICOM-aware re-encoder has recorded what it found (sealed)
    r = mounted.cli("recompress", mounted.store)
    assert r.returncode == 0, r.stderr
    stats = mounted.cli("stats", mounted.store, "--json", check=True).stdout
    assert '"CT"' in stats and '"frames": 1' in stats
    blobs.update(scan("recompressed"))
    mounted.umount()
    blobs.update(scan("unmounted"))
    assert any(p.endswith("data.mdb") for p in blobs) and len(blobs) > 3
    for needle in SECRET_NAMES + ["Zyxwvut", "Qwertyuiop", "report.txt", "user.note",
                                  "MONOCHROME2", "1.2.840.10008.5.1.4.1.1.2",
                                  "1.2.840.10008.1.2.1"]:
        for enc in ("utf-8", "utf-16-le"):
            raw = needle.encode(enc)
            for p, blob in blobs.items():
                assert raw not in blob, (needle, p)
    blocks = high_entropy_blocks(dcm) | high_entropy_blocks(text)
    assert len(blocks) > 1000
    for p, blob in blobs.items():
        hits = [off for off in range(len(blob) - 15) if blob[off:off + 16] in blocks]
        assert not hits, (p, hits[:5])
