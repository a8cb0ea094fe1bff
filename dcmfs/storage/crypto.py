"""Key handling and authenticated encryption (a leaf: imports only errors).

* Master key: 32 random bytes, wrapped with AES-256-GCM under a key-encryption
  key (KEK) derived from a passphrase (Argon2id) or a key file (HKDF-SHA256).
* Sub-keys: HKDF-SHA256 of the master key with a label and context
  (``derive``), so each file has its own data key without storing it.
* Chunk payloads: AES-256-GCM with a random 96-bit nonce under the per-file
  key.  Random nonces are safe for 2^32 seals per key; per-file keys keep each
  key far below that.
* Small values that are sealed under store-wide keys (index values, object
  context blocks) use AES-256-GCM-SIV, whose random-nonce collisions do not
  break confidentiality or authenticity, so the store-wide keys have no
  practical seal limit.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16


class AuthenticationFailed(IntegrityError):
    """Ciphertext or its associated data was altered (or the key is wrong)."""


def random_key() -> bytes:
    return os.urandom(KEY_LEN)


def derive(key: bytes, label: bytes, context: bytes = b"", salt: bytes | None = None) -> bytes:
    """A 256-bit sub-key of ``key`` for ``label`` (and ``context``); a secret
    ``salt`` keys HKDF's extraction, so the sub-key needs it as well as
    ``key`` (a file's secret: crypto-shredding)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt or None,
                info=b"dcmfs/" + label + b"\x00" + context).derive(key)


def kek_from_passphrase(passphrase: bytes, salt: bytes, memory_kib: int,
                        iterations: int, lanes: int) -> bytes:
    return Argon2id(salt=salt, length=KEY_LEN, iterations=iterations, lanes=lanes,
                    memory_cost=memory_kib).derive(passphrase)


def kek_from_keyfile(key_material: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt,
                info=b"dcmfs/keyfile-kek").derive(key_material)


def derive_salted(key_material: bytes, salt: bytes, label: bytes) -> bytes:
    """A 256-bit key from secret ``key_material`` with a random ``salt``
    (the KEK of a key-command slot)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt,
                info=b"dcmfs/" + label).derive(key_material)


#: AEADs can encrypt into a caller's buffer (cryptography >= 45)
_INTO = hasattr(AESGCM, "encrypt_into")


class Gcm:
    """AES-256-GCM with random nonces; blobs are ``nonce || ciphertext || tag``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_after(self, head: bytes, plaintext: bytes, aad: bytes) -> bytearray:
        """``head + seal(plaintext, aad)`` built in one buffer: the
        ciphertext is encrypted into its place, so a chunk is not copied
        again to put its nonce and the object's header before it (two
        copies of each chunk at ingest: issue 17)."""
        nonce = os.urandom(NONCE_LEN)
        if not _INTO:  # cryptography before encrypt_into (pyproject allows 44)
            return bytearray(head + nonce + self._aead.encrypt(nonce, plaintext, aad))
        start = len(head) + NONCE_LEN
        out = bytearray(start + len(plaintext) + TAG_LEN)
        out[:len(head)] = head
        out[len(head):start] = nonce
        self._aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[start:])
        return out

    def open(self, blob: bytes | memoryview, aad: bytes) -> bytes:
        """Raises :class:`AuthenticationFailed` if anything was altered."""
        blob = memoryview(blob)
        try:
            return self._aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except (InvalidTag, ValueError) as exc:
            raise AuthenticationFailed("authentication failed") from exc


class Siv(Gcm):
    """AES-256-GCM-SIV: nonce-misuse resistant, for store-wide keys."""

    __slots__ = ()

    def __init__(self, key: bytes) -> None:  # noqa: super not called on purpose
        self._aead = AESGCMSIV(key)

    def seal_with(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """:meth:`seal` with the caller's nonce (unique per seal: a random
        prefix and a counter; the audit trail saves a getrandom(2) a record).
        A repeated nonce would show only that two plaintexts are equal."""
        return nonce + self._aead.encrypt(nonce, plaintext, aad)
