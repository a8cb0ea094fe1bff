"""What ``dcmfs fsck`` does with inline objects (feature ``inline-small-v1``:
a small chunk's sealed object kept in the index's ``inline`` database, keyed
under its inode) that no chunk record names (a part of fsck, mixed into
:class:`dcmfs.integrity.fsck.Fsck`).

A row and its chunk record are put and deleted together, so such a row is
damage, never what a deletion left: it is salvaged as an object file no
entry names is, never deleted without a copy.  Its sealed context (which
binds object id, inode, chunk, generation and the inline flag) is opened
as an object file's is (:meth:`~dcmfs.storage.objects.ObjectStore.context_of`),
and must name the place the row is stored at:

* a row of a file the index knows is a candidate to mend that file
  (``_restore``), else it is copied to the quarantine and removed;
* a row of a missing inode (its inode record, or its chunk records, lost
  to damage) joins that file's object files, and the file is rebuilt into
  ``/lost+found`` (``_rebuild_file``); what forms no file is copied to the
  quarantine;
* a row whose context names another place (moved or copied) is copied
  to the quarantine and removed;
* a row that does not authenticate is copied to the quarantine and
  reported; as the index held the only copy of those bytes, the run is not
  called clean (the inode is in ``unrecovered``).
"""

from __future__ import annotations

import collections

from .. import format as fmt
from ..storage.objects import ChunkContext, ObjectDamaged


class InlineSalvage:
    """Inline rows for :class:`dcmfs.integrity.fsck.Fsck` (its index, objects)."""

    def _inline_rows(self, ino: int | None = None) -> list[tuple[int, bytes]]:
        """(inode, object id) of the inline rows (of inode ``ino`` only)."""
        with self.index.begin() as txn:
            return list(txn.iter_inline(ino))

    def _inline_context(self, ino: int, oid: bytes) -> ChunkContext | None:
        """The sealed context of the inline object ``oid`` of ``ino``, if it
        authenticates (else None)."""
        try:
            return self.objects.context_of(oid, ino)
        except ObjectDamaged:
            return None

    @staticmethod
    def _in_place(ino: int, oid: bytes, ctx: ChunkContext | None) -> bool:
        """The context names the row it is stored as (an inline object)."""
        return ctx is not None and ctx.oid == oid and ctx.ino == ino \
            and bool(ctx.flags & fmt.CHUNK_FLAG_INLINE)

    def _inline_top(self) -> int:
        """The highest inode number an inline row is kept under (0: none)."""
        return max((ino for ino, _ in self._inline_rows()), default=0)

    def _own_inline(self, ino: int) -> list[tuple[bytes, ChunkContext]]:
        """(oid, context) of the authentic inline objects of ``ino`` that no
        chunk record names (candidates to mend the file)."""
        out = []
        for _, oid in self._inline_rows(ino):
            ctx = self._inline_context(ino, oid)
            if self._in_place(ino, oid, ctx) and not self._named.get(oid):
                out.append((oid, ctx))
        return out

    def check_inline_rows(self, inodes: dict
                          ) -> dict[tuple[int, bytes], list[ChunkContext]]:
        """Inline objects no chunk record names.  Those of live inodes are
        quarantined; those of missing inodes are returned, by (inode, file
        id), to be rebuilt with the file's object files
        (:meth:`_drop_unsalvaged` keeps the ones that form no file)."""
        with self.index.begin() as txn:
            named = {(ino, ref.oid) for ino, _, ref in txn.iter_all_chunks()
                     if ref.flags & fmt.CHUNK_FLAG_INLINE}
        unknown: dict[tuple[int, bytes], list[ChunkContext]] = collections.defaultdict(list)
        for ino, oid in self._inline_rows():
            if (ino, oid) in named:
                continue
            ctx = self._inline_context(ino, oid)
            if ctx is None:
                self.found("unreferenced", "inline object does not authenticate (the index "
                           "held its only copy)", ino, oid, repaired="copied to quarantine, "
                           "its bytes lost")
                self.unrecovered.append(ino)
                self._drop_inline(ino, oid)
            elif ino in inodes or not self._in_place(ino, oid, ctx):
                self.found("unreferenced", "inline object no chunk record names" + (
                    "" if self._in_place(ino, oid, ctx) else f" (it is object "
                    f"{ctx.oid.hex()} of inode {ctx.ino}: moved or copied)"), ino, oid,
                    repaired="moved to quarantine")
                self._drop_inline(ino, oid)
            else:
                unknown[(ino, ctx.file_id)].append(ctx)
        return unknown

    def _drop_inline(self, ino: int, oid: bytes) -> None:
        """Copy an inline object to the quarantine, then remove its row."""
        if self.repair:
            self.objects.quarantine(oid, self.store.root, ino)
            with self.index.begin(write=True) as txn:
                txn.delete_inline(ino, oid)

    def _drop_unsalvaged(self, ino: int, ctxs: list[ChunkContext], rebuilt: bool) -> None:
        """After the rebuild of a file the index did not know: with none,
        its objects go to the quarantine; inline objects of ``ctxs`` no
        chunk record names (they formed no file, or an older version) are
        copied there, their rows removed."""
        if not self.repair:
            return
        with self.index.begin() as txn:
            named = {ref.oid for ref in txn.chunks(ino).values()} if rebuilt else set()
        for ctx in ctxs:
            if ctx.flags & fmt.CHUNK_FLAG_INLINE:
                if ctx.oid not in named:
                    self._drop_inline(ino, ctx.oid)
            elif not rebuilt:
                self.objects.quarantine(ctx.oid, self.store.root)
