"""Make the frozen store of the current format version (run once per
released format version; the result is committed under tests/compat/vN/).

    .venv/bin/python tests/compat/make_store.py tests/compat/v1

(and once per set of codec ids: ``tests/compat/v2-image-codecs`` holds a
copy of the synthetic CT coded by each image codec, so every later dcmfs,
with every later imagecodecs, must decode today's codestreams exactly).

The content is generated from fixed seeds (no DICOM file or key is
committed: the DICOM file is synthetic, the key is the public passphrase
below, with cheap Argon2id parameters stored in the header), so the
manifest says exactly what every later dcmfs must read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

#: public on purpose: this store protects nothing
PASSPHRASE = b"dcmfs-compat-store (public test passphrase)"


def synthetic_ct(rows: int = 96, cols: int = 80) -> bytes:
    """A small 16-bit signed CT-like image as a DICOM Part 10 file."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = (1000 * np.exp(-((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) / 600.0) - 1024
           + rng.integers(-20, 20, (rows, cols))).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1
    ds.PixelData = img.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def content() -> dict[str, bytes]:
    rng = random.Random(1)
    cs = 64 * 1024
    return {
        "/empty": b"",
        "/small.txt": b"dcmfs compat store\n",
        "/dir/sub/multi.bin": rng.randbytes(3 * cs + 123),
        "/dir/holes.bin": b"start" + bytes(2 * cs) + b"end",
        "/dir/exact.bin": rng.randbytes(2 * cs),
        "/ct/synthetic.dcm": synthetic_ct(),
        # since format 7: zstd chunks of more than a frame are framed objects
        "/dir/text.txt": b"".join(b"line %d of a compressible text\n" % i for i in range(9000)),
        # since format 8: small chunks' objects kept in the index (inline-small-v1),
        # as /small.txt and the last chunk of this one (chunks of 128 KiB)
        "/dir/inline-tail.bin": rng.randbytes(2 * cs + 1500),
    }


def main(out: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    import dataclasses

    from dcmfs.storage.codec import IDS, IMAGE_CODECS
    from dcmfs.config import Config, KdfParams
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage.header import Secret, init_store, open_store

    # 128 KiB since format 7: chunks longer than a 64 KiB frame, so that
    # the zstd chunks are framed objects (layout 3, feature framed-chunks-v1)
    cfg = Config(chunk_size=128 * 1024, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1),
                 checkpoint_interval=0)
    secret = Secret("passphrase", PASSPHRASE)
    root = os.path.join(out, "store")
    init_store(root, secret, cfg)
    fs = FileSystem(open_store(root, secret), cfg)
    files = content()
    for d in ("/dir", "/dir/sub", "/ct"):
        fs.mkdir(d, 0o750, 0, 0)
    for path, data in files.items():
        fh = fs.create(path, 0o640, os.O_WRONLY, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    fs.link("/small.txt", "/dir/hardlink.txt")
    fs.symlink("/link", "dir/sub/multi.bin", 0, 0)
    fs.setxattr("/small.txt", "user.note", b"kept")
    fs.utimens("/small.txt", 1_700_000_000_000_000_000, 1_700_000_000_000_000_000)
    fs.recompress()
    fs.reencoder.wait_idle(60)
    fs.close()
    # one copy of the synthetic CT per image codec, each coded by that codec
    # (hot_days=0: by that codec alone, not by the hot tier's; codec 7,
    # blosc2, since issue 17's hot tier)
    image = {}
    for name in sorted(IDS[c] for c in IMAGE_CODECS):
        path = f"/ct/{name}.dcm"
        fs = FileSystem(open_store(root, secret, for_writing=True),
                        dataclasses.replace(cfg, image_codecs=(name,), hot_days=0))
        fh = fs.create(path, 0o640, os.O_WRONLY, 0, 0)
        fs.write(fh, files["/ct/synthetic.dcm"], 0)
        fs.release(fh)
        fs.recompress()
        fs.reencoder.wait_idle(60)
        fs.close()
        files[path] = files["/ct/synthetic.dcm"]
        image[path] = name
    # since format 6 (key-generations-v1): a rotation and a finish moved the
    # index side to epoch 1 and destroyed epoch 0, then a second rotation
    # left epoch 2 current beside the master, each with a file of its own
    # (their objects' context blocks under their own epochs' keys)
    from dcmfs.app.admin import finish_rotation
    from dcmfs.storage.keyring import recipient, rotate
    recipient(root, secret)  # made before the finish: its wrap moves to epoch 1
    for epoch in (1, 2):
        rotate(root, secret)
        path = f"/epoch{epoch}.bin"
        files[path] = random.Random(epoch).randbytes(100_000 + epoch)
        fs = FileSystem(open_store(root, secret, for_writing=True), cfg)
        fh = fs.create(path, 0o640, os.O_WRONLY, 0, 0)
        fs.write(fh, files[path], 0)
        fs.release(fh)
        fs.close()
        if epoch == 1:
            import io
            finish_rotation(root, lambda: secret, cfg, out=io.StringIO())
    # since format 5: a write-only ingest mount's file, left in the inbox for
    # the next read-write opening to import (feature ingest-v1)
    from dcmfs.core.ingest import IngestFS
    ingest = IngestFS(root, recipient(root, secret), cfg)
    inbox_files = {"/ingested/scan.dcm": files["/ct/synthetic.dcm"],
                   "/ingested/note.txt": b"written through a write-only mount\n" * 3000}
    ingest.mkdir("/ingested", 0o750, 0, 0)
    for path, data in inbox_files.items():
        fh = ingest.create(path, 0o640, os.O_WRONLY, 0, 0)
        ingest.write(fh, data, 0)
        ingest.flush(fh)
        ingest.release(fh)
    ingest.close()
    manifest = {"passphrase": PASSPHRASE.decode(), "chunk_size": cfg.chunk_size,
                "inbox": {p: hashlib.sha256(d).hexdigest() for p, d in inbox_files.items()},
                "files": {p: hashlib.sha256(d).hexdigest() for p, d in files.items()},
                "hardlink": ["/small.txt", "/dir/hardlink.txt"],
                "symlink": ["/link", "dir/sub/multi.bin"],
                "xattr": ["/small.txt", "user.note", "kept"],
                "mtime_ns": ["/small.txt", 1_700_000_000_000_000_000],
                "image": image,
                "key_generation": {"master": 1, "destroyed": [0], "epochs": [1, 2]}}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.remove(os.path.join(root, "lock"))


if __name__ == "__main__":
    main(sys.argv[1])
