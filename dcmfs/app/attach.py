"""``dcmfs attach s3://BUCKET/PREFIX NEWSTORE``: a working store on a new
machine from the bucket alone (and the key).

The header, the index snapshots and the archived journal segments are
copied from the bucket into the empty directory ``NEWSTORE`` (the objects
stay in the bucket; the cache starts empty), then the index is rebuilt as by
``dcmfs fsck --rebuild-index``: the newest snapshot, the journal records
after it (those uploaded with the snapshots, then those the writer published
for followers under ``follow/``, every ``s3_publish_interval``), reconciled
with the objects the bucket lists.  Every file the writer's last published
record knows comes back with its name; files whose objects are in the bucket
but that came later come back into ``/lost+found``, and the run is not clean
when records the bucket lists could not be read.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from .. import format as fmt
from ..config import Config
from ..errors import StoreMissingError, StoreNotEmptyError
from ..storage.header import Secret, read_header


def attach(url: str, store_root: str, secret: Callable[[], Secret], config: Config,
           follower: bool = False) -> dict:
    """Raises StoreNotEmptyError (``store_root`` holds files),
    StoreMissingError (no store at ``url``) and what fsck raises.

    ``follower``: the store of a read-only follower (``--follower``): the
    header and the newest index snapshot only, exactly as the writer took it
    (no rebuild, no lease: the writer may be mounted); a follower mount
    (``-o ro,follow=S``) applies the writer's journal after it."""
    from ..storage.backend import BackendMissing
    from ..storage.s3 import S3Backend, S3Settings
    from ..opened.follow import download_published, newest_published
    from .admin import fsck
    store_root = os.path.abspath(store_root)
    if os.path.exists(store_root) and os.listdir(store_root):
        raise StoreNotEmptyError(f"{store_root} is not empty; attach into a new or empty "
                                 "directory.")
    remote = S3Backend(url, config.s3 or S3Settings())
    try:
        header = remote.get(fmt.HEADER_NAME)
    except BackendMissing as exc:
        raise StoreMissingError(f"No dcmfs store at {url} (no {fmt.HEADER_NAME} there).") from exc
    os.makedirs(os.path.join(store_root, fmt.OBJECTS_DIR), mode=0o700, exist_ok=True)
    os.chmod(store_root, 0o700)
    from ..storage.durable import write_file
    write_file(os.path.join(store_root, fmt.HEADER_NAME), header)
    read_header(store_root)  # a store of a version this dcmfs reads
    if follower:
        return _attach_follower(url, remote, store_root, secret, config)
    snaps = os.path.join(store_root, fmt.SNAPSHOTS_DIR)
    os.makedirs(snaps, mode=0o700, exist_ok=True)
    copied = 0
    for name in remote.list(fmt.SNAPSHOTS_DIR + "/"):
        rel = name[len(fmt.SNAPSHOTS_DIR) + 1:]
        if ".." in rel.split("/") or rel.startswith("/"):
            continue
        dest = os.path.join(snaps, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        write_file(dest, remote.get(name), sync_dir=False)
        copied += 1
    # the journal the writer published for followers since: the records
    # after the newest snapshot, rolled forward by the rebuild; what it
    # lacks of the newest one published was lost with the writer (fsck
    # says so)
    newest = newest_published(remote)
    with tempfile.TemporaryDirectory(dir=store_root, prefix=".attach-") as tmp:
        journals = download_published(remote, tmp)
        remote.close()
        result = fsck(store_root, secret, config, repair=True, rebuild=True, known_seq=newest,
                      published=journals)
    result["copied"] = copied
    return result


def _attach_follower(url: str, remote, store_root: str, secret: Callable[[], Secret],
                     config: Config) -> dict:
    """The newest uploaded snapshot as the index, checked as any index is
    at a read-only opening (its sealed sums)."""
    import dataclasses

    from ..opened.store import OpenedStore
    from ..storage.durable import write_file
    from ..storage.header import open_store
    prefix = fmt.SNAPSHOTS_DIR + "/" + fmt.SNAPSHOT_PREFIX
    found = []
    for name in remote.list(prefix):
        number = name[len(prefix):].split("/", 1)[0]
        if name.endswith("/data.mdb") and number.isdigit():
            found.append((int(number), name))
    if not found:
        remote.close()
        raise StoreMissingError(f"{url} holds no index snapshot yet (the writer uploads one "
                                "at every clean unmount); attach the follower after that.")
    seq, name = max(found)
    index_dir = os.path.join(store_root, fmt.INDEX_DIR)
    os.makedirs(index_dir, mode=0o700, exist_ok=True)
    write_file(os.path.join(index_dir, "data.mdb"), remote.get(name))
    remote.close()
    check = dataclasses.replace(config, read_only=True)
    with OpenedStore(open_store(store_root, secret()), check) as opened:
        seq = opened.index.seq
    return {"clean": True, "follower": True, "seq": seq}


def render_attach(result: dict) -> str:
    """What ``dcmfs attach`` prints."""
    if result.get("follower"):
        return (f"attached as a read-only follower at change {result['seq']}; mount it with "
                "-o ro,follow=10")
    from .admin import render_fsck
    return render_fsck(result)
