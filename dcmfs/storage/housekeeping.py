"""The housekeeping half of :class:`~dcmfs.storage.objects.ObjectStore`:
deletion, presence, listing, quarantine and prefetch of objects (files in
the store's backend; inline ones, feature ``inline-small-v1``, in the
index's :class:`~dcmfs.index.inline.InlineRows`)."""

from __future__ import annotations

import os
from typing import Iterator

from .. import format as fmt
from ..errors import StoreIOError
from .damage import object_name
from .durable import TMP_PREFIX, write_file


class ObjectHousekeeping:
    """(A part of :class:`~dcmfs.storage.objects.ObjectStore`.)"""

    def quarantine(self, oid: bytes, root: str, ino: int | None = None) -> None:
        """Move an object that fsck cannot prove to be garbage out of the way
        (``STORE/quarantine/``); it is never deleted by dcmfs.  ``ino``: an
        inline object of that inode, copied there (its row goes with its
        chunk record)."""
        dest = os.path.join(root, fmt.QUARANTINE_DIR)
        os.makedirs(dest, mode=0o700, exist_ok=True)
        if ino is not None:
            blob = self.inline.get(ino, oid) if self.inline is not None else None
            if blob is not None:
                write_file(os.path.join(dest, oid.hex()), blob)
            return
        try:
            os.rename(self.path(oid), os.path.join(dest, oid.hex()))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreIOError(f"moving object {oid.hex()} to quarantine failed: "
                               f"{exc.strerror}") from exc
        finally:  # after the move (see storage.keptfds)
            self.forget_kept(oid)

    def prefetch(self, oids: list[bytes]) -> int:
        """Fetch these objects ahead of their reads: from an S3 store's
        bucket, or from the disk into the page cache; returns how many
        fetches were queued."""
        fetch = getattr(self.backend, "prefetch", None)
        return fetch([object_name(oid) for oid in oids]) if fetch and oids else 0

    # --- housekeeping ---------------------------------------------------------
    def delete(self, oid: bytes) -> None:
        """Delete an object file; an inline object sealed but never put
        (a write given up) is forgotten instead (a put one goes with its
        record, :meth:`dcmfs.index.txn.Txn.put_chunk`)."""
        if self.inline is not None and self.inline.unstage(oid):
            return
        self.backend.delete(object_name(oid))

    def exists(self, oid: bytes, ino: int | None = None) -> bool:
        """Is the object stored (in the store directory, or the bucket;
        ``ino``: or inline, for that inode)?"""
        if ino is not None and self.inline is not None \
                and self.inline.get(ino, oid) is not None:
            return True
        return self.backend.head(object_name(oid)) is not None

    def iter_oids(self) -> Iterator[bytes]:
        """Every object file's id present (temp files are reported by
        :meth:`iter_temps`; inline objects by the index,
        :meth:`dcmfs.index.txn.Txn.iter_inline`)."""
        for name in self.backend.list(fmt.OBJECTS_DIR + "/"):
            leaf = name.rsplit("/", 1)[-1]
            if len(leaf) == 32:
                try:
                    yield bytes.fromhex(leaf)
                except ValueError:
                    continue

    def iter_temps(self) -> Iterator[str]:
        if not os.path.isdir(self.root):
            return
        for sub in os.listdir(self.root):
            d = os.path.join(self.root, sub)
            for name in os.listdir(d):
                if name.startswith(TMP_PREFIX):
                    yield os.path.join(d, name)
