"""Imports point one way, layer by layer (README, "Layout"):

    app -> adapter -> core -> integrity -> opened -> audit -> index -> sandbox -> storage -> base

A module may import modules of its own layer and of the layers below it,
never above; a few pairs are forbidden outright (the leaves, and integrity
apart from the filesystem core and FUSE).
"""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "dcmfs"

#: lowest first; "base" is the package's top-level modules (usable everywhere)
LAYERS = ["base", "storage", "sandbox", "index", "audit", "opened", "integrity", "core", "adapter",
          "app"]
#: top-level modules that are not base: the ``python -m dcmfs.cli`` entry point
TOP_LEVEL_APP = {"cli"}
#: (importer, imported) pairs that are forbidden even where the ranks allow
#: them; a name is a layer or a dotted module path below dcmfs
FORBIDDEN = [
    ("integrity", "core"),            # fsck, verify, rebuild work without the core
    ("integrity", "adapter"),         # ... and without FUSE
    ("opened", "integrity"),
]
#: leaves: may import nothing of ours but these
LEAVES = {"storage.crypto": {"errors"}, "storage.codec": {"errors"},
          "storage.dicom": {"errors", "storage.codec"}, "storage.durable": {"errors"}}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts)


def layer_of(module: str) -> str:
    first = module.split(".")[0]
    if (PKG / first).is_dir():
        return first
    return "app" if first in TOP_LEVEL_APP else "base"


def own_imports(path: pathlib.Path) -> set[str]:
    """Modules of ours that ``path`` imports, as dotted names below dcmfs."""
    me = module_name(path).split(".")
    package = me[:-1] if path.name != "__init__.py" else me[:-1]
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            mod = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                candidate = mod + [alias.name]
                if (PKG.joinpath(*candidate).with_suffix(".py").exists()
                        or PKG.joinpath(*candidate, "__init__.py").exists()):
                    out.add(".".join(candidate))
                else:
                    out.add(".".join(mod) or "__init__")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("dcmfs."):
            out.add(node.module[len("dcmfs."):])
        elif isinstance(node, ast.Import):
            out.update(a.name[len("dcmfs."):] for a in node.names
                       if a.name.startswith("dcmfs."))
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


def modules() -> list[pathlib.Path]:
    return sorted(PKG.rglob("*.py"))


def _matches(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".") or layer_of(module) == name


def test_every_package_is_shipped():
    """A wheel (the systemd test installs one) has every subpackage."""
    import tomllib
    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"dcmfs"} | {f"dcmfs.{p.parent.name}" for p in PKG.glob("*/__init__.py")}
    assert found <= listed, found - listed


def test_every_package_is_a_layer():
    for path in modules():
        assert layer_of(module_name(path)) in LAYERS, path


def test_imports_point_down():
    bad = []
    rank = {name: i for i, name in enumerate(LAYERS)}
    for path in modules():
        me = module_name(path)
        for target in own_imports(path):
            if target.endswith("__init__") or target == "":
                continue
            if rank[layer_of(target)] > rank[layer_of(me)]:
                bad.append(f"{me} ({layer_of(me)}) imports {target} ({layer_of(target)})")
            for importer, imported in FORBIDDEN:
                if _matches(me, importer) and _matches(target, imported):
                    bad.append(f"{me} imports {target}: {importer} must not import {imported}")
            if me in LEAVES and target not in LEAVES[me]:
                bad.append(f"leaf {me} imports {target}")
    assert not bad, bad


def test_the_rule_sees_imports():
    """The walk finds the imports it checks (a rule that sees nothing passes)."""
    found = own_imports(PKG / "core" / "filesystem.py")
    assert {"errors", "storage.codec", "core.handles"} <= found, found
    assert "storage.objects" in own_imports(PKG / "integrity" / "fsck.py")


def test_modules_stay_readable():
    """No module over ~500 lines (split before it grows past that)."""
    long = {module_name(p): n for p in modules()
            if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long


def test_background_jobs_use_no_private_attributes_of_their_host():
    """The re-encoder, the scrubber and the verifier see their store through
    :class:`dcmfs.opened.jobs.JobHost` only: no ``host._x`` (or ``fs._x``)."""
    bad = []
    for rel in ("core/reencoder.py", "core/scrub.py", "core/extents.py", "integrity/verify.py"):
        for node in ast.walk(ast.parse((PKG / rel).read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    if base.attr in ("host", "fs"):
                        bad.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
                    base = base.value
                if isinstance(base, ast.Name) and base.id in ("host", "fs"):
                    bad.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not bad, bad


def test_only_the_adapter_imports_mfusepy_and_only_cli_exits():
    for path in modules():
        me = module_name(path)
        if me != "adapter.fuse_ops":
            assert "mfusepy" not in all_imports(path), me
        if me not in ("app.cli", "cli", "sandbox.worker"):  # the entry points
            calls = [n for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Attribute) and n.attr == "exit"
                     and isinstance(n.value, ast.Name) and n.value.id == "sys"]
            assert not calls, me


def test_every_package_is_installed():
    """A non-editable install (pip, the systemd test's container) ships only
    the packages pyproject.toml lists: dcmfs.sandbox was missing, so an
    installed 'dcmfs mount' died with ModuleNotFoundError."""
    import tomllib
    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    packages = {"dcmfs." + ".".join(p.parent.relative_to(PKG).parts)
                for p in PKG.rglob("__init__.py") if p.parent != PKG}
    assert packages - listed == set()
