"""The largest modules and the longest functions of ``src/tuneloop``, for the issue notes and CONTRIBUTING.

    python scripts/code_stats.py [--top N] [--json] [SRC]

Lines are physical lines of the file (what an editor shows); a function's length runs from its ``def`` (decorators
included) to its last line, nested functions counted inside their parent and listed on their own too.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def module_sizes(src: Path) -> list[tuple[str, int]]:
    sizes = [(str(p.relative_to(src)), len(p.read_text(encoding="utf-8").splitlines())) for p in src.rglob("*.py")]
    return sorted(sizes, key=lambda s: (-s[1], s[0]))


def function_lengths(src: Path) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out.append((f"{path.relative_to(src)}:{node.name}", node.end_lineno - start + 1))
    return sorted(out, key=lambda s: (-s[1], s[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src" / "tuneloop"))
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON line instead of two tables")
    args = ap.parse_args()
    src = Path(args.src)
    mods, funcs = module_sizes(src)[: args.top], function_lengths(src)[: args.top]
    if args.json:
        print(json.dumps({"modules": mods, "functions": funcs}))
        return
    print("largest modules (lines):")
    for name, n in mods:
        print(f"  {n:6,d}  {name}")
    print("longest functions (lines):")
    for name, n in funcs:
        print(f"  {n:6,d}  {name}")


if __name__ == "__main__":
    main()
