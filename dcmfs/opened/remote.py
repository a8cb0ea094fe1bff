"""An S3 store's side of an opened store: its backend, and what it copies
into the bucket beside the objects so that the bucket alone is enough.

The bucket holds, under ``PREFIX/``: ``objects/XX/<id>`` (the chunk objects,
uploaded in the background by :class:`~dcmfs.storage.cache.CachedBackend`),
``dcmfs.store`` (the header: put by ``dcmfs init`` with a conditional PUT,
so two stores never share a prefix, and replaced by the writer whenever the
local one changed - a key slot added, removed or changed, a rotation, a
feature added - before the index parts that may need it: see
:func:`refresh_header`), and
``snapshots/snapshot-N/data.mdb`` and ``snapshots/journal-N`` (the index's
sealed snapshots and archived journal segments, as on disk).  A snapshot is
uploaded only after every object written before it is in the bucket, so a
snapshot in the bucket never names an object the bucket lacks.
"""

from __future__ import annotations

import logging
import os

from .. import format as fmt
from ..config import Config, S3Settings
from ..errors import StoreIOError, StoreNotEmptyError
from ..index.snapshots import archive_segments, snapshots
from ..storage.backend import LocalBackend
from ..storage.cache import CachedBackend
from ..storage.header import Store

log = logging.getLogger("dcmfs.s3")


def open_backend(store: Store, config: Config) -> CachedBackend:
    """The write-back cache in front of the store's bucket, with the map of
    its packs (:mod:`dcmfs.storage.packs`), read from the bucket's pack
    tables first when this store directory has none yet (attach, a lost
    map).

    Raises
    ------
    StoreIOError
        The map is missing and the bucket cannot be listed.
    """
    from ..storage.packs import PackMap
    from ..storage.s3 import S3Backend
    remote = S3Backend(store.backend, config.s3 or S3Settings())
    packs = PackMap(store.root)
    backend = CachedBackend(LocalBackend(store.root), remote, config.cache_size,
                            uploaders=1 if config.read_only else config.s3_uploaders,
                            upload_delay=config.s3_upload_delay,
                            # a follower is at most ~3 publications behind
                            delete_delay=max(60.0, 3 * config.s3_publish_interval),
                            packs=packs,
                            pack_uploads=fmt.S3_PACKS_FEATURE in store.features)
    fresh = packs.fresh
    try:  # a lost map whole; else the packs another writer put since (one LIST)
        n = backend.refresh_packs()
    except StoreIOError:
        if fresh:
            backend.close()
            raise
        n = 0  # the reads that miss an object read the bucket's tables again
    except BaseException:
        backend.close()
        raise
    if n:
        log.info("the pack map %s from the bucket (%d packs)",
                 "was rebuilt" if fresh else "took the packs of another writer", n)
    return backend


def take_lease(backend: CachedBackend, url: str):
    """The writer's lease of the bucket prefix (:mod:`dcmfs.opened.lease`);
    losing it fences the uploads.

    Raises
    ------
    LeaseHeldError
        Another writer holds it.
    """
    from .lease import Lease
    lease = Lease(backend.remote, url)
    lease.lost = backend.fence  # one event: a lost lease stops the uploads
    return lease


def publish_header(root: str, url: str, settings: S3Settings | None) -> None:
    """Put a new store's header into its bucket (``dcmfs init``).

    Raises
    ------
    StoreNotEmptyError
        The bucket prefix holds a store already.
    """
    from ..storage.s3 import S3Backend
    remote = S3Backend(url, settings or S3Settings())
    with open(os.path.join(root, fmt.HEADER_NAME), "rb") as f:
        header = f.read()
    if not remote.create(fmt.HEADER_NAME, header):
        raise StoreNotEmptyError(f"{url} holds a dcmfs store already; choose another prefix "
                                 "(or 'dcmfs attach' it).")


#: (root -> the local header's (inode, mtime, size) the bucket was last seen
#: to hold): a changed header is looked for with one stat
_HEADER_SEEN: dict[str, tuple] = {}


def refresh_header(remote, root: str) -> bool:
    """Put the local header into the bucket if it changed since the bucket
    was last seen to hold it (key commands replace it, mounted or not):
    ``dcmfs attach`` and followers read the bucket's.  Called by the writer
    only (it holds the lease), before it uploads snapshots or journal parts
    that may be sealed under keys only the new header holds.  True if put.

    Raises
    ------
    OSError, StoreIOError
        Reading the local header or the bucket failed (the caller retries).
    """
    from ..storage.backend import BackendMissing
    path = os.path.join(root, fmt.HEADER_NAME)
    st = os.stat(path)
    sig = (st.st_ino, st.st_mtime_ns, st.st_size)
    if _HEADER_SEEN.get(root) == sig:
        return False
    with open(path, "rb") as f:
        local = f.read()
    try:
        there = remote.get(fmt.HEADER_NAME)
    except BackendMissing:
        there = None
    put = there != local
    if put:
        remote.put(fmt.HEADER_NAME, local)
        log.info("the store's header changed; its copy in the bucket is replaced")
    _HEADER_SEEN[root] = sig
    return put


def publish_snapshots(backend: CachedBackend, root: str, drain_timeout: float) -> bool:
    """Upload the index snapshots and journal segments the bucket lacks, and
    drop those it keeps no more; objects first.  False (and nothing
    uploaded) when the object backlog did not drain in time."""
    if not backend.drain(drain_timeout):
        log.warning("the object backlog did not drain in %.0f s; the index snapshot is not "
                    "uploaded yet (the next one will be)", drain_timeout)
        return False
    directory = os.path.join(root, fmt.SNAPSHOTS_DIR)
    prefix = fmt.SNAPSHOTS_DIR + "/"
    try:
        refresh_header(backend.remote, root)  # first: the snapshots may need its keys
        present = set(backend.remote.list(prefix))
        wanted = set()
        for seq, path in snapshots(directory):
            name = f"{prefix}{os.path.basename(path)}/data.mdb"
            wanted.add(name)
            if name not in present:
                with open(os.path.join(path, "data.mdb"), "rb") as f:
                    backend.remote.put(name, f.read())
        for last, path in archive_segments(directory):
            name = prefix + os.path.basename(path)
            wanted.add(name)
            if name not in present:
                with open(path, "rb") as f:
                    backend.remote.put(name, f.read())
        for name in present - wanted:
            backend.remote.delete(name)
    except (OSError, StoreIOError) as exc:
        log.warning("uploading the index snapshot failed (%s); the next one retries",
                    type(exc).__name__)
        return False
    return True
