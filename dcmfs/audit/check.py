"""Reading the audit trail with the key: every record, and the chain check
(``dcmfs audit``, ``dcmfs audit verify``); works on a mounted store too (a
frame being written at the very end is left out as torn).

The check walks every segment in order and names each break: a segment
that is not one, of another store, renamed, or whose header was altered;
segments missing (by the numbering, by the retained start the index's head
and the chain's ``retention`` records give); a segment that does not
continue its predecessor; a record out of sequence (reordered or removed),
one that does not authenticate (altered, or following an altered or
removed one), a segment cut short (torn, or without its ``segment-end``
record); and a trail that ends before, or differs at, the head the index
holds (``meta/audit_head``).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from .. import format as fmt
from ..errors import DcmfsError
from ..index import index_sealer, read_meta, sealed_aad
from ..storage import crypto
from . import segments as S


def index_head(root: str, master_key: bytes, store_id: bytes) -> dict | None | str:
    """The chain head the index holds; None if none; a problem (str) if it
    does not authenticate or the index cannot be read."""
    try:
        found = read_meta(os.path.join(root, fmt.INDEX_DIR), ("audit_head",),
                          "reading the audit head")
    except DcmfsError as exc:
        return f"the index cannot be read ({exc})"
    raw = found and found["audit_head"]
    if not raw:
        return None
    try:
        return json.loads(index_sealer(master_key, store_id).open(
            raw, sealed_aad("meta", b"audit_head")))
    except (crypto.AuthenticationFailed, ValueError):
        return "the index's audit head does not authenticate"


def walk(root: str, master_key: bytes, store_id: bytes,
         head: dict | None = None, older: tuple = ()) -> Iterator[tuple[str, object]]:
    """("record", fields with ``seq`` and ``segment``) for every record that
    verifies, ("problem", text) for every break, in trail order;
    ("end", (seq, hash)) last.  ``older``: the keys of the store's other
    live epochs; a segment under one of them (a crash within a key
    generation move, :mod:`dcmfs.audit.rekey`) is read with it, and the
    index's head, of the other generation's chain, is not compared there."""
    index_aead = S.audit_key(master_key, store_id)
    others = [S.audit_key(k, store_id) for k in older if k != master_key]
    segs = S.list_segments(root)
    prev_number = None
    seq, digest = None, None
    retained = None  # the retained start the trail's own records give
    head_seen = False
    #: a read-only follower's trail (its ``follower`` records): the index
    #: holds the writer's head, of another trail, which is not compared
    follower = False
    against_head: list[str] = []
    first = None  # (number, first sequence) of the first readable segment
    for i, (number, path) in enumerate(segs):
        last = i == len(segs) - 1
        problem = None
        aead = index_aead
        try:
            data = S.read_file(path)
            header = S.Header(data, aead)
            if not header.authentic:
                aead = next((a for a in others if S.Header(data, a).authentic), aead)
                header = S.Header(data, aead)
        except (OSError, ValueError) as exc:
            problem = f"segment {number}: not a readable audit segment ({exc})"
        else:
            if header.store_id != store_id:
                problem = f"segment {number} belongs to another store"
            elif not header.authentic:
                problem = f"segment {number}: its header was altered (does not authenticate)"
        if problem is not None:  # named; the next segment is checked on its own
            yield "problem", problem
            first = first or (number, None)
            prev_number, seq = number, None
            continue
        if header.number != number:
            yield "problem", (f"segment file {number} holds segment {header.number} "
                              "(renamed or reordered)")
        if prev_number is None:
            first = (number, header.first_seq)
        elif number != prev_number + 1:
            yield "problem", f"segments {prev_number + 1}..{number - 1} are missing (removed)"
            seq = None
        if seq is not None and (header.first_seq != seq + 1 or header.prev_hash != digest):
            yield "problem", (f"segment {number} does not continue segment {prev_number} "
                              f"(it starts at record {header.first_seq} after record {seq}: "
                              "records removed, or a segment of another trail)")
        prev_number = number
        seq, digest = header.first_seq - 1, header.prev_hash
        ended = False
        broken = False
        for item in S.frames(data):
            if isinstance(item, S.Torn):
                if not last:
                    yield "problem", (f"segment {number} is truncated: {item.length} bytes "
                                      f"after record {seq} are no whole record")
                break
            offset, fseq, frame = item
            if broken:
                seq, digest = fseq, S.chain(digest, frame)
                continue
            if fseq != seq + 1:
                yield "problem", (f"segment {number}, offset {offset}: record {fseq} follows "
                                  f"record {seq} (records reordered or removed)")
                broken = True
                seq, digest = fseq, S.chain(digest, frame)
                continue
            try:
                fields = S.open_frame(aead, store_id, number, digest, frame)
            except (crypto.AuthenticationFailed, ValueError):
                yield "problem", (f"segment {number}, record {fseq} at offset {offset} does "
                                  "not authenticate (altered, or its predecessor was)")
                broken = True
                seq, digest = fseq, S.chain(digest, frame)
                continue
            seq, digest = fseq, S.chain(digest, frame)
            if head and fseq == head.get("seq"):
                head_seen = True
                if digest.hex() != head.get("hash") and aead is index_aead:
                    against_head.append(f"record {fseq} is not the one the index's head names "
                                        "(the trail was altered or replaced)")
            follower = follower or fields.get("e") == "follower"
            ended = fields.get("e") == "segment-end"
            if fields.get("e") == "retention" and fields.get("start_segment", 0) > (retained or 0):
                retained = fields["start_segment"]
            yield "record", dict(fields, seq=fseq, segment=number)
        if not last and not ended and not broken:
            yield "problem", (f"segment {number} is truncated: it ends at record {seq} "
                              "without its end record")
    if head and not head_seen and head.get("seq", 0) > (seq or 0):
        against_head.append(f"the trail ends at record {seq or 0}, but the index's head is "
                            f"record {head['seq']}: records {(seq or 0) + 1}..{head['seq']} "
                            "were removed (truncated)")
    if not follower:
        for problem in against_head:
            yield "problem", problem
        if head and head.get("start_segment", 0) > (retained or 0):
            retained = head["start_segment"]
    if first is not None and retained and first[0] > retained:
        yield "problem", (f"segments {retained}..{first[0] - 1} are missing (removed): the "
                          f"retained trail starts at segment {retained}")
    elif first is not None and not retained and first[1] not in (1, None):
        yield "problem", (f"the trail starts at segment {first[0]}, record {first[1]}: the "
                          "segments before it are missing (removed)")
    yield "end", (seq or 0, (digest or S.ZERO_HASH).hex())


def unsealed_unlock_failures(root: str) -> list[dict]:
    """The failed unlock attempts noted since the last read-write opening."""
    try:
        raw = S.read_file(os.path.join(root, S.DIR, S.UNLOCK_NOTE))
    except OSError:
        return []
    out = []
    for off in range(0, len(raw) - S.NOTE.size + 1, S.NOTE.size):
        t, uid, gid, pid, cmd = S.NOTE.unpack_from(raw, off)
        out.append({"t": t, "e": "unlock-failed", "u": uid, "g": gid, "p": pid,
                    "command": S.NOTE_COMMANDS[cmd] if cmd < len(S.NOTE_COMMANDS) else "other",
                    "sealed": False})
    return out
