"""``dcmfs key list|add|remove|change`` (docs/cli.md, "key").

A command that changes slots takes two secrets: the one that authorises it
(the usual KEY options, which open an existing slot) and the new one
(``--new-key-file``, ``--new-passphrase-file``, ``--new-passphrase-fd``,
``--new-credential``, ``--new-key-command``, or a prompt on a terminal).
Both follow the rules of :mod:`dcmfs.app.keys`.  Each change is recorded in
the store's sealed audit trail (:mod:`dcmfs.app.keyaudit`: by the daemon of
a mounted store, else under the store lock) and appended to the store's own
log (:func:`dcmfs.app.logsetup.audit_to`): slot ids, kinds and labels, never
a secret.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import sys

from ..config import Config
from ..errors import SecretError
from . import keys, logsetup
from .keyaudit import KeyRecord


#: secret sources, one option each, with the Secret kind they give
SOURCES = (("key_file", "keyfile"), ("passphrase_file", "passphrase"),
           ("passphrase_fd", "passphrase"), ("credential", "credential"),
           ("key_command", "command"))


def add_secret_options(g, prefix: str = "") -> None:
    """The options of one secret (``prefix`` ``new-`` for the new one)."""
    what = "new " if prefix else ""
    g.add_argument(f"--{prefix}key-file", metavar="PATH",
                   help=f"file holding a {what}key of 32 to 4096 bytes")
    g.add_argument(f"--{prefix}passphrase-file", metavar="PATH",
                   help=f"file holding the {what}passphrase")
    g.add_argument(f"--{prefix}passphrase-fd", metavar="N", type=int,
                   help=f"read the {what}passphrase from file descriptor N")
    g.add_argument(f"--{prefix}credential", metavar="NAME",
                   help=f"the {what}key is the systemd credential "
                   "$CREDENTIALS_DIRECTORY/NAME (LoadCredential[Encrypted]=)")
    g.add_argument(f"--{prefix}key-command", metavar="CMD",
                   help=f"run CMD (split like a shell, no shell) and use what it prints as "
                   f"the {what}key (at least 32 bytes; trailing line feeds dropped)")
    add_pkcs11_options(g, prefix)


def add_pkcs11_options(g, prefix: str = "") -> None:
    g.add_argument(f"--{prefix}pkcs11-module", metavar="SO",
                   help="a PKCS#11 token's module (e.g. /usr/lib/softhsm/libsofthsm2.so); "
                   "its PIN from the passphrase options, a credential or the prompt")
    g.add_argument(f"--{prefix}pkcs11-token", metavar="LABEL",
                   help="the token's label" + (" (default: the slot's)" if not prefix else ""))
    g.add_argument(f"--{prefix}pkcs11-key", metavar="LABEL",
                   help="the AES key's label in the token" + (
                       " (generated there, non-extractable, if missing)" if prefix
                       else " (default: the slot's)"))


def secret_from(args, prefix: str = "", allow_open: bool = False):
    """The Secret the ``prefix`` options name, None if none is given; with
    ``--pkcs11-module`` a token's, the other options (or the prompt) giving
    its PIN."""
    from ..storage.header import Secret
    attr = prefix.replace("-", "_")
    module = getattr(args, attr + "pkcs11_module", None)
    source = _source(args, attr, allow_open)
    if not module:
        return source
    from ..storage.pkcs11 import Token
    pin = source or prompt(f"{prefix}PKCS#11 PIN", False)
    if pin is None:
        raise SecretError("No PIN for the PKCS#11 token: pass it with --passphrase-file, "
                          "--passphrase-fd or --credential (--new-... for a new slot).")
    return Secret("pkcs11", pin.value, pkcs11=Token(
        module, getattr(args, attr + "pkcs11_token", None), getattr(args, attr + "pkcs11_key",
                                                                     None)))


def _source(args, attr: str, allow_open: bool):
    from ..storage.header import Secret
    for name, kind in SOURCES:
        value = getattr(args, attr + name, None)
        if value is None or value is False:
            continue
        if name == "key_file":
            return Secret(kind, keys.read_file(value, "key file", allow_open))
        if name == "passphrase_file":
            raw = keys.read_file(value, "passphrase file", allow_open)
            return Secret(kind, keys.passphrase(raw, f"the file {value}"))
        if name == "passphrase_fd":
            return Secret(kind, keys.passphrase(keys.read_fd(value), f"fd {value}"))
        if name == "credential":
            return Secret(kind, keys.read_credential(value, allow_open))
        return Secret(kind, keys.run_key_command(value))
    return None


def prompt(what: str, confirm: bool, nothing: str = "changed"):
    """A passphrase typed at the terminal (twice with ``confirm``); None
    without a terminal."""
    from ..storage.header import Secret
    if not sys.stdin.isatty():
        return None
    pw = getpass.getpass(f"dcmfs {what}: ").encode()
    if confirm and getpass.getpass("again: ").encode() != pw:
        raise SecretError(f"The passphrases differ; nothing was {nothing}.")
    if len(pw) > keys.MAX_SECRET:
        raise SecretError(f"The passphrase is longer than {keys.MAX_SECRET} bytes, the most "
                          "dcmfs accepts.")
    return Secret("passphrase", keys.passphrase(pw, "the prompt"))


def _secrets(args, new: bool):
    allow = args.allow_open_key_file
    current = secret_from(args, "", allow) or prompt("passphrase of an existing slot", False)
    if current is None:
        raise SecretError("No key given: pass --key-file, --passphrase-file, --passphrase-fd, "
                          "--credential or --key-command (a key that opens an existing slot).")
    if not new:
        return current, None
    fresh = secret_from(args, "new-", allow) or prompt("new passphrase", True)
    if fresh is None:
        raise SecretError("No new key given: pass --new-key-file, --new-passphrase-file, "
                          "--new-passphrase-fd, --new-credential or --new-key-command.")
    return current, fresh


def cmd_key(args) -> int:
    from ..storage import keyring
    from ..storage.header import read_header
    store_root = os.path.abspath(args.store)
    read_header(store_root)
    logsetup.audit_to(store_root)
    if args.key_action == "list":
        rows, epochs = keyring.list_slots(store_root), keyring.list_epochs(store_root)
        if args.json:
            print(json.dumps({"slots": rows, "epochs": epochs}, indent=1))
            return 0
        print(f"{'slot':>4}  {'kind':<10}  {'created':<20}  label")
        for r in rows:
            print(f"{r['id']:>4}  {r['kind']:<10}  {r.get('created') or '-':<20}  {r['label']}")
        print(f"{'epoch':>5}  state")
        for e in epochs:
            when = e.get("destroyed") or e.get("created") or ""
            print(f"{e['epoch']:>5}  {e['state']:<10} {when}".rstrip()
                  + ("  (the master key: index and names" + (
                      "; no file contents any more)" if e["state"] == "retired" else
                      ", and contents written before the next rotation)")
                     if e.get("master") else
                     "  (the store key made with the store)" if e["epoch"] == 0 else ""))
        return 0
    if args.key_action == "rotate":
        return _rotate(args, store_root)
    if args.key_action == "recipient":
        return _recipient(args, store_root)
    current, fresh = _secrets(args, new=args.key_action in ("add", "change"))
    kdf = dataclasses.asdict(Config().kdf)  # what init writes
    report: dict = {}
    with KeyRecord(store_root) as trail:
        if args.key_action == "add":
            slot = keyring.add_slot(store_root, current, fresh, args.label, kdf,
                                    report=report)
            done = f"Added key slot {slot} ({fresh.kind}, {args.label!r}) to {store_root}."
        elif args.key_action == "remove":
            keyring.remove_slot(store_root, current, args.slot, report=report)
            done = f"Removed key slot {args.slot} from {store_root}."
        else:
            keyring.change_slot(store_root, current, args.slot, fresh, args.label, kdf,
                                report=report)
            done = f"Changed key slot {args.slot} of {store_root} ({fresh.kind})."
        trail.record(report)
    print(done)
    return 0


def _rotate(args, store_root: str) -> int:
    from ..storage import keyring
    from .admin import finish_rotation
    current = secret_from(args, "", args.allow_open_key_file) or prompt(
        "passphrase of an existing slot", False)
    if current is None:
        raise SecretError("No key given: pass --key-file, --passphrase-file, --passphrase-fd, "
                          "--credential, --key-command or --pkcs11-module.")
    if not args.finish:
        from .. import format as fmt
        from .admin import _xattr
        report: dict = {}
        with KeyRecord(store_root) as trail:
            mp = trail.mountpoint
            epoch, key = keyring.rotate(store_root, current, in_use=mp is not None,
                                        report=report, lock_held=mp is None)
            if mp is not None:  # the daemon seals new chunks under it at once
                _xattr(mp, fmt.CONTROL_XATTR, f"rekey {epoch} {key.hex()}".encode())
            trail.record(report)
        print(f"Key epoch {epoch} started at {store_root}: new chunks are sealed under it; "
              f"'dcmfs key rotate --finish {store_root}' seals the older ones again.")
        return 0
    report: dict = {}
    result = finish_rotation(store_root, lambda: current, Config(), report=report,
                             wait=args.wait_open)
    with KeyRecord(store_root) as trail:
        trail.record(report)
    gone = ", ".join(map(str, result["destroyed"])) or "none"
    print(f"Sealed {result['chunks']} chunks again under key epoch {result['epoch']}; "
          f"epoch keys destroyed: {gone}.")
    if result.get("open_left"):
        kept = [k for k in result["after"] if int(k) not in (result["epoch"], -1)]
        which = (f"epoch {kept[0]} keeps its key" if len(kept) == 1
                 else f"epochs {', '.join(kept)} keep their keys")
        print(f"{result['open_left']} files stayed open throughout the wait, so {which}: "
              f"run 'dcmfs key rotate --finish {store_root}' again once they are closed.")
    if result.get("generation"):
        print(f"The index, its journal, snapshots and audit trail are sealed under epoch "
              f"{result['epoch']}, the store's master key from now on.")
    return 0


def _recipient(args, store_root: str) -> int:
    """``dcmfs key recipient STORE [--rsa] --export FILE``."""
    from ..storage import keyring
    from ..storage.durable import write_file
    current = _secrets(args, new=False)[0]
    report: dict = {}
    with KeyRecord(store_root) as trail:
        r = keyring.recipient(store_root, current, "rsa-oaep-3072" if args.rsa else None,
                              report=report)
        if report:
            trail.record(report)
    write_file(os.path.abspath(args.export), r.to_json(), mode=0o644)
    print(f"{'Created' if report else 'Exported'} the {r.kind} recipient of {store_root} "
          f"in {args.export} (public: give it to write-only ingest nodes).")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("key", help="key slots: list, add, remove, change (mounted or not)")
    actions = p.add_subparsers(dest="key_action", required=True)
    s = actions.add_parser("list", help="slot ids, kinds, labels and creation dates (no key)")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    for name, helptext in (("add", "add a slot for a new secret"),
                           ("remove", "remove a slot (never the last)"),
                           ("change", "give a slot a new secret")):
        s = actions.add_parser(name, help=helptext)
        s.add_argument("store")
        if name != "add":
            s.add_argument("slot", type=int, help="the slot id ('dcmfs key list')")
        if name != "remove":
            s.add_argument("--label", required=name == "add", default=None,
                           help="a name for the slot, stored in the clear (an admin, a site)")
            g = s.add_argument_group("the new secret (never on the command line itself)")
            add_secret_options(g, "new-")
        g = s.add_argument_group("a key that opens an existing slot")
        add_secret_options(g)
        g.add_argument("--allow-open-key-file", action="store_true",
                       help="accept key or passphrase files group or others may read")
    s = actions.add_parser("recipient", help="create (once) and export the store's public "
                           "recipient key for write-only ingest mounts")
    s.add_argument("store")
    s.add_argument("--export", metavar="FILE", required=True,
                   help="write the recipient (store id, chunk size, public key) there")
    s.add_argument("--rsa", action="store_true",
                   help="an RSA-OAEP-3072 key pair instead of X25519 (when creating)")
    g = s.add_argument_group("a key that opens an existing slot")
    add_secret_options(g)
    g.add_argument("--allow-open-key-file", action="store_true",
                   help="accept key or passphrase files group or others may read")
    s = actions.add_parser("rotate", help="start a new key epoch for new chunks; --finish "
                           "seals the older ones again and destroys unused epoch keys")
    s.add_argument("store")
    s.add_argument("--finish", action="store_true",
                   help="seal every chunk of an older epoch again (unmounted), then destroy "
                   "the keys no chunk uses")
    s.add_argument("--wait-open", type=float, default=None, metavar="SECONDS",
                   help="with --finish on a mounted store: how long to wait for open "
                   "files to be closed before leaving them under their epoch (default 30)")
    g = s.add_argument_group("a key that opens an existing slot")
    add_secret_options(g)
    g.add_argument("--allow-open-key-file", action="store_true",
                   help="accept key or passphrase files group or others may read")
    p.set_defaults(func=cmd_key)
