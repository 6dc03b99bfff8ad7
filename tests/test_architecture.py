"""The layout rules of docs/architecture.md, checked on the source with ``ast`` (nothing is imported).

* no import cycle between the package's modules (module-level and function-level imports, relative or absolute);
* no upward import: the tuner (``polytropon/*.py``) imports neither ``toolkit`` nor ``app``, the toolkit not
  ``app`` (the package's ``__init__`` re-exports from every layer and ``__main__`` is the application's entry);
* no private name of one module used in another: ``from .x import _y``, or ``obj._name`` where ``_name`` is
  defined (a ``def``/``class``, a module or class assignment, a ``self._name = ...``) only in other modules;
* no module of ``app/commands`` imports another command module.

The checker's own tests build small packages in ``tmp_path`` that break each rule, so it stays tested once the
real package is clean.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
from dataclasses import dataclass, field

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "polytropon"

LAYERS = {"tuner": 0, "toolkit": 1, "app": 2}


@dataclass
class Import:
    """``source`` imports ``target`` (both dotted module names) at ``line``; ``names`` are the names it takes."""

    source: str
    target: str
    line: int
    names: tuple[str, ...] = ()


@dataclass
class Package:
    """The modules of a package on disk, their syntax trees, and the imports between them."""

    name: str
    trees: dict[str, ast.Module] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)  # modules that are a package's __init__
    imports: list[Import] = field(default_factory=list)

    @classmethod
    def read(cls, root: pathlib.Path) -> "Package":
        package = cls(root.name)
        for path in sorted(root.rglob("*.py")):
            parts = (root.name, *path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                package.packages.add(".".join(parts))
            package.trees[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for module, tree in package.trees.items():
            package.imports.extend(package._imports_of(module, tree))
        return package

    def _imports_of(self, module: str, tree: ast.Module) -> list[Import]:
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == self.name or alias.name.startswith(self.name + "."):
                        found.append(Import(module, self._known(alias.name), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node.level, node.module)
                if base != self.name and not base.startswith(self.name + "."):
                    continue
                names = tuple(alias.name for alias in node.names)
                submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in self.trees]
                for target in submodules:
                    found.append(Import(module, target, node.lineno))
                rest = tuple(name for name in names if f"{base}.{name}" not in self.trees)
                if rest or not submodules:
                    found.append(Import(module, self._known(base), node.lineno, rest))
        return found

    def _absolute(self, module: str, level: int, name: str | None) -> str:
        if not level:
            return name or ""
        parts = module.split(".")
        if module not in self.packages:
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([name] if name else []))

    def _known(self, dotted: str) -> str:
        """The longest prefix of ``dotted`` that is a module of the package."""
        parts = dotted.split(".")
        while parts and ".".join(parts) not in self.trees:
            parts.pop()
        return ".".join(parts)

    def edges(self) -> dict[str, dict[str, int]]:
        """``{source: {target: first line}}`` for every import between two different modules."""
        out: dict[str, dict[str, int]] = {module: {} for module in self.trees}
        for imp in self.imports:
            if imp.target in self.trees and imp.target != imp.source:
                out[imp.source].setdefault(imp.target, imp.line)
        return out

    def layer(self, module: str) -> str | None:
        """``tuner``, ``toolkit`` or ``app``; ``None`` for the package's ``__init__`` (it re-exports every layer)."""
        parts = module.split(".")[1:]
        if not parts:
            return None
        if parts[0] in ("toolkit", "app") or parts == ["__main__"]:
            return "app" if parts[0] != "toolkit" else "toolkit"
        return "tuner"


def import_cycles(package: Package) -> list[str]:
    """One finding per strongly connected group of modules that import each other (Tarjan's algorithm)."""
    edges = package.edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    findings = []
    for group in groups:
        links = [f"{a} imports {b} (line {edges[a][b]})" for a in group for b in sorted(edges[a]) if b in group]
        findings.append(f"import cycle between {', '.join(group)}: " + "; ".join(links))
    return findings


def upward_imports(package: Package) -> list[str]:
    findings = []
    for imp in package.imports:
        src, dst = package.layer(imp.source), package.layer(imp.target)
        if src is not None and dst is not None and LAYERS[dst] > LAYERS[src]:
            findings.append(f"{imp.source} ({src}) imports {imp.target} ({dst}) at line {imp.line}: a lower layer never imports a higher one")
    return findings


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_homes(package: Package) -> dict[str, set[str]]:
    """Where each private name is defined: ``def``/``class``, module or class assignments, ``self._x = ...``."""
    homes: dict[str, set[str]] = {}
    for module, tree in package.trees.items():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                            names.append(sub.id)
                        elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                              and sub.value.id in ("self", "cls")):
                            names.append(sub.attr)
            for name in names:
                if _is_private(name):
                    homes.setdefault(name, set()).add(module)
    return homes


def private_reaches(package: Package) -> list[str]:
    findings = []
    for imp in package.imports:
        for name in imp.names:
            if _is_private(name):
                findings.append(f"{imp.source} imports the private name {name} from {imp.target} (line {imp.line})")
    homes = private_homes(package)
    for module, tree in package.trees.items():
        seen = set()
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            where = homes.get(node.attr, set())
            if where and module not in where and node.attr not in seen:
                seen.add(node.attr)
                findings.append(
                    f"{module} reaches {ast.unparse(node)} (line {node.lineno}): {node.attr} is private to "
                    f"{', '.join(sorted(where))}"
                )
    return findings


def commands_importing_commands(package: Package) -> list[str]:
    commands = f"{package.name}.app.commands"
    findings = []
    for imp in package.imports:
        if (imp.source.startswith(commands + ".") and imp.target.startswith(commands + ".")
                and imp.target != imp.source):
            findings.append(f"{imp.source} imports the command module {imp.target} (line {imp.line}): commands never import each other")
    return findings


RULES = {
    "import cycles": import_cycles,
    "upward imports": upward_imports,
    "private names across modules": private_reaches,
    "commands importing commands": commands_importing_commands,
}


def check(root: pathlib.Path) -> dict[str, list[str]]:
    """Every finding of every rule on the package at ``root``."""
    package = Package.read(root)
    return {rule: find(package) for rule, find in RULES.items()}


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def findings() -> dict[str, list[str]]:
    assert (SRC / "__init__.py").is_file(), SRC
    return check(SRC)


@pytest.mark.parametrize("rule", RULES)
def test_the_package_keeps_the_layout_rule(rule, findings):
    assert not findings[rule], f"{rule}:\n" + "\n".join(findings[rule])


def test_the_checker_sees_the_whole_package():
    package = Package.read(SRC)
    assert {"polytropon", "polytropon.config", "polytropon.toolkit.analysis", "polytropon.app.cli",
            "polytropon.app.commands.train"} <= set(package.trees)
    # relative imports at module and function level both resolve to modules of the package
    edges = package.edges()
    assert "polytropon.config" in edges["polytropon"]
    assert any(target.startswith("polytropon.app.") for target in edges["polytropon.app.commands.train"])


# --------------------------------------------------------------------------- the checker on synthetic packages


def make_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    """Write ``files`` (path relative to the package -> source) as the package ``pkg`` under ``root``."""
    package = root / "pkg"
    for rel, source in {"__init__.py": "", "toolkit/__init__.py": "", "app/__init__.py": "",
                        "app/commands/__init__.py": "", **files}.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return package


CLEAN = {
    "config.py": "class Config:\n    def __init__(self):\n        self._seen = 0\n",
    "layer.py": "from .config import Config\n\ndef _helper():\n    return Config()\n\ndef build():\n    return _helper()\n",
    "toolkit/plots.py": "from ..layer import build\nfrom pkg.config import Config\n",
    "app/cli.py": "from ..toolkit import plots\n\ndef main():\n    from .commands import train\n    return train.run()\n",
    "app/commands/train.py": "def run():\n    from ...layer import build\n    return build()\n",
}


def test_a_clean_package_has_no_finding(tmp_path):
    assert check(make_package(tmp_path, CLEAN)) == {rule: [] for rule in RULES}


def test_an_import_cycle_is_found_through_function_level_and_absolute_imports(tmp_path):
    files = dict(CLEAN)
    files["config.py"] = "def make():\n    import pkg.layer\n    return pkg.layer.build()\n"
    result = check(make_package(tmp_path, files))
    assert result["import cycles"] == [
        "import cycle between pkg.config, pkg.layer: pkg.config imports pkg.layer (line 2); "
        "pkg.layer imports pkg.config (line 1)"
    ]
    assert not result["upward imports"] and not result["private names across modules"]


def test_upward_imports_are_found(tmp_path):
    files = dict(CLEAN)
    files["layer.py"] += "\ndef plot():\n    from .toolkit.plots import build\n"
    files["toolkit/extra.py"] = "from ..app import cli\n"
    result = check(make_package(tmp_path, files))
    assert result["upward imports"] == [
        "pkg.layer (tuner) imports pkg.toolkit.plots (toolkit) at line 10: a lower layer never imports a higher one",
        "pkg.toolkit.extra (toolkit) imports pkg.app.cli (app) at line 1: a lower layer never imports a higher one",
    ]
    assert any("import cycle between pkg.layer, pkg.toolkit.plots" in f for f in result["import cycles"])


def test_a_private_import_is_found(tmp_path):
    files = dict(CLEAN)
    files["toolkit/plots.py"] = "from ..layer import _helper, build\n"
    result = check(make_package(tmp_path, files))
    assert result["private names across modules"] == [
        "pkg.toolkit.plots imports the private name _helper from pkg.layer (line 1)"
    ]


def test_a_private_attribute_of_another_module_is_found_but_not_ones_own(tmp_path):
    files = dict(CLEAN)
    files["layer.py"] += "\ndef count(config):\n    return config._seen + config.__dict__.__len__()\n"
    files["toolkit/plots.py"] = "def size(t):\n    return t._base\n"  # _base is no name of the package
    files["app/cli.py"] = "class Run:\n    def __init__(self):\n        self._seen = 1\n\n    def seen(self, other):\n        return other._seen\n"
    result = check(make_package(tmp_path, files))
    assert result["private names across modules"] == [
        "pkg.layer reaches config._seen (line 10): _seen is private to pkg.app.cli, pkg.config"
    ]


def test_a_command_importing_a_command_is_found(tmp_path):
    files = dict(CLEAN)
    files["app/commands/evaluate.py"] = "def check():\n    return True\n"
    files["app/commands/adapt.py"] = "def run():\n    from .evaluate import check\n    return check()\n"
    files["app/commands/merge.py"] = "from pkg.app.commands import evaluate\n"
    result = check(make_package(tmp_path, files))
    assert result["commands importing commands"] == [
        "pkg.app.commands.adapt imports the command module pkg.app.commands.evaluate (line 2): commands never import each other",
        "pkg.app.commands.merge imports the command module pkg.app.commands.evaluate (line 1): commands never import each other",
    ]
