"""What ``dcmfs fsck --repair`` does with damaged files and with objects the
index does not name (a part of fsck, mixed into :class:`dcmfs.integrity.fsck.Fsck`).

The rules (never delete what cannot be proven garbage):

* a damaged file is first mended from its own unnamed objects (their sealed
  context says which file, chunk and generation they are) if the result
  matches the file's SHA-256; else, if its objects hold a complete version
  newer than the index knows, that version replaces the lost one; else the
  file moves to ``/lost+found`` with what can be read, the rest zeros;
* objects of a file the index does not know are assembled into a file in
  ``/lost+found`` (same inode number and file id: both are bound into the
  objects), the newest complete version; what forms no file is quarantined.

Inline objects no chunk record names (kept in the index) are candidates
like object files (:mod:`dcmfs.integrity.inline_rows`).
"""

from __future__ import annotations

import os
import secrets
import stat
import time

from ..storage import codec as codecs
from .. import format as fmt
from ..errors import IntegrityError
from ..index import Inode
from ..storage.digest import TreeHasher
from ..storage.objects import ChunkContext, ChunkRef
from .secrets import history_secrets
from .verify import check_file

LOST_FOUND = b"lost+found"


class Salvage:
    """Repairs of :class:`dcmfs.integrity.fsck.Fsck` (uses its index, objects, contexts)."""

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

    def _adopt_newer(self, ino: int, inode: Inode, table: dict[int, ChunkRef]) -> bool:
        """A damaged file whose objects hold a complete version newer than the
        index knows (the index was rebuilt from an older state): that version
        replaces the lost one, in place, noted in ``user.dcmfs.fsck``."""
        mine = [c for oid, c in [*self._contexts.items(), *self._own_inline(ino)]
                if c is not None and c.oid == oid and c.ino == ino and c.file_id == inode.file_id
                and (not self._named.get(oid) or oid in {r.oid for r in table.values()})]
        if not any(c.generation > inode.generation for c in mine):
            return False
        new = assemble(mine, self.cs)
        if new is None or max(r.generation for r in new.values()) <= inode.generation:
            return False
        size = max(r.offset + r.plain_len if r.offset >= 0 else i * self.cs + r.plain_len
                   for i, r in new.items())
        cipher = self.objects.file_cipher(inode.file_id, inode.secret)
        hasher = TreeHasher(self.cs)
        try:
            for idx, ref, start, length in pieces(new, size, self.cs):
                plain = b"" if ref is None else self.objects.read(cipher, inode.file_id, ino,
                                                                  idx, ref)
                hasher.update(plain[:length].ljust(length, b"\0"))
        except IntegrityError:
            return False
        with self.index.begin(write=True) as txn:
            for idx, ref in table.items():
                if new.get(idx) != ref:
                    txn.delete_chunk(ino, idx)
                    self._named[ref.oid] -= 1
                    if self._named[ref.oid] <= 0:
                        self._quarantine_or_garbage(ref.oid, ino, ref)
            for idx, ref in new.items():
                if table.get(idx) != ref:
                    txn.put_chunk(ino, idx, ref)
                    self._named[ref.oid] += 1
            fresh = txn.get_inode(ino)
            fresh.size, fresh.digest, fresh.tree = size, hasher.digest(), True
            fresh.generation = max(r.generation for r in new.values())
            fresh.ctime_ns = self._now
            txn.put_inode(ino, fresh)
            txn.set_xattr(ino, fmt.FSCK_XATTR.encode(), b"fsck " + time.strftime(
                "%Y-%m-%d %H:%M:%S").encode() + b": the index had an older version whose data "
                b"was gone; this newer complete version was assembled from the objects")
        return True

    def _restore(self, ino: int, inode: Inode, table: dict[int, ChunkRef]) -> bool:
        """Mend a damaged file from objects of its own that no entry names
        (a chunk entry lost to a flipped bit, an object put back by the
        objects check): only if the result matches the file's SHA-256."""
        candidates: dict[int, ChunkContext] = {}
        for oid, ctx in [*self._contexts.items(), *self._own_inline(ino)]:  # files, rows
            if ctx is None or ctx.oid != oid or self._named.get(oid) or ctx.ino != ino \
                    or ctx.file_id != inode.file_id or ctx.generation > inode.generation:
                continue
            best = candidates.get(ctx.index)
            if best is None or ctx.generation > best.generation:
                candidates[ctx.index] = ctx
        if not candidates or inode.digest is None:
            return False
        cipher = self.objects.file_cipher(inode.file_id, inode.secret)
        trial = dict(table)
        for idx, ctx in candidates.items():
            ref = table.get(idx)
            ok = False
            if ref is not None:
                try:
                    self.objects.read(cipher, inode.file_id, ino, idx, ref)
                    ok = True
                except IntegrityError:
                    pass
            if not ok:
                offset = ref.offset if ref is not None else -1
                trial[idx] = ChunkRef(ctx.oid, ctx.generation, ctx.codec, ctx.flags,
                                      ctx.plain_len, ctx.stored_len, offset)
        if trial == table or check_file(self.objects, ino, inode, trial, self.cs):
            return False
        with self.index.begin(write=True) as txn:
            for idx, ref in trial.items():
                if table.get(idx) != ref:
                    txn.put_chunk(ino, idx, ref)
                    self._named[ref.oid] += 1
                    if idx in table:
                        self._named[table[idx].oid] -= 1
        return True

    def _salvage_damaged(self, ino: int, inode: Inode, table: dict[int, ChunkRef]) -> None:
        """Keep what can be read, zero what cannot, move the file to /lost+found."""
        cipher = self.objects.file_cipher(inode.file_id, inode.secret)
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
        hasher = TreeHasher(self.cs)
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
                if plain is not None and len(plain) == length \
                        and ref.flags & ~(fmt.CHUNK_FLAG_FRAMED | fmt.CHUNK_FLAG_INLINE) == flags:
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
                        self._quarantine_or_garbage(ref.oid, ino, ref)
                if idx not in new_table:
                    txn.delete_chunk(ino, idx)
            for idx, ref in new_table.items():
                if table.get(idx) != ref:
                    txn.put_chunk(ino, idx, ref)
            fresh = txn.get_inode(ino)
            fresh.generation, fresh.digest, fresh.tree = gen, hasher.digest(), True
            fresh.ctime_ns = self._now
            txn.put_inode(ino, fresh)
            note = ("fsck " + time.strftime("%Y-%m-%d %H:%M:%S") + ": "
                    + ("bytes " + ", ".join(lost) + " could not be read and are zeros"
                       if lost else "the chunk table was repaired"))
            txn.set_xattr(ino, fmt.FSCK_XATTR.encode(), note.encode())
            names = [(p, n) for p, n, c in txn.iter_dirents() if c == ino]
            for parent, name in names:
                txn.remove_dirent(parent, name)
        name = names[0][1] if names else str(ino).encode()
        self._link_lost(ino, f"{ino}-".encode() + name)
        with self.index.begin(write=True) as txn:
            fresh = txn.get_inode(ino)
            fresh.nlink = 1
            txn.put_inode(ino, fresh)

    def _quarantine_or_garbage(self, oid: bytes, ino: int, ref: ChunkRef) -> None:
        """A damaged object: it cannot be read, but it is not ours to delete
        (an inline one: its bytes are copied to the quarantine, its row goes
        with its record)."""
        if ref.flags & fmt.CHUNK_FLAG_INLINE:
            self.objects.quarantine(oid, self.store.root, ino)
        elif self._contexts.get(oid, "unknown") is None or os.path.exists(self.objects.path(oid)):
            self.objects.quarantine(oid, self.store.root)

    def _secret_of(self, ino: int, file_id: bytes, table: dict[int, ChunkRef]) -> bytes | None:
        """The secret a file's objects need, when its record is gone: none (a
        file made before ``file-secrets-v1``), else one the snapshots or
        journals still hold; None when no candidate opens them (the file was
        shredded, or its whole history is lost)."""
        found = _first_opens(self.objects, ino, file_id, table, [b""])
        if found is None:
            found = _first_opens(self.objects, ino, file_id, table, history_secrets(
                self.store.root, self.opened.index_key, self.store.store_id, ino, file_id))
        return found

    def _rebuild_file(self, ino: int, file_id: bytes, ctxs: list[ChunkContext]) -> bool:
        """Make a file of objects the index does not know (same inode number and
        file id: they are bound into the objects).  False if they do not form one.

        In a store with inline objects (``inline-small-v1``) the index may
        have held some of the file's chunks: objects that end before a
        last chunk make an *incomplete* file (what they hold, the end
        lost), named ``INO.incomplete``, reported and noted as such; a
        chunk with no object before the end reads as zeros and is named
        in the report and the note (a hole, or an inline chunk lost)."""
        table = assemble(ctxs, self.cs)
        inline = fmt.INLINE_FEATURE in self.store.features
        incomplete = table is None and inline
        if incomplete:
            table = assemble_partial(ctxs, self.cs)
        if table is None:
            if inline:
                self.found("unreferenced", "these objects do not form a file: a part of it "
                           "(an inline object, kept in the index) was lost with the index",
                           ino, repaired="its objects moved to quarantine")
                self.unrecovered.append(ino)
            return False
        size = max(r.offset + r.plain_len if r.offset >= 0 else i * self.cs + r.plain_len
                   for i, r in table.items())
        holes = [] if not inline or any(r.offset >= 0 for r in table.values()) else \
            [i for i in range(max(table)) if i not in table]
        gen = max(r.generation for r in table.values())
        secret = self._secret_of(ino, file_id, table)
        if secret is None:
            return False
        cipher = self.objects.file_cipher(file_id, secret)
        hasher = TreeHasher(self.cs)
        try:
            for idx, ref, start, length in pieces(table, size, self.cs):
                plain = b"" if ref is None else self.objects.read(cipher, file_id, ino, idx, ref)
                hasher.update(plain[:length].ljust(length, b"\0"))
        except IntegrityError:
            return False
        if incomplete:
            # the chunk that ends what was found is sealed anew as the last
            # one (readers refuse a file whose end is not marked); the object
            # it was goes, its bytes being in the new one
            gen += 1
            ref = table[idx]
            flags = ref.flags & fmt.CHUNK_FLAG_EXTENT | fmt.CHUNK_FLAG_LAST
            table[idx] = self.objects.write(cipher, file_id, ino, idx, gen, flags,
                                            codecs.ZSTD, plain)._replace(offset=ref.offset)
            if not ref.flags & fmt.CHUNK_FLAG_INLINE:  # (a row: kept by _drop_unsalvaged)
                self._garbage.append(ref.oid)
        now = self._now
        zeros = ", ".join(f"{i * self.cs}-{(i + 1) * self.cs - 1}" for i in holes)
        note = ("fsck " + time.strftime("%Y-%m-%d %H:%M:%S") + ": assembled from objects the "
                "index did not know" + (
                    f"; INCOMPLETE: only bytes 0-{size - 1} were found, the end of the file "
                    "(its last chunk, an inline object kept in the index) was lost with the "
                    "index, its true size is not known" if incomplete else
                    " (newest complete version)")
                + (f"; bytes {zeros} had no object and are zeros (a hole, or an inline "
                   "object lost with the index)" if holes else "")
                + "; no checksum was kept to compare it with")
        with self.index.begin(write=True) as txn:
            txn.put_inode(ino, Inode(stat.S_IFREG | 0o600, 0, 0, 1, size, now, now, now,
                                     file_id, gen, hasher.digest(), tree=True, secret=secret))
            for idx, ref in table.items():
                txn.put_chunk(ino, idx, ref)
            txn.set_xattr(ino, fmt.FSCK_XATTR.encode(), note.encode())
        name = self._link_lost(ino, f"{ino}.incomplete".encode() if incomplete
                               else str(ino).encode())
        where = "/lost+found/" + name.decode()
        if incomplete:
            self.found("unreferenced", f"the file's end is lost: its last chunk was an inline "
                       "object, kept in the index; its objects hold bytes "
                       f"0-{size - 1}, its true size is not known", ino,
                       repaired=f"rebuilt incomplete as {where} (see its user.dcmfs.fsck "
                                "note)")
            self.unrecovered.append(ino)
        if holes:
            self.found("unreferenced", f"bytes {zeros} of the file have no object: a hole, or "
                       "an inline object lost with the index", ino,
                       repaired=f"they read as zeros in {where} (see its user.dcmfs.fsck "
                                "note)")
            self.unrecovered.append(ino)
        return True


def _first_opens(objects, ino: int, file_id: bytes, table: dict[int, ChunkRef],
                 candidates: list[bytes]) -> bytes | None:
    """The first of ``candidates`` (file secrets; b"": none) under which the
    first object of ``table`` opens, None if none does."""
    idx, ref = min(table.items())
    for secret in candidates:
        try:
            objects.read(objects.file_cipher(file_id, secret), file_id, ino, idx, ref)
            return secret
        except IntegrityError:
            continue
    return None


def assemble(ctxs: list[ChunkContext], cs: int) -> dict[int, ChunkRef] | None:
    """The newest complete version a set of one file's objects holds, as a
    chunk table; None when no complete version is there.  A version ends at
    an object with the last-chunk flag; a fixed-layout version takes, for
    each chunk, the newest object not newer than that end (unchanged chunks
    keep older generations); an extent version needs all its extents."""
    options = []
    ext = [c for c in ctxs if c.flags & fmt.CHUNK_FLAG_EXTENT]
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
            options.append((gen, 1, table))
            break
    fixed = [c for c in ctxs if not c.flags & fmt.CHUNK_FLAG_EXTENT]
    lasts = [c for c in fixed if c.flags & fmt.CHUNK_FLAG_LAST]
    if lasts:
        last = max(lasts, key=lambda c: (c.generation, c.index))
        newest: dict[int, ChunkContext] = {}
        for c in sorted(fixed, key=lambda c: c.generation):
            if c.generation <= last.generation and c.index <= last.index \
                    and not (c.flags & fmt.CHUNK_FLAG_LAST and c.index != last.index):
                newest[c.index] = c
        newest[last.index] = last
        options.append((last.generation, 0, {
            i: ChunkRef(c.oid, c.generation, c.codec, c.flags, c.plain_len, c.stored_len)
            for i, c in newest.items()}))
    if not options:
        return None
    return max(options, key=lambda o: (o[0], o[1]))[2]


def assemble_partial(ctxs: list[ChunkContext], cs: int) -> dict[int, ChunkRef] | None:
    """The beginning of the newest version when no object ends it (its last
    chunk was inline, lost with the index): fixed-layout chunks, the newest
    object of each; extents: the newest version's from the first on, while
    they follow one another (an extent after a missing one has no known
    place).  None when that is nothing."""
    options = []
    ext = [c for c in ctxs if c.flags & fmt.CHUNK_FLAG_EXTENT]
    if ext:
        gen = max(c.generation for c in ext)
        by_idx = {c.index: c for c in ext if c.generation == gen}
        table, pos, i = {}, 0, 0
        while i in by_idx:
            c = by_idx[i]
            table[i] = ChunkRef(c.oid, c.generation, c.codec, c.flags, c.plain_len,
                                c.stored_len, pos)
            pos += c.plain_len
            i += 1
        if table:
            options.append((gen, 1, table))
    fixed = [c for c in ctxs if not c.flags & fmt.CHUNK_FLAG_EXTENT]
    if fixed:
        newest: dict[int, ChunkContext] = {}
        for c in sorted(fixed, key=lambda c: c.generation):
            newest[c.index] = c
        options.append((max(c.generation for c in fixed), 0, {
            i: ChunkRef(c.oid, c.generation, c.codec, c.flags, c.plain_len, c.stored_len)
            for i, c in newest.items()}))
    if not options:
        return None
    return max(options, key=lambda o: (o[0], o[1]))[2]


def pieces(table: dict[int, ChunkRef], size: int, cs: int):
    if any(r.offset >= 0 for r in table.values()):
        for i in sorted(table, key=lambda i: table[i].offset):
            yield i, table[i], table[i].offset, table[i].plain_len
        return
    for i in range(-(-size // cs)):
        yield i, table.get(i), i * cs, min(cs, size - i * cs)
