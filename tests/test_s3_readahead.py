"""Cold reads of an S3 store: objects fetched ahead of sequential readers
(dcmfs.core.readahead, dcmfs.storage.fetch), nothing fetched for a reader
that jumps about, and a downloaded object never read half written."""

from __future__ import annotations

import os
import random
import threading

import pytest

from dcmfs.format import CHUNK_FLAG_INLINE
from dcmfs.storage.backend import LocalBackend
from dcmfs.storage.cache import CachedBackend
from dcmfs.storage.s3 import S3Backend

from .test_s3 import read_file, s3_fs, wipe_cache, write_file  # noqa: F401 (fixture)

FILES = {f"/d/f{i:02}": os.urandom(150_000 + i * 4099) for i in range(22)}


def written(s3_fs):
    fs = s3_fs()
    fs.mkdir("/d", 0o755, 0, 0)
    for path, data in FILES.items():
        write_file(fs, path, data)
    fs.close()
    wipe_cache(s3_fs.root)
    return s3_fs()


def cached(fs, path: str) -> bool:
    """Are all the object files of ``path`` in the local cache (those kept
    in the index, inline, always are)?"""
    with fs.lock, fs.index.begin() as txn:
        refs = txn.chunks(fs._resolve(txn, path))
    return all(os.path.exists(os.path.join(fs.opened.root, "objects", r.oid.hex()[:2],
                                            r.oid.hex())) for r in refs.values()
               if not r.flags & CHUNK_FLAG_INLINE)


def test_a_directory_read_in_name_order_is_fetched_ahead(s3_fs):
    fs = written(s3_fs)
    fetcher = fs.opened.remote.fetcher
    names = sorted(FILES)
    assert read_file(fs, names[0]) == FILES[names[0]]
    assert not cached(fs, names[2])  # one file read: no stream yet
    assert read_file(fs, names[1]) == FILES[names[1]]  # the next one: a stream
    assert fetcher.wait_idle(30)
    ahead = names[2:2 + 16]
    assert all(cached(fs, p) for p in ahead), "the next 16 files were not fetched ahead"
    assert not cached(fs, names[18]), "more than 16 files were fetched ahead"
    assert fetcher.fetched > 0
    read_by_hand = fs.opened.remote.stats()["downloads"] - fetcher.fetched
    for path in names[2:]:
        assert read_file(fs, path) == FILES[path]
        # A reader faster than the bucket takes back what is still queued
        # and fetches it itself (claim); waiting here keeps that race out:
        # each file read moves the window on, and everything after the first
        # two files comes from fetches ahead.
        assert fetcher.wait_idle(30)
    downloads = fs.opened.remote.stats()["downloads"]
    assert downloads - fetcher.fetched == read_by_hand, (fetcher.fetched, downloads)


def test_random_access_fetches_nothing_ahead(s3_fs):
    fs = written(s3_fs)
    rng = random.Random(7)
    names = sorted(FILES)
    order = names[::3] + names[1::3][::-1]  # never a file after the one before it
    for path in order:
        fh = fs.open(path, os.O_RDONLY)
        try:
            for _ in range(3):  # reads that never start where the last one ended
                offset = rng.randrange(1, len(FILES[path]) - 5000)
                assert fs.read(fh, 4096, offset) == FILES[path][offset:offset + 4096]
        finally:
            fs.release(fh)
    assert fs.opened.remote.fetcher.fetched == 0
    assert fs.opened.remote.stats()["downloads"] > 0


def test_a_downloaded_object_is_never_read_half_written(s3_fs, s3_settings):
    """While a read downloads an object into the cache, another read that
    looks in the cache (a read-ahead thread, the read that waited for it)
    finds it whole or not at all."""
    from dcmfs.storage.backend import BackendMissing
    fs = s3_fs()
    fs.close()
    remote = S3Backend(s3_fs.url, s3_settings)
    blob = os.urandom(32 << 20)
    cache = CachedBackend(LocalBackend(s3_fs.root), remote, 1 << 34, uploaders=1)
    try:
        for round_ in range(3):
            name = f"objects/ab/{round_:032x}"
            remote.put(name, blob)
            seen, stop = [], threading.Event()

            def look():
                while not stop.is_set():
                    try:
                        seen.append(len(cache.cache.get(name)))
                    except BackendMissing:
                        continue
            t = threading.Thread(target=look)
            t.start()
            try:
                assert cache.get(name) == blob
                threading.Event().wait(0.05)
            finally:
                stop.set()
                t.join()
            assert seen and set(seen) == {len(blob)}, sorted(set(seen))[:5]
    finally:
        cache.close()


def test_a_directory_read_in_order_is_decoded_ahead_too(s3_fs):
    """With the GETs' cost off the server (packs), a cold read of an S3
    store was bound by decoding one file at a time: the next files' first
    objects are decoded ahead as on a local store, once fetched, and read
    back as written."""
    from dcmfs.core.readahead import LOCAL_FILES

    from .test_readahead_local import decoded, settle
    fs = written(s3_fs)
    names = sorted(FILES)
    assert read_file(fs, names[0]) == FILES[names[0]]
    settle(fs)
    assert decoded(fs, names[1])[0] == 0  # one file read: not yet a walk
    assert read_file(fs, names[1]) == FILES[names[1]]
    settle(fs)
    for path in names[2:2 + LOCAL_FILES]:
        have, of = decoded(fs, path)
        assert have == of > 1, f"{path}: {have} of {of} objects decoded ahead"
    assert decoded(fs, names[2 + LOCAL_FILES])[0] == 0, "more files decoded than asked"
    for path in names[2:]:
        assert read_file(fs, path) == FILES[path]
        settle(fs)


def test_an_object_deleted_while_fetched_ahead_is_not_cached_after(s3_fs, s3_settings):
    """A fetch ahead whose GET is on its way when the object is deleted
    (the re-encoder replaced it, its file was removed) must not write it
    into the cache afterwards: the cache's space leaks (the books no longer
    know it) and a stale object sits under a deleted name (failed before)."""
    from dcmfs.storage.backend import BackendMissing
    fs = s3_fs()
    fs.close()
    remote = S3Backend(s3_fs.url, s3_settings)
    got, go = threading.Event(), threading.Event()
    real_get = remote.get

    def slow_get(name, start=0, end=None):  # the real GET, then a pause
        data = real_get(name, start, end)
        if name.startswith("objects/"):
            got.set()
            assert go.wait(30)
        return data
    remote.get = slow_get
    cache = CachedBackend(LocalBackend(s3_fs.root), remote, 1 << 30, uploaders=1,
                          delete_delay=3600)
    try:
        name = f"objects/cd/{os.urandom(16).hex()}"
        real_put = remote.put
        real_put(name, os.urandom(70_000))
        assert cache.prefetch([name]) == 1
        assert got.wait(30)  # the GET came back; not yet in the cache
        cache.delete(name)
        go.set()
        assert cache.fetcher.wait_idle(30)
        assert not os.path.exists(cache.cache.path(name)), "the deleted object was cached"
        assert cache.stats()["cache_bytes"] == 0
        with pytest.raises(BackendMissing):
            cache.get(name)
        assert name not in set(cache.list("objects/"))
    finally:
        go.set()
        cache.close()
