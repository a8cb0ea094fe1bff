"""Superseded objects (dcmfs/core/garbage.py): deleted once, none forgotten."""

from __future__ import annotations

import dataclasses
import os

from .conftest import SMALL
from .test_core import write_file

CS = SMALL.chunk_size
NO_THREAD = dataclasses.replace(SMALL, checkpoint_interval=0)


def test_a_checkpoint_under_the_lock_during_the_threads_deletion_forgets_no_object(make_fs):
    """The checkpoint thread deletes set-aside objects without the core's
    lock while a request's checkpoint (an fsync of a directory: sync_all)
    deletes them under it.  Both worked from a copy of the list and each
    removed its length from the front: the second removal took objects set
    aside meanwhile off the list undeleted, left on disk with nothing
    naming them."""
    fs = make_fs(NO_THREAD)
    before = set(fs.objects.iter_oids())
    write_file(fs, "/a", os.urandom(3 * CS))
    write_file(fs, "/b", os.urandom(2 * CS))
    fs.checkpoint()
    fs.unlink("/a")
    fs.checkpoint(delete_later=True)  # /a's objects set aside for the thread
    assert fs.data.set_aside_count() >= 3
    asked = []

    def go_on() -> bool:  # the thread's pause check, between two batches
        if not asked:
            fs.sync_all()  # a request's checkpoint: deletes what is set aside
            fs.unlink("/b")
            fs.checkpoint(delete_later=True)  # /b's objects set aside now
        asked.append(1)
        return True

    fs.data.delete_set_aside(go_on)
    fs.data.delete_set_aside()  # whatever is left set aside
    assert fs.data.superseded() == []
    assert set(fs.objects.iter_oids()) == before  # nothing of /a or /b left behind
