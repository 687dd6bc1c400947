"""OpenRLHF's own argument parsers and data functions, taken from its installed sources without importing them.

OpenRLHF's CLI modules import deepspeed, ray, vllm and flash-attn at their top, which a CPU machine does not have;
their parser is built inside ``if __name__ == "__main__":``. :func:`openrlhf_args` parses those sources with
``ast``, runs the statements of that block up to ``parser.parse_args()`` (with only the module's standard-library
imports in the namespace) to get the real parser, parses the given arguments with it, then runs the rest of the
block, OpenRLHF's own checks after parsing (``hierarchize``, its asserts), leaving out the ``train(args)`` call.
An unknown or malformed option (argparse exits) or a failed check raises :class:`Rejected` with OpenRLHF's message.

:func:`openrlhf_function` gives one top-level function or class of an OpenRLHF source file (e.g. ``preprocess_data``
of its SFT dataset, ``_get_reward_model``, or the ``SingleTurnAgentExecutor`` that calls a reward function) executed
alone, with the names it needs passed in.

Used by tests/test_openrlhf_export.py and by the stand-in launcher tests/openrlhf_standin.py.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

INSTALL = "pip install --no-deps openrlhf==0.11.2"


class Rejected(Exception):
    """OpenRLHF's parser or its checks after parsing refused the arguments."""


def openrlhf_dir() -> Path | None:
    """The installed ``openrlhf`` package's directory (found without importing it), or None."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _source(module: str) -> tuple[Path, ast.Module]:
    root = openrlhf_dir()
    if root is None:
        raise RuntimeError(f"openrlhf is not installed ({INSTALL})")
    if not module.startswith("openrlhf."):
        raise ValueError(f"{module!r} is not an openrlhf module")
    path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    return path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _is_stdlib_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] in sys.stdlib_module_names
    return False


def _calls(node: ast.AST, attr: str | None = None, name: str | None = None) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            if attr and isinstance(n.func, ast.Attribute) and n.func.attr == attr:
                return True
            if name and isinstance(n.func, ast.Name) and n.func.id == name:
                return True
    return False


def _hierarchize() -> Callable[[argparse.Namespace], SimpleNamespace]:
    """OpenRLHF's ``openrlhf/utils/config.py`` loaded by file (its package ``__init__`` imports deepspeed)."""
    path = openrlhf_dir() / "utils" / "config.py"
    spec = importlib.util.spec_from_file_location("_openrlhf_utils_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hierarchize


def openrlhf_args(module: str, argv: list[str]) -> SimpleNamespace:
    """``argv`` parsed by the parser of ``module`` (e.g. ``openrlhf.cli.train_sft``) and checked as its ``__main__``
    block checks it; the hierarchical args OpenRLHF would train with. Raises :class:`Rejected`."""
    path, tree = _source(module)
    mains = [
        n
        for n in tree.body
        if isinstance(n, ast.If) and ast.unparse(n.test).replace("'", '"') == '__name__ == "__main__"'
    ]
    if len(mains) != 1:
        raise RuntimeError(f'{path}: expected one `if __name__ == "__main__":` block, found {len(mains)}')
    body = mains[0].body
    cut = next((i for i, s in enumerate(body) if _calls(s, attr="parse_args")), None)
    if cut is None:
        raise RuntimeError(f"{path}: its __main__ block never calls parser.parse_args()")
    namespace: dict[str, Any] = {"__name__": "openrlhf_parser_check"}
    imports = [n for n in tree.body if _is_stdlib_import(n)]
    exec(compile(ast.Module(body=imports + body[:cut], type_ignores=[]), str(path), "exec"), namespace)
    parser = namespace["parser"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        message = (err.getvalue().strip().splitlines() or ["(no message)"])[-1]  # argparse's "prog: error: ..." line
        raise Rejected(f"{module}'s argument parser rejected the command (exit {exc.code}): {message}") from None
    # OpenRLHF's checks after parsing: everything after parse_args() but its own imports and the training call.
    checks = [
        s
        for s in body[cut + 1 :]
        if not (isinstance(s, ast.ImportFrom) and (s.module or "").startswith("openrlhf"))
        and not (isinstance(s, ast.Expr) and _calls(s, name="train"))
    ]
    namespace.update(args=args, hierarchize=_hierarchize())
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(ast.Module(body=checks, type_ignores=[]), str(path), "exec"), namespace)
    except Exception as exc:  # an assert, or code that cannot run on these arguments (e.g. a missing model path)
        raise Rejected(f"{module} refused the arguments after parsing: {type(exc).__name__}: {exc}") from None
    return namespace["args"]


def openrlhf_function(file: str, name: str, **names: Any) -> Callable[..., Any]:
    """The top-level function (or class) ``name`` of ``openrlhf/<file>`` (e.g. ``datasets/sft_dataset.py``), executed
    alone with ``names`` as its globals."""
    path, tree = _source("openrlhf." + file.removesuffix(".py").replace("/", "."))
    fn = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
    if not fn:
        raise RuntimeError(f"{path}: no top-level function or class {name}")
    namespace: dict[str, Any] = dict(names)
    exec(compile(ast.Module(body=fn, type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]
