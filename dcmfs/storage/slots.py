"""Key slots (feature ``key-slots-v1``): the master key wrapped once per slot.

A store's header holds a table of slots (LUKS2's key slots); each wraps the
same master key under its own key-encryption key (KEK), so several admins,
a key file for the boot and a token can all unlock the store, and one can
be added, changed or removed without touching any data (ZFS ``change-key``):

.. code-block:: json

    {"slots": [{"id": 1, "kind": "passphrase", "label": "admin",
                "created": "2026-12-02T19:30:00Z", "salt": "<hex>",
                "argon2id": {"memory_kib": ..., "iterations": ..., "lanes": ...},
                "wrapped": "<hex nonce|ciphertext|tag>"}, ...],
     "next_slot": 2, "mac": "<hex>"}

=============  ==============================================================
kind           KEK
=============  ==============================================================
passphrase     Argon2id(passphrase, salt, the slot's parameters)
keyfile        HKDF-SHA256(key file, salt, ``dcmfs/keyfile-kek``)
credential     the same, of a systemd credential (``LoadCredential[Encrypted]=``)
command        HKDF-SHA256(what the command printed, salt, ``dcmfs/command-kek``)
pkcs11         none: the token's non-extractable AES key seals the master key
               itself (:mod:`dcmfs.storage.pkcs11`)
=============  ==============================================================

A slot's wrap has as associated data the store id and the slot's own fields
(all but ``wrapped``), so a slot cannot move to another store and its
parameters cannot be altered.  Every other header field (features, chunk
size, codec, the slot table itself) is authenticated by ``mac``:
HMAC-SHA256 under HKDF(master, ``header``, store id) of the canonical JSON of
the rest of the header, checked after every unlock: a slot put back after it
was removed, or a slot table altered in place, fails to open (exit 28).  The
command of a ``command`` slot, and the module of a ``pkcs11`` slot, are never
in the header (whoever can write the store could make dcmfs run a program of
their choice); they come from the command line or the instance file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time

from . import crypto
from ..config import KDF_MAX_ITERATIONS, KDF_MAX_LANES, KDF_MAX_MEMORY_KIB, kdf_within_bounds
from ..errors import (ForeignStoreError, HeaderAlteredError, KdfBoundsError, SecretError,
                      WrongKeyError)

#: the audit trail (dcmfs.app.logsetup.AUDIT): slot ids, kinds, labels; never a secret
log = logging.getLogger("dcmfs.audit")

FEATURE = "key-slots-v1"
KINDS = ("passphrase", "keyfile", "credential", "command", "pkcs11")
#: the slot kinds a secret of each kind is tried against: a systemd
#: credential holds a key file's bytes, so either opens the other's slots
UNLOCKS = {"passphrase": ("passphrase",), "keyfile": ("keyfile", "credential"),
           "credential": ("credential", "keyfile"), "command": ("command",),
           "pkcs11": ("pkcs11",)}
#: the fewest bytes a key file, credential or key command must give
MIN_KEY_MATERIAL = 32
MAX_LABEL = 64

WHAT = {"passphrase": "a passphrase", "keyfile": "a key file", "credential": "a systemd credential",
        "command": "a key command", "pkcs11": "a PKCS#11 token"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_label(label: str) -> str:
    """A slot label as the header may hold it: printable ASCII, short.

    Raises
    ------
    SecretError
        It is empty, too long or holds other characters.
    """
    if not label or len(label) > MAX_LABEL or not all(" " <= c <= "~" for c in label):
        raise SecretError(f"A slot label is 1 to {MAX_LABEL} printable ASCII characters "
                          "(it is stored in the clear: never a patient or a secret).")
    return label


def valid_table(header: dict) -> bool:
    """Is the header's slot table well formed (no key needed)?"""
    slots = header.get("slots")
    if not isinstance(slots, list) or not slots or not isinstance(header.get("next_slot"), int):
        return False
    ids = set()
    for s in slots:
        if (not isinstance(s, dict) or s.get("kind") not in KINDS
                or not isinstance(s.get("id"), int) or isinstance(s.get("id"), bool)
                or s["id"] in ids or s["id"] >= header["next_slot"]
                or not isinstance(s.get("wrapped"), str) or not isinstance(s.get("label"), str)):
            return False
        ids.add(s["id"])
    return isinstance(header.get("mac"), str)


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def slot_aad(store_id: str, slot: dict) -> bytes:
    return _canonical({"store_id": store_id,
                       "slot": {k: v for k, v in slot.items() if k != "wrapped"}})


def header_mac(master: bytes, header: dict) -> str:
    key = crypto.derive(master, b"header", bytes.fromhex(header["store_id"]))
    body = _canonical({k: v for k, v in header.items() if k != "mac"})
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def seal_header(master: bytes, header: dict) -> dict:
    """``header`` with its ``mac`` (re)computed."""
    header["mac"] = header_mac(master, header)
    return header


def kek(secret, slot: dict, root: str = "") -> bytes:
    """The KEK ``secret`` gives for ``slot`` (not yet authenticated: the
    Argon2id parameters are bounded before they are used).

    Raises
    ------
    KdfBoundsError, ForeignStoreError, SecretError
    """
    try:
        salt = bytes.fromhex(slot["salt"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ForeignStoreError(f"The store header at {root} has a slot without a valid salt; "
                                "it is damaged (restore it from a backup).") from exc
    kind = slot.get("kind")
    if kind == "passphrase":
        p = slot.get("argon2id")
        if not kdf_within_bounds(p):
            raise KdfBoundsError(
                f"The store header at {root} asks for Argon2id parameters outside the bounds "
                f"dcmfs accepts (at most {KDF_MAX_MEMORY_KIB // 1024 // 1024} GiB of memory, "
                f"{KDF_MAX_ITERATIONS} passes and {KDF_MAX_LANES} lanes), so it was altered "
                "and nothing was derived: restore the header (dcmfs.store) from a backup.")
        return crypto.kek_from_passphrase(secret.value, salt, p["memory_kib"], p["iterations"],
                                          p["lanes"])
    if len(secret.value) < MIN_KEY_MATERIAL:
        raise SecretError(f"{WHAT[secret.kind].capitalize()} gave fewer than "
                          f"{MIN_KEY_MATERIAL} bytes; it is not a dcmfs key.")
    if kind == "command":
        return crypto.derive_salted(secret.value, salt, b"command-kek")
    return crypto.kek_from_keyfile(secret.value, salt)


def new_slot(slot_id: int, secret, label: str, kdf: dict) -> dict:
    """A slot of ``secret``'s kind, without its wrap (see :func:`wrap`)."""
    slot = {"id": slot_id, "kind": secret.kind, "label": check_label(label),
            "created": now()}
    if secret.kind == "pkcs11":
        slot.update(secret.pkcs11.slot_fields())
        return slot
    slot["salt"] = os.urandom(16).hex()
    if secret.kind == "passphrase":
        slot["argon2id"] = dict(kdf)
        if not kdf_within_bounds(slot["argon2id"]):
            raise ValueError(f"Argon2id parameters {kdf} are outside the bounds dcmfs accepts")
    return slot


def wrap(master: bytes, secret, slot: dict, store_id: str, slot_kek: bytes | None = None) -> dict:
    """Set ``slot["wrapped"]``: ``master`` sealed for ``secret``."""
    aad = slot_aad(store_id, slot)
    if slot["kind"] == "pkcs11":
        slot["wrapped"] = secret.pkcs11.seal(secret.value, master, aad).hex()
    else:
        slot["wrapped"] = crypto.Gcm(slot_kek or kek(secret, slot)).seal(master, aad).hex()
    return slot


def unwrap(secret, slot: dict, store_id: str, root: str = "") -> bytes:
    """The master key if ``secret`` opens ``slot``.

    Raises
    ------
    crypto.AuthenticationFailed
        It does not.
    """
    aad = slot_aad(store_id, slot)
    try:
        blob = bytes.fromhex(slot["wrapped"])
    except ValueError as exc:
        raise crypto.AuthenticationFailed("not hex") from exc
    if slot["kind"] == "pkcs11":
        return secret.pkcs11.open(secret.value, slot, blob, aad)
    return crypto.Gcm(kek(secret, slot, root)).open(blob, aad)


def unlock(header: dict, secret, root: str) -> tuple[bytes, dict]:
    """(master key, the slot that opened) for ``secret``; the header's mac is
    checked with the key.  A failed attempt is logged with the kinds tried,
    never with anything of the secret.

    Raises
    ------
    WrongKeyError
        No slot of the secret's kind opens with it.
    HeaderAlteredError
        A slot opened, but the rest of the header is not what a key holder wrote.
    """
    store_id = header["store_id"]
    kinds = UNLOCKS[secret.kind]
    candidates = [s for s in header["slots"] if s["kind"] in kinds]
    for slot in candidates:
        try:
            master = unwrap(secret, slot, store_id, root)
        except crypto.AuthenticationFailed:
            continue
        except SecretError:  # a token's PIN, module or label
            log.warning("unlock failed: %s could not be used for slot %d", WHAT[secret.kind],
                        slot["id"])
            raise
        if not hmac.compare_digest(header["mac"], header_mac(master, header)):
            log.warning("unlock refused: slot %d (%s) opened but the store header's "
                        "authentication failed", slot["id"], slot["kind"])
            raise HeaderAlteredError(
                f"The store header at {root} was altered by someone without the key (a slot "
                "put back or changed, or another field edited); restore dcmfs.store from a "
                "backup made after the last 'dcmfs key' command.")
        return master, slot
    have = sorted({s["kind"] for s in header["slots"]})
    log.warning("unlock failed: %s opened none of the store's %d %s slot(s)",
                WHAT[secret.kind], len(candidates), "/".join(kinds))
    if not candidates:
        raise WrongKeyError(f"The store at {root} has no slot that {WHAT[secret.kind]} opens "
                            f"(its slots: {', '.join(have)}); 'dcmfs key list {root}' shows "
                            "them.")
    raise WrongKeyError(f"The key does not open the store at {root}: wrong "
                        f"{'passphrase' if secret.kind == 'passphrase' else WHAT[secret.kind][2:]}"
                        " (or a damaged store header).")


def from_legacy(header: dict, master: bytes, legacy_kek: bytes) -> dict:
    """The header of a single-wrap store (formats 1-3, ``key``) as a slot
    table: the old wrap becomes slot 1, under the same KEK (the header is no
    longer its associated data, so it is sealed again)."""
    new = {k: v for k, v in header.items() if k != "key"}
    old = header["key"]
    slot = {"id": 1, "kind": old["kind"], "label": "initial", "created": now(),
            "salt": old["salt"]}
    if old["kind"] == "passphrase":
        slot["argon2id"] = old["argon2id"]
    slot["wrapped"] = crypto.Gcm(legacy_kek).seal(master, slot_aad(header["store_id"],
                                                                  slot)).hex()
    new["slots"] = [slot]
    new["next_slot"] = 2
    new["features"] = sorted(set(header.get("features", [])) | {FEATURE})
    return seal_header(master, new)


def kinds(header: dict) -> set[str]:
    """The slot kinds of a header (of either layout), without a key."""
    if "slots" in header:
        return {s["kind"] for s in header["slots"]}
    return {header["key"]["kind"]}
