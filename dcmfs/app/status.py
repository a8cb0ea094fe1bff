"""``dcmfs status``: what is mounted, how the daemon does, how much is saved.

Needs no key: the figures come from the running daemon (the virtual
``user.dcmfs.status`` attribute of the mount's root), else from the plain
``stats`` entry of the index, and from psutil.  A daemon has
:data:`ANSWER_TIMEOUT` seconds to answer (every mount is asked at once, each
in a thread of its own): one that is busy or hung is shown as not answering
and never stalls the report on the others.
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil

from .. import format as fmt
from ..audit.segments import plain_head
from ..errors import DcmfsError
from ..index import read_meta, read_stats
from ..index.shred import META_KEY, ShredState
from ..adapter.metrics import OPS_XATTR
from .mount import dcmfs_mounts, find_mount
from .units import size_text
from ..storage.header import damage_mark, read_header, read_lock_pid


#: seconds a mounted daemon has to answer (its status and counter attributes)
ANSWER_TIMEOUT = 3.0


def store_report(store_root: str, mountpoint: str | None,
                 answer: tuple[dict | None, dict | None] | None = None) -> dict:
    """The report of one store; ``answer`` is what its daemon said (see
    :func:`ask_daemons`; asked here when not given)."""
    store_root = os.path.abspath(store_root)
    read_header(store_root)  # a clear error for a missing or foreign store
    if mountpoint and answer is None:
        answer = ask_daemons([mountpoint])[mountpoint]
    live, ops = answer if answer is not None else (None, None)
    # the daemon's own word first: the lock file's text can be altered
    pid = live["pid"] if live and live.get("pid") else read_lock_pid(store_root)
    if live is not None:
        files, logical, stored = live["files"], live["logical_bytes"], live["stored_bytes"]
    else:
        files, logical, stored = read_stats(os.path.join(store_root, fmt.INDEX_DIR)) or (0, 0, 0)
    report = {
        "store": store_root,
        "mounted": mountpoint is not None,
        "mountpoint": mountpoint,
        "pid": pid,
        "files": files,
        "logical_bytes": logical,
        "stored_bytes": stored,
        "ratio": round(stored / logical, 4) if logical else None,
        # None: not mounted; False: figures from the index, the daemon was silent
        "answering": None if mountpoint is None else answer is not None,
    }
    if mountpoint is not None and answer is None:
        report["error"] = (f"the daemon did not answer within {ANSWER_TIMEOUT:g} s (busy or "
                           "hung); figures from the index, up to one checkpoint old")
    # the mark file, or (when no daemon has the index open) the index's sealed
    # copy of it, which is there even if someone deleted the file
    report["needs_fsck"] = damage_mark(store_root) is not None or (
        live is None and _damage_recorded(store_root))
    if live is not None:
        report.update(backlog_files=live.get("backlog_files", 0),
                      backlog_bytes=live.get("backlog_bytes", 0),
                      journal_records=live.get("journal_records", 0),
                      integrity_errors=live.get("integrity_errors", 0),
                      scrub=live.get("scrub"), s3=live.get("s3"),
                      deid_records=live.get("deid_records"), deid_view=live.get("deid_view"),
                      follow=live.get("follow"), write_only=live.get("write_only"))
        if "dumpable" in live:  # it holds the key: expected False
            report["core_dumps"] = bool(live["dumpable"] or live.get("core_limit"))
        for k in ("store_read_bytes", "store_written_bytes"):  # /proc/PID/io may be closed
            if k in live:
                report[k] = live[k]
    # the audit trail: the daemon's word, or (unmounted) the segments'
    # plain frame headers (no key: size and head, not authenticated)
    # crypto-shredding: deletions whose secrets are still in the index's
    # history (the daemon's word, or the index's plain record)
    report["shred"] = live.get("shred") if live is not None else _plain_shred(store_root)
    audit = live.get("audit") if live is not None else None
    report["audit"] = audit if audit is not None else plain_head(store_root)
    if ops is not None:
        # through the mount since the daemon started: plaintext bytes, operations
        report.update(read_bytes=ops.get("read_bytes", 0), written_bytes=ops.get("written_bytes", 0),
                      ops=ops.get("ops", {}), errors=ops.get("errors", {}))
    if pid is not None:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                cpu = proc.cpu_times()
                report.update(uptime_seconds=round(time.time() - proc.create_time(), 1),
                              rss_bytes=proc.memory_info().rss,
                              cpu_seconds=round(cpu.user + cpu.system, 2))
                if "store_read_bytes" not in report:  # the daemon did not say it
                    try:  # the daemon's own disk traffic (the store side)
                        io = proc.io_counters()
                        report.update(store_read_bytes=io.read_bytes,
                                      store_written_bytes=io.write_bytes)
                    except (psutil.Error, AttributeError):
                        pass
            report["cpu_percent"] = proc.cpu_percent(interval=0.1)
        except psutil.Error:
            pass
    return report


def _plain_shred(store_root: str) -> dict | None:
    try:
        found = read_meta(os.path.join(store_root, fmt.INDEX_DIR), (META_KEY,), "reading status")
    except DcmfsError:
        return None
    return ShredState.decode(found and found[META_KEY]).report() if found else None


def _shred_line(shred: dict) -> str | None:
    """The status line of crypto-shredding (counts and times only)."""
    last = f"last pass {_ago(shred['last_pass'])}" if shred.get("last_pass") else "no pass yet"
    if not shred.get("pending"):
        return f"shred       nothing pending; {last}" if shred.get("last_pass") else None
    due = (f"shredded by {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(shred['deadline']))}"
           " at the latest" if shred.get("deadline") else "shredded at the next pass")
    return (f"shred       {shred['pending']} deleted files still readable with the key and "
            f"the index's history (first deleted {_ago(shred['first_deleted'])}); {due}, "
            f"at unmount or by 'dcmfs shred'; {last}")


def _damage_recorded(store_root: str) -> bool:
    try:
        found = read_meta(os.path.join(store_root, fmt.INDEX_DIR), ("damage",), "reading status")
    except DcmfsError:
        return False
    return bool(found and found["damage"] is not None)


def ask_daemons(mountpoints: list[str], timeout: float = ANSWER_TIMEOUT
                ) -> dict[str, tuple[dict | None, dict | None] | None]:
    """For each mountpoint, what its daemon says (its live figures and its
    operation counters; either None from a daemon too old to have them), or
    None if it did not answer within ``timeout``.  All are asked at once;
    a thread left waiting on a hung mount is a daemon thread, so it never
    holds up the exit (the kernel drops its request then)."""
    answers: dict[str, tuple[dict | None, dict | None]] = {}

    def ask(mp: str) -> None:
        answers[mp] = (_xattr_json(mp, fmt.STATUS_XATTR), _xattr_json(mp, OPS_XATTR))

    threads = [threading.Thread(target=ask, args=(mp,), daemon=True, name="dcmfs-status")
               for mp in mountpoints]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {mp: answers.get(mp) for mp in mountpoints}


def _xattr_json(mountpoint: str, name: str) -> dict | None:
    try:
        return json.loads(os.getxattr(mountpoint, name))
    except (OSError, ValueError):
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def collect(target: str | None) -> list[dict]:
    if target is None:
        out = []
        mounts = dcmfs_mounts()
        answers = ask_daemons([m.mountpoint for m in mounts])
        for m in mounts:
            try:
                out.append(store_report(m.store, m.mountpoint, answers[m.mountpoint]))
            except DcmfsError as exc:  # one broken mount must not hide the others
                out.append({"store": m.store, "mounted": True, "mountpoint": m.mountpoint,
                            "error": str(exc)})
        return out
    info = find_mount(target)
    if info is not None:
        return [store_report(info.store, info.mountpoint)]
    mounted_at = next((m.mountpoint for m in dcmfs_mounts()
                       if m.store == os.path.abspath(target)), None)
    return [store_report(target, mounted_at)]


def _ago(when: float) -> str:
    import time
    secs = max(0, time.time() - when)
    return f"{secs:.0f} s ago" if secs < 120 else f"{secs / 3600:.1f} h ago"


def render(reports: list[dict]) -> str:
    if not reports:
        return "No dcmfs mounts."
    lines = []
    for r in reports:
        lines.append(f"store       {r['store']}")
        lines.append(f"mounted     {'at ' + r['mountpoint'] if r['mounted'] else 'no'}")
        if "error" in r:
            lines.append(f"error       {r['error']}")
            if "files" not in r:  # nothing else is known of it
                lines.append("")
                continue
        if r.get("pid"):
            lines.append(f"daemon      pid {r['pid']}, up {_duration(r.get('uptime_seconds'))}, "
                         f"RSS {size_text(r.get('rss_bytes'))}, "
                         f"CPU {r.get('cpu_seconds', '-')} s ({r.get('cpu_percent', '-')} %)")
        if "ops" in r:
            n_ops = sum(r["ops"].values())
            top = ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items(),
                                                         key=lambda kv: -kv[1])[:4])
            # ENOENT from getattr and ENODATA from getxattr are ordinary answers
            errs = ", ".join(f"{k.replace(':', ' ')} {v}" for k, v in sorted(
                r["errors"].items(), key=lambda kv: -kv[1])[:3]) or "none"
            lines.append(f"io          read {size_text(r['read_bytes'])}, wrote "
                         f"{size_text(r['written_bytes'])} through the mount since start")
            lines.append(f"operations  {n_ops} ({top}); errors: {errs}")
        if "store_read_bytes" in r:
            lines.append(f"store disk  read {size_text(r['store_read_bytes'])}, "
                         f"wrote {size_text(r['store_written_bytes'])}")
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        lines.append(f"files       {r['files']}")
        lines.append(f"logical     {size_text(r['logical_bytes'])}")
        lines.append(f"stored      {size_text(r['stored_bytes'])} (ratio {ratio})")
        if "backlog_files" in r:
            lines.append(f"backlog     {r['backlog_files']} files, {size_text(r['backlog_bytes'])} "
                         "waiting for compression")
        s3 = r.get("s3")
        if s3:
            lines.append(f"s3 upload   {s3['backlog_objects']} objects, "
                         f"{size_text(s3['backlog_bytes'])} waiting; cache "
                         f"{size_text(s3['cache_bytes'])} of {size_text(s3['cache_size'])}")
            lines.append(f"s3 requests {s3['requests']}, retries {s3.get('retries', 0)}, errors "
                         f"{s3.get('errors', 0)}; uploaded "
                         f"{s3.get('uploaded_objects', s3.get('uploads', 0))} objects in "
                         f"{s3.get('uploads', 0)} PUTs "
                         f"({size_text(s3.get('uploaded_bytes', 0))}), downloaded "
                         f"{s3.get('downloads', 0)} in {s3.get('gets', 0)} GETs; "
                         f"writers waited {s3.get('writer_waits', 0)}x")
        wonly = r.get("write_only")
        if wonly:
            lines.append(f"write-only  session {wonly['session'][:8]} ({wonly['recipient']}): "
                         f"{wonly.get('open_files', 0)} open, "
                         f"handed over {wonly.get('handed_over', 0)}")
        follow = r.get("follow")
        if follow:
            lines.append(f"follower    at change {follow['seq']}; {follow['applied']} records "
                         f"applied in {follow['rounds']} rounds, one every "
                         f"{follow['interval']:g} s"
                         + (f"; last error: {follow['last_error']}" if follow["last_error"]
                            else ""))
        scrub = r.get("scrub")
        if scrub:
            last = scrub.get("last_round_end")
            lines.append(f"scrub       round {scrub['rounds'] + 1}: {scrub['round_done']}/"
                         f"{scrub['round_files']} files; {scrub['verified_files']} verified "
                         f"intact, {scrub['findings']} findings"
                         + (f"; last full round ended {_ago(last)}" if last else ""))
        view, records = r.get("deid_view"), r.get("deid_records")
        if view is not None:
            lines.append(f"deid view   {view['files']} files shown, {view['withheld']} withheld")
        if records and (view is not None or not records["first_pass_done"]):
            lines.append("deid pass   " + ("done" if records["first_pass_done"] else
                         f"{records['pass_files'] - records['pending_files']}/"
                         f"{records['pass_files']} files looked at")
                         + f"; {records['looked']} since the mount")
        audit = r.get("audit")
        if audit and (audit.get("segments") or audit.get("seq")):
            head = audit.get("head") or "-"
            lines.append(f"audit       {size_text(audit['bytes'])}, head record {audit['seq']} "
                         f"({head[:16]})" + (f"; {audit['failures']} records not written"
                                             if audit.get("failures") else ""))
        line = _shred_line(r["shred"]) if r.get("shred") else None
        if line:
            lines.append(line)
        if r.get("integrity_errors") or r.get("needs_fsck"):
            lines.append(f"integrity   {r.get('integrity_errors', 0)} damaged objects seen; "
                         + (f"the store needs 'dcmfs fsck {r['store']}'" if r.get("needs_fsck")
                            else ""))
        lines.append("")
    return "\n".join(lines).rstrip()
