"""``dcmfs recompress`` and ``dcmfs stats``: admin commands that work on a
mounted store (through the daemon's virtual attributes on the mount root:
the daemon holds the key and the store lock) or an unmounted one (opened
here, with the key).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
import time
from typing import Callable, TextIO

from .. import format as fmt
from ..audit.segments import list_segments
from ..config import Config
from ..errors import DcmfsError, StoreIOError
from ..core.control import content_stats as index_stats
from ..core.filesystem import FileSystem
from ..integrity.fsck import Fsck
from ..integrity.rebuild import rebuild_index
from ..integrity.verify import verify_store
from ..opened.store import OpenedStore
from ..storage.header import Secret, open_store, read_header, set_damage_mark
from .audit import record_admin
from .mount import dcmfs_mounts
from .units import size_text as _size

log = logging.getLogger("dcmfs")


def mountpoint_of(store_root: str) -> str | None:
    root = os.path.abspath(store_root)
    return next((m.mountpoint for m in dcmfs_mounts() if m.store == root), None)


def _xattr(mp: str, name: str, value: bytes | None = None) -> bytes | None:
    try:
        if value is None:
            return os.getxattr(mp, name)
        os.setxattr(mp, name, value)
        return None
    except OSError as exc:
        raise StoreIOError(f"The dcmfs daemon at {mp} did not answer ({exc.strerror}); "
                           "check 'dcmfs status'.") from exc


class Progress:
    """A one-line progress bar with rate and ETA on a terminal, a final
    summary line otherwise."""

    def __init__(self, total_files: int, out: TextIO = sys.stderr,
                 label: str = "recompress") -> None:
        self.total = total_files
        self.label = label
        self.out = out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, left: int, nbytes: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (not self.tty or now - self._last < 0.2):
            return
        self._last = now
        done = max(0, self.total - left)
        elapsed = max(now - self.start, 1e-6)
        rate = nbytes / elapsed / 1e6
        eta = (elapsed / done * left) if done else 0
        width = 30
        filled = width * done // self.total if self.total else width
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} files, "
                f"{rate:.1f} MB/s, ETA {eta:.0f} s")
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        elif final:
            self.out.write(line + "\n")
        self.out.flush()


def recompress(store_root: str, secret: Callable[[], Secret], config: Config,
               out: TextIO = sys.stderr, retry_failed: bool = False) -> dict:
    """Run the re-encoder over every file that needs it, to completion
    (``retry_failed``: also the files whose analysis failed before)."""
    mp = mountpoint_of(store_root)
    if mp is not None:
        before = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        _xattr(mp, fmt.CONTROL_XATTR,
               b"recompress retry-failed" if retry_failed else b"recompress")
        status = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        bar = Progress(status["backlog_files"], out)
        while status["backlog_files"]:
            bar.update(status["backlog_files"],
                       status["reencoded_bytes"] - before.get("reencoded_bytes", 0))
            time.sleep(0.2)
            status = json.loads(_xattr(mp, fmt.STATUS_XATTR))
        bar.update(0, status["reencoded_bytes"] - before.get("reencoded_bytes", 0), final=True)
        return status
    fs = FileSystem(OpenedStore.open(store_root, secret(), config, for_writing=True))
    try:
        record_admin(fs.opened, "recompress", retry_failed=retry_failed)
        fs.recompress(retry_failed=retry_failed)
        reenc = fs.reencoder
        bar = Progress(reenc.backlog[0], out)
        while not reenc.wait_idle(timeout=0.2):
            bar.update(reenc.backlog[0], reenc.bytes_done)
        bar.update(0, reenc.bytes_done, final=True)
        return fs.live_status()
    finally:
        fs.close()


def _store_path(path: str, mountpoint: str | None) -> str:
    """A path given on the command line as a path inside the store: under the
    mountpoint, or already relative to the store's root."""
    if mountpoint and os.path.isabs(path):
        full = os.path.abspath(path)
        if full == mountpoint or full.startswith(mountpoint.rstrip("/") + "/"):
            return "/" + os.path.relpath(full, mountpoint).lstrip(".")
    return "/" + path.lstrip("/")


def verify(store_root: str, secret: Callable[[], Secret], config: Config,
           paths: list[str] | None = None, sample: float | None = None,
           out: TextIO = sys.stderr) -> dict:
    """Verify a store (every file, the given paths, or a random sample);
    returns the report (see :meth:`dcmfs.integrity.verify.Report.as_dict`)."""
    mp = mountpoint_of(store_root)
    wanted = [_store_path(p, mp) for p in paths] if paths else None
    if mp is not None:
        args = json.dumps({"paths": wanted, "sample": sample}, separators=(",", ":"))
        try:
            os.setxattr(mp, fmt.CONTROL_XATTR, ("verify" + args).encode())
        except OSError as exc:
            if exc.errno != errno.EROFS or len(args) > 200:
                raise StoreIOError(f"The dcmfs daemon at {mp} did not start a verify "
                                   f"({exc.strerror}); check 'dcmfs status'.") from exc
            _xattr(mp, f"{fmt.VERIFY_XATTR}:{args}")  # a read-only mount
        bar = None
        while True:
            state = json.loads(_xattr(mp, fmt.VERIFY_XATTR))
            if bar is None and state.get("total"):
                bar = Progress(state["total"], out, "verify")
            if not state.get("running", False):
                break
            if bar is not None:
                bar.update(state["total"] - state["done"], state["bytes"])
            time.sleep(0.2)
        if bar is not None:
            bar.update(0, state["bytes"], final=True)
        result = state.get("result") or {}
        if "error" in result:
            raise StoreIOError(f"The daemon could not verify the store: {result['error']}.")
        return result
    store = open_store(store_root, secret())
    with OpenedStore(store, dataclasses.replace(config, read_only=True)) as opened:
        record_admin(opened, "verify", sample=sample, paths=wanted)
        bars: list[Progress] = []
        report, missing = verify_store(
            opened, wanted, sample,
            on_start=lambda total: bars.append(Progress(total, out, "verify")),
            progress=lambda done, nbytes, _: bars[0].update(bars[0].total - done, nbytes))
        bars[0].update(0, report.bytes, final=True)
    if any(f.ino for f in report.findings):
        _mark_damaged(store, config, "verify found damage", len(report.damaged_files))
    return dict(report.as_dict(), missing_paths=missing)


def _mark_damaged(store, config: Config, reason: str, errors: int) -> None:
    """The damage mark of an offline verify: the file, and the index's copy
    when the store can be opened for writing here (best effort: a store on
    read-only media keeps the file alone)."""
    try:
        opened = OpenedStore(store, dataclasses.replace(config, read_only=False), index=False)
    except DcmfsError as exc:
        set_damage_mark(store, reason, errors)
        log.warning("the damage mark is in %s only: the store cannot be opened for writing "
                    "(%s)", fmt.DAMAGE_MARK, exc)
        return
    with opened:
        opened.record_damage(reason, errors)


def render_verify(report: dict) -> str:
    """The admin's view of a verify report: one line per damaged file (its
    path, decrypted here, on the admin's terminal only) and what is wrong."""
    lines = []
    by_ino: dict[int, list[dict]] = {}
    for f in report.get("findings", []):
        by_ino.setdefault(f["ino"], []).append(f)
    for ino, findings in sorted(by_ino.items()):
        if ino == 0:
            for f in findings:
                lines.append(f"store: {f['kind']}: object {f['oid']}")
            continue
        names = ", ".join(findings[0]["paths"]) or f"(no name) inode {ino}"
        lines.append(f"DAMAGED {names}")
        for f in findings:
            lines.append(f"    {f['kind']}: {f['detail']}"
                         + (f" [object {f['oid']}]" if f.get("oid") else ""))
    for path in report.get("missing_paths", []):
        lines.append(f"not found: {path}")
    mb = report.get("bytes", 0) / 1e6
    secs = report.get("seconds", 0)
    rate = f", {mb / secs:.0f} MB/s" if secs > 0 else ""
    verdict = ("intact" if not report.get("findings") else
               f"{report.get('damaged_files', 0)} damaged files, "
               f"{len(report['findings'])} findings")
    skipped = report.get("skipped_busy", 0)
    lines.append(f"verified {report.get('files', 0)} files, {mb:.1f} MB in {secs:.1f} s{rate}"
                 + (f" ({skipped} open for writing, skipped)" if skipped else "")
                 + f": {verdict}")
    return "\n".join(lines)


def fsck(store_root: str, secret: Callable[[], Secret], config: Config, repair: bool,
         rebuild: bool, out: TextIO = sys.stderr, known_seq: int = 0,
         published: list[str] | None = None) -> dict:
    """Check (and repair, or rebuild the index of) an unmounted store.  With
    ``repair`` a second, read-only check follows; its problems are in
    ``remaining`` (empty: the store is clean).  ``known_seq``,
    ``published``: for the rebuild (:func:`rebuild_index`)."""
    if mountpoint_of(store_root) is not None:
        from ..errors import StoreLockedError
        raise StoreLockedError(f"The store {store_root} is mounted; unmount it first "
                               "('dcmfs umount MOUNTPOINT'), then run fsck.")
    # a repair writes records of this version: the header says so first
    store = open_store(store_root, secret(), for_writing=repair or rebuild)
    tty = out.isatty()

    def stage(name: str) -> None:
        if tty:
            out.write(f"\rfsck: checking {name}…".ljust(40))
            out.flush()

    result: dict = {"store": store_root, "rebuilt": None}
    # the index is opened by each pass (fsck reports one that does not open)
    with OpenedStore(store, config, index=False) as opened:
        # a machine with no trail of its own yet (attach) starts it after the
        # rebuild, continuing the chain whose head the adopted index holds
        adopted = rebuild and not list_segments(store_root)
        if not adopted:
            record_admin(opened, "fsck", repair=repair, rebuild_index=rebuild)
        if rebuild:
            result["rebuilt"] = rebuild_index(opened, known_seq, published)
            repair = True
        if adopted:
            record_admin(opened, "fsck", from_index=True, repair=repair, rebuild_index=True)
        passes = [repair, False] if repair else [False]
        complete = not (result["rebuilt"] or {}).get("records_after_gap")
        for i, mode in enumerate(passes):
            f = Fsck(opened, repair=mode, progress=stage, index_complete=complete)
            try:
                problems = [p.as_dict() for p in f.run()]
            finally:
                f.close()
            result["problems" if i == 0 else "remaining"] = problems
            if i == 0:
                # files the repair rebuilt incomplete or could not rebuild
                # (their inline objects were lost with the index)
                result["unrecovered"] = sorted(set(f.unrecovered))
        final = result.get("remaining", result["problems"])
        rebuilt = result["rebuilt"] or {}
        lost = rebuilt.get("records_after_gap", 0)
        missing = rebuilt.get("records_missing", 0)
        if rebuilt:
            # nothing held the index's inline objects: files made only of
            # them are gone without a trace (nothing names them any more)
            # (or those of files written in journal records known to have
            # existed that the rebuild did not find)
            rebuilt["inline_lost"] = (fmt.INLINE_FEATURE in store.features
                                      and (rebuilt["snapshot"] is None
                                           and not rebuilt["journal_records"]
                                           or rebuilt.get("records_missing", 0) > 0))
        # a rebuild that may have lost small files it cannot name is not clean
        gone = rebuilt.get("inline_lost", False)
        result["clean"] = not (final or lost or result["unrecovered"] or gone or missing)
        try:
            if result["clean"]:
                opened.clear_damage()  # the index's record, then the file
            else:
                opened.record_damage("fsck found problems" if final else
                                     "index rebuilt with journal records missing" if lost
                                     else "index rebuilt: files came back incomplete"
                                     if result["unrecovered"] else
                                     "index rebuilt from objects alone: small files may "
                                     "be lost" if rebuilt.get("snapshot") is None else
                                     "index rebuilt without its newest journal records")
        finally:
            opened.close_index()
    if tty:
        out.write("\r".ljust(41) + "\r")
    return result


def render_fsck(result: dict) -> str:
    lines = []
    if result.get("rebuilt"):
        r = result["rebuilt"]
        for skipped in r.get("skipped_snapshots", []):
            lines.append(f"snapshot {skipped['snapshot']} skipped ({skipped['why']})")
        lines.append(f"index rebuilt: old index moved to {r['moved_aside'] or '-'}, "
                     + (f"snapshot {r['snapshot']}" if r["snapshot"] else
                        "no snapshot could be used")
                     + f", {r['journal_records']} journal records rolled forward"
                     + (f", {r['records_after_gap']} after a gap not applied"
                        if r["records_after_gap"] else "")
                     + (f", {r['records_missing']} newer records missing (written after "
                        "the newest snapshot and journal segment, lost with the index)"
                        if r.get("records_missing") else "")
                     + "; what the index lacks comes from the objects")
        if r.get("inline_lost"):
            lines.append("no snapshot and no journal held some of the index's inline objects "
                         f"(chunks of at most {fmt.INLINE_MAX} bytes as stored, kept in the "
                         "index): files made only of them (small files) are lost and nothing "
                         "names them any more; a larger file whose last chunk was one comes back "
                         "incomplete as /lost+found/INO.incomplete (a backup of the store "
                         "may still hold them). The store stays marked as damaged until "
                         f"'dcmfs fsck {result['store']}' is run again.")
    for p in result["problems"]:
        where = ", ".join(p["paths"]) or (f"inode {p['ino']}" if p["ino"] else "store")
        lines.append(f"[{p['check']}] {where}: {p['what']}"
                     + (f" [object {p['oid']}]" if p.get("oid") else "")
                     + (f" -> {p['repaired']}" if p.get("repaired") else ""))
    n = len(result["problems"])
    if "remaining" in result:
        left = len(result["remaining"])
        lines.append(f"fsck: {n} problems found and repaired; a full check afterwards: "
                     + ("clean." if not left else f"{left} problems remain."))
        for p in result["remaining"]:
            lines.append(f"  remaining [{p['check']}] {p['what']}")
        if result.get("unrecovered"):
            lines.append(f"fsck: {len(result['unrecovered'])} file(s) came back incomplete "
                         "or not at all (inodes " + ", ".join(map(str, result["unrecovered"]))
                         + "; see above); the store stays marked as damaged until "
                         f"'dcmfs fsck {result['store']}' is run again after you have dealt "
                         "with them.")
    else:
        lines.append("fsck: clean." if not n else
                     f"fsck: {n} problems; run 'dcmfs fsck --repair {result['store']}' to "
                     "repair them.")
    return "\n".join(lines)


def content_stats(store_root: str, secret: Callable[[], Secret], config: Config) -> dict:
    mp = mountpoint_of(store_root)
    if mp is not None:
        return json.loads(_xattr(mp, fmt.STATS_XATTR))
    with OpenedStore.open(store_root, secret(),
                          dataclasses.replace(config, read_only=True)) as opened:
        return index_stats(opened.index)


def _ts_name(uid: str) -> str:
    try:
        from pydicom.uid import UID
        name = UID(uid).name
        name = name if name and name != uid else uid
        return name if len(name) <= 40 else name[:39] + "…"
    except Exception:  # noqa: BLE001 — a name is a nicety
        return uid


def render_stats(stats: dict) -> str:
    rows = [("modality", "transfer syntax", "files", "logical", "stored", "ratio",
             "codecs (logical bytes)", "fallbacks")]
    tot_l = tot_s = tot_f = 0
    for g in stats["groups"]:
        ratio = g["stored_bytes"] / g["logical_bytes"] if g["logical_bytes"] else 0
        codecs = ", ".join(f"{k} {_size(v)}" for k, v in sorted(g["codecs"].items()))
        falls = ", ".join(f"{k} ({v})" for k, v in sorted(g["fallbacks"].items()))
        ts = g["transfer_syntax"]
        rows.append((g["modality"], _ts_name(ts) if ts != "-" else "-", str(g["files"]),
                     _size(g["logical_bytes"]), _size(g["stored_bytes"]), f"{ratio:.3f}",
                     codecs, falls or "-"))
        tot_f += g["files"]
        tot_l += g["logical_bytes"]
        tot_s += g["stored_bytes"]
    rows.append(("all", "", str(tot_f), _size(tot_l), _size(tot_s),
                 f"{tot_s / tot_l:.3f}" if tot_l else "-", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if stats.get("backlog_files"):
        lines.append(f"{stats['backlog_files']} files wait for the re-encoder "
                     "('dcmfs recompress STORE' finishes them now).")
    withheld = stats.get("deid_withheld") or {}
    if withheld:
        lines.append(f"The de-identified view withholds {sum(map(len, withheld.values()))} "
                     "DICOM files (by inode):")
        lines += [f"  {reason}: {', '.join(map(str, inos))}"
                  for reason, inos in sorted(withheld.items())]
    return "\n".join(lines)


def finish_rotation(store_root: str, secret: Callable[[], Secret], config: Config,
                    out: TextIO = sys.stderr, report: dict | None = None,
                    wait: float | None = None) -> dict:
    """``dcmfs key rotate --finish``: seal every chunk under an older key
    epoch again under the newest (progress bar; by the daemon when the store
    is mounted), make that durable, then destroy the keys of the epochs no
    chunk uses any more.  Once no chunk needs an older epoch, the index side
    (index, journal, snapshots, audit trail) is sealed again under the newest
    epoch too (:mod:`dcmfs.opened.regen`; by the daemon when mounted) and the
    header makes it the master, destroying epoch 0, the store key, with the
    others (``key-generations-v1``); otherwise the master is only marked
    retired.
    ``report``: what the audit trail's ``key`` record says
    (:mod:`dcmfs.app.keyaudit`); ``wait``: how long a mounted store's open
    files are waited for (default :data:`dcmfs.core.rekey.OPEN_WAIT`);
    ``result["open_left"]``: the files left under an older epoch because
    they stayed open."""
    from ..core.rekey import OPEN_WAIT, epochs_in_use, rekey_all
    from ..opened.regen import move_generation
    from ..storage.keyring import move_master, retire
    wait = OPEN_WAIT if wait is None else wait
    mp = mountpoint_of(store_root)
    moved = None
    if mp is not None:
        store = open_store(store_root, secret())  # the keys, to authenticate the header
        result = _finish_mounted(mp, out, wait)
        master, live, current = store.master_key, set(store.epoch_keys), result["epoch"]
        keys = dict(store.epoch_keys)
        moved = result.get("generation")
    else:
        fs = FileSystem(OpenedStore.open(store_root, secret(), config, for_writing=True))
        try:
            before = epochs_in_use(fs)
            with fs.lock, fs.index.begin() as txn:
                files = len({ino for ino, _, _ in txn.iter_all_chunks()})
            bar = Progress(files, out, "rotate --finish")
            chunks, nbytes, left = rekey_all(fs, bar.update, wait)
            bar.update(0, nbytes, final=True)
            result = {"epoch": fs.objects.epoch, "chunks": chunks, "bytes": nbytes,
                      "open_left": left,
                      "before": {str(k): v for k, v in sorted(before.items())},
                      "after": {str(k): v for k, v in sorted(epochs_in_use(fs).items())}}
            store = fs.opened.store
            master, live, current = store.master_key, set(fs.objects.epoch_keys), fs.objects.epoch
            keys = dict(fs.objects.epoch_keys)
            if set(result["after"]) <= {str(current)} and (
                    len(live) > 1 or fs.index.generation != current):
                moved = move_generation(fs.opened, current, fs.checkpoint)
                result["destroyed"] = move_master(store_root, master, keys, current,
                                                  live - {current})
                if fs.opened.remote is not None:  # attach and followers read the bucket's
                    with open(os.path.join(store_root, fmt.HEADER_NAME), "rb") as f:
                        fs.opened.remote.put(fmt.HEADER_NAME, f.read())
        finally:
            fs.close()  # a checkpoint: the swaps are durable before any key goes
    unused = {e for e in live if str(e) not in result["after"] and e != current}
    if moved is not None:
        result["generation"] = moved
        if "destroyed" not in result:
            result["destroyed"] = move_master(store_root, master, keys, current, unused)
    else:
        result["destroyed"] = retire(store_root, master, unused) if unused else []
    if report is not None:
        report.update(action="rotate-finish", epoch=current, chunks=result["chunks"],
                      destroyed=result["destroyed"], master=master,
                      store_id=bytes.fromhex(read_header(store_root)["store_id"]))
        if moved is not None:  # the trail is under the new master now
            report.update(master=keys[current], keys={current: keys[current]},
                          master_epoch=current)
    return result


def _finish_mounted(mp: str, out: TextIO, wait: float) -> dict:
    """The daemon's rekey job, started and followed to its end."""
    _xattr(mp, fmt.CONTROL_XATTR, b"rekey-finish " + json.dumps({"wait": wait}).encode())
    bar = None
    while True:
        state = json.loads(_xattr(mp, fmt.STATUS_XATTR)).get("rekey") or {}
        if bar is None and state.get("files_left"):
            bar = Progress(state["files_left"], out, "rotate --finish")
        if not state.get("running", False):
            break
        if bar is not None:
            bar.update(state["files_left"], state["bytes"])
        time.sleep(0.2)
    if bar is not None:
        bar.update(0, state.get("bytes", 0), final=True)
    if "error" in state or "after" not in state:
        raise StoreIOError(f"The dcmfs daemon at {mp} did not finish the rotation "
                           f"({state.get('error', 'no answer')}); run the command again.")
    return state
