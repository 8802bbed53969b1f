"""Layering rules of the packages, checked on the source (AST, nothing imported):

* models imports no ``ray`` and nothing of bmray.actors, bmray.cluster or bmray.jobs;
* actors imports nothing of bmray.cluster or bmray.jobs;
* nothing outside bmray.jobs imports bmray.jobs;
* no ``_private`` name of another bmray module is imported (``from m import _x``) or read
  through a module alias (``import bmray.m as M; M._x``);
* no bmray import inside a function or method body (a cycle is broken by moving code to the
  right layer, not by a late import);
* every package folder (a directory with ``__init__.py``) is listed in pyproject.toml's
  ``packages``, or an installed bmray would lack it.

The folders and their package names come from pyproject.toml's ``package-dir``. Each rule is a
function of a source tree returning its violations as ``file:line: message``; the unit tests
below feed each rule a synthetic tree with one violation.
"""
from __future__ import annotations

import ast
import os
import tomllib
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from tests.conftest import REPO


@dataclass(frozen=True)
class Module:
    path: str                   # relative to the tree's root
    name: str                   # dotted, e.g. bmray.actors.train.loop
    tree: ast.Module


@dataclass(frozen=True)
class Import:
    line: int
    module: str                 # the imported module (``from m import x``: m)
    names: tuple[str, ...]      # ``from m import a, b``: (a, b); ``import m``: ()
    in_function: bool


def setuptools_config(root: str) -> dict:
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh).get("tool", {}).get("setuptools", {})


def package_dirs(root: str) -> dict[str, str]:
    """Top-level package name -> its folder, from ``package-dir`` (only the top of each
    mapping: ``bmray.models`` -> ``models``; sub-packages follow the folders)."""
    return dict(setuptools_config(root).get("package-dir", {}))


def modules(root: str) -> Iterator[Module]:
    """Every module of the mapped folders, parsed."""
    dirs = package_dirs(root)
    for package, folder in sorted(dirs.items()):
        base = os.path.join(root, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, base)
            sub = [] if rel == "." else rel.split(os.sep)
            if ".".join([package, *sub]) in dirs and sub:
                continue                        # mapped separately
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                parts = [package, *sub] + ([] if f == "__init__.py" else [f[:-3]])
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                yield Module(os.path.relpath(path, root), ".".join(parts), tree)


def imports(module: Module) -> Iterator[Import]:
    """The module's imports (absolute names; relative ones resolved), with whether each sits
    in a function body."""
    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(child.lineno, alias.name, (), in_function)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = module.name.split(".")
                    is_package = module.path.endswith("__init__.py")
                    base = base[:len(base) - child.level + (1 if is_package else 0)]
                    target = ".".join(base + ([target] if target else []))
                yield Import(child.lineno, target, tuple(a.name for a in child.names),
                             in_function)
            yield from visit(child, inside)
    yield from visit(module.tree, False)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden_imports(root: str, inside: str, forbidden: tuple[str, ...],
                       what: str) -> list[str]:
    out = []
    for m in modules(root):
        if not _under(m.name, inside):
            continue
        for imp in imports(m):
            targets = [imp.module] + [f"{imp.module}.{n}" for n in imp.names]
            bad = next((f for f in forbidden if any(_under(t, f) for t in targets)), None)
            if bad is not None:
                out.append(f"{m.path}:{imp.line}: {inside} imports {bad} ({what})")
    return out


def models_import_no_ray_or_upper_layers(root: str) -> list[str]:
    return _forbidden_imports(root, "bmray.models",
                              ("ray", "bmray.actors", "bmray.cluster", "bmray.jobs"),
                              "models is plain PyTorch: no Ray, nothing above it")


def actors_import_no_cluster_or_jobs(root: str) -> list[str]:
    return _forbidden_imports(root, "bmray.actors", ("bmray.cluster", "bmray.jobs"),
                              "actors never reaches up to the driver or the commands")


def nothing_imports_jobs(root: str) -> list[str]:
    out = []
    for m in modules(root):
        if _under(m.name, "bmray.jobs"):
            continue
        for imp in imports(m):
            if _under(imp.module, "bmray.jobs") or (
                    imp.module == "bmray" and "jobs" in imp.names):
                out.append(f"{m.path}:{imp.line}: {m.name} imports bmray.jobs "
                           f"(jobs are command-line entries; nothing imports them)")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def no_private_names_across_modules(root: str) -> list[str]:
    names = {m.name for m in modules(root)}
    out = []
    for m in modules(root):
        aliases: dict[str, str] = {}            # local name -> bmray module it refers to
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in names and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in names:
                        aliases[a.asname or a.name] = full
                    elif node.module in names and _private(a.name) and node.module != m.name:
                        out.append(f"{m.path}:{node.lineno}: imports the private name "
                                   f"{a.name} of {node.module}")
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and _private(node.attr) \
                    and aliases[node.value.id] != m.name:
                out.append(f"{m.path}:{node.lineno}: uses the private name {node.attr} of "
                           f"{aliases[node.value.id]} (as {node.value.id}.{node.attr})")
    return sorted(set(out))


def no_imports_in_functions(root: str) -> list[str]:
    out = []
    for m in modules(root):
        for imp in imports(m):
            if imp.in_function and _under(imp.module, "bmray"):
                out.append(f"{m.path}:{imp.line}: imports {imp.module} inside a function "
                           f"(import at module level; break a cycle by moving code)")
    return out


def package_folders_listed(root: str) -> list[str]:
    cfg = setuptools_config(root)
    listed = set(cfg.get("packages", []))
    out = []
    for package, folder in sorted(package_dirs(root).items()):
        base = os.path.join(root, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(dirpath, base)
            name = package if rel == "." else ".".join([package, *rel.split(os.sep)])
            if name not in listed:
                path = os.path.relpath(os.path.join(dirpath, "__init__.py"), root)
                out.append(f"{path}:1: package {name} is not in pyproject.toml's "
                           f"[tool.setuptools] packages (an installed bmray would lack it)")
    return out


RULES: list[Callable[[str], list[str]]] = [
    models_import_no_ray_or_upper_layers, actors_import_no_cluster_or_jobs, nothing_imports_jobs,
    no_private_names_across_modules, no_imports_in_functions, package_folders_listed]


# ------------------------------------------------------------------ the real tree
@pytest.mark.parametrize("rule", RULES, ids=[r.__name__ for r in RULES])
def test_the_tree_keeps_the_rule(rule):
    violations = rule(REPO)
    assert not violations, "\n".join(violations)


def test_the_tree_is_seen():
    """The walk finds the packages (a rule passing on nothing would prove nothing)."""
    names = {m.name for m in modules(REPO)}
    assert {"bmray", "bmray.models", "bmray.actors.train.loop", "bmray.cluster.gang",
            "bmray.jobs.cli"} <= names


# ------------------------------------------------------------------ each rule fails
PYPROJECT = """\
[tool.setuptools]
package-dir = {"bmray" = "bmray", "bmray.models" = "models", "bmray.actors" = "actors", \
"bmray.cluster" = "cluster", "bmray.jobs" = "jobs"}
packages = ["bmray", "bmray.models", "bmray.actors", "bmray.actors.train", "bmray.cluster",
            "bmray.jobs"]
"""


class SourceTree:
    """A synthetic source tree under ``root``; ``write(path, text)`` adds a file."""

    def __init__(self, root: str):
        self.root = root

    def write(self, path: str, text: str) -> None:
        f = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(f), exist_ok=True)
        with open(f, "w") as fh:
            fh.write(text)


@pytest.fixture
def tree(tmp_path) -> SourceTree:
    """A clean synthetic tree: each layer imports the one below it."""
    t = SourceTree(str(tmp_path))
    t.write("pyproject.toml", PYPROJECT)
    for path in ("bmray/__init__.py", "models/__init__.py", "actors/__init__.py",
                 "actors/train/__init__.py", "cluster/__init__.py", "jobs/__init__.py"):
        t.write(path, "")
    t.write("models/util.py", "import torch\n\n_SECRET = 1\nPUBLIC = 2\n")
    t.write("actors/train/loop.py", "from bmray.models.util import PUBLIC\n")
    t.write("cluster/gang.py", "import ray\nfrom bmray.actors.train import loop\n")
    t.write("jobs/cli.py", "from bmray.cluster import gang\n\n\ndef main():\n"
                           "    import os\n    return os.getcwd()\n")
    return t


def test_the_synthetic_tree_is_clean(tree):
    for rule in RULES:
        assert rule(tree.root) == [], rule.__name__


@pytest.mark.parametrize("rule, path, text, expected", [
    (models_import_no_ray_or_upper_layers, "models/bad.py",
     '"""Doc: from bmray.actors import x (a docstring, not an import)."""\nimport ray.util\n',
     "models/bad.py:2: bmray.models imports ray"),
    (models_import_no_ray_or_upper_layers, "models/bad.py",
     "from bmray.actors.train import loop\n", "models/bad.py:1: bmray.models imports bmray.actors"),
    (models_import_no_ray_or_upper_layers, "models/bad.py",
     "from bmray import cluster\n", "models/bad.py:1: bmray.models imports bmray.cluster"),
    (actors_import_no_cluster_or_jobs, "actors/train/bad.py",
     "\n\nfrom bmray.cluster.gang import ScalingConfig\n",
     "actors/train/bad.py:3: bmray.actors imports bmray.cluster"),
    (actors_import_no_cluster_or_jobs, "actors/bad.py",
     "from ..jobs import cli\n", "actors/bad.py:1: bmray.actors imports bmray.jobs"),
    (nothing_imports_jobs, "cluster/bad.py",
     "import bmray.jobs.cli\n", "cluster/bad.py:1: bmray.cluster.bad imports bmray.jobs"),
    (no_private_names_across_modules, "actors/train/bad.py",
     "from bmray.models.util import PUBLIC, _SECRET\n",
     "actors/train/bad.py:1: imports the private name _SECRET of bmray.models.util"),
    (no_private_names_across_modules, "actors/train/bad.py",
     "from bmray.models import util as U\n\nX = U._SECRET\n",
     "actors/train/bad.py:3: uses the private name _SECRET of bmray.models.util"),
    (no_private_names_across_modules, "actors/train/bad.py",
     "import bmray.models.util as U\n\n\ndef f():\n    return U._SECRET\n",
     "actors/train/bad.py:5: uses the private name _SECRET of bmray.models.util"),
    (no_imports_in_functions, "cluster/bad.py",
     "class A:\n    def f(self):\n        from bmray.actors.train import loop\n"
     "        return loop\n",
     "cluster/bad.py:3: imports bmray.actors.train inside a function"),
    (package_folders_listed, "actors/comm/__init__.py", "",
     "actors/comm/__init__.py:1: package bmray.actors.comm is not in pyproject.toml"),
])
def test_each_rule_names_the_violation(tree, rule, path, text, expected):
    tree.write(path, text)
    violations = rule(tree.root)
    assert any(v.startswith(expected) for v in violations), violations


def test_allowed_imports_pass(tree):
    """A module-level import of a lower layer, a dunder name, a private name of the module
    itself, and a non-bmray import inside a function are all fine."""
    tree.write("actors/train/ok.py",
               "from bmray.models import util\nfrom bmray import __doc__ as D\n\n"
               "_MINE = 1\n\n\ndef f():\n    import json\n    return util.PUBLIC, json, D\n")
    tree.write("cluster/ok.py", "from bmray.actors.train import loop\n")
    for rule in RULES:
        assert rule(tree.root) == [], rule.__name__
