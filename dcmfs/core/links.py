"""The kernel's names of hard-linked files (a part of the core).

libfuse's path API gives every *name* its own kernel inode, and the kernel
caches attributes (for the attribute timeout) and pages (while the file is
open, and longer with ``kernel_cache``) per kernel inode.  A change through
one name of a file with several names would leave the others stale: nlink 1
after a link, the old mode after a chmod (a permission not yet enforced),
old bytes read through a descriptor of the other name.

So the core records, for every inode with more than one name, the paths by
which the kernel knows it (every kernel inode of a name is made by a lookup,
i.e. a getattr by path, or by the link that made the name), follows them
through renames, and after an operation that changed such an inode lists the
*other* paths in :attr:`KernelNames.stale`.  The FUSE adapter hands them to
libfuse (``fuse_invalidate_path``: the kernel drops the attributes and pages
it holds for that name) before it answers the operation.  A file with one
name, nearly every file, costs one comparison per getattr.
"""

from __future__ import annotations

import threading


def moved(path: str, old: str, new: str) -> str | None:
    """``path`` after ``old`` was renamed to ``new`` (it or a directory above
    it), or None if the rename did not touch it."""
    if path == old:
        return new
    if path.startswith(old) and path[len(old)] == "/":
        return new + path[len(old):]
    return None


class KernelNames:
    """ino -> the paths the kernel may hold a node for, for inodes with more
    than one name; and the paths an operation made stale."""

    #: paths followed at most (a tree of hard links, like backups made with
    #: rsync --link-dest, may hold millions): further names of such files are
    #: coherent only after the attribute timeout (60 s: adapter.fuse_ops.KERNEL_TIMEOUT) and on the next open
    LIMIT = 100_000

    def __init__(self) -> None:
        self._paths: dict[int, set[str]] = {}
        self._count = 0
        self._local = threading.local()

    @property
    def stale(self) -> list[str]:
        """Paths whose kernel caches the last operations *of this thread*
        made stale (the adapter takes them before it answers).  One list per
        thread: with several requests served at once, each request's answer
        must wait for its own invalidations, not miss them to another."""
        stale = getattr(self._local, "stale", None)
        if stale is None:
            stale = self._local.stale = []
        return stale

    def seen(self, ino: int, path: str) -> None:
        """The kernel knows ``ino`` (which has several names) as ``path``."""
        paths = self._paths.get(ino)
        if paths is None:
            if self._count >= self.LIMIT:
                return
            paths = self._paths[ino] = set()
        if path not in paths and self._count < self.LIMIT:
            paths.add(path)
            self._count += 1

    def changed(self, ino: int, path: str | None = None) -> None:
        """``ino`` changed through ``path`` (the kernel updates that name
        itself): every other name it is known by is stale."""
        paths = self._paths.get(ino)
        if paths:
            self.stale.extend(p for p in paths if p != path)

    def gone(self, ino: int, path: str) -> None:
        """The name ``path`` of ``ino`` was removed."""
        paths = self._paths.get(ino)
        if paths is not None and path in paths:
            paths.discard(path)
            self._count -= 1
            if len(paths) <= 1:  # one name left: nothing to keep coherent
                self.forget(ino)

    def forget(self, ino: int) -> None:
        self._count -= len(self._paths.pop(ino, ()))

    def renamed(self, old: str, new: str, ino: int | None = None) -> None:
        """``old`` was renamed to ``new``; ``ino`` is the file renamed, None
        for a directory (every path below it moves too)."""
        for i in ([ino] if ino is not None else list(self._paths)):
            paths = self._paths.get(i)
            if not paths:
                continue
            changes = [(p, q) for p in paths if (q := moved(p, old, new)) is not None]
            if changes:
                before = len(paths)
                paths.difference_update(p for p, _ in changes)
                paths.update(q for _, q in changes)
                self._count += len(paths) - before


class PathCache:
    """path -> inode number of names the core resolved, valid for one value
    of the index's names generation (:attr:`dcmfs.index.Index.names_gen`,
    raised whenever an entry is removed or replaced): a new name adds
    nothing a cached path could contradict; a removal, a rename, a
    replay or a re-keying empties the cache.  In memory only."""

    __slots__ = ("gen", "paths")
    LIMIT = 20000

    def __init__(self) -> None:
        self.gen = -1
        self.paths: dict[str, int] = {}

    def get(self, gen: int, path: str) -> int | None:
        if gen != self.gen:
            self.paths.clear()
            self.gen = gen
            return None
        return self.paths.get(path)

    def put(self, gen: int, path: str, ino: int) -> None:
        if gen != self.gen:
            self.paths.clear()
            self.gen = gen
        if len(self.paths) >= self.LIMIT:
            self.paths.clear()
        self.paths[path] = ino

    def drop(self, path: str) -> None:
        """Forget one path (a name of a file, removed: no other remembered
        path leads through it)."""
        self.paths.pop(path, None)

    def clear(self) -> None:
        self.paths.clear()


def canonical(path: str) -> bool:
    """Is ``path`` spelt as the kernel spells one (``/a/b``)?  Only such a
    path is remembered: an unlink then forgets the one spelling there is."""
    return path[:1] == "/" and path[-1:] != "/" and "//" not in path
