"""Logging for a terminal, a log file or the systemd journal.

When stderr is the journal (systemd sets ``$JOURNAL_STREAM`` to the
``device:inode`` of the stream it connected), each line starts with a
syslog priority prefix ``<N>`` (sd-daemon(3)) and carries no timestamp: the
journal stamps every line itself.  Elsewhere lines carry a timestamp.

No dcmfs log message names a plaintext file; mfusepy's own debug output
prints the raw arguments of every FUSE call (paths included), so its logger
stays at WARNING even with ``-v``.
"""

from __future__ import annotations

import logging
import os
import sys

#: sd-daemon(3) priorities for Python's levels
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def stderr_is_journal(stream=None) -> bool:
    """True when ``stream`` (default stderr) is the journal's stream socket."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalFormatter(logging.Formatter):
    """``<prio>logger: message``; a traceback goes on the same record with
    each continuation line prefixed too, so the journal keeps its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup(verbose: bool = False, stream=None) -> None:
    """Configure the root logger once for a command (the CLI calls this)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # mfusepy's debug lines carry raw FUSE arguments, i.e. plaintext paths
    logging.getLogger("fuse").setLevel(logging.WARNING)


#: the audit trail's logger: key slots changed, failed unlock attempts (slot
#: kinds, ids and labels; never a secret)
AUDIT = "dcmfs.audit"


class StoreAudit(logging.Handler):
    """Appends audit records to the store's own log (``STORE/dcmfs.log``),
    opened at the first record (so a command that records nothing creates
    no log), never through a symlink."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.INFO)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError:
            self.handleError(record)
            return
        try:
            os.write(fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        finally:
            os.close(fd)


def audit_to(store_root: str) -> None:
    """Send this command's audit records to the store's log instead of the
    terminal (the command prints its own one-line answer); under systemd,
    where stderr is the journal, to both."""
    from .. import format as fmt
    logger = logging.getLogger(AUDIT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(StoreAudit(os.path.join(store_root, fmt.LOG_NAME)))
    logger.propagate = stderr_is_journal()
