"""The -o options, declared once in dcmfs.app.options: docs/cli.md's tables
say the same, --help lists them, the CLI and instance files parse them."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import pytest

from dcmfs.app import instance, options
from dcmfs.app.options import make_config, parse_o
from dcmfs.config import Config
from dcmfs.errors import UsageError

CLI_MD = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _table_after(heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after the line ``heading``."""
    lines = CLI_MD.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows[1:]  # without the header


def _names(cell: str) -> set[str]:
    """`zstd_level=N`, `key_file=`, `x-*` -> zstd_level, key_file, x-* (not what is in
    parentheses: a remark)"""
    cell = re.sub(r"\([^)]*\)", "", cell)
    return {token.split("=")[0] for token in re.findall(r"`([^`]+)`", cell)}


def test_the_option_table_of_mount_is_the_declaration():
    rows = _table_after("Options (`-o`")
    documented: dict[str, str] = {}
    for first, meaning in rows:
        for name in _names(first):
            assert name not in documented, f"{name} is in the table twice"
            documented[name] = meaning.replace("`", "")
    declared = {o.name: o for o in options.accepted(options.MOUNT)}
    assert set(documented) - set(declared) == set(), "documented but not declared"
    assert set(declared) - set(documented) == set(), "declared but not documented"
    for name, opt in declared.items():
        if opt.default is not None and opt.kind.sort == options.DCMFS:
            shown = opt.kind.show(opt.default)
            assert f"default {shown}" in documented[name] \
                or f"{shown} (default)" in documented[name], (name, shown, documented[name])


def test_the_option_table_of_the_other_commands_is_the_declaration():
    rows = {_names(command).pop(): _names(opts)
            for command, opts in _table_after("`recompress`, `stats`, `verify` and `fsck`")}
    for command in options.COMMANDS[1:]:
        assert rows.get(command) == {o.name for o in options.accepted(command)}, command
    assert set(rows) == set(options.COMMANDS[1:])
    synopsis = CLI_MD.read_text().split("```")[1]
    for command in options.COMMANDS:
        line = next(x for x in synopsis.splitlines() if x.startswith(f"dcmfs {command} "))
        assert "[-o OPTS]" in line, line


def test_declarations_are_sound():
    fields = {f.name for f in dataclasses.fields(Config)}
    names = [o.name for o in options.OPTIONS]
    assert len(names) == len(set(names))
    for opt in options.OPTIONS:
        assert opt.field is None or opt.field in fields, opt.name
        assert opt.where and opt.where <= {*options.COMMANDS, options.HELPER, options.INSTANCE}
        assert opt.help
        if opt.field:
            assert opt.default == getattr(Config(), opt.field)
            if opt.kind.sort == options.DCMFS:  # the default passes its own checks
                text = opt.kind.show(opt.default)
                value = opt.parse(text if text != "off" else "0")
                assert opt.kind.show(value) == text, opt.name
    # mount.dcmfs runs 'dcmfs mount': it cannot take what mount does not
    assert {o.name for o in options.accepted(options.HELPER)} <= \
        {o.name for o in options.accepted(options.MOUNT)}


@pytest.mark.parametrize("command", options.COMMANDS)
def test_help_lists_the_options_of_each_command(command, capsys):
    from dcmfs.app.cli import main
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for opt in options.accepted(command):
        assert (opt.usage if opt.kind.sort != options.FSTAB else opt.name) in out, opt.name
    others = {o.name for o in options.OPTIONS} - {o.name for o in options.accepted(command)}
    for name in others:
        assert f"  {name}=" not in out, name


def test_values_parse_and_go_into_config():
    ours, fuse = parse_o(["zstd_level=-3,reencode=0,dicom=1,scrub_interval=7d",
                          "scrub_rate=1.5,checkpoint_interval=0.2,reencode_threads=64,ro"])
    c = make_config(ours, fuse)
    assert (c.zstd_level, c.reencode, c.dicom, c.scrub_interval, c.scrub_rate,
            c.checkpoint_interval, c.reencode_threads, c.read_only) == \
        (-3, False, True, 7 * 86400, 1_500_000, 0.2, 64, True)
    assert make_config(*parse_o(["zstd_level=,dicom"])) == Config()  # empty: the default
    assert make_config({}, {}) == Config()
    later = make_config(*parse_o(["zstd_level=3", "zstd_level=5"]))
    assert later.zstd_level == 5  # the last one wins (the command line after the file)


@pytest.mark.parametrize("item, detail", [
    ("zstd_level=x", "zstd_level takes an integer, not 'x'"),
    ("zstd_level=23", "zstd_level must be <= 22"),
    ("reencode=2", "reencode takes 0 or 1, not '2'"),
    ("dicom=yes", "dicom takes 0 or 1"),
    ("reencode_threads=0", "reencode_threads must be 1..64"),
    ("checkpoint_interval=-1", "checkpoint_interval takes seconds"),
    ("scrub_interval=7w", "scrub_interval takes a duration"),
    ("scrub_interval=inf", "scrub_interval takes a duration"),
    ("scrub_rate=0", "scrub_rate takes MB/s"),
    ("image_codecs=zstd", "image_codecs takes some of"),
    ("metrics=9641", "metrics takes HOST:PORT"),
])
def test_a_bad_value_is_a_usage_error(item, detail):
    with pytest.raises(UsageError) as e:
        make_config(*parse_o([item]))
    assert str(e.value).startswith(f"A -o option has a bad value ({detail}")
    assert str(e.value).endswith("; see 'dcmfs mount --help'.")
    assert e.value.exit_code == 2


def test_each_command_takes_only_its_options():
    # a mount passes what it does not know to libfuse, and ignores fstab options
    assert parse_o(["max_read=131072,_netdev,comment=systemd.x,x-mount.mkdir"]) == \
        ({}, {"max_read": "131072"})
    assert make_config(*parse_o(["zstd_level=3"], "fsck"), "fsck").zstd_level == 3
    for command, item in (("stats", "zstd_level=3"), ("verify", "ro"), ("fsck", "dicom=0"),
                          ("recompress", "scrub_interval=1d"), ("verify", "max_read=4096"),
                          ("stats", "_netdev")):
        with pytest.raises(UsageError, match=f"'dcmfs {command}' takes no -o option"):
            parse_o([item], command)
    with pytest.raises(UsageError, match=r"see 'dcmfs fsck --help'"):
        make_config(*parse_o(["zstd_level=high"], "fsck"), "fsck")


def test_instance_options_use_the_declared_types(tmp_path):
    p = tmp_path / "pacs.toml"
    p.write_text('store = "/s"\nmountpoint = "/m"\n[options]\ndicom = false\nreencode = true\n'
                 'allow_other = true\nnonempty = false\nzstd_level = 3\nscrub_interval = "7d"\n'
                 '[key]\nfile = "/k"\n')
    inst = instance.load(str(p))
    assert inst.options == ("dicom=0", "reencode=1", "allow_other", "zstd_level=3",
                            "scrub_interval=7d")
    c = make_config(*parse_o([",".join(inst.options)]))
    assert (c.dicom, c.reencode, c.zstd_level, c.scrub_interval) == (False, True, 3, 7 * 86400)
    p.write_text('store = "/s"\nmountpoint = "/m"\n[options]\nconfig = "/etc/dcmfs/x.toml"\n'
                 '[key]\nfile = "/k"\n')
    with pytest.raises(UsageError, match="config does not belong in an instance file"):
        instance.load(str(p))


# --- through the command line: stats, verify, fsck and recompress take -o ------------------------
def test_admin_commands_take_their_options(tmp_path):
    from .conftest import Mount
    m = Mount(tmp_path)
    m.init()
    (tmp_path / "xdg").mkdir()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}  # no default key file
    # recompress opens the store for writing first (a new store has no index yet)
    for args in (("recompress", m.store, "-o", "dicom=0"), ("stats", m.store),
                 ("verify", m.store), ("fsck", m.store, "-o", "zstd_level=9")):
        r = m.cli(*args, "-o", f"key_file={m.key}", env=env)
        assert r.returncode == 0, (args, r.stderr)
    r = m.cli("stats", m.store, env=env)  # the key came from -o above
    assert r.returncode == 16, r.stderr
    for args, says in ((("stats", m.store, "-o", "zstd_level=3"), "takes no -o option"),
                       (("verify", m.store, "-o", "key_file=/k,dicom=0"), "takes no -o option"),
                       (("fsck", m.store, "-o", "zstd_level=x"), "see 'dcmfs fsck --help'"),
                       (("recompress", m.store, "-o", "reencode_threads=0"), "1..64")):
        r = m.cli(*args, "--key-file", m.key)
        assert r.returncode == UsageError.exit_code == 2, (args, r.stderr)
        assert says in r.stderr and r.stderr.count("\n") == 1, r.stderr
