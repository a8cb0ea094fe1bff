"""The audit trail sealed again under another key generation (``dcmfs key
rotate --finish``, :mod:`dcmfs.opened.regen`), so that no record stays
under a key that is about to be destroyed.

Every segment is written again into a directory beside the trail
(``STORE/.audit-rekey-PID``): the same header fields, every frame's
plaintext re-sealed under the new key with the same sequence numbers, so
frames keep their lengths and offsets; the chain hashes change with the
frames' bytes (the chain is computed over the sealed frames), so each
segment's ``previous chain hash`` and the index's head are mapped to the new
chain.  The first segment's previous hash (the retained start) stays.  A
frame that opens under no key given (damage) is copied as it is and the
chain goes on over its bytes: ``dcmfs audit verify`` still names it.  The
new directory is synced and exchanged with ``STORE/audit`` in one
``renameat2(RENAME_EXCHANGE)``: a crash leaves the old trail or the new
one, never a mixture.  The failed-unlock notes (plain) are carried over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil

from ..errors import StoreIOError
from ..storage import crypto
from ..storage.durable import fsync_dir
from . import segments as S

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> None:
    """Swap two directory entries atomically (Linux ``renameat2``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                      _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise StoreIOError(f"Exchanging {a} and {b} failed: {os.strerror(err)} (the store's "
                           "filesystem must support renameat2 RENAME_EXCHANGE)") from \
            OSError(err, os.strerror(err))


def _open_any(aeads: list, data: bytes) -> crypto.Siv | None:
    for aead in aeads:
        if S.Header(data, aead).authentic:
            return aead
    return None


def _reseal_segment(data: bytes, sid: bytes, number: int, old: list, new: crypto.Siv,
                    hashes: dict) -> bytes:
    """The segment sealed under ``new``; ``hashes`` maps each old chain hash
    to the new one (a segment's previous hash is mapped through it: the
    first one's, and one after a break, stay)."""
    try:
        header = S.Header(data, None)
    except ValueError:
        return data  # damaged: verify names it
    aead = _open_any([new, *old], data)
    if aead is None:
        return data
    first_prev = hashes.get(header.prev_hash, header.prev_hash)
    out = [S.make_header(new, sid, number, header.first_seq, first_prev)]
    old_hash, new_hash = header.prev_hash, first_prev
    for item in S.frames(data):
        if isinstance(item, S.Torn):
            break  # a write cut by a crash: the trail cuts it too
        _, seq, frame = item
        try:
            plain = aead.open(frame[12:], S.record_aad(sid, number, seq, old_hash))
            sealed = new.seal(plain, S.record_aad(sid, number, seq, new_hash))
            again = frame[:12] + sealed  # length, sequence number
            if len(again) != len(frame):
                raise ValueError("a frame changed its length")
        except crypto.AuthenticationFailed:
            again = frame  # damage: left as it is, verify names it
        out.append(again)
        old_hash, new_hash = S.chain(old_hash, frame), S.chain(new_hash, again)
        hashes[old_hash] = new_hash
    return b"".join(out)


def _rehead(datas: list, head: dict | None) -> dict | None:
    """``head`` with the chain hash the trail itself has at the head's
    record (a trail sealed again before a crash left the index's head of
    the older chain); no key is needed for the chain."""
    if head is None:
        return None
    for number, data in datas:
        try:
            digest = S.Header(data, None).prev_hash
        except ValueError:
            continue
        for item in S.frames(data):
            if isinstance(item, S.Torn):
                break
            digest = S.chain(digest, item[2])
            if number == head.get("segment") and item[1] == head.get("seq"):
                return dict(head, hash=digest.hex())
    return head


def reseal_trail(root: str, store_id: bytes, old_keys: list[bytes], new_key: bytes,
                 head: dict | None) -> dict | None:
    """Seal every segment of the store's trail again under ``new_key``
    (those under one of ``old_keys`` or ``new_key``); returns the index's
    head mapped to the new chain (``head`` itself if there is no trail or
    nothing was under an old key)."""
    segs = S.list_segments(root)
    new = S.audit_key(new_key, store_id)
    old = [S.audit_key(k, store_id) for k in old_keys if k != new_key]
    if not segs or not old:
        return head
    datas = [(n, S.read_file(p)) for n, p in segs]
    if all(_open_any([new], d) for _, d in datas):
        return _rehead(datas, head)  # done already (a finish run again)
    trail = os.path.join(root, S.DIR)
    tmp = os.path.join(root, f".audit-rekey-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    hashes: dict[bytes, bytes] = {}
    try:
        for number, data in datas:
            blob = _reseal_segment(data, store_id, number, old, new, hashes)
            path = os.path.join(tmp, S.segment_name(number))
            with open(path, "xb") as f:
                f.write(blob)
                os.fsync(f.fileno())
            os.chmod(path, 0o600)
        note = os.path.join(trail, S.UNLOCK_NOTE)
        if os.path.exists(note):
            shutil.copyfile(note, os.path.join(tmp, S.UNLOCK_NOTE))
            with open(os.path.join(tmp, S.UNLOCK_NOTE), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        exchange(tmp, trail)
        fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise StoreIOError("The disk is full; the audit trail was not sealed again.") \
                from exc
        raise StoreIOError(f"Sealing the audit trail again failed: {exc}.") from exc
    shutil.rmtree(tmp, ignore_errors=True)  # the old trail, now under the temporary name
    if head is None:
        return None
    head = dict(head)
    for field in ("hash", "start_hash"):
        if head.get(field):
            mapped = hashes.get(bytes.fromhex(head[field]))
            if mapped is not None:
                head[field] = mapped.hex()
    return head
