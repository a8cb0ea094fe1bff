"""Imports point one way: cli -> mount -> fuse_ops -> core -> leaves."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "dcmfs"

#: a module may import only modules of a lower rank
RANK = {
    "errors": 0, "format": 0, "config": 0, "__init__": 0, "logsetup": 0,
    "crypto": 1, "codec": 1, "durable": 1, "instance": 1, "metrics": 1,
    "objectstore": 2, "store": 2, "journal": 2, "dicom": 2,
    "index": 3, "history": 4,
    "filedata": 4, "recovery": 4,
    "fileops": 5, "reencoder": 5, "verify": 4, "scrub": 5, "storeops": 5.5,
    "filesystem": 6,
    "fuse_ops": 7,
    "mount": 8,
    "status": 9, "admin": 9, "fsck": 8, "rebuild": 8, "salvage": 7, "install": 9,
    "cli": 10,
}
LEAVES = {"crypto", "codec"}  # may import errors and nothing else of ours


def own_imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:  # "from . import x": a module, or a name of the package
                out.update(a.name if a.name in RANK else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names if a.name.startswith("dcmfs"))
    return out


def all_imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_has_a_rank():
    assert {p.stem for p in PKG.glob("*.py")} == set(RANK)


def test_imports_point_down():
    bad = []
    for path in PKG.glob("*.py"):
        for target in own_imports(path):
            if RANK[target] >= RANK[path.stem] and target != "__init__":
                bad.append(f"{path.stem} imports {target}")
            if path.stem in LEAVES and target != "errors":
                bad.append(f"leaf {path.stem} imports {target}")
    assert not bad, bad


def test_only_the_adapter_imports_mfusepy_and_only_cli_exits():
    for path in PKG.glob("*.py"):
        if path.stem != "fuse_ops":
            assert "mfusepy" not in all_imports(path), path.stem
        if path.stem != "cli":
            calls = [n for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Attribute) and n.attr == "exit"
                     and isinstance(n.value, ast.Name) and n.value.id == "sys"]
            assert not calls, path.stem
