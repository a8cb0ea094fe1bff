"""The index's side of :mod:`dcmfs.index.auth`: the expected sums, the
sealed record, and the checks of groups against what the index holds
(lazily, group by group, or all at once for verify and fsck).

:class:`Checked` is a part of :class:`dcmfs.index.index.Index`; it uses
its environment (``env``, ``dbs``), its sealing (``open``, ``seal``) and its
sequence number.
"""

from __future__ import annotations

import struct

import lmdb

from ..errors import IntegrityError
from . import auth
from .schema import DATABASES


class Checked:
    """Authenticity of an index's records (a part of ``Index``)."""

    def _init_checks(self, master_key: bytes, store_id: bytes) -> None:
        self._auth_key = auth.auth_key(master_key, store_id)
        #: the expected sums: the sealed ones plus every change since (None:
        #: a read-only index of a store without sums - nothing to check)
        self.sums: auth.Sums | None = None
        #: "ok" (no group found differing so far), "legacy" (no sealed sums:
        #: a store of format 3 or older), "mismatch" (see :attr:`suspect`)
        self.auth_state = "ok"
        #: groups found to match in this session
        self.verified: set[int] = set()
        #: True once every group matched (or the sums were made from the
        #: records: a store being upgraded)
        self.verified_all = False
        #: groups found to differ: their records are refused (EIO)
        self.suspect: set[int] = set()
        #: False: reads of groups that differ are not refused (fsck reads
        #: every record to name and repair what it can)
        self.gated = True
        #: called with a group the first time it is found to differ (the
        #: opened store marks the store as needing fsck)
        self.on_mismatch = lambda group: None
        #: changes of the last :meth:`_apply` (database, key, old, new)
        self._applied: list = []

    # --- the sealed record ----------------------------------------------------------
    def sealed_top(self) -> tuple[int, int, int] | None:
        """(sequence number, groups, top) of the committed ``meta/auth``
        record; None if there is none.

        Raises
        ------
        IntegrityError
            The record does not authenticate or does not decode.
        """
        with self.env.begin() as txn:
            raw = txn.get(auth.AUTH_KEY, db=self.dbs["meta"])
        if raw is None:
            return None
        plain = self.open("meta", auth.AUTH_KEY, raw)
        try:
            return auth.Sums.decode(plain)
        except (ValueError, struct.error) as exc:
            raise IntegrityError("index entry meta/auth does not decode") from exc

    def _stored_sums(self) -> auth.Sums:
        """The group sums as the ``sums`` database holds them (committed)."""
        values = {}
        db = self.dbs[auth.SUMS_DB]
        if db is not None:
            with self.env.begin() as txn:
                for k, v in txn.cursor(db=db):
                    if len(k) == 8 and len(v) == 32:
                        values[int.from_bytes(k, "big")] = int.from_bytes(v, "big")
        return auth.Sums(self._auth_key, values)

    def _reset_sums(self, seq: int | None = None) -> str:
        """Take the expected sums from the committed records (sealed at
        journal record ``seq``, default the index's); returns the state that
        implies ("ok", "legacy" or "mismatch")."""
        try:
            sealed = self.sealed_top()
        except IntegrityError:
            sealed = (-1, 0, 0)
        if sealed is None:
            self.sums = None if self.read_only else self.scan_sums()
            self.verified_all = self.sums is not None  # made from the records
            return "legacy"
        sealed_seq, count, top = sealed
        sums = self._stored_sums()
        if sealed_seq != (self._seq if seq is None else seq) or count != len(sums.values) \
                or top != sums.top:
            # sums of another checkpoint, or altered: nothing matches
            self.sums = auth.Sums(self._auth_key)
            return "mismatch"
        self.sums = sums
        return "ok"

    def _write_sums(self, batch: lmdb.Transaction) -> bytes:
        """Write the groups changed since the last checkpoint into the
        ``sums`` database of ``batch``; returns the sealed record's value."""
        if self.sums is None:
            self.sums = self.scan_sums(batch)
        db = self.dbs[auth.SUMS_DB]
        for g, value in self.sums.settle():
            key = auth.encode_group(g)
            if value:
                batch.put(key, value.to_bytes(32, "big"), db=db)
            else:
                batch.delete(key, db=db)
        return self.seal("meta", auth.AUTH_KEY, self.sums.encode(self._seq))

    def _load_sums(self, check: bool) -> None:
        """Read the sealed sums, check the state group and, with ``check``,
        every group."""
        self.auth_state = self._reset_sums()
        if self.auth_state == "legacy":
            return
        if self.auth_state == "mismatch":
            self.suspect.add(auth.STATE)
        if check:
            self.check_all()
        else:
            self.check_group(auth.STATE)

    def scan_sums(self, txn: lmdb.Transaction | None = None) -> auth.Sums:
        """The sums of every record as the index holds them (one read of the
        whole index)."""
        own = txn is None
        txn = txn or self.env.begin()
        try:
            return auth.scan(self._auth_key, [
                (name, txn.cursor(db=self.dbs[name]).iternext())
                for name in DATABASES if self.dbs[name] is not None and name != auth.SUMS_DB])
        finally:
            if own:
                txn.abort()

    def distrust_all(self) -> None:
        """Expect nothing (the sealed sums were removed from an index that
        had them): every group that holds a record differs."""
        self.sums, self.verified_all = auth.Sums(self._auth_key), False
        self.verified.clear()
        self.suspect.add(auth.STATE)
        self.auth_state = "mismatch"

    # --- checks -----------------------------------------------------------------------
    def _actual(self, txn: lmdb.Transaction, group: int) -> int:
        """The sum of the records ``txn`` sees in ``group``."""
        sums = self.sums
        total = 0
        if group == auth.STATE:
            for k, v in txn.cursor(db=self.dbs["meta"]):
                if k not in auth.EXCLUDED:
                    total += sums.number("meta", k, v)
            return total
        first, end, dirents_only = auth.key_range(group)
        for name in (("dirents",) if dirents_only else DATABASES):
            db = self.dbs[name]
            if name in ("meta", auth.SUMS_DB) or db is None:
                continue
            cur = txn.cursor(db=db)
            if not cur.set_range(first):
                continue
            for k, v in cur:
                if k[:8] >= end:
                    break
                if auth.group_of(name, k) == group:
                    total += sums.number(name, k, v)
        return total

    def check_group(self, group: int, txn: lmdb.Transaction | None = None,
                    pending: list = ()) -> bool:
        """Does ``group`` match its expected sum?  Checked once a session;
        ``txn`` is the transaction reading (default: the batch or a read
        transaction) and ``pending`` its changes not yet counted."""
        if self.sums is None or self.verified_all or group in self.verified:
            return True
        if group in self.suspect:
            return False
        own = txn is None
        if own:
            txn = self.env.begin() if self.read_only or self._batch is None else self._batch
        try:
            actual = self._actual(txn, group)
        finally:
            if own and txn is not self._batch:
                txn.abort()
        sums = self.sums
        for db, key, old, new in pending:
            if auth.group_of(db, key) == group and not (db == "meta" and key in auth.EXCLUDED):
                if new is not None:
                    actual -= sums.number(db, key, new)
                if old is not None:
                    actual += sums.number(db, key, old)
        if actual % (1 << 256) == sums.get(group):
            self.verified.add(group)
            return True
        self.suspect.add(group)
        self.auth_state = "mismatch"
        self.on_mismatch(group)
        return False

    def check_all(self) -> list[int]:
        """Check every group at once (one read of the index); returns the
        groups that differ."""
        if self.sums is None:
            return []
        txn = self.env.begin() if self.read_only or self._batch is None else self._batch
        try:
            actual = self.scan_sums(txn)
        finally:
            if txn is not self._batch:
                txn.abort()
        differing = [g for g in actual.differing(self.sums) if g not in self.suspect]
        self.suspect.update(differing)
        for g in differing:
            self.on_mismatch(g)
        if self.suspect:
            self.auth_state = "mismatch"
        else:
            self.verified_all = True
        return sorted(self.suspect)

    def accept(self, groups) -> None:
        """Take what the index holds in ``groups`` as authentic (fsck, after
        it repaired the damaged records that explained their differences)."""
        txn = self._parent()
        for g in groups:
            self.sums.set(g, self._actual(txn, g))
            self.suspect.discard(g)
            self.verified.add(g)
        if not self.suspect:
            self.auth_state = "ok"

    def _count(self, changes) -> None:
        """Add committed changes (database, key, old, new) to the sums."""
        if self.sums is None:
            return
        for name, key, old, new in changes:
            self.sums.change(name, key, old, new)

    # --- for the session ----------------------------------------------------------------
    def seal_now(self) -> None:
        """Seal the sums now (a store that had none): a checkpoint of an
        otherwise empty batch."""
        self._parent()
        self.checkpoint()
        if self.auth_state == "legacy":
            self.auth_state = "ok"

    def last_journal_seq(self) -> int:
        """The sequence number of the last intact journal record (the index's
        own if the journal holds nothing after it)."""
        last = self._seq
        for seq, _ in self.journal.records(self._seq):
            last = seq
        return last

    def root_digest(self) -> bytes:
        """One value for the expected sums (the witness keeps it)."""
        if self.sums is None:
            self.sums = self.scan_sums()
        return self.sums.digest()
