"""Sealed chunk objects in the backing store.

An object is immutable and has a random 128-bit id; its file lives at
``objects/<first two hex digits>/<32 hex digits>``.  The byte layout is in
``format.py`` and ``docs/format.md``.  Reads authenticate the context block
and the payload before anything is decompressed, and decompress with a cap.
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import Iterator, NamedTuple

from . import crypto, format as fmt
import threading

from .codec import JPEGLS, CodecMismatch, Codecs, FrameSpec

from .durable import TMP_PREFIX, sync_filesystem, write_new
from .errors import IntegrityError, StoreIOError


class ChunkRef(NamedTuple):
    """What the index records of one stored chunk."""

    oid: bytes
    generation: int
    codec: int
    flags: int
    plain_len: int
    stored_len: int
    #: where the chunk starts in the file, for files laid out in extents of
    #: their own sizes (DICOM-coded); -1 = at index x chunk size
    offset: int = -1


class ChunkContext(NamedTuple):
    """The sealed context block of an object: whose chunk it is."""

    file_id: bytes
    ino: int
    index: int
    generation: int
    codec: int
    flags: int
    plain_len: int
    stored_len: int


class ObjectDamaged(IntegrityError):
    """An object is missing, truncated, altered, moved or rolled back."""

    def __init__(self, oid: bytes, what: str) -> None:
        super().__init__(f"object {oid.hex()} {what}")
        self.oid = oid
        self.what = what


_PREFIX = fmt.OBJ_PREFIX.pack(fmt.OBJ_MAGIC, fmt.FORMAT_VERSION, fmt.OBJ_KIND_CHUNK, 0)


class ObjectStore:
    def __init__(self, root: str, store_id: bytes, master_key: bytes, codecs: Codecs,
                 verify_writes: bool = True) -> None:
        self.root = os.path.join(root, fmt.OBJECTS_DIR)
        self._store_id = store_id
        self._master = master_key
        self._header = crypto.Siv(crypto.derive(master_key, b"object-context", store_id))
        self._codecs = codecs
        self._verify = verify_writes
        #: objects written / made durable so far (sync waits for a syncfs that
        #: started after the writes it must cover)
        self._written = 0
        self._synced = 0
        self._count_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync_fd: int | None = None
        self._sync_failed: str | None = None

    # --- naming ---------------------------------------------------------------
    @staticmethod
    def new_oid() -> bytes:
        return secrets.token_bytes(16)

    def path(self, oid: bytes) -> str:
        h = oid.hex()
        return os.path.join(self.root, h[:2], h)

    def dir_of(self, oid: bytes) -> str:
        return os.path.join(self.root, oid.hex()[:2])

    def file_cipher(self, file_id: bytes) -> crypto.Gcm:
        """The AES-256-GCM cipher of one file's data key (HKDF of the master key)."""
        return crypto.Gcm(crypto.derive(self._master, b"file-key", self._store_id + file_id))

    def _aad(self, oid: bytes) -> bytes:
        return _PREFIX + self._store_id + oid

    # --- sealing --------------------------------------------------------------
    def seal(self, cipher: crypto.Gcm, oid: bytes, file_id: bytes, ino: int, index: int,
             generation: int, flags: int, codec: int, plaintext: bytes,
             frame: FrameSpec | None = None) -> tuple[ChunkRef, bytes]:
        used, payload = self._codecs.compress(codec, plaintext, frame)
        if used != 0 and (self._verify or used == JPEGLS):
            # restic checks what it wrote before publishing it; a codec bug must
            # fail here, with the plaintext still in hand, not at read time
            # (always for the image codec: byte-exact or nothing)
            try:
                again = self._codecs.decompress(used, payload, len(plaintext))
            except IntegrityError as exc:
                raise CodecMismatch(f"codec {used} could not decode its own output") from exc
            if again != plaintext:
                raise CodecMismatch(f"codec {used} did not reproduce a chunk; not stored")
        stored_len = len(payload)
        ctx = fmt.CTX_STRUCT.pack(file_id, ino, index, generation, used, flags, 0,
                                  len(plaintext), stored_len)
        aad = self._aad(oid)
        sealed_ctx = self._header.seal(ctx, aad)
        sealed_payload = cipher.seal(payload, aad + ctx)
        blob = b"".join((_PREFIX, sealed_ctx, sealed_payload))
        return ChunkRef(oid, generation, used, flags, len(plaintext), stored_len), blob

    def write(self, cipher: crypto.Gcm, file_id: bytes, ino: int, index: int, generation: int,
              flags: int, codec: int, plaintext: bytes, frame: FrameSpec | None = None) -> ChunkRef:
        """Seal and write one chunk object (thread-safe).

        Not durable yet: :meth:`sync` makes every object written so far
        durable; the core calls it before any durable index state (journal
        sync, checkpoint) may refer to them.
        """
        oid = self.new_oid()
        ref, blob = self.seal(cipher, oid, file_id, ino, index, generation, flags, codec,
                              plaintext, frame)
        d = self.dir_of(oid)
        if not os.path.isdir(d):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreIOError(f"cannot create object directory: {exc.strerror}") from exc
        write_new(self.path(oid), blob)
        with self._count_lock:
            self._written += 1
        return ref

    def sync(self, force: bool = False) -> None:
        """Make every object written so far durable (one syncfs, thread-safe).

        ``force`` also covers objects a previous, crashed daemon left in the
        page cache.  A failed sync is final for this mount: the kernel marks
        the pages clean after reporting the error once, so a retry could
        falsely succeed.
        """
        with self._count_lock:
            target = self._written
        with self._sync_lock:
            if self._sync_failed:
                raise StoreIOError(self._sync_failed)
            if self._synced >= target and not force:
                return
            with self._count_lock:
                upto = self._written
            try:
                if self._sync_fd is None:
                    self._sync_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                sync_filesystem(self._sync_fd)
            except OSError as exc:
                self._sync_failed = (f"Syncing the objects failed ({exc.strerror}); the store "
                                     "is not written any more: unmount, check the disk, mount "
                                     "again (the journal keeps every change).")
                raise StoreIOError(self._sync_failed) from exc
            self._synced = upto

    def close(self) -> None:
        if self._sync_fd is not None:
            os.close(self._sync_fd)
            self._sync_fd = None

    # --- reading --------------------------------------------------------------
    def load(self, oid: bytes) -> bytes:
        try:
            with open(self.path(oid), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise ObjectDamaged(oid, "is missing") from exc
        except OSError as exc:
            raise StoreIOError(f"reading object {oid.hex()} failed: {exc.strerror}") from exc

    def open_context(self, oid: bytes, blob: bytes) -> ChunkContext:
        """Authenticate and parse the context block (usable without the index)."""
        return self._open_context(oid, blob)[0]

    def _open_context(self, oid: bytes, blob: bytes) -> tuple[ChunkContext, bytes]:
        if len(blob) < fmt.OBJ_HEADER_LEN + fmt.TAG_LEN:
            raise ObjectDamaged(oid, "is truncated")
        if blob[:fmt.OBJ_PREFIX.size] != _PREFIX:
            magic, version, kind, _ = fmt.OBJ_PREFIX.unpack_from(blob)
            if magic == fmt.OBJ_MAGIC and version > fmt.FORMAT_VERSION:
                raise ObjectDamaged(oid, f"has format version {version}, newer than this dcmfs")
            raise ObjectDamaged(oid, "has a damaged header")
        start = fmt.OBJ_PREFIX.size
        end = start + fmt.NONCE_LEN + fmt.CTX_SEALED_LEN
        try:
            ctx = self._header.open(memoryview(blob)[start:end], self._aad(oid))
        except crypto.AuthenticationFailed as exc:
            raise ObjectDamaged(oid, "failed authentication of its context") from exc
        fields = fmt.CTX_STRUCT.unpack(ctx)
        return ChunkContext(*fields[:6], *fields[7:]), ctx

    def read(self, cipher: crypto.Gcm, file_id: bytes, ino: int, index: int, ref: ChunkRef,
             blob: bytes | None = None) -> bytes:
        """Authenticate, check the context against the index, decompress.

        Raises
        ------
        ObjectDamaged
            Missing, truncated, altered, moved, swapped or rolled-back object.
        """
        oid = ref.oid
        if blob is None:
            blob = self.load(oid)
        ctx, ctx_plain = self._open_context(oid, blob)
        expected = ChunkContext(file_id, ino, index, ref.generation, ref.codec, ref.flags,
                                ref.plain_len, ref.stored_len)
        if ctx != expected:
            if ctx.file_id != file_id or ctx.index != index:
                raise ObjectDamaged(oid, "belongs to another file or position (swapped)")
            if ctx.generation != ref.generation:
                raise ObjectDamaged(oid, f"is generation {ctx.generation}, index expects "
                                         f"{ref.generation} (rolled back)")
            raise ObjectDamaged(oid, "does not match its index entry")
        if len(blob) != fmt.OBJ_HEADER_LEN + ref.stored_len + fmt.TAG_LEN:
            raise ObjectDamaged(oid, "has the wrong length")
        start = fmt.OBJ_PREFIX.size + fmt.NONCE_LEN + fmt.CTX_SEALED_LEN
        try:
            payload = cipher.open(memoryview(blob)[start:], self._aad(oid) + ctx_plain)
        except crypto.AuthenticationFailed as exc:
            raise ObjectDamaged(oid, "failed authentication") from exc
        try:
            return self._codecs.decompress(ref.codec, payload, ref.plain_len)
        except IntegrityError as exc:
            raise ObjectDamaged(oid, str(exc)) from exc

    # --- housekeeping ---------------------------------------------------------
    def delete(self, oid: bytes) -> None:
        try:
            os.unlink(self.path(oid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StoreIOError(f"deleting object {oid.hex()} failed: {exc.strerror}") from exc

    def iter_oids(self) -> Iterator[bytes]:
        """Every object id present (temp files are reported by :meth:`iter_temps`)."""
        if not os.path.isdir(self.root):
            return
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            for name in os.listdir(d):
                if len(name) == 32 and not name.startswith(TMP_PREFIX):
                    try:
                        yield bytes.fromhex(name)
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
