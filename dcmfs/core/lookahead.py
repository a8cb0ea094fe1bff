"""The re-encoder's look-ahead (a mixin of
:class:`~dcmfs.core.reencoder.Reencoder`): with parser workers, the next
file's analysis runs while the current file's last band is coded, checked
and committed.

One file at a time, the analysis sat between two files' bands: the daemon
sent a file's first bytes to a worker and waited ~1.2 ms for the plan while
both workers had nothing to do, and after the bands the workers waited for
the daemon's checks and commit.  The look-ahead asks one of the same
workers (no third one: starting it took the cores from the files being
written) once every band of the current file has been handed out, so the
analysis takes the worker the file's first band has freed.  In the daemon
(``-o sandbox=0``) there is no look-ahead: pydicom holds the GIL that the
FUSE threads and the band threads need.

A plan made ahead is used only for the same file in the same state (inode,
generation and chunk table unchanged: the same bytes); anything else
analyses the file again, so a file changed meanwhile, paused, cooled or
dropped from the backlog never gets a stale plan.  A worker that fails on
the file ahead fails for that file, exactly as if it were analysed in turn.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .extents import CommittedReader, extents_layout
from .passes import _fresh


class LookAhead:
    """The look-ahead state of a re-encoder (see the module docstring)."""

    def _init_look_ahead(self) -> None:
        #: (ino, generation, chunk table, reader, future plan) of the file
        #: analysed ahead
        self._ahead: tuple | None = None
        self._ahead_pool = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="dcmfs-reenc-ahead") \
            if self.parsers is not None else None
        #: plans made ahead and used (tests, status)
        self.plans_ahead = 0

    def _stop_look_ahead(self) -> None:
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)  # the pool is closed: it ends at once

    def _planned(self, ino: int, inode, table, reader: CommittedReader):
        """(reader, plan) of this file: the plan made ahead when the file is
        unchanged since (and the reader that read it: its chunk is
        decrypted already), else the file analysed now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:3] == (ino, inode.generation, table):
            plan = ahead[4].result()  # ParserFailure: this file's, as in turn
            self.plans_ahead += 1
            return ahead[3], plan
        if ahead is not None:
            _quietly(ahead[4])
        return reader, self._analyse(reader, inode.size)

    def _look_ahead(self, current: int) -> None:
        """Start the analysis of the file after ``current`` in the backlog
        (called once every band of ``current`` has been handed out)."""
        if self._ahead_pool is None or self._stop.is_set() or self._ahead is not None:
            return
        host = self.host
        with host.lock:
            nxt = next((i for i in self._queue if i != current and i not in self._cooling),
                       None)
            if nxt is None or host.is_open(nxt):
                return
            with host.index.begin() as txn:
                inode = txn.get_inode(nxt)
                if inode is None:
                    return
                table = txn.chunks(nxt)
                content = txn.get_content(nxt)
        if _fresh(content, inode.generation, self.dicom) or extents_layout(table):
            return
        cipher = host.objects.file_cipher(inode.file_id, inode.secret)
        reader = CommittedReader(host.objects, cipher, nxt, inode, table, host.chunk_size)
        self._ahead = (nxt, inode.generation, table, reader,
                       self._ahead_pool.submit(self._analyse, reader, inode.size))


def _quietly(future: Future) -> None:
    """Wait for a plan nobody will use (its worker is back in the pool)."""
    try:
        future.result()
    except Exception:  # noqa: BLE001 — the file is analysed again in its turn
        pass

