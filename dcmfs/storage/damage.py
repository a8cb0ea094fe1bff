"""What objects are called in a backend and how a damaged one is reported
(shared by :mod:`dcmfs.storage.objects` and :mod:`dcmfs.storage.framed`)."""

from __future__ import annotations

from .. import format as fmt
from ..errors import IntegrityError

#: what can be wrong with an object (``ObjectDamaged.kind``; verify and fsck
#: report these words)
MISSING, AUTH, LENGTH, SWAPPED, ROLLED_BACK, MISMATCH, DECODE, NEWER = (
    "missing object", "failed authentication", "wrong length", "swapped or moved",
    "rolled back", "does not match its index entry", "does not decode", "newer format")

class ObjectDamaged(IntegrityError):
    """An object is missing, truncated, altered, moved or rolled back."""

    def __init__(self, oid: bytes, what: str, kind: str = AUTH) -> None:
        super().__init__(f"object {oid.hex()} {what}")
        self.oid = oid
        self.what = what
        self.kind = kind

def object_name(oid: bytes) -> str:
    """The backend name of an object."""
    h = oid.hex()
    return f"{fmt.OBJECTS_DIR}/{h[:2]}/{h}"

