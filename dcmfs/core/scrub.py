"""Verification inside a running daemon: ``dcmfs verify`` on a mounted store
(:class:`VerifyJob`) and the background scrubber (:class:`Scrubber`,
``-o scrub_interval=S``).

Both use :class:`dcmfs.integrity.verify.Verifier`, which holds the core's lock only to
read one file's index entries, so the PACS keeps writing meanwhile.  Every
finding goes to the core's damage handler (EIO for that file, the store
marked as needing fsck, one log line naming inode and object).  Paths are
resolved only for the admin's report (the ``user.dcmfs.verify`` attribute of
the mount root, readable by whoever may read the mount anyway), never logged.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import IntegrityError, loggable
from ..integrity.verify import Finding, Verifier, verify_store
from ..opened.jobs import ActiveJobHost, JobHost
from ..storage.objects import ObjectDamaged

log = logging.getLogger("dcmfs.scrub")

#: objects younger than this are not called orphans on a mounted store (they
#: may be written but not named yet: a file being written, a re-encode)
ORPHAN_AGE = 600.0


def report_findings(host: JobHost, findings: list[Finding]) -> None:
    for f in findings:
        if f.ino:  # the same key (object id) as a read meeting the same damage
            host.damaged(f.ino, ObjectDamaged(bytes.fromhex(f.oid), f.detail, f.kind) if f.oid
                         else IntegrityError(f"{f.kind}: {f.detail}"))


class VerifyJob:
    """One ``dcmfs verify`` run in the daemon, on its own thread."""

    def __init__(self, host: JobHost, paths: list[str] | None, sample: float | None) -> None:
        self.host = host
        self.paths = paths
        self.sample = sample
        self.state = {"running": True, "done": 0, "total": 0, "bytes": 0, "findings": 0,
                      "started": time.time()}
        self.result: dict | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="dcmfs-verify")
        self._thread.start()

    def status(self) -> dict:
        return dict(self.state, result=self.result)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        def start(total: int) -> None:
            self.state["total"] = total

        def progress(done, nbytes, nfind):
            self.state.update(done=done, bytes=nbytes, findings=nfind)

        try:
            report, missing = verify_store(self.host, self.paths, self.sample, start, progress,
                                           orphan_age=ORPHAN_AGE)
            report_findings(self.host, report.findings)
            self.result = dict(report.as_dict(), missing_paths=missing)
        except InterruptedError as exc:  # our own words: the store is closing
            self.result = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 — the admin's command must hear of it
            log.error("verify failed: %s", loggable(exc))
            self.result = {"error": loggable(exc)}
        finally:
            self.state["running"] = False


class Scrubber:
    """Verifies every file once per ``interval`` seconds in the background,
    at most ``rate`` bytes a second and not while files are being written;
    records when each file was last found intact (index ``scrubbed``)."""

    def __init__(self, host: ActiveJobHost, interval: float, rate: int,
                 quiet_after: float = 0.5) -> None:
        self.host = host
        self.interval = interval
        self.rate = rate
        self.quiet_after = quiet_after
        self._damaged: set[int] = set()
        self.state = {"rounds": 0, "round_files": 0, "round_done": 0, "verified_files": 0,
                      "verified_bytes": 0, "findings": 0, "last_round_end": None}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="dcmfs-scrub")
        self._thread.start()

    def status(self) -> dict:
        return dict(self.state, interval=self.interval)

    def _pace(self, nbytes: int, per_second: float) -> None:
        """Sleep so that the scrubber stays under its share; yield to writers."""
        stop = self.host.stopping
        if per_second > 0:
            stop.wait(nbytes / per_second)
        while not stop.is_set() and \
                time.monotonic() - self.host.last_activity() < self.quiet_after:
            stop.wait(self.quiet_after)

    def _loop(self) -> None:
        host = self.host
        verifier = Verifier.of(host)
        try:
            while not host.stopping.is_set():
                start = time.monotonic()
                files = verifier.files()
                if verifier.bad_inodes:  # inode records that do not authenticate
                    self._damaged.update(f.ino for f in verifier.bad_inodes)
                    self.state["findings"] = len(self._damaged)
                    report_findings(host, verifier.bad_inodes)
                total = sum(size for _, size in files)
                # spread the round over the interval, never above the rate
                per_second = min(self.rate, max(total / max(self.interval, 1.0), 1.0))
                self.state.update(round_files=len(files), round_done=0)
                intact: list[tuple[int, int]] = []
                for ino, size in files:
                    if host.stopping.is_set():
                        self._record(intact)
                        return
                    findings = verifier.check(ino)
                    self.state["round_done"] += 1
                    if findings is None:
                        continue
                    if findings:
                        self._damaged.add(ino)  # counted once, however many rounds
                        self.state["findings"] = len(self._damaged)
                        report_findings(host, findings)
                    else:
                        intact.append((ino, time.time_ns()))
                        self.state["verified_files"] += 1
                        self.state["verified_bytes"] += size
                        if len(intact) >= 256:  # one journal record per 256 files
                            self._record(intact)
                    self._pace(size, per_second)
                self._record(intact)
                self.state["rounds"] += 1
                self.state["last_round_end"] = time.time()
                host.stopping.wait(max(0.0, self.interval - (time.monotonic() - start)))
        except Exception as exc:  # noqa: BLE001 — the mount goes on without it
            log.error("scrubber stopped: %s", loggable(exc))
        finally:
            verifier.close()

    def _record(self, intact: list[tuple[int, int]]) -> None:
        """When these files were found intact (and empty the list)."""
        host = self.host
        with host.lock:
            if host.closed or not intact:
                intact.clear()
                return
            with host.write_txn() as txn:
                for ino, when in intact:
                    if txn.get_inode(ino) is not None:
                        txn.set_scrubbed(ino, when)
        intact.clear()

    def join(self) -> None:
        self._thread.join()
