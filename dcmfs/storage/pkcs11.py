"""A key slot held by a PKCS#11 token (an HSM, a smart card, SoftHSM2).

The master key is sealed by a non-extractable AES-256 key that never leaves
the token: ``CKM_AES_GCM`` with a random 96-bit IV, 128-bit tag and the
slot's associated data (:func:`dcmfs.storage.slots.slot_aad`); the slot
holds ``iv || ciphertext || tag``.  Unlocking asks the token to decrypt, so
a copy of the header and the PIN are of no use without the token itself.

The slot records the token's label and the key's label (to find them); the
module (the ``.so`` the token is driven through) and the PIN come from the
command line or the instance file, never from the header (a module is code:
whoever can write the store must not choose what dcmfs loads).  A session is
opened for one operation and closed at once, so none survives the mount's
fork.  Uses python-pkcs11 (the optional extra ``pkcs11``), imported only
here and only when a token is used.
"""

from __future__ import annotations

import dataclasses
import os

from . import crypto
from ..errors import SecretError

MECHANISM = "aes-gcm"
IV_LEN = 12


def _lib():
    try:
        import pkcs11
    except ImportError as exc:
        raise SecretError("PKCS#11 slots need python-pkcs11: install dcmfs with its "
                          "'pkcs11' extra (pip install 'dcmfs[pkcs11]').") from exc
    return pkcs11


@dataclasses.dataclass(frozen=True)
class Token:
    """Where a PKCS#11 key lives: the module, and (for a new slot, or to
    override what a slot records) the token's and the key's labels."""

    module: str
    token: str | None = None
    key: str | None = None

    def slot_fields(self) -> dict:
        if not self.token or not self.key:
            raise SecretError("A new PKCS#11 slot needs the token's label and a key label "
                              "(--new-pkcs11-token, --new-pkcs11-key).")
        return {"token": self.token, "key_label": self.key, "mechanism": MECHANISM}

    def _session(self, pin: bytes, token_label: str):
        pkcs11 = _lib()
        try:
            lib = pkcs11.lib(self.module)
            token = lib.get_token(token_label=token_label)
            return token.open(user_pin=pin.decode("utf-8"), rw=True)
        except UnicodeDecodeError as exc:
            raise SecretError("The PKCS#11 PIN is not UTF-8 text.") from exc
        except pkcs11.exceptions.NoSuchToken as exc:
            raise SecretError(f"The PKCS#11 module has no token labelled {token_label!r}.") \
                from exc
        except pkcs11.exceptions.PinIncorrect as exc:
            raise SecretError(f"The PIN of the PKCS#11 token {token_label!r} is wrong.") from exc
        except (pkcs11.exceptions.PKCS11Error, RuntimeError, OSError) as exc:
            raise SecretError(f"The PKCS#11 module {self.module} or its token "
                              f"{token_label!r} cannot be used ({type(exc).__name__}).") from exc

    def _key(self, session, label: str, create: bool):
        pkcs11 = _lib()
        from pkcs11 import Attribute, KeyType, ObjectClass
        try:
            return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                                   label=label)
        except pkcs11.exceptions.NoSuchKey:
            if not create:
                raise
        # a new key made inside the token: AES-256, never extractable
        return session.generate_key(KeyType.AES, 256, label=label, store=True, template={
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.TOKEN: True})

    def seal(self, pin: bytes, master: bytes, aad: bytes) -> bytes:
        """``iv || AES-GCM(token key, master, aad)``; the key is generated in
        the token (non-extractable) if it has none of that label."""
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams
        fields = self.slot_fields()
        with self._session(pin, fields["token"]) as session:
            key = self._key(session, fields["key_label"], create=True)
            iv = os.urandom(IV_LEN)
            return iv + key.encrypt(master, mechanism=Mechanism.AES_GCM,
                                    mechanism_param=GCMParams(iv, aad, 128))

    def open(self, pin: bytes, slot: dict, blob: bytes, aad: bytes) -> bytes:
        """The master key the token unseals from ``blob``.

        Raises
        ------
        crypto.AuthenticationFailed
            The token's key does not open it (another key, altered).
        SecretError
            The module, token, PIN or key cannot be used.
        """
        pkcs11 = _lib()
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams
        if slot.get("mechanism") != MECHANISM or len(blob) <= IV_LEN:
            raise crypto.AuthenticationFailed("not a slot this dcmfs seals")
        with self._session(pin, self.token or slot["token"]) as session:
            try:
                key = self._key(session, self.key or slot["key_label"], create=False)
            except pkcs11.exceptions.NoSuchKey as exc:
                raise crypto.AuthenticationFailed("no such key in the token") from exc
            try:
                return bytes(key.decrypt(blob[IV_LEN:], mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(blob[:IV_LEN], aad, 128)))
            except pkcs11.exceptions.PKCS11Error as exc:
                raise crypto.AuthenticationFailed("the token refused the wrap") from exc
