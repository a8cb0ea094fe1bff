"""The index side of a store moved to another key generation (the last
stage of ``dcmfs key rotate --finish``, feature ``key-generations-v1``).

Once no chunk needs an older key epoch, the index, its journal, its
snapshots and the audit trail are sealed again under the newest epoch's
key, so that the header can then destroy every older epoch - epoch 0, the
store key, too (:func:`dcmfs.storage.keyring.move_master`).  Under the
core's lock:

1. a checkpoint; the audit trail closed;
2. the audit trail sealed again beside itself and exchanged with the old
   one in one ``renameat2`` (:mod:`dcmfs.audit.rekey`), the index's head
   mapped to the new chain;
3. the live journal emptied, the index copied aside under the new key with
   that head (:func:`dcmfs.index.keygen.rekey_index`: it names its
   generation in ``meta/keygen``; temp copy, fsync, rename), the witness
   rewritten;
4. a journaled record (``meta/rekeyed``) and a checkpoint, then a snapshot
   at that sequence number and every older snapshot and archived segment
   removed (as the shred pass does), and leftover temporary index copies;
5. an S3 store uploads the snapshot and drops the older ones from the
   bucket.

A crash leaves the index under the old generation or the new one (it says
which; both keys are live until the header drops the old one, which comes
last), and running the finish again does what is left.  Between steps 2
and 3 the trail is under another key than the index: an opening reads its
last segment with that key, ends it there and goes on in a new one under
the index's (no break; verify reads each segment with its own key), and
the next finish seals the older segments again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from .. import format as fmt
from ..audit.rekey import reseal_trail
from ..index import rekey_index
from ..index.schema import U64
from ..index.snapshots import take_snapshot
from .shred import sweep_leftovers

log = logging.getLogger("dcmfs.store")


def move_generation(opened, gen: int, checkpoint=None, wait: bool = True) -> dict:
    """Seal the index side of ``opened`` again under the key of epoch
    ``gen`` (a live epoch, the newest, under which every chunk is: the
    caller checked); returns what was done (``seq``,
    ``seconds``, ``index``: whether the index itself was re-keyed now).

    ``checkpoint``: the caller's (the core's), default the opened store's."""
    started = time.monotonic()
    key = opened.objects.epoch_keys[gen]
    old = [k for e, k in opened.objects.epoch_keys.items() if e != gen]
    moved = False
    with opened.lock:
        (checkpoint or opened.checkpoint)()
        had_trail = opened.audit is not None
        opened.close_audit()
        index = opened.index
        with index.begin() as txn:
            head = txn.get_audit_head()
        # the trail first: the index copy carries its head mapped to the new
        # chain, so a crash leaves both old, both new, or the trail new and
        # the index old - which the trail reads with the other live key
        new_head = reseal_trail(opened.root, opened.store.store_id, old, key, head)
        if index.generation != gen:
            if opened.publisher is not None:  # followers get every record first
                opened.publisher.publish()
            index.journal.reset()
            rekey_index(index, key, gen, audit_head=new_head)
            opened.index_key = key
            moved = True
        with opened.write_txn() as txn:
            if new_head is not None and new_head != head:
                txn.put_audit_head(new_head)
            txn.meta_put("rekeyed", U64.pack(time.time_ns()))
        opened.objects.sync()
        index.checkpoint()
        take_snapshot(index, os.path.join(opened.root, fmt.SNAPSHOTS_DIR), keep=1)
        sweep_leftovers(opened.root)
        seq = index.seq
        if had_trail:
            opened.open_audit()
        # the caller found no chunk under another epoch: their keys leave this
        # process's memory, and the session checks the header with ``gen``'s
        # once the command made it the master (a daemon: later key commands)
        opened.objects.forget_epochs_but(gen)
        opened.store = dataclasses.replace(opened.store, master_key=key, master_epoch=gen,
                                           epoch_keys={gen: key})
    if opened.remote is not None:
        opened.publish_snapshots(wait)
    result = {"seq": seq, "index": moved, "seconds": round(time.monotonic() - started, 3)}
    log.info("key generations: the index, its journal, snapshots and audit trail are sealed "
             "under epoch %d (snapshot %d, %.1f s)", gen, seq, result["seconds"])
    return result
