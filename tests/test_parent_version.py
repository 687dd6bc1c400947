"""Continuing from a registered version (issue 22, item 5): ``base_model: tiny-bot@champion`` trains on that
version (an adapter merged into its base once, under the workspace's ``parents/``), the new version's lineage
links the parent, the evaluation's base is the parent, and a ref to a version that does not exist is exit 2."""

from __future__ import annotations

import pytest
import yaml

from test_cli import tl


@pytest.mark.slow
def test_a_run_continues_from_the_champion_and_links_it(make_config, tmp_path):
    from tuneloop.fsutil import model_fingerprint
    from tuneloop.pipeline import FineTunePipeline
    from tuneloop.registry.sqlite import SqliteRegistry

    first = make_config()
    assert FineTunePipeline(str(first)).run()["overall"] == "passed"
    ws = tmp_path / ".tuneloop"
    reg = SqliteRegistry(ws)
    v1 = reg.get("tiny-bot", "champion")
    assert v1.version == 1 and v1.artifact_kind == "adapter"

    cfg = yaml.safe_load(first.read_text())
    cfg["base_model"] = "tiny-bot@champion"
    cfg["train"]["max_steps"] = 3
    second = tmp_path / "continue.yaml"
    second.write_text(yaml.safe_dump(cfg))
    pipe = FineTunePipeline(str(second))
    merged = ws / "parents" / f"tiny-bot-v1-{v1.artifact_digest[:12]}"
    assert pipe.cfg.base_model == str(merged) and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()  # a whole model: the adapter merged in
    summary = pipe.run()
    assert summary["overall"] == "passed", summary
    v2 = reg.get("tiny-bot", summary["stages"]["model_registry"]["metrics"]["version"])
    parent = v2.lineage["parent"]
    assert parent["model"] == "tiny-bot" and parent["version"] == 1 and parent["ref"] == "tiny-bot@champion"
    assert parent["artifact_sha256"] == v1.artifact_digest and parent["artifact_kind"] == "adapter"
    assert v2.lineage["objective"] == "sft" and v2.base_model == str(merged)
    assert v2.lineage["base_model_fingerprint"] == model_fingerprint(str(merged))  # the gates' base is the parent

    cfg["base_model"] = "tiny-bot:1"  # @champion is v2 now (deployed)
    second.write_text(yaml.safe_dump(cfg))
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    again = FineTunePipeline(str(second))
    assert (
        again.cfg.base_model == str(merged) and (merged / "model.safetensors").stat().st_mtime_ns == stamp
    )  # merged once
    cfg["base_model"] = "tiny-bot@champion"  # v2, an adapter on the merged v1: a chain merges too
    second.write_text(yaml.safe_dump(cfg))
    chained = FineTunePipeline(str(second)).cfg.base_model
    assert chained.endswith(f"tiny-bot-v2-{v2.artifact_digest[:12]}")


def test_a_ref_to_a_missing_version_is_exit_2(make_config, tmp_path):
    from tuneloop.registry.sqlite import SqliteRegistry

    SqliteRegistry(tmp_path / ".tuneloop")  # an empty registry in the config's workspace
    cfg = yaml.safe_load(make_config().read_text())
    cfg["base_model"] = "tiny-bot:7"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = tl("run", path)
    assert r.returncode == 2, r.stderr
    assert "base_model: 'tiny-bot:7' looks like a registry ref, but the registry has no model 'tiny-bot'" in " ".join(
        r.stderr.split()
    )
