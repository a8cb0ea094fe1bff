"""Key slots (feature ``key-slots-v1``) and key epochs (``key-epochs-v1``).

A store's header holds a table of slots (LUKS2's key slots). Each slot has
an X25519 key pair: its private key is wrapped under the slot's own
key-encryption key (KEK), its public key is in the clear, and every key the
store uses - the store key (epoch 0: the index, names, journal, object
contexts and the contents written before any rotation) and one data key per
later *key epoch* (``dcmfs key rotate``) - is sealed to every slot's public
key.  So several admins, a key file for the boot and a token can all unlock
the store; a slot is added, changed or removed without touching any data
(ZFS ``change-key``); and a rotation seals a new data key to every slot
without their secrets, while a copy of an older header opens no epoch made
after it:

.. code-block:: json

    {"slots": [{"id": 1, "kind": "passphrase", "label": "admin",
                "created": "2026-12-02T19:30:00Z", "salt": "<hex>",
                "argon2id": {"memory_kib": ..., "iterations": ..., "lanes": ...},
                "public": "<X25519 public key, hex>",
                "wrapped": "<hex nonce|AES-256-GCM(KEK, X25519 private key)|tag>"}, ...],
     "next_slot": 2,
     "epochs": [{"epoch": 0, "created": "...", "sealed": {"1": "<hex>", ...}}, ...],
     "epoch": 0, "destroyed": [{"epoch": 1, "destroyed": "..."}],
     "mac": "<hex>"}

=============  ==============================================================
kind           KEK
=============  ==============================================================
passphrase     Argon2id(passphrase, salt, the slot's parameters)
keyfile        HKDF-SHA256(key file, salt, ``dcmfs/keyfile-kek``)
credential     the same, of a systemd credential (``LoadCredential[Encrypted]=``)
command        HKDF-SHA256(what the command printed, salt, ``dcmfs/command-kek``)
pkcs11         none: the token's non-extractable AES key seals the private key
               itself (:mod:`dcmfs.storage.pkcs11`)
=============  ==============================================================

A slot's wrap has as associated data the store id and the slot's own fields
(all but ``wrapped``, the public key included).  ``sealed[slot id]`` of an
epoch is ``ephemeral X25519 public key (32) | nonce | AES-256-GCM(HKDF(shared
secret, ephemeral | slot public key), epoch key) | tag`` with associated data
store id, slot id and epoch.  Every other header field (features, chunk
size, codec, the slot and epoch tables) is authenticated by ``mac``:
HMAC-SHA256 under HKDF(store key, ``header``, store id) of the canonical JSON
of the rest of the header, checked after every unlock: a slot put back after
it was removed, or a table altered in place, fails to open (exit 35).  The
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
#: a store that was rotated at least once (objects name their key epoch)
EPOCHS_FEATURE = "key-epochs-v1"
#: a store whose *key generation* moved off epoch 0 (``key rotate --finish``):
#: ``master`` names the epoch whose key every derived key comes from
GENERATIONS_FEATURE = "key-generations-v1"
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
                or not all(isinstance(s.get(k), str) for k in ("wrapped", "label", "public"))):
            return False
        ids.add(s["id"])
    epochs = header.get("epochs")
    if (not isinstance(epochs, list) or not epochs or not isinstance(header.get("epoch"), int)
            or header["epoch"] not in [e.get("epoch") for e in epochs if isinstance(e, dict)]
            or not all(isinstance(e, dict) and isinstance(e.get("epoch"), int)
                       and isinstance(e.get("sealed"), dict)
                       and all(isinstance(v, str) for v in e["sealed"].values())
                       for e in epochs)
            or master_epoch(header) not in [e["epoch"] for e in epochs]):
        return False
    return isinstance(header.get("mac"), str)


def master_epoch(header: dict) -> int:
    """The epoch whose key is the store's *master* (its key generation): the
    header mac, the index, names, journal, audit trail, object contexts of
    older objects, the ingest wrap and the damage mark derive from it.  0
    (the store key made with the store) until a ``key rotate --finish`` moves
    it to the newest epoch and destroys epoch 0 (``key-generations-v1``)."""
    value = header.get("master", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def master_of(header: dict, keys: dict[int, bytes]) -> bytes:
    """The master key among an unlocked header's ``keys``."""
    return keys[master_epoch(header)]


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


def _x25519():
    from cryptography.hazmat.primitives.asymmetric.x25519 import (X25519PrivateKey,
                                                                  X25519PublicKey)
    return X25519PrivateKey, X25519PublicKey


def _raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    if hasattr(key, "private_bytes"):
        return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    return key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def open_epochs(header: dict, private: bytes, slot_id: int) -> dict[int, bytes]:
    """{epoch: key} of every live epoch of ``header`` sealed to the slot
    whose private key is ``private`` (nothing of the header is checked here).

    Raises
    ------
    crypto.AuthenticationFailed, KeyError
        An epoch is not sealed to that slot, or does not open.
    """
    store_id = header["store_id"]
    return {e["epoch"]: open_from(private, e["sealed"][str(slot_id)],
                                  _seal_aad(store_id, slot_id, e["epoch"]))
            for e in header["epochs"]}


def _seal_aad(store_id: str, slot_id: int, epoch: int) -> bytes:
    return _canonical({"store_id": store_id, "slot": slot_id, "epoch": epoch})


def _box_key(shared: bytes, ephemeral: bytes, public: bytes) -> bytes:
    return crypto.derive(shared, b"epoch-seal", ephemeral + public)


def seal_to(public_hex: str, key: bytes, aad: bytes) -> str:
    """``key`` sealed to an X25519 public key (HPKE-style: ephemeral key,
    HKDF of the shared secret, AES-256-GCM)."""
    private_cls, public_cls = _x25519()
    public = bytes.fromhex(public_hex)
    ephemeral = private_cls.generate()
    shared = ephemeral.exchange(public_cls.from_public_bytes(public))
    e_pub = _raw(ephemeral.public_key())
    return (e_pub + crypto.Gcm(_box_key(shared, e_pub, public)).seal(key, aad)).hex()


def open_from(private: bytes, sealed_hex: str, aad: bytes) -> bytes:
    """Raises :class:`crypto.AuthenticationFailed` if it does not open."""
    private_cls, public_cls = _x25519()
    try:
        blob = bytes.fromhex(sealed_hex)
        me = private_cls.from_private_bytes(private)
        shared = me.exchange(public_cls.from_public_bytes(blob[:32]))
    except ValueError as exc:
        raise crypto.AuthenticationFailed("not a sealed key") from exc
    return crypto.Gcm(_box_key(shared, blob[:32], _raw(me.public_key()))).open(blob[32:], aad)


def wrap(secret, slot: dict, private: bytes, store_id: str,
         slot_kek: bytes | None = None) -> dict:
    """Set ``slot["wrapped"]``: the slot's private key sealed for ``secret``."""
    aad = slot_aad(store_id, slot)
    if slot["kind"] == "pkcs11":
        slot["wrapped"] = secret.pkcs11.seal(secret.value, private, aad).hex()
    else:
        slot["wrapped"] = crypto.Gcm(slot_kek or kek(secret, slot)).seal(private, aad).hex()
    return slot


def unwrap(secret, slot: dict, store_id: str, root: str = "") -> bytes:
    """The slot's private key if ``secret`` opens ``slot``.

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


def enrol(header: dict, keys: dict[int, bytes], secret, slot: dict,
          slot_kek: bytes | None = None) -> dict:
    """Give ``slot`` a new key pair, wrap its private key for ``secret`` and
    seal every live epoch's key (``keys``) to its public key."""
    private_cls, _ = _x25519()
    me = private_cls.generate()
    slot["public"] = _raw(me.public_key()).hex()
    wrap(secret, slot, _raw(me), header["store_id"], slot_kek)
    for entry in header["epochs"]:
        entry["sealed"][str(slot["id"])] = seal_to(
            slot["public"], keys[entry["epoch"]],
            _seal_aad(header["store_id"], slot["id"], entry["epoch"]))
    return slot


def drop(header: dict, slot_id: int) -> None:
    """Remove a slot and what is sealed to it."""
    header["slots"] = [s for s in header["slots"] if s["id"] != slot_id]
    for entry in header["epochs"]:
        entry["sealed"].pop(str(slot_id), None)


def epoch_check(master: bytes, store_id: str, epoch: int, key: bytes) -> str:
    """A value that lets a holder of the store key (a running daemon) check
    that ``key`` is this store's key of ``epoch`` (HMAC-SHA256)."""
    return hmac.new(crypto.derive(master, b"epoch-check", bytes.fromhex(store_id)),
                    epoch.to_bytes(8, "big") + key, hashlib.sha256).hexdigest()


def rotate(header: dict, master: bytes) -> tuple[int, bytes]:
    """A new key epoch: a random data key sealed to every slot, the epoch new
    chunks are sealed under from now on.  Returns (epoch, its key)."""
    key = crypto.random_key()
    epoch = max([e["epoch"] for e in header["epochs"]]
                + [d["epoch"] for d in header.get("destroyed", [])]) + 1
    header["epochs"].append({"epoch": epoch, "created": now(), "sealed": {
        str(s["id"]): seal_to(s["public"], key, _seal_aad(header["store_id"], s["id"], epoch))
        for s in header["slots"]}, "check": epoch_check(master, header["store_id"], epoch, key)})
    header["epoch"] = epoch
    # objects of the new epoch have their context block under its key too,
    # which an older dcmfs would not know: it refuses the store instead
    header["features"] = sorted(set(header["features"]) | {EPOCHS_FEATURE, GENERATIONS_FEATURE})
    return epoch, key


def destroy(header: dict, epoch: int) -> None:
    """Forget an older epoch's data key (no object may use it any more)."""
    if epoch in (master_epoch(header), header["epoch"]):
        raise ValueError(f"epoch {epoch} cannot be destroyed")
    header["epochs"] = [e for e in header["epochs"] if e["epoch"] != epoch]
    header.setdefault("destroyed", []).append({"epoch": epoch, "destroyed": now()})


def unlock(header: dict, secret, root: str, with_private: bool = False) -> tuple:
    """({epoch: key} of every live epoch, the slot that opened) for
    ``secret``; epoch 0 is the store key.  ``with_private``: the slot's
    private key too, third (a follower opens the epochs a rotation adds to
    the bucket's header with it: :mod:`dcmfs.opened.followkeys`).  The header's mac is checked with
    it.  A failed attempt is logged with the kinds tried, never with
    anything of the secret.

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
            private = unwrap(secret, slot, store_id, root)
        except crypto.AuthenticationFailed:
            continue
        except SecretError:  # a token's PIN, module or label
            log.warning("unlock failed: %s could not be used for slot %d", WHAT[secret.kind],
                        slot["id"])
            raise
        try:
            keys = {e["epoch"]: open_from(private, e["sealed"][str(slot["id"])],
                                          _seal_aad(store_id, slot["id"], e["epoch"]))
                    for e in header["epochs"]}
            if not hmac.compare_digest(header["mac"], header_mac(master_of(header, keys),
                                                                 header)):
                raise crypto.AuthenticationFailed("header mac")
        except (crypto.AuthenticationFailed, KeyError) as exc:
            log.warning("unlock refused: slot %d (%s) opened but the store header's "
                        "authentication failed", slot["id"], slot["kind"])
            raise HeaderAlteredError(
                f"The store header at {root} was altered by someone without the key (a slot "
                "put back or changed, or another field edited); restore dcmfs.store from a "
                "backup made after the last 'dcmfs key' command.") from exc
        return (keys, slot, private) if with_private else (keys, slot)
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


def new_table(header: dict, master: bytes, secret, slot: dict,
              slot_kek: bytes | None = None) -> dict:
    """``header`` with a slot table of one slot, epoch 0 holding ``master``."""
    header["next_slot"] = slot["id"] + 1
    header["epochs"] = [{"epoch": 0, "created": now(), "sealed": {}}]
    header["epoch"] = 0
    header["slots"] = [enrol(header, {0: master}, secret, slot, slot_kek)]
    header["features"] = sorted(set(header.get("features", [])) | {FEATURE})
    return seal_header(master, header)


def from_legacy(header: dict, master: bytes, legacy_kek: bytes, secret) -> dict:
    """The header of a single-wrap store (formats 1-3, ``key``) as a slot
    table: the old wrap becomes slot 1, of the same kind, salt and Argon2id
    parameters (so the same KEK opens it; ``legacy_kek``)."""
    new = {k: v for k, v in header.items() if k != "key"}
    old = header["key"]
    slot = {"id": 1, "kind": old["kind"], "label": "initial", "created": now(),
            "salt": old["salt"]}
    if old["kind"] == "passphrase":
        slot["argon2id"] = old["argon2id"]
    return new_table(new, master, secret, slot, legacy_kek)


def kinds(header: dict) -> set[str]:
    """The slot kinds of a header (of either layout), without a key."""
    if "slots" in header:
        return {s["kind"] for s in header["slots"]}
    return {header["key"]["kind"]}
