"""File secrets from the store's history, for repairs (feature
``file-secrets-v1``, :mod:`dcmfs.index.shred`).

A file's payload key needs its secret, which only its inode record holds.
When that record is damaged or lost, ``fsck --repair`` and the rebuild
look for the secret where the index's history keeps it: the snapshots and
the journals (live and archived).  A file that lived at the last shred
pass, or was made since, is always there; a deleted file after its shred
horizon never is (that is the point), nor a file whose whole history was
lost with ``index/`` and ``snapshots/``.
"""

from __future__ import annotations

import os
import struct

import lmdb

from .. import format as fmt
from ..errors import IntegrityError, StoreIOError
from ..index import index_sealer, sealed_aad
from ..index.journal import PUT, Journal
from ..index.schema import DB_ID, JOURNAL_NAME, Inode, ino_key
from ..index.snapshots import archive_segments, snapshots
from ..storage import crypto


def history_secrets(root: str, master_key: bytes, store_id: bytes, ino: int,
                    file_id: bytes) -> list[bytes]:
    """The secrets the snapshots and journals of the store at ``root`` hold
    for inode ``ino`` with file id ``file_id``, newest first."""
    siv = index_sealer(master_key, store_id)
    key = ino_key(ino)
    aad = sealed_aad("inodes", key)
    found: list[bytes] = []

    def add(sealed: bytes) -> None:
        try:
            inode = Inode.decode(siv.open(sealed, aad))
        except (crypto.AuthenticationFailed, ValueError, struct.error):
            return
        if inode.file_id == file_id and inode.secret and inode.secret not in found:
            found.append(inode.secret)

    directory = os.path.join(root, fmt.SNAPSHOTS_DIR)
    journals = [os.path.join(root, fmt.INDEX_DIR, JOURNAL_NAME)] + [
        p for _, p in reversed(archive_segments(directory))]
    for path in journals:
        if not os.path.exists(path):
            continue
        try:
            j = Journal(path, master_key, store_id, read_only=True)
        except (StoreIOError, IntegrityError, OSError):
            continue
        try:
            puts = [v for _, ops in j.records(0) for kind, db, k, v in ops
                    if kind == PUT and db == DB_ID["inodes"] and k == key]
        finally:
            j.close()
        for sealed in reversed(puts):
            add(sealed)
    for _, path in reversed(snapshots(directory)):
        try:
            env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=16)
        except lmdb.Error:
            continue
        try:
            with env.begin() as txn:
                sealed = txn.get(key, db=env.open_db(b"inodes", txn=txn, create=False))
                if sealed is not None:
                    add(bytes(sealed))
        except lmdb.Error:
            pass
        finally:
            env.close()
    return found
