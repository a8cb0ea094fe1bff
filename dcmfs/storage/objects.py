"""Sealed chunk objects in the backing store.

An object is immutable and has a random 128-bit id; it is stored in the
store's :class:`~dcmfs.storage.backend.Backend` under the name
``objects/<first two hex digits>/<32 hex digits>`` (on disk, the store
directory: a file of that path; with an S3 store, the write-back cache in
front of the bucket, :mod:`dcmfs.storage.cache`).  The byte layout is in
``format.py`` and ``docs/format.md``.  Reads authenticate the context block
and the payload before anything is decompressed, and decompress with a cap.
"""

from __future__ import annotations

import collections
import os
import secrets
import threading
from typing import NamedTuple

from . import crypto, frames
from .. import format as fmt
from .codec import IMAGE_CODECS, CodecMismatch, Codecs, FrameSpec
from .backend import Backend, BackendMissing, LocalBackend
from .cache import CachedBackend
from .damage import (AUTH, DECODE, LENGTH, MISMATCH, MISSING, NEWER, ROLLED_BACK,  # noqa: F401
                     SWAPPED, ObjectDamaged, object_name)
from .filekeys import FileKeys
from .framed import _PREFIX3, FramedObjects
from .housekeeping import ObjectHousekeeping
from .digest import Digester
from .durable import sync_filesystem
from ..errors import IntegrityError, StoreIOError


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
    #: SHA-256 of the plaintext (see :mod:`dcmfs.storage.digest`); None in
    #: records written before the tree digest
    digest: bytes | None = None


def stored_bytes(ref: ChunkRef) -> int:
    """Bytes one object of layout 2 or 3 occupies in the store."""
    return fmt.OBJ_HEADER_LEN + ref.stored_len + fmt.TAG_LEN


def file_oids(refs) -> list[bytes]:
    """The ids of the refs whose objects are files (not kept in the index:
    those go with their records, never by a later deletion)."""
    return [r.oid for r in refs if not r.flags & _INLINE]


class ChunkContext(NamedTuple):
    """The sealed context block of an object: which object it is, whose chunk."""

    oid: bytes
    file_id: bytes
    ino: int
    index: int
    generation: int
    codec: int
    flags: int
    plain_len: int
    stored_len: int


_PREFIX = fmt.OBJ_PREFIX.pack(fmt.OBJ_MAGIC, fmt.OBJECT_VERSION, fmt.OBJ_KIND_CHUNK, 0)
_FRAMED = fmt.CHUNK_FLAG_FRAMED
_INLINE = fmt.CHUNK_FLAG_INLINE


class ObjectStore(FramedObjects, ObjectHousekeeping):
    """``backend``: where the objects live (default: the store directory
    itself); :meth:`path` is always the object's file in the store
    directory (with an S3 store, its copy in the cache)."""

    def __init__(self, root: str, store_id: bytes, master_key: bytes, codecs: Codecs,
                 verify_writes: bool = True, backend: Backend | None = None,
                 epoch_keys: dict | None = None, epoch: int = 0, framed: bool = True) -> None:
        self.root = os.path.join(root, fmt.OBJECTS_DIR)
        self.backend = backend if backend is not None else LocalBackend(root)
        self._store_id = store_id
        self._master = master_key
        #: {key epoch: key} (0: the store key) and the epoch new objects use
        self.epoch_keys = dict(epoch_keys or {0: master_key})
        self.epoch = epoch
        #: the master key's context sealer first (objects of every store
        #: before ``key-generations-v1``), then each live epoch's: a context
        #: block is sealed under the key of the epoch its payload is under
        #: (:meth:`_ctx_sealer`), and opened by trying these
        self._contexts: dict[bytes, crypto.Siv] = {}
        self._codecs = codecs
        self._verify = verify_writes
        #: write chunks asked for zstd and longer than a frame as framed
        #: objects (layout 3, :mod:`dcmfs.storage.frames`)
        self.framed = framed
        #: opened frame tables of framed objects: oid -> (cipher, associated
        #: data, frame starts); ids are never reused, so entries never go stale
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._tables_lock = threading.Lock()
        #: objects written / made durable so far (sync waits for a syncfs that
        #: started after the writes it must cover)
        self._written = 0
        self._synced = 0
        self._count_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync_fd: int | None = None
        self._sync_failed: str | None = None
        self._digests = Digester()
        #: where inline objects are read and staged (the index's
        #: :class:`~dcmfs.index.inline.InlineRows`; None: no index opened)
        self.inline = None
        #: objects of at most this many bytes are written inline (0: none;
        #: the opener sets :data:`~dcmfs.format.INLINE_MAX` for a store
        #: with ``inline-small-v1``)
        self.inline_max = 0

    # --- naming ---------------------------------------------------------------
    @staticmethod
    def new_oid() -> bytes:
        return secrets.token_bytes(16)

    def path(self, oid: bytes) -> str:
        h = oid.hex()
        return os.path.join(self.root, h[:2], h)

    def dir_of(self, oid: bytes) -> str:
        return os.path.join(self.root, oid.hex()[:2])

    @property
    def store_id(self) -> bytes:
        return self._store_id

    def file_cipher(self, file_id: bytes, secret: bytes) -> FileKeys:
        """One file's data keys (HKDF of each epoch's key; epoch 0 is the
        store key, as before any rotation); ``secret``: the file's own, from
        its inode record (b"": a file made before ``file-secrets-v1``)."""
        return FileKeys(self, file_id, secret)

    def _ctx_sealer(self, epoch: int) -> crypto.Siv:
        """The context block's AEAD of an object sealed under ``epoch``: HKDF
        of that epoch's key, so no key older than the object's own opens
        any part of it (epoch 0: the store key, as before any rotation)."""
        key = self.epoch_keys[epoch]
        siv = self._contexts.get(key)
        if siv is None:
            siv = self._contexts[key] = crypto.Siv(
                crypto.derive(key, b"object-context", self._store_id))
        return siv

    def _ctx_candidates(self) -> list[tuple[int, crypto.Siv]]:
        """(epoch, sealer) to try on a context block: the newest epoch's
        first, then the master's (objects of an older dcmfs), then the rest."""
        order = [self.epoch] + sorted((e for e in self.epoch_keys if e != self.epoch),
                                      key=lambda e: (self.epoch_keys[e] != self._master, -e))
        return [(e, self._ctx_sealer(e)) for e in order]

    def forget_epochs_but(self, epoch: int) -> None:
        """Drop every key but ``epoch``'s from memory (no object uses them
        any more: a key generation move, :mod:`dcmfs.opened.regen`)."""
        self.epoch_keys = {epoch: self.epoch_keys[epoch]}
        self._contexts = {}
        with self._tables_lock:  # their ciphers are file keys of those epochs
            self._tables.clear()

    def add_epoch(self, epoch: int, key: bytes) -> None:
        """A rotation: every object sealed from now on is under ``epoch``."""
        self.epoch_keys = {**self.epoch_keys, epoch: key}
        self.epoch = epoch

    def _aad(self, oid: bytes) -> bytes:
        return _PREFIX + self._store_id + oid

    @property
    def _ctx_aad(self) -> bytes:
        # no object id here: the context names its object itself, so an object
        # found under another name still says what it is (diagnosis, repair)
        return _PREFIX + self._store_id

    # --- sealing --------------------------------------------------------------
    @property
    def codecs(self) -> Codecs:
        """The codecs objects are compressed with (their settings)."""
        return self._codecs

    def seal(self, cipher: FileKeys, oid: bytes, file_id: bytes, ino: int, index: int,
             generation: int, flags: int, codec: int, plaintext: bytes,
             frame: FrameSpec | None = None, payload: bytes | None = None,
             inline: bool = True) -> tuple[ChunkRef, bytes | bytearray]:
        """``payload``: ``plaintext`` already coded with ``codec`` elsewhere
        (a parser worker); it is checked here like any other result.
        ``inline`` False: an object file whatever its size (:meth:`write`)."""
        with self._digests.sealing():
            return self._seal(cipher, oid, file_id, ino, index, generation, flags, codec,
                              plaintext, frame, payload, inline)

    def _seal(self, cipher, oid, file_id, ino, index, generation, flags, codec, plaintext,
              frame, payload, inline=True) -> tuple[ChunkRef, bytes | bytearray]:
        flags &= ~(_FRAMED | _INLINE)  # decided here, by the codec and the length
        digest = self._digests.later(plaintext)  # hashed meanwhile
        if payload is None and frame is None and self.framed \
                and frames.frameable(codec, len(plaintext)):
            used, flags, stored_len, blob = self._seal_framed(
                cipher, oid, file_id, ino, index, generation, flags, codec, plaintext)
            return ChunkRef(oid, generation, used, flags, len(plaintext), stored_len,
                            digest=digest()), blob
        coded_elsewhere = payload is not None
        if payload is None:
            used, payload = self._codecs.compress(codec, plaintext, frame)
        else:
            used = codec
        if used == 0 and payload != plaintext:
            raise CodecMismatch("a stored chunk is not its plaintext; not stored")
        if used != 0 and (self._verify or used in IMAGE_CODECS or coded_elsewhere):
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
        if inline and self.inline_max \
                and fmt.OBJ_HEADER_LEN + stored_len + fmt.TAG_LEN <= self.inline_max:
            flags |= _INLINE
        epoch = cipher.epoch  # once: a rotation may happen meanwhile
        ctx = fmt.CTX_STRUCT.pack(oid, file_id, ino, index, generation, used, flags,
                                  epoch, len(plaintext), stored_len)
        sealed_ctx = self._ctx_sealer(epoch).seal(ctx, self._ctx_aad)
        # prefix, context and sealed payload in one buffer, the payload
        # encrypted into place (no copy of the chunk to join them)
        blob = cipher.cipher(epoch, oid).seal_after(_PREFIX + sealed_ctx, payload,
                                                    self._aad(oid) + ctx)
        return ChunkRef(oid, generation, used, flags, len(plaintext), stored_len,
                        digest=digest()), blob

    def write(self, cipher: FileKeys, file_id: bytes, ino: int, index: int, generation: int,
              flags: int, codec: int, plaintext: bytes, frame: FrameSpec | None = None,
              payload: bytes | None = None, inline: bool = True) -> ChunkRef:
        """Seal and write one chunk object (thread-safe).  ``inline`` False:
        an object file even when it is small enough for the index (the
        re-encoder's output: see docs/format.md, "Inline objects").

        Not durable yet: :meth:`sync` makes every object written so far
        durable; the core calls it before any durable index state (journal
        sync, checkpoint) may refer to them.
        """
        oid = self.new_oid()
        ref, blob = self.seal(cipher, oid, file_id, ino, index, generation, flags, codec,
                              plaintext, frame, payload, inline)
        if ref.flags & _INLINE:  # put by the operation that commits its record
            self.inline.stage(oid, blob)
        else:
            self._put(oid, blob, hold=codec == 0)
        return ref

    def _put(self, oid: bytes, blob: bytes, hold: bool = False) -> None:
        # a chunk sealed uncompressed on purpose is the re-encoder's input:
        # a write-back cache keeps it longer before uploading it
        created = (self.backend.create(object_name(oid), blob, hold=True)
                   if hold and isinstance(self.backend, CachedBackend)
                   else self.backend.create(object_name(oid), blob))
        if not created:
            raise StoreIOError(f"object {oid.hex()} exists already")
        with self._count_lock:
            self._written += 1

    def sync(self, force: bool = False, upload: bool = False) -> None:
        """Make every object written so far durable (one syncfs, thread-safe).

        ``force`` also covers objects a previous, crashed daemon left in the
        page cache.  ``upload``: with a remote backend, also wait until every
        object written so far is in the bucket (``-o s3_sync=1``).  A failed sync is final for this mount: the kernel marks
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
        if upload and hasattr(self.backend, "drain"):
            self.backend.drain()

    def close(self) -> None:
        self._digests.close()
        if isinstance(self.backend, LocalBackend):  # its warmers and kept files
            self.backend.close()
        if self._sync_fd is not None:
            os.close(self._sync_fd)
            self._sync_fd = None

    # --- reading --------------------------------------------------------------
    def load(self, oid: bytes, ino: int | None = None, inline: bool | None = None) -> bytes:
        """The stored bytes of an object: ``inline`` True, of the inline
        object ``oid`` of inode ``ino``; None (``ino`` given), wherever it is."""
        if inline or (inline is None and ino is not None):
            blob = self.inline.get(ino, oid) if self.inline is not None else None
            if blob is not None:
                return blob
            if inline:
                raise ObjectDamaged(oid, "is missing (inline)", MISSING)
        try:
            return self.backend.get(object_name(oid))
        except BackendMissing as exc:
            raise ObjectDamaged(oid, "is missing", MISSING) from exc

    def open_context(self, oid: bytes, blob: bytes) -> ChunkContext:
        """Authenticate and parse the context block (usable without the index)."""
        return self._open_context(oid, blob)[0]

    def epoch_of(self, oid: bytes, ino: int | None = None) -> int:
        """The key epoch the object stored as ``oid`` is sealed under
        (reading only its header; ``ino``: inline objects of that inode
        too).  Raises :class:`ObjectDamaged`."""
        return self._open_context(oid, self._head(oid, ino))[3]

    def epochs_of(self, oid: bytes, ino: int | None = None) -> set[int]:
        """Every key epoch the object stored as ``oid`` needs: its payload's
        and its context block's (an object sealed under a later epoch by a
        dcmfs before ``key-generations-v1`` has its context under the store
        key).  Raises :class:`ObjectDamaged`."""
        found = self._open_context(oid, self._head(oid, ino))
        return {found[3], found[4]}

    def context_of(self, oid: bytes, ino: int | None = None) -> ChunkContext:
        """The context of the object stored as ``oid``, reading only its
        header (``ino``: inline objects of that inode too).

        Raises :class:`ObjectDamaged` (missing, or not authentic)."""
        return self.open_context(oid, self._head(oid, ino))

    def _head(self, oid: bytes, ino: int | None = None) -> bytes:
        if ino is not None and self.inline is not None:
            blob = self.inline.get(ino, oid)
            if blob is not None:
                return blob[:fmt.OBJ_HEADER_LEN + fmt.TAG_LEN]
        try:
            return self.backend.get(object_name(oid), 0, fmt.OBJ_HEADER_LEN + fmt.TAG_LEN)
        except BackendMissing as exc:
            raise ObjectDamaged(oid, "is missing", MISSING) from exc

    def _open_context(self, oid: bytes, blob: bytes
                      ) -> tuple[ChunkContext, bytes, int, int, int]:
        """(context, its plaintext, header length, key epoch, the epoch whose
        key opened the context) of an object of either layout."""
        if len(blob) < fmt.OBJ_PREFIX.size:
            raise ObjectDamaged(oid, "is truncated", LENGTH)
        magic, version, kind, reserved = fmt.OBJ_PREFIX.unpack_from(blob)
        if magic != fmt.OBJ_MAGIC or kind != fmt.OBJ_KIND_CHUNK or reserved:
            raise ObjectDamaged(oid, "has a damaged header")
        if version not in fmt.OBJECT_VERSIONS:
            if version > max(fmt.OBJECT_VERSIONS):
                raise ObjectDamaged(oid, f"has format version {version}, newer than this dcmfs",
                                    NEWER)
            raise ObjectDamaged(oid, "has a damaged header")
        v1 = version == 1
        framed = version == fmt.OBJECT_VERSION_FRAMED
        header_len = fmt.OBJ1_HEADER_LEN if v1 else fmt.OBJ_HEADER_LEN
        if len(blob) < header_len + fmt.TAG_LEN:
            raise ObjectDamaged(oid, "is truncated", LENGTH)
        start = fmt.OBJ_PREFIX.size
        end = header_len - fmt.NONCE_LEN
        prefix = bytes(blob[:fmt.OBJ_PREFIX.size])
        aad = prefix + self._store_id + (oid if v1 else b"")
        sealed = memoryview(blob)[start:end]
        for ctx_epoch, siv in self._ctx_candidates():
            try:
                ctx = siv.open(sealed, aad)
                break
            except crypto.AuthenticationFailed:
                continue
        else:
            raise ObjectDamaged(oid, "failed authentication of its context")
        if v1:  # the id was in the associated data: it is the name it opened under
            fields = fmt.CTX1_STRUCT.unpack(ctx)
            return ChunkContext(oid, *fields[:6], *fields[7:]), ctx, header_len, 0, ctx_epoch
        fields = fmt.CTX_STRUCT.unpack(ctx)
        if framed != bool(fields[6] & _FRAMED):  # cannot be sealed so: tampering or a bug
            raise ObjectDamaged(oid, "has a layout its context does not name", MISMATCH)
        return (ChunkContext(*fields[:7], *fields[8:]), ctx, header_len, fields[7],
                ctx_epoch)

    def read(self, cipher: FileKeys, file_id: bytes, ino: int, index: int, ref: ChunkRef,
             blob: bytes | None = None) -> bytes:
        """Authenticate, check the context against the index, decompress.

        Raises
        ------
        ObjectDamaged
            Missing, truncated, altered, moved, swapped or rolled-back object.
        """
        payload = self._payload(cipher, file_id, ino, index, ref, blob)[0]
        try:
            if ref.flags & _FRAMED:
                return frames.decode_all(payload, ref.plain_len)
            return self._codecs.decompress(ref.codec, payload, ref.plain_len)
        except IntegrityError as exc:
            raise ObjectDamaged(ref.oid, str(exc), DECODE) from exc

    def reseal(self, cipher: FileKeys, file_id: bytes, ino: int, index: int,
               ref: ChunkRef) -> ChunkRef | None:
        """The chunk ``ref`` names sealed again under the newest key epoch,
        as a new object (the payload as stored: nothing is decoded; same
        generation, codec, flags and lengths); None if it already is.

        Raises
        ------
        ObjectDamaged
            The old object is not intact (it is left as it is).
        """
        payload, epoch, ctx_epoch = self._payload(cipher, file_id, ino, index, ref, None)
        newest = cipher.epoch
        if epoch == newest and ctx_epoch == newest:
            return None
        oid = self.new_oid()
        ctx = fmt.CTX_STRUCT.pack(oid, file_id, ino, index, ref.generation, ref.codec,
                                  ref.flags, newest, ref.plain_len, ref.stored_len)
        sealer = self._ctx_sealer(newest)
        if ref.flags & _FRAMED:  # every frame sealed again, bound to the new id
            blob = b"".join((_PREFIX3, sealer.seal(ctx, _PREFIX3 + self._store_id),
                             frames.seal(cipher.cipher(newest, oid),
                                         _PREFIX3 + self._store_id + oid + ctx, payload)))
        else:
            blob = b"".join((_PREFIX, sealer.seal(ctx, self._ctx_aad),
                             cipher.cipher(newest, oid).seal(payload, self._aad(oid) + ctx)))
        if ref.flags & _INLINE:  # stays inline: the same length, the same flags
            self.inline.stage(oid, blob)
        else:
            self._put(oid, blob)
        return ref._replace(oid=oid)

    def _payload(self, cipher: FileKeys, file_id: bytes, ino: int, index: int, ref: ChunkRef,
                 blob: bytes | None) -> tuple[bytes | list[bytes], int, int]:
        """(the authenticated payload, its key epoch, its context's key
        epoch) of the object ``ref`` names; of a framed object, the list of
        its frames' payloads."""
        oid = ref.oid
        if blob is None:
            blob = self.load(oid, ino, bool(ref.flags & _INLINE))
        ctx_plain, header_len, epoch, ctx_epoch = self._checked_context(file_id, ino, index,
                                                                        ref, blob)
        if len(blob) != header_len + ref.stored_len + fmt.TAG_LEN:
            raise ObjectDamaged(oid, "has the wrong length", LENGTH)
        start = header_len - fmt.NONCE_LEN
        aad = bytes(blob[:fmt.OBJ_PREFIX.size]) + self._store_id + oid + ctx_plain
        gcm = cipher.cipher(epoch, oid)
        try:
            if not ref.flags & _FRAMED:
                return gcm.open(memoryview(blob)[start:], aad), epoch, ctx_epoch
            view = memoryview(blob)
            starts = frames.open_table(gcm, aad, ref.plain_len,
                                       view[start:frames.table_end(ref.plain_len)])
            if starts[-1] != len(blob):
                raise ObjectDamaged(oid, "has the wrong length", LENGTH)
            count = len(starts) - 1
            return [frames.open_frame(gcm, aad, k, count, view[starts[k]:starts[k + 1]])
                    for k in range(count)], epoch, ctx_epoch
        except crypto.AuthenticationFailed as exc:
            raise ObjectDamaged(oid, "failed authentication") from exc

    def _checked_context(self, file_id: bytes, ino: int, index: int, ref: ChunkRef,
                         blob: bytes) -> tuple[bytes, int, int, int]:
        """(CTX plaintext, header length, key epoch, the context's key epoch)
        of ``blob``, the object ``ref`` names, once its context matches what
        the index expects."""
        oid = ref.oid
        ctx, ctx_plain, header_len, epoch, ctx_epoch = self._open_context(oid, blob)
        expected = ChunkContext(oid, file_id, ino, index, ref.generation, ref.codec, ref.flags,
                                ref.plain_len, ref.stored_len)
        if ctx != expected:
            if ctx.oid != oid and ctx.file_id == file_id and ctx.index == index \
                    and ctx.generation <= ref.generation:
                raise ObjectDamaged(oid, f"was replaced by an older object of the same chunk "
                                         f"(generation {ctx.generation}, index expects "
                                         f"{ref.generation}): rolled back", ROLLED_BACK)
            if ctx.oid != oid:
                where = ("of chunk %d of the same file" % ctx.index if ctx.file_id == file_id
                         else "of another file")
                raise ObjectDamaged(oid, f"holds object {ctx.oid.hex()} {where} "
                                         "(swapped or moved)", SWAPPED)
            raise ObjectDamaged(oid, "does not match its index entry", MISMATCH)
        return ctx_plain, header_len, epoch, ctx_epoch
