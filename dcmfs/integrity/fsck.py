"""``dcmfs fsck``: check a store's index against itself and its objects, and
repair it (S3QL's recipe: one named check per kind of fault; inject a
fault, the check finds it, ``--repair`` mends it, a full check is clean).

Checks, in order (each problem carries the name of the check that found it):

==============  ==================================================================
leftovers       unclean shutdown: journal records not in the index yet, temp
                files, files unlinked while open
index           every sealed index value authenticates and decodes
objects         every object's sealed context names the object it is stored as
                (a swapped or moved object is put back where it belongs)
namespace       the root; entries name existing inodes in existing directories;
                link counts; files and directories no entry reaches
tables          chunk entries belong to existing files
contents        every file: objects, chunk table, sizes, SHA-256 (``verify``)
unreferenced    objects no index entry names (object files; inline objects, kept in the index)
totals          the store totals (files, logical and stored bytes), and entries
                of other databases that name missing inodes
==============  ==================================================================

Repair never deletes what it cannot prove is garbage (the rules for damaged
files and unnamed objects are in :mod:`dcmfs.integrity.repair`): an unreferenced
object is deleted only if it is an older version of a chunk of a file that
verified intact, or belongs to a file a complete index deleted; a file
without a name is linked into ``/lost+found``.  Without ``--repair`` nothing
is written.  ``--rebuild-index`` (:mod:`dcmfs.integrity.rebuild`) builds a new index
first, then runs the repair.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import stat
import time
from typing import Callable

from .. import format as fmt
from ..storage.durable import fsync_dir
from ..errors import DcmfsError, IndexDamagedError, IntegrityError
from ..index.snapshots import take_snapshot
from ..index import SEALED, Index, Inode
from ..opened.store import OpenedStore
from ..storage.objects import ChunkContext, ObjectDamaged, file_oids, stored_bytes
from . import authentic
from .inline_rows import InlineSalvage
from .repair import Salvage
from .verify import check_file, name_paths

log = logging.getLogger("dcmfs.fsck")



@dataclasses.dataclass
class Problem:
    check: str
    what: str
    ino: int = 0
    oid: str | None = None
    repaired: str = ""
    paths: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Fsck(Salvage, InlineSalvage):
    """One fsck run on an unmounted store (it holds the store lock)."""

    def __init__(self, opened: OpenedStore, repair: bool,
                 progress: Callable[[str], None] = lambda stage: None,
                 index_complete: bool = True) -> None:
        self.opened = opened
        self.store = opened.store
        #: False after a rebuild that could not roll every journal record
        #: forward: the index may lack files and deletions, so objects of
        #: unknown files are rebuilt rather than taken for deleted ones
        self.index_complete = index_complete
        #: files that verified intact before any repair: (generation, table)
        self._intact: dict[int, int] = {}
        self._next_ino0 = fmt.ROOT_INO + 1
        self.config = opened.config
        self.repair = repair
        self.progress = progress
        self.problems: list[Problem] = []
        self.objects = opened.objects
        self.index: Index | None = None
        self.cs = opened.chunk_size
        #: oid -> its sealed context, or None when it does not authenticate
        self._contexts: dict[bytes, ChunkContext | None] = {}
        self._garbage: list[bytes] = []
        #: files whose objects came back incomplete or not at all (their
        #: inline objects lost with the index): the repair is not clean
        self.unrecovered: list[int] = []
        self._now = time.time_ns()

    # --- running ------------------------------------------------------------------
    def close(self) -> None:
        """Close the index (the next pass opens it afresh); the opened store
        stays open."""
        self.opened.close_index()

    def found(self, check: str, what: str, ino: int = 0, oid: bytes | None = None,
              repaired: str = "") -> Problem:
        p = Problem(check, what, ino, oid.hex() if oid else None,
                    repaired if self.repair else "")
        self.problems.append(p)
        return p

    def open_index(self) -> Index:
        return self.opened.index or self.opened.open_index(tolerate_mismatch=True)

    def run(self) -> list[Problem]:
        try:
            self.index = self.open_index()
        except (IndexDamagedError, DcmfsError) as exc:
            self.found("index", f"the index cannot be opened ({exc}); run "
                                f"'dcmfs fsck --rebuild-index {self.store.root}'")
            return self.problems
        self._accept: set[int] = set()
        if self.index.suspect:
            self.check_checksum()
        try:
            for stage in (self.check_leftovers, self.check_packs, self.check_index_values,
                          self.check_objects,
                          self.check_namespace, self.check_tables, self.check_contents,
                          self.check_unreferenced, self.check_totals):
                self.progress(stage.__name__.replace("check_", ""))
                stage()
        except (IndexDamagedError, IntegrityError) as exc:
            self.found("index", f"the index is damaged ({exc}); run "
                                f"'dcmfs fsck --rebuild-index {self.store.root}'")
            return self.problems
        if self.repair:
            self.finish()
        self._name_problems()
        return self.problems

    def check_checksum(self) -> None:
        """The index differs from its sealed checksum: differences no damaged
        record explains are named and stop the repair (see
        :mod:`dcmfs.integrity.authentic`)."""
        bad = authentic.unexplained(self.index)
        for ino, what in authentic.problems(self.index, bad):
            self.found(authentic.CHECKSUM, what, ino)
        if not bad:
            # damaged records explain every difference: they are repaired one
            # by one, then what the groups hold is their new sum
            self._accept = set(self.index.suspect)
        elif self.repair:
            self.repair = False
            self.found(authentic.CHECKSUM, "nothing was repaired: the index holds records "
                       "that are not its own; rebuild it with 'dcmfs fsck --rebuild-index "
                       f"{self.store.root}'")

    def finish(self) -> None:
        ix = self.index
        with ix.begin(write=True) as txn:
            txn.meta_put("state", b"clean")
        if self._accept:
            ix.accept(self._accept)
        self.objects.sync(force=True)
        ix.checkpoint()
        for oid in self._garbage:
            self.objects.delete(oid)
        take_snapshot(ix, os.path.join(self.store.root, fmt.SNAPSHOTS_DIR))

    def _name_problems(self) -> None:
        with self.index.begin() as txn:
            names = name_paths(txn, {p.ino for p in self.problems if p.ino})
        for p in self.problems:
            p.paths = names.get(p.ino, [])

    # --- leftovers of an unclean shutdown ---------------------------------------------
    def check_leftovers(self) -> None:
        ix = self.index
        self.objects.sync(force=True)
        pending = sum(1 for _ in ix.journal.records(ix.seq))
        if pending:
            applied, dropped = ix.replay(self.opened.chunk_intact, commit=self.repair)
            self.found("leftovers", f"the journal held {pending} operations not yet in the "
                                    f"index (unclean shutdown): {applied} apply, {dropped} "
                                    "name objects that never reached the disk",
                       repaired="replayed")
        for path in list(self.objects.iter_temps()):
            self.found("leftovers", f"temp file {os.path.basename(path)} of an interrupted "
                                    "write", repaired="removed")
            if self.repair:
                os.unlink(path)
        with ix.begin() as txn:
            orphans = txn.orphans()
        for ino in orphans:
            self.found("leftovers", "file unlinked while open at an unclean shutdown", ino,
                       repaired="purged")
            if self.repair:
                with ix.begin(write=True) as txn:
                    inode = txn.get_inode(ino)
                    if inode is not None:
                        self._garbage += file_oids(txn.delete_inode(ino))
                    txn.remove_orphan(ino)

    # --- index values ---------------------------------------------------------------------
    def check_index_values(self) -> None:
        ix = self.index
        for db in SEALED:
            bad = []
            for key, raw in list(ix.raw_items(db)):
                try:
                    value = ix.open(db, bytes(key), bytes(raw))
                    if db == "inodes":
                        Inode.decode(value)
                except (IntegrityError, ValueError, Exception) as exc:  # noqa: BLE001
                    bad.append((bytes(key), exc))
            for key, exc in bad:
                ino = int.from_bytes(key[:8], "big") if len(key) >= 8 else 0
                self.found("index", f"{db} entry {key.hex()} does not authenticate or "
                                    "decode", ino, repaired="removed (what it held is "
                                                            "recovered by the checks below)")
                if self.repair:
                    with ix.begin(write=True) as txn:
                        txn._delete(db, key)

    # --- objects in the wrong place ------------------------------------------------------
    def check_objects(self) -> None:
        parking = os.path.join(self.store.root, fmt.QUARANTINE_DIR, ".misplaced")
        if self.repair and os.path.isdir(parking):  # an interrupted earlier repair
            for name in os.listdir(parking):
                oid = bytes.fromhex(name)
                os.makedirs(self.objects.dir_of(oid), mode=0o700, exist_ok=True)
                if not os.path.exists(self.objects.path(oid)):
                    os.rename(os.path.join(parking, name), self.objects.path(oid))
        with self.index.begin() as txn:
            raw = txn.meta_get("next_ino")
        self._next_ino0 = int.from_bytes(raw, "big") if raw else fmt.ROOT_INO + 1
        misplaced = {}
        for oid in list(self.objects.iter_oids()):
            try:
                ctx = self.objects.context_of(oid)
            except ObjectDamaged:
                self._contexts[oid] = None
                continue
            self._contexts[oid] = ctx
            if ctx.oid != oid:
                misplaced[oid] = ctx
        top = max([c.ino for c in self._contexts.values() if c is not None]
                  + [self._inline_top()])  # (inline objects keep theirs too)
        if self.repair and top >= self._next_ino0:
            # objects keep their inode numbers: /lost+found or a salvaged file
            # must never be given one of them
            with self.index.begin(write=True) as txn:
                txn.meta_put("next_ino", (top + 1).to_bytes(8, "big"))
        if not misplaced:
            return
        for oid, ctx in misplaced.items():
            self.found("objects", f"object stored as {oid.hex()} is object {ctx.oid.hex()} "
                                  "(swapped or moved)", ctx.ino, oid,
                       repaired=f"moved back to {ctx.oid.hex()}")
        if not self.repair:
            return
        # two phases, so that swapped pairs and cycles come out right
        os.makedirs(parking, mode=0o700, exist_ok=True)
        for oid in misplaced:
            self.objects.forget_kept(oid)  # (one fsck's own reads kept: see storage.keptfds)
            os.rename(self.objects.path(oid), os.path.join(parking, oid.hex()))
        for oid, ctx in misplaced.items():
            target = self.objects.path(ctx.oid)
            self.objects.forget_kept(ctx.oid)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            if os.path.exists(target):  # a second copy: keep it out of the way
                os.rename(os.path.join(parking, oid.hex()),
                          os.path.join(self.store.root, fmt.QUARANTINE_DIR, oid.hex()))
                continue
            os.rename(os.path.join(parking, oid.hex()), target)
            fsync_dir(os.path.dirname(target))
        for oid, ctx in misplaced.items():
            self._contexts.pop(oid, None)
        for oid, ctx in misplaced.items():
            self._contexts[ctx.oid] = ctx
        os.rmdir(parking)  # empty now; never removed with anything in it

    # --- the namespace ------------------------------------------------------------------------
    def check_namespace(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            inodes = dict(txn.iter_inodes())
            dirents = list(txn.iter_dirents())
            orphans = set(txn.orphans())
        if fmt.ROOT_INO not in inodes or not stat.S_ISDIR(inodes[fmt.ROOT_INO].mode):
            self.found("namespace", "the root directory is missing", fmt.ROOT_INO,
                       repaired="made anew")
            if self.repair:
                self._make_root()
                inodes[fmt.ROOT_INO] = self._inode(fmt.ROOT_INO)
        links: dict[int, list[tuple[int, bytes]]] = collections.defaultdict(list)
        for parent, name, child in dirents:
            if child not in inodes or parent not in inodes \
                    or not stat.S_ISDIR(inodes[parent].mode):
                why = ("names a missing inode" if child not in inodes else
                       "is in a missing directory or a file")
                self.found("namespace", f"directory entry {why}", child,
                           repaired="removed")
                if self.repair:
                    with ix.begin(write=True) as txn:
                        txn.remove_dirent(parent, name)
                continue
            if stat.S_ISDIR(inodes[child].mode) and links[child]:
                self.found("namespace", "a directory has a second name", child,
                           repaired="second name removed")
                if self.repair:
                    with ix.begin(write=True) as txn:
                        txn.remove_dirent(parent, name)
                continue
            links[child].append((parent, name))
        for ino, inode in sorted(inodes.items()):
            if ino != fmt.ROOT_INO and not links[ino] and ino not in orphans:
                self.found("namespace", "no directory entry names this "
                           + ("directory" if stat.S_ISDIR(inode.mode) else "file"), ino,
                           repaired="linked into /lost+found")
                if self.repair:
                    self._link_lost(ino, str(ino).encode())
        # link counts, from the entries as they are now
        with ix.begin() as txn:
            inodes = dict(txn.iter_inodes())
            entries = collections.Counter()
            subdirs = collections.Counter()
            for parent, _, child in txn.iter_dirents():
                if child in inodes:
                    entries[child] += 1
                    if stat.S_ISDIR(inodes[child].mode):
                        subdirs[parent] += 1
        for ino, inode in sorted(inodes.items()):
            want = 2 + subdirs[ino] if stat.S_ISDIR(inode.mode) else entries[ino]
            if ino in orphans or inode.nlink == want:
                continue
            self.found("namespace", f"link count {inode.nlink}, {want} entries", ino,
                       repaired=f"set to {want}")
            if self.repair:
                with ix.begin(write=True) as txn:
                    fresh = txn.get_inode(ino)
                    fresh.nlink = want
                    txn.put_inode(ino, fresh)

    def _inode(self, ino: int) -> Inode | None:
        with self.index.begin() as txn:
            return txn.get_inode(ino)

    def _make_root(self) -> None:
        now = self._now
        with self.index.begin(write=True) as txn:
            txn.put_inode(fmt.ROOT_INO, Inode(stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now,
                                              secrets.token_bytes(16)))
            txn.meta_put("format", str(fmt.FORMAT_VERSION).encode())
            txn.meta_put("store_id", self.store.store_id)

    # --- chunk tables ------------------------------------------------------------------------
    def check_tables(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            known = {ino: inode for ino, inode in txn.iter_inodes()}
            entries = list(txn.iter_all_chunks())
        stray = [(ino, idx) for ino, idx, _ in entries
                 if ino not in known or not stat.S_ISREG(known[ino].mode)]
        # every object belongs to exactly one chunk entry (objects are never shared)
        owners = collections.defaultdict(list)
        for ino, idx, ref in entries:
            owners[ref.oid].append((ino, idx))
        for oid, names in owners.items():
            for ino, idx in names[1:]:
                self.found("tables", f"chunk {idx} names an object that chunk "
                                     f"{names[0][1]} of inode {names[0][0]} names too", ino,
                           oid, repaired="left to the contents check (the object's context "
                                         "says which entry is right)")
        for ino, idx in stray:
            self.found("tables", f"chunk {idx} belongs to no file", ino,
                       repaired="entry removed (its object is salvaged below)")
            if self.repair:  # (an inline object it names stays: salvaged as a file's)
                with ix.begin(write=True) as txn:
                    txn.delete_chunk(ino, idx, keep_inline=True)

    # --- contents --------------------------------------------------------------------------------
    def check_contents(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            files = [(ino, inode) for ino, inode in txn.iter_inodes()
                     if stat.S_ISREG(inode.mode)]
            #: how many chunk entries name each object: a damaged file's object
            #: that another entry still names is not moved away
            self._named = collections.Counter(r.oid for _, _, r in txn.iter_all_chunks())
        for ino, inode in files:
            with ix.begin() as txn:
                table = txn.chunks(ino)
            findings = check_file(self.objects, ino, inode, table, self.cs)
            if not findings:
                self._intact[ino] = inode.generation
                continue
            restored = None
            if self.repair:
                restored = ("restored from its own unreferenced objects; the SHA-256 matches"
                            if self._restore(ino, inode, table) else
                            "replaced by the newer complete version its objects hold (the "
                            "index had lost it; no checksum to compare)"
                            if self._adopt_newer(ino, inode, table) else None)
            for f in findings:
                self.found("contents", f"{f.kind}: {f.detail}", ino,
                           bytes.fromhex(f.oid) if f.oid else None,
                           repaired=restored or "moved to /lost+found, unreadable bytes zeroed")
            if self.repair and not restored:
                self._salvage_damaged(ino, inode, table)

    def check_packs(self) -> None:
        """S3 stores: packs the map does not know (storage.packcache.sweep_packs)."""
        remote = self.opened.remote
        for pack, alone in remote.sweep_packs(self.repair) if remote is not None else ():
            self.found("unreferenced", f"{pack} is not in the pack map", repaired=(
                f"taken into it ({alone} objects)" if alone else "deleted (copies only)"))

    # --- unreferenced objects -----------------------------------------------------------------
    def check_unreferenced(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            named = {ref.oid for _, _, ref in txn.iter_all_chunks()}
            inodes = dict(txn.iter_inodes())
        unknown = self.check_inline_rows(inodes)  # (those of missing inodes)
        present = set(self.objects.iter_oids())
        for oid in sorted(present - named):
            if oid not in self._contexts:
                try:
                    self._contexts[oid] = self.objects.context_of(oid)
                except ObjectDamaged:
                    self._contexts[oid] = None
            ctx = self._contexts[oid]
            if ctx is None or ctx.oid != oid:
                self.found("unreferenced", "object does not authenticate", 0, oid,
                           repaired="moved to quarantine")
                if self.repair:
                    self.objects.quarantine(oid, self.store.root)
                continue
            inode = inodes.get(ctx.ino)
            if inode is not None and inode.file_id == ctx.file_id:
                if ctx.ino in self._intact and ctx.generation <= self._intact[ctx.ino]:
                    # the file verified intact (its SHA-256 is in the sealed
                    # index) without this object: an older version of a chunk
                    self.found("unreferenced", "superseded version of a chunk of an intact "
                                               "file", ctx.ino, oid, repaired="deleted")
                    if self.repair:
                        self._garbage.append(oid)
                else:
                    self.found("unreferenced", f"object of a damaged file or a newer version "
                                               f"(generation {ctx.generation}) than the index "
                                               "knows", ctx.ino, oid,
                               repaired="moved to quarantine")
                    if self.repair:
                        self.objects.quarantine(oid, self.store.root)
                continue
            if self.index_complete and not self._index_damaged() \
                    and ctx.ino < self._next_ino0 and ctx.ino not in inodes:
                # a complete index handed this inode number out and removed
                # the file: the object is what a crash kept from its deletion
                self.found("unreferenced", "object of a deleted file", ctx.ino, oid,
                           repaired="deleted")
                if self.repair:
                    self._garbage.append(oid)
                continue
            unknown[(ctx.ino, ctx.file_id)].append(ctx)
        for (ino, file_id), ctxs in sorted(unknown.items()):
            taken = ino in inodes
            rebuilt = self.repair and not taken and self._rebuild_file(ino, file_id, ctxs)
            for ctx in ctxs:  # (a file whose secret is gone with its history does not open)
                self.found("unreferenced", "object of a file the index does not know", ino,
                           ctx.oid, repaired="rebuilt into a file in /lost+found" if rebuilt
                           else "moved to quarantine")
            self._drop_unsalvaged(ino, ctxs, rebuilt)

    def _index_damaged(self) -> bool:
        return any(p.check == "index" for p in self.problems)

    # --- totals and stray entries --------------------------------------------------------------
    def check_totals(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            inodes = dict(txn.iter_inodes())
            files = sum(1 for i in inodes.values() if stat.S_ISREG(i.mode))
            logical = sum(i.size for i in inodes.values() if stat.S_ISREG(i.mode))
            refs = [r for _, _, r in txn.iter_all_chunks()]
            stored = sum(stored_bytes(r) for r in refs)
            # version-1 objects have 16 header bytes fewer than the size the
            # totals count them at since they were written: either is right
            stored_v1 = stored - (fmt.OBJ_HEADER_LEN - fmt.OBJ1_HEADER_LEN) * len(refs)
            have = txn.stats()
            stray = []
            # (inline objects of missing inodes: salvaged by check_unreferenced)
            for db in ("xattrs", "orphans", "backlog", "content", "scrubbed", "deidview"):
                for key, _ in list(ix.raw_items(db)):
                    if int.from_bytes(bytes(key[:8]), "big") not in inodes:
                        stray.append((db, bytes(key)))
            raw = txn.meta_get("next_ino")
            next_ino = int.from_bytes(raw, "big") if raw else fmt.ROOT_INO + 1
        for db, key in stray:
            self.found("totals", f"{db} entry of a missing inode",
                       int.from_bytes(key[:8], "big"), repaired="removed")
            if self.repair:
                with ix.begin(write=True) as txn:
                    txn._delete(db, key)
        if inodes and next_ino <= max(inodes):
            self.found("totals", f"next inode number {next_ino} is in use",
                       repaired=f"set to {max(inodes) + 1}")
            if self.repair:
                with ix.begin(write=True) as txn:
                    txn.meta_put("next_ino", (max(inodes) + 1).to_bytes(8, "big"))
        if have[:2] != (files, logical) or not stored_v1 <= have[2] <= stored:
            self.found("totals", f"store totals {have} differ from the files "
                                 f"({files}, {logical}, {stored})", repaired="recomputed")
            if self.repair:
                with ix.begin(write=True) as txn:
                    txn.add_stats(files - have[0], logical - have[1], stored - have[2])
