"""Per-instance configuration for systemd: ``/etc/dcmfs/<instance>.toml``.

One file per store; ``dcmfs@<instance>.service`` runs
``dcmfs mount --config /etc/dcmfs/<instance>.toml -f``, and fstab lines pass
``config=PATH``.  Example (every key but ``store``, ``mountpoint`` and
``[key]`` is optional)::

    store = "/srv/dcmfs/pacs"          # the backing store (absolute)
    mountpoint = "/srv/pacs"           # where the plaintext view appears
    codec = "zstd"                     # for 'dcmfs init --config' only
    metrics = "127.0.0.1:9641"         # Prometheus endpoint (optional)

    [options]                          # the same as -o: true, a number or a string
    allow_other = true
    zstd_level = 3

    [key]                              # exactly one of:
    credential = "dcmfs.key"           # $CREDENTIALS_DIRECTORY/dcmfs.key (LoadCredential=)
    # file = "/etc/dcmfs/pacs.key"
    # passphrase_credential = "dcmfs.passphrase"
    # passphrase_file = "/etc/dcmfs/pacs.passphrase"
    # ask_password = true              # systemd-ask-password at start (attended boots)
    # command = "/usr/local/sbin/dcmfs-kms-key pacs"   # prints the key of a key-command slot

No secret is ever in this file; it names where the key comes from.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tomllib

from ..errors import SecretError, UsageError
from . import keys, options

KEY_SOURCES = ("credential", "file", "passphrase_credential", "passphrase_file",
               "ask_password", "command")
_TOP_KEYS = {"store", "mountpoint", "codec", "metrics", "options", "key"}


@dataclasses.dataclass(frozen=True)
class Instance:
    """What one configured store needs to mount."""

    path: str
    name: str
    store: str
    mountpoint: str
    codec: str = "zstd"
    metrics: str | None = None
    #: ``-o`` items, e.g. ("allow_other", "zstd_level=3")
    options: tuple[str, ...] = ()
    key_source: str = "credential"
    key_value: str = "dcmfs.key"

    @property
    def key_kind(self) -> str:
        if self.key_source == "command":
            return "command"
        return "keyfile" if self.key_source in ("credential", "file") else "passphrase"


def _option_item(path: str, key: str, value) -> str | None:
    """The ``-o`` item of ``key = value`` in [options] (None: left out)."""
    opt = options.find(key)
    if opt is not None and options.INSTANCE not in opt.where:
        raise UsageError(f"In {path}, [options] {key} does not belong in an instance file.")
    if opt is not None and opt.kind is options.FLAG and isinstance(value, bool):
        return f"{key}={int(value)}"  # reencode = false is reencode=0, not "left out"
    if value is True:
        return key
    if value is False:
        return None
    if isinstance(value, (int, float, str)):
        return f"{key}={value}"
    raise UsageError(f"The option {key!r} has a value of type {type(value).__name__}; "
                     "use true, a number or a string.")


def load(path: str) -> Instance:
    """Read and check an instance file.

    Raises
    ------
    UsageError
        The file is missing, not TOML, or has a wrong or unknown key.
    """
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"The config file {path} cannot be read ({exc.strerror}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"The config file {path} is not valid TOML ({exc}).") from exc
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UsageError(f"The config file {path} has unknown keys ({', '.join(sorted(unknown))}); "
                         f"known are {', '.join(sorted(_TOP_KEYS))}.")
    for k in ("store", "mountpoint"):
        if not isinstance(data.get(k), str) or not os.path.isabs(data[k]):
            raise UsageError(f"The config file {path} needs '{k}' as an absolute path.")
    key = data.get("key")
    if not isinstance(key, dict) or len(key) != 1 or next(iter(key)) not in KEY_SOURCES:
        raise UsageError(f"The config file {path} needs a [key] table with exactly one of "
                         f"{', '.join(KEY_SOURCES)}.")
    source, value = next(iter(key.items()))
    if source == "ask_password":
        if value is not True:
            raise UsageError(f"In {path}, [key] ask_password must be true.")
        value = ""
    elif not isinstance(value, str) or not value:
        raise UsageError(f"In {path}, [key] {source} must be a non-empty string.")
    opts = data.get("options", {})
    if not isinstance(opts, dict):
        raise UsageError(f"In {path}, [options] must be a table (allow_other = true, …).")
    items = tuple(i for i in (_option_item(path, k, v) for k, v in opts.items()) if i)
    metrics = data.get("metrics")
    if metrics is not None and not isinstance(metrics, str):
        raise UsageError(f"In {path}, metrics must be a string such as \"127.0.0.1:9641\".")
    codec = data.get("codec", "zstd")
    if codec not in ("zstd", "lzma", "none"):
        raise UsageError(f"In {path}, codec must be \"zstd\", \"lzma\" or \"none\" (the store's "
                         "general codec; image codecs are chosen with image_codecs in [options]).")
    name = os.path.splitext(os.path.basename(path))[0]
    return Instance(path, name, data["store"], data["mountpoint"],
                    codec=codec, metrics=metrics, options=items,
                    key_source=source, key_value=value)


def credential_path(name: str) -> str:
    """Where systemd put the credential ``name`` (LoadCredential=, LoadCredentialEncrypted=).

    Raises
    ------
    SecretError
        Not started by systemd with credentials, or this one is missing.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretError(f"The key is the systemd credential {name!r}, but $CREDENTIALS_DIRECTORY "
                          "is not set: start dcmfs through its unit (LoadCredential=) or use "
                          "[key] file = ….")
    if "/" in name:
        raise SecretError(f"The credential name {name!r} must not contain '/'.")
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise SecretError(f"The systemd credential {name!r} was not passed to this unit; add "
                          f"LoadCredential={name}:PATH or LoadCredentialEncrypted={name}:PATH.")
    return path


def read_key(inst: Instance, creating: bool = False,
             allow_open: bool = False) -> tuple[str, bytes]:
    """(kind, secret bytes) from the instance's key source, by the rules of
    :mod:`dcmfs.app.keys` (``allow_open``: ``--allow-open-key-file``).

    Raises
    ------
    SecretError
        The source cannot be read, is open to group or others, too long, or
        an empty passphrase.
    """
    source, value = inst.key_source, inst.key_value
    if source == "ask_password":
        return "passphrase", ask_password(inst.name, confirm=creating)
    if source == "command":  # a key-command slot (docs/cli.md, "key")
        return "command", keys.run_key_command(value)
    credential = source in ("credential", "passphrase_credential")
    path = credential_path(value) if credential else value
    if creating and source == "file" and not os.path.exists(path):
        keys.create_key_file(path)
    what = ("systemd credential" if credential else
            "key file" if inst.key_kind == "keyfile" else "passphrase file")
    data = keys.read_file(path, what, allow_open)
    if inst.key_kind == "passphrase":
        data = keys.passphrase(data, f"the {what} {path}")
    return inst.key_kind, data


def ask_password(name: str, confirm: bool = False) -> bytes:
    """A passphrase from ``systemd-ask-password`` (a console, a terminal or
    an agent such as Plymouth on an attended boot)."""
    prompt = f"dcmfs passphrase for {name}:"
    cmd = ["systemd-ask-password", f"--id=dcmfs:{name}", "--timeout=0", prompt]
    try:
        first = subprocess.run(cmd, capture_output=True, check=True).stdout
        if confirm and subprocess.run(cmd[:-1] + ["again:"], capture_output=True,
                                      check=True).stdout != first:
            raise SecretError("The passphrases differ; nothing was created.")
    except FileNotFoundError as exc:
        raise SecretError("systemd-ask-password is not installed; use [key] "
                          "passphrase_credential instead.") from exc
    except subprocess.CalledProcessError as exc:
        raise SecretError("No passphrase was entered at systemd-ask-password.") from exc
    if len(first) > keys.MAX_SECRET + 1:  # its answer ends with a line feed
        raise SecretError(f"The passphrase is longer than {keys.MAX_SECRET} bytes, the most "
                          "dcmfs accepts.")
    return keys.passphrase(first, "systemd-ask-password")
