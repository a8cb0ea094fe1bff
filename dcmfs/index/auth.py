"""Index authenticity: a keyed multiset hash over every record, sealed at
each checkpoint with the journal sequence number.

Why: every sealed index value is bound to its database and key, but not to
the index it belongs to, so values copied from an older copy of the index
(the store's own snapshots hold such copies) would open as well, and plain
records (``meta``, ``orphans``, ``backlog``, ``scrubbed``) are not sealed at
all.  Here each record ``(database, key, value as stored)`` is mapped to a
256-bit number by a keyed BLAKE2b (``index-auth`` key, HKDF of the master
key), and the index is summarised by the sums of those numbers modulo 2^256,
one sum per *group*: the records of inode ``n`` (every database but
``meta`` keys its records by an inode number first) are in group
``n mod GROUPS``; ``meta`` is group ``GROUPS``.  Adding a record adds its
number, removing subtracts it, so each change costs one hash, whatever the
size of the index (an incremental multiset hash, MSet-Add-Hash of Clarke et
al. with a keyed PRF: without the key nobody can compute a record's number,
so no set of records other than the one sealed sums to the sealed values).

At every checkpoint the sums are sealed (AES-GCM-SIV, index key) with the
sequence number of the last journal record they include, in ``meta/auth``
(the one record outside the sums, with ``meta/journal_seq``).  Opening the
index reads every record once and compares: any record added, removed,
altered, spliced in from an older index or rolled back makes its group's sum
differ.  The groups say where: the files of a differing group are refused
(EIO), the others are served (read-only), and ``dcmfs verify`` names them.

Cost: one BLAKE2b of the record and one old-value lookup per index change; a
full check reads the index once (measured in docs/format.md).
"""

from __future__ import annotations

import hashlib
import struct

from ..storage import crypto

#: groups the sums are kept in (records of inode n are in group n % GROUPS)
GROUPS = 1024
#: the group of ``meta`` records (the store's state: next inode, mounted, ...)
STATE = GROUPS
_MOD = 1 << 256
_MASK = _MOD - 1
#: ``meta`` keys outside the sums: the sealed sums themselves and the
#: sequence number sealed inside them
EXCLUDED = (b"auth", b"journal_seq")
_HEAD = struct.Struct(">4sBQI")
_MAGIC = b"DCMA"
_VERSION = 1
AUTH_KEY = b"auth"


def auth_key(master_key: bytes, store_id: bytes) -> bytes:
    return crypto.derive(master_key, b"index-auth", store_id)


def group_of(db: str, key: bytes) -> int:
    """The group a record counts in (None for a record outside the sums)."""
    if db == "meta":
        return STATE
    return int.from_bytes(key[:8], "big") % GROUPS


class Sums:
    """The per-group sums of one index, kept up to date change by change."""

    __slots__ = ("_key", "values")

    def __init__(self, key: bytes, values: list[int] | None = None) -> None:
        self._key = key
        self.values = values if values is not None else [0] * (GROUPS + 1)

    def number(self, db: str, key: bytes, value: bytes) -> int:
        """A record's number: keyed BLAKE2b of database, key and value."""
        h = hashlib.blake2b(db.encode(), key=self._key, digest_size=32)
        h.update(len(key).to_bytes(2, "big"))
        h.update(key)
        h.update(value)
        return int.from_bytes(h.digest(), "big")

    def change(self, db: str, key: bytes, old: bytes | None, new: bytes | None) -> None:
        """Account for one record changing from ``old`` to ``new`` (None:
        absent).  A ``meta`` record in :data:`EXCLUDED` is not counted."""
        if db == "meta" and key in EXCLUDED:
            return
        g = group_of(db, key)
        v = self.values[g]
        if old is not None:
            v -= self.number(db, key, old)
        if new is not None:
            v += self.number(db, key, new)
        self.values[g] = v & _MASK

    def copy(self) -> "Sums":
        return Sums(self._key, list(self.values))

    def digest(self) -> bytes:
        """One 32-byte value for all the sums (the witness keeps it)."""
        h = hashlib.blake2b(b"dcmfs-index-root", key=self._key, digest_size=32)
        for v in self.values:
            h.update(v.to_bytes(32, "big"))
        return h.digest()

    def differing(self, other: "Sums") -> list[int]:
        """The groups whose sums differ."""
        return [g for g, (a, b) in enumerate(zip(self.values, other.values)) if a != b]

    # --- the sealed record --------------------------------------------------------
    def encode(self, seq: int) -> bytes:
        return (_HEAD.pack(_MAGIC, _VERSION, seq, len(self.values))
                + b"".join(v.to_bytes(32, "big") for v in self.values))

    @classmethod
    def decode(cls, key: bytes, raw: bytes) -> tuple[int, "Sums"]:
        """(sequence number, sums) of a sealed record's plaintext.

        Raises ValueError for a record of another layout."""
        magic, version, seq, n = _HEAD.unpack_from(raw)
        if magic != _MAGIC or version != _VERSION or n != GROUPS + 1 \
                or len(raw) != _HEAD.size + 32 * n:
            raise ValueError("not an index checksum record")
        body = memoryview(raw)[_HEAD.size:]
        values = [int.from_bytes(body[i * 32:(i + 1) * 32], "big") for i in range(n)]
        return seq, cls(key, values)


def scan(key: bytes, items) -> Sums:
    """The sums of every record ``items`` yields as (database, key, value)."""
    sums = Sums(key)
    values = sums.values
    blake = hashlib.blake2b
    groups, state = GROUPS, STATE
    last_db, prefix = None, None
    for db, k, v in items:
        if db == "meta":
            if k in EXCLUDED:
                continue
            g = state
        else:
            g = int.from_bytes(k[:8], "big") % groups
        if db is not last_db:
            last_db, prefix = db, db.encode()
        h = blake(prefix, key=key, digest_size=32)
        h.update(len(k).to_bytes(2, "big"))
        h.update(k)
        h.update(v)
        values[g] += int.from_bytes(h.digest(), "big")
    for g, v in enumerate(values):
        values[g] = v & _MASK
    return sums
