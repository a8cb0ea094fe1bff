"""The shred pass of an opened store (crypto-shredding; what it removes and
why is in :mod:`dcmfs.index.shred` and docs/format.md, "File secrets and
crypto-shredding").

It runs at a clean unmount when deletions are pending, in a mounted daemon
once the first pending deletion is ``-o shred_after`` old (checked at its
periodic checkpoints), on ``dcmfs shred STORE`` (offline, or through the
mounted daemon's control attribute), and never on a read-only opening.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from .. import format as fmt
from ..index.shred import ShredState, note_pass, read_state
from ..index.snapshots import take_snapshot
from ..storage.durable import fsync_dir

log = logging.getLogger("dcmfs.store")


def shred_state(opened) -> ShredState:
    with opened.index.begin() as txn:
        return read_state(txn)


def shred(opened, checkpoint=None, wait: bool = True) -> dict:
    """One pass: checkpoint, a compacted snapshot (the only one kept; every
    archived journal segment removed), the live journal emptied, the live
    index compacted, then the pass recorded.  Returns what was shredded
    (``deletions``, ``seq``, ``seconds``).  Holds the core's lock throughout:
    file operations wait for it (about two copies of the index).

    ``checkpoint``: the caller's checkpoint (the core's deletes superseded
    objects after it); default the opened store's.  ``wait``: an S3 store
    uploads the new snapshot (and drops the old ones from the bucket) before
    this returns, else in the background."""
    started = time.monotonic()
    with opened.lock:
        state = shred_state(opened)
        (checkpoint or opened.checkpoint)()
        index = opened.index
        seq = index.seq
        take_snapshot(index, os.path.join(opened.root, fmt.SNAPSHOTS_DIR), keep=1)
        if opened.publisher is not None:  # followers get every record before it goes
            opened.publisher.publish()
        index.journal.reset()
        index.compact()
        sweep_leftovers(opened.root)
        with opened.write_txn() as txn:
            note_pass(txn, seq)
        opened.objects.sync()
        index.checkpoint()
    if opened.remote is not None:
        # the bucket's older snapshots and segments go with the upload of this
        # one (while mounted, in the publishing thread: no request waits)
        opened.publish_snapshots(wait)
    result = {"deletions": state.pending, "seq": seq,
              "seconds": round(time.monotonic() - started, 3)}
    log.info("shred pass: %d deleted files' secrets removed from the index, its snapshots "
             "and its journal (snapshot %d, %.1f s)", state.pending, seq, result["seconds"])
    if opened.audit is not None:
        opened.audit.record("admin", None, command="shred", deletions=state.pending,
                            snapshot=seq)
    return result


#: temporary copies of the index or its journal an interrupted snapshot,
#: compaction or follower round leaves (named by another process's pid):
#: they may hold deleted files' secrets; and the old audit trail an
#: interrupted re-seal (:mod:`dcmfs.audit.rekey`) left under an older key
_LEFTOVERS = ((fmt.SNAPSHOTS_DIR, ".tmp-"), (fmt.INDEX_DIR, ".compact-"), ("", ".follow-"),
              ("", ".audit-rekey-"))


def sweep_leftovers(root: str) -> None:
    """Remove what :data:`_LEFTOVERS` names, but this process's own."""
    mine = f"-{os.getpid()}"
    for sub, prefix in _LEFTOVERS:
        d = os.path.join(root, sub)
        try:
            names = [n for n in os.listdir(d) if n.startswith(prefix) and not n.endswith(mine)]
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if names:
            fsync_dir(d)
