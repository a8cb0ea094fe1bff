"""Sealing and ranged reading of framed chunk objects (layout 3, see
:mod:`dcmfs.storage.frames`), a part of :class:`dcmfs.storage.objects.ObjectStore`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import crypto, frames
from .. import format as fmt
from .backend import BackendMissing
from .codec import CodecMismatch
from .damage import DECODE, LENGTH, MISSING, ObjectDamaged, object_name
from ..errors import IntegrityError

if TYPE_CHECKING:
    from .objects import ChunkRef, FileKeys

_PREFIX3 = fmt.OBJ_PREFIX.pack(fmt.OBJ_MAGIC, fmt.OBJECT_VERSION_FRAMED, fmt.OBJ_KIND_CHUNK, 0)
_FRAMED = fmt.CHUNK_FLAG_FRAMED
_PER = frames.FRAME_SIZE // frames.UNIT_SIZE  # units to a frame


class FramedObjects:
    """The framed half of the object store (its ``backend``, keys, codecs
    and context checks are :class:`~dcmfs.storage.objects.ObjectStore`'s)."""

    def _seal_framed(self, cipher: FileKeys, oid: bytes, file_id: bytes, ino: int, index: int,
                     generation: int, flags: int, codec: int,
                     plaintext: bytes) -> tuple[int, int, int, bytes]:
        """(codec, flags, payload length, the sealed object)."""
        used, coded = frames.code(codec, plaintext, self._codecs.encode_settings()[0])
        if self._verify:
            try:
                again = frames.decode_all(coded, len(plaintext))
            except IntegrityError as exc:
                raise CodecMismatch("zstd could not decode its own frame") from exc
            if again != plaintext:
                raise CodecMismatch("zstd did not reproduce a frame; not stored")
        flags |= _FRAMED
        epoch = cipher.epoch
        ctx = fmt.CTX_STRUCT.pack(oid, file_id, ino, index, generation, used, flags, epoch,
                                  len(plaintext), frames.stored_len(coded))
        sealed_ctx = self._ctx_sealer(epoch).seal(ctx, _PREFIX3 + self._store_id)
        body = frames.seal(cipher.cipher(epoch, oid), _PREFIX3 + self._store_id + oid + ctx,
                           coded)
        return used, flags, frames.stored_len(coded), _PREFIX3 + sealed_ctx + body

    def read_unit(self, cipher: FileKeys, file_id: bytes, ino: int, index: int,
                  ref: ChunkRef, unit: int) -> bytes:
        """The plaintext of one unit, as :meth:`read_units` reads it (its
        frame read and authenticated whole, only the unit decoded): a
        random 4 KiB read's path, without the lists of a range of units."""
        oid = ref.oid
        gcm, aad, starts = self._frame_table(cipher, file_id, ino, index, ref)
        count = len(starts) - 1
        k = unit // _PER
        if k >= count:
            raise ObjectDamaged(oid, "is shorter than its units", LENGTH)
        data = self._frames_span(oid, starts[k], starts[k + 1])
        try:
            payload = frames.open_frame(gcm, aad, k, count, data)
        except crypto.AuthenticationFailed as exc:
            self.forget_kept(oid)  # (fsck --repair may move the right file here)
            raise ObjectDamaged(oid, "failed authentication") from exc
        fl = frames.frame_len(ref.plain_len, k)
        j = unit - k * _PER
        if j >= frames.units_of(fl):
            raise ObjectDamaged(oid, "is shorter than its units", LENGTH)
        try:
            return frames.decode_unit(payload, fl, j)
        except IntegrityError as exc:
            raise ObjectDamaged(oid, str(exc), DECODE) from exc

    def _frames_span(self, oid: bytes, lo: int, hi: int) -> bytes:
        """Bytes ``lo``..``hi`` of a framed object (whole frames), all of
        them: a local store keeps the object file open for the next read
        (:mod:`dcmfs.storage.keptfds`)."""
        name = object_name(oid)
        get = getattr(self.backend, "get_kept", None)
        try:
            data = get(name, lo, hi) if get is not None else self.backend.get(name, lo, hi)
        except BackendMissing as exc:
            raise ObjectDamaged(oid, "is missing", MISSING) from exc
        if len(data) != hi - lo:
            self.forget_kept(oid)
            raise ObjectDamaged(oid, "is truncated", LENGTH)
        return data

    def read_units(self, cipher: FileKeys, file_id: bytes, ino: int, index: int,
                   ref: ChunkRef, first: int, last: int) -> list[bytes]:
        """The plaintext of units ``first``..``last`` (of
        :data:`~dcmfs.storage.frames.UNIT_SIZE` bytes, counted in the chunk)
        of the framed object ``ref`` names, with ranged reads: the header
        and frame table once (checked as :meth:`read` checks them, the
        object's length too), then only the frames they lie in, each
        authenticated whole before its units are decoded.

        Raises
        ------
        ObjectDamaged
            As :meth:`read`.
        """
        oid = ref.oid
        per = frames.FRAME_SIZE // frames.UNIT_SIZE
        gcm, aad, starts = self._frame_table(cipher, file_id, ino, index, ref)
        count = len(starts) - 1
        k0, k1 = first // per, last // per
        if k1 >= count:
            raise ObjectDamaged(oid, "is shorter than its units", LENGTH)
        lo = starts[k0]
        data = self._frames_span(oid, lo, starts[k1 + 1])
        view = memoryview(data)
        out = []
        for k in range(k0, k1 + 1):
            try:
                payload = frames.open_frame(gcm, aad, k, count,
                                            view[starts[k] - lo:starts[k + 1] - lo])
            except crypto.AuthenticationFailed as exc:
                self.forget_kept(oid)  # (fsck --repair may move the right file here)
                raise ObjectDamaged(oid, "failed authentication") from exc
            j0 = first - k * per if k == k0 else 0
            j1 = last - k * per if k == k1 else per - 1
            fl = frames.frame_len(ref.plain_len, k)
            try:
                out += frames.decode_units(payload, fl, j0, min(j1, frames.units_of(fl) - 1))
            except IntegrityError as exc:
                raise ObjectDamaged(oid, str(exc), DECODE) from exc
        return out

    def forget_kept(self, oid: bytes) -> None:
        """Drop the descriptor a local store keeps open for ``oid`` (its
        file was moved, replaced or found damaged: the next read opens the
        name again)."""
        kept = getattr(self.backend, "kept", None)
        if kept is not None:
            kept.forget(object_name(oid))

    #: opened frame tables kept (about 200 bytes each; 1024 cover 1 GiB of chunks)
    TABLES = 1024

    def _frame_table(self, cipher: FileKeys, file_id: bytes, ino: int, index: int,
                     ref: ChunkRef) -> tuple[crypto.Gcm, bytes, list[int]]:
        oid = ref.oid
        with self._tables_lock:
            got = self._tables.get(oid)
            if got is not None:
                self._tables.move_to_end(oid)
                return got
        end = frames.table_end(ref.plain_len)
        try:
            head = self.backend.get(object_name(oid), 0, end)
            size = self.backend.head(object_name(oid))
        except BackendMissing as exc:
            raise ObjectDamaged(oid, "is missing", MISSING) from exc
        ctx_plain, header_len, epoch, _ = self._checked_context(file_id, ino, index, ref, head)
        if size != header_len + ref.stored_len + fmt.TAG_LEN or len(head) != end:
            raise ObjectDamaged(oid, "has the wrong length", LENGTH)
        aad = bytes(head[:fmt.OBJ_PREFIX.size]) + self._store_id + oid + ctx_plain
        gcm = cipher.cipher(epoch, oid)
        try:
            starts = frames.open_table(gcm, aad, ref.plain_len,
                                       memoryview(head)[header_len - fmt.NONCE_LEN:])
        except crypto.AuthenticationFailed as exc:
            raise ObjectDamaged(oid, "failed authentication") from exc
        if starts[-1] != size:
            raise ObjectDamaged(oid, "has the wrong length", LENGTH)
        with self._tables_lock:
            self._tables[oid] = (gcm, aad, starts)
            while len(self._tables) > self.TABLES:
                self._tables.popitem(last=False)
        return gcm, aad, starts

