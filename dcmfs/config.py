"""Configuration as one frozen object passed down from the CLI.

Nothing in dcmfs reads module-global mutable settings (pydicom's global
``config.settings`` is the counter-example we avoid); tests build their own
:class:`Config` with cheap key-derivation parameters.
"""

from __future__ import annotations

import dataclasses

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters for passphrase-protected stores.

    The defaults follow the OWASP recommendation for Argon2id (64 MiB, 3
    passes); they are stored in the store header when a store is created, so
    later changes here do not lock anyone out.
    """

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4


#: the bounds of Argon2id parameters dcmfs accepts, checked before they are
#: used: a store header is read before it is authenticated (its parameters
#: are what derives the key that authenticates it), so a header raised to
#: 16 GiB or a million passes must be refused, not run.  ``dcmfs init``
#: writes :class:`KdfParams` (64 MiB, 3 passes, 4 lanes), well inside.
KDF_MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB
KDF_MAX_ITERATIONS = 10
KDF_MAX_LANES = 16


def kdf_within_bounds(params: object) -> bool:
    """Are these (a header's ``argon2id`` table) Argon2id parameters dcmfs
    accepts?  Integers only; Argon2 itself needs 8 KiB of memory per lane."""
    if not isinstance(params, dict) or set(params) != {"memory_kib", "iterations", "lanes"}:
        return False
    if not all(type(v) is int for v in params.values()):
        return False
    m, t, p = params["memory_kib"], params["iterations"], params["lanes"]
    return (1 <= p <= KDF_MAX_LANES and 1 <= t <= KDF_MAX_ITERATIONS
            and 8 * p <= m <= KDF_MAX_MEMORY_KIB)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one store opening (mount, status, …)."""

    #: plaintext bytes per chunk; 1 MiB matches libfuse3's request size
    chunk_size: int = 1 * MiB
    #: codec name for new stores ("zstd", "lzma", "none")
    codec: str = "zstd"
    #: zstd level for new chunks. Measured on the 400-file CT series with
    #: compression at close: level 1 ingests ~60 MB/s at ratio 0.389, level 3
    #: ~45 MB/s at 0.360 (before the journal); with the background re-encoder
    #: the level sets how fast the backlog drains. ``-o zstd_level=N`` overrides.
    zstd_level: int = 1
    #: lzma preset (the published method used xz's default, 6)
    lzma_preset: int = 6
    #: Argon2id parameters used when a passphrase store is created
    kdf: KdfParams = KdfParams()
    #: plaintext bytes of unsealed (dirty) chunk buffers kept per open file
    #: before the oldest are sealed early; bounds memory for huge files
    dirty_limit: int = 16 * MiB
    #: decoded chunks kept for reads (bytes, shared by all files)
    read_cache_bytes: int = 64 * MiB
    #: threads that compress, seal and write chunks (zstd and AES release the GIL)
    workers: int = 2
    #: sealed chunks waiting for a worker before writers are made to wait
    max_inflight: int = 8
    #: mounted read-only
    read_only: bool = False
    #: decompress each compressed chunk and compare before sealing it
    verify_writes: bool = True
    #: objects of at most this many bytes are kept in the index, not as
    #: files (feature ``inline-small-v1``; 0: none); at most
    #: :data:`dcmfs.format.INLINE_MAX`
    inline_max: int = 4096
    #: seal closed files uncompressed and compress them in a background
    #: thread (the close path then costs AES-GCM and a write, not zstd)
    reencode: bool = True
    #: threads (cores) the background re-encoder may use while files are not
    #: being written; while they are, it uses one (``-o reencode_threads=N``)
    reencode_threads: int = 2
    #: the re-encoder stores DICOM files with native pixel data frame by frame
    #: with a lossless image codec (or zstd where that is smaller);
    #: ``-o dicom=0`` keeps zstd
    dicom: bool = True
    #: the DICOM analysis and the image encoders run in worker processes
    #: that hold no key, with the limits below (``-o sandbox=0``: in the
    #: daemon, as before; for measurements only - a hostile file can then
    #: exhaust the daemon's memory or stall its unmount)
    sandbox: bool = True
    #: dcmfs's request loop (:mod:`dcmfs.adapter.loop`; ``-o threads=0``:
    #: libfuse's single thread): one thread serves requests in turn, and a
    #: request that takes long, such as a fsync of a gigabyte, holds its own
    #: thread while another serves the next ones
    fuse_threads: bool = True
    #: KiB the kernel reads ahead of a sequential reader of the mount, set
    #: on the mount's backing device info once it is live (root only: the
    #: kernel gives a FUSE mount 128 KiB, so a CT slice came in 5 READs;
    #: ``-o read_ahead_kb=0`` leaves the kernel's value)
    read_ahead_kb: int = 1024
    #: heap of each parser worker (RLIMIT_DATA); past it the file stays with
    #: the general codec ("analysis limit")
    parser_memory: int = 1024 * MiB
    #: seconds one analysis (or the encoding of one band, plus a second per
    #: MB) may take before its worker is killed ("analysis limit")
    parser_timeout: float = 30.0
    #: "deid": serve the de-identified research view instead of the files
    #: (``-o view=deid``, read-only; :mod:`dcmfs.core.deidview`)
    view: str = ""
    #: the view's profile options: dates removed or shifted per patient,
    #: patient characteristics and device identity kept, files that may
    #: carry burned-in text served too
    deid_dates: str = "remove"
    deid_characteristics: bool = False
    deid_device: bool = False
    deid_burned_in: bool = False
    deid_safe_private: bool = False
    #: the image codecs offered each frame (with zstd); the exact result of
    #: least stored bytes plus weighted decode time is kept
    #: (``-o image_codecs=htj2k+jpegxl+jpeg2k``; see dcmfs.storage.codec for figures)
    image_codecs: tuple[str, ...] = ("htj2k", "jpegxl")
    #: days a re-encoded DICOM file stays in the fast-decoding form (HTJ2K)
    #: after it was coded or last read, before it is coded densely with
    #: ``image_codecs`` (0: densely at once; :mod:`dcmfs.core.tiers`)
    hot_days: float = 7.0
    #: logical bytes of files waiting for the re-encoder before close
    #: compresses inline again (bounds the extra space the backlog takes)
    backlog_limit: int = 1024 * MiB
    #: seconds between background checkpoints of the index (0: only when the
    #: journal grows, at fsync of a directory and at umount); like ext4's
    #: commit interval, it bounds what a power loss can take from files that
    #: were closed but never fsynced
    checkpoint_interval: float = 5.0
    #: archived journal bytes after which a new index snapshot is taken while
    #: mounted (snapshots are also taken at every clean unmount)
    snapshot_after: int = 64 * MiB
    #: seconds after the first deletion not yet shredded when a mounted
    #: daemon runs a shred pass (0: only at unmount and on 'dcmfs shred';
    #: ``-o shred_after=T``, :mod:`dcmfs.opened.shred`)
    shred_after: float = 3600.0
    #: seconds in which the background scrubber verifies every file once
    #: (0: no scrubbing; ``-o scrub_interval=S``)
    scrub_interval: float = 0.0
    #: seconds between looks at the write-only inbox of a mounted store with
    #: an ingest recipient (0: only when the store is opened; ``-o inbox_interval=T``)
    inbox_interval: float = 60.0
    #: a write-only mount hands a file over to the key holders this many
    #: seconds after its close: from then on the mount refuses to rename,
    #: change or delete it (EACCES) and a key holder imports it while the
    #: mount goes on (0: only when the mount ends; ``-o handover_after=T``)
    handover_after: float = 60.0
    #: the scrubber's I/O bound (plaintext bytes per second)
    scrub_rate: int = 32 * MiB
    #: record who opened, wrote, renamed and deleted which file in the
    #: store's sealed audit trail (``-o audit=0``: no trail)
    audit: bool = True
    #: seconds after which whole audit segments are dropped (0: keep all;
    #: ``-o audit_retention=T``)
    audit_retention: float = 0.0
    #: log a PHI-free digest of every audit record (sequence, event, uid,
    #: inode, chain hash) at INFO, for journald or a syslog server to keep an
    #: outside copy of the chain (``-o audit_forward=1``)
    audit_forward: bool = False
    #: bytes after which the audit trail starts a new segment
    audit_segment_size: int = 8 * MiB
    #: the LMDB map size; LMDB only uses what it needs
    index_map_size: int = 64 * 1024 * MiB
    #: where the witness of each store lives (None: ``/var/lib/dcmfs`` for
    #: root, the XDG state directory for a user; see dcmfs.index.witness)
    state_dir: str | None = None
    #: open a store that is older than its witness (a restored backup, or a
    #: rollback): logged, and the witness starts again from the store
    accept_rollback: bool = False
    #: S3 stores: bytes the local cache of objects may hold (objects not yet
    #: uploaded count too; when they alone fill it, writers wait for uploads)
    cache_size: int = 8000 * 1000 * 1000
    #: S3 stores: fsync also waits until every object is in the bucket
    s3_sync: bool = False
    #: S3 stores: threads that upload objects in the background
    s3_uploaders: int = 4
    #: S3 stores: seconds a new object waits before its upload (unless the
    #: cache is half full of waiting objects, or fsync with s3_sync, or the
    #: unmount drains), so that a chunk the re-encoder replaces soon is
    #: never uploaded uncompressed (measured on a 100-slice CT series: 0.19
    #: GB uploaded per GB ingested with 10 s, 1.19 with 0)
    s3_upload_delay: float = 10.0
    #: S3 stores, read-write: seconds between uploads of the journal for
    #: read-only followers (dcmfs.opened.follow); 0: none
    s3_publish_interval: float = 10.0
    #: S3 stores, read-only mounts: apply the writer's published journal
    #: every this many seconds (a follower); 0: show the store as attached
    follow: float = 0.0
    #: S3 stores: seconds a clean close waits for the upload backlog (what is
    #: left is uploaded by the next opening)
    s3_drain_timeout: float = 600.0
    #: S3 stores: endpoint, region and credentials (never from argv; None:
    #: the AWS environment variables)
    s3: "S3Settings | None" = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Where a bucket's server is and how to sign requests (the secret is
    not shown); any field left None comes from the AWS environment
    variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``)."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
