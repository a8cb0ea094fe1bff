"""One file's data keys: per key epoch, HKDF of the epoch's key and the
file's secret (a part of :mod:`dcmfs.storage.objects`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import crypto
from .damage import ObjectDamaged

if TYPE_CHECKING:
    from .objects import ObjectStore


class FileKeys:
    """One file's data keys: one per live key epoch (HKDF of that epoch's
    key), the newest sealing.  Objects name their epoch in the context
    block (the CTX field after the flags), so a read picks the key.

    ``secret``: the file's random secret from its index record (feature
    ``file-secrets-v1``), the HKDF's salt (see :func:`file_key`), so that the key can
    no longer be made once the record is gone from every copy of the
    index (crypto-shredding); b"" for a file made before the feature."""

    __slots__ = ("_objects", "_file_id", "_secret", "_ciphers")

    def __init__(self, objects: "ObjectStore", file_id: bytes, secret: bytes = b"") -> None:
        self._objects, self._file_id, self._secret = objects, file_id, secret
        self._ciphers: dict[int, crypto.Gcm] = {}

    @property
    def epoch(self) -> int:
        """The epoch new objects are sealed under: the store's newest, also
        for a file opened before a rotation."""
        return self._objects.epoch

    def cipher(self, epoch: int, oid: bytes = b"") -> crypto.Gcm:
        """Raises :class:`ObjectDamaged` for an epoch whose key is gone."""
        c = self._ciphers.get(epoch)
        if c is None:
            key = self._objects.epoch_keys.get(epoch)
            if key is None:
                raise ObjectDamaged(oid, f"is sealed under key epoch {epoch}, which this store "
                                         "does not hold (destroyed, or from another store)")
            c = self._ciphers[epoch] = crypto.Gcm(
                file_key(key, self._objects.store_id, self._file_id, self._secret))
        return c


def file_key(epoch_key: bytes, store_id: bytes, file_id: bytes, secret: bytes = b"") -> bytes:
    """A file's payload key under one key epoch: HKDF-SHA256 of the epoch key,
    info ``file-key`` + store id + file id, and the file's secret as HKDF's
    salt (none for a file made before ``file-secrets-v1``): the extraction
    is then keyed by the secret, so the epoch key alone makes nothing."""
    return crypto.derive(epoch_key, b"file-key", store_id + file_id, salt=secret or None)
