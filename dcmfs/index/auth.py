"""Index authenticity: a keyed multiset hash over every record, kept per
group of records and sealed at each checkpoint with the journal sequence
number.

Why: every sealed index value is bound to its database and key, but not to
the index it belongs to, so values copied from an older copy of the index
(the store's own snapshots hold such copies) would open as well, and plain
records (``meta``, ``orphans``, ``backlog``, ``scrubbed``) are not sealed at
all.  Here each record ``(database, key, value as stored)`` is mapped to a
256-bit number by a keyed BLAKE2b (``index-auth`` key, HKDF of the master
key), and the records are summarised by the sums of those numbers modulo
2^256, one sum per *group*:

* the records of inodes ``n`` with the same ``n >> 10`` (1024 consecutive
  inode numbers: every database but ``meta`` and ``dirents`` keys its
  records by the inode number first, so a group's records are one key range
  in each database);
* the directory entries whose key starts with the same 10 bits (keys start
  with a keyed tag of the parent directory, so all entries of one directory
  are in one group);
* the ``meta`` records (the store's state), group :data:`STATE`.

Adding a record adds its number, removing subtracts it, so each change costs
one hash whatever the size of the index (an incremental multiset hash,
MSet-Add-Hash of Clarke et al., with a keyed PRF: without the key nobody can
compute a record's number, so no set of records other than the one sealed
sums to the sealed values).  The sums kept are always the *expected* ones
(the sealed values plus every change since), never recomputed from what is
on disk, so making changes durable never makes foreign records authentic.

Checking is lazy: a group is read and compared the first time a record of
it is read in a session (about 4 000 records, ~15 ms, for a group of 1 024
files), the state group when the index opens, so opening takes the same
time whatever the size of the store; ``verify`` and ``fsck`` check every
group.  A group that differs is refused (EIO) for the session, and the
store is marked as needing fsck.
"""

from __future__ import annotations

import hashlib
import struct

from ..storage import crypto

#: inodes per group: ``ino >> GROUP_BITS`` (64: the files a damaged or
#: foreign record makes unreadable until fsck)
GROUP_BITS = 6
#: directory-entry groups: the first DIRENT_BITS bits of the key
DIRENT_BITS = 16
#: the group of ``meta`` records (the store's state: next inode, mounted, ...)
STATE = (1 << 64) - 1
#: set in the group number of directory-entry groups
DIRENT_FLAG = 1 << 63
#: the root directory's records are a group of their own, so that a group
#: that differs never takes every path with it
ROOT_GROUP = 1 << 62
_ROOT_KEY = (1).to_bytes(8, "big")
#: a directory entry's key: keyed tag of the parent (16) + keyed name tag (16)
KEYED_DIRENT = 32
_MOD = 1 << 256
_MASK = _MOD - 1
#: ``meta`` keys outside the sums: the sealed sums themselves and the
#: sequence number sealed inside them
EXCLUDED = (b"auth", b"journal_seq")
#: the database holding each group's sum (u64 group -> 32 bytes), outside
#: the sums; a multiset hash of its records (the *top*) is sealed instead
SUMS_DB = "sums"
_HEAD = struct.Struct(">4sBQQ32s")
_MAGIC = b"DCMA"
_VERSION = 2
AUTH_KEY = b"auth"


def auth_key(master_key: bytes, store_id: bytes) -> bytes:
    return crypto.derive(master_key, b"index-auth", store_id)


def group_of(db: str, key: bytes) -> int:
    """The group a record counts in."""
    if db == "meta":
        return STATE
    if db == "dirents" and len(key) == KEYED_DIRENT:
        return DIRENT_FLAG | (int.from_bytes(key[:8], "big") >> (64 - DIRENT_BITS))
    if key[:8] == _ROOT_KEY:
        return ROOT_GROUP
    return int.from_bytes(key[:8], "big") >> GROUP_BITS


def key_range(group: int) -> tuple[bytes, bytes, bool]:
    """(first key, end key, directory entries only) of a group other than
    :data:`STATE`: its records are the keys k with first <= k[:8] < end
    in each database (``dirents`` only, for a directory-entry group)."""
    if group == ROOT_GROUP:
        return _ROOT_KEY, (2).to_bytes(8, "big"), False
    if group & DIRENT_FLAG:
        top = group & ((1 << DIRENT_BITS) - 1)
        shift = 64 - DIRENT_BITS
        end = (top + 1) << shift
        return (top << shift).to_bytes(8, "big"), (end.to_bytes(8, "big") if end < 1 << 64
                                                    else b"\xff" * 8 + b"\x00"), True
    return ((group << GROUP_BITS).to_bytes(8, "big"),
            ((group + 1) << GROUP_BITS).to_bytes(8, "big"), False)


class Sums:
    """The per-group sums of one index (absent groups sum to 0), and the
    *top*: the sum over groups of a keyed number of (group, sum), the one
    value sealed in ``meta/auth`` (the group sums themselves are stored in
    the :data:`SUMS_DB` database, so a checkpoint writes only the groups that
    changed, whatever the size of the store)."""

    __slots__ = ("_key", "_bases", "values", "pre", "top")

    def __init__(self, key: bytes, values: dict[int, int] | None = None) -> None:
        self._key = key
        #: a keyed BLAKE2b state per database, copied for each record (half
        #: the cost of keying a new one)
        self._bases: dict[str, object] = {}
        self.values: dict[int, int] = values if values is not None else {}
        #: groups changed since the last :meth:`settle`, with their value then
        self.pre: dict[int, int] = {}
        self.top = self._top()

    @classmethod
    def unsaved(cls, key: bytes, values: dict[int, int]) -> "Sums":
        """Sums none of which is stored yet (made from the records: the next
        checkpoint writes every group)."""
        sums = cls(key)
        for g, v in values.items():
            sums.set(g, v)
        return sums

    def number(self, db: str, key: bytes, value: bytes) -> int:
        """A record's number: keyed BLAKE2b of database, key and value."""
        base = self._bases.get(db)
        if base is None:
            base = self._bases[db] = hashlib.blake2b(db.encode(), key=self._key, digest_size=32)
        h = base.copy()
        h.update(len(key).to_bytes(2, "big") + key + value)
        return int.from_bytes(h.digest(), "big")

    def group_number(self, group: int, value: int) -> int:
        """A group's number in the top (0 for an empty group)."""
        if not value:
            return 0
        return int.from_bytes(hashlib.blake2b(
            b"group" + group.to_bytes(8, "big") + value.to_bytes(32, "big"), key=self._key,
            digest_size=32).digest(), "big")

    def _top(self) -> int:
        return sum(self.group_number(g, v) for g, v in self.values.items()) & _MASK

    def change(self, db: str, key: bytes, old: bytes | None, new: bytes | None) -> None:
        """Account for one record changing from ``old`` to ``new`` (None:
        absent).  A ``meta`` record in :data:`EXCLUDED` is not counted."""
        if db == "meta" and key in EXCLUDED:
            return
        g = group_of(db, key)
        v = self.values.get(g, 0)
        if g not in self.pre:
            self.pre[g] = v
        if old is not None:
            v -= self.number(db, key, old)
        if new is not None:
            v += self.number(db, key, new)
        self._store(g, v & _MASK)

    def _store(self, group: int, value: int) -> None:
        if value:
            self.values[group] = value
        else:
            self.values.pop(group, None)

    def get(self, group: int) -> int:
        return self.values.get(group, 0)

    def set(self, group: int, value: int) -> None:
        if group not in self.pre:
            self.pre[group] = self.get(group)
        self._store(group, value & _MASK)

    def settle(self) -> list[tuple[int, int]]:
        """The groups changed since the last call, with their values (0:
        empty), the top brought up to date."""
        out = []
        top = self.top
        for g, before in self.pre.items():
            now = self.values.get(g, 0)
            if now != before:
                top += self.group_number(g, now) - self.group_number(g, before)
                out.append((g, now))
        self.pre.clear()
        self.top = top & _MASK
        return out

    def digest(self) -> bytes:
        """One 32-byte value for all the sums (the witness keeps it)."""
        return self._top().to_bytes(32, "big") if self.pre else self.top.to_bytes(32, "big")

    def differing(self, other: "Sums") -> list[int]:
        """The groups whose sums differ."""
        return sorted(g for g in set(self.values) | set(other.values)
                      if self.get(g) != other.get(g))

    # --- the sealed record --------------------------------------------------------
    def encode(self, seq: int) -> bytes:
        """The sealed record's plaintext (after :meth:`settle`)."""
        return _HEAD.pack(_MAGIC, _VERSION, seq, len(self.values), self.top.to_bytes(32, "big"))

    @staticmethod
    def decode(raw: bytes) -> tuple[int, int, int]:
        """(sequence number, groups, top) of a sealed record's plaintext.

        Raises ValueError for a record of another layout."""
        magic, version, seq, n, top = _HEAD.unpack(raw)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError("not an index checksum record")
        return seq, n, int.from_bytes(top, "big")


def scan(key: bytes, databases) -> Sums:
    """The sums of every record of ``databases``: (name, iterator of (key,
    value)) pairs, each iterator in key order (one read of the index: the
    inner loop is the cost of ``verify``'s index check, so it is kept lean -
    inode groups are key ranges, so a group's sum is one running total)."""
    values: dict[int, int] = {}
    frombytes = int.from_bytes
    prefixes = {n: n.to_bytes(2, "big") for n in range(0, 600)}
    for db, items in databases:
        if db == SUMS_DB:
            continue
        copy = hashlib.blake2b(db.encode(), key=key, digest_size=32).copy
        current, total = None, 0
        plain_ranges = db not in ("meta", "dirents")
        for k, v in items:
            if plain_ranges:
                g = frombytes(k[:8], "big") >> GROUP_BITS
                if g == 0 and k[:8] == _ROOT_KEY:
                    g = ROOT_GROUP
            elif db == "meta":
                if k in EXCLUDED:
                    continue
                g = STATE
            else:
                g = group_of(db, k)
            h = copy()
            h.update(prefixes.get(len(k)) or len(k).to_bytes(2, "big"))
            h.update(k)
            h.update(v)
            n = frombytes(h.digest(), "big")
            if g == current:
                total += n
            else:
                if current is not None:
                    values[current] = values.get(current, 0) + total
                current, total = g, n
        if current is not None:
            values[current] = values.get(current, 0) + total
    return Sums.unsaved(key, {g: v & _MASK for g, v in values.items() if v & _MASK})


def encode_group(group: int) -> bytes:
    return group.to_bytes(8, "big")
