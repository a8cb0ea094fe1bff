"""Re-encryption of older key epochs (``dcmfs key rotate --finish``).

After a rotation (:func:`dcmfs.storage.keyring.rotate`) new chunks are
sealed under the newest key epoch; the chunks written before stay under
theirs, and stay readable, until this pass seals each of them again: the
payload as stored (authenticated, not decoded) under a new object id and
the newest epoch's file key, with the same generation, codec, flags and
lengths.  A file's new objects are written first, then its chunk records are
swapped in one journaled transaction, only if the file is closed and its
chunk table unchanged (what the re-encoder does); the old objects are
deleted after the next checkpoint.  A crash at any point leaves each file
with its old objects or its new ones, both readable; running the pass again
goes on where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..errors import IntegrityError
from ..format import CHUNK_FLAG_INLINE
from ..storage.objects import file_oids
from ..opened.jobs import ActiveJobHost

#: the audit trail (dcmfs.app.logsetup.AUDIT)
log = logging.getLogger("dcmfs.audit")


def epochs_in_use(host: ActiveJobHost) -> dict[int, int]:
    """{key epoch: chunks that need its key} over every chunk the index
    names (each object's header is read: its payload's epoch, and its
    context block's, which differs for an object a dcmfs before
    ``key-generations-v1`` sealed under a later epoch; an object that
    cannot be read counts under -1)."""
    with host.lock, host.index.begin() as txn:
        refs = [(ino, ref) for ino, _, ref in txn.iter_all_chunks()]
    counts: dict[int, int] = {}
    for ino, ref in refs:
        try:
            epochs = host.objects.epochs_of(ref.oid, ino if ref.flags & CHUNK_FLAG_INLINE else None)
        except IntegrityError:
            epochs = {-1}
        for epoch in epochs:
            counts[epoch] = counts.get(epoch, 0) + 1
    return counts


def rekey_file(host: ActiveJobHost, ino: int) -> tuple[int, int] | None:
    """Seal the chunks of one file that are under older epochs again; returns
    (chunks, stored bytes) done, or None if the file changed or is open
    meanwhile (try again later)."""
    with host.lock:
        if host.is_open(ino):
            return None
        with host.index.begin() as txn:
            inode = txn.get_inode(ino)
            table = txn.chunks(ino) if inode is not None else {}
    if not table:
        return 0, 0
    cipher = host.objects.file_cipher(inode.file_id, inode.secret)
    new = {}
    try:
        for idx, ref in table.items():
            fresh = host.objects.reseal(cipher, inode.file_id, ino, idx, ref)
            if fresh is not None:
                new[idx] = fresh
    except IntegrityError as exc:
        host.damaged(ino, exc)
        _discard(host, new)
        raise
    if not new:
        return 0, 0
    with host.lock:
        with host.index.begin() as txn:
            current = txn.chunks(ino) if txn.get_inode(ino) is not None else None
        if current != table or host.is_open(ino):
            _discard(host, new)
            return None
        with host.write_txn() as txn:
            for idx, ref in new.items():
                txn.put_chunk(ino, idx, ref)
        host.after_commit(file_oids(table[idx] for idx in new))
    return len(new), sum(ref.stored_len for ref in new.values())


def _discard(host: ActiveJobHost, new: dict) -> None:
    for ref in new.values():
        host.objects.delete(ref.oid)


#: how long ``rekey_all`` waits for files that are open (or changing) to be
#: closed before it leaves them under their older epoch: the kernel sends
#: RELEASE after close(2) has returned, so a file just written can look
#: open for a moment (``dcmfs key rotate --finish --wait-open``)
OPEN_WAIT = 30.0


def rekey_all(host: ActiveJobHost, progress: Callable[[int, int], None] = lambda *a: None,
              wait: float = OPEN_WAIT) -> tuple[int, int, int]:
    """Seal every chunk under an older epoch again; ``progress(files left,
    bytes done)``.  A file open or changed meanwhile is tried again after a
    pause (0.05 s, doubling up to 1 s) for up to ``wait`` seconds, as long as
    it still has a chunk under an older epoch.  Returns (chunks, bytes)
    resealed and the files left under an older epoch because they stayed
    open or kept changing.

    Raises
    ------
    IntegrityError
        A chunk could not be read (the file is marked as damaged; its old
        objects stay).
    """
    chunks = nbytes = 0
    with host.lock, host.index.begin() as txn:
        todo = sorted({ino for ino, _, _ in txn.iter_all_chunks()})
    deadline, pause = None, 0.05
    while True:
        later = []
        for n, ino in enumerate(todo):
            if host.stopping.is_set():
                return chunks, nbytes, len(todo) - n + len(later)
            done = rekey_file(host, ino)
            if done is None:
                later.append(ino)
                continue
            chunks += done[0]
            nbytes += done[1]
            progress(len(todo) - n - 1 + len(later), nbytes)
        later = [ino for ino in later if _needs_rekey(host, ino)]
        if not later:
            break
        if deadline is None:
            deadline = time.monotonic() + wait
        left = deadline - time.monotonic()
        if left <= 0 or host.stopping.wait(min(pause, left)):
            log.info("key epochs: %d files stayed open or changing for %.0f s and keep "
                     "chunks under an older epoch", len(later), wait)
            break
        pause = min(pause * 2, 1.0)
        todo = later
    log.info("key epochs: %d chunks (%d bytes) sealed again under epoch %d", chunks, nbytes,
             host.objects.epoch)
    return chunks, nbytes, len(later)


def _needs_rekey(host: ActiveJobHost, ino: int) -> bool:
    """Does the file still have a chunk under an older epoch (or one that
    cannot be read, which the next pass reports)?"""
    with host.lock, host.index.begin() as txn:
        refs = list(txn.chunks(ino).values()) if txn.get_inode(ino) is not None else []
    current = host.objects.epoch
    for ref in refs:
        where = ino if ref.flags & CHUNK_FLAG_INLINE else None  # a row of the index
        try:
            if host.objects.epochs_of(ref.oid, where) != {current}:
                return True
        except IntegrityError:
            return True
    return False


class RekeyJob:
    """``dcmfs key rotate --finish`` on a mounted store: :func:`rekey_all` on
    a thread of the daemon beside the file operations (a file open or
    changed meanwhile is tried again for up to ``wait`` seconds), then a
    checkpoint, then the epochs the chunks still use (``state["after"]``),
    from which the admin's command destroys the unused keys."""

    def __init__(self, host, wait: float = OPEN_WAIT) -> None:
        self.host, self.wait = host, wait
        self.state = {"running": True, "files_left": 0, "bytes": 0, "epoch": host.objects.epoch}
        self._thread = threading.Thread(target=self._run, daemon=True, name="dcmfs-rekey")
        self._thread.start()

    def status(self) -> dict:
        return dict(self.state)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        from ..errors import loggable

        def progress(left: int, nbytes: int) -> None:
            self.state.update(files_left=left, bytes=nbytes)

        try:
            with self.host.lock, self.host.index.begin() as txn:
                self.state["files_left"] = len({i for i, _, _ in txn.iter_all_chunks()})
            chunks, nbytes, left = rekey_all(self.host, progress, self.wait)
            if self.host.stopping.is_set():
                self.state["error"] = "the store was unmounted before the end"
                return
            self.host.objects.sync()
            with self.host.lock:
                self.host.checkpoint()
            after = {str(k): v for k, v in sorted(epochs_in_use(self.host).items())}
            current = self.host.objects.epoch
            if set(after) <= {str(current)} and (len(self.host.objects.epoch_keys) > 1
                                                  or self.host.index.generation != current):
                # no chunk needs an older epoch: the index side follows, so that
                # the admin's command can destroy them all, epoch 0 too
                self.state["generation"] = self.host.move_generation(current)
            self.state.update(chunks=chunks, bytes=nbytes, after=after, open_left=left)
        except Exception as exc:  # noqa: BLE001 — the admin's command must hear of it
            log.error("rotate --finish failed: %s", loggable(exc))
            self.state["error"] = loggable(exc)
        finally:
            self.state["running"] = False
