"""``dcmfs install-systemd``: put the unit template, the mount(8) helper and
an example instance file in place.

The files themselves live in the repository's ``systemd/`` folder, shipped
in the package as ``dcmfs.systemd``; ``@PYTHON@`` becomes the interpreter
that has dcmfs installed (a venv's or the system's), so the units run the
same dcmfs as the command that installed them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from ..storage.durable import write_file

UNIT_DIR = "etc/systemd/system"
SBIN_DIR = "usr/sbin"
CONFIG_DIR = "etc/dcmfs"
#: mount(8) runs /sbin/mount.TYPE: fuse.dcmfs for fstab lines and .mount
#: units, dcmfs for 'mount -t dcmfs'
HELPERS = ("mount.fuse.dcmfs", "mount.dcmfs")

_HELPER = """#!/bin/sh
# mount(8) helper for dcmfs (installed by 'dcmfs install-systemd'):
#   mount.fuse.dcmfs STORE MOUNTPOINT [-o config=/etc/dcmfs/NAME.toml,...]
# returns once the mount answers; the daemon exits by itself at umount.
FUSE_LIBRARY_NAME=fuse3; export FUSE_LIBRARY_NAME
exec {python} -c 'import sys; from dcmfs.cli import mount_helper_main; sys.exit(mount_helper_main())' "$@"
"""


def source(name: str) -> str:
    """A file of ``systemd/``: inside the installed package (``dcmfs/systemd``
    in a wheel) or beside it (a source checkout, an editable install)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dcmfs/
    for folder in (os.path.join(package, "systemd"),
                   os.path.join(os.path.dirname(package), "systemd")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"systemd/{name} is not shipped with this dcmfs")


def unit_text(python: str) -> str:
    with open(source("dcmfs@.service"), encoding="utf-8") as f:
        return f.read().replace("@PYTHON@", python)


def install_systemd(root: str = "/", python: str | None = None, reload: bool = True) -> list[str]:
    """Install below ``root``; returns the paths written.  An existing
    instance example is left alone; units and helpers are replaced."""
    python = python or sys.executable
    done = []
    unit = os.path.join(root, UNIT_DIR, "dcmfs@.service")
    os.makedirs(os.path.dirname(unit), exist_ok=True)
    write_file(unit, unit_text(python).encode(), mode=0o644)
    done.append(unit)
    sbin = os.path.join(root, SBIN_DIR)
    os.makedirs(sbin, exist_ok=True)
    for name in HELPERS:
        path = os.path.join(sbin, name)
        write_file(path, _HELPER.format(python=shlex.quote(python)).encode(), mode=0o755)
        done.append(path)
    conf = os.path.join(root, CONFIG_DIR)
    os.makedirs(conf, mode=0o700, exist_ok=True)
    example = os.path.join(conf, "example.toml.sample")
    if not os.path.exists(example):
        with open(source("example.toml"), "rb") as f:
            text = f.read()
        write_file(example, text, mode=0o600)
        done.append(example)
    if reload and os.path.abspath(root) == "/" and os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return done
