"""Import of the write-only inbox (:mod:`dcmfs.storage.inbox`) by a key holder.

At every read-write opening of a store with an ingest recipient (a mount,
``dcmfs recompress``), under the store lock and before anything is served,
and then every ``inbox_interval`` while it is mounted, each inbox record is opened with the recipient's private key and its file
created through the filesystem core, like any file written to a mount:
sealed under the store's own per-file keys and key epoch, journaled, in the
audit trail, queued for the re-encoder (DICOM-aware recompression).  Steps
of one file, each crash-safe:

1. every chunk is authenticated (its key, session, file, index and length
   in the associated data) and checked against the record (length,
   SHA-256) while it is written to a
   temporary name ``.dcmfs-import-<file id>`` beside the file's place (a
   temporary name left by a crash is removed first);
2. mode, owner and times are set, and the file is renamed to its path
   (RENAME_NOREPLACE); a name that is taken gets ``.ingest-N`` appended
   (the lowest N free; a long name's stem is cut to stay within 255
   bytes): nothing is ever overwritten.  A taken name holding
   the very same bytes counts as this record, already imported (a crash
   between the rename and step 3);
3. once a session's files are durable (a journal sync), its records and
   then its chunks are removed, and the session with what is left in it
   (chunks of files never closed).

Of a session an ingest mount still holds (its ``lock`` is taken), only
the files it handed over are imported (their last record says ``final``:
the mount never writes them again); the others wait for the mount to end
(or die).  A live mount may still extend a file it fsynced, or rename,
re-time or chmod one it closed and has not handed over, each time writing
a newer record that names the file's chunks: an import that removed them
would leave that record refused and the file in the store short or under
its old name.

A record or chunk that does not authenticate, or does not match, is refused
and left where it is (named in the log by session and file id, never by
name: the name is inside the seal); the others are imported.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading

from ..errors import DcmfsError, Exists, FsError, NotFound
from ..storage import inbox
from ..storage.inbox import InboxDamaged

log = logging.getLogger("dcmfs.ingest")

TMP_PREFIX = ".dcmfs-import-"
LOCK = "lock"
#: one import at a time (the opening's, then the checkpoint thread's)
_ONE = threading.Lock()
#: records refused already by this process (logged once, not at every round)
_REFUSED: set = set()
#: a fault hook for crash tests: called with "written" (a file's temporary
#: name complete), "placed" (renamed), "synced" (a session's files durable)
#: and "removed" (a record removed)
STEP = None


def _step(name: str) -> None:
    if STEP is not None:
        STEP(name)


def import_inbox(fs) -> dict:
    """Import every complete record of the store's inbox into ``fs`` (a
    :class:`~dcmfs.core.filesystem.FileSystem` opened read-write); returns
    {"imported": files, "refused": records, "sessions": removed}."""
    done = {"imported": 0, "refused": 0, "sessions": 0}
    if fs.store.ingest is None:
        return done
    with _ONE:
        return _import(fs, done)


def _import(fs, done: dict) -> dict:
    entry, private = fs.store.ingest
    _sweep_unplaced(os.path.join(fs.store.root, inbox.INBOX_DIR))
    for session, sdir in inbox.sessions(fs.store.root):
        live = not _session_over(sdir)  # a live write-only mount: its final records only
        imported, refused, remove = [], 0, []
        for file_id, seqs in inbox.records(sdir).items():
            where = f"inbox session {session.hex()[:8]}, file {file_id.hex()}"
            try:
                record = inbox.open_record(entry, private, fs.store.store_id, session, file_id,
                                           seqs[-1], inbox.read_small(os.path.join(
                                               sdir, inbox.record_name(file_id, seqs[-1]))))
                _check(record, fs.store.chunk_size)
                if live and record.get("final") is not True:
                    continue  # the mount may still write it again
                _import_file(fs, record, session, file_id, sdir)
            except FileNotFoundError:  # rewritten meanwhile by a live ingest mount
                continue
            except Exception as exc:  # noqa: BLE001 - one bad record never stops an opening
                refused += 1
                if (session, file_id, seqs[-1]) not in _REFUSED:  # once per process
                    _REFUSED.add((session, file_id, seqs[-1]))
                    # any other error's message may hold the path: its class only
                    log.error("%s refused, left in the inbox: %s", where,
                              exc if isinstance(exc, InboxDamaged) else
                              f"its path cannot be made ({type(exc).__name__}: a file "
                              "where it needs a directory?)" if isinstance(exc, FsError) else
                              f"it cannot be imported ({type(exc).__name__})")
                continue
            imported.append(file_id)
            remove += [inbox.record_name(file_id, s) for s in seqs]
            remove += [c[0] + ".obj" for c in record["chunks"]]
        if imported:
            fs.sync_all()  # the files are durable before their records go
            _step("synced")
        for name in sorted(remove, key=lambda n: not n.endswith(".rec")):
            _unlink(os.path.join(sdir, name))
            _step("removed")
        done["imported"] += len(imported)
        done["refused"] += refused
        if not refused and not live and _session_over(sdir):
            for name in os.listdir(sdir):
                _unlink(os.path.join(sdir, name))
            os.rmdir(sdir)
            done["sessions"] += 1
    if done["imported"] or done["refused"]:
        log.info("inbox: %d files imported, %d records refused, %d sessions done",
                 done["imported"], done["refused"], done["sessions"])
    return done


def _sweep_unplaced(base: str) -> None:
    """Sessions an ingest mount made but never put in place (``.<session>``:
    it died before it was mounted) hold nothing; those no mount holds go."""
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(base, name)
        if len(name) == 33 and name[0] == "." and not os.path.islink(path) \
                and os.path.isdir(path) and _session_over(path):
            try:
                for leaf in os.listdir(path):
                    _unlink(os.path.join(path, leaf))
                os.rmdir(path)
            except OSError as exc:  # the mount making it got there first
                if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                    raise


def _session_over(sdir: str) -> bool:
    """Does no ingest mount hold this session any more (its lock is free)?"""
    try:
        fd = os.open(os.path.join(sdir, LOCK), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _check(record: dict, chunk_size: int) -> None:
    """Raise :class:`InboxDamaged` unless the (authentic) record is one an
    ingest node writes: a clean absolute path, a regular file, an owner and
    times that fit (u32, i64 nanoseconds), chunks of at most the store's
    chunk size (nothing is decompressed past that) that add up to its size."""
    try:
        path = record["path"]
        parts = path.split("/")
        ok = (isinstance(path, str) and path.startswith("/") and "\0" not in path
              and all(p not in ("", ".", "..") for p in parts[1:]) and len(parts) > 1
              and stat.S_ISREG(record["mode"]) and len(bytes.fromhex(record["key"])) == 32
              and all(type(record.get(k, 0)) is int and 0 <= record.get(k, 0) < 1 << 32
                      for k in ("uid", "gid"))
              and all(record.get(k) is None
                      or (type(record[k]) is int and -(1 << 63) <= record[k] < 1 << 63)
                      for k in ("atime_ns", "mtime_ns"))
              and record.get("final", False) in (True, False)
              and sum(c[1] for c in record["chunks"]) == record["size"]
              and all(len(c[0]) == 32 and int(c[0], 16) >= 0 and 0 <= c[1] <= chunk_size
                      and 0 < c[2] <= chunk_size + (chunk_size >> 6) + 4096
                      for c in record["chunks"]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InboxDamaged("the record is not what an ingest node writes") from exc
    if not ok:
        raise InboxDamaged("the record is not what an ingest node writes")


def _parents(fs, path: str, uid: int, gid: int) -> None:
    parts = path.split("/")[1:-1]
    for i in range(len(parts)):
        try:
            fs.mkdir("/" + "/".join(parts[:i + 1]), 0o755, uid, gid)
        except Exists:
            pass


def _import_file(fs, record: dict, session: bytes, file_id: bytes, sdir: str) -> None:
    path = record["path"]
    uid, gid = int(record.get("uid", 0)), int(record.get("gid", 0))
    _parents(fs, path, uid, gid)
    parent = path.rpartition("/")[0]
    tmp = f"{parent}/{TMP_PREFIX}{file_id.hex()}"
    try:
        fs.unlink(tmp)  # a crash left it half-written
    except NotFound:
        pass
    fh = fs.create(tmp, record["mode"] & 0o7777, os.O_WRONLY, uid, gid)
    whole = hashlib.sha256()
    try:
        offset = 0
        key = bytes.fromhex(record["key"])
        for index, (oid, plain_len, stored_len, digest) in enumerate(record["chunks"]):
            try:
                blob = inbox.read_small(os.path.join(sdir, oid + ".obj"), stored_len)
            except FileNotFoundError as exc:
                raise InboxDamaged(f"chunk {index} is missing") from exc
            if len(blob) != stored_len:
                raise InboxDamaged(f"chunk {index} has the wrong length")
            plain = inbox.open_chunk(key, fs.store.store_id, session, file_id, index, blob,
                                     plain_len, bytes.fromhex(digest))
            fs.write(fh, plain, offset)
            whole.update(plain)
            offset += plain_len
    except BaseException:
        fs.release(fh)
        fs.unlink(tmp)
        raise
    fs.release(fh)
    fs.chmod(tmp, record["mode"] & 0o7777)
    fs.utimens(tmp, record.get("atime_ns"), record.get("mtime_ns"))
    _step("written")
    name = _place(fs, tmp, path, whole.digest(), record["size"])
    fs._audit("ingest", fs.getattr(name)["st_ino"], name, session=session.hex(),
              file=file_id.hex(), size=record["size"])
    _step("placed")


def _place(fs, tmp: str, path: str, digest: bytes, size: int) -> str:
    """Rename ``tmp`` to ``path``, or to ``path.ingest-N`` if that is taken;
    a taken name with the same bytes is this file imported before.  Returns
    the name it has."""
    n = 0
    while True:
        name = path if n == 0 else _suffixed(path, n)
        try:
            fs.rename(tmp, name, 1)  # RENAME_NOREPLACE
            return name
        except Exists:
            if _same(fs, name, digest, size):
                fs.unlink(tmp)
                return name
        n += 1


def _suffixed(path: str, n: int, name_max: int = 255) -> str:
    """``path.ingest-N``, its last component's stem cut (whole characters)
    so that the name stays within ``name_max`` bytes."""
    parent, _, base = path.rpartition("/")
    suffix = f".ingest-{n}"
    room = name_max - len(suffix.encode())
    raw = os.fsencode(base)
    if len(raw) > room:
        cut = raw[:room]
        for drop in range(4):  # not inside a UTF-8 character
            try:
                base = cut[:room - drop].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:  # not UTF-8 at all: bytes as they are
            base = os.fsdecode(cut)
    return f"{parent}/{base}{suffix}"


def _same(fs, path: str, digest: bytes, size: int) -> bool:
    try:
        st = fs.getattr(path)
        if not stat.S_ISREG(st["st_mode"]) or st["st_size"] != size:
            return False
        fh = fs.open(path, os.O_RDONLY)
    except DcmfsError:
        return False
    try:
        h, offset = hashlib.sha256(), 0
        while offset < size:
            data = fs.read(fh, 1 << 20, offset)
            if not data:
                break
            h.update(data)
            offset += len(data)
        return h.digest() == digest
    finally:
        fs.release(fh)
