"""A follower's index: the writer's journal records applied as far as the
bucket holds what they name (read-only mounts that follow a writer, see
:mod:`dcmfs.opened.follow`).

The writer uploads its journal before all of the objects its records name
are in the bucket (uploads wait a while, and a chunk sealed uncompressed is
replaced by the re-encoder's object, which is uploaded instead: the first is
never uploaded at all).  So a follower does not apply record after record:
it applies the longest run of the new records after which every chunk entry
the run put names an object the bucket holds, and leaves the rest for its
next round.  The index then never names a missing object because of the
lag, only because of damage (which reads report as EIO, as always).
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..format import CHUNK_FLAG_INLINE
from ..errors import DcmfsError
from .inline import split_key
from .journal import CONVERT, DELETE, PUT, Journal, Op
from .schema import DATABASES, decode_chunk

CHUNKS = DATABASES.index("chunks")
INLINE = DATABASES.index("inline")


def read_records(paths: list[str], key: bytes, store_id: bytes,
                 after: int) -> tuple[dict[int, list[Op]], list[tuple[str, DcmfsError]]]:
    """The records after ``after`` of the journal files at ``paths`` (they
    may overlap: the first copy of each), every one authenticated under the
    store's key with its sequence number; and the files that are not this
    store's journals (another store's, or a damaged header), skipped, with
    why."""
    records: dict[int, list[Op]] = {}
    skipped = []
    for path in paths:
        try:
            journal = Journal(path, key, store_id, read_only=True)
        except DcmfsError as exc:
            skipped.append((path, exc))
            continue
        try:
            for seq, ops in journal.records(after):
                records.setdefault(seq, ops)
        finally:
            journal.close()
    return records, skipped


def apply_available(index, records: Iterable[tuple[int, list[Op]]],
                    present: Callable[[set[bytes]], set[bytes]],
                    held: Callable[[], dict[int, set[bytes]]] = dict) -> int:
    """Apply to ``index`` (opened read-write, nothing else writing it) the
    longest run of ``records`` that continues its sequence and leaves no
    chunk entry naming an object missing from the bucket; ``present(oids)``
    answers which of these object ids the bucket holds.  The result is
    checkpointed (the sums sealed as at any checkpoint); returns how many
    records were applied.  ``records`` may come from several journal files
    that overlap, in any order: they are taken in sequence, the first copy
    of each.  ``held()``: inode -> the object ids it reads, of the files
    open on the follower; an inline row of one of them that a record
    deletes is kept (:meth:`~dcmfs.index.inline.InlineRows.keep`): an open
    file reads the version it opened, as an object file lasts the writer's
    delete delay (rows of later versions are not kept).

    The records come from journals whose every record authenticated under
    the store's key with its sequence number (:class:`~dcmfs.index.journal.Journal`):
    nothing is applied twice, out of order or across a gap.
    """
    by_seq: dict[int, list[Op]] = {}
    for seq, ops in records:
        by_seq.setdefault(seq, ops)
    run: list[tuple[int, list[Op]]] = []
    expect = index.seq
    for seq, ops in sorted(by_seq.items()):
        if seq <= expect:
            continue
        if seq != expect + 1:
            break  # a gap: what follows waits for the missing segment
        run.append((seq, ops))
        expect = seq
    if not run:
        return 0
    # the chunk entries after each record, and every object they may name
    states: list[dict[bytes, bytes | None]] = []
    touched: dict[bytes, bytes | None] = {}
    wanted: set[bytes] = set()
    for _, ops in run:
        for kind, db_id, key, value in ops:
            if db_id != CHUNKS or kind == CONVERT:
                continue
            ref = decode_chunk(index.open("chunks", key, value)) if kind == PUT else None
            # an inline object is in the index, put by the same record: never in the bucket
            oid = ref.oid if ref is not None and not ref.flags & CHUNK_FLAG_INLINE else None
            touched[key] = oid
            if oid is not None:
                wanted.add(oid)
        states.append(dict(touched))
    have = present(wanted) if wanted else set()
    good = 0
    for n, state in enumerate(states, 1):
        if all(oid is None or oid in have for oid in state.values()):
            good = n
    reading = held() if good else {}
    for seq, ops in run[:good]:
        for kind, db_id, key, _ in ops:
            if kind == DELETE and db_id == INLINE:
                ino, oid = split_key(key)
                if oid in reading.get(ino, ()):
                    index.inline.keep(key)
        index._apply(index._parent(), ops).commit()
        index._count(index._applied)
        index._seq = seq
    if good:
        index.checkpoint()
    return good
