"""The keyed tags that key directory entries and extended attributes in the
index (format 4): HMAC-SHA256 under the store's ``names`` key, cut to 16
bytes, so the index shows neither a name nor which directory holds it."""

from __future__ import annotations

import hmac

from .schema import U64


class NameTags:
    """A mixin of :class:`~dcmfs.index.index.Index`.

    ``hmac.digest`` is OpenSSL's one-shot HMAC: the same tag as
    ``hmac.new(...).digest()`` at a fraction of the cost (measured, issue 17:
    the two tags of each path component were 40 % of a getattr)."""

    def __init__(self, name_key: bytes) -> None:
        self._name_key = name_key
        #: directory -> its tag (a tag never changes)
        self._parent_tags: dict[int, bytes] = {}

    def set_name_key(self, name_key: bytes) -> None:
        """Tags under another key from now on (a key generation move,
        :mod:`dcmfs.index.keygen`): the cached directory tags go with the
        old key."""
        self._name_key = name_key
        self._parent_tags = {}

    def name_tag(self, parent: int, name: bytes) -> bytes:
        return hmac.digest(self._name_key, U64.pack(parent) + name, "sha256")[:16]

    def parent_tag(self, parent: int) -> bytes:
        """The first half of a directory entry's key: a keyed tag of the
        directory, so the index does not show which inode it is."""
        tag = self._parent_tags.get(parent)
        if tag is None:
            if len(self._parent_tags) >= 4096:
                self._parent_tags.clear()
            tag = hmac.digest(self._name_key, b"directory\x00" + U64.pack(parent),
                              "sha256")[:16]
            self._parent_tags[parent] = tag
        return tag
