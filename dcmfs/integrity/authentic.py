"""What verify and fsck say about an index that does not match its sealed
checksum (:mod:`dcmfs.index.auth`).

A group of records differs from its sealed sum when a record in it was
damaged (it then fails its own seal, and fsck repairs it record by record),
or when records were added, removed, replaced or rolled back by someone
without the key (each still opens: only the sum tells).  The second kind is
*unexplained*: no record-level repair can tell the genuine records from the
foreign ones, so fsck names the files and leaves the repair to
``--rebuild-index`` (which trusts only the objects and the sealed journal).
"""

from __future__ import annotations

from ..errors import IntegrityError
from ..index import SEALED, Index
from ..index.auth import STATE, group_of

#: the kind (verify) and check (fsck) name of these findings
CHECKSUM = "index checksum"
FILE_WHAT = ("records of this file were added, removed, replaced or rolled back without the "
             "key (each opens, the index's sealed checksum does not match)")
STATE_WHAT = ("the store's state records (next inode number, mounted state, totals) do not "
              "match the index's sealed checksum")


def unexplained(index: Index) -> set[int]:
    """The differing groups that hold no record failing its own seal."""
    explained = set()
    for db in SEALED + ("meta",):
        for key, raw in index.raw_items(db):
            key = bytes(key)
            if db == "meta" and key != b"damage":
                continue
            g = group_of(db, key)
            if g not in index.suspect or g in explained:
                continue
            try:
                index.open(db, key, bytes(raw))
            except IntegrityError:
                explained.add(g)
    return set(index.suspect) - explained


def files_in(index: Index, groups: set[int]) -> tuple[list[int], set[int]]:
    """The inodes whose records are counted in ``groups`` (a directory for
    the group of its entries too), and the groups that named one."""
    out, named = [], set()
    for key, _ in index.raw_items("inodes"):
        ino = int.from_bytes(bytes(key[:8]), "big")
        hit = {ino_group(ino), dirent_group(index, ino)} & groups
        if hit:
            out.append(ino)
            named |= hit
    return out, named


def ino_group(ino: int) -> int:
    return group_of("inodes", ino.to_bytes(8, "big"))


def dirent_group(index: Index, ino: int) -> int:
    """The group of a directory's entries."""
    key = (index.parent_tag(ino) if index.keyed_dirents else ino.to_bytes(8, "big"))
    return group_of("dirents", key + bytes(16))


def problems(index: Index, groups: set[int]) -> list[tuple[int, str]]:
    """(inode or 0, what) for each file, and the state, in ``groups``."""
    inos, named = files_in(index, groups)
    out = [(ino, FILE_WHAT) for ino in inos]
    for g in sorted(groups - {STATE} - named):
        out.append((0, f"records of group {g} (of files that no longer exist) were added, "
                       "removed, replaced or rolled back without the key"))
    if STATE in groups:
        out.append((0, STATE_WHAT))
    return out
