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
unreferenced    objects no index entry names
totals          the store totals (files, logical and stored bytes), and entries
                of other databases that name missing inodes
==============  ==================================================================

Repair never deletes what it cannot prove is garbage.  A damaged file is
moved to ``/lost+found`` with its surviving content (the chunks that cannot
be read are replaced by zeros, and an xattr ``user.dcmfs.fsck`` says which
bytes); a file without a name is linked there; an unreferenced object is
deleted only if it is a superseded version of an intact file, rebuilt into a
file in ``/lost+found`` if it (with its siblings) forms one, and otherwise
moved to ``STORE/quarantine/``.  Without ``--repair`` nothing is written.

``--rebuild-index`` moves the index aside and builds a new one from the
newest sealed snapshot, the archived and live journal records after it, and
the objects themselves (see ``docs/format.md``), then runs the repair.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from typing import Callable

from . import codec as codecs, format as fmt
from .config import Config
from .durable import fsync_dir
from .errors import DcmfsError, IndexDamagedError, IntegrityError
from .index import (JOURNAL_NAME, SEALED, Index, Inode, archive_segments, refuse_if_missing,
                    snapshots)
from .objectstore import ChunkContext, ChunkRef, ObjectDamaged, ObjectStore
from .store import Store, StoreLock, clear_damage_mark
from .verify import check_file, name_paths, stored_size

log = logging.getLogger("dcmfs.fsck")

LOST_FOUND = b"lost+found"


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


class Fsck:
    """One fsck run on an unmounted store (it holds the store lock)."""

    def __init__(self, store: Store, config: Config, repair: bool,
                 progress: Callable[[str], None] = lambda stage: None) -> None:
        self.store = store
        self.config = config
        self.repair = repair
        self.progress = progress
        self.problems: list[Problem] = []
        self.lock = StoreLock(store.root)
        self.objects = ObjectStore(store.root, store.store_id, store.master_key,
                                   codecs.Codecs(config.zstd_level, config.lzma_preset))
        self.index: Index | None = None
        self.cs = store.chunk_size
        #: oid -> its sealed context, or None when it does not authenticate
        self._contexts: dict[bytes, ChunkContext | None] = {}
        self._garbage: list[bytes] = []
        self._now = time.time_ns()

    # --- running ------------------------------------------------------------------
    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        self.objects.close()
        self.lock.release()

    def found(self, check: str, what: str, ino: int = 0, oid: bytes | None = None,
              repaired: str = "") -> Problem:
        p = Problem(check, what, ino, oid.hex() if oid else None,
                    repaired if self.repair else "")
        self.problems.append(p)
        return p

    def open_index(self) -> Index:
        refuse_if_missing(self.store.root)
        return Index(os.path.join(self.store.root, fmt.INDEX_DIR), self.store.master_key,
                     self.store.store_id, self.config.index_map_size,
                     archive_dir=os.path.join(self.store.root, fmt.SNAPSHOTS_DIR))

    def run(self) -> list[Problem]:
        try:
            self.index = self.open_index()
        except (IndexDamagedError, DcmfsError) as exc:
            self.found("index", f"the index cannot be opened ({exc}); run "
                                f"'dcmfs fsck --rebuild-index {self.store.root}'")
            return self.problems
        try:
            for stage in (self.check_leftovers, self.check_index_values, self.check_objects,
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

    def finish(self) -> None:
        ix = self.index
        with ix.begin(write=True) as txn:
            txn.meta_put("state", b"clean")
        self.objects.sync(force=True)
        ix.checkpoint()
        for oid in self._garbage:
            self.objects.delete(oid)
        ix.snapshot(os.path.join(self.store.root, fmt.SNAPSHOTS_DIR))
        clear_damage_mark(self.store.root)

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
            applied, dropped = ix.replay(self._replayed_chunk_ok, commit=self.repair)
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
                        self._garbage += [r.oid for r in txn.delete_inode(ino)]
                    txn.remove_orphan(ino)

    def _replayed_chunk_ok(self, txn, ino: int, idx: int, ref) -> bool:
        inode = txn.get_inode(ino)
        if inode is None:
            return False
        try:
            self.objects.read(self.objects.file_cipher(inode.file_id), inode.file_id, ino,
                              idx, ref)
        except ObjectDamaged:
            return False
        return True

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
        misplaced = {}
        for oid in list(self.objects.iter_oids()):
            try:
                ctx = self.objects.open_context(oid, self._head(oid))
            except ObjectDamaged:
                self._contexts[oid] = None
                continue
            self._contexts[oid] = ctx
            if ctx.oid != oid:
                misplaced[oid] = ctx
        if not misplaced:
            return
        for oid, ctx in misplaced.items():
            self.found("objects", f"object stored as {oid.hex()} is object {ctx.oid.hex()} "
                                  "(swapped or moved)", ctx.ino, oid,
                       repaired=f"moved back to {ctx.oid.hex()}")
        if not self.repair:
            return
        # two phases, so that swapped pairs and cycles come out right
        parking = os.path.join(self.store.root, fmt.QUARANTINE_DIR, ".misplaced")
        os.makedirs(parking, mode=0o700, exist_ok=True)
        for oid in misplaced:
            os.rename(self.objects.path(oid), os.path.join(parking, oid.hex()))
        for oid, ctx in misplaced.items():
            target = self.objects.path(ctx.oid)
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
        shutil.rmtree(parking, ignore_errors=True)

    def _head(self, oid: bytes) -> bytes:
        with open(self.objects.path(oid), "rb") as f:
            return f.read(fmt.OBJ_HEADER_LEN + fmt.TAG_LEN)

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

    def _lost_found(self) -> int:
        with self.index.begin() as txn:
            ino = txn.lookup(fmt.ROOT_INO, LOST_FOUND)
        if ino is not None:
            return ino
        now = self._now
        with self.index.begin(write=True) as txn:
            ino = txn.alloc_ino()
            while txn.get_inode(ino) is not None:
                ino = txn.alloc_ino()
            txn.put_inode(ino, Inode(stat.S_IFDIR | 0o700, 0, 0, 2, 0, now, now, now,
                                     secrets.token_bytes(16)))
            txn.add_dirent(fmt.ROOT_INO, LOST_FOUND, ino)
            root = txn.get_inode(fmt.ROOT_INO)
            root.nlink += 1
            txn.put_inode(fmt.ROOT_INO, root)
        return ino

    def _link_lost(self, ino: int, name: bytes) -> bytes:
        lf = self._lost_found()
        with self.index.begin(write=True) as txn:
            final, n = name, 1
            while txn.lookup(lf, final) is not None:
                n += 1
                final = name + f".{n}".encode()
            txn.add_dirent(lf, final, ino)
            if stat.S_ISDIR(txn.get_inode(ino).mode):
                lf_inode = txn.get_inode(lf)
                lf_inode.nlink += 1
                txn.put_inode(lf, lf_inode)
        return final

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
            if self.repair:
                with ix.begin(write=True) as txn:
                    txn.delete_chunk(ino, idx)

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
            for f in findings:
                self.found("contents", f"{f.kind}: {f.detail}", ino,
                           bytes.fromhex(f.oid) if f.oid else None,
                           repaired="moved to /lost+found, unreadable bytes zeroed")
            if findings and self.repair:
                self._salvage_damaged(ino, inode, table)

    def _salvage_damaged(self, ino: int, inode: Inode, table: dict[int, ChunkRef]) -> None:
        """Keep what can be read, zero what cannot, move the file to /lost+found."""
        cipher = self.objects.file_cipher(inode.file_id)
        gen = inode.generation + 1
        extents = any(r.offset >= 0 for r in table.values())
        new_table: dict[int, ChunkRef] = {}
        lost: list[str] = []
        pieces = ([(i, table[i], table[i].offset, table[i].plain_len)
                   for i in sorted(table, key=lambda i: table[i].offset)] if extents else
                  [(i, table.get(i), i * self.cs, min(self.cs, inode.size - i * self.cs))
                   for i in range(-(-inode.size // self.cs))])
        if extents and (not pieces or pieces[-1][2] + pieces[-1][3] != inode.size):
            # the extents do not cover the file: lay it out in fixed chunks
            # from what can be read
            extents = False
            pieces = [(i, None, i * self.cs, min(self.cs, inode.size - i * self.cs))
                      for i in range(-(-inode.size // self.cs))]
        hasher = hashlib.sha256()
        last = len(pieces) - 1
        for k, (idx, ref, start, length) in enumerate(pieces):
            flags = (fmt.CHUNK_FLAG_LAST if k == last else 0) | \
                (fmt.CHUNK_FLAG_EXTENT if extents else 0)
            plain = None
            if ref is not None:
                try:
                    plain = self.objects.read(cipher, inode.file_id, ino, idx, ref)
                except IntegrityError:
                    plain = None
                if plain is not None and len(plain) == length and ref.flags == flags:
                    new_table[idx] = ref
                    hasher.update(plain)
                    continue
                if plain is not None:
                    plain = plain[:length].ljust(length, b"\0")
            elif k != last:  # a hole reads as zeros
                hasher.update(bytes(length))
                continue
            if plain is None:
                plain = bytes(length)
                lost.append(f"{start}-{start + length - 1}")
            nref = self.objects.write(cipher, inode.file_id, ino, idx, gen, flags,
                                      codecs.ZSTD, plain)
            new_table[idx] = nref._replace(offset=start if extents else -1)
            hasher.update(plain)
        with self.index.begin(write=True) as txn:
            for idx, ref in table.items():
                if new_table.get(idx) != ref:
                    self._named[ref.oid] -= 1
                    if self._named[ref.oid] <= 0:
                        self._quarantine_or_garbage(ref.oid)
                if idx not in new_table:
                    txn.delete_chunk(ino, idx)
            for idx, ref in new_table.items():
                if table.get(idx) != ref:
                    txn.put_chunk(ino, idx, ref)
            fresh = txn.get_inode(ino)
            fresh.generation, fresh.sha256 = gen, hasher.digest()
            fresh.ctime_ns = self._now
            txn.put_inode(ino, fresh)
            note = ("fsck " + time.strftime("%Y-%m-%d %H:%M:%S") + ": "
                    + ("bytes " + ", ".join(lost) + " could not be read and are zeros"
                       if lost else "the chunk table was repaired"))
            txn.set_xattr(ino, b"user.dcmfs.fsck", note.encode())
            names = [(p, n) for p, n, c in txn.iter_dirents() if c == ino]
            for parent, name in names:
                txn.remove_dirent(parent, name)
        name = names[0][1] if names else str(ino).encode()
        self._link_lost(ino, f"{ino}-".encode() + name)
        with self.index.begin(write=True) as txn:
            fresh = txn.get_inode(ino)
            fresh.nlink = 1
            txn.put_inode(ino, fresh)

    def _quarantine_or_garbage(self, oid: bytes) -> None:
        """A damaged object: it cannot be read, but it is not ours to delete."""
        if self._contexts.get(oid, "unknown") is None or os.path.exists(self.objects.path(oid)):
            self.objects.quarantine(oid, self.store.root)

    # --- unreferenced objects -----------------------------------------------------------------
    def check_unreferenced(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            named = {ref.oid for _, _, ref in txn.iter_all_chunks()}
            inodes = dict(txn.iter_inodes())
        present = set(self.objects.iter_oids())
        unknown: dict[tuple[int, bytes], list[ChunkContext]] = collections.defaultdict(list)
        for oid in sorted(present - named):
            if oid not in self._contexts:
                try:
                    self._contexts[oid] = self.objects.open_context(oid, self._head(oid))
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
                if ctx.generation <= inode.generation:
                    self.found("unreferenced", "superseded version of a chunk", ctx.ino, oid,
                               repaired="deleted")
                    if self.repair:
                        self._garbage.append(oid)
                else:
                    self.found("unreferenced", f"newer version (generation {ctx.generation}) "
                                               "than the index knows", ctx.ino, oid,
                               repaired="moved to quarantine")
                    if self.repair:
                        self.objects.quarantine(oid, self.store.root)
                continue
            unknown[(ctx.ino, ctx.file_id)].append(ctx)
        if unknown and self.repair:
            # the objects keep their inode numbers: none may be handed out again
            top = max(ino for ino, _ in unknown) + 1
            with ix.begin(write=True) as txn:
                raw = txn.meta_get("next_ino")
                if raw is None or int.from_bytes(raw, "big") < top:
                    txn.meta_put("next_ino", top.to_bytes(8, "big"))
        for (ino, file_id), ctxs in sorted(unknown.items()):
            taken = ino in inodes
            for ctx in ctxs:
                self.found("unreferenced", "object of a file the index does not know", ino,
                           ctx.oid, repaired="moved to quarantine" if taken else
                           "rebuilt into a file in /lost+found")
            if self.repair:
                if taken or not self._rebuild_file(ino, file_id, ctxs):
                    for ctx in ctxs:
                        self.objects.quarantine(ctx.oid, self.store.root)

    def _rebuild_file(self, ino: int, file_id: bytes, ctxs: list[ChunkContext]) -> bool:
        """Make a file of objects the index does not know (same inode number and
        file id: they are bound into the objects).  False if they do not form one."""
        table = assemble(ctxs, self.cs)
        if table is None:
            return False
        size = max(r.offset + r.plain_len if r.offset >= 0 else i * self.cs + r.plain_len
                   for i, r in table.items())
        gen = max(r.generation for r in table.values())
        cipher = self.objects.file_cipher(file_id)
        hasher = hashlib.sha256()
        try:
            for idx, ref, start, length in _pieces(table, size, self.cs):
                plain = b"" if ref is None else self.objects.read(cipher, file_id, ino, idx, ref)
                hasher.update(plain[:length].ljust(length, b"\0"))
        except IntegrityError:
            return False
        now = self._now
        with self.index.begin(write=True) as txn:
            txn.put_inode(ino, Inode(stat.S_IFREG | 0o600, 0, 0, 1, size, now, now, now,
                                     file_id, gen, hasher.digest()))
            for idx, ref in table.items():
                txn.put_chunk(ino, idx, ref)
        self._link_lost(ino, str(ino).encode())
        return True

    # --- totals and stray entries --------------------------------------------------------------
    def check_totals(self) -> None:
        ix = self.index
        with ix.begin() as txn:
            inodes = dict(txn.iter_inodes())
            files = sum(1 for i in inodes.values() if stat.S_ISREG(i.mode))
            logical = sum(i.size for i in inodes.values() if stat.S_ISREG(i.mode))
            stored = sum(stored_size(r) for _, _, r in txn.iter_all_chunks())
            have = txn.stats()
            stray = []
            for db in ("xattrs", "orphans", "backlog", "content", "scrubbed"):
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
        if have != (files, logical, stored):
            self.found("totals", f"store totals {have} differ from the files "
                                 f"({files}, {logical}, {stored})", repaired="recomputed")
            if self.repair:
                with ix.begin(write=True) as txn:
                    txn.add_stats(files - have[0], logical - have[1], stored - have[2])


def assemble(ctxs: list[ChunkContext], cs: int) -> dict[int, ChunkRef] | None:
    """The newest complete version a set of one file's objects holds, as a
    chunk table; None when no complete version is there."""
    ext = [c for c in ctxs if c.flags & fmt.CHUNK_FLAG_EXTENT]
    fixed = [c for c in ctxs if not c.flags & fmt.CHUNK_FLAG_EXTENT]
    for gen in sorted({c.generation for c in ext}, reverse=True):
        by_idx = {c.index: c for c in ext if c.generation == gen}
        lasts = [i for i, c in by_idx.items() if c.flags & fmt.CHUNK_FLAG_LAST]
        if len(lasts) == 1 and set(by_idx) == set(range(lasts[0] + 1)):
            table, pos = {}, 0
            for i in range(lasts[0] + 1):
                c = by_idx[i]
                table[i] = ChunkRef(c.oid, c.generation, c.codec, c.flags, c.plain_len,
                                    c.stored_len, pos)
                pos += c.plain_len
            return table
    if not fixed:
        return None
    newest: dict[int, ChunkContext] = {}
    for c in sorted(fixed, key=lambda c: c.generation):
        newest[c.index] = c
    lasts = [c for c in newest.values() if c.flags & fmt.CHUNK_FLAG_LAST]
    if not lasts:
        return None
    last = max(lasts, key=lambda c: (c.generation, c.index))
    table = {}
    for i, c in newest.items():
        if i < last.index and c.flags & fmt.CHUNK_FLAG_LAST:
            continue  # the end of an older, shorter version
        if i <= last.index:
            table[i] = ChunkRef(c.oid, c.generation, c.codec, c.flags, c.plain_len,
                                c.stored_len)
    return table


def _pieces(table: dict[int, ChunkRef], size: int, cs: int):
    if any(r.offset >= 0 for r in table.values()):
        for i in sorted(table, key=lambda i: table[i].offset):
            yield i, table[i], table[i].offset, table[i].plain_len
        return
    for i in range(-(-size // cs)):
        yield i, table.get(i), i * cs, min(cs, size - i * cs)


# --- rebuilding the index ------------------------------------------------------------------
def rebuild_index(store: Store, config: Config) -> dict:
    """Move the index aside and build a new one from the newest snapshot that
    opens, the journal records after it and the objects; returns what was
    used.  The caller then runs the repair (:class:`Fsck`) on it."""
    root = store.root
    index_dir = os.path.join(root, fmt.INDEX_DIR)
    snap_dir = os.path.join(root, fmt.SNAPSHOTS_DIR)
    lock = StoreLock(root)
    try:
        aside = None
        if os.path.exists(index_dir):
            aside = os.path.join(root, f"{fmt.INDEX_DIR}.damaged-{time.strftime('%Y%m%d%H%M%S')}")
            os.rename(index_dir, aside)
        used = {"moved_aside": os.path.basename(aside) if aside else None, "snapshot": None,
                "journal_records": 0, "records_after_gap": 0}
        for seq, path in reversed(snapshots(snap_dir)):
            tmp = index_dir + ".new"
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp, 0o700)
            shutil.copyfile(os.path.join(path, "data.mdb"), os.path.join(tmp, "data.mdb"))
            try:
                ix = Index(tmp, store.master_key, store.store_id, config.index_map_size)
                with ix.begin() as txn:
                    ok = txn.meta_get("store_id") == store.store_id
                    list(txn.iter_inodes())
                ix.close()
            except (DcmfsError, Exception):  # noqa: BLE001 — try an older snapshot
                ok = False
            if ok:
                # the journal a test open created there is empty: the records
                # come from the archive and the old journal
                os.remove(os.path.join(tmp, JOURNAL_NAME))
                os.rename(tmp, index_dir)
                used["snapshot"] = os.path.basename(path)
                break
            shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(index_dir, mode=0o700, exist_ok=True)
        ix = Index(index_dir, store.master_key, store.store_id, config.index_map_size,
                   archive_dir=snap_dir)
        try:
            journals = [p for _, p in archive_segments(snap_dir)]
            if aside and os.path.exists(os.path.join(aside, JOURNAL_NAME)):
                journals.append(os.path.join(aside, JOURNAL_NAME))
            applied, skipped = ix.roll_forward(journals)
            used.update(journal_records=applied, records_after_gap=skipped)
            with ix.begin(write=True) as txn:
                txn.meta_put("store_id", store.store_id)
                txn.meta_put("format", str(fmt.FORMAT_VERSION).encode())
            ix.checkpoint()
        finally:
            ix.close()
        fsync_dir(root)
        return used
    finally:
        lock.release()


