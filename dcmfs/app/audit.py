"""``dcmfs audit``: list and verify a store's audit trail (with the key,
mounted or not), and the records of the admin commands run on an unmounted
store.  Output for SIEM ingestion: ``--json`` gives one JSON object per
line, times in ISO 8601 UTC."""

from __future__ import annotations

import datetime
import fnmatch
import logging
import os
import time
from typing import Callable, Iterator

from ..audit.check import index_head, unsealed_unlock_failures, walk
from ..audit.trail import AuditTrail
from .. import format as fmt
from ..index import index_key
from ..errors import DcmfsError, UsageError
from ..opened.store import OpenedStore
from ..storage.header import Secret, open_store

log = logging.getLogger("dcmfs")

#: compact record keys (in the sealed records) -> the names shown
_NAMES = {"e": "event", "u": "uid", "g": "gid", "p": "pid", "c": "process", "i": "ino"}


def record_admin(opened: OpenedStore, command: str, from_index: bool = False,
                 **fields) -> None:
    """Record an admin command run on an unmounted store (verify, fsck,
    recompress), by this process; a trail that cannot be written (read-only
    media) is logged, never fatal.  ``from_index``: the head is read from the
    index on disk (not opened): a trail started on this machine after an
    index was adopted (``dcmfs attach``) continues the chain it names."""
    if not opened.config.audit:
        return
    if opened.audit is not None:
        opened.audit.record("admin", None, command=command, **fields)
        return
    try:
        head = None
        key = opened.index_key if opened.index is not None else index_key(
            os.path.join(opened.root, fmt.INDEX_DIR), opened.store)[1]
        if opened.index is not None:
            with opened.index.begin() as txn:
                head = txn.get_audit_head()
        elif from_index:
            found = index_head(opened.root, key, opened.store.store_id)
            head = found if isinstance(found, dict) else None
        trail = AuditTrail(opened.root, key, opened.store.store_id, head,
                           segment_size=opened.config.audit_segment_size,
                           older=tuple(opened.store.epoch_keys.values()))
        try:
            trail.record("admin", None, command=command, **fields)
        finally:
            trail.close()
    except (DcmfsError, OSError) as exc:
        log.warning("the audit trail could not record '%s': %s", command, exc)


def parse_time(text: str | None) -> int | None:
    """ns since the epoch of an ISO 8601 time (UTC unless it says otherwise)
    or of a duration ago (``90s``, ``30m``, ``12h``, ``7d``)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return int((time.time() - float(text[:-1]) * units[text[-1]]) * 1e9)
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"'{text}' is not a time: give ISO 8601 (2026-12-02T19:30:00Z) "
                         "or a duration ago (90s, 30m, 12h, 7d).") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp() * 1e9)


def iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def shown(fields: dict) -> dict:
    """A record as ``dcmfs audit`` shows it: seq, time, then the rest."""
    out = {"seq": fields.get("seq"), "time": iso(fields["t"]) if "t" in fields else None}
    for key, value in fields.items():
        if key in ("seq", "t", "segment"):
            continue
        out[_NAMES.get(key, key)] = value
    return out


def records(store_root: str, secret: Callable[[], Secret], since: str | None = None,
            until: str | None = None, path: str | None = None, uid: int | None = None,
            event: str | None = None, problems: list | None = None) -> Iterator[dict]:
    """The records that match, oldest first (what does not verify is left
    out and its problem appended to ``problems``)."""
    t0, t1 = parse_time(since), parse_time(until)
    store = open_store(store_root, secret())
    key = index_key(os.path.join(store.root, fmt.INDEX_DIR), store)[1]
    head = index_head(store.root, key, store.store_id)
    items = list(walk(store.root, key, store.store_id,
                      head if isinstance(head, dict) else None,
                      tuple(store.epoch_keys.values())))
    recs = [v for k, v in items if k == "record"]
    recs += unsealed_unlock_failures(store.root)
    if problems is not None:
        problems.extend(v for k, v in items if k == "problem")
    for rec in recs:
        if rec.get("e") in ("segment-end",) and event != "segment-end":
            continue
        if t0 is not None and rec.get("t", 0) < t0 or t1 is not None and rec.get("t", 0) > t1:
            continue
        if uid is not None and rec.get("u") != uid:
            continue
        if event is not None and rec.get("e") != event:
            continue
        if path is not None and not any(
                isinstance(rec.get(k), str) and fnmatch.fnmatchcase(rec[k], path)
                for k in ("path", "to")):
            continue
        yield shown(rec)


def render(rec: dict) -> str:
    """One line for a terminal."""
    who = f"uid {rec.get('uid', '-')} pid {rec.get('pid', '-')} ({rec.get('process', '-')})"
    what = " ".join(f"{k}={v}" for k, v in rec.items()
                    if k not in ("seq", "time", "event", "uid", "gid", "pid", "process",
                                 "ino", "path"))
    where = f"ino {rec['ino']} {rec.get('path', '')}" if "ino" in rec else rec.get("path", "")
    return f"{rec['seq'] or '-':>8} {rec['time']} {rec['event']:<12} {who} {where} {what}".rstrip()


def verify(store_root: str, secret: Callable[[], Secret]) -> dict:
    """Check the whole chain: records, head, and every break named."""
    store = open_store(store_root, secret())
    key = index_key(os.path.join(store.root, fmt.INDEX_DIR), store)[1]
    head = index_head(store.root, key, store.store_id)
    problems = [head] if isinstance(head, str) else []
    n = 0
    end = (0, "")
    for kind, value in walk(store.root, key, store.store_id,
                            head if isinstance(head, dict) else None,
                            tuple(store.epoch_keys.values())):
        if kind == "record":
            n += 1
        elif kind == "problem":
            problems.append(value)
        else:
            end = value
    return {"store": store.root, "records": n, "head_seq": end[0], "head": end[1],
            "index_head_seq": head.get("seq") if isinstance(head, dict) else None,
            "unsealed_unlock_failures": len(unsealed_unlock_failures(store.root)),
            "intact": not problems, "problems": problems}


def render_verify(report: dict) -> str:
    lines = [f"audit trail of {report['store']}: {report['records']} records, head record "
             f"{report['head_seq']} ({report['head'][:16]})"]
    if report["unsealed_unlock_failures"]:
        lines.append(f"{report['unsealed_unlock_failures']} failed unlock attempts noted, to be "
                     "sealed at the next read-write opening")
    lines += [f"BROKEN: {p}" for p in report["problems"]]
    lines.append("intact" if report["intact"] else
                 f"{len(report['problems'])} breaks in the chain")
    return "\n".join(lines)
