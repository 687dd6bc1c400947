"""Regenerate docs/configuration.md from the config schema: python scripts/gen_config_reference.py"""

from pathlib import Path

from tuneloop.config import reference_markdown

out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
out.write_text(reference_markdown(), encoding="utf-8")
print(f"wrote {out}")
