"""The index's history on disk: sealed snapshots and archived journal
segments in ``snapshots/`` (what an index rebuild starts from), and the
policy that a used store whose index file is gone is never opened with an
empty index."""

from __future__ import annotations

import os
import shutil

import lmdb

from .. import format as fmt
from ..storage.durable import fsync_dir
from ..errors import IndexDamagedError, StoreIOError
from .schema import JOURNAL_NAME


def _numbered(directory: str | None, prefix: str) -> list[tuple[int, str]]:
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            out.append((int(name[len(prefix):]), os.path.join(directory, name)))
    return sorted(out)


def snapshots(directory: str | None) -> list[tuple[int, str]]:
    """(journal sequence number, path) of the index snapshots, oldest first."""
    return _numbered(directory, fmt.SNAPSHOT_PREFIX)


def legacy_snapshots(directory: str | None) -> list[tuple[int, str]]:
    return _numbered(directory, fmt.LEGACY_SNAPSHOT_PREFIX)


def archive_segments(directory: str | None) -> list[tuple[int, str]]:
    """(last sequence number, path) of the archived journal segments, in order."""
    return _numbered(directory, fmt.ARCHIVE_PREFIX)


def archived_bytes(directory: str | None) -> int:
    """Bytes of journal segments kept since the oldest snapshot."""
    return sum(os.path.getsize(p) for _, p in archive_segments(directory))


def take_snapshot(index, snapshots_dir: str, keep: int = 2) -> str:
    """Durably copy the index (compacted) to ``snapshots_dir/index-<seq>``.

    Call it right after a checkpoint (no batch open).  The copy holds the
    same sealed values as the index, so it reveals nothing more; it is
    where an index rebuild starts, followed by the journal records after
    ``seq`` (archive segments, then the live journal).  The ``keep``
    newest copies stay, and the archive segments they still need.
    """
    os.makedirs(snapshots_dir, mode=0o700, exist_ok=True)
    final = os.path.join(snapshots_dir, f"{fmt.SNAPSHOT_PREFIX}{index.seq:016d}")
    if not os.path.exists(final):
        tmp = os.path.join(snapshots_dir, f".tmp-{index.seq:016d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o700)
        try:
            index.env.copy(tmp, compact=True)
            with open(os.path.join(tmp, "data.mdb"), "rb+") as f:
                os.fsync(f.fileno())
            os.rename(tmp, final)
            fsync_dir(snapshots_dir)
        except (OSError, lmdb.Error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreIOError(f"Writing an index snapshot failed: {exc}.") from exc
    kept = snapshots(snapshots_dir)[-keep:]
    for seq, path in snapshots(snapshots_dir)[:-keep] + legacy_snapshots(snapshots_dir):
        shutil.rmtree(path, ignore_errors=True)
    oldest = kept[0][0] if kept else 0
    for last, path in archive_segments(snapshots_dir):
        if last <= oldest:  # every record in it is in the oldest kept snapshot
            os.unlink(path)
    if keep == 1:  # a shred pass: what was removed must stay removed
        fsync_dir(snapshots_dir)
    return final


def refuse_if_missing(store_root: str) -> None:
    """Raise :class:`IndexDamagedError` if a store that has been used has no
    index file: opening it read-write would start an empty index and every
    file would seem gone (the objects are all still there)."""
    index_dir = os.path.join(store_root, fmt.INDEX_DIR)
    if os.path.exists(os.path.join(index_dir, "data.mdb")):
        return
    objects = os.path.join(store_root, fmt.OBJECTS_DIR)
    used = (os.path.isdir(objects) and bool(os.listdir(objects))) \
        or bool(snapshots(os.path.join(store_root, fmt.SNAPSHOTS_DIR))) \
        or os.path.exists(os.path.join(index_dir, JOURNAL_NAME))
    if used:
        raise IndexDamagedError(
            f"The index of the store {store_root} is missing (index/data.mdb) although the "
            f"store holds data; rebuild it with 'dcmfs fsck --rebuild-index {store_root}'.")
