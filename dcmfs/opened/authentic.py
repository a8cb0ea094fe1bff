"""Is the opened index the store's own, and as new as this machine saw it?

Two checks when a store's index is opened (docs/security.md, "Index
authenticity and freshness"):

* the records against the sums sealed at the last checkpoint
  (:mod:`dcmfs.index.auth`): a mismatch refuses read-write openings
  (:class:`~dcmfs.errors.IndexNotAuthenticError`) and, read-only, the files
  whose records are in a group that differs give EIO;
* the index and journal against the witness outside the store
  (:mod:`dcmfs.index.witness`): a store older than what this machine saw is
  refused (:class:`~dcmfs.errors.RollbackError`) unless ``accept_rollback``.

A read-write opening then starts the witness at the store's state and seals
the sums of a store that had none (format 3 and older: the upgrade).
"""

from __future__ import annotations

import logging

from ..config import Config
from ..errors import DcmfsError, IndexNotAuthenticError, RollbackError
from ..index import Index, Witness
from ..index.auth import STATE

log = logging.getLogger("dcmfs.store")


def authenticate(index: Index, root: str, config: Config, witness: Witness,
                 tolerate_mismatch: bool = False) -> None:
    """Check ``index`` (just opened) and start the witness; see the module.

    Raises
    ------
    IndexNotAuthenticError, RollbackError
        As above; the caller closes the index.
    StoreIOError
        The witness exists but is damaged (unless ``accept_rollback``).
    """
    try:
        seen = witness.read()
    except DcmfsError:
        if not config.accept_rollback:
            raise
        log.warning("the witness of %s is damaged; accepted (--accept-rollback), it starts "
                    "again from the store", root)
        seen = None
    if index.auth_state == "legacy" and seen is not None:
        # this machine saw the store with sealed sums: they were removed
        index.distrust_all()
    if tolerate_mismatch:
        index.gated = False
        if index.check_all():
            log.warning("the index of %s does not match its sealed checksum in %d groups",
                        root, len(index.suspect))
    elif index.auth_state == "mismatch":
        _not_authentic(index, root, config)
    reach = index.last_journal_seq()
    if seen is not None:
        problem = None
        if index.seq < seen.checkpoint:
            problem = (f"its index holds changes up to number {index.seq}, but this machine "
                       f"saw it at {seen.checkpoint}")
        elif reach < witness.required():
            problem = (f"its journal ends at change {reach}, but this machine saw changes up "
                       f"to {witness.required()} written (the journal was cut)")
        elif (index.seq == seen.checkpoint and index.auth_state == "ok" and seen.digest
              and index.root_digest() != seen.digest):
            problem = f"its index differs from the one this machine saw at change {index.seq}"
        if problem:
            if not config.accept_rollback:
                raise RollbackError(
                    f"The store {root} is older than this machine's witness of it: {problem}; "
                    "it was rolled back or restored from a backup. If that is intended, "
                    "open it with --accept-rollback.")
            log.warning("the store %s is older than its witness (%s); accepted "
                        "(--accept-rollback)", root, problem)
    elif not config.read_only:
        log.info("this machine has not seen the store %s before; its witness starts at "
                 "change %d", root, index.seq)
    if config.read_only:
        return
    if index.auth_state == "legacy":
        log.info("the index of %s gets its sealed checksum (format upgrade)", root)
        index.seal_now()
    witness.start(index.seq, reach, index.root_digest())
    index.witness = witness
    if not index.keyed_dirents and reach == index.seq:  # (after a replay otherwise)
        upgrade_dirents(index, root)


def upgrade_dirents(index: Index, root: str) -> None:
    """Format 4: directory entries keyed by a keyed tag of their directory
    (one journaled operation, then a checkpoint)."""
    n = index.convert_dirents()
    index.checkpoint()
    log.info("the directory entries of %s are keyed by directory tags now (%d entries; "
             "format upgrade)", root, n)


def _not_authentic(index: Index, root: str, config: Config) -> None:
    what = ("its state records" if STATE in index.suspect else
            f"{len(index.suspect)} groups of records")
    if not config.read_only:
        raise IndexNotAuthenticError(
            f"The index of the store {root} does not match its sealed checksum ({what}): "
            "records were added, removed, altered or rolled back without the key. It mounts "
            f"read-only only (affected files give EIO); 'dcmfs verify {root}' names them and "
            f"'dcmfs fsck --rebuild-index {root}' rebuilds the index from the objects.")
    log.error("the index of %s does not match its sealed checksum (%s); files in the "
              "affected groups give EIO", root, what)
