"""A read-only follower's side of the writer's key changes (issue 18 with
issue 20): the epochs a ``dcmfs key rotate`` adds.

The writer replaces the bucket's copy of the header when its own changed
(:func:`dcmfs.opened.remote.refresh_header`), before it publishes index
parts that may name objects sealed under a new epoch.  A follower on
another machine opened the store with a slot's secret; it keeps that
slot's private key (as it keeps the keys), so at each round it opens the
bucket's header's epochs sealed to its slot and adopts the new ones.

What it trusts: the new header's master key must be one the follower holds
already for that epoch (the store key, or the epoch a finish moved the
master to, adopted at the rotation before), and the header's mac must hold
under it; anyone else can seal keys to a slot's public key, nobody else can
make that mac.  A header the follower cannot check is not used (the round
says why), and a finish that moved the index to a new key generation cannot
be followed by an index copy under the older one: the follower says so
(unmount and ``dcmfs attach --follower`` again).  The follower's own copy
of the header is replaced once its epochs are adopted, so its next mount
opens with them.
"""

from __future__ import annotations

import hmac
import json
import logging
import os

from .. import format as fmt
from ..storage import crypto, slots
from ..storage.backend import BackendMissing
from ..storage.durable import write_file

log = logging.getLogger("dcmfs.follow")


class KeyFollower:
    """Adopts the epochs of the bucket's header into ``objects``."""

    def __init__(self, remote, root: str, store, objects, generation: int) -> None:
        self.remote, self.root, self.store, self.objects = remote, root, store, objects
        self.generation = generation
        with open(os.path.join(root, fmt.HEADER_NAME), "rb") as f:
            self._seen = f.read()

    def refresh(self) -> str | None:
        """One look at the bucket's header: None when nothing is to be done
        (unchanged, or its new epochs adopted), else the sentence saying why
        this follower cannot go on with it."""
        try:
            blob = self.remote.get(fmt.HEADER_NAME)
        except BackendMissing:
            return None
        if blob == self._seen:
            return None
        if self.store.slot_key is None:
            return None  # a single-wrap header: no rotation ever happened
        slot_id, private = self.store.slot_key
        try:
            header = json.loads(blob)
            if bytes.fromhex(header["store_id"]) != self.store.store_id:
                raise ValueError("another store")
            keys = slots.open_epochs(header, private, slot_id)
            master = slots.master_epoch(header)
            known = self.objects.epoch_keys.get(master)
            if known is None or not hmac.compare_digest(known, keys[master]) \
                    or not hmac.compare_digest(header["mac"], slots.header_mac(known, header)):
                raise ValueError("not under a master key this follower holds")
        except KeyError:
            return ("the writer's header no longer seals its keys to the slot this follower "
                    "opened with (the slot was removed or changed): attach it again with a "
                    "current key")
        except (ValueError, TypeError, crypto.AuthenticationFailed):
            return ("the bucket's copy of the store header cannot be checked with the keys "
                    "this follower holds (altered, or a key change it missed): attach it again")
        for epoch in sorted(keys):
            if epoch not in self.objects.epoch_keys:
                self.objects.add_epoch(epoch, keys[epoch])
                log.info("key epochs: the writer rotated; epoch %d adopted", epoch)
        if master != self.generation:
            return ("the writer moved the store to a new key generation (key rotate "
                    "--finish); unmount this follower and run 'dcmfs attach --follower' again")
        write_file(os.path.join(self.root, fmt.HEADER_NAME), blob)  # the next mount's
        self._seen = blob
        return None
