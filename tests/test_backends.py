"""One conformance suite for every backend (restic runs one suite against all
of its backends): the store directory and an S3 bucket on a real Ceph RGW
(and the write-back cache in front of it) must answer alike."""

from __future__ import annotations

import concurrent.futures
import os

import pytest

from dcmfs.storage.backend import BackendMissing, LocalBackend


@pytest.fixture(params=["local", "s3", "cached-s3"])
def backend(request, tmp_path):
    if request.param == "local":
        yield LocalBackend(str(tmp_path))
        return
    from dcmfs.storage.s3 import S3Backend
    url = request.getfixturevalue("s3_url")
    remote = S3Backend(url, request.getfixturevalue("s3_settings"))
    if request.param == "s3":
        yield remote
        return
    from dcmfs.storage.cache import CachedBackend
    cached = CachedBackend(LocalBackend(str(tmp_path)), remote, cache_size=1 << 20)
    yield cached
    cached.close()


def test_put_get_head_delete(backend):
    data = os.urandom(5000)
    backend.put("objects/ab/one", data)
    assert backend.get("objects/ab/one") == data
    assert backend.head("objects/ab/one") == 5000
    backend.put("objects/ab/one", b"replaced")
    assert backend.get("objects/ab/one") == b"replaced"
    backend.delete("objects/ab/one")
    assert backend.head("objects/ab/one") is None
    with pytest.raises(BackendMissing):
        backend.get("objects/ab/one")
    backend.delete("objects/ab/one")  # a missing name is not an error


def test_ranges(backend):
    data = bytes(range(256)) * 40
    backend.put("r", data)
    assert backend.get("r", 0, 100) == data[:100]
    assert backend.get("r", 100, 228) == data[100:228]
    assert backend.get("r", 10000) == data[10000:]
    assert backend.get("r", 10000, 20000) == data[10000:]  # cut short at the end
    assert backend.get("r", 5, 5) == b""
    with pytest.raises(BackendMissing):
        backend.get("missing", 0, 10)


def test_conditional_create(backend):
    assert backend.create("lease", b"first")
    assert not backend.create("lease", b"second")
    assert backend.get("lease") == b"first"


def test_conditional_create_race_has_one_winner(backend):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: backend.create("race", b"%d" % i), range(8)))
    assert won.count(True) == 1
    assert backend.get("race") == b"%d" % won.index(True)


def test_list_by_prefix(backend):
    names = {f"objects/{i:02x}/{os.urandom(16).hex()}" for i in range(3) for _ in range(2)}
    for n in names:
        backend.put(n, b"x")
    backend.put("snapshots/journal-1", b"j")
    assert set(backend.list("objects/")) == names
    assert set(backend.list("snapshots/")) == {"snapshots/journal-1"}
    assert set(backend.list("objects/01/")) == {n for n in names if n.startswith("objects/01/")}
    assert set(backend.list()) >= names | {"snapshots/journal-1"}
    assert list(backend.list("nothing/")) == []
    backend.put("lease-1", b"")
    backend.put("lease-22", b"")
    assert set(backend.list("lease-")) == {"lease-1", "lease-22"}  # a part of a name
    assert set(backend.list("snapshots/jour")) == {"snapshots/journal-1"}


def test_many_objects_list_pages(backend):
    """More names than one LIST page (1000) holds."""
    names = {f"p/{i:05d}" for i in range(1100)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: backend.put(n, b""), names))
    assert set(backend.list("p/")) == names
