"""The one exception tree of dcmfs.

Every error a user can meet is a :class:`DcmfsError` subclass with a distinct
exit code and a message that says what happened and what to do next (the
model is borg's ``helpers/errors.py``).  Code below the CLI raises these and
never calls ``sys.exit`` or deals in errno values; the FUSE adapter maps them
to errno through one table, the CLI maps them to exit codes.

Messages never contain plaintext file names or DICOM attributes: they name
stores, mountpoints, inode numbers and object ids only.  The one exception is
:class:`FsError` (the POSIX namespace answers: not found, exists, ...), whose
argument may be the path the kernel asked about; those are turned into errno
by the FUSE adapter, which logs only their class, and never reach a log line
or the command line.
"""

from __future__ import annotations


class DcmfsError(Exception):
    """Base of all dcmfs errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __str__(self) -> str:  # a plain sentence, no traceback clutter
        return " ".join(str(a) for a in self.args) or self.__class__.__doc__ or ""


# --- store and key -----------------------------------------------------------
class UsageError(DcmfsError):
    """The command line is not valid."""

    exit_code = 2


class WrongKeyError(DcmfsError):
    """The key or passphrase does not open this store."""

    exit_code = 10
    #: the store the key did not open (the CLI notes the failed attempt there)
    store_root: str | None = None


class StoreMissingError(DcmfsError):
    """The store directory does not exist."""

    exit_code = 11


class ForeignStoreError(DcmfsError):
    """The directory is not a dcmfs store."""

    exit_code = 12


class UnsupportedFormatError(DcmfsError):
    """The store uses a format version or feature this dcmfs does not know."""

    exit_code = 13


class StoreLockedError(DcmfsError):
    """Another dcmfs process has this store open."""

    exit_code = 14


class StoreNotEmptyError(DcmfsError):
    """``init`` refuses a directory that already holds files."""

    exit_code = 15


class SecretError(DcmfsError):
    """No usable key or passphrase was given."""

    exit_code = 16


class IndexDamagedError(DcmfsError):
    """The LMDB index cannot be read."""

    exit_code = 17


class NeedsRecoveryError(DcmfsError):
    """The store was not cleanly unmounted and must be opened read-write once."""

    exit_code = 18


class StoreDamagedError(DcmfsError):
    """The store is marked as needing 'dcmfs fsck' (integrity errors were seen)."""

    exit_code = 19


class KdfBoundsError(DcmfsError):
    """The store header asks for key-derivation parameters outside the bounds
    dcmfs accepts (it was altered: nothing is derived with them)."""

    exit_code = 26


class IndexNotAuthenticError(DcmfsError):
    """The index does not match its sealed checksum: records were added,
    removed, altered or rolled back by someone without the key."""

    exit_code = 28


class RollbackError(DcmfsError):
    """The store (or its journal) is older than this machine's witness of it."""

    exit_code = 29


class HeaderAlteredError(WrongKeyError):
    """A key slot opened, but the store header is not what a key holder
    wrote (its MAC fails): a removed slot put back, or a field edited."""

    exit_code = 35


class KeySlotError(DcmfsError):
    """A ``dcmfs key`` command cannot be done as asked (no such slot, or the
    last slot would be removed)."""

    exit_code = 36


class DamageFound(DcmfsError):
    """verify or fsck found damage (the report names it)."""

    exit_code = 34


# --- mounting ----------------------------------------------------------------
class MountpointMissingError(DcmfsError):
    """The mountpoint does not exist or is not a directory."""

    exit_code = 20


class MountpointBusyError(DcmfsError):
    """The mountpoint is already a mount or holds files."""

    exit_code = 21


class FuseUnavailableError(DcmfsError):
    """libfuse3 or /dev/fuse is missing."""

    exit_code = 22


class NotMountedError(DcmfsError):
    """The path is not a dcmfs mountpoint."""

    exit_code = 23


class MountFailedError(DcmfsError):
    """The daemon did not bring the mount up."""

    exit_code = 24


class CodecUnavailableError(DcmfsError):
    """An image codec the store uses (or the options ask for) is missing from
    this installation's imagecodecs: an environment problem, never damage."""

    exit_code = 25


class DaemonUnprovenError(DcmfsError):
    """``umount`` could not prove which process is the mount's daemon, so it
    signalled nothing."""

    exit_code = 27


class LeaseHeldError(DcmfsError):
    """Another read-write opening (on any machine) holds the lease of the S3
    store's bucket prefix: one writer per prefix."""

    exit_code = 37


# --- data path (mapped to errno by the FUSE adapter) ---------------------------
class IntegrityError(DcmfsError):
    """A stored object failed authentication or does not match the index."""

    exit_code = 30


class NoSpaceError(DcmfsError):
    """The disk under the store is full."""

    exit_code = 31


class StoreIOError(DcmfsError):
    """Reading or writing the backing store failed."""

    exit_code = 32


class ReadOnlyError(DcmfsError):
    """The store is mounted read-only."""

    exit_code = 33


# --- POSIX namespace errors (the core raises them, the adapter maps them) ----
class FsError(DcmfsError):
    """A filesystem operation was refused the way a POSIX filesystem would."""

    exit_code = 40


class NotFound(FsError):
    """No such file or directory."""


class Exists(FsError):
    """File exists."""


class NotADirectory(FsError):
    """Not a directory."""


class IsADirectory(FsError):
    """Is a directory."""


class DirectoryNotEmpty(FsError):
    """Directory not empty."""


class InvalidArgument(FsError):
    """Invalid argument."""


class NoAttribute(FsError):
    """No such extended attribute."""


class NotSupported(FsError):
    """Operation not supported."""


class NameTooLong(FsError):
    """File name too long."""


class BadHandle(FsError):
    """Bad file handle."""


class TooBig(FsError):
    """File too large."""


class PermissionDenied(FsError):
    """Permission denied."""


def loggable(exc: BaseException) -> str:
    """What a log line, a status attribute or a report may say of an
    exception: dcmfs's own message (it never quotes file content, see
    :class:`FsError` for where a path may appear), else the type alone (a
    parser's or a library's message may quote bytes of a file)."""
    return str(exc) if isinstance(exc, DcmfsError) else type(exc).__name__
