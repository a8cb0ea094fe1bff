"""The unclean-store check run before a store that was not cleanly closed
is used again (S3QL's crash policy, reduced to what a crash can leave).

A crash can leave only these, by construction of the commit protocol:

* temp files of the durable-write helper (a write cut short);
* objects no index entry refers to (written before a commit that never
  happened, or superseded by a commit whose deletions had not run yet);
* inodes unlinked while they were open (kept as *orphans* until release).

None of these is data a user could still reach, so removing them is safe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat

from ..index import Index, Inode, Txn
from ..storage.objects import ObjectStore, file_oids, stored_bytes

log = logging.getLogger("dcmfs.recovery")


@dataclasses.dataclass
class RecoveryReport:
    temp_files: int = 0
    orphan_inodes: int = 0
    unreferenced_objects: int = 0


def delete_file(txn: Txn, ino: int, inode: Inode) -> list[bytes]:
    """Remove an inode and its records, keeping the store totals right;
    returns the ids of the objects it freed (to be deleted after the next
    checkpoint)."""
    refs = txn.delete_inode(ino, inode)
    if stat.S_ISREG(inode.mode):
        txn.add_stats(files=-1, logical=-inode.size,
                      stored=-sum(stored_bytes(r) for r in refs))
    return file_oids(refs)


def recover(index: Index, objects: ObjectStore, delete_inode=None) -> RecoveryReport:
    """Remove what an interrupted session left behind; returns the counts.

    ``delete_inode(txn, ino, inode)`` removes an inode (the core's removal,
    which also drops it from its caches; :func:`delete_file` by default) and
    returns the object ids it freed.
    """
    delete_inode = delete_inode or delete_file
    report = RecoveryReport()
    for path in objects.iter_temps():
        os.unlink(path)
        report.temp_files += 1
    with index.begin(write=True) as txn:
        for ino in txn.orphans():
            inode = txn.get_inode(ino)
            if inode is not None:
                delete_inode(txn, ino, inode)
            txn.remove_orphan(ino)
            report.orphan_inodes += 1
    index.checkpoint()  # the purge is durable before its objects go (synced by the caller)
    with index.begin() as txn:
        referenced = {ref.oid for _, _, ref in txn.iter_all_chunks()}
    for oid in list(objects.iter_oids()):
        if oid not in referenced:
            objects.delete(oid)
            report.unreferenced_objects += 1
    log.warning("store was not cleanly unmounted; recovered: %d temp files, %d orphan inodes, "
                "%d unreferenced objects", report.temp_files, report.orphan_inodes,
                report.unreferenced_objects)
    return report
