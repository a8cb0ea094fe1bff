"""Key generations of the index (feature ``key-generations-v1``).

Every key of the index - the values' AEAD (``index``), the name tags
(``names``), the journal, the sealed sums (``index-auth``), the witness and
the audit trail - is an HKDF of one *generation key*: the key of a key epoch
(:mod:`dcmfs.storage.slots`).  An index without a marker is sealed under
epoch 0, the store key made with the store; ``meta/keygen`` (u16, plain,
covered by the sealed sums like every other ``meta`` record) names another.
The index says it itself, so the file that is swapped in
(:func:`rekey_index`: a copy aside, fsync, rename, as ``Index.compact``)
carries its generation with it: a crash leaves the old file with the old
marker or the new file with the new one, and an opening takes the key the
index names (:func:`index_key`), whatever the header says, as long as that
epoch is live.  ``dcmfs key rotate --finish`` moves the index to the newest
epoch before the header destroys epoch 0 (:mod:`dcmfs.opened.regen`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import struct

import lmdb

from ..errors import IndexDamagedError, IntegrityError, StoreIOError
from ..storage import crypto
from . import auth
from .index import Index, index_sealer, sealed_aad
from .journal import HEADER_SIZE as JOURNAL_HEADER
from .schema import DATABASES, U64, decode_dirent, read_meta

KEYGEN = b"keygen"
_GEN = struct.Struct(">H")
#: values sealed with their database and key as associated data, re-sealed as they are
_SEALED = ("inodes", "chunks", "content", "deidview")
#: sealed ``meta`` records (``auth`` is made anew from the copy)
_SEALED_META = (b"damage", b"audit_head")


def generation_of(path: str) -> int | None:
    """The key generation of the closed index at ``path`` (0 without a
    marker); None if there is no index.

    Raises
    ------
    IndexDamagedError
        The marker does not decode.
    """
    found = read_meta(path, ("keygen",), "reading the index's key generation")
    if found is None:
        return None
    raw = found["keygen"]
    if raw is None:
        return 0
    if len(raw) != _GEN.size:
        raise IndexDamagedError("The index's key generation record is damaged; run "
                                "'dcmfs fsck --rebuild-index' on the store.")
    return _GEN.unpack(raw)[0]


def index_key(path: str, store) -> tuple[int, bytes]:
    """(generation, key) the index at ``path`` of the opened ``store``
    (:class:`~dcmfs.storage.header.Store`) is sealed under; a new index is
    made under the store's master epoch.

    Raises
    ------
    IndexDamagedError
        The index names an epoch the store does not hold (destroyed).
    """
    return key_for(path, store.epoch_keys, store.master_epoch)


def key_for(path: str, epoch_keys: dict, master_epoch: int) -> tuple[int, bytes]:
    """:func:`index_key` of a store's ``{epoch: key}`` and master epoch."""
    gen = generation_of(path)
    if gen is None:
        gen = master_epoch
    key = epoch_keys.get(gen)
    if key is None:
        raise IndexDamagedError(f"The index is sealed under key epoch {gen}, which the store "
                                "no longer holds (an index copy older than the last 'dcmfs key "
                                "rotate --finish'?); run 'dcmfs fsck --rebuild-index'.")
    return gen, key


def mark(ix: Index, gen: int) -> None:
    """Write the marker into a new, empty index (made under ``gen``, not 0)."""
    with ix.env.begin(write=True) as txn:
        if txn.get(KEYGEN, db=ix.dbs["meta"]) is None and gen:
            txn.put(KEYGEN, _GEN.pack(gen), db=ix.dbs["meta"])


def _copy(ix: Index, env: lmdb.Environment, dbs: dict, key: bytes, gen: int,
          audit_head: dict | None) -> auth.Sums:
    """Every record of ``ix`` into ``env`` with its sealed values (and the
    name tags in keys) under ``key``, ``audit_head`` as the trail's head if
    given; returns the sums of the copy."""
    store_id = ix._store_id
    siv = index_sealer(key, store_id)
    name_key = crypto.derive(key, b"names", store_id)

    def tag(parent: int, name: bytes) -> bytes:
        return hmac.new(name_key, U64.pack(parent) + name, hashlib.sha256).digest()[:16]

    def parent_tag(parent: int) -> bytes:
        return hmac.new(name_key, b"directory\x00" + U64.pack(parent),
                        hashlib.sha256).digest()[:16]

    def reseal(db: str, k: bytes, plain: bytes) -> bytes:
        return siv.seal(plain, sealed_aad(db, k))

    with ix.env.begin() as src, env.begin(write=True) as dst:
        for name in DATABASES:
            if ix.dbs[name] is None or name == auth.SUMS_DB:
                continue
            put = dbs[name]
            for k, v in src.cursor(db=ix.dbs[name]):
                k, v = bytes(k), bytes(v)
                if name == "meta":
                    if k in (auth.AUTH_KEY, KEYGEN):
                        continue
                    if k == b"audit_head" and audit_head is not None:
                        v = reseal(name, k, json.dumps(audit_head, sort_keys=True).encode())
                    elif k in _SEALED_META:
                        v = reseal(name, k, ix.open(name, k, v))
                elif name in _SEALED:
                    v = reseal(name, k, ix.open(name, k, v))
                elif name == "dirents":
                    plain = ix.open(name, k, v)
                    parent, child, entry = decode_dirent(plain, ix.keyed_dirents)
                    if parent is None:  # the older layout: the parent is in the key
                        parent = U64.unpack_from(k)[0]
                        k = k[:8] + tag(parent, entry)
                    else:
                        k = parent_tag(parent) + tag(parent, entry)
                    v = reseal(name, k, plain)
                elif name == "xattrs":
                    plain = ix.open(name, k, v)
                    n = struct.unpack_from(">H", plain)[0]
                    ino = U64.unpack_from(k)[0]
                    k = k[:8] + tag(ino, b"xattr\x00" + plain[2:2 + n])
                    v = reseal(name, k, plain)
                dst.put(k, v, db=put)
        dst.put(KEYGEN, _GEN.pack(gen), db=dbs["meta"])
    with env.begin() as txn:
        sums = auth.scan(auth.auth_key(key, store_id),
                         [(n, txn.cursor(db=dbs[n])) for n in DATABASES if dbs.get(n)])
    with env.begin(write=True) as txn:
        for g, value in sums.settle():
            txn.put(auth.encode_group(g), value.to_bytes(32, "big"), db=dbs[auth.SUMS_DB])
        txn.put(auth.AUTH_KEY, siv.seal(sums.encode(ix.seq), sealed_aad("meta", auth.AUTH_KEY)),
                db=dbs["meta"])
    return sums


def rekey_index(ix: Index, key: bytes, gen: int, audit_head: dict | None = None) -> None:
    """(A part of :class:`Index`, kept apart for the module's size.)  Seal the whole index again under ``key`` (generation ``gen``): every
    value, every name tag, the sums; the journal goes on under it.  Call it
    right after a checkpoint with the journal emptied (``journal.reset``),
    the core's lock held.  A copy is written aside (``.compact-rekey-PID``,
    which a shred pass of another process removes if this one dies;
    ``audit_head``: the trail's head as it is after :mod:`dcmfs.audit.rekey`),
    synced, and renamed over ``data.mdb``: a crash leaves the old index or
    the new one, each naming its generation."""
    if ix.pending_records or ix.journal.size > JOURNAL_HEADER:
        raise IndexDamagedError("re-keying the index with changes not checkpointed")
    if ix.suspect or ix.auth_state == "mismatch":  # sealing them again would launder them
        raise IndexDamagedError("The index has records that do not match its sealed checksum; "
                                "run 'dcmfs fsck' on the store before 'key rotate --finish'.")
    if ix._batch is not None:
        ix._batch.abort()
        ix._batch = None
    path, map_size, tmp = _scratch(ix, "compact-rekey")
    try:
        os.mkdir(tmp, 0o700)
        env = lmdb.open(tmp, subdir=True, map_size=map_size, max_dbs=len(DATABASES),
                        mode=0o600, sync=True, metasync=True, lock=False)
        try:
            dbs = {n: env.open_db(n.encode(), create=True) for n in DATABASES}
            sums = _copy(ix, env, dbs, key, gen, audit_head)
            env.sync(True)
        finally:
            env.close()
        with open(os.path.join(tmp, "data.mdb"), "rb+") as f:
            os.fsync(f.fileno())
    except IntegrityError:  # a value that does not open: fsck names it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, lmdb.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreIOError(f"Re-keying the index failed: {exc}.") from exc
    ix.swap_in(tmp, path, map_size)
    # the open index goes on under the new key
    ix._master = key
    ix._siv = index_sealer(key, ix._store_id)
    ix.set_name_key(crypto.derive(key, b"names", ix._store_id))  # and its cached tags
    ix.journal.rekey(key)
    ix._auth_key = auth.auth_key(key, ix._store_id)
    ix.sums = auth.Sums(ix._auth_key, dict(sums.values))
    ix.keyed_dirents = ix._detect_dirents()
    ix.names_gen += 1
    ix.verified, ix.verified_all = set(), True  # the sums were made from these records
    ix.generation = gen
    if ix.witness is not None:
        ix.witness.rekey(key, ix.seq, sums.digest())


def compact_index(ix: Index) -> None:
    """(A part of :class:`Index`: :meth:`Index.compact`.)"""
    if ix._batch is not None:  # a batch that only served reads since the checkpoint
        if ix.pending_records:
            raise IndexDamagedError("compacting the index with changes not checkpointed")
        ix._batch.abort()
        ix._batch = None
    path, map_size, tmp = _scratch(ix, "compact")
    try:
        os.mkdir(tmp, 0o700)
        ix.env.copy(tmp, compact=True)
        with open(os.path.join(tmp, "data.mdb"), "rb+") as f:
            os.fsync(f.fileno())
    except (OSError, lmdb.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreIOError(f"Compacting the index failed: {exc}.") from exc
    ix.swap_in(tmp, path, map_size)


def _scratch(ix: Index, name: str) -> tuple[str, int, str]:
    """The index's directory, its map size and the path of a directory in
    it for a copy to swap in (``.NAME-PID``; what a crash left there removed)."""
    path = ix.env.path()
    tmp = os.path.join(path, f".{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return path, ix.env.info()["map_size"], tmp
