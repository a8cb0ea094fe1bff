"""The audit trail's writer: one per read-write opening of a store.

Each event is sealed into a frame (:mod:`.segments`) and written with one
``write(2)`` before the operation answers, like the index journal, so a
daemon killed at any point loses only records of operations that had not
returned; :meth:`AuditTrail.sync` (fsync(2) of a file, every checkpoint)
makes them durable, and a checkpoint stores the chain head in the index
(``meta/audit_head``, sealed), so that the index covers it.

*Folding*: an ``open`` identical to the previous record (same event, caller
uid and pid, inode, path and access mode) within :attr:`FOLD_WINDOW` seconds of
the first is not written; the count of such opens is written as one record
(``n``, and ``folded``: the sequence number of the first) before the next
different record, at the next checkpoint or at close.  A daemon killed in
between loses that count (at most one window's opens), never the first open.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from typing import Callable

from ..errors import StoreIOError
from ..storage import crypto
from ..storage.durable import fsync_dir
from . import segments as S

log = logging.getLogger("dcmfs.audit")

#: (uid, gid, pid) of the process a FUSE request came from
Caller = tuple[int, int, int]
#: opens identical to the one before within this many seconds are folded
FOLD_WINDOW = 1.0


#: pid -> (fd of /proc/PID/comm, process name, when read).  An open fd is
#: read again with one pread(2) instead of open, read and close (a third of
#: the cost of a record): it names the process it was opened for, never a
#: later one with the same pid (a read fails with ESRCH once that process
#: is gone), and shows the name after an exec(2).  Other events than opens
#: take a name read less than a second ago.
_NAMES: dict[int, tuple[int, str, float]] = {}
_NAMES_LOCK = threading.Lock()
NAME_TTL = 1.0
#: the most /proc/PID/comm files kept open (the oldest is closed first)
MAX_NAME_FDS = 64


def process_name(pid: int, fresh: bool = False) -> str:
    """``/proc/PID/comm`` ("?" once the process is gone); unless ``fresh``
    (opens), a name read less than a second ago."""
    now = time.monotonic()
    with _NAMES_LOCK:
        known = _NAMES.get(pid)
        if known is not None:
            fd, name, when = known
            if not fresh and now - when < NAME_TTL:
                return name
            try:
                raw = os.pread(fd, 64, 0)
            except OSError:
                raw = b""
            if raw:
                name = raw.rstrip(b"\n").decode("utf-8", "replace")
                _NAMES[pid] = (fd, name, now)
                return name
            del _NAMES[pid]  # that process is gone: its pid may be another's now
            os.close(fd)
        try:
            fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return "?"
        try:
            raw = os.pread(fd, 64, 0)
        except OSError:
            raw = b""
        if not raw:
            os.close(fd)
            return "?"
        name = raw.rstrip(b"\n").decode("utf-8", "replace")
        while len(_NAMES) >= MAX_NAME_FDS:
            os.close(_NAMES.pop(next(iter(_NAMES)))[0])
        _NAMES[pid] = (fd, name, now)
        return name


def identity(caller: Caller | None, fresh: bool = False) -> tuple:
    """(uid, gid, pid, process name) of a caller; the daemon's own for None
    (``fresh``: the name read now, as for every open)."""
    if caller is None:
        caller = (os.getuid(), os.getgid(), os.getpid())
    return (*caller, process_name(caller[2], fresh))


def note_failed_unlock(root: str, command: str) -> None:
    """Note a failed unlock attempt in the clear (nothing can be sealed
    without the key): time, uid, gid, pid and command.  Best effort: a user
    who cannot write the store cannot note anything."""
    d = os.path.join(root, S.DIR)
    cmd = S.NOTE_COMMANDS.index(command) if command in S.NOTE_COMMANDS else 0
    entry = S.NOTE.pack(time.time_ns(), os.getuid(), os.getgid(), os.getpid(), cmd)
    try:
        if not os.path.isdir(d) and os.path.isfile(os.path.join(root, "dcmfs.store")):
            os.mkdir(d, 0o700)
        fd = os.open(os.path.join(d, S.UNLOCK_NOTE),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 4096 * S.NOTE.size:
                os.write(fd, entry)
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("failed unlock not noted: %s", exc.strerror)


class AuditTrail:
    """The open, last segment of a store's trail; thread-safe."""

    def __init__(self, root: str, master_key: bytes, store_id: bytes, head: dict | None,
                 segment_size: int = 8 << 20, retention: float = 0.0,
                 clock: Callable[[], int] = time.time_ns, forward: bool = False,
                 older: tuple = ()) -> None:
        self.root = root
        self.dir = os.path.join(root, S.DIR)
        self._sid = store_id
        #: new segments are sealed under ``master_key`` (the index's key
        #: generation); a last segment under another live epoch's key (a
        #: crash within a generation move, :mod:`dcmfs.audit.rekey`) is
        #: resumed with it, ended, and followed by one under the current key
        self._current = self._aead = S.audit_key(master_key, store_id)
        self._older = [S.audit_key(k, store_id) for k in older if k != master_key]
        self._segment_size = segment_size
        self._retention = retention
        #: log a digest without names of every record (journald, syslog)
        self._forward = forward
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fold: list | None = None  # [key, count, first time, first seq, identity]
        #: record nonces: a random prefix per opening and a counter
        self._nonce_prefix, self._nonces = os.urandom(8), 0
        self.dirty = False
        self.failures = 0
        self._synced_head: tuple | None = None
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        segs = S.list_segments(root)
        if not segs:
            start = (1, 1, S.ZERO_HASH) if not head else (
                head["segment"] + 1, head["seq"] + 1, bytes.fromhex(head["hash"]))
            self._new_segment(*start)
            self.start = start
        else:
            self._resume(segs[-1], head)
            try:
                first = S.Header(S.read_file(segs[0][1])[:S.HEADER_LEN], None)
                self.start = (first.number, first.first_seq, first.prev_hash)
            except ValueError:  # damaged: verify names it; the head keeps the start
                self.start = (segs[0][0], 0, S.ZERO_HASH)
        if head and head.get("start_segment", 0) > self.start[0]:
            self.start = (head["start_segment"], head["start_seq"],
                          bytes.fromhex(head["start_hash"]))
        self._seal_unlock_note()
        self._apply_retention()

    # --- opening ----------------------------------------------------------------------
    def _resume(self, seg: tuple[int, str], head: dict | None) -> None:
        number, path = seg
        data = S.read_file(path)
        try:
            header = S.Header(data, self._aead)
        except ValueError:
            header = None
        other = None
        if header is not None and not header.authentic:
            other = next((a for a in self._older if S.Header(data, a).authentic), None)
            if other is not None:  # sealed again under the next generation
                self._aead, header.authentic = other, True
        if header is None or not header.authentic or header.store_id != self._sid \
                or header.number != number:
            self._restart(number + 1, head, "the last segment's header does not authenticate")
            return
        seq, digest, pos = header.first_seq - 1, header.prev_hash, S.HEADER_LEN
        if head and head["segment"] == number and S.HEADER_LEN <= head["offset"] <= len(data) \
                and other is None:  # (the head's hash is of the other generation's chain)
            seq, digest, pos = head["seq"], bytes.fromhex(head["hash"]), head["offset"]
        problem = None
        for item in S.frames(data, pos):
            if isinstance(item, S.Torn):
                break  # a write cut by a crash: cut it off below
            offset, fseq, frame = item
            try:
                if fseq != seq + 1:
                    raise ValueError("out of sequence")
                S.open_frame(self._aead, self._sid, number, digest, frame)
            except (crypto.AuthenticationFailed, ValueError):
                problem = f"record {fseq} at offset {offset} of segment {number} does not verify"
                break
            seq, digest, pos = fseq, S.chain(digest, frame), offset + len(frame)
        if problem is None and head and head["seq"] > seq:
            problem = f"the trail ends at record {seq}, before the index's head {head['seq']}"
        if problem is not None:
            self._restart(number + 1, head, problem)
            return
        self.segment, self.seq, self.hash, self.size = number, seq, digest, pos
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        if pos < len(data):
            os.ftruncate(self._fd, pos)  # the torn tail of a crash
        os.lseek(self._fd, pos, os.SEEK_SET)
        if self._aead is not self._current:  # ended under its key, go on under ours
            self._append({"t": self._clock(), "e": "segment-end", "next": number + 1})
            self._sync()
            self._new_segment(number + 1, self.seq + 1, self.hash)

    def _restart(self, number: int, head: dict | None, problem: str) -> None:
        """The trail on disk does not continue as it should: say so, and go
        on in a new segment linked to the index's head (verify names the
        break)."""
        log.error("audit trail damaged: %s; continuing in segment %d "
                  "(run 'dcmfs audit verify')", problem, number)
        seq, digest = (head["seq"], bytes.fromhex(head["hash"])) if head else (0, S.ZERO_HASH)
        while os.path.exists(os.path.join(self.dir, S.segment_name(number))):
            number += 1
        self._new_segment(number, seq + 1, digest)
        self._append({"t": self._clock(), "e": "audit-break", "reason": problem})

    def _new_segment(self, number: int, first_seq: int, prev_hash: bytes) -> None:
        path = os.path.join(self.dir, S.segment_name(number))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._aead = self._current
        header = S.make_header(self._aead, self._sid, number, first_seq, prev_hash)
        try:
            os.write(fd, header)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.segment, self.seq, self.hash, self.size = number, first_seq - 1, prev_hash, len(header)

    def _seal_unlock_note(self) -> None:
        path = os.path.join(self.dir, S.UNLOCK_NOTE)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        for off in range(0, len(raw) - S.NOTE.size + 1, S.NOTE.size):
            t, uid, gid, pid, cmd = S.NOTE.unpack_from(raw, off)
            command = S.NOTE_COMMANDS[cmd] if cmd < len(S.NOTE_COMMANDS) else "other"
            self._append({"t": t, "e": "unlock-failed", "u": uid, "g": gid, "p": pid,
                          "command": command, "noted": True})
        self._sync()
        os.unlink(path)  # a crash before this seals the note twice, never lost

    # --- recording --------------------------------------------------------------------
    def record(self, event: str, who: tuple | Caller | None = None, ino: int | None = None,
               path: str | None = None, **fields) -> None:
        """Append one event.  ``who``: (uid, gid, pid[, process name]); the
        process name is read from /proc when it is not given."""
        if who is None or len(who) == 3:
            who = identity(who)
        now = self._clock()
        rec = {"t": now, "e": event, "u": who[0], "g": who[1], "p": who[2], "c": who[3]}
        if ino is not None:
            rec["i"] = ino
        if path is not None:
            rec["path"] = path
        rec.update(fields)
        with self._lock:
            if event == "open":
                key = (who[0], who[2], ino, path, fields.get("access"), fields.get("trunc"))
                fold = self._fold
                if fold and fold[0] == key and now - fold[2] < FOLD_WINDOW * 1e9:
                    fold[1] += 1
                    return
            self._emit_fold()
            self._append(rec)
            if event == "open":
                self._fold = [key, 0, now, self.seq, rec]

    def _emit_fold(self) -> None:
        fold, self._fold = self._fold, None
        if fold and fold[1]:
            rec = dict(fold[4], t=self._clock(), n=fold[1], folded=fold[3])
            self._append(rec)

    def _append(self, rec: dict) -> None:
        if self._fd is None:
            return
        self._nonces += 1
        if self._nonces >> 32:
            self._nonce_prefix, self._nonces = os.urandom(8), 1
        frame = S.make_frame(self._aead, self._sid, self.segment, self.seq + 1, self.hash, rec,
                             self._nonce_prefix + self._nonces.to_bytes(4, "big"))
        try:
            n = os.write(self._fd, frame)
            if n != len(frame):
                raise OSError(28, "short write")
        except OSError as exc:
            self.failures += 1
            log.error("audit record not written: %s", exc.strerror)
            try:
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            return
        self.seq += 1
        self.hash = S.chain(self.hash, frame)
        self.size += len(frame)
        self.dirty = True
        if self._forward:
            log.info("audit record %d %s uid=%s ino=%s chain=%s", self.seq, rec["e"],
                     rec.get("u", "-"), rec.get("i", "-"), self.hash.hex())
        if self.size >= self._segment_size and rec["e"] != "segment-end":
            try:
                self._rotate()
            except (OSError, StoreIOError) as exc:  # go on in this segment
                self.failures += 1
                log.error("audit segment %d not rotated: %s", self.segment, exc)

    def _rotate(self) -> None:
        self._append({"t": self._clock(), "e": "segment-end", "next": self.segment + 1})
        self._sync()
        self._new_segment(self.segment + 1, self.seq + 1, self.hash)
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Drop whole segments older than the retention, oldest first, never
        the current one; a ``retention`` record first says where the
        retained chain starts."""
        if self._retention <= 0:
            return
        cutoff = time.time() - self._retention
        segs = S.list_segments(self.root)
        drop = []
        for number, path in segs[:-1]:
            if number >= self.segment or os.stat(path).st_mtime >= cutoff:
                break
            drop.append((number, path))
        if not drop:
            return
        nxt = next(p for n, p in segs if n > drop[-1][0])
        try:
            h = S.Header(S.read_file(nxt)[:S.HEADER_LEN], self._aead)
        except ValueError:
            return
        if not h.authentic:
            return  # never drop what precedes a segment that is not ours
        self._append({"t": self._clock(), "e": "retention", "dropped": [drop[0][0], drop[-1][0]],
                      "start_segment": h.number, "start_seq": h.first_seq,
                      "start_hash": h.prev_hash.hex()})
        self._sync()
        for _, path in drop:
            os.unlink(path)
        fsync_dir(self.dir)
        self.start = (h.number, h.first_seq, h.prev_hash)

    # --- durability ---------------------------------------------------------------------
    def _sync(self) -> None:
        if self.dirty and self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise StoreIOError(f"Syncing the audit trail failed: {exc.strerror}.") from exc
            self.dirty = False

    def sync(self) -> None:
        """Make every record durable (fsync(2) of a file, checkpoints)."""
        with self._lock:
            self._emit_fold()
            self._sync()

    def pending(self) -> bool:
        """Records (or folded opens) not yet durable or not in the index's head."""
        return self.dirty or bool(self._fold and self._fold[1]) \
            or self._synced_head != (self.segment, self.seq)

    def unsynced(self) -> bool:
        """Records (or folded opens) not yet durable."""
        return self.dirty or bool(self._fold and self._fold[1])

    def checkpoint(self) -> dict | None:
        """Sync, and the head for ``meta/audit_head`` if it moved (else None)."""
        with self._lock:
            self._emit_fold()
            self._sync()
            if self._synced_head == (self.segment, self.seq):
                return None
            self._synced_head = (self.segment, self.seq)
            return self._head()

    def _head(self) -> dict:
        return {"seq": self.seq, "hash": self.hash.hex(), "segment": self.segment,
                "offset": self.size, "start_segment": self.start[0],
                "start_seq": self.start[1], "start_hash": self.start[2].hex()}

    def status(self) -> dict:
        """Size and head (``dcmfs status`` of a mounted store)."""
        with self._lock:
            size = sum(os.path.getsize(p) for _, p in S.list_segments(self.root))
            return {"bytes": size, "seq": self.seq, "head": self.hash.hex(),
                    "segment": self.segment, "failures": self.failures}

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                self._emit_fold()
                self._sync()
            finally:
                os.close(self._fd)
                self._fd = None
