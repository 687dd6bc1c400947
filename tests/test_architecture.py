"""The import rule of ``src/tuneloop`` (docs/architecture.md, "Layers and the import rule"), checked on the source.

The package's imports are read with ``ast`` -- module-level AND function-level ones, since tuneloop imports
heavy libraries (and some of its own modules) lazily inside functions -- into a graph of modules. The tests
fail on:

- an import cycle between modules (the message shows the cycle, with file:line of each import);
- an import that breaks a layer rule (the table ``LAYER_RULES`` below, which reads like the doc);
- a private name (``_x``) imported from another module.

Importing ``tuneloop.a.b`` runs ``tuneloop/__init__`` and ``tuneloop/a/__init__`` first; that is Python's
package machinery, not a dependency the code chose, so it is not an edge. ``from tuneloop.a import b`` is an
edge to the module ``tuneloop.a.b`` when ``b`` is a submodule, else to the package ``tuneloop.a``.
The first tests run the checker on small throwaway packages, so the checker itself is known to catch each
kind of problem.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tuneloop"

# ---------------------------------------------------------------------------------------------- the rule

# Areas are the first name under tuneloop/: a module (`config`, `fsutil`) or a subpackage (`data`, `cli`).
BOTTOM = ("config", "errors", "fsutil", "version")
ORCHESTRATION = ("pipeline", "stages", "runs", "checks", "ci", "cli", "demo")


@dataclass(frozen=True)
class LayerRule:
    """Modules in ``areas`` may import only ``only`` (when given) and never anything in ``never``."""

    areas: tuple[str, ...]
    never: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    why: str = ""


LAYER_RULES = (
    LayerRule(
        ("config", "errors", "fsutil", "version"),
        only=BOTTOM,
        why="the bottom layer: everything may import it, so it imports nothing above it",
    ),
    LayerRule(
        ("data", "train", "evaluate", "registry"),
        never=ORCHESTRATION,
        why="the library: usable from Python without the runner, the run history or the CLI",
    ),
    LayerRule(
        ("serve", "monitor", "rollout", "feedback"),
        never=("pipeline", "stages", "train", "cli"),
        why="production code reaches models only through the registry API",
    ),
    LayerRule(("*",), never=("cli",), why="the CLI is the top: it calls the library, never the other way round"),
)

# ---------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. tuneloop.train.dpo
    target: str  # imported module, e.g. tuneloop.train.sft
    names: tuple[str, ...]  # names taken with `from target import ...` (empty for `import target`)
    where: str  # file:line


def module_files(src: Path, package: str) -> dict[str, Path]:
    """``{"tuneloop.data.validate": path, "tuneloop.data": path/__init__.py, ...}``."""
    files = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the package (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def read_imports(src: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    """Every import of a package module by a package module, wherever it is written in the file."""
    modules = module_files(src, package)
    found: list[Import] = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(src).as_posix()
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, modules)
                    if target and target != source:
                        found.append(Import(source, target, (), where))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, source, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # `from tuneloop.data import diff` imports the module tuneloop.data.diff
                        found.append(Import(source, sub, (), where))
                        continue
                    target = _resolve(base, modules)
                    if target and target != source:
                        found.append(Import(source, target, (alias.name,), where))
    return modules, found


def area(module: str) -> str:
    """``tuneloop.data.validate`` -> ``data``; the package's own ``__init__`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


# ---------------------------------------------------------------------------------------------- the checks


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle (as the list of imports that close it) per strongly connected group of modules."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    cycles = []
    for group in _strongly_connected(edges):
        start = min(group)
        cycles.append(_path_back(start, group, edges))
    return cycles


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; only groups that contain a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges.get(node, {}):
                    groups.append(group)
    return groups


def _path_back(start: str, group: set[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest chain of imports from ``start`` back to itself inside its group (breadth first)."""
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for target, imp in sorted(edges.get(node, {}).items()):
                if target not in group:
                    continue
                if target == start:
                    chain = [imp]
                    while chain[0].source != start:
                        chain.insert(0, came_from[chain[0].source])
                    return chain
                if target not in came_from:
                    came_from[target] = imp
                    nxt.append(target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # a group always has one


def layer_violations(imports: list[Import], rules=LAYER_RULES) -> list[str]:
    problems = []
    for imp in imports:
        src, dst = area(imp.source), area(imp.target)
        if src == dst:
            continue
        for rule in rules:
            if "*" not in rule.areas and src not in rule.areas:
                continue
            if dst in rule.never or (rule.only is not None and dst not in rule.only):
                allowed = (
                    f"may import only {', '.join(rule.only)}"
                    if rule.only is not None
                    else f"must not import {', '.join(rule.never)}"
                )
                problems.append(f"{imp.where}: {imp.source} imports {imp.target}; {src} {allowed} ({rule.why})")
                break  # one message per import: the first rule it breaks
    return list(dict.fromkeys(problems))  # `from x import a, b` is one import


def private_imports(imports: list[Import]) -> list[str]:
    return [
        f"{imp.where}: {imp.source} imports the private name {name} from {imp.target}; "
        f"make it public (no leading underscore) where it is defined, or keep it inside {imp.target}"
        for imp in imports
        for name in imp.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]


def describe(cycle: list[Import]) -> str:
    path = " -> ".join([cycle[0].source, *(imp.target for imp in cycle)])
    return path + "\n" + "\n".join(f"      {imp.source} -> {imp.target} at {imp.where}" for imp in cycle)


# ---------------------------------------------------------------------------------------------- the checker on toy packages


def _toy(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for rel, text in files.items():
        path = tmp_path / "toy" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_imports(tmp_path, "toy")[1]


def test_checker_finds_a_cycle_made_by_a_function_level_import(tmp_path):
    imports = _toy(
        tmp_path,
        {
            "__init__.py": "from toy.a import f\n",  # package __init__ edges alone are not a cycle
            "a.py": "import os\nfrom toy import b\n\ndef f():\n    return b.g()\n",
            "b.py": "def g():\n    from toy.c import h\n    return h()\n",
            "c.py": "from . import a\n\ndef h():\n    return 1\n",
            "d.py": "from toy.a import f\n",
        },
    )
    cycles = find_cycles(imports)
    assert len(cycles) == 1
    assert describe(cycles[0]).splitlines()[0] == "toy.a -> toy.b -> toy.c -> toy.a"
    assert "toy/b.py:2" in describe(cycles[0])


def test_checker_finds_layer_breaks_and_private_imports(tmp_path):
    imports = _toy(
        tmp_path,
        {
            "__init__.py": "",
            "config.py": "from toy.errors import E\nfrom toy.data.x import y\n",
            "errors.py": "class E(Exception): ...\n",
            "data/__init__.py": "",
            "data/x.py": "y = 1\n\ndef run():\n    from toy.pipeline import P\n    from toy.errors import E\n",
            "serve/__init__.py": "",
            "serve/app.py": "from toy.train.sft import _callback\nfrom toy.registry import api\n",
            "train/__init__.py": "",
            "train/sft.py": "def _callback(): ...\n",
            "registry/__init__.py": "",
            "registry/api.py": "from toy.cli import main\n",
            "pipeline.py": "class P: ...\n",
            "cli.py": "from toy.pipeline import P\nfrom toy.data import x\n",
        },
    )
    found = layer_violations(imports)
    assert len(found) == 4, "\n".join(found)
    assert any("toy/config.py:2" in p and "config may import only" in p for p in found)
    assert any("toy/data/x.py:4" in p and "toy.pipeline" in p for p in found)
    assert any("toy/serve/app.py:1" in p and "toy.train.sft" in p for p in found)
    assert any("toy/registry/api.py:1" in p and "toy.cli" in p for p in found)
    assert private_imports(imports) == [
        "toy/serve/app.py:1: toy.serve.app imports the private name _callback from toy.train.sft; "
        "make it public (no leading underscore) where it is defined, or keep it inside toy.train.sft"
    ]
    assert find_cycles(imports) == []


# ---------------------------------------------------------------------------------------------- the rule on tuneloop


@pytest.fixture(scope="module")
def tuneloop_imports() -> list[Import]:
    modules, imports = read_imports(SRC, PACKAGE)
    assert {"tuneloop.config", "tuneloop.cli", "tuneloop.registry.sqlite"} <= set(modules)
    assert len(imports) > 50  # the reader sees the package's imports, lazy ones included
    return imports


def test_no_import_cycles(tuneloop_imports):
    cycles = find_cycles(tuneloop_imports)
    assert not cycles, "import cycles (break each by moving the shared code down a layer):\n" + "\n".join(
        f"  {describe(c)}" for c in cycles
    )


def test_layers_hold(tuneloop_imports):
    problems = layer_violations(tuneloop_imports)
    assert not problems, "imports that break the layer rule (docs/architecture.md):\n" + "\n".join(
        f"  {p}" for p in problems
    )


def test_no_private_names_imported_across_modules(tuneloop_imports):
    problems = private_imports(tuneloop_imports)
    assert not problems, "\n".join(f"  {p}" for p in problems)
