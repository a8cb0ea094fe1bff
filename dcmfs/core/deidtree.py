"""The de-identified view's tree (``PSEUDONYM/STUDY-UID/SERIES-UID/
INSTANCE-UID.dcm``), built from the ``deidview`` records and changed while
it is served: the background pass (:class:`~dcmfs.core.deidrecords.
RecordFiller`) adds each file as its record is made, and a file changed or
deleted through a normal mount beside the view leaves it.  The FUSE thread
reads it while the pass's thread changes it: every change and every
listing holds the tree's lock; a lookup of one name needs none (a dict read).
"""

from __future__ import annotations

import collections
import threading

from ..errors import NotADirectory, NotFound
from .deidrecords import withheld_reason


class Node:
    __slots__ = ("st_ino", "children", "ino", "record")

    def __init__(self, st_ino: int, ino: int = 0, record: dict | None = None) -> None:
        self.st_ino = st_ino
        self.children: dict[str, Node] | None = None if record else {}
        self.ino = ino
        self.record = record


class Tree:
    def __init__(self, keys, burned_in: bool) -> None:
        self.keys, self.burned_in = keys, burned_in
        self.root = Node(1)
        self.lock = threading.Lock()
        self._count = 1
        #: ino -> the names of its node, root first (to remove it again)
        self._where: dict[int, tuple[str, ...]] = {}
        #: ino -> why the view withholds it
        self._withheld: dict[int, str] = {}
        #: ino -> the file's version the tree shows
        self._generation: dict[int, int] = {}

    @property
    def files(self) -> int:
        return len(self._where)

    def withheld(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = collections.defaultdict(list)
        with self.lock:
            for ino, reason in sorted(self._withheld.items()):
                out[reason].append(ino)
        return dict(out)

    def add(self, ino: int, record: dict) -> None:
        """The file's current record: it enters the tree (or leaves it, or
        is withheld)."""
        with self.lock:
            names = self._where.get(ino)
            if names is not None and record.get("dicom") \
                    and not withheld_reason(record, self.burned_in) \
                    and names[:3] == self._parts(record):
                # the same place (a record made again): the node is kept, so
                # a lookup meanwhile never misses it
                node = self.node("/".join(names))
                node.record = record
                self._generation[ino] = record.get("generation")
                return
            self._remove(ino)
            reason = withheld_reason(record, self.burned_in)
            if reason:
                self._withheld[ino] = reason
                self._generation[ino] = record.get("generation")
                return
            if not record.get("dicom"):
                return
            parts = self._parts(record)
            node = self.root
            for part in parts:
                child = node.children.get(part)
                if child is None:
                    self._count += 1
                    child = node.children[part] = Node(self._count)
                node = child
            sop = self.keys.uid(record["sop"])
            name, n = sop + ".dcm", 1
            while name in node.children:
                n += 1
                name = f"{sop}-{n}.dcm"
            self._count += 1
            node.children[name] = Node(self._count, ino, record)
            self._where[ino] = parts + (name,)
            self._generation[ino] = record.get("generation")

    def _parts(self, record: dict) -> tuple[str, str, str]:
        return (self.keys.pseudonym(record["patient"]), self.keys.uid(record["study"]),
                self.keys.uid(record["series"]))

    def remove(self, ino: int) -> None:
        with self.lock:
            self._remove(ino)

    def _remove(self, ino: int) -> None:
        self._generation.pop(ino, None)
        self._withheld.pop(ino, None)
        names = self._where.pop(ino, None)
        if names is None:
            return
        chain = [self.root]
        for part in names[:-1]:
            chain.append(chain[-1].children[part])
        del chain[-1].children[names[-1]]
        for depth in range(len(chain) - 1, 0, -1):  # directories left empty go too
            if chain[depth].children:
                break
            del chain[depth - 1].children[names[depth - 1]]

    def inodes(self) -> dict[int, int]:
        """{ino: generation} of every file in the tree or withheld."""
        with self.lock:
            return dict(self._generation)

    def node(self, path: str | None) -> Node:
        node = self.root
        for part in (path or "/").strip("/").split("/"):
            if not part:
                continue
            if node.children is None:
                raise NotADirectory("not a directory")
            node = node.children.get(part)
            if node is None:
                raise NotFound("no such file in the view")
        return node

    def listing(self, node: Node) -> list[tuple[str, Node]]:
        with self.lock:
            return sorted(node.children.items())

    def subdirs(self, node: Node) -> int:
        with self.lock:
            return sum(1 for c in node.children.values() if c.children is not None)
