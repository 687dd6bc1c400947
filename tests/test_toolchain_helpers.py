"""The shared helpers issue 25 made one of each (fsutil's JSONL reader, stats.mean) and the logger tree that
`tuneloop serve` configures: each module logs to ``logging.getLogger(__name__)``, a child of ``tuneloop``."""

from __future__ import annotations

import logging

import pytest

from tuneloop.errors import InputError
from tuneloop.evaluate.stats import mean
from tuneloop.fsutil import iter_jsonl, read_jsonl


def test_mean_of_nothing_is_none_not_zero():
    assert mean([]) is None
    assert mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)


def test_jsonl_reader_numbers_lines_and_names_the_bad_one(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(f)) == [(1, {"a": 1}), (3, {"a": 2})]  # blank lines skipped, numbers are the file's
    f.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{f}:2: not valid JSON .*the suite needs one JSON object per line"):
        read_jsonl(f, "the suite")
    f.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{f}:2: expected a JSON object"):
        read_jsonl(f)


def test_serve_logging_shows_module_loggers_at_info(monkeypatch):
    """configure_logging sets the package logger; a rollout decision logged by tuneloop.rollout.controller
    (a child logger) reaches its handler at INFO."""
    from tuneloop.rollout import controller
    from tuneloop.serve.server import configure_logging

    pkg = logging.getLogger("tuneloop")
    monkeypatch.setattr(pkg, "handlers", [])
    monkeypatch.setattr(pkg, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as under `tuneloop serve`: nothing configured yet
    configure_logging()
    seen: list[logging.LogRecord] = []
    pkg.handlers[0].addFilter(lambda r: seen.append(r) or True)
    assert controller.logger.name == "tuneloop.rollout.controller"
    controller.logger.info("rollout r1: promoted")
    assert [r.getMessage() for r in seen] == ["rollout r1: promoted"]
