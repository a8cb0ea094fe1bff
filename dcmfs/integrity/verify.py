"""Verification: prove that every file reads back as it was written.

For one file :func:`check_file` authenticates and decodes every chunk (or
extent) from disk - never from a cache - checks each object's sealed context
against the index (file, position, generation, codec, lengths, last-chunk
flag), checks that the chunk table covers exactly the file's size, checks
each fixed-layout chunk against its digest and the file's content against
its digest in the index (:mod:`dcmfs.storage.digest`).  What is wrong is
reported as :class:`Finding` records in a fixed vocabulary (missing object,
failed authentication, wrong length, swapped or moved, rolled back, checksum
mismatch, chunk table, ...) with inode numbers and object ids only; the CLI
turns inode numbers into paths on the admin's terminal.

:class:`Verifier` runs it over many files, in the daemon (``dcmfs verify`` on
a mounted store, the background scrubber) or on an unmounted store.  It
holds the core's lock only to read a file's index entries, so the mount goes
on serving meanwhile; a file that is open with unsaved changes is skipped,
and a finding on a file that changed while it was read is re-checked.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ..errors import IntegrityError
from .. import format as fmt
from ..format import CHUNK_FLAG_LAST
from ..opened.jobs import JobHost
from . import authentic
from ..storage.digest import block_digest, hasher_for
from ..storage.objects import ChunkRef, ObjectDamaged, ObjectStore

CHECKSUM = "checksum mismatch"
TABLE = "chunk table"
SIZE = "wrong size"
INDEX = "index entry"
ORPHAN_OBJECT = "orphan object"
UNNAMED = "no name"
UNREADABLE = "unreadable"


@dataclasses.dataclass
class Finding:
    """One thing wrong with one file (or, ``ino`` 0, with the store)."""

    ino: int
    kind: str
    detail: str
    oid: str | None = None
    #: the file's path(s), filled in by the caller for the admin only
    paths: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def damaged_files(self) -> list[int]:
        return sorted({f.ino for f in self.findings if f.ino})

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "skipped_busy": self.skipped,
                "seconds": round(self.seconds, 3), "damaged_files": len(self.damaged_files),
                "findings": [f.as_dict() for f in self.findings]}


def layout(ino: int, size: int, table: dict[int, ChunkRef],
           chunk_size: int) -> tuple[list[tuple[int, ChunkRef | None, int, int]], list[Finding]]:
    """The pieces that make up the file, in order: (index, ref or None for a
    hole, file offset, length), and what is wrong with the table itself."""
    problems = []
    pieces = []
    if any(r.offset >= 0 for r in table.values()):  # extents (DICOM-coded)
        order = sorted(table, key=lambda i: table[i].offset)
        pos = 0
        for k, idx in enumerate(order):
            ref = table[idx]
            if ref.offset != pos:
                problems.append(Finding(ino, TABLE, f"extent {idx} starts at {ref.offset}, "
                                                    f"expected {pos}"))
            if bool(ref.flags & CHUNK_FLAG_LAST) != (k == len(order) - 1):
                problems.append(Finding(ino, TABLE, f"extent {idx} has a wrong last-chunk "
                                                    "flag"))
            pieces.append((idx, ref, ref.offset, ref.plain_len))
            pos = ref.offset + ref.plain_len
        if pos != size:
            problems.append(Finding(ino, SIZE, f"extents end at {pos}, the file size is {size}"))
        return pieces, problems
    count = -(-size // chunk_size)
    for idx in sorted(i for i in table if i >= count):
        problems.append(Finding(ino, TABLE, f"chunk {idx} lies past the end of the file",
                                table[idx].oid.hex()))
    for idx in range(count):
        want = min(chunk_size, size - idx * chunk_size)
        ref = table.get(idx)
        last = idx == count - 1
        if ref is None:
            if last:
                problems.append(Finding(ino, TABLE, f"last chunk {idx} is missing "
                                                    "(truncated?)"))
            pieces.append((idx, None, idx * chunk_size, want))
            continue
        if bool(ref.flags & CHUNK_FLAG_LAST) != last:
            problems.append(Finding(ino, TABLE, f"chunk {idx} has a wrong last-chunk flag",
                                    ref.oid.hex()))
        # shorter is fine: the rest of the chunk reads as zeros (a file grown
        # by truncate); longer is not
        if ref.plain_len > want:
            problems.append(Finding(ino, SIZE, f"chunk {idx} holds {ref.plain_len} bytes, its "
                                               f"place {want}", ref.oid.hex()))
        pieces.append((idx, ref, idx * chunk_size, want))
    return pieces, problems


def check_file(objects: ObjectStore, ino: int, inode, table: dict[int, ChunkRef],
               chunk_size: int, pool: ThreadPoolExecutor | None = None,
               window: int = 2) -> list[Finding]:
    """Everything wrong with one regular file (empty list: intact)."""
    pieces, findings = layout(ino, inode.size, table, chunk_size)
    for idx, ref in table.items():
        if ref.generation > inode.generation:
            findings.append(Finding(ino, TABLE, f"chunk {idx} is generation {ref.generation}, "
                                                f"newer than its file ({inode.generation})",
                                    ref.oid.hex()))
    cipher = objects.file_cipher(inode.file_id, inode.secret)
    hasher = hasher_for(inode, chunk_size)
    damaged = False

    def load(piece):
        idx, ref, _, want = piece
        if ref is None:
            return None, None  # a hole
        try:
            return None, objects.read(cipher, inode.file_id, ino, idx, ref)
        except ObjectDamaged as exc:
            return Finding(ino, exc.kind, f"chunk {idx}: {exc.what}", ref.oid.hex()), b""
        except IntegrityError as exc:
            return Finding(ino, UNREADABLE, f"chunk {idx}: {exc}", ref.oid.hex()), b""

    results = _ordered(pool, load, pieces, window)
    for (idx, ref, _, want), (problem, plain) in zip(pieces, results):
        if problem is not None:
            findings.append(problem)
            damaged = True
            continue  # the digest cannot match any more: not reported twice
        if plain is None:
            hasher.zeros(want)  # a hole costs nothing to check
            continue
        if ref.digest is not None and ref.offset < 0 and block_digest(plain) != ref.digest:
            findings.append(Finding(ino, CHECKSUM, f"chunk {idx} does not match its digest in "
                                                   "the index", ref.oid.hex()))
            damaged = True
        hasher.update(plain[:want])
        if len(plain) < want:
            hasher.zeros(want - len(plain))
    if not damaged and inode.digest is not None and hasher.digest() != inode.digest:
        findings.append(Finding(ino, CHECKSUM, "the content does not match the file's "
                                               "digest in the index"))
    return findings


def _ordered(pool, fn, items, window: int):
    """``map(fn, items)`` on ``pool`` with at most ``window`` in flight, in order
    (bounded memory: a 10 GiB file is never held whole)."""
    if pool is None:
        for item in items:
            yield fn(item)
        return
    queue: collections.deque = collections.deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= window:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


class Verifier:
    """Verifies files of one opened store.

    ``lock`` is the core's lock (held only to read a file's index entries);
    ``busy(ino)`` says whether a file is open with changes not committed yet
    (it is skipped: its committed version is about to be replaced).
    """

    def __init__(self, index, objects: ObjectStore, chunk_size: int,
                 lock: threading.RLock | None = None,
                 busy: Callable[[int], bool] = lambda ino: False, workers: int = 2) -> None:
        self.index = index
        self.objects = objects
        self.chunk_size = chunk_size
        self._lock = lock or threading.RLock()
        self._busy = busy
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dcmfs-verify")
        self.workers = workers
        #: inode records the last :meth:`files` found not authentic
        self.bad_inodes: list[Finding] = []

    @classmethod
    def of(cls, host: JobHost) -> "Verifier":
        """A verifier of the store ``host`` serves (mounted or not)."""
        return cls(host.index, host.objects, host.chunk_size, host.lock,
                   busy=host.has_uncommitted)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- what to verify ---------------------------------------------------------
    def files(self, sample: float | None = None, inos: Iterable[int] | None = None,
              seed: int | None = None) -> list[tuple[int, int]]:
        """(ino, size) of the regular files to verify: all, the given ones, or
        a random ``sample`` fraction."""
        self.bad_inodes: list[Finding] = []
        with self._lock, self.index.begin(gated=False) as txn:
            if inos is None:
                out = []
                for ino, inode in txn.iter_inodes_checked():
                    if isinstance(inode, IntegrityError):
                        self.bad_inodes.append(Finding(ino, INDEX, str(inode)))
                    elif stat.S_ISREG(inode.mode):
                        out.append((ino, inode.size))
            else:
                out = []
                for ino in inos:
                    inode = txn.get_inode(ino)
                    if inode is not None and stat.S_ISREG(inode.mode):
                        out.append((ino, inode.size))
        if sample is not None and sample < 1.0 and out:
            rng = random.Random(seed)
            out = rng.sample(out, max(1, round(len(out) * sample)))
            out.sort()
        return out

    # --- one file ------------------------------------------------------------------
    def check(self, ino: int) -> list[Finding] | None:
        """Findings for one file; None if it is busy or gone."""
        for attempt in range(3):
            with self._lock:
                if self._busy(ino):
                    return None
                try:
                    with self.index.begin(gated=False) as txn:
                        inode = txn.get_inode(ino)
                        table = txn.chunks(ino) if inode is not None else {}
                except IntegrityError as exc:
                    return [Finding(ino, INDEX, str(exc))]
            if inode is None:
                return None
            findings = check_file(self.objects, ino, inode, table, self.chunk_size,
                                  self._pool, self.workers)
            if not findings:
                return findings
            with self._lock:  # changed while we read it (rewritten, re-encoded)?
                with self.index.begin(gated=False) as txn:
                    now = txn.get_inode(ino)
                    if now is None:
                        return None
                    if now.generation == inode.generation and txn.chunks(ino) == table:
                        return findings
            time.sleep(0.05 * (attempt + 1))
        return None  # changed under every read: busy, not damaged (next round)

    def run(self, files: list[tuple[int, int]],
            progress: Callable[[int, int, int], None] | None = None,
            pace: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> Report:
        """Verify ``files``; ``progress(done, bytes, findings)`` after each
        file, ``pace(nbytes)`` may sleep to bound the I/O share."""
        report = Report()
        report.findings.extend(self.bad_inodes)
        start = time.monotonic()

        def one(item):
            if stop is not None and stop.is_set():
                return item, None, True
            return item, self.check(ino=item[0]), False

        # files in parallel too (a CT series is many files of a few extents
        # each); in order, with a bounded number in flight
        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="dcmfs-verify-file") as files_pool:
            for (ino, size), findings, stopped in _ordered(files_pool, one, files,
                                                           2 * self.workers):
                if stopped:
                    break
                if findings is None:
                    report.skipped += 1
                else:
                    report.files += 1
                    report.bytes += size
                    report.findings.extend(findings)
                if pace is not None:
                    pace(size)
                if progress is not None:
                    progress(report.files + report.skipped, report.bytes, len(report.findings))
        report.seconds = time.monotonic() - start
        return report

    # --- the store as a whole ----------------------------------------------------
    def orphan_objects(self, older_than: float | None = None,
                       in_use: Callable[[list[bytes]], set[bytes]] = lambda c: set()
                       ) -> list[Finding]:
        """Objects that no index entry names.  On a mounted store, objects
        being written or waiting for deletion (``in_use``) are not orphans,
        and only objects older than ``older_than`` seconds are considered
        (one being written now is not named yet)."""
        present = []
        cutoff = time.time() - older_than if older_than else None
        for oid in self.objects.iter_oids():
            if cutoff is not None:
                try:
                    if os.stat(self.objects.path(oid)).st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
            present.append(oid)
        with self._lock:
            with self.index.begin(gated=False) as txn:
                refs = [(ino, ref) for ino, _, ref in txn.iter_all_chunks_checked() if ref]
                # an inline object is put and deleted with its record: none in flight
                rows = list(txn.iter_inline())
            named = {ref.oid for _, ref in refs}
            named |= in_use([oid for oid in present if oid not in named])
        named_inline = {(ino, ref.oid) for ino, ref in refs
                        if ref.flags & fmt.CHUNK_FLAG_INLINE}
        stray = [Finding(ino, ORPHAN_OBJECT, "no index entry names this inline object",
                         oid.hex()) for ino, oid in rows if (ino, oid) not in named_inline]
        # still there after the named set was taken (a checkpoint may have
        # collected an object meanwhile: that is no orphan)
        return stray + [Finding(0, ORPHAN_OBJECT, "no index entry names this object", oid.hex())
                        for oid in present if oid not in named and self.objects.exists(oid)]


def verify_store(host: JobHost, paths: list[str] | None = None, sample: float | None = None,
                 on_start: Callable[[int], None] = lambda total: None,
                 progress: Callable[[int, int, int], None] | None = None,
                 orphan_age: float | None = None) -> tuple[Report, list[str]]:
    """``dcmfs verify``, mounted (in the daemon) or not: every file, the
    given ``paths`` or a random ``sample`` fraction; then, for a whole-store
    run, files without a name and objects no index entry names (on a mounted
    store only those older than ``orphan_age`` seconds and not in flight).
    ``on_start(total)`` is told how many files will be checked.  Returns the
    report, its findings named with their paths, and the paths not found.

    Raises
    ------
    InterruptedError
        The store began closing before the verify finished.
    """
    verifier = Verifier.of(host)
    try:
        missing: list[str] = []
        inos = None
        if paths:
            with host.lock, host.index.begin() as txn:
                inos, missing = resolve_paths(txn, paths)
        files = verifier.files(sample, inos)
        on_start(len(files))
        report = verifier.run(files, progress, stop=host.stopping)
        if host.stopping.is_set():
            raise InterruptedError("the store was unmounted before verify finished")
        if not paths and sample is None:
            with host.lock, host.index.begin() as txn:
                report.findings += unnamed_files(txn)
            with host.lock:
                if host.index.check_all():
                    # groups a damaged record explains are named by its file's
                    # own finding; the others hold records that are not theirs
                    bad = authentic.unexplained(host.index)
                    report.findings += [Finding(ino, authentic.CHECKSUM, what) for ino, what
                                        in authentic.problems(host.index, bad)]
            report.findings += verifier.orphan_objects(orphan_age, host.objects_in_flight)
        with host.lock, host.index.begin() as txn:
            names = name_paths(txn, {f.ino for f in report.findings if f.ino})
        for f in report.findings:
            f.paths = names.get(f.ino, [])
        return report, missing
    finally:
        verifier.close()


def name_paths(txn, inos: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Every path of the given inodes (all inodes if None), from the
    directory entries; an inode no entry reaches maps to []."""
    parent_of: dict[int, list[tuple[int, bytes]]] = collections.defaultdict(list)
    for parent, name, child in txn.iter_dirents():
        parent_of[child].append((parent, name))
    wanted = set(parent_of) if inos is None else set(inos)
    cache: dict[int, str | None] = {1: ""}

    def dir_path(ino: int, depth: int = 0) -> str | None:
        if ino in cache:
            return cache[ino]
        if depth > 4096 or not parent_of.get(ino):
            cache[ino] = None
            return None
        parent, name = parent_of[ino][0]
        base = dir_path(parent, depth + 1)
        cache[ino] = None if base is None else base + "/" + os.fsdecode(name)
        return cache[ino]

    out = {}
    for ino in wanted:
        paths = []
        for parent, name in parent_of.get(ino, []):
            base = dir_path(parent)
            if base is not None:
                paths.append(base + "/" + os.fsdecode(name))
        out[ino] = sorted(paths)
    return out


def resolve_paths(txn, paths: Iterable[str]) -> tuple[list[int], list[str]]:
    """The regular files at or under the given store paths; (inos, missing)."""
    inos, missing = [], []
    for path in paths:
        ino = 1
        for part in [p for p in path.split("/") if p]:
            child = txn.lookup(ino, os.fsencode(part))
            if child is None:
                ino = None
                break
            ino = child
        if ino is None:
            missing.append(path)
            continue
        stack = [ino]
        while stack:
            cur = stack.pop()
            inode = txn.get_inode(cur)
            if inode is None:
                continue
            if stat.S_ISDIR(inode.mode):
                stack.extend(child for _, child in txn.list_dir(cur))
            elif stat.S_ISREG(inode.mode):
                inos.append(cur)
    return sorted(set(inos)), missing


def unnamed_files(txn) -> list[Finding]:
    """Regular files no directory entry reaches and that are not waiting for
    their last close (orphans): their data is there, their name is lost."""
    named = {child for _, _, child in txn.iter_dirents()}
    orphans = set(txn.orphans())
    return [Finding(ino, UNNAMED, "no directory entry names this file")
            for ino, inode in txn.iter_inodes_checked()
            if ino != 1 and ino not in named and ino not in orphans
            and not isinstance(inode, IntegrityError)]
