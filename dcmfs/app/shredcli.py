"""``dcmfs shred STORE``: a shred pass now (crypto-shredding, docs/cli.md
"shred"; the pass is :mod:`dcmfs.opened.shred`): by the daemon of a mounted
store (through its control attribute), else here with the key.  Afterwards
the objects of every file deleted before it - and any copy of them kept
elsewhere - cannot be opened with the store's key and what the store holds.

The report says how many deletions were shredded, the snapshot the store
keeps, and how long the pass took; never a name.  ``dcmfs status`` shows
what is pending (without the key).
"""

from __future__ import annotations

import json
import time

from .. import format as fmt
from ..errors import StoreIOError
from . import options


def add_parser(sub, cli) -> None:
    s = sub.add_parser("shred", help="remove the secrets of deleted files from the index, its "
                       "snapshots and its journal now (mounted or not): their objects cannot "
                       "be opened with the key any more")
    s.add_argument("store", nargs="?", default=cli.default_store())
    s.add_argument("--json", action="store_true")
    cli._add_o(s, options.FSCK, "options when not mounted (those of fsck)")
    cli._add_secret_options(s)
    s.set_defaults(func=cmd_shred)


def cmd_shred(args) -> int:
    from . import cli
    config = cli._command_config(args, options.FSCK)
    store_root = cli._store_arg(args)
    result = shred_store(store_root, cli._lazy_secret(args, store_root), config)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"Shredded {store_root}: {result['deletions']} deleted files' secrets removed "
              f"from the index, its snapshots and its journal (snapshot {result['seq']}, "
              f"{result['seconds']:.1f} s).")
    return 0


def shred_store(store_root: str, secret, config) -> dict:
    """One shred pass on the store at ``store_root``; returns the pass's
    figures (``deletions``, ``seq``, ``seconds``)."""
    from .admin import _xattr, mountpoint_of
    mp = mountpoint_of(store_root)
    if mp is not None:
        before = json.loads(_xattr(mp, fmt.STATUS_XATTR)).get("shred") or {}
        started = time.monotonic()
        _xattr(mp, fmt.CONTROL_XATTR, b"shred")  # runs the pass before it answers
        after = json.loads(_xattr(mp, fmt.STATUS_XATTR)).get("shred") or {}
        if after.get("pending"):
            raise StoreIOError(f"The dcmfs daemon at {mp} did not finish the shred pass; "
                               "see its log, then run the command again.")
        return {"deletions": before.get("pending", 0), "seq": after.get("last_pass_seq"),
                "seconds": round(time.monotonic() - started, 3), "mounted": True}
    from ..core.filesystem import FileSystem
    from ..opened.store import OpenedStore
    fs = FileSystem(OpenedStore.open(store_root, secret(), config, for_writing=True))
    try:
        return {**fs.shred_now(), "mounted": False}
    finally:
        fs.close()
