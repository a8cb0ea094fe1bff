"""Command line: ``dcmfs`` and the mount(8) helper ``mount.dcmfs``.

The contract (commands, options, exit codes, how secrets are passed) is
written down in ``docs/cli.md``.  This is the only place that exits the
process or prints for a user.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from .. import __version__
from ..config import Config
from ..errors import DcmfsError, SecretError, UsageError, WrongKeyError
from . import keycli, keys, options, s3creds, shredcli
from .options import make_config, parse_o

log = logging.getLogger("dcmfs")

EXIT_USAGE = 2


# --- default places (XDG base directories) ---------------------------------------
def default_store() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "dcmfs", "store")


def default_key_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "dcmfs", "key")


def default_mountpoint() -> str:
    return os.path.expanduser("~/dcmfs")


# --- secrets ------------------------------------------------------------------------
def _add_secret_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("key (never given on the command line itself)")
    g.add_argument("--key-file", metavar="PATH",
                   help="file holding a 32-byte key (init creates it, mode 0600, if missing)")
    g.add_argument("--passphrase-file", metavar="PATH", help="file holding the passphrase")
    g.add_argument("--passphrase-fd", metavar="N", type=int,
                   help="read the passphrase from file descriptor N")
    g.add_argument("--credential", metavar="NAME", help="the key is the systemd credential "
                   "$CREDENTIALS_DIRECTORY/NAME (LoadCredential[Encrypted]=)")
    g.add_argument("--key-command", metavar="CMD", help="run CMD (split like a shell, no "
                   "shell) and use what it prints as the key (a key-command slot)")
    keycli.add_pkcs11_options(g)
    g.add_argument("--allow-open-key-file", action="store_true",
                   help="accept a key or passphrase file that group or others may read "
                   "(with a warning)")
    p.add_argument("--accept-rollback", action="store_true",
                   help="open the store even if it is older than this machine's witness of "
                   "it (a restored backup); logged")
    s3creds.add_options(p)  # every command that opens a store may open an S3 store


def _secret(args, creating: bool, store_kinds: set | None = None):
    """The key the command line names (docs/cli.md, "Secrets"; the rules are
    in :mod:`dcmfs.app.keys`); ``store_kinds``: the kinds of the store's key
    slots."""
    from ..storage.header import Secret
    from .keycli import secret_from
    allow_open = getattr(args, "allow_open_key_file", False)
    if (getattr(args, "credential", None) or getattr(args, "key_command", None)
            or getattr(args, "pkcs11_module", None)):
        return secret_from(args, "", allow_open)
    if args.key_file:
        if creating and not os.path.exists(args.key_file):
            keys.create_key_file(args.key_file)
        return Secret("keyfile", keys.read_file(args.key_file, "key file", allow_open))
    if args.passphrase_file:
        raw = keys.read_file(args.passphrase_file, "passphrase file", allow_open)
        return Secret("passphrase", keys.passphrase(raw, f"the file {args.passphrase_file}"))
    if args.passphrase_fd is not None:
        raw = keys.read_fd(args.passphrase_fd)
        return Secret("passphrase", keys.passphrase(raw, f"fd {args.passphrase_fd}"))
    if "keyfile" in (store_kinds or ()) and os.path.exists(default_key_file()):
        return Secret("keyfile", keys.read_file(default_key_file(), "key file", allow_open))
    typed = keycli.prompt("passphrase", creating, "created")
    if typed is not None:
        return typed
    raise SecretError("No key given: pass --key-file, --passphrase-file or --passphrase-fd.")


# --- options -------------------------------------------------------------------------
def _key_options(args, ours: dict) -> None:
    """``-o key_file=``/``passphrase_file=`` where no --key-file or
    --passphrase-file was given; ``--accept-rollback`` as its ``-o``."""
    for k in ("key_file", "passphrase_file"):
        if ours.get(k) and not getattr(args, k):
            setattr(args, k, ours[k])
    if getattr(args, "accept_rollback", False):
        ours["accept_rollback"] = "1"


def _command_config(args, command: str) -> Config:
    """The ``-o`` of an admin command: its key options and its Config."""
    ours, fuse = parse_o(args.o, command)
    _key_options(args, ours)
    return dataclasses.replace(make_config(ours, fuse, command), s3=s3creds.settings(args))


# --- commands ---------------------------------------------------------------------------
def _instance_secret(inst, args, creating: bool = False):
    from .instance import read_key
    from ..storage.header import Secret
    kind, value = read_key(inst, creating=creating,
                           allow_open=getattr(args, "allow_open_key_file", False))
    return Secret(kind, value)


def cmd_init(args) -> int:
    from ..storage.header import init_store
    if args.config:
        from .instance import load
        inst = load(args.config)
        store_root = args.store or inst.store
        config = Config(codec=args.codec or inst.codec)
        given = args.key_file or args.passphrase_file or args.passphrase_fd is not None
        secret = (_secret(args, creating=True) if given
                  else _instance_secret(inst, args, creating=True))
    else:
        store_root = args.store or default_store()
        config = Config(codec=args.codec or "zstd")
        secret = _secret(args, creating=True)
    if args.backend:
        from ..storage.s3 import parse_url
        parse_url(args.backend)
        creds = s3creds.settings(args)
    store = init_store(store_root, secret, config, backend=args.backend or "")
    if args.backend:
        from ..opened.remote import publish_header
        try:
            publish_header(store.root, args.backend, creds)
        except BaseException:
            import shutil  # nothing half-made stays behind
            shutil.rmtree(store.root, ignore_errors=True)
            raise
    where = f", objects in {args.backend}" if args.backend else ""
    print(f"Created a dcmfs store at {store.root} (codec {store.codec}{where}).")
    return 0


def cmd_mount(args) -> int:
    from .mount import mount
    from ..storage.header import read_header
    from ..storage.slots import kinds
    ours, _ = parse_o(args.o)
    inst = None
    config_path = args.config or ours.get("config")
    if config_path:
        from .instance import load
        inst = load(config_path)
    # the instance file's options first, the command line's after (they win)
    ours, fuse = parse_o(([",".join(inst.options)] if inst else []) + (args.o or []))
    if ours.get("recipient"):  # write-only: no key at all
        from .ingestmount import cmd_ingest
        return cmd_ingest(args, ours, fuse, inst)
    _key_options(args, ours)
    store_root = os.path.abspath(args.store or (inst.store if inst else default_store()))
    mp = os.path.abspath(args.mountpoint or (inst.mountpoint if inst else default_mountpoint()))
    header = read_header(store_root)
    from .logsetup import audit_to
    audit_to(store_root)
    if inst is not None and not (args.key_file or args.passphrase_file
                                 or args.passphrase_fd is not None):
        secret = _instance_secret(inst, args)
    else:
        secret = _secret(args, creating=False, store_kinds=kinds(header))
    if inst is not None:
        log.debug("instance %s: store %s, mountpoint %s, key from %s", inst.name, store_root, mp,
                  inst.key_source)
    metrics = ours.get("metrics") or (inst.metrics if inst else None)
    if metrics:
        from ..adapter.metrics import parse_address
        try:
            parse_address(metrics)
        except ValueError as exc:
            raise UsageError(f"The metrics option needs HOST:PORT, e.g. 127.0.0.1:9641 "
                             f"({exc}).") from exc
    config = dataclasses.replace(make_config(ours, fuse), s3=s3creds.settings(args))
    from .viewmount import view_settings
    config, fuse, view, view_mount = view_settings(args, ours, config, fuse, secret)
    mount(store_root, secret, mp, config, fuse, foreground=args.foreground,
          log_file=ours.get("log_file"), metrics=metrics, view_secret=view,
          view_mount=view_mount)
    if not args.foreground:
        print(f"Mounted {store_root} at {mp}. Unmount with: dcmfs umount {mp}")
    return 0


def cmd_new_view_secret(args) -> int:
    if os.path.exists(args.path):
        raise UsageError(f"{args.path} exists; a view secret is never overwritten (another "
                         "secret gives other pseudonyms).")
    keys.create_key_file(args.path)
    print(f"Created {args.path} (keep it: the same secret gives the same pseudonyms).")
    return 0


def cmd_umount(args) -> int:
    from .mount import umount
    umount(args.mountpoint, timeout=args.timeout)
    print(f"Unmounted {os.path.abspath(args.mountpoint)}.")
    return 0


def cmd_status(args) -> int:
    from .status import collect, render
    reports = collect(args.target)
    if args.json:
        print(json.dumps(reports if args.target is None else reports[0], indent=1))
    else:
        print(render(reports))
    return 0


def _store_arg(args) -> str:
    """The STORE argument, made absolute, with a clear error for a missing or
    foreign store before anything else happens."""
    from ..storage.header import read_header
    from .logsetup import audit_to
    store_root = os.path.abspath(args.store)
    read_header(store_root)
    audit_to(store_root)
    return store_root


def _lazy_secret(args, store_root: str):
    """The key, asked for only when the store is not mounted (a running
    daemon already holds it)."""
    from ..storage.header import read_header
    from ..storage.slots import kinds

    def get():
        header = read_header(store_root)
        return _secret(args, creating=False, store_kinds=kinds(header))
    return get


def cmd_recompress(args) -> int:
    from .admin import recompress
    config = _command_config(args, options.RECOMPRESS)
    store_root = _store_arg(args)
    status = recompress(store_root, _lazy_secret(args, store_root), config,
                        retry_failed=args.retry_failed)
    ratio = status["stored_bytes"] / status["logical_bytes"] if status["logical_bytes"] else 0
    print(f"Re-encoded {store_root}: {status['files']} files, stored/original {ratio:.3f}.")
    return 0


def cmd_stats(args) -> int:
    from .admin import content_stats, render_stats
    config = _command_config(args, options.STATS)
    store_root = _store_arg(args)
    stats = content_stats(store_root, _lazy_secret(args, store_root), config)
    print(json.dumps(stats, indent=1) if args.json else render_stats(stats))
    return 0


def cmd_install_systemd(args) -> int:
    from .install import install_systemd
    for path in install_systemd(args.root, python=args.python, reload=not args.no_reload):
        print(f"installed {path}")
    return 0


def _fraction(text: str) -> float:
    value = float(text.rstrip("%")) / 100
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("give a percentage between 0 and 100")
    return value


def cmd_verify(args) -> int:
    from .admin import render_verify, verify
    from ..errors import DamageFound
    config = _command_config(args, options.VERIFY)
    store_root = _store_arg(args)
    report = verify(store_root, _lazy_secret(args, store_root), config, args.paths,
                    args.sample)
    print(json.dumps(report, indent=1) if args.json else render_verify(report))
    return DamageFound.exit_code if report.get("findings") or report.get("missing_paths") else 0


def cmd_fsck(args) -> int:
    from .admin import fsck, render_fsck
    from ..errors import DamageFound
    config = _command_config(args, options.FSCK)
    store_root = _store_arg(args)
    result = fsck(store_root, _lazy_secret(args, store_root), config, args.repair,
                  args.rebuild_index)
    print(json.dumps(result, indent=1) if args.json else render_fsck(result))
    return 0 if result["clean"] else DamageFound.exit_code


def cmd_attach(args) -> int:
    from .attach import attach, render_attach
    from ..errors import DamageFound
    from ..storage.s3 import parse_url
    parse_url(args.url)
    config = _command_config(args, options.FSCK)
    result = attach(args.url, args.store, _lazy_secret(args, args.store), config,
                    follower=args.follower)
    print(render_attach(result))
    return 0 if result["clean"] else DamageFound.exit_code


def cmd_audit(args) -> int:
    from . import audit
    from ..errors import DamageFound
    words = args.words
    if words[0] == "verify" and len(words) == 2:
        store_root = os.path.abspath(words[1])
        _store_arg(argparse.Namespace(store=store_root))
        report = audit.verify(store_root, _lazy_secret(args, store_root))
        print(json.dumps(report, indent=1) if args.json else audit.render_verify(report))
        return 0 if report["intact"] else DamageFound.exit_code
    if len(words) != 1:
        raise UsageError("Give one store: 'dcmfs audit STORE' or 'dcmfs audit verify STORE'.")
    store_root = _store_arg(argparse.Namespace(store=words[0]))
    problems: list[str] = []
    try:
        for rec in audit.records(store_root, _lazy_secret(args, store_root), args.since,
                                 args.until, args.path, args.uid, args.event, problems):
            print(json.dumps(rec, separators=(",", ":")) if args.json else audit.render(rec))
    except BrokenPipeError:  # | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    for problem in problems:
        print(f"dcmfs: the audit trail is broken: {problem}; run 'dcmfs audit verify "
              f"{store_root}'", file=sys.stderr)
    return DamageFound.exit_code if problems else 0


def _add_o(p: argparse.ArgumentParser, where: str, what: str) -> None:
    """``-o OPTS`` with the options ``where`` takes listed after the help."""
    p.add_argument("-o", action="append", metavar="OPTS", help=f"{what}, comma separated "
                   "(listed below)")
    p.epilog = options.help_text(where)
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcmfs", description="Transparent encrypted, compressing "
                                "filesystem for medical images.")
    p.add_argument("--version", action="version", version=f"dcmfs {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a new store")
    s.add_argument("store", nargs="?")
    s.add_argument("--codec", choices=("zstd", "lzma", "none"))
    s.add_argument("--config", metavar="TOML", help="an instance file (/etc/dcmfs/NAME.toml): "
                   "store, codec and key source from there")
    s.add_argument("--backend", metavar="s3://BUCKET/PREFIX",
                   help="keep the objects in this bucket (STORE keeps the index and a cache)")
    _add_secret_options(s)
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("mount", help="mount a store")
    s.add_argument("store", nargs="?")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    s.add_argument("--config", metavar="TOML", help="an instance file (/etc/dcmfs/NAME.toml): "
                   "store, mountpoint, options and key source from there")
    s.add_argument("--view", choices=["deid"], help="serve a read-only, de-identified research "
                   "view of the DICOM files instead (as -o view=deid)")
    s.add_argument("--view-secret-file", metavar="PATH", help="the view's secret (a private "
                   "file of 16 to 4096 bytes; 'dcmfs new-view-secret PATH' makes one)")
    _add_o(s, options.MOUNT, "mount options")
    _add_secret_options(s)
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("new-view-secret", help="create a secret for the de-identified view "
                       "(32 random bytes, mode 0600)")
    s.add_argument("path")
    s.set_defaults(func=cmd_new_view_secret)

    s = sub.add_parser("umount", help="flush, unmount and wait for the daemon")
    s.add_argument("mountpoint", nargs="?", default=default_mountpoint())
    s.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("recompress", help="run the background re-encoder to completion now "
                       "(DICOM-aware codec; mounted or not)")
    s.add_argument("store", nargs="?", default=default_store())
    _add_o(s, options.RECOMPRESS, "store options when not mounted")
    s.add_argument("--retry-failed", action="store_true",
                   help="also try again the files whose analysis failed (analysis limit, "
                   "analysis crashed, unreadable); they are never retried otherwise")
    _add_secret_options(s)
    s.set_defaults(func=cmd_recompress)

    s = sub.add_parser("stats", help="files, sizes, ratio and codec by modality and transfer "
                       "syntax (mounted or not)")
    s.add_argument("store", nargs="?", default=default_store())
    s.add_argument("--json", action="store_true")
    _add_o(s, options.STATS, "options when not mounted")
    _add_secret_options(s)
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("verify", help="authenticate and decode every chunk, compare every "
                       "file's SHA-256 (mounted or not); exit 0 only when all is intact")
    s.add_argument("store", nargs="?", default=default_store())
    s.add_argument("paths", nargs="*", metavar="PATH",
                   help="only these files or directories (paths under the mountpoint, or "
                   "inside the store)")
    s.add_argument("--sample", type=_fraction, metavar="N%",
                   help="verify a random N%% of the files (a quick spot check)")
    s.add_argument("--json", action="store_true", help="a machine-readable report")
    _add_o(s, options.VERIFY, "options when not mounted")
    _add_secret_options(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("fsck", help="check the index against itself and the objects "
                       "(unmounted); --repair mends, --rebuild-index rebuilds the index")
    s.add_argument("store", nargs="?", default=default_store())
    s.add_argument("--repair", action="store_true",
                   help="repair what is found (never deletes data it cannot prove is "
                   "garbage: damaged files go to /lost+found), then check again")
    s.add_argument("--rebuild-index", action="store_true",
                   help="move the index aside and rebuild it from the sealed snapshots, "
                   "the journals and the objects, then repair")
    s.add_argument("--json", action="store_true")
    _add_o(s, options.FSCK, "options")
    _add_secret_options(s)
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("attach", help="a working store in an empty directory from an S3 "
                       "bucket alone (with the key)")
    s.add_argument("url", metavar="s3://BUCKET/PREFIX")
    s.add_argument("store")
    s.add_argument("--follower", action="store_true", help="for a read-only follower (-o "
                   "ro,follow=S): the newest snapshot only, no rebuild, no lease")
    _add_o(s, options.FSCK, "options")
    _add_secret_options(s)
    s.set_defaults(func=cmd_attach)
    s = sub.add_parser("audit", help="who opened, wrote, renamed and deleted which file "
                       "(the sealed audit trail; mounted or not); 'audit verify STORE' "
                       "checks the chain")
    s.add_argument("words", nargs="+", metavar="STORE", help="STORE, or: verify STORE")
    s.add_argument("--since", metavar="T", help="from T on (ISO 8601, UTC unless it says; or "
                   "a duration ago: 90s, 30m, 12h, 7d)")
    s.add_argument("--until", metavar="T", help="up to T (as --since)")
    s.add_argument("--path", metavar="GLOB", help="records whose path (or new path) matches")
    s.add_argument("--uid", type=int, help="records of this caller uid")
    s.add_argument("--event", help="records of this event (open, create, write-close, "
                   "rename, unlink, ...)")
    s.add_argument("--json", action="store_true", help="one JSON object per line (SIEM)")
    _add_secret_options(s)
    s.set_defaults(func=cmd_audit)
    keycli.add_parser(sub)
    shredcli.add_parser(sub, sys.modules[__name__])

    s = sub.add_parser("status", help="mounts, daemon figures, sizes and ratio")
    s.add_argument("target", nargs="?", help="a mountpoint or a store (default: every mount)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("install-systemd", help="install dcmfs@.service and the mount.dcmfs "
                       "helper (see systemd/README.md)")
    s.add_argument("--root", default="/", help="install below this directory (default /)")
    s.add_argument("--python", help="interpreter the units run (default: this one)")
    s.add_argument("--no-reload", action="store_true", help="skip 'systemctl daemon-reload'")
    s.set_defaults(func=cmd_install_systemd)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import logsetup
    args = build_parser().parse_args(argv)
    logsetup.setup(args.verbose)
    keys.forbid_core_dumps()  # every command may hold a key
    try:
        return args.func(args)
    except DcmfsError as exc:
        if isinstance(exc, WrongKeyError) and exc.store_root:
            from ..audit.trail import note_failed_unlock
            note_failed_unlock(exc.store_root, args.func.__name__.removeprefix("cmd_"))
        # under systemd the journal shows this line with its priority
        prefix = "<3>" if logsetup.stderr_is_journal() else ""
        print(f"{prefix}dcmfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def mount_helper_main(argv: list[str] | None = None) -> int:
    """``mount.dcmfs SOURCE MOUNTPOINT [-o OPTS] [-n] [-s] [-f] [-v]`` for mount(8)."""
    p = argparse.ArgumentParser(prog="mount.dcmfs")
    p.add_argument("store")
    p.add_argument("mountpoint")
    _add_o(p, options.HELPER, "mount options")
    for flag in ("-n", "-s", "-f", "-v"):
        p.add_argument(flag, action="store_true")
    args = p.parse_args(argv)
    if args.f:  # mount(8)'s "fake": do everything but the mount
        return 0
    # mount(8) gives SOURCE and MOUNTPOINT; config= (an instance file) adds the
    # key source and options; -n/-s mean nothing to dcmfs (no mtab, no sloppiness)
    argv2 = (["-v"] if args.v else []) + ["mount", args.store, args.mountpoint]
    argv2 += sum((["-o", o] for o in args.o or []), [])
    return main(argv2)


if __name__ == "__main__":
    sys.exit(main())
