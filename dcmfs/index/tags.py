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

    #: names whose tags are kept (about 150 bytes each); all are dropped
    #: when it is full, as the directory tags are
    NAME_TAGS = 16384

    def __init__(self, name_key: bytes) -> None:
        self._name_key = name_key
        #: directory -> its tag (a tag never changes)
        self._parent_tags: dict[int, bytes] = {}
        #: (directory, name) -> its tag, for the names asked for again: a
        #: create resolves its path four times, a stat or unlink of a file
        #: made a moment ago once more (measured, issue 17: 9 HMACs per
        #: created file, 2 of them new); in memory only, like the kernel's
        #: own dentries
        self._name_tags: dict[tuple[int, bytes], bytes] = {}

    def set_name_key(self, name_key: bytes) -> None:
        """Tags under another key from now on (a key generation move,
        :mod:`dcmfs.index.keygen`): the cached directory tags go with the
        old key."""
        self._name_key = name_key
        self._parent_tags = {}
        self._name_tags = {}

    def name_tag(self, parent: int, name: bytes) -> bytes:
        key = (parent, name)
        tag = self._name_tags.get(key)
        if tag is None:
            if len(self._name_tags) >= self.NAME_TAGS:
                self._name_tags.clear()
            tag = hmac.digest(self._name_key, U64.pack(parent) + name, "sha256")[:16]
            self._name_tags[key] = tag
        return tag

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
