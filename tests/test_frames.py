"""Framed chunk objects (layout 3, feature ``framed-chunks-v1``): a random
read decodes only the 64 KiB frames it touches; every frame is authenticated
and bound to its object and place; whole reads, verify and fsck read them."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil

import pytest

from dcmfs import errors as E
from dcmfs import format as fmt
from dcmfs.storage import frames

from .conftest import SMALL, flip_byte
from .test_core import read_file, write_file
from .test_integrity import chunk_paths

#: four frames to a chunk
#: (every object a file: the tests read and damage object files)
FRAMED = dataclasses.replace(SMALL, chunk_size=4 * frames.FRAME_SIZE,
                             dirty_limit=4 << 20, read_cache_bytes=4 << 20, inline_max=0)
CS, FS, US = FRAMED.chunk_size, frames.FRAME_SIZE, frames.UNIT_SIZE


def mixed(n: int, seed: int = 1) -> bytes:
    """Half compressible (text), half random, in 4 KiB pieces."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(4096) if rng.random() < 0.5 else \
            (b"dcmfs frame %d " % len(out)) * 300
    return bytes(out[:n])


def fresh(fs):
    """Forget decoded chunks and frames, opened frame tables and object files
    kept open (as a new mount would)."""
    fs.data.cache = type(fs.data.cache)(FRAMED.read_cache_bytes)
    fs.objects._tables.clear()
    fs.objects.backend.kept.close()


def pread(fs, path, offset, size):
    """One read as a random reader makes it (none is taken as sequential)."""
    fh = fs.open(path, os.O_RDONLY)
    fs.data.SEQUENTIAL_SLACK = -1
    try:
        return fs.read(fh, size, offset)
    finally:
        del fs.data.SEQUENTIAL_SLACK
        fs.release(fh)


@pytest.fixture
def framed(make_fs):
    fs = make_fs(FRAMED)
    a, b = mixed(3 * CS + 12345, 1), os.urandom(2 * CS)
    write_file(fs, "/a", a, step=128 * 1024)
    write_file(fs, "/b", b)
    return fs, a, b


def blob_of(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_chunks_are_framed_and_read_back(framed):
    fs, a, b = framed
    layouts = [blob_of(path)[4] for path in chunk_paths(fs, "/a") + chunk_paths(fs, "/b")]
    assert layouts == [3, 3, 3, 2, 3, 3]  # the last chunk of /a is within one frame
    with fs.lock, fs.index.begin() as txn:
        refs = txn.chunks(fs._resolve(txn, "/a"))
    assert [bool(refs[i].flags & fmt.CHUNK_FLAG_FRAMED) for i in sorted(refs)] == \
        [True, True, True, False]
    assert any(r.codec == 1 for r in refs.values())  # the text frames are zstd-coded
    fresh(fs)
    assert read_file(fs, "/a") == a and read_file(fs, "/b") == b
    rng = random.Random(7)
    for _ in range(200):
        fresh(fs) if rng.random() < 0.3 else None
        off = rng.randrange(len(a))
        size = rng.choice([1, 4096, 5000, FS, FS + 1, 2 * CS])
        assert pread(fs, "/a", off, size) == a[off:off + size], (off, size)


def test_a_random_read_decodes_only_its_frame(framed):
    fs, a, b = framed
    fresh(fs)
    with fs.lock, fs.index.begin() as txn:
        ref = txn.chunks(fs._resolve(txn, "/a"))[1]
    assert pread(fs, "/a", CS + 2 * FS + 100, 4096) == a[CS + 2 * FS + 100:CS + 2 * FS + 4196]
    assert fs.data.cache.get(ref.oid) is None  # the chunk was not decoded whole
    unit = (2 * FS + 100) // US  # the 32 KiB unit it lies in, decoded alone
    assert fs.data.cache.get(ref.oid + unit.to_bytes(4, "big")) is not None
    assert fs.data.cache.get(ref.oid + (unit - 1).to_bytes(4, "big")) is None
    assert fs.data.cache.get(ref.oid + (unit + 1).to_bytes(4, "big")) is None
    # a read of 128 KiB and more (the kernel's read-ahead) decodes whole
    # chunks, even where it is not near the last read: the reads near it
    # would decode them whole again
    with fs.lock, fs.index.begin() as txn:
        ref2 = txn.chunks(fs._resolve(txn, "/a"))[2]
    assert pread(fs, "/a", 2 * CS + 10, 128 * 1024) == a[2 * CS + 10:2 * CS + 10 + 128 * 1024]
    assert fs.data.cache.get(ref2.oid) is not None
    # a sequential reader decodes whole chunks
    assert read_file(fs, "/a") == a
    assert fs.data.cache.get(ref.oid) is not None


def test_a_small_read_near_the_last_by_chance_decodes_only_its_frame(framed):
    """A random reader's 4 KiB read that lands near its last read is not
    taken for a sequential one (which decodes whole chunks and more ahead);
    a small reader going on from where it was, or from the start, is."""
    fs, a, b = framed
    fresh(fs)
    with fs.lock, fs.index.begin() as txn:
        refs = txn.chunks(fs._resolve(txn, "/a"))
    fh = fs.open("/a", os.O_RDONLY)
    try:
        far = CS + 2 * FS + 100  # far from the start: a random read
        assert fs.read(fh, 4096, far) == a[far:far + 4096]
        near = CS + 3 * FS + 50  # 64 KiB on: near the last read, by chance
        assert fs.read(fh, 4096, near) == a[near:near + 4096]
        assert fs.data.cache.get(refs[1].oid) is None  # not decoded whole
        unit = (3 * FS + 50) // US
        assert fs.data.cache.get(refs[1].oid + unit.to_bytes(4, "big")) is not None
        # a third read near the second: a small reader going on, sequential
        assert fs.read(fh, 4096, near + 4096) == a[near + 4096:near + 8192]
        assert fs.data.cache.get(refs[1].oid) is not None
    finally:
        fs.release(fh)
    fresh(fs)
    fh = fs.open("/a", os.O_RDONLY)
    try:  # a small reader from the start is sequential at once
        assert fs.read(fh, 4096, 0) == a[:4096]
        assert fs.data.cache.get(refs[0].oid) is not None
    finally:
        fs.release(fh)


def test_whole_decode_of_frames_checks_every_unit():
    """A whole chunk's units are decoded in one call, each still to
    exactly its own length: units that decode to the right total but the
    wrong lengths (only a key holder could seal them) are refused, as are
    unit lengths that do not fill their frame."""
    import struct

    import zstandard
    plain = mixed(3 * FS + 999, 7)
    codec, coded = frames.code(frames.ZSTD, plain, 1)
    assert codec == frames.ZSTD and frames.decode_all(coded, len(plain)) == plain
    for k, payload in enumerate(coded):  # and frame by frame, unit by unit
        assert frames.decode(payload, frames.frame_len(len(plain), k)) == plain[k * FS:(k + 1) * FS]
    noise = os.urandom(2 * FS + 5)
    codec, raw = frames.code(frames.ZSTD, noise, 1)
    assert codec == frames.NONE and frames.decode_all(raw, len(noise)) == noise

    def frame(units):
        return struct.pack(f">{len(units)}I", *map(len, units)) + b"".join(units)
    z = lambda b: zstandard.compress(b, 1)  # noqa: E731
    cuts = [0, US - 10, *range(2 * US, FS, US), FS]  # the first unit 10 bytes short
    assert len(cuts) - 1 == frames.units_of(FS) >= 2
    shifted = frame([z(plain[a:b]) for a, b in zip(cuts, cuts[1:])])
    with pytest.raises(E.IntegrityError):
        frames.decode_all([shifted, *coded[1:]], len(plain))
    with pytest.raises(E.IntegrityError):
        frames.decode(shifted, FS)
    with pytest.raises(E.IntegrityError):  # lengths that leave bytes over
        frames.decode_all([coded[0] + b"x", *coded[1:]], len(plain))
    with pytest.raises(E.IntegrityError):  # a damaged unit
        bad = frame([z(plain[:US]), b"\x28\xb5\x2f\xfd" + bytes(40),
                     *(z(plain[a:a + US]) for a in range(2 * US, FS, US))])
        frames.decode_all([bad, *coded[1:]], len(plain))


def test_random_writes_over_framed_chunks(framed, make_fs):
    fs, a, b = framed
    data = bytearray(a)
    rng = random.Random(3)
    fh = fs.open("/a", os.O_RDWR)
    for _ in range(40):
        off, piece = rng.randrange(len(data) + 1000), rng.randbytes(rng.randrange(1, 9000))
        fs.write(fh, piece, off)
        if off > len(data):
            data += bytes(off - len(data))
        data[off:off + len(piece)] = piece
        if rng.random() < 0.3:
            fs.fsync(fh)
        off = rng.randrange(len(data))
        assert fs.read(fh, 4096, off) == bytes(data[off:off + 4096])
    fs.release(fh)
    fs.close()
    fs = make_fs(FRAMED)
    assert read_file(fs, "/a") == bytes(data)
    for off in range(0, len(data), 40000):
        assert pread(fs, "/a", off, 4096) == bytes(data[off:off + 4096])


def frame_spans(fs, path, k_chunk):
    """(object path, [frame starts and the end]) of chunk ``k_chunk`` of ``path``."""
    with fs.lock, fs.index.begin() as txn:
        ino = fs._resolve(txn, path)
        inode = txn.get_inode(ino)
        ref = txn.chunks(ino)[k_chunk]
    cipher = fs.objects.file_cipher(inode.file_id, inode.secret)
    starts = fs.objects._frame_table(cipher, inode.file_id, ino, k_chunk, ref)[2]
    fs.objects._tables.clear()
    return fs.objects.path(ref.oid), list(starts)


def assert_range_fails(fs, path, offset, size=4096):
    fresh(fs)
    with pytest.raises(E.IntegrityError):
        pread(fs, path, offset, size)


def test_flip_inside_one_frame(framed):
    fs, a, b = framed
    obj, starts = frame_spans(fs, "/b", 0)
    flip_byte(obj, (starts[2] + starts[3]) // 2)
    assert_range_fails(fs, "/b", 2 * FS + 10)  # the frame read alone fails
    fresh(fs)
    assert pread(fs, "/b", FS + 10, 4096) == b[FS + 10:FS + 4106]  # its neighbour is intact
    with pytest.raises(E.IntegrityError):  # a whole read fails
        read_file(fs, "/b")
    assert read_file(fs, "/a") == a


def test_two_frames_swapped(framed):
    fs, a, b = framed  # /b is random: its frames are stored as they are, equally long
    obj, starts = frame_spans(fs, "/b", 1)
    blob = bytearray(blob_of(obj))
    f1, f2 = blob[starts[1]:starts[2]], blob[starts[2]:starts[3]]
    assert len(f1) == len(f2)
    blob[starts[1]:starts[2]], blob[starts[2]:starts[3]] = f2, f1
    with open(obj, "wb") as f:
        f.write(blob)
    assert_range_fails(fs, "/b", CS + FS + 10)
    assert_range_fails(fs, "/b", CS + 2 * FS + 10)
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/b")


def test_frame_moved_from_another_object(framed):
    fs, a, b = framed
    obj0, starts0 = frame_spans(fs, "/b", 0)
    obj1, starts1 = frame_spans(fs, "/b", 1)
    blob = bytearray(blob_of(obj1))
    blob[starts1[1]:starts1[2]] = blob_of(obj0)[starts0[1]:starts0[2]]
    with open(obj1, "wb") as f:
        f.write(blob)
    assert_range_fails(fs, "/b", CS + FS + 10)


@pytest.mark.parametrize("cut", ["table", "last frame"])
def test_truncated_framed_object(framed, cut):
    fs, a, b = framed
    obj, starts = frame_spans(fs, "/b", 1)
    keep = (starts[0] - 20) if cut == "table" else starts[-1] - 5
    with open(obj, "r+b") as f:
        f.truncate(keep)
    assert_range_fails(fs, "/b", CS + 10)  # the first frame: the table is checked first
    assert_range_fails(fs, "/b", CS + 3 * FS + 10)
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/b")


def test_extended_framed_object(framed):
    fs, a, b = framed
    obj, _ = frame_spans(fs, "/b", 0)
    with open(obj, "ab") as f:
        f.write(b"\0" * 28)
    assert_range_fails(fs, "/b", 10)
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/b")


def test_flipped_frame_table(framed):
    fs, a, b = framed
    obj, starts = frame_spans(fs, "/a", 0)
    flip_byte(obj, starts[0] - 20)
    assert_range_fails(fs, "/a", 10)


def test_downgraded_layout_byte(framed):
    """A framed object relabelled as layout 2 fails (the context's associated
    data holds the prefix), and so does a layout-2 object relabelled 3."""
    fs, a, b = framed
    obj, _ = frame_spans(fs, "/b", 0)
    blob = bytearray(blob_of(obj))
    blob[4] = fmt.OBJECT_VERSION
    with open(obj, "wb") as f:
        f.write(blob)
    assert_range_fails(fs, "/b", 10)
    fresh(fs)
    with pytest.raises(E.IntegrityError):
        read_file(fs, "/b")


def test_swapped_framed_objects_and_rollback(framed):
    fs, a, b = framed
    p0, p1 = chunk_paths(fs, "/b")
    old = blob_of(p1)
    tmp = p0 + ".swap"
    os.rename(p0, tmp)
    os.rename(p1, p0)
    os.rename(tmp, p1)
    assert_range_fails(fs, "/b", 10)
    assert_range_fails(fs, "/b", CS + 10)
    os.rename(p0, tmp)  # put them back
    os.rename(p1, p0)
    os.rename(tmp, p1)
    fresh(fs)
    assert read_file(fs, "/b") == b
    fh = fs.open("/b", os.O_RDWR)  # a new generation of chunk 1
    fs.write(fh, b"x" * 10, CS + 5)
    fs.release(fh)
    fs.checkpoint()
    new = chunk_paths(fs, "/b")[1]
    with open(new, "wb") as f:  # the old object put back in its place
        f.write(old)
    assert_range_fails(fs, "/b", CS + 10)


def test_old_unframed_objects_still_read(make_fs):
    """Objects of layout 2 (written before the feature, or by a store opened
    with framing off) read as before, next to framed ones."""
    fs = make_fs(FRAMED)
    fs.objects.framed = False
    old = mixed(CS + 1000, 5)
    write_file(fs, "/old", old)
    fs.objects.framed = True
    new = mixed(CS + 1000, 6)
    write_file(fs, "/new", new)
    assert [blob_of(p)[4] for p in chunk_paths(fs, "/old")] == [2, 2]
    assert [blob_of(p)[4] for p in chunk_paths(fs, "/new")] == [3, 2]  # 1000 bytes: unframed
    fresh(fs)
    assert pread(fs, "/old", 3 * FS, 4096) == old[3 * FS:3 * FS + 4096]
    assert read_file(fs, "/old") == old and read_file(fs, "/new") == new


def test_verify_and_fsck_read_framed_objects(make_fs, secret):
    from dcmfs.app import admin
    from .test_fsck import QUIET
    fs = make_fs(FRAMED)
    b = os.urandom(2 * CS)
    write_file(fs, "/b", b)
    write_file(fs, "/c", mixed(CS + 7, 9))
    obj, starts = frame_spans(fs, "/b", 1)
    fs.close()
    root = str(make_fs.root)
    report = admin.verify(root, lambda: secret, FRAMED, out=QUIET)
    assert report["findings"] == []
    flip_byte(obj, starts[3] + 40)
    report = admin.verify(root, lambda: secret, FRAMED, out=QUIET)
    assert [f["kind"] for f in report["findings"]] == ["failed authentication"]
    result = admin.fsck(root, lambda: secret, FRAMED, True, False, out=QUIET)
    assert result["problems"] and result["clean"], result
    assert admin.verify(root, lambda: secret, FRAMED, out=QUIET)["findings"] == []


def test_copied_framed_object_of_another_file(framed):
    fs, a, b = framed
    shutil.copyfile(chunk_paths(fs, "/b")[0], chunk_paths(fs, "/a")[0])
    assert_range_fails(fs, "/a", 10)
    fresh(fs)
    assert read_file(fs, "/b") == b


def test_rotation_reseals_every_frame(tmp_path):
    """``dcmfs key rotate --finish`` seals each frame again under the new
    epoch's key, bound to the new object id; random and whole reads follow.
    A framed object written after the rotation has its context block under
    its own epoch's key too (key generations), and after the finish the
    stolen store key opens no part of any framed object."""
    import io
    from dcmfs.app import admin
    from dcmfs.core.filesystem import FileSystem
    from dcmfs.storage import keyring
    from dcmfs.storage.header import Secret, init_store, open_store
    from .test_key_generations import thief_reads
    key = Secret("keyfile", bytes(range(32)))
    root = str(tmp_path / "s")
    init_store(root, key, FRAMED)
    stolen = open_store(root, key).master_key
    data, later = mixed(2 * CS + 5000, 11), mixed(CS + 7000, 12)
    fs = FileSystem(open_store(root, key, for_writing=True), FRAMED)
    write_file(fs, "/f", data)
    before = chunk_paths(fs, "/f")
    fs.close()
    assert thief_reads(root, stolen)["objects"] == 3  # the control
    keyring.rotate(root, key)
    fs = FileSystem(open_store(root, key, for_writing=True), FRAMED)
    try:
        write_file(fs, "/later", later)
        with fs.lock, fs.index.begin() as txn:
            refs = txn.chunks(fs._resolve(txn, "/later"))
        assert [bool(refs[i].flags & fmt.CHUNK_FLAG_FRAMED) for i in sorted(refs)] == \
            [True, False]
        for ref in refs.values():
            assert fs.objects.epochs_of(ref.oid) == {1}
        # a frame table opened holds a file key of its epoch: a generation
        # move (opened/regen.py) drops it with the older keys
        assert pread(fs, "/f", FS + 10, 4096) == data[FS + 10:FS + 4106]
        assert fs.objects._tables
        fs.objects.forget_epochs_but(1)
        assert not fs.objects._tables
    finally:
        fs.close()
    assert thief_reads(root, stolen)["objects"] == 3  # none of /later's
    result = admin.finish_rotation(root, lambda: key, FRAMED, out=io.StringIO())
    assert result["after"] == {"1": 5}
    fs = FileSystem(open_store(root, key), FRAMED)
    try:
        after = chunk_paths(fs, "/f")
        assert not set(before) & set(after)
        assert [blob_of(p)[4] for p in after] == [3, 3, 2]  # 5000 bytes: one piece
        with fs.lock, fs.index.begin() as txn:
            refs = txn.chunks(fs._resolve(txn, "/f"))
        for ref in refs.values():
            assert fs.objects.epochs_of(ref.oid) == {1}
        assert pread(fs, "/f", CS + FS + 100, 4096) == data[CS + FS + 100:CS + FS + 4196]
        assert read_file(fs, "/f") == data and read_file(fs, "/later") == later
    finally:
        fs.close()
    got = thief_reads(root, stolen)
    assert got["objects"] == got["payloads"] == 0, got
