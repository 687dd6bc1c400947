"""GateResult (tuneloop.evaluate.gates): the typed gate record and its stored JSON form.

``to_dict()`` must give the record every consumer stored before the type existed (run records, the registry,
``--json``; pinned end to end by tests/test_json_shapes.py): the key orders below are that shape, per variant.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tuneloop.evaluate.gates import ABSENT, GateInput, GateResult, GateSpec, as_dicts, decide, overall

HEAD = ["metric", "suite", "kind", "op", "threshold", "confidence", "interval_level", "n"]
TAIL = ["verdict", "passed", "blocks", "needed_n", "reason"]


def test_key_order_of_each_variant():
    floor = decide(GateSpec("min_accuracy", "accuracy", "floor", 0.5, "task"), GateInput([1.0] * 30))
    assert floor.verdict == "PASS" and floor.passed is True and floor.blocks is False
    assert list(floor.to_dict()) == HEAD + ["value", "interval", "method", "counts"] + TAIL
    paired = decide(
        GateSpec("max_harmful_increase", "harmful_increase", "paired", 0.1), GateInput([0.0, 1.0], [0.0, 0.0], sign=-1)
    )
    assert (
        list(paired.to_dict())
        == HEAD
        + [
            "base_value",
            "candidate_value",
            "value",
            "interval",
            "method",
            "p_value",
            "counts",
        ]
        + TAIL
    )
    warn = decide(GateSpec("min_accuracy", "accuracy", "floor", 0.5), GateInput([1.0, 1.0, 1.0, 0.0]), policy="warn")
    assert warn.verdict == "INCONCLUSIVE" and warn.passed is True and isinstance(warn.needed_n, int)
    assert list(warn.to_dict())[-2:] == ["reason", "warning"] and warn.warning == warn.reason
    empty = decide(GateSpec("min_accuracy", "accuracy", "floor", 0.5), GateInput([]))
    assert list(empty.to_dict()) == HEAD + ["value", "interval"] + TAIL and empty.reason == "no items"
    off = decide(GateSpec("min_accuracy", "accuracy", "floor", None), GateInput([1.0]))
    assert off.verdict == "NOT_APPLIED" and off.passed is None and off.method is not ABSENT


def test_round_trip_json_and_reads():
    g = decide(GateSpec("max_capability_drop", "capability_drop", "paired", 0.02), GateInput([1.0] * 9, [1.0] * 9))
    d = g.to_dict()
    assert isinstance(d["interval"], list) and isinstance(g.interval, tuple)
    assert GateResult.from_dict(json.loads(json.dumps(d))) == g
    assert d["verdict"] == g.verdict and "warning" not in d and g.warning is ABSENT
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.verdict = "PASS"  # type: ignore[misc]
    stored = {**d, "future_key": 1}  # a record written by a newer version keeps its extra key, last
    assert list(GateResult.from_dict(stored).to_dict()) == list(stored)
    with pytest.raises(ValueError, match="lacks .*verdict"):
        GateResult.from_dict({"metric": "accuracy"})
    assert g.verdict == "INCONCLUSIVE" and g.blocks  # 0 discordant of 9: the interval still spans 0.02
    ok = decide(GateSpec("min_accuracy", "accuracy", "floor", 0.5), GateInput([1.0] * 30))
    assert overall({"a": ok}) == "passed" and overall({"a": ok, "b": g}) == "failed"
    assert overall(as_dicts({"a": ok, "b": g})) == "failed" and as_dicts({"b": g}) == {"b": d}
    with pytest.raises(TypeError):  # a record, not a dict: read attributes, or to_dict() for the stored form
        g["verdict"]  # type: ignore[index]
