"""The pipe protocol between the daemon and a parser worker.

A message is a 12-byte header (magic ``b"DW"``, version u16, JSON length
u32, blob length u32, all big-endian), a JSON object and a blob of raw
bytes.  JSON carries only small fields (operation, geometry, codec ids, a
plan's encoding attributes); the blob carries the bytes to parse or the
coded payload.  Neither side ever unpickles or evaluates what the other
sends: a worker taken over by a crafted file can send the daemon wrong
answers, never code.

Requests (daemon -> worker):

* ``{"op": "analyse", "size": N}`` + the file's first bytes (at most
  :data:`dcmfs.storage.dicom.HEADER_CAP`): reply ``{"plan": {...}}``.
* ``{"op": "encode", "frame": [8 values], "zstd_level": L, "image": [ids]}``
  + one band of samples: reply ``{"codec": id}`` + the payload.
* ``{"op": "deid-facts", "size": N}`` + the file's first bytes: reply
  ``{"facts": {...}}`` (:func:`dcmfs.storage.deid.facts`).
* ``{"op": "deid-rewrite", "element_at", "value_at", "mapping", "pseudonym",
  "shift", "characteristics", "device", "safe_private"}`` + the header bytes: reply
  ``{"ok": true}`` + the de-identified header (:func:`dcmfs.storage.deid.rewrite`).

Every reply may instead be ``{"error": TYPE}``: the type of an exception,
never its message.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time

MAGIC = b"DW"
VERSION = 1
HEADER = struct.Struct(">2sHII")
#: a JSON part larger than this is a protocol error (plans are ~300 bytes; a
#: de-identification's UID list and mapping ~100 bytes a UID)
MAX_JSON = 8 * 1024 * 1024
#: a blob larger than this is a protocol error (a header prefix or one band)
MAX_BLOB = 80 * 1024 * 1024


class ProtocolError(Exception):
    """The other side sent something that is not a message (or hung up)."""


def send(fd: int, obj: dict, blob: bytes = b"", deadline: float | None = None) -> None:
    """Write one message (in one ``writev``: the reader wakes once); with a
    ``deadline`` (``time.monotonic()``), ``fd`` must be non-blocking and a
    reader that stops reading raises :class:`TimeoutError` instead of
    blocking the writer for ever."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    head = HEADER.pack(MAGIC, VERSION, len(data), len(blob)) + data
    _write_all(fd, [memoryview(head), memoryview(blob)] if blob else [memoryview(head)],
               deadline)


def recv(fd: int) -> tuple[dict, bytes]:
    magic, version, jlen, blen = HEADER.unpack(_read_exact(fd, HEADER.size))
    if magic != MAGIC or version != VERSION or jlen > MAX_JSON or blen > MAX_BLOB:
        raise ProtocolError("not a worker message")
    try:
        obj = json.loads(_read_exact(fd, jlen))
    except ValueError as exc:
        raise ProtocolError("not a worker message") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("not a worker message")
    return obj, _read_exact(fd, blen) if blen else b""


def _write_all(fd: int, parts: list[memoryview], deadline: float | None = None) -> None:
    """Write every part; a full pipe is waited for (until ``deadline``)
    only when a write would block."""
    while parts:
        try:
            n = os.writev(fd, parts)
        except BlockingIOError:
            left = None if deadline is None else deadline - time.monotonic()
            if not select.select([], [fd], [], None if left is None else max(0.0, left))[1]:
                raise TimeoutError from None
            continue
        except BrokenPipeError as exc:
            raise ProtocolError("the other side hung up") from exc
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if parts:
            parts[0] = parts[0][n:]


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("the other side hung up")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
