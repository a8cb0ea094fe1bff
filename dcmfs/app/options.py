"""Every ``-o`` option of dcmfs, declared once.

:data:`OPTIONS` is the one list: each option's name, type (how its text
becomes a value), range, default (the :class:`~dcmfs.config.Config` field's
own), the Config field it sets (none for what the CLI consumes itself:
``key_file``, ``config``, ``log_file``, ``metrics``, …), a help line and
where it is accepted: the ``-o`` of ``dcmfs mount`` and ``mount.dcmfs``, an
instance file's ``[options]``, and the ``-o`` of ``recompress``, ``stats``,
``verify`` and ``fsck``, which take only what matters for an unmounted store.
The CLI's ``-o`` parsing (:func:`parse_o`, :func:`make_config`), the ``-o``
part of ``--help`` (:func:`help_text`), the instance files and
``tests/test_options.py`` (which holds docs/cli.md's option tables against
this list) all read it.

Three sorts of option: dcmfs's own (``name=value``, validated here), FUSE
options passed through to libfuse (``ro``, ``allow_other``, …; a mount passes
any option not declared here through as well, since libfuse knows more than we
list), and fstab options for mount(8) and systemd, which dcmfs ignores.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Callable

from ..config import Config
from ..errors import UsageError
from ..storage import codec
from .units import MB

# --- where an option is accepted ----------------------------------------------------------
MOUNT = "mount"              #: dcmfs mount -o
HELPER = "mount.dcmfs"       #: the mount(8) helper's -o (fstab lines, .mount units)
INSTANCE = "instance"        #: [options] of an instance file (/etc/dcmfs/NAME.toml)
RECOMPRESS = "recompress"
STATS = "stats"
VERIFY = "verify"
FSCK = "fsck"
#: the commands with ``-o``, in the order of docs/cli.md
COMMANDS = (MOUNT, RECOMPRESS, STATS, VERIFY, FSCK)
MOUNTING = frozenset({MOUNT, HELPER, INSTANCE})
#: the key options work wherever a store may be opened with a key
KEYED = MOUNTING | {RECOMPRESS, STATS, VERIFY, FSCK}

DCMFS, FUSE, FSTAB = "dcmfs", "fuse", "fstab"


# --- types ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kind:
    """How an option's text becomes a value and how a value is shown.

    ``parse`` raises ValueError (any message) for a text that is not
    ``what``; the caller names the option in the error.
    """

    sort: str
    metavar: str = ""
    what: str = ""
    parse: Callable[[str], Any] = str
    show: Callable[[Any], str] = str


class _Complete(ValueError):
    """A parse error whose message is already complete (the caller adds
    nothing to it)."""


def _flag(text: str) -> bool:
    return {"0": False, "1": True}[text]


def _interval(value: float) -> float:
    """``value`` if it is a finite number of seconds, 0 or more."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(value)
    return value


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return _interval(float(text[:-1]) * units[text[-1]])
    return _interval(float(text))


def _show_duration(seconds: float) -> str:
    if not seconds:
        return "off"
    for suffix, unit in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % unit == 0:
            return f"{seconds / unit:g}{suffix}"
    return f"{seconds:g}s"


def _rate(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return max(1, int(value * MB))


def _known_image_codecs() -> list[str]:
    return [n for n, i in codec.NAMES.items() if i in codec.IMAGE_CODECS]


def _image_codecs(text: str) -> tuple[str, ...]:
    names = tuple(text.split("+"))
    known = _known_image_codecs()
    if not set(names) <= set(known) or len(set(names)) != len(names):
        raise _Complete(f"image_codecs takes some of {'+'.join(known)}, each once")
    return names


def _address(text: str) -> str:
    from ..adapter.metrics import parse_address
    parse_address(text)
    return text


INT = Kind(DCMFS, "N", "an integer", int)
FLAG = Kind(DCMFS, "0|1", "0 or 1", _flag, lambda v: str(int(v)))
SECONDS = Kind(DCMFS, "S", "seconds (0 or more)", lambda t: _interval(float(t)),
               lambda v: f"{v:g}")
DAYS = Kind(DCMFS, "D", "days (0 or more; fractions allowed)", float, lambda v: f"{v:g}")
DURATION = Kind(DCMFS, "T", "a duration such as 90s, 30m, 12h or 7d", _seconds, _show_duration)
RATE = Kind(DCMFS, "MB", "MB/s (more than 0)", _rate, lambda v: f"{v / MB:.3g}")
CODECS = Kind(DCMFS, "A+B", "image codec names joined by +", _image_codecs, "+".join)
MEGABYTES = Kind(DCMFS, "MB", "a size in MB", lambda t: int(float(t) * MB),
                  lambda v: f"{v / MB:.4g}")
PATH = Kind(DCMFS, "PATH", "a path", str)
ADDRESS = Kind(DCMFS, "HOST:PORT", "HOST:PORT", _address)
VIEW = Kind(DCMFS, "deid", "deid or none", lambda t: {"deid": "deid", "none": ""}[t],
            lambda v: v or "none")
DATES = Kind(DCMFS, "remove|shift", "remove or shift", lambda t: {"remove": t, "shift": t}[t])
#: passed to libfuse as given
FUSE_OPTION = Kind(FUSE)
#: for mount(8) and systemd; dcmfs ignores it
FSTAB_OPTION = Kind(FSTAB)


# --- options ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Option:
    """One ``-o`` option.  A name ending in ``*`` is a prefix (``x-*``)."""

    name: str
    kind: Kind
    help: str
    where: frozenset[str]
    #: the Config field it sets (None: the CLI consumes it, or FUSE/mount(8) do)
    field: str | None = None
    #: inclusive bounds of the value (None: open)
    low: float | None = None
    high: float | None = None

    @property
    def default(self) -> Any:
        """The Config field's default (None without a field)."""
        return getattr(Config(), self.field) if self.field else None

    @property
    def usage(self) -> str:
        """``zstd_level=N``, ``allow_other``, ``x-*``."""
        return f"{self.name}={self.kind.metavar}" if self.kind.metavar else self.name

    def matches(self, key: str) -> bool:
        return key.startswith(self.name[:-1]) if self.name.endswith("*") else key == self.name

    def parse(self, text: str) -> Any:
        """The value of ``text``; raises ValueError saying what is wanted."""
        try:
            value = self.kind.parse(text)
        except _Complete:
            raise
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{self.name} takes {self.kind.what}, not {text!r}") from exc
        if (self.low is not None and value < self.low) or \
                (self.high is not None and value > self.high):
            raise ValueError(f"{self.name} must be {self.range_text()}")
        return value

    def range_text(self) -> str:
        show = self.kind.show
        if self.low is not None and self.high is not None:
            return f"{show(self.low)}..{show(self.high)}"
        return f">= {show(self.low)}" if self.low is not None else f"<= {show(self.high)}"

    def help_line(self) -> str:
        notes = []
        if self.default is not None and self.kind.sort == DCMFS:
            notes.append(f"default {self.kind.show(self.default)}")
        if self.low is not None or self.high is not None:
            notes.append(self.range_text())
        return self.help + (f" ({'; '.join(notes)})" if notes else "")


#: the re-encoder's settings also apply to recompress on an unmounted store
RECODING = MOUNTING | {RECOMPRESS}

OPTIONS: tuple[Option, ...] = (
    # FUSE options, passed through
    Option("ro", FUSE_OPTION, "read-only mount", MOUNTING, field="read_only"),
    Option("allow_other", FUSE_OPTION, "other users may use the mount (FUSE)", MOUNTING),
    Option("allow_root", FUSE_OPTION, "root may use the mount (FUSE)", MOUNTING),
    Option("nonempty", FUSE_OPTION, "mount over a non-empty directory", MOUNTING),
    # dcmfs's own, into Config
    # (zstd takes levels up to 22; negative ones are its fast levels)
    Option("zstd_level", INT, "zstd level for new chunks", RECODING | {FSCK}, field="zstd_level",
           high=22),
    Option("reencode", FLAG, "1: close seals uncompressed and a background thread compresses; "
           "0: compress at close", MOUNTING, field="reencode"),
    Option("dicom", FLAG, "1: DICOM pixel data frame by frame with an image codec; 0: zstd only",
           RECODING, field="dicom"),
    Option("image_codecs", CODECS, "the image codecs each frame is offered, with zstd; some of "
           + ", ".join(_known_image_codecs()), RECODING, field="image_codecs"),
    Option("hot_days", DAYS, "days a re-encoded DICOM file stays in the fast-decoding form "
           "(blosc2: byte-shuffled LZ4HC) after it was coded or last read, before it is coded densely (0: densely "
           "at once)", RECODING, field="hot_days", low=0, high=36500),
    Option("sandbox", FLAG, "1: the DICOM analysis and image encoders run in keyless, capped "
           "worker processes; 0: in the daemon (for measurements only)", RECODING,
           field="sandbox"),
    Option("parser_memory", MEGABYTES, "heap of each parser worker in MB", RECODING,
           field="parser_memory", low=256 * MB, high=1 << 40),
    Option("parser_timeout", SECONDS, "seconds one analysis may take before its worker is "
           "killed", RECODING, field="parser_timeout", low=1, high=3600),
    Option("checkpoint_interval", SECONDS, "seconds between durable index checkpoints",
           MOUNTING, field="checkpoint_interval"),
    Option("threads", FLAG, "1: a request that takes long (a fsync of a gigabyte) is left "
           "to its thread while another serves the next requests; 0: one thread serves "
           "every request in turn", MOUNTING, field="fuse_threads"),
    Option("read_ahead_kb", INT, "KiB the kernel reads ahead of a sequential reader, set on "
           "the mount when the daemon may (root; 0: the kernel's own 128)", MOUNTING,
           field="read_ahead_kb", low=0, high=65536),
    Option("reencode_threads", INT, "cores the re-encoder may use while no file is written",
           RECODING, field="reencode_threads", low=1, high=64),
    Option("inline_max", INT, "objects of at most this many bytes (as stored) are kept in "
           "the index instead of as files (0: none; at most 4096)", MOUNTING,
           field="inline_max", low=0, high=4096),
    Option("shred_after", DURATION, "run a shred pass once the first deletion not yet "
           "shredded is T old, so its objects are unreadable with the key and the index "
           "from then on (off: at unmount and 'dcmfs shred' only)", MOUNTING,
           field="shred_after"),
    Option("scrub_interval", DURATION, "verify every file once per T in the background",
           MOUNTING, field="scrub_interval"),
    Option("inbox_interval", DURATION, "import what write-only mounts wrote every T while "
           "mounted (0: only when the store is opened)", MOUNTING, field="inbox_interval"),
    Option("handover_after", DURATION, "a write-only mount hands a closed file over to the "
           "key holders T after its close (it cannot be renamed, changed or deleted after; "
           "0: only when the mount ends)", MOUNTING, field="handover_after"),
    Option("scrub_rate", RATE, "the scrubber's bound in MB/s of plaintext", MOUNTING,
           field="scrub_rate"),
    Option("audit", FLAG, "1: record who opened, wrote, renamed and deleted which file in "
           "the sealed audit trail; 0: no trail", MOUNTING, field="audit"),
    Option("audit_forward", FLAG, "1: log a digest of every audit record without names "
           "(sequence, event, uid, inode, chain hash) for journald/syslog", MOUNTING,
           field="audit_forward"),
    Option("audit_retention", DURATION, "drop whole audit segments older than T (off: keep "
           "all)", MOUNTING, field="audit_retention"),
    Option("state_dir", PATH, "where the store's witness lives (default /var/lib/dcmfs for "
           "root, else the XDG state directory)", KEYED, field="state_dir"),
    Option("accept_rollback", FLAG, "1: open a store older than its witness (as "
           "--accept-rollback)", KEYED, field="accept_rollback"),
    Option("cache_size", MEGABYTES, "S3 stores: MB the local cache of objects may hold",
           MOUNTING, field="cache_size"),
    Option("s3_sync", FLAG, "S3 stores: fsync also waits until every object is in the bucket",
           MOUNTING, field="s3_sync"),
    Option("s3_upload_delay", SECONDS, "S3 stores: seconds a new object waits before its "
           "upload, so that the re-encoder's replacement is uploaded instead", MOUNTING,
           field="s3_upload_delay"),
    Option("s3_publish_interval", SECONDS, "S3 stores: seconds between uploads of the journal "
           "for read-only followers (0: none)", MOUNTING, field="s3_publish_interval"),
    Option("follow", SECONDS, "S3 stores, with ro: follow the writer, applying its uploaded "
           "journal every N seconds (new files show within ~30 s)", MOUNTING, field="follow"),
    Option("view", VIEW, "deid: a read-only, de-identified research view of the DICOM files "
           "(as --view deid)", MOUNTING, field="view"),
    Option("deid_dates", DATES, "the view's dates: removed as the profile says, or shifted "
           "back by a per-patient offset", MOUNTING, field="deid_dates"),
    Option("deid_characteristics", FLAG, "1: the view keeps sex, age, size, weight (Retain "
           "Patient Characteristics)", MOUNTING, field="deid_characteristics"),
    Option("deid_device", FLAG, "1: the view keeps device identity (Retain Device Identity)",
           MOUNTING, field="deid_device"),
    Option("deid_burned_in", FLAG, "1: the view also serves files that declare or may carry "
           "burned-in text (BurnedInAnnotation YES; US, SC unless NO)", MOUNTING,
           field="deid_burned_in"),
    Option("deid_safe_private", FLAG, "1: the view keeps the private attributes PS3.15 Table "
           "E.3.10-1 lists as safe (Retain Safe Private; no OB or SQ ones)", MOUNTING,
           field="deid_safe_private"),
    # consumed by the CLI
    Option("view_secret_file", PATH, "the view's secret (as --view-secret-file)", MOUNTING),
    Option("view_mount", PATH, "serve the de-identified view there too, beside the files, "
           "from the same daemon (needs view_secret_file)", MOUNTING),
    Option("recipient", PATH, "mount write-only with only the store's recipient public key "
           "(the file 'dcmfs key recipient --export' wrote): no key asked; files can be "
           "created and written, never read back", MOUNTING),
    Option("key_file", PATH, "the key file (as --key-file)", KEYED),
    Option("passphrase_file", PATH, "the passphrase file (as --passphrase-file)", KEYED),
    Option("log_file", PATH, "the daemon's log in the background (default STORE/dcmfs.log)",
           MOUNTING),
    Option("config", PATH, "an instance file (/etc/dcmfs/NAME.toml)", frozenset({MOUNT, HELPER})),
    Option("metrics", ADDRESS, "serve Prometheus metrics there (no authentication)", MOUNTING),
    # fstab options for mount(8) and systemd
    *(Option(name, FSTAB_OPTION, "for mount(8) and systemd; ignored", MOUNTING)
      for name in ("_netdev", "nofail", "auto", "noauto", "defaults", "user", "users",
                   "nouser", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async",
                   "sync", "comment", "x-*")),
)


def find(key: str) -> Option | None:
    """The option named ``key`` (or whose prefix it has), or None."""
    return next((o for o in OPTIONS if o.matches(key)), None)


def accepted(where: str) -> list[Option]:
    return [o for o in OPTIONS if where in o.where]


# --- the command line ------------------------------------------------------------------------
def _bad(command: str, detail: str) -> UsageError:
    return UsageError(f"A -o option has a bad value ({detail}); see 'dcmfs {command} --help'.")


def parse_o(values: list[str] | None, command: str = MOUNT) -> tuple[dict, dict]:
    """Split ``-o a,b=c`` lists into (dcmfs options, FUSE options).

    dcmfs options keep their text (:func:`make_config` checks it); fstab
    options are dropped.  A mount passes undeclared options to libfuse; the
    other commands refuse options they do not take.

    Raises
    ------
    UsageError
        An option ``command`` does not take.
    """
    ours: dict[str, str] = {}
    fuse: dict[str, Any] = {}
    for value in values or []:
        for item in value.split(","):
            if not item:
                continue
            key, eq, val = item.partition("=")
            opt = find(key)
            if opt is None and command == MOUNT:
                fuse[key] = val if eq else True
                continue
            if opt is None or command not in opt.where:
                names = ", ".join(o.name for o in accepted(command))
                raise UsageError(f"'dcmfs {command}' takes no -o option {key} (it takes "
                                 f"{names}); see 'dcmfs {command} --help'.")
            if opt.kind.sort == DCMFS:
                ours[key] = val
            elif opt.kind.sort == FUSE:
                fuse[key] = val if eq else True
    return ours, fuse


def make_config(ours: dict, fuse: dict, command: str = MOUNT) -> Config:
    """The Config of ``command`` from :func:`parse_o`'s result; every dcmfs
    option's value is checked (an empty one means the default).

    Raises
    ------
    UsageError
        A value that is not of its option's type or out of its range.
    """
    # a FUSE option with a field (ro) is set by its presence
    kw: dict[str, Any] = {o.field: bool(fuse.get(o.name)) for o in OPTIONS
                          if o.field is not None and o.kind.sort == FUSE}
    for key, text in ours.items():
        if not text:
            continue
        opt = find(key)
        try:
            value = opt.parse(text)
        except ValueError as exc:
            raise _bad(command, str(exc)) from exc
        if opt.field is not None:
            kw[opt.field] = value
    return Config(**kw)


def help_text(where: str) -> str:
    """The ``-o`` part of ``--help`` for ``where`` (a command or mount.dcmfs)."""
    opts = accepted(where)
    lines = ["-o options (comma separated, repeatable):"]
    for opt in opts:
        if opt.kind.sort == FSTAB:
            continue
        first, *rest = textwrap.wrap(opt.help_line(), 52) or [""]
        lines.append(f"  {opt.usage:<24}{first}")
        lines += [" " * 26 + line for line in rest]
    fstab = [o.name for o in opts if o.kind.sort == FSTAB]
    if fstab:
        lines.append(textwrap.fill(", ".join(fstab) + ": fstab options for mount(8) and "
                                   "systemd; ignored by dcmfs", 78, initial_indent="  ",
                                   subsequent_indent="  "))
    if where in (MOUNT, HELPER):
        lines.append("  other options go to libfuse as they are")
    return "\n".join(lines)
