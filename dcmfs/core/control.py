"""Operations on the store as a whole (a part of the core): live figures,
content statistics and the control commands (recompress, pause, resume,
verify).

:class:`StoreOps` is mixed into :class:`dcmfs.core.filesystem.FileSystem`; it uses
the FileSystem's index, re-encoder, scrubber and lock, like
:class:`dcmfs.core.handles.FileOps`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import stat

from ..storage import codec as codecs
from ..errors import InvalidArgument, ReadOnlyError
from ..index import Index
from ..storage.objects import stored_bytes
from .handles import _locked
from .scrub import VerifyJob
from ..opened.shred import shred_state

log = logging.getLogger("dcmfs.fs")

PR_GET_DUMPABLE = 3

#: the fields a ``key`` audit record may have, with their types
#: (:meth:`StoreOps.record_key_change`)
KEY_FIELDS = {"action": str, "slot": int, "kind": str, "old_kind": str, "label": str,
              "by": int, "by_kind": str, "epoch": int, "chunks": int, "destroyed": list}


class StoreOps:
    """Figures, statistics, control commands."""

    @_locked
    def live_status(self) -> dict:
        """The figures ``dcmfs status`` shows for a mounted store."""
        files, logical, stored = self.stats()
        r = self.reencoder
        backlog = r.backlog if r else (0, 0)
        return {"files": files, "logical_bytes": logical, "stored_bytes": stored,
                "journal_records": self.index.pending_records,
                "backlog_files": backlog[0], "backlog_bytes": backlog[1],
                "reencoded_files": r.files_done if r else 0,
                "reencoded_bytes": r.bytes_done if r else 0,
                "frames_coded": r.frames_coded if r else 0,
                "cooled_files": r.files_cooled if r else 0,
                "reencode_errors": r.errors if r else 0,
                "integrity_errors": self.opened.integrity_errors,
                "scrub": self.scrubber.status() if self.scrubber else None,
                "s3": self.opened.remote.stats() if self.opened.remote else None,
                "follow": self.opened.follower.status() if self.opened.follower else None,
                "audit": self.opened.audit.status() if self.opened.audit else None,
                "rekey": self.rekey_job.status() if self.rekey_job else None,
                "deid_records": self.deid_filler.status() if self.deid_filler else None,
                "shred": None if self.read_only else shred_state(self.opened).report(
                    self.config.shred_after),
                **process_figures()}

    @_locked
    def recompress(self, retry_failed: bool = False) -> int:
        """Queue every file the re-encoder has work on and start it; returns
        the number of files queued (``dcmfs recompress``; ``retry_failed``:
        also the files whose analysis failed, ``--retry-failed``)."""
        if self.reencoder is None:
            raise ReadOnlyError("The store is mounted read-only; remount it read-write to recompress.")
        n = self.reencoder.enqueue_all(retry_failed)
        self.reencoder.start()
        return n

    def control(self, command: str) -> None:
        """What ``user.dcmfs.control`` on the root accepts: ``recompress``
        (``recompress retry-failed``), ``pause`` and ``resume`` (the
        re-encoder; benchmarks, admins) and ``verify``."""
        if command in ("recompress", "recompress retry-failed"):
            self._import_inbox()  # what write-only mounts wrote: new files too
            self.recompress(retry_failed=command.endswith("retry-failed"))
        elif command.startswith("verify"):
            # "verify" or "verify {json: paths, sample}" (``dcmfs verify``)
            try:
                args = json.loads(command[len("verify"):] or "{}")
            except ValueError as exc:
                raise InvalidArgument("bad verify arguments") from exc
            with self._lock:
                if self.verify_job is not None and self.verify_job.state["running"]:
                    raise InvalidArgument("a verify is already running")
                self.verify_job = VerifyJob(self, args.get("paths"), args.get("sample"))
        elif command.startswith("rekey "):
            self.adopt_epoch(command[len("rekey "):])
        elif command.split(" ")[0] == "rekey-finish":
            # "rekey-finish" or "rekey-finish {json: wait}" (dcmfs key rotate --finish)
            from .rekey import OPEN_WAIT, RekeyJob
            try:
                args = json.loads(command[len("rekey-finish"):] or "{}")
                wait = float(args.get("wait", OPEN_WAIT))
            except (ValueError, TypeError, AttributeError):
                raise InvalidArgument("bad rekey-finish arguments") from None
            if self.read_only:
                raise ReadOnlyError("The store is mounted read-only.")
            with self._lock:
                if self.rekey_job is not None and self.rekey_job.state["running"]:
                    raise InvalidArgument("a rotate --finish is already running")
                self.rekey_job = RekeyJob(self, wait)
        elif command.startswith("key "):
            self.record_key_change(command[len("key "):])
            return
        elif command == "shred":  # 'dcmfs shred' on a mounted store (it records the pass)
            if self.read_only:
                raise ReadOnlyError("The store is mounted read-only.")
            self.shred_now(wait=False)
            return
        elif command in ("pause", "resume") and self.reencoder is not None:
            getattr(self.reencoder, command)()
        else:
            raise InvalidArgument(f"unknown control command {command!r}")
        if command.startswith("rekey "):  # 'dcmfs key rotate' records it: never the key
            return
        self._audit("admin", None, None, command=command.split("{")[0].strip(), mounted=True)

    def record_key_change(self, arg: str) -> None:
        """``key {JSON}`` (``dcmfs key add|remove|change|rotate`` on a mounted
        store): a ``key`` record in the audit trail, by the caller, once the
        store's authentic header shows the change described (slot ids,
        kinds, labels, epochs; what is not a known field of that kind is
        refused: never a secret)."""
        from ..storage.keyring import changed_as_reported
        try:
            fields = json.loads(arg)
        except ValueError:
            raise InvalidArgument("bad key record") from None
        if not isinstance(fields, dict) or any(
                k not in KEY_FIELDS or not isinstance(v, KEY_FIELDS[k])
                or isinstance(v, bool) or isinstance(v, str) and len(v) > 200
                for k, v in fields.items()):
            raise InvalidArgument("bad key record")
        if isinstance(fields.get("destroyed"), list) and not all(
                isinstance(e, int) and not isinstance(e, bool) for e in fields["destroyed"]):
            raise InvalidArgument("bad key record")
        store = self.opened.store
        if not changed_as_reported(store.root, store.master_key, fields):
            raise InvalidArgument("the store's header does not show this key change")
        self._audit("key", None, None, **fields, mounted=True)

    def adopt_epoch(self, arg: str) -> None:
        """``rekey EPOCH KEYHEX`` (``dcmfs key rotate`` on a mounted store):
        seal every new chunk under the new key epoch from now on, once the
        key is proven to be the newest epoch's of this store's authentic
        header.  The key is never logged, nor echoed in an error."""
        from ..storage.keyring import epoch_key_authentic
        try:
            epoch_text, key_hex = arg.split(" ")
            epoch, key = int(epoch_text), bytes.fromhex(key_hex)
        except ValueError:
            raise InvalidArgument("bad rekey arguments") from None
        store = self.opened.store
        if not epoch_key_authentic(store.root, store.master_key, epoch, key):
            raise InvalidArgument("not the newest key epoch of this store")
        self.objects.add_epoch(epoch, key)
        logging.getLogger("dcmfs.audit").info(
            "key epochs: new chunks are sealed under epoch %d from now on", epoch)

    @_locked
    def content_stats(self) -> dict:
        """Files, logical and stored bytes by modality and transfer syntax, with
        the codec path taken and fallback reasons (``dcmfs stats``)."""
        backlog = self.reencoder.backlog if self.reencoder else (0, 0)
        return content_stats(self.index, backlog[0])

    def stats(self) -> tuple[int, int, int]:
        """(files, logical bytes, stored bytes)."""
        with self.index.begin() as txn:
            return txn.stats()


def process_figures() -> dict:
    """What the daemon's own process says of itself: its pid (``dcmfs
    umount`` checks that the process holding the store lock is the one
    answering the mount), whether it can dump core (it holds the master key:
    ``dumpable`` and ``core_limit`` are both expected to be off), and its
    disk traffic, which ``dcmfs status`` cannot read from /proc of a
    non-dumpable process of another user."""
    libc = ctypes.CDLL(None, use_errno=True)
    out = {"pid": os.getpid(), "dumpable": bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)),
           "core_limit": resource.getrlimit(resource.RLIMIT_CORE)[1]}
    try:
        with open("/proc/self/io", "rb") as f:
            io = dict(line.split(b": ") for line in f.read().splitlines())
        out.update(store_read_bytes=int(io[b"read_bytes"]),
                   store_written_bytes=int(io[b"write_bytes"]))
    except (OSError, KeyError, ValueError):
        pass
    return out


def content_stats(index: Index, backlog_files: int = 0) -> dict:
    """Files, logical and stored bytes by modality and transfer syntax, with
    the codec path taken and fallback reasons, from the index alone (a
    mounted store and ``dcmfs stats`` of an unmounted one)."""
    groups: dict[tuple[str, str], dict] = {}
    with index.begin() as txn:
        for ino, inode in txn.iter_inodes():
            if not stat.S_ISREG(inode.mode):
                continue
            info = txn.get_content(ino)
            if info is None or info.get("generation") != inode.generation:
                info = {"kind": "unknown", "reason": "not analysed yet"}
            kind = info.get("kind")
            if kind == "dicom":
                key = (info.get("modality", "-"), info.get("ts", "-"))
            elif kind == "failed":  # analysis limit, analysis crashed, unreadable
                key = ("analysis failed", "-")
            else:
                key = ("non-DICOM" if kind == "other" else "not analysed", "-")
            g = groups.setdefault(key, {"modality": key[0], "transfer_syntax": key[1],
                                        "files": 0, "logical_bytes": 0, "stored_bytes": 0,
                                        "codecs": {}, "paths": {}, "fallbacks": {},
                                        "tiers": {}})
            g["files"] += 1
            g["logical_bytes"] += inode.size
            stored = 0
            for ref in txn.chunks(ino).values():
                stored += stored_bytes(ref)
                name = codecs.IDS.get(ref.codec, str(ref.codec))
                g["codecs"][name] = g["codecs"].get(name, 0) + ref.plain_len
            g["stored_bytes"] += stored
            tier = info.get("tier")
            if tier:  # hot (fast-decoding) or cold (dense): [files, logical, stored]
                t = g["tiers"].setdefault(tier, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + 1, t[1] + inode.size, t[2] + stored
            path = info.get("path")
            if path:
                g["paths"][path] = g["paths"].get(path, 0) + 1
            reason = info.get("reason")
            if reason and kind in ("dicom", "failed"):
                g["fallbacks"][reason] = g["fallbacks"].get(reason, 0) + 1
    from .deidrecords import withheld
    return {"groups": sorted(groups.values(), key=lambda g: -g["logical_bytes"]),
            "backlog_files": backlog_files,
            # what the de-identified view leaves out, by inode (no names)
            "deid_withheld": withheld(index)}
