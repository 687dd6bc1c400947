"""The schema split into one module per concern: old import paths keep working, the reference names real files."""

from __future__ import annotations

import re
from pathlib import Path

import tuneloop.config as config
import tuneloop.config.schema as schema
from tuneloop.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_schema_reexports_every_section_name_as_the_package_does():
    # `from tuneloop.config.schema import X` worked for these before the split; they must stay the same objects.
    for name in schema.__all__:
        assert hasattr(schema, name), name
        if hasattr(config, name):
            assert getattr(config, name) is getattr(schema, name), name


def test_reference_names_the_files_it_is_generated_from():
    line = reference_markdown().splitlines()[2]
    m = re.match(r"<!-- Generated from (\S+/) \(([^)]*)\) by ", line)
    assert m, line
    files = m.group(2).split(", ")
    assert files[0] == "schema.py"
    for f in files:
        assert (ROOT / m.group(1) / f).is_file(), f
    # Every module that defines a section model is named.
    named = {f.removesuffix(".py") for f in files}
    for name in schema.__all__:
        obj = getattr(schema, name)
        if isinstance(obj, type) and obj.__name__.endswith("Config"):
            assert obj.__module__.rsplit(".", 1)[1] in named, (name, obj.__module__)
