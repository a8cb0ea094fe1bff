"""On-disk format constants and byte layouts (see ``docs/format.md``).

Changelog of ``FORMAT_VERSION`` (ratarmount keeps its index version log at the
constant, so do we):

* 1 — store header ``dcmfs.store`` (JSON), LMDB index with AES-GCM-SIV
  sealed values and a sealed journal, chunk objects with a sealed context
  block (file, inode, chunk, generation, codec, flags, lengths; associated
  data: prefix, store id, object id) and an AES-256-GCM payload under a
  per-file key.
* 2 — objects (version byte 2) carry their own id inside the sealed context
  (68 bytes; its associated data no longer has the id), so a moved, swapped
  or rolled-back object is diagnosed and put back by fsck; bit 1 of the flags
  marks extents.  Journal records stay after checkpoints and full journals
  are archived next to the snapshots (``snapshot-<seq>``), for index
  rebuilds; the ``scrubbed`` database.  Version-1 objects and stores are
  still read (``tests/compat/v1``); what is written into a version-1 store
  from then on is version 2 (its header keeps version 1: the header is bound
  into the wrapped master key, which only the admin's key can re-wrap).
* 3 — the tree digest (feature ``digest-tree-v1``): chunk records carry the
  SHA-256 of their plaintext (32 bytes after the optional extent offset), and
  a file's inode holds a digest over its blocks (digest kind 2, see
  :mod:`dcmfs.storage.digest`) instead of a whole-file SHA-256, so a commit
  hashes only what it wrote and a hole costs nothing.  Stores of versions 1
  and 2 are upgraded in place, lazily and under the lock: the feature is
  added to the header at the first read-write opening; an inode keeps its
  whole-file SHA-256 (kind 1, still checked) until its file changes, and a
  chunk record gains its digest when its file is next committed.
* 4 — the index authentic and fresh (feature ``index-auth-v1``,
  :mod:`dcmfs.index.auth`): every record counts in keyed sums per group,
  kept in the ``sums`` database, their top sealed in ``meta/auth`` with the
  journal sequence at each checkpoint; a witness outside the store
  (:mod:`dcmfs.index.witness`); directory entries keyed by a keyed tag of
  their directory with padded values, inode records with the stored size and
  a padded target, fixed-length chunk records, padded content records; the
  journal (version 2) sealed with AES-GCM-SIV.  Stores of versions 1-3 are
  upgraded in place under the lock at their first read-write opening (sums
  computed and sealed, directory entries converted in one journaled
  operation); older records keep their lengths until rewritten.
* 4 — the audit trail (feature ``audit-v1``, :mod:`dcmfs.audit`): sealed,
  hash-chained, append-only segments ``audit/segment-NNNNNNNN`` recording who
  opened, wrote, renamed and deleted which file; the chain head is kept in
  the index (``meta/audit_head``, sealed).  Stores of earlier versions get
  the feature and an empty trail at their first read-write opening.

* 4 — (S3 backend) feature ``backend-s3-v1``: the header's ``backend``
  field (``s3://BUCKET/PREFIX``) says the objects live in that bucket, under
  ``PREFIX/objects/XX/<id>`` exactly as in ``objects/`` on disk; the store
  directory keeps the lock, the index, the journal and a cache of objects
  (mode 0600 while an object waits for its upload, 0400 once it is in the
  bucket).  The bucket also holds ``PREFIX/dcmfs.store`` (the header),
  ``PREFIX/snapshots/…`` (index snapshots and journal segments, sealed as on
  disk) and ``PREFIX/lease`` (the writer's lease, JSON).  Only stores created
  with ``--backend`` list the feature; nothing changes for local stores.
* 4 — key slots (feature ``key-slots-v1``, :mod:`dcmfs.storage.slots`): the
  header's single ``key`` wrap is replaced by ``slots`` (the master key
  wrapped once per passphrase, key file, systemd credential, key command or
  PKCS#11 token; each wrap's associated data is the store id and the slot's
  own fields), ``next_slot`` and ``mac`` (HMAC-SHA256 under a key derived
  from the master key over every other header field).  A single-wrap header
  becomes slot 1 at the first read-write opening or ``dcmfs key`` command,
  under the header lock (an atomic, durable replace).
* 4 — key epochs (feature ``key-epochs-v1``, added by the first ``dcmfs key
  rotate``): the header's ``epochs`` table holds one data key per epoch,
  sealed to every slot's X25519 public key; an object names the epoch its
  payload key comes from in the CTX field that was reserved (u16 after the
  flags; 0, the store key, in every object written before), so objects of
  every format version read as before.
* 4 — (the de-identified research view, issue 21) feature ``deid-view-v1``:
  the index database ``deidview`` (ino -> sealed JSON: what the view lists
  of a DICOM file, see :mod:`dcmfs.index.schema`), created at the first
  read-write opening and filled by the re-encoder and by a one-time pass of
  the first view mount; older stores open unchanged (the database is
  optional, empty until then).
* 4 — (crypto-shredding, issue 18) feature ``file-secrets-v1``: an inode
  record may hold a random 32-byte file secret (bit 6 of its digest-kind
  byte; after the stored bytes), which salts the HKDF of the file's payload
  key, and ``meta/shred`` (plain, 5 x u64) counts deletions whose secrets
  may still be in the index's history (:mod:`dcmfs.index.shred`).  Files
  made before keep their keys; every inode made since gets a secret.
  Added at the first read-write opening; nothing is rewritten.
* 4 — (write-only ingest, issue 18) feature ``ingest-v1``, added by
  ``dcmfs key recipient``: the header's ``ingest`` entry (a recipient key
  pair, X25519 or RSA-OAEP-3072: its public key in the clear, its private
  key sealed under the store key) and the ``inbox/`` directory a node with
  only the public key writes sealed files into
  (:mod:`dcmfs.storage.inbox`); a key holder imports them at its next
  read-write opening.  Stores without the feature are unchanged.

* 5 — the two features of issue 18 above, released: ``file-secrets-v1``
  (in ``WRITE_FEATURES``: every store opened for writing gets it, and every
  inode made since holds a file secret) and ``ingest-v1`` (a store with a
  recipient and an ``inbox/``).  Nothing else changed; ``tests/compat/v5``
  holds files with secrets and a write-only mount's two files still in the
  inbox, which every later dcmfs must import at its first read-write
  opening.  Stores of versions 1-4 are opened and upgraded in place as
  before (the features are added under the store lock; the header keeps
  the version it was made with).
* 6 — feature ``key-generations-v1``,
  added by every ``dcmfs key rotate`` (:mod:`dcmfs.index.keygen`,
  :mod:`dcmfs.opened.regen`): an object's context block is sealed under its
  own epoch's key; the header's ``master`` names the epoch every derived key
  comes from (0 without it), the index names its own in ``meta/keygen``; a
  ``key rotate --finish`` moves both to the newest epoch and destroys epoch
  0.  Stores without the feature are unchanged until their next rotation.
  Feature ``s3-packs-v1`` (S3 stores only, in
  ``S3_WRITE_FEATURES``: added at the first read-write opening of an S3
  store): objects are uploaded several to one S3 object, a *pack*
  (``packs/<time><random>``, :mod:`dcmfs.storage.packs`), and read by ranged
  GETs; the objects inside are unchanged, so are their checks.  Objects
  uploaded before stay loose under ``objects/`` and are read as before.
  An older dcmfs would not find the packed objects: it refuses the store.
  ``tests/compat/v6`` holds a store whose index moved to epoch 1 (epoch 0
  destroyed) with a file under each of epochs 1 and 2 and a write-only
  mount's two files in the inbox.  Stores of versions 1-5 open and are
  upgraded in place as before; a rotation adds the feature.

* 7 — (random reads, issue 17) feature ``framed-chunks-v1``: chunks coded
  with zstd longer than 64 KiB are written as framed objects
  (object layout 3, flag bit 2): 64 KiB frames compressed and sealed one by
  one after a sealed frame table, so a 4 KiB random read decodes one frame;
  the context block is sealed under the object's own epoch's key, as in
  layout 2.  (fresh studies read fast, issue 17) feature ``codec-blosc2``:
  objects may be coded with codec 7 (a C-Blosc2 chunk of byte-shuffled,
  zstd-compressed samples: the hot tier's fast-decoding form; see
  docs/format.md, "Codec 7").  Both are in ``WRITE_FEATURES``: stores of
  versions 1-6 get them at their first read-write opening, nothing is
  rewritten, an older dcmfs then refuses the store.  ``tests/compat/v7``
  holds framed objects and a blosc2-coded copy of the synthetic CT besides
  what v6 holds.
* 8 — (small-file metadata, issue 17) feature ``inline-small-v1``: a chunk
  whose object would take at most :data:`INLINE_MAX` bytes is not written as
  an object file: the object's exact bytes (layout 2, sealed and bound to its
  id and context as an object file's) are kept in the index database
  ``inline`` (key: inode u64 + object id; value as stored, not sealed again),
  written in the operation that commits the chunk record (journaled, counted
  in the index's sums) and deleted in the one that drops or replaces it.
  Flag bit 3 of the chunk record (and of the sealed context) says so.  In
  ``WRITE_FEATURES``: stores of versions 1-7 get it at their first
  read-write opening, nothing is rewritten, an older dcmfs then refuses the
  store.  ``tests/compat/v8`` holds inline files besides what v7 holds.

A store whose version is higher than ``FORMAT_VERSION``, or that lists a
feature not in ``KNOWN_FEATURES``, is refused.
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 8
#: the object layout this dcmfs writes (the version byte of each object; the
#: layout changed in format 2 and not since)
OBJECT_VERSION = 2
#: the layout of framed chunk objects (feature ``framed-chunks-v1``,
#: :mod:`dcmfs.storage.frames`): the header of layout 2, then a sealed frame
#: table and frames of 64 KiB sealed one by one
OBJECT_VERSION_FRAMED = 3
#: object layouts this dcmfs reads
OBJECT_VERSIONS = (1, 2, 3)
STORE_MAGIC = "dcmfs-store"
HEADER_NAME = "dcmfs.store"
INDEX_DIR = "index"
OBJECTS_DIR = "objects"
LOCK_NAME = "lock"
LOG_NAME = "dcmfs.log"
SNAPSHOTS_DIR = "snapshots"
#: ``snapshots/snapshot-<seq>``: a sealed copy of the index holding the journal
#: records up to ``seq``; ``snapshots/journal-<seq>``: an archived journal
#: segment ending with record ``seq``
SNAPSHOT_PREFIX = "snapshot-"
ARCHIVE_PREFIX = "journal-"
#: snapshots of stores made before they were named by journal sequence
#: (``index-<LMDB txnid>``): still used by a rebuild, pruned by the next snapshot
LEGACY_SNAPSHOT_PREFIX = "index-"
#: objects fsck could not prove to be garbage, moved out of ``objects/``
QUARANTINE_DIR = "quarantine"
#: S3 stores: the feature their header lists, and the writer's lease object
#: in the bucket (JSON: holder, host, pid, expires)
BACKEND_S3_FEATURE = "backend-s3-v1"
LEASE_NAME = "lease"
#: crypto-shredding: inode records may hold a file secret that is part of the
#: file's payload key (:mod:`dcmfs.index.shred`)
FILE_SECRETS_FEATURE = "file-secrets-v1"
#: S3 stores: objects uploaded in packs (:mod:`dcmfs.storage.packs`)
S3_PACKS_FEATURE = "s3-packs-v1"
#: objects may be coded with codec 7, blosc2 (the hot tier's; see
#: dcmfs.storage.codec): added at the first read-write opening, as
#: ``codec-htj2k`` was
BLOSC2_FEATURE = "codec-blosc2"
#: small chunks' objects kept in the index (database ``inline``), not as files
INLINE_FEATURE = "inline-small-v1"
#: the largest object (bytes as stored: header, payload, tag) kept inline:
#: 4 KiB, a page of LMDB's (a larger value goes to overflow pages of its
#: own, the cost an object file was for) and the 1 KiB files of a PACS's
#: small-file traffic (reports, SR, presentation states) with room to spare
INLINE_MAX = 4096
#: present while the store needs 'dcmfs fsck' (integrity errors were seen)
DAMAGE_MARK = "needs-fsck"

#: features this version understands; a store may use any subset.
#: ``special-files-v1``: the index may hold FIFOs, sockets and character and
#: block devices (a device's rdev in the inode record's trailing bytes, where
#: a symlink keeps its target); an older dcmfs would show a device as 0:0
#: and a fsck of it would not know them
KNOWN_FEATURES = frozenset({"chunked-v1", "sealed-names-v1", "codec-zstd", "codec-lzma",
                            "codec-jpegls", "codec-htj2k", "codec-jpegxl", "codec-jpeg2k",
                            "extents-v1", "digest-tree-v1",
                            "special-files-v1", "index-auth-v1", "backend-s3-v1",
                            "audit-v1", "key-slots-v1", "key-epochs-v1",
                            "deid-view-v1", FILE_SECRETS_FEATURE,
                            "ingest-v1", "key-generations-v1", S3_PACKS_FEATURE,
                            "framed-chunks-v1", BLOSC2_FEATURE, INLINE_FEATURE})
#: features this version may write into any store (plus ``codec-<name>`` of
#: the store's own codec); a store opened for writing whose header lacks one
#: gets it added first, so an older dcmfs refuses the store in one sentence
#: instead of meeting objects it cannot decode
WRITE_FEATURES = frozenset({"chunked-v1", "sealed-names-v1", "codec-zstd", "codec-jpegls",
                            "codec-htj2k", "codec-jpegxl", "codec-jpeg2k", "extents-v1",
                            "digest-tree-v1",
                            "special-files-v1", "index-auth-v1", "audit-v1", "key-slots-v1",
                            "deid-view-v1", FILE_SECRETS_FEATURE, "framed-chunks-v1",
                            BLOSC2_FEATURE, INLINE_FEATURE})
#: features this version may write into an S3 store besides (added the same way)
S3_WRITE_FEATURES = frozenset({S3_PACKS_FEATURE})


def write_features(header: dict) -> frozenset:
    """The features a store opened for writing gets (:data:`WRITE_FEATURES`,
    and :data:`S3_WRITE_FEATURES` for a store in a bucket)."""
    return WRITE_FEATURES | (S3_WRITE_FEATURES if header.get("backend") else frozenset())

# --- chunk objects -------------------------------------------------------------
# An object file ``objects/<oid[0:2]>/<oid hex>`` is:
#
#   offset  size  field
#   0       4     magic  b"DCMO"
#   4       1     format version (1)
#   5       1     object kind (1 = file chunk)
#   6       2     reserved, zero
#   8       12    nonce of the context block
#   20      84    context block: AES-GCM-SIV(object-context key, CTX_STRUCT) + tag
#                 (associated data: bytes 0..7 + store id)
#   104     12    nonce of the payload
#   116     n+16  payload: AES-256-GCM(file key, compressed chunk) + 16-byte tag
#                 (associated data: bytes 0..7 + store id + object id + CTX)
#
# The context block says which object this is (its own id) and which file,
# chunk and generation it belongs to, so the index can be rebuilt from the
# objects alone, and a moved, swapped or rolled-back object is not only
# refused but diagnosed (and a misplaced one put back by fsck).  The
# payload's associated data binds the object header, the store id, the object
# id and the whole context block.
OBJ_MAGIC = b"DCMO"
OBJ_KIND_CHUNK = 1
OBJ_PREFIX = struct.Struct(">4sBBH")  # magic, version, kind, reserved
NONCE_LEN = 12
TAG_LEN = 16
#: oid, file_id, ino, chunk index, generation, codec, flags, reserved,
#: plain_len, stored_len
CTX_STRUCT = struct.Struct(">16s16sQQQBBHII")
CTX_SEALED_LEN = CTX_STRUCT.size + TAG_LEN
OBJ_HEADER_LEN = OBJ_PREFIX.size + NONCE_LEN + CTX_SEALED_LEN + NONCE_LEN
#: version-1 objects: the context without the object id (52 bytes), the id
#: in the context's associated data instead; header 100 bytes
CTX1_STRUCT = struct.Struct(">16sQQQBBHII")
OBJ1_HEADER_LEN = OBJ_PREFIX.size + NONCE_LEN + CTX1_STRUCT.size + TAG_LEN + NONCE_LEN
CHUNK_FLAG_LAST = 0x01
#: the object is an extent of a file laid out in extents of their own sizes
#: (DICOM-coded): its offset is the sum of the lengths of the extents before
#: it, which is how an index rebuild from the objects alone places it
CHUNK_FLAG_EXTENT = 0x02
#: the object is framed (layout 3, feature ``framed-chunks-v1``): its payload
#: is a sealed frame table and frames sealed one by one, so a ranged read
#: decodes one 64 KiB frame (:mod:`dcmfs.storage.frames`)
CHUNK_FLAG_FRAMED = 0x04
#: the object is kept in the index (database ``inline``, feature
#: ``inline-small-v1``), not as an object file; sealed in the context block
#: like every flag, so a record whose flag was flipped does not match its object
CHUNK_FLAG_INLINE = 0x08

# --- dcmfs's own extended attributes ---------------------------------------------
#: the prefix dcmfs reserves: no file carries an attribute under it but the
#: virtual ones of the mount root below (and ``user.dcmfs.ops``, the FUSE
#: adapter's counters) and :data:`FSCK_XATTR`; setting, reading or removing
#: any other is refused (ENOTSUP) and listxattr never shows one
XATTR_PREFIX = "user.dcmfs."
#: ``dcmfs fsck --repair``'s note on a file it salvaged into /lost+found:
#: readable and removable through the mount, never settable
FSCK_XATTR = "user.dcmfs.fsck"

# --- live status ----------------------------------------------------------------
#: a virtual extended attribute of the mount's root directory: JSON with the
#: daemon's live figures (``dcmfs status`` reads it; not listed, not settable;
#: counts only, the same figures the index keeps in plain)
STATUS_XATTR = "user.dcmfs.status"
#: JSON of :meth:`FileSystem.content_stats` (``dcmfs stats`` on a mounted store)
STATS_XATTR = "user.dcmfs.stats"
#: set to b"recompress" on the root: queue every file for the re-encoder
#: (``dcmfs recompress`` on a mounted store)
CONTROL_XATTR = "user.dcmfs.control"
#: JSON progress and result of the last ``verify`` control command
VERIFY_XATTR = "user.dcmfs.verify"

# --- index ---------------------------------------------------------------------
ROOT_INO = 1
#: largest file size accepted (1 PiB); chunk indices stay far inside u64
MAX_FILE_SIZE = 1 << 50
