#!/usr/bin/env bash
# The toolchain (issue 25): the formatter check, the linter and the type checker, configured in pyproject.toml ([tool.ruff],
# [tool.mypy]). Exit 0 when all three are clean, non-zero on any finding. Run from anywhere:
#     scripts/lint.sh
# mypy checks every module of src/tuneloop (no ignore_errors overrides are left); ruff's per-file ignores in
# pyproject.toml are deliberate, each with its reason (CONTRIBUTING.md). Python files only: `ruff format .` would also
# reformat the code blocks of the READMEs, which are written compact on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."

rc=0
echo "== ruff check (lint: E, F, I, B, UP)"
ruff check src tests benchmarks scripts || rc=1

echo "== ruff format --check (the tree is formatted; run \`ruff format src tests benchmarks scripts\` to fix)"
ruff format --check src tests benchmarks scripts || rc=1

echo "== mypy (files and options from [tool.mypy])"
mypy || rc=1

exit "$rc"
