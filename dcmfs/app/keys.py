"""Reading secrets: one set of rules for every source (docs/cli.md, "Secrets").

The command line (``--key-file``, ``--passphrase-file``, ``--passphrase-fd``,
the prompt, ``-o key_file=``/``passphrase_file=``) and instance files
(``[key]``: ``file``, ``credential``, ``passphrase_file``,
``passphrase_credential``, ``ask_password``) all read through here:

* **One maximum**: a secret is read whole, up to :data:`MAX_SECRET` bytes; a
  longer one is refused, never cut (two sources once read different
  lengths of the same file, and so derived different keys).
* **Private files**: a key or passphrase file (or credential) that is a
  regular file with any permission for group or others is refused;
  ``--allow-open-key-file`` accepts it with a warning.  Pipes, terminals
  and ``/dev/stdin`` are not files with modes that mean anything here.
* **One newline rule**: a passphrase is its bytes with every trailing line
  feed (``\\n``) removed, nothing else (a ``\\r``, spaces and other bytes
  are part of it); a key file is used exactly as it is.
* **No empty passphrase** from any source (after the newline rule).

A process that holds a key dumps no core and cannot be inspected by other
processes of its user (:func:`forbid_core_dumps`: the daemon and every
command).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shlex
import stat
import subprocess

from ..errors import SecretError

log = logging.getLogger("dcmfs")

#: the longest key file or passphrase dcmfs reads (bytes); a dcmfs key file
#: holds 32 (``init`` writes 32 random bytes)
MAX_SECRET = 4096


def passphrase(raw: bytes, source: str) -> bytes:
    """The passphrase ``raw`` holds (the newline rule), refused if empty.

    Raises
    ------
    SecretError
        Nothing is left once trailing line feeds are removed.
    """
    value = raw.rstrip(b"\n")
    if not value:
        raise SecretError(f"The passphrase from {source} is empty; an empty passphrase is "
                          "not allowed.")
    return value


def _check_private(st: os.stat_result, path: str, what: str, allow_open: bool) -> None:
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
        return
    if not allow_open:
        raise SecretError(f"The {what} {path} can be read or written by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); make it private with "
                          f"'chmod 600 {path}' (or pass --allow-open-key-file).")
    log.warning("the %s %s can be read or written by group or others (mode %04o); "
                "used because of --allow-open-key-file", what, path, stat.S_IMODE(st.st_mode))


def _read_bounded(fd: int, source: str) -> bytes:
    chunks, size = [], 0
    while size <= MAX_SECRET:
        b = os.read(fd, MAX_SECRET + 1 - size)
        if not b:
            break
        chunks.append(b)
        size += len(b)
    if size > MAX_SECRET:
        raise SecretError(f"The secret from {source} is longer than {MAX_SECRET} bytes, the "
                          "most dcmfs reads of a key file or passphrase (it is never cut).")
    return b"".join(chunks)


def read_file(path: str, what: str = "key file", allow_open: bool = False) -> bytes:
    """The bytes of a key or passphrase file (or systemd credential);
    ``what`` names it in messages.

    Raises
    ------
    SecretError
        It cannot be read, is open to group or others, or is too long.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"The {what} {path} cannot be read ({exc.strerror}).") from exc
    try:
        _check_private(os.fstat(fd), path, what, allow_open)
        return _read_bounded(fd, f"the {what} {path}")
    except OSError as exc:
        raise SecretError(f"The {what} {path} cannot be read ({exc.strerror}).") from exc
    finally:
        os.close(fd)


def read_fd(fd: int) -> bytes:
    """Everything an inherited file descriptor gives, up to :data:`MAX_SECRET`."""
    try:
        return _read_bounded(fd, f"file descriptor {fd}")
    except OSError as exc:
        raise SecretError(f"Cannot read a passphrase from fd {fd} ({exc.strerror}).") from exc


def read_credential(name: str, allow_open: bool = False) -> bytes:
    """The bytes of the systemd credential ``name`` (``LoadCredential=`` or
    ``LoadCredentialEncrypted=``: systemd has decrypted it into
    ``$CREDENTIALS_DIRECTORY``), by the key-file rules.

    Raises
    ------
    SecretError
        No credentials directory, a name with a slash, or the file's rules.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretError(f"The systemd credential {name} cannot be read: "
                          "$CREDENTIALS_DIRECTORY is not set (run under a unit with "
                          "LoadCredential= or LoadCredentialEncrypted=).")
    if "/" in name or name in ("", ".", ".."):
        raise SecretError(f"A credential name is a file name in $CREDENTIALS_DIRECTORY, "
                          f"not {name!r}.")
    return read_file(os.path.join(directory, name), "systemd credential", allow_open)


#: seconds a key command may take (a KMS round trip, a TPM unseal)
KEY_COMMAND_TIMEOUT = 60


def run_key_command(command: str) -> bytes:
    """What ``command`` prints (split like a shell, run without one), with
    trailing line feeds dropped; its stderr goes to ours, its exit status
    must be 0.  The command comes from the command line or an instance file,
    never from the store (whoever can write the store must not choose what
    runs).

    Raises
    ------
    SecretError
        It cannot run, fails, times out, prints nothing or more than
        :data:`MAX_SECRET` bytes.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise SecretError("The key command cannot be split into arguments (unbalanced "
                          "quotes).") from exc
    if not argv:
        raise SecretError("The key command is empty.")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              timeout=KEY_COMMAND_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise SecretError(f"The key command {argv[0]} is not found.") from exc
    except subprocess.TimeoutExpired as exc:
        raise SecretError(f"The key command {argv[0]} did not finish within "
                          f"{KEY_COMMAND_TIMEOUT} s.") from exc
    except OSError as exc:
        raise SecretError(f"The key command {argv[0]} cannot run ({exc.strerror}).") from exc
    if done.returncode != 0:
        raise SecretError(f"The key command {argv[0]} failed (exit status {done.returncode}).")
    if len(done.stdout) > MAX_SECRET:
        raise SecretError(f"The key command {argv[0]} printed more than {MAX_SECRET} bytes, "
                          "the most dcmfs reads of a key.")
    value = done.stdout.rstrip(b"\n")
    if not value:
        raise SecretError(f"The key command {argv[0]} printed nothing.")
    return value


#: the shortest view secret accepted (``new-view-secret`` writes 32 random bytes)
MIN_VIEW_SECRET = 16


def view_secret(path: str, allow_open: bool = False, key: bytes | None = None) -> bytes:
    """The de-identified view's secret from a file (the rules of a key file:
    private, at most :data:`MAX_SECRET` bytes, used exactly as it is), at
    least :data:`MIN_VIEW_SECRET` bytes and not the store's own key file
    (``key``): pseudonyms must not be derivable by whoever holds the key.

    Raises
    ------
    SecretError
        Unreadable, open to others, too short or too long, or the store's key.
    """
    raw = read_file(path, "view secret file", allow_open)
    if len(raw) < MIN_VIEW_SECRET:
        raise SecretError(f"The view secret file {path} holds {len(raw)} bytes; it needs at "
                          f"least {MIN_VIEW_SECRET} (create one with 'dcmfs new-view-secret "
                          f"{path}').")
    if key is not None and raw == key:
        raise SecretError(f"The view secret file {path} holds the store's key; the view "
                          "needs a secret of its own ('dcmfs new-view-secret PATH').")
    return raw


def create_key_file(path: str) -> None:
    """A new key file of 32 random bytes, mode 0600 (``init``), in a
    directory made 0700 if it is missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))


PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """No core file of this process (and its children), and no ptrace or
    /proc/PID/mem by other processes of the same user: the master key is in
    its memory.  ``RLIMIT_CORE`` 0 (hard as well) because a non-dumpable
    process is still dumped, readable by root, when ``fs.suid_dumpable`` is
    2; the systemd unit sets ``LimitCORE=0`` too.  Failures are logged, not
    raised: a seccomp filter may forbid setrlimit(2) (the unit's
    ``@resources``), and the unit's own limit then holds."""
    try:
        if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not turn core dumps off (RLIMIT_CORE): %s", exc.__class__.__name__)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable: %s",
                    os.strerror(ctypes.get_errno()))


#: glibc's malloc arenas of the daemon (M_ARENA_MAX; glibc's default is 8
#: per core, one per thread that allocates)
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Few malloc arenas: each libfuse worker thread and sealing thread got
    an arena of its own, which kept the chunks it had freed (a 2 GiB write
    and read: daemon RSS 187 MB with libfuse's threads, 137 MB with one)."""
    try:
        ctypes.CDLL(None).mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: its own allocator's policy
