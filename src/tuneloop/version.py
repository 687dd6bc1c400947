"""The code version recorded with every run, cache key and registered model."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<release>+<digest of the package sources>``: changes whenever tuneloop's code does, or the data files it
    ships with it (the demo's word tables and recipe in ``demo/data/``, UI catalogs, the shipped base model's JSON)."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".json", ".jsonl", ".txt") and "__pycache__" not in f.parts:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
