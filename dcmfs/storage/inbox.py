"""Write-only ingest (feature ``ingest-v1``): the store's recipient key pair
and the sealed inbox a node holding only its public key writes.

The header's ``ingest`` entry holds the recipient's kind and public key in
the clear (authenticated by the header ``mac``) and its private key sealed
under the store key (``wrapped``: AES-256-GCM under HKDF(store key,
``ingest-key``, store id), associated data the store id and the entry's
other fields), so every slot that opens the store opens it, slots added
later included, and nothing needs re-sealing when slots change:

.. code-block:: json

    {"ingest": {"kind": "x25519" | "rsa-oaep-3072", "created": "...",
                "public": "<hex: raw X25519 key, or DER SubjectPublicKeyInfo>",
                "wrapped": "<hex nonce|AES-256-GCM(..., private key)|tag>"}}

An ingest mount (``-o recipient=FILE``) writes only under
``STORE/inbox/<session>/`` (a random 128-bit session per mount):

* ``<oid>.obj``: one chunk of a file, ``"DCMI" | u8 1 | nonce |
  AES-256-GCM(file data key, zstd -1 of the chunk) | tag``, associated data
  ``"DCMI" | 1 | store id | session | file id | u32 chunk | u64 plain length``;
* ``<file id>.<seq>.rec``: the file's record, ``"DCMR" | u8 1 | u8 kind |
  encapsulation | nonce | AES-256-GCM(K, JSON record) | tag``, associated
  data ``"DCMR" | 1 | kind | store id | session | file id | u64 seq``.  Kind
  1 (X25519): the encapsulation is an ephemeral public key E (32 bytes) and
  K = HKDF(X25519(e, R), ``inbox-record``, E | R); kind 2 (RSA-OAEP-3072,
  SHA-256): K is random and the encapsulation is its OAEP wrap (384 bytes).
  The JSON record holds what the key holder needs to import the file: its
  path as created, mode, owner, times, size, the file's random data key
  and its chunks (object id, plain and stored length, SHA-256).  Names and
  contents are only ever inside these seals.

A file's record is written again with a higher ``seq`` when the file is
renamed or its mode or times change after it was closed; the importer takes
the highest and removes the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

from . import crypto
from ..errors import IntegrityError, SecretError

FEATURE = "ingest-v1"
INBOX_DIR = "inbox"
KINDS = {"x25519": 1, "rsa-oaep-3072": 2}
RSA_BITS = 3072
CHUNK_MAGIC, RECORD_MAGIC, VERSION = b"DCMI", b"DCMR", 1
RECIPIENT_FORMAT = "dcmfs-recipient-v1"
#: the largest record an importer opens (a file of 64 GiB in 1 MiB chunks
#: is about 10 MB of JSON)
MAX_RECORD = 64 << 20


class InboxDamaged(IntegrityError):
    """An inbox record or chunk does not authenticate or does not match."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _wrap_key(master: bytes, store_id: bytes) -> crypto.Gcm:
    return crypto.Gcm(crypto.derive(master, b"ingest-key", store_id))


def _entry_aad(store_id: bytes, entry: dict) -> bytes:
    return _canonical({"store_id": store_id.hex(),
                       "ingest": {k: v for k, v in entry.items() if k != "wrapped"}})


def new_entry(master: bytes, store_id: bytes, kind: str, created: str) -> dict:
    """A fresh recipient key pair as the header's ``ingest`` entry."""
    from cryptography.hazmat.primitives import serialization as ser
    if kind == "x25519":
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        key = X25519PrivateKey.generate()
        private = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw,
                                    ser.NoEncryption())
        public = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    elif kind == "rsa-oaep-3072":
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        private = key.private_bytes(ser.Encoding.DER, ser.PrivateFormat.PKCS8,
                                    ser.NoEncryption())
        public = key.public_key().public_bytes(ser.Encoding.DER,
                                               ser.PublicFormat.SubjectPublicKeyInfo)
    else:
        raise ValueError(f"not a recipient kind: {kind}")
    return wrap_entry(master, store_id, {"kind": kind, "created": created,
                                         "public": public.hex()}, private)


def wrap_entry(master: bytes, store_id: bytes, entry: dict, private: bytes) -> dict:
    """``entry`` with the recipient's ``private`` key wrapped under ``master``
    (a new entry, or one moved to a new master key generation)."""
    entry = {k: v for k, v in entry.items() if k != "wrapped"}
    entry["wrapped"] = _wrap_key(master, store_id).seal(private, _entry_aad(store_id, entry)).hex()
    return entry


def ingest_key(root: str, header: dict, master: bytes) -> tuple | None:
    """(the header's ``ingest`` entry, its private key), None without one.

    Raises
    ------
    HeaderAlteredError
        The entry does not open with the store key.
    """
    if "ingest" not in header:
        return None
    try:
        return header["ingest"], open_entry(master, bytes.fromhex(header["store_id"]),
                                            header["ingest"])
    except (crypto.AuthenticationFailed, TypeError, ValueError) as exc:
        from ..errors import HeaderAlteredError
        raise HeaderAlteredError(f"The store header at {root} has an ingest key that does not "
                                 "open; restore dcmfs.store from a backup.") from exc


def open_entry(master: bytes, store_id: bytes, entry: dict) -> bytes:
    """The recipient's private key (raises :class:`crypto.AuthenticationFailed`)."""
    try:
        blob = bytes.fromhex(entry["wrapped"])
    except (KeyError, TypeError, ValueError) as exc:
        raise crypto.AuthenticationFailed("no wrapped ingest key") from exc
    return _wrap_key(master, store_id).open(blob, _entry_aad(store_id, entry))


@dataclasses.dataclass(frozen=True)
class Recipient:
    """What an ingest node holds (nothing secret): the exported file."""

    store_id: bytes
    chunk_size: int
    kind: str
    public: bytes = dataclasses.field(repr=False)

    def to_json(self) -> bytes:
        return (json.dumps({"format": RECIPIENT_FORMAT, "store_id": self.store_id.hex(),
                            "chunk_size": self.chunk_size, "kind": self.kind,
                            "public": self.public.hex()}, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Recipient":
        """Raises :class:`SecretError` for a file that is not a recipient."""
        try:
            d = json.loads(data)
            if d.get("format") != RECIPIENT_FORMAT or d.get("kind") not in KINDS:
                raise ValueError("format")
            r = cls(bytes.fromhex(d["store_id"]), int(d["chunk_size"]), d["kind"],
                    bytes.fromhex(d["public"]))
            if len(r.store_id) != 16 or not 4096 <= r.chunk_size <= 64 << 20:
                raise ValueError("fields")
            r.encapsulate(b"check")  # the public key loads
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SecretError(f"{where} is not a dcmfs recipient file (made by 'dcmfs key "
                              "recipient STORE --export FILE').") from exc
        return r

    def encapsulate(self, aad_head: bytes) -> tuple[bytes, bytes]:
        """(encapsulation, a fresh 256-bit key only the private key recovers)."""
        if self.kind == "x25519":
            from cryptography.hazmat.primitives.asymmetric.x25519 import (X25519PrivateKey,
                                                                          X25519PublicKey)
            from cryptography.hazmat.primitives import serialization as ser
            eph = X25519PrivateKey.generate()
            e_pub = eph.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
            shared = eph.exchange(X25519PublicKey.from_public_bytes(self.public))
            return e_pub, crypto.derive(shared, b"inbox-record", e_pub + self.public)
        from cryptography.hazmat.primitives import serialization as ser
        public = ser.load_der_public_key(self.public)
        if getattr(public, "key_size", 0) != RSA_BITS:
            raise ValueError("not an RSA-3072 key")
        key = crypto.random_key()
        return public.encrypt(key, _oaep()), key


def _oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _decapsulate(kind: str, private: bytes, blob: bytes, public: bytes) -> tuple[bytes, int]:
    """(K, bytes of the encapsulation) of a record."""
    try:
        if kind == "x25519":
            from cryptography.hazmat.primitives.asymmetric.x25519 import (X25519PrivateKey,
                                                                          X25519PublicKey)
            e_pub = bytes(blob[:32])
            shared = X25519PrivateKey.from_private_bytes(private).exchange(
                X25519PublicKey.from_public_bytes(e_pub))
            return crypto.derive(shared, b"inbox-record", e_pub + public), 32
        from cryptography.hazmat.primitives import serialization as ser
        n = RSA_BITS // 8
        return ser.load_der_private_key(private, None).decrypt(bytes(blob[:n]), _oaep()), n
    except ValueError as exc:
        raise InboxDamaged("the record's key encapsulation does not open") from exc


def _record_aad(kind: str, store_id: bytes, session: bytes, file_id: bytes, seq: int) -> bytes:
    return (RECORD_MAGIC + bytes([VERSION, KINDS[kind]]) + store_id + session + file_id
            + struct.pack(">Q", seq))


def _chunk_aad(store_id: bytes, session: bytes, file_id: bytes, index: int,
               plain_len: int) -> bytes:
    return (CHUNK_MAGIC + bytes([VERSION]) + store_id + session + file_id
            + struct.pack(">IQ", index, plain_len))


def seal_chunk(key: bytes, store_id: bytes, session: bytes, file_id: bytes, index: int,
               plaintext: bytes, level: int = 1) -> bytes:
    import zstandard
    return CHUNK_MAGIC + bytes([VERSION]) + crypto.Gcm(key).seal(
        zstandard.compress(plaintext, level),
        _chunk_aad(store_id, session, file_id, index, len(plaintext)))


def open_chunk(key: bytes, store_id: bytes, session: bytes, file_id: bytes, index: int,
               blob: bytes, plain_len: int, digest: bytes) -> bytes:
    """The plaintext of one inbox chunk, authenticated and checked against
    the record (length and SHA-256); raises :class:`InboxDamaged`."""
    import zstandard
    if blob[:5] != CHUNK_MAGIC + bytes([VERSION]):
        raise InboxDamaged(f"chunk {index} has a damaged header")
    try:
        payload = crypto.Gcm(key).open(memoryview(blob)[5:], _chunk_aad(
            store_id, session, file_id, index, plain_len))
        plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=plain_len) \
            if plain_len else b""
    except (crypto.AuthenticationFailed, zstandard.ZstdError) as exc:
        raise InboxDamaged(f"chunk {index} fails authentication") from exc
    if len(plain) != plain_len or hashlib.sha256(plain).digest() != digest:
        raise InboxDamaged(f"chunk {index} does not match its record")
    return plain


def seal_record(recipient: Recipient, session: bytes, file_id: bytes, seq: int,
                record: dict) -> bytes:
    aad = _record_aad(recipient.kind, recipient.store_id, session, file_id, seq)
    enc, key = recipient.encapsulate(aad)
    return (RECORD_MAGIC + bytes([VERSION, KINDS[recipient.kind]]) + enc
            + crypto.Gcm(key).seal(_canonical(record), aad))


def open_record(entry: dict, private: bytes, store_id: bytes, session: bytes, file_id: bytes,
                seq: int, blob: bytes) -> dict:
    """The record of ``blob``; raises :class:`InboxDamaged`."""
    kind = entry["kind"]
    if blob[:6] != RECORD_MAGIC + bytes([VERSION, KINDS[kind]]):
        raise InboxDamaged("the record has a damaged header or another recipient kind")
    key, used = _decapsulate(kind, private, memoryview(blob)[6:], bytes.fromhex(entry["public"]))
    try:
        record = json.loads(crypto.Gcm(key).open(
            memoryview(blob)[6 + used:], _record_aad(kind, store_id, session, file_id, seq)))
    except (crypto.AuthenticationFailed, ValueError) as exc:
        raise InboxDamaged("the record fails authentication (altered, moved or swapped)") \
            from exc
    if not isinstance(record, dict):
        raise InboxDamaged("the record is not what an ingest node writes")
    return record


# --- the inbox on disk ------------------------------------------------------------------
def record_name(file_id: bytes, seq: int) -> str:
    return f"{file_id.hex()}.{seq}.rec"


def parse_record_name(name: str) -> tuple[bytes, int] | None:
    parts = name.split(".")
    if len(parts) != 3 or parts[2] != "rec" or len(parts[0]) != 32 or not parts[1].isdigit():
        return None
    try:
        return bytes.fromhex(parts[0]), int(parts[1])
    except ValueError:
        return None


def sessions(root: str) -> list[tuple[bytes, str]]:
    """(session id, its directory) of every inbox session of the store."""
    base = os.path.join(root, INBOX_DIR)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(base, name)
        if len(name) == 32 and os.path.isdir(path) and not os.path.islink(path):
            try:
                out.append((bytes.fromhex(name), path))
            except ValueError:
                continue
    return out


def records(session_dir: str) -> dict[bytes, list[int]]:
    """{file id: its record seqs, ascending} of one session directory."""
    out: dict[bytes, list[int]] = {}
    for name in os.listdir(session_dir):
        parsed = parse_record_name(name)
        if parsed is not None:
            out.setdefault(parsed[0], []).append(parsed[1])
    return {k: sorted(v) for k, v in out.items()}


def read_small(path: str, limit: int = MAX_RECORD) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InboxDamaged("an inbox file is larger than dcmfs writes")
    return data
