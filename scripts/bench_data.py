"""The data of the benchmark: the CT series made from one real CT file, the
native subset and the whole pydicom-data corpus, and the timed file writes and
reads every contender goes through."""

from __future__ import annotations

import pathlib
import shutil
import time
import warnings

import pydicom

def make_series(dst: pathlib.Path, n: int) -> list[pathlib.Path]:
    import data_store
    src = pathlib.Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    ds = pydicom.dcmread(src)
    series = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        p = dst / f"CT{i:05d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


MODALITIES = ("CT", "MR", "CR", "US")


def _data_dir() -> pathlib.Path:
    import data_store
    return pathlib.Path(data_store.__file__).parent / "data"


def _header(p: pathlib.Path, force: bool = False):
    """The header dataset of ``p``, or None when pydicom cannot read it (not
    DICOM, or damaged on purpose)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(p, defer_size=1024, force=force)
    except Exception:  # noqa: BLE001
        return None


def _data_files(force: bool):
    """(path, header dataset or None) of every file of pydicom-data, in name
    order."""
    for p in sorted(_data_dir().rglob("*")):
        if p.is_file():
            yield p, _header(p, force)


def _own_test_files():
    """(path, header dataset or None) of pydicom's own test files at the top of
    its test_files folder (not the tiny DICOMDIR series below it)."""
    folder = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
    for p in sorted(folder.glob("*.dcm")):
        yield p, _header(p)


def _is_native(ds) -> bool:
    """A dataset of Modality CT/MR/CR/US with Pixel Data in a transfer syntax
    neither compressed nor deflated."""
    if ds is None:  # not DICOM, or damaged on purpose
        return False
    ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if not ts or ts.is_compressed or ts.is_deflated:
        return False
    return ds.get("Modality") in MODALITIES and "PixelData" in ds


def native_subset(quick: bool = False) -> list[tuple[pathlib.Path, str]]:
    """(path, modality) of the subset issue 3 measured (28 files, 24.5 MB;
    whole-file zstd-3 0.446 and xz -6 0.356 of it, both reproduced): the files
    of pydicom-data with native CT/MR/CR/US pixel data, without the
    implicit-VR twins ``*_UNCI`` of the ``*_UNCR`` files (the same image
    again), and the same kind of file from pydicom's own test files.
    ``quick``: only the smallest pydicom-data file of each modality."""
    out = []
    for p, ds in _data_files(force=False):
        if _is_native(ds) and not p.stem.endswith("_UNCI"):
            out.append((p, ds.Modality))
    if not quick:
        out += [(p, ds.Modality) for p, ds in _own_test_files() if _is_native(ds)]
    if quick:
        smallest = {}
        for p, mod in sorted(out, key=lambda pm: (pm[0].stat().st_size, pm[0].name)):
            smallest.setdefault(mod, (p, mod))
        out = sorted(smallest.values())
    return out


def copy_subset(subset, dst: pathlib.Path, copies: int) -> tuple[list[pathlib.Path], dict]:
    """The subset ``copies`` times under distinct names; returns the files and
    name -> modality."""
    files, modality = [], {}
    for k in range(copies):
        for p, mod in subset:
            q = dst / f"{k}_{p.name}"
            shutil.copyfile(p, q)
            files.append(q)
            modality[q.name] = mod
    return files, modality



def write_files(files, dst: pathlib.Path) -> list[float]:
    lat = []
    for p in files:
        data = p.read_bytes()
        t = time.perf_counter()
        with open(dst / p.name, "wb") as f:
            f.write(data)
        lat.append(time.perf_counter() - t)
    return lat


def read_files(files, dst: pathlib.Path) -> tuple[float, int, list[str]]:
    """Read every file back in 1 MiB reads: (seconds spent in open and read,
    bytes read, names whose content differs from the source).  The comparison
    happens outside the timed part."""
    n, spent, wrong = 0, 0.0, []
    for p in files:
        parts = []
        t = time.perf_counter()
        with open(dst / p.name, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                parts.append(b)
        spent += time.perf_counter() - t
        data = b"".join(parts)
        n += len(data)
        if data != p.read_bytes():
            wrong.append(p.name)
    return spent, n, wrong


def write_big(dst: pathlib.Path, block: bytes, mib: int) -> None:
    """``dst/big.bin``: ``mib`` MiB of ``block`` (CT bytes), 1 MiB a write.
    A block of 1 MiB or less (a series of one or two files) is repeated
    first: the window below needs it longer (else the file came out short,
    and fio laid the rest of the random-read file out through the mount)."""
    if len(block) <= 1048576:
        block = block * (1048576 // max(1, len(block)) + 2)
    with open(dst / "big.bin", "wb") as f:
        for i in range(mib):
            off = (i * 1048576) % (len(block) - 1048576)
            f.write(block[off:off + 1048576])



def corpus(dst: pathlib.Path, quick: bool = False) -> tuple[list[pathlib.Path], dict]:
    """Every file of pydicom-data (68 files, 58 MB in 1.0.0), copied under
    ``dst`` (nested names flattened); returns the files, smallest first, and
    name -> Modality ("-" when a file has none or is not DICOM).  ``quick``:
    the smallest file of each modality."""
    data = _data_dir()
    found = []
    for p, ds in _data_files(force=True):  # damaged on purpose: still a file to store
        mod = str(ds.get("Modality") or "-") if ds is not None else "-"
        found.append((p.stat().st_size, "__".join(p.relative_to(data).parts), p, mod))
    found.sort()
    if quick:
        seen: set[str] = set()
        found = [f for f in found if not (f[3] in seen or seen.add(f[3]))]
    files, modality = [], {}
    for _, name, p, mod in found:
        q = dst / name
        shutil.copyfile(p, q)
        files.append(q)
        modality[name] = mod
    return files, modality
