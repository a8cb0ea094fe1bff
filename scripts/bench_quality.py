"""The figures the image-encryption literature reports, computed on what dcmfs
really stores (the object files under STORE/objects/), and its proof of
losslessness on decoded pixel arrays read back through a mount.

These are sanity checks, not security proofs: any sound cipher's output looks
like uniform random bytes (entropy ~8 bits/byte, NPCR ~99.61 %, UACI ~33.46 %,
adjacent-byte correlation ~0), and so would the output of a broken one whose
key is known to an attacker.  dcmfs's confidentiality and integrity rest on
AES-256-GCM with fresh random nonces and keys derived per file (docs/format.md).
"""

from __future__ import annotations

import hashlib
import io
import math
import pathlib
import warnings

import numpy as np
import pydicom

from bench_contenders import Dcmfs

#: the values a uniform random byte string has (NPCR, UACI of two independent ones)
IDEAL = {"entropy_bits": 8.0, "npcr_pct": 100 * 255 / 256, "uaci_pct": 100 * 257 / 768,
         "adjacent_corr": 0.0}


def entropy(data: bytes) -> float:
    """Shannon entropy of the byte histogram, bits per byte."""
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum())


def npcr_uaci(a: bytes, b: bytes) -> tuple[float, float]:
    """NPCR and UACI in percent over the common length of two byte strings."""
    n = min(len(a), len(b))
    x = np.frombuffer(a, np.uint8, n).astype(np.int16)
    y = np.frombuffer(b, np.uint8, n).astype(np.int16)
    return float((x != y).mean() * 100), float(np.abs(x - y).mean() / 255 * 100)


def adjacent_corr(data: bytes) -> float:
    """Pearson correlation of each byte with the next."""
    v = np.frombuffer(data, np.uint8).astype(np.float64)
    return float(np.corrcoef(v[:-1], v[1:])[0, 1])


def pixel_corr(img: np.ndarray) -> tuple[float, float]:
    """Correlation of horizontally and vertically adjacent pixels of a 2-D image."""
    img = img.astype(np.float64)
    h = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
    v = np.corrcoef(img[:-1, :].ravel(), img[1:, :].ravel())[0, 1]
    return float(h), float(v)


def _gauss(img: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter, 'valid' part only (the window of Wang et al.)."""
    x = np.arange(-radius, radius + 1)
    w = np.exp(-x**2 / (2 * sigma**2))
    w /= w.sum()
    win = np.lib.stride_tricks.sliding_window_view
    rows = win(img, len(w), axis=1) @ w
    return win(rows, len(w), axis=0) @ w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Mean SSIM (Wang, Bovik, Sheikh, Simoncelli 2004: 11x11 Gaussian window,
    sigma 1.5, K1 0.01, K2 0.03) of two 2-D images."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gauss(a), _gauss(b)
    var_a = _gauss(a * a) - mu_a**2
    var_b = _gauss(b * b) - mu_b**2
    cov = _gauss(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def _planes(arr: np.ndarray, limit: int = 4) -> list[np.ndarray]:
    """The 2-D planes of a pixel array (frames, colour samples), at most ``limit``."""
    if arr.ndim == 2:
        planes = [arr]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):  # one colour frame
        planes = [arr[..., k] for k in range(arr.shape[-1])]
    elif arr.ndim == 3:  # grey frames
        planes = list(arr)
    else:  # colour frames
        planes = [arr[i, ..., k] for i in range(arr.shape[0]) for k in range(arr.shape[-1])]
    return [p for p in planes if min(p.shape) > 11][:limit]


def _pixels(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(io.BytesIO(data)).pixel_array
        except Exception:  # noqa: BLE001 — no pixel data, or no decoder for its syntax
            return None


def lossless(original: bytes, readback: bytes) -> dict:
    """Hashes, and MSE, PSNR, SSIM of the decoded pixel arrays when pydicom
    can decode them."""
    row = {"md5_equal": hashlib.md5(original).digest() == hashlib.md5(readback).digest(),
           "sha256_equal": hashlib.sha256(original).digest() == hashlib.sha256(readback).digest()}
    a, b = _pixels(original), _pixels(readback)
    if a is None or b is None or a.shape != b.shape:
        row["decoded"] = a is not None and b is not None
        return row
    row["decoded"] = True
    diff = a.astype(np.float64) - b.astype(np.float64)
    row["mse"] = float((diff**2).mean())
    peak = float(a.max() - a.min()) or 1.0
    row["psnr_db"] = math.inf if row["mse"] == 0 else 10 * math.log10(peak**2 / row["mse"])
    planes = list(zip(_planes(a), _planes(b)))
    row["ssim"] = min(ssim(x, y, peak) for x, y in planes) if planes else None
    return row


def _json_inf(v):
    return "inf" if v == math.inf else v


def stored_objects(store: pathlib.Path) -> list[bytes]:
    """Every object file of a store, largest first."""
    blobs = [p.read_bytes() for p in sorted((store / "objects").rglob("*")) if p.is_file()]
    return sorted(blobs, key=len, reverse=True)


def _store_one(base: pathlib.Path, name: str, data: bytes) -> list[bytes]:
    """Write one file into a fresh default-policy dcmfs store, bring it to rest
    (re-encoded, checkpointed) and return the store's objects."""
    c = Dcmfs(base / name)
    (base / name).mkdir(parents=True)
    c.setup()
    try:
        (c.mnt() / "a.dcm").write_bytes(data)
        c.settle()
        return stored_objects(c.store)
    finally:
        c.teardown()


def one_pixel_variant(data: bytes) -> bytes:
    """The same DICOM file with the lowest bit of its middle pixel flipped."""
    ds = pydicom.dcmread(io.BytesIO(data))
    pix = bytearray(ds.PixelData)
    pix[len(pix) // 2 & ~1] ^= 1
    ds.PixelData = bytes(pix)
    out = io.BytesIO()
    ds.save_as(out)
    changed = out.getvalue()
    diff = sum(x != y for x, y in zip(data, changed))
    if len(changed) != len(data) or diff != 1:
        raise RuntimeError(f"one-pixel variant differs in {diff} bytes, length "
                           f"{len(changed)} vs {len(data)}")
    return changed


def cipher_quality(base: pathlib.Path, ct_file: pathlib.Path, files: list[pathlib.Path]) -> dict:
    """All figures: on stores holding one CT file, the same file again and the
    file with one pixel changed; entropy and correlation also on a store of
    ``files``; losslessness of ``files`` (and the CT file) read back cold."""
    a = ct_file.read_bytes()
    b = one_pixel_variant(a)
    obj_a = _store_one(base, "qa", a)
    obj_a2 = _store_one(base, "qa2", a)
    obj_b = _store_one(base, "qb", b)
    if len(obj_a) != len(obj_b):
        raise RuntimeError(f"the one-pixel variant is stored in {len(obj_b)} objects, "
                           f"the original in {len(obj_a)}")

    def paired(x, y):  # objects paired by size rank (ids are random), common lengths
        n = [min(len(p), len(q)) for p, q in zip(x, y)]
        return b"".join(p[:k] for p, k in zip(x, n)), b"".join(q[:k] for q, k in zip(y, n))

    npcr, uaci = npcr_uaci(*paired(obj_a, obj_b))
    npcr_same, uaci_same = npcr_uaci(*paired(obj_a, obj_a2))
    npcr_plain, uaci_plain = npcr_uaci(a, b)
    img = _pixels(a)
    ph, pv = pixel_corr(img if img.ndim == 2 else img[0])
    out = {"ideal": IDEAL, "ct_file_bytes": len(a), "ct_objects": len(obj_a),
           "ct_stored_bytes": sum(map(len, obj_a)),
           "entropy_plaintext": entropy(a), "entropy_stored": entropy(b"".join(obj_a)),
           "entropy_object_min": min(entropy(o) for o in obj_a if len(o) >= 4096)
           if any(len(o) >= 4096 for o in obj_a) else None,
           "npcr_pct": npcr, "uaci_pct": uaci,
           "npcr_same_file_pct": npcr_same, "uaci_same_file_pct": uaci_same,
           "npcr_plaintext_pct": npcr_plain, "uaci_plaintext_pct": uaci_plain,
           "adjacent_corr_plaintext": adjacent_corr(a),
           "adjacent_corr_stored": adjacent_corr(b"".join(obj_a)),
           "pixel_corr_plaintext_h": ph, "pixel_corr_plaintext_v": pv}

    # the corpus (and the CT file) in one store: entropy of all it stores, and
    # every file read back cold through the mount, compared
    c = Dcmfs(base / "qc")
    (base / "qc").mkdir()
    c.setup()
    rows = {}
    try:
        todo = [ct_file, *files]
        for p in todo:
            (c.mnt() / p.name).write_bytes(p.read_bytes())
        c.settle()
        everything = b"".join(stored_objects(c.store))
        out["corpus_stored_bytes"] = len(everything)
        out["entropy_stored_corpus"] = entropy(everything)
        out["adjacent_corr_stored_corpus"] = adjacent_corr(everything)
        c.remount()
        for p in todo:
            rows[p.name] = lossless(p.read_bytes(), (c.mnt() / p.name).read_bytes())
    finally:
        c.teardown()
    decoded = [r for r in rows.values() if r.get("decoded")]
    out["lossless"] = {
        "files": len(rows), "md5_equal": sum(r["md5_equal"] for r in rows.values()),
        "sha256_equal": sum(r["sha256_equal"] for r in rows.values()),
        "pixel_arrays_compared": len(decoded),
        "mse_max": max((r["mse"] for r in decoded), default=None),
        "psnr_db_min": _json_inf(min((r["psnr_db"] for r in decoded), default=None)),
        "ssim_min": min((r["ssim"] for r in decoded if r["ssim"] is not None), default=None),
    }
    return out
