"""The write-back cache's side of packs (:mod:`dcmfs.storage.packs`): objects
uploaded several to one S3 object, fetched by ranged GETs, a pack rewritten
without its deleted objects, and the map rebuilt from the bucket.

A mixin of :class:`~dcmfs.storage.cache.CachedBackend`, which holds the
lock (``_cv``), the books (``_pending``, ``_lru``, ``counts``) and the
retrying (``_retrying``) these use.
"""

from __future__ import annotations

import logging
import os
import time

from .backend import BackendMissing
from .packs import PACK_BYTES, PACK_OBJECTS, PACKS, TABLE_GUESS, PackMap, Where, build, \
    new_pack_name, parse_table, table_size
from ..errors import StoreIOError

log = logging.getLogger("dcmfs.s3")

_UPLOADED_MODE = 0o400
#: a GET ahead spans at most this much of a pack (objects between the wanted
#: ones come along: the next files of a series were written together)
FETCH_SPAN = 2 << 20


def oid_of(name: str) -> bytes | None:
    leaf = name.rsplit("/", 1)[-1]
    try:
        return bytes.fromhex(leaf) if len(leaf) == 32 else None
    except ValueError:
        return None


class PackedCache:
    """Needs ``packs`` (a :class:`PackMap` or None: no packs), ``pack_uploads``
    (new uploads go into packs), ``remote``, ``cache`` and the books of
    :class:`~dcmfs.storage.cache.CachedBackend`."""

    packs: PackMap | None
    pack_uploads: bool

    # --- where an object is -------------------------------------------------------
    def _where(self, name: str) -> Where | None:
        if self.packs is None:
            return None
        oid = oid_of(name)
        return self.packs.where(oid) if oid else None

    def _remote_get(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        """An object's bytes ``[start, end)`` from the bucket: a ranged GET
        of its pack, or the object itself (stores without packs).  A pack
        missing is asked about once more: the map may name another pack
        by now (this writer's own rewrite of it, between the look-up and
        the GET), else it is read from the bucket again (a follower, whose
        writer rewrote it)."""
        for attempt in (0, 1):
            where = self._where(name)
            if where is None:
                with self._cv:
                    self.counts["gets"] += 1
                return self.remote.get(name, start, end)
            stop = where.length if end is None else min(end, where.length)
            if stop <= start:
                return b""
            try:
                with self._cv:
                    self.counts["gets"] += 1
                return self.remote.get(where.pack, where.offset + start, where.offset + stop)
            except BackendMissing:
                if attempt or (self._where(name) == where and not self.refresh_packs()):
                    raise
        raise AssertionError("unreachable")

    # --- uploads ------------------------------------------------------------------
    def _more_puts(self, names: list[str], size: int) -> None:
        """Under the lock: add other puts to ``names`` (a pack), in queue
        order, up to :data:`PACK_BYTES` / :data:`PACK_OBJECTS`: every object
        waiting in the ordinary queue (due or not: nothing is likely to
        replace them, and waiting for each to be due made packs of one or
        two objects), and of the objects held for the re-encoder those due."""
        now = time.monotonic()
        hurry = self._hurry or self._pending_bytes * 2 > self.cache_size
        for queue, all_of_it in ((self._queue, True), (self._held, hurry)):
            while queue and len(names) < PACK_OBJECTS and size < PACK_BYTES:
                op, name, due = queue[0]
                if op != "put" or (due > now and not all_of_it):
                    break
                queue.popleft()
                if name in self._pending and name not in self._in_flight \
                        and name not in names:
                    names.append(name)
                    size += self._pending[name]

    def _upload_pack(self, names: list[str]) -> None:
        """Upload the cached objects ``names`` as one pack; record where each
        is before they count as uploaded."""
        members = []
        for name in names:
            try:
                members.append((name, self.cache.get(name)))
            except BackendMissing:  # deleted meanwhile: nothing to upload
                self._drop_pending(name)
        if not members:
            return
        blob, table = build([(oid_of(name), data) for name, data in members])
        pack, lost = self._put_pack(blob, table, "not uploaded")
        if lost:  # packs holding older copies (a PUT before a crash): rewritten or deleted
            with self._cv:
                self._dirty |= lost
        for name, data in members:
            try:
                os.chmod(self.cache.path(name), _UPLOADED_MODE)
            except FileNotFoundError:
                pass
        self._uploaded([name for name, _ in members], len(blob))

    def _put_pack(self, blob: bytes, table, fenced: str) -> tuple[str, set[str]]:
        """PUT a pack (retried as long as the mount lives) and record its
        ``table`` in the map (synced: only then are its objects "in the
        bucket"); returns its name, taken at the attempt that went through
        (:func:`~dcmfs.storage.packs.new_pack_name`), and the packs that
        lost objects to it.  Until the map has it, its name is in
        ``_putting``: a sweep of the bucket (:meth:`sweep_packs`) that
        lists it meanwhile must not take it for a pack the map lost."""
        name: list[str] = []
        tried: list[str] = []

        def put() -> None:
            if self.fence.is_set():
                raise StoreIOError(f"another writer holds the lease; {fenced}")
            name[:] = [new_pack_name(self.packs.newest())]
            with self._cv:
                self._putting.add(name[0])
            tried.append(name[0])
            self.remote.put(name[0], blob)
        try:
            self._retrying(put)
            return name[0], self.packs.add(name[0], table)
        finally:
            with self._cv:
                self._putting.difference_update(tried)

    # --- deletes ------------------------------------------------------------------
    def _remove(self, name: str) -> None:
        """(Under ``_pack_lock``.)  The bucket's copy of a deleted object goes: a loose object is
        deleted; a packed one leaves the map, and its pack is deleted once
        it holds nothing named, or rewritten without it (:meth:`_repack`)
        when no other delete is due."""
        oid = oid_of(name) if self.packs is not None else None
        dropped = self.packs.drop(oid) if oid else None
        if dropped is None:
            self._retrying(lambda: self.remote.delete(name))
            return
        with self._cv:
            self._dirty.add(dropped[0])

    def _repack_due(self) -> bool:
        """Under the lock, as a delete ends: is it the last of a run, with
        packs to rewrite (one rewrite per pack for a whole file or study)?
        Claims the rewrite if so."""
        others_running = self._deletes_waiting - len(self._later)
        others_due = self._later and (self._hurry or self._later[0][2] <= time.monotonic())
        if not self._dirty or self._repacking or others_running or others_due:
            return False
        self._repacking += 1
        return True

    def _repack_dirty(self) -> None:
        """Rewrite or delete the packs that lost objects (claimed by
        :meth:`_repack_due`); a pack that fails stays for the next run."""
        try:
            while True:
                with self._cv:
                    dirty, self._dirty = self._dirty, set()
                if not dirty:
                    return
                with self._pack_lock:
                    for pack in sorted(dirty):
                        try:
                            self._repack(pack)
                        except BackendMissing:  # gone from the bucket: verify names
                            log.warning("%s is missing from the bucket; it is not rewritten "
                                        "('dcmfs verify' names the files it held)", pack)
                            self.packs.clean(pack)
                        except StoreIOError as exc:  # abandoned at close
                            with self._cv:
                                self._dirty |= {p for p in dirty if p >= pack}
                            if not self._abandon.is_set():
                                log.warning("rewriting a pack failed: %s", exc)
                            return
        finally:
            with self._cv:
                self._repacking -= 1
                self._cv.notify_all()

    def _repack(self, pack: str) -> None:
        live = self.packs.members(pack)
        if live:
            members = []
            for oid, offset, length in sorted(live, key=lambda e: e[1]):
                name = f"objects/{oid.hex()[:2]}/{oid.hex()}"
                try:
                    data = self.cache.get(name)
                except BackendMissing:
                    data = self._retrying_get(pack, offset, offset + length)
                members.append((oid, data))
            blob, table = build(members)
            self._put_pack(blob, table, "not repacked")
            self.counts["repacks"] += 1
        self._retrying(lambda: self.remote.delete(pack))
        self.packs.forget(pack)
        self.counts["pack_deletes"] += 1

    def _retrying_get(self, name: str, start: int, end: int) -> bytes:
        out: list[bytes] = []
        self._retrying(lambda: out.append(self.remote.get(name, start, end)))
        return out[0]

    # --- fetching ahead ------------------------------------------------------------
    def _group(self, name: str, queued: list[str]) -> list[str]:
        """``name`` and the queued names one GET of its pack brings along
        (within :data:`FETCH_SPAN` of it)."""
        where = self._where(name)
        if where is None:
            return [name]
        out = [name]
        lo, hi = where.offset, where.offset + where.length
        for other in queued:
            w = self._where(other)
            if w is None or w.pack != where.pack:
                continue
            if max(hi, w.offset + w.length) - min(lo, w.offset) <= FETCH_SPAN:
                lo, hi = min(lo, w.offset), max(hi, w.offset + w.length)
                out.append(other)
        return out

    def _download_many(self, names: list[str]) -> None:
        """Fetch ``names`` (one pack, :meth:`_group`) with one GET into the cache."""
        spots = [(self._where(n), n) for n in names]
        if len(names) == 1 or any(w is None for w, _ in spots):
            for name in names:
                self._download(name)
            return
        lo = min(w.offset for w, _ in spots)
        hi = max(w.offset + w.length for w, _ in spots)
        with self._cv:
            self.counts["gets"] += 1
        try:
            span = self.remote.get(spots[0][0].pack, lo, hi)
        except BackendMissing:  # rewritten meanwhile (a follower): one by one
            for name in names:
                self._download(name)
            return
        for w, name in spots:
            self._cache_fetched(name, span[w.offset - lo:w.offset - lo + w.length])

    # --- the map from the bucket -----------------------------------------------------
    def refresh_packs(self) -> int:
        """Read the tables of the packs in the bucket the map does not know
        (all of them for a fresh map; else those uploaded since the newest
        known, less 10 minutes of clock skew); returns how many were added."""
        if self.packs is None:
            return 0
        known = self.packs.packs()
        after = None
        if known and not self.packs.fresh:
            newest = max(known)[len(PACKS):len(PACKS) + 16]
            after = PACKS + f"{max(0, int(newest, 16) - 600_000):016x}"
        listing = getattr(self.remote, "list_after", None)
        names = listing(PACKS, after) if listing and after else self.remote.list(PACKS)
        added = 0
        for pack in names:
            if pack in known or len(pack) != len(PACKS) + 32:
                continue
            table = self._table(pack)
            if table is not None:
                self.packs.add(pack, table)
                added += 1
        if self.packs.fresh:
            self.packs.mark_complete()
        return added

    def _table(self, pack: str) -> list[tuple[bytes, int, int]] | None:
        """A pack's table from the bucket; None if it is gone or no pack."""
        try:
            head = self.remote.get(pack, 0, TABLE_GUESS)
            need = table_size(head)
            if len(head) < need:
                head = self.remote.get(pack, 0, need)
            return parse_table(head, self.remote.head(pack))
        except BackendMissing:
            return None  # deleted meanwhile
        except ValueError as exc:
            log.warning("%s in the bucket is not a pack dcmfs reads (%s); skipped", pack, exc)
            return None

    def sweep_packs(self, apply: bool) -> list[tuple[str, int]]:
        """The packs in the bucket the map does not know (one listing of them
        all: a crash between a pack's PUT and the map's write that no
        opening's listing found), with how many of their objects the map has
        in no other pack.  ``apply`` (the writer, ``fsck --repair``): a pack
        whose objects all sit in other packs is deleted; another is taken
        into the map for the objects it alone holds (fsck then checks them
        as any object) and marked dirty if it holds others."""
        if self.packs is None:
            return []
        known, out = self.packs.packs(), []
        for pack in list(self.remote.list(PACKS)):
            if pack in known or len(pack) != len(PACKS) + 32:
                continue
            with self._cv:  # put meanwhile: being recorded, or recorded (in this order)
                putting = pack in self._putting
            if putting or self.packs.knows(pack):
                continue
            table = self._table(pack)
            if table is None:
                continue
            alone = [e for e in table if self.packs.where(e[0]) is None]
            out.append((pack, len(alone)))
            if apply and alone:
                self.packs.add(pack, alone)
                if len(alone) < len(table):
                    self.packs.mark_dirty(pack)
            elif apply:
                self._retrying(lambda: self.remote.delete(pack))
                self.counts["pack_deletes"] += 1
        return out
