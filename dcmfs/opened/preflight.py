"""Checks before a store is opened: the lock, the damage marks (the file
and the index's sealed copy), the image codecs."""

from __future__ import annotations

import os

from .. import format as fmt
from ..config import Config
from ..errors import DcmfsError, StoreDamagedError, StoreLockedError
from ..index import index_key, read_damage
from ..index.snapshots import refuse_if_missing
from ..storage.codec import Codecs
from ..storage.header import Store, plain, read_lock_pid, refuse_if_damaged


def preflight(store: Store, config: Config, lock_free: bool = True) -> None:
    """The checks a store must pass before it is opened for a session.

    Raises
    ------
    IndexDamagedError
        A used store lost its index (``dcmfs fsck --rebuild-index``).
    StoreDamagedError
        Read-write, and the store is marked as needing fsck.
    CodecUnavailableError
        Read-write with the DICOM re-encoder, and an image codec is missing.
    StoreLockedError
        ``lock_free`` and another process holds the store.
    """
    refuse_if_missing(store.root)
    if lock_free:
        pid = read_lock_pid(store.root)
        if pid is not None:
            raise StoreLockedError(f"The store {store.root} is already in use by dcmfs pid "
                                   f"{pid}.")
    if not config.read_only:
        refuse_if_damaged(store)
        refuse_if_damaged_in_index(store)
        if config.dicom:  # the re-encoder's image codecs must be there
            Codecs.of(config).check_image_codecs()


def refuse_if_damaged_in_index(store: Store) -> None:
    """Raise :class:`StoreDamagedError` if the index says the store is
    damaged although ``STORE/needs-fsck`` is gone (deleted by someone who
    could write the store but has no key: the index's record is sealed)."""
    path = os.path.join(store.root, fmt.INDEX_DIR)
    try:
        key = index_key(path, store)[1]
    except DcmfsError:
        return  # the opening that follows reports it
    info = read_damage(path, key, store.store_id)
    if info is None:
        return
    root = store.root
    what = (f"since {plain(info.get('since', '?'))} ({plain(info.get('reason', '?'))})" if info
            else "by a record that does not authenticate")
    raise StoreDamagedError(
        f"The store {root} is marked as damaged in its index {what}, but its mark file "
        f"{fmt.DAMAGE_MARK} is missing (deleted?); it mounts read-only only (-o ro) until "
        f"you run 'dcmfs fsck {root}' (and 'dcmfs fsck --repair {root}' if that finds "
        "damage).")
