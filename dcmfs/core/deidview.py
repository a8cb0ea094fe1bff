"""The de-identified research view (issue 21): a read-only tree of the
store's DICOM files, each served de-identified as it is read.

The tree is ``PSEUDONYM/STUDY-UID/SERIES-UID/INSTANCE-UID.dcm``, every
component derived from the original with a keyed hash under the *view
secret* (:class:`ViewKeys`), never the master key: the same secret gives the
same names and UIDs on every mount and machine, another secret unlinkable
ones.  Listing it reads no file: what it needs of each file is in the
index's ``deidview`` database (sealed; feature ``deid-view-v1``), filled by
a one-time pass over the files that lack a current record, in the
background (:class:`~dcmfs.core.deidrecords.RecordFiller`): a normal mount
makes them after re-encoding, and the first view mount answers at once and
shows each file as its record is made (:mod:`dcmfs.core.deidtree`); later
mounts find only the new files.

A view file is the de-identified header (the profile's actions applied in
a parser worker, :mod:`dcmfs.storage.deid`, from the header bytes and the
UID mapping the daemon computes) followed by the original Pixel Data value,
read by reference from the stored extents through the core's read path:
only the header is rewritten.  Trailing elements after the pixel data
(padding, signatures) are left out.  Sizes in ``stat`` are exact: the
header is made when a file is first looked up (for a whole series at once,
in the background, when its directory is listed) and kept in a bounded
cache.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import format as fmt
from ..errors import (InvalidArgument, IsADirectory, NoAttribute, NotADirectory, NotFound,
                      ReadOnlyError, StoreIOError, loggable)
from ..sandbox.pool import ParserFailure, ParserPool
from .deidrecords import RecordFiller
from .deidtree import Node, Tree

log = logging.getLogger("dcmfs.deid")

#: bytes of de-identified headers kept in memory
HEADER_CACHE = 64 * 1024 * 1024
#: de-identified headers up to this size are kept in the index (an enhanced
#: multi-frame header can be megabytes: made again at each mount instead)
KEEP_HEADER = 256 * 1024
#: headers made ahead when a directory is listed (the rest when looked up)
PREPARE_AHEAD = 1024
#: the reason a file is withheld: a header the worker could not make
REWRITE_FAILED = "de-identification failed"


@dataclasses.dataclass(frozen=True)
class ViewOptions:
    """The profile's options (mount options ``deid_*``)."""

    #: "remove": dates as the profile says; "shift": dates moved back by a
    #: per-patient offset (Retain Longitudinal Temporal Information with
    #: Modified Dates)
    dates: str = "remove"
    characteristics: bool = False
    device: bool = False
    #: serve files that declare or may carry burned-in text too
    burned_in: bool = False
    #: keep the private attributes PS3.15 lists as safe (Retain Safe
    #: Private; :mod:`dcmfs.storage.deidprivate`)
    safe_private: bool = False


class ViewKeys:
    """Pseudonyms, UIDs and date shifts from the view secret (HKDF-SHA256,
    label ``dcmfs deid view v1``; HMAC-SHA256 per value)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a view secret needs at least 16 bytes")
        self._key = HKDF(hashes.SHA256(), 32, salt=None,
                         info=b"dcmfs deid view v1").derive(secret)
        self._cache = AESGCMSIV(HKDF(hashes.SHA256(), 32, salt=None,
                                     info=b"dcmfs deid view header cache v1").derive(secret))

    def _mac(self, label: bytes, value: str) -> bytes:
        return hmac.new(self._key, label + b"\0" + value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def pseudonym(self, patient: str) -> str:
        return "P" + self._mac(b"patient", patient)[:8].hex().upper()

    def uid(self, value: str) -> str:
        """A ``2.25.`` UID (PS3.5 B.2: a 128-bit integer) for ``value``."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", value)[:16], "big"))

    def tag(self, options: "ViewOptions") -> str:
        """Names one secret with one set of options (whose headers differ)."""
        return self._mac(b"options", repr(dataclasses.astuple(options)))[:8].hex()

    def seal_header(self, ino: int, generation: int, tag: str, header: bytes) -> str:
        """A de-identified header as the index keeps it: sealed under a key
        of the view secret (who holds only the store's key cannot link a
        pseudonym to its patient), bound to the file's version and the
        options."""
        nonce = os.urandom(12)
        return (nonce + self._cache.encrypt(nonce, header, _aad(ino, generation, tag))).hex()

    def open_header(self, ino: int, generation: int, tag: str, sealed: str) -> bytes | None:
        try:
            raw = bytes.fromhex(sealed)
            return self._cache.decrypt(raw[:12], raw[12:], _aad(ino, generation, tag))
        except (ValueError, InvalidTag):
            return None  # another secret's, or damaged: made again

    def shift_days(self, patient: str) -> int:
        """Days every date of this patient moves back: 1 to 3650."""
        return 1 + int.from_bytes(self._mac(b"dates", patient)[:4], "big") % 3650


def _aad(ino: int, generation: int, tag: str) -> bytes:
    return b"dcmfs-deid-header" + ino.to_bytes(8, "big") + generation.to_bytes(8, "big") \
        + tag.encode()


# --- the view ---------------------------------------------------------------------------
class DeidView:
    """What the FUSE adapter serves for ``-o view=deid``: the operations of
    :class:`~dcmfs.core.filesystem.FileSystem` it calls, over the view's
    own tree; every change is refused (EROFS)."""

    def __init__(self, fs, keys: ViewKeys, options: ViewOptions,
                 parsers: ParserPool | None = None) -> None:
        self.fs = fs
        self.store = fs.store
        self.keys = keys
        self.options = options
        self.parsers = parsers or ParserPool(2, fs.config.parser_memory,
                                             fs.config.parser_timeout)
        self.stale_names: list[str] = []
        self.read_only = True
        self._lock = threading.Lock()
        self._headers: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._header_bytes = 0
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="dcmfs-deid")
        self._handles: dict[int, list] = {}
        self._dirs: dict[int, Node] = {}
        self._next_fh = 1
        self.tree = Tree(keys, options.burned_in)
        self.filler: RecordFiller | None = None
        #: the main mountpoint when the view is served beside the files
        self.alongside: str | None = None
        #: files whose de-identified header could not be made (EIO)
        self.failed: set[int] = set()
        self.uid, self.gid = os.getuid(), os.getgid()
        #: (uid, gid, pid) of the request being served (set by the FUSE adapter)
        self.caller: tuple[int, int, int] | None = None
        self._tag = keys.tag(options)

    def build(self) -> None:
        """The tree of the records made so far; the workers start meanwhile
        (a first header need not wait ~0.5 s for Python to import pydicom).
        A read-write opening then fills the missing records in the
        background (:class:`RecordFiller`, at once while this first pass
        lasts): the mount answers at once and files appear as they are
        looked at; :meth:`live_status` says how far it is."""
        threading.Thread(target=self.parsers.warm_all, daemon=True,
                         name="dcmfs-warm-deid").start()
        with self.fs.lock:
            with self.fs.index.begin() as txn:
                records = [(ino, rec, txn.get_inode(ino)) for ino, rec in txn.iter_deid()]
        for ino, record, inode in sorted(records, key=lambda r: r[0]):
            if inode is None or inode.generation != record.get("generation"):
                continue  # changed since it was looked at: the pass looks again
            self.tree.add(ino, record)
        if not self.fs.read_only:
            self.filler = self.fs.deid_filler
            if self.filler is None:  # no parser sandbox for the re-encoder: the view's workers
                self.filler = self.fs.deid_filler = RecordFiller(self.fs, self.parsers)
                self.filler.start()
            self.filler.serve_view(self._record, self._drop_gone)
        if self.withheld:
            log.info("de-identified view: %d DICOM files withheld (see 'dcmfs stats')",
                     sum(len(v) for v in self.withheld.values()))

    def _record(self, ino: int, record: dict) -> None:
        """A record made by the pass: the file enters the tree as it is now
        (a changed file: its old header goes)."""
        with self._lock:
            old = self._headers.pop(ino, None)
            if old is not None:
                self._header_bytes -= len(old)
            self.failed.discard(ino)
        self.tree.add(ino, record)

    def _drop_gone(self) -> None:
        """After a pass: files deleted or changed meanwhile (through a
        normal mount beside the view) leave the tree; a changed one comes
        back with its new record."""
        shown = self.tree.inodes()
        with self.fs.lock:
            with self.fs.index.begin() as txn:
                gone = [ino for ino, generation in shown.items()
                        if (inode := txn.get_inode(ino)) is None
                        or inode.generation != generation]
        for ino in gone:
            self.tree.remove(ino)

    @property
    def withheld(self) -> dict[str, list[int]]:
        return self.tree.withheld()

    def wait_filled(self, timeout: float) -> bool:
        """Until the first pass has looked at every file (tests, benchmarks)."""
        return self.filler is None or self.filler.first_pass_done.wait(timeout)

    def close(self, store: bool = True) -> None:
        """Close the view, and the store under it unless ``store`` is False
        (a view beside the files: the daemon closes the store after)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.parsers.close()
        for _, inner in list(self._handles.values()):
            if inner is not None:
                self.fs.release(inner)
        self._handles.clear()
        if store:
            self.fs.close()

    def live_status(self) -> dict:
        """The store's figures and the view's: files listed and withheld,
        and the first pass's progress."""
        out = self.fs.live_status()
        out["deid_view"] = {"files": self.tree.files, "alongside": self.alongside,
                            "withheld": sum(map(len, self.withheld.values()))}
        return out

    # --- the tree ---------------------------------------------------------------------
    def _node(self, path: str | None) -> Node:
        return self.tree.node(path)

    def _stat(self, node: Node) -> dict:
        if node.children is not None:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2 + self.tree.subdirs(node),
                "st_size": 0, "st_ino": node.st_ino, "st_uid": self.uid, "st_gid": self.gid,
                "st_atime": 0, "st_mtime": 0, "st_ctime": 0}
        record = node.record
        size = len(self._header(node.ino, record)) + record["pixel_end"] - record["value_at"]
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size,
                "st_ino": node.st_ino, "st_uid": self.uid, "st_gid": self.gid,
                "st_atime": 0, "st_mtime": 0, "st_ctime": 0, "st_blocks": (size + 511) // 512}

    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        if fh is not None and fh in self._handles:
            return self._stat(self._handles[fh][0])
        if path is None and fh in self._dirs:
            return self._stat(self._dirs[fh])
        return self._stat(self._node(path))

    def hidden(self, path, fh) -> bool:
        return False

    def opendir(self, path: str) -> int:
        node = self._node(path)
        if node.children is None:
            raise NotADirectory("not a directory")
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = node
        return fh

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, int]]:
        # with libfuse's nopath the directory comes as its handle
        node = self._dirs[fh] if fh in self._dirs else self._node(path)
        if node.children is None:
            raise NotADirectory("not a directory")
        listing = self.tree.listing(node)
        files = [c for _, c in listing if c.children is None]
        for child in files[:PREPARE_AHEAD]:  # a series listed: its headers are made ahead
            self._start(child.ino, child.record)
        return [(name, c.st_ino) for name, c in listing]

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files ------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise ReadOnlyError("The de-identified view is read-only.")
        node = self._node(path)
        if node.children is not None:
            raise IsADirectory("a directory")
        self._header(node.ino, node.record)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = [node, None]
        # the audit trail: who read which file, by its inode and its view path
        self.fs._audit("open", node.ino, path, who=self.caller, access="r", view="deid")
        return fh

    @property
    def opened(self):
        """The opened store under the view (the FUSE adapter asks whether it
        keeps an audit trail)."""
        return self.fs.opened

    def read(self, fh: int, size: int, offset: int) -> bytes:
        entry = self._handles.get(fh)
        if entry is None:
            raise InvalidArgument("not an open file of the view")
        node = entry[0]
        record = node.record
        header = self._header(node.ino, record)
        total = len(header) + record["pixel_end"] - record["value_at"]
        end = min(offset + size, total)
        out = b""
        if offset < len(header):
            out = header[offset:end]
            offset = len(header)
        if end > offset:
            if entry[1] is None:
                entry[1] = self.fs.open_inode(node.ino)
            start = record["value_at"] + offset - len(header)
            data = self.fs.read(entry[1], end - offset, start)
            if len(data) != end - offset:
                raise StoreIOError(f"inode {node.ino}: shorter than the view expects")
            out += data
        return out

    def release(self, fh: int) -> None:
        entry = self._handles.pop(fh, None)
        if entry is not None and entry[1] is not None:
            self.fs.release(entry[1])

    # --- de-identified headers -------------------------------------------------------
    def _start(self, ino: int, record: dict) -> Future:
        with self._lock:
            if ino in self._headers:
                fut: Future = Future()
                fut.set_result(self._headers[ino])
                return fut
            fut = self._pending.get(ino)
            if fut is None:
                fut = self._pending[ino] = self._pool.submit(self._make, ino, record)
            return fut

    def _header(self, ino: int, record: dict) -> bytes:
        with self._lock:
            if ino in self.failed:
                raise StoreIOError(f"inode {ino}: {REWRITE_FAILED}")
            header = self._headers.get(ino)
            if header is not None:
                self._headers.move_to_end(ino)
                return header
        return self._start(ino, record).result()

    def _make(self, ino: int, record: dict) -> bytes:
        cached = record.get("header")
        if cached and cached.get("tag") == self._tag:
            header = self.keys.open_header(ino, record["generation"], self._tag, cached["sealed"])
            if header is not None:
                with self._lock:
                    self._pending.pop(ino, None)
                return self._keep(ino, header)
        try:
            fh = self.fs.open_inode(ino)
            try:
                # the header only: no pixel band decoded ahead for it
                raw = self.fs.read(fh, record["value_at"], 0, ahead=False)
            finally:
                self.fs.release(fh)
            patient = record["patient"]
            mapping = {uid: self.keys.uid(uid) for uid in record["uids"]}
            shift = self.keys.shift_days(patient) if self.options.dates == "shift" else None
            header = self.parsers.deid_rewrite(
                raw, record, mapping, self.keys.pseudonym(patient), shift,
                self.options.characteristics, self.options.device, self.options.safe_private)
        except ParserFailure as exc:
            # once per mount: the file then answers EIO at once
            log.warning("inode %d: %s: %s", ino, REWRITE_FAILED, exc.reason)
            with self._lock:
                self.failed.add(ino)
            raise StoreIOError(f"inode {ino}: {REWRITE_FAILED}") from None
        except Exception as exc:  # noqa: BLE001 — the view must answer EIO, not crash
            log.warning("inode %d: %s: %s", ino, REWRITE_FAILED, loggable(exc))
            with self._lock:
                self.failed.add(ino)
            raise StoreIOError(f"inode {ino}: {REWRITE_FAILED}") from None
        finally:
            with self._lock:
                self._pending.pop(ino, None)
        if not self.fs.read_only and len(header) <= KEEP_HEADER:
            self._persist(ino, record, header)
        return self._keep(ino, header)

    def _persist(self, ino: int, record: dict, header: bytes) -> None:
        """Keep the header in the file's record (sealed under the view's
        secret): later mounts of the view read it instead of asking a worker."""
        sealed = {"tag": self._tag, "sealed": self.keys.seal_header(
            ino, record["generation"], self._tag, header)}
        try:
            with self.fs.lock:
                with self.fs.index.begin() as txn:
                    current = txn.get_deid(ino)
                if current is None or current.get("generation") != record["generation"]:
                    return
                with self.fs.write_txn() as txn:
                    txn.put_deid(ino, dict(current, header=sealed))
            record["header"] = sealed
        except Exception as exc:  # noqa: BLE001 — a cache: the view goes on without it
            log.warning("inode %d: de-identified header not kept: %s", ino, loggable(exc))

    def _keep(self, ino: int, header: bytes) -> bytes:
        with self._lock:
            self._headers[ino] = header
            self._header_bytes += len(header)
            while self._header_bytes > HEADER_CACHE and len(self._headers) > 1:
                _, old = self._headers.popitem(last=False)
                self._header_bytes -= len(old)
        return header

    # --- everything else: refused or empty -----------------------------------------------
    def statfs(self) -> dict:
        return self.fs.statfs()

    def getxattr(self, path: str, name: str, caller: int | None = None) -> bytes:
        if path == "/" and name == fmt.STATUS_XATTR:
            # the mount root's status (umount proves the daemon by it), the view's figures too
            self.fs.require_admin(caller)
            return json.dumps(self.live_status(), sort_keys=True).encode()
        if path == "/" and name.startswith("user.dcmfs."):
            return self.fs.getxattr("/", name, caller=caller)
        self._node(path)
        raise NoAttribute(name)

    def listxattr(self, path: str) -> list[str]:
        self._node(path)
        return []

    def require_admin(self, caller: int | None) -> None:
        self.fs.require_admin(caller)

    def sync_all(self) -> None:
        pass

    def flush(self, fh: int) -> None:
        pass

    def fsync(self, fh: int, datasync: bool = False) -> None:
        pass

    def _refuse(self, *args, **kwargs):
        raise ReadOnlyError("The de-identified view is read-only.")

    mkdir = rmdir = create = write = truncate = fallocate = unlink = rename = link = \
        symlink = mknod = chmod = chown = utimens = setxattr = removexattr = _refuse

    def readlink(self, path: str) -> str:
        raise InvalidArgument("not a symbolic link")
