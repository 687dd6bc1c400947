"""Config schema: flat and sectioned keys, overrides, error reporting, path resolution, docs in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop import ConfigError, PipelineConfig, load_config
from tuneloop.config import apply_overrides, build_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]

CLASSIC = dict(
    name="support-bot",
    base_model="path/or/hf-id",
    method="lora",
    train_data="data/train.jsonl",
    eval_data="data/eval.jsonl",
    lora_r=16,
    learning_rate=2e-4,
    num_epochs=3,
    batch_size=4,
    min_accuracy=0.85,
    max_harmful_rate=0.01,
    max_capability_drop=0.02,
    auto_deploy=False,
)


def test_classic_keyword_api_maps_flat_keys_into_sections():
    cfg = PipelineConfig(**CLASSIC)
    assert cfg.train.lora_r == 16 and cfg.lora_r == 16
    assert cfg.gates.min_accuracy == 0.85 and cfg.min_accuracy == 0.85
    assert cfg.deploy.auto_deploy is False
    assert Path(cfg.data.train_data).is_absolute()
    assert cfg.base_model == "path/or/hf-id"  # a hub id is left alone


def test_classic_keyword_api_reports_every_problem_as_a_config_error():
    # PipelineConfig(**kwargs) goes through tuneloop.config.loading.init_from_keywords, not pydantic's errors.
    with pytest.raises(ConfigError) as exc:
        PipelineConfig(**dict(CLASSIC, lora_r=0, trian={}))
    assert len(exc.value.problems) == 2
    assert exc.value.problems[0] == "lora_r: bad value 0; expected a number >= 1"
    assert exc.value.problems[1].startswith("trian: unknown key; did you mean `train`?. Allowed here: ")
    with pytest.raises(ConfigError, match="lora_r: given both at top level"):
        PipelineConfig(**dict(CLASSIC, train={"lora_r": 8}))


def test_a_dict_of_flat_keys_is_a_valid_config():
    cfg = build_config(dict(CLASSIC))
    assert cfg.to_dict()["train"]["learning_rate"] == 2e-4


def test_every_problem_is_reported_at_once_with_paths_values_and_allowed():
    bad = dict(CLASSIC, lora_r=0, method="qlora2", trian={}, gates={"min_acuracy": 2}, learning_rate="fast")
    with pytest.raises(ConfigError) as exc:
        build_config(bad)
    problems = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 5
    assert "lora_r: bad value 0; expected a number >= 1" in problems
    assert "method: bad value 'qlora2'; expected one of 'lora', 'qlora' or 'full'" in problems
    assert "learning_rate: bad value 'fast'" in problems
    assert "trian: unknown key; did you mean `train`?" in problems
    assert "gates.min_acuracy: unknown key; did you mean `min_accuracy`?" in problems


def test_value_given_both_ways_is_an_error():
    with pytest.raises(ConfigError, match="lora_r: given both at top level"):
        build_config(dict(CLASSIC, train={"lora_r": 8}))


def test_missing_train_data_says_which_key():
    with pytest.raises(ConfigError, match="data.train_data: required"):
        build_config({"name": "x", "base_model": "m"})


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nbase_model: m\ntrain_data: a.jsonl\ntrain:\n  lora_r: -3\n  bogus: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    text = str(exc.value)
    assert f"train.lora_r ({p}:5)" in text and f"train.bogus ({p}:6)" in text
    p.write_text("name: x\nbase_model: m\n  train_data: [a.jsonl\n")
    with pytest.raises(ConfigError, match=rf"{p}:3:\d+: malformed YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("name: x\nbase_model: ./base\ndata:\n  train_data: d/train.jsonl\n")
    cfg = load_config(p)
    assert cfg.data.train_data == str(tmp_path / "sub" / "d" / "train.jsonl")
    assert cfg.base_model == str(tmp_path / "sub" / "base")


def test_overrides_flat_or_dotted_never_conflict(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nbase_model: m\ntrain_data: a.jsonl\nlora_r: 4\n")
    cfg = load_config(p, ["train.lora_r=8", "gates.min_accuracy=null", "data.eval_split=0.25", "method=full"])
    assert (cfg.train.lora_r, cfg.gates.min_accuracy, cfg.data.eval_split, cfg.train.method) == (8, None, 0.25, "full")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="lora_r: bad value 'x'; expected an integer"):
        load_config(p, ["train.lora_r=x"])


def test_configuration_reference_is_in_step_with_the_schema():
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == reference_markdown(), "docs/configuration.md is stale: run python scripts/gen_config_reference.py"


# ------------------------------------------------------------------------------------ hostile YAML (issue 14.17)

_ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    + "name: *i\n"
)
_MERGE_BOMB = "a0: &a0 {k0: 1, k1: 2}\n" + "".join(
    f"a{i}: &a{i} {{<<: [*a{i - 1}], x{i}: 1, y{i}: *a{i - 1}, z{i}: *a{i - 1}}}\n" for i in range(1, 30)
)


@pytest.mark.parametrize(
    "text, expect",
    [
        (_ALIAS_BOMB, "expands to more than"),
        (_MERGE_BOMB, "expands to more than"),
        ("name: " + "[" * 1200 + "]" * 1200 + "\n", "nested deeper than"),
        ("name: x\nd: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested deeper than"),
        ("a: &a [*a]\n", "recursive YAML alias"),
    ],
    ids=["alias-bomb", "merge-bomb", "deep-flow", "deep-mapping", "recursive"],
)
def test_yaml_bombs_are_refused_quickly_with_a_short_message(tmp_path, text, expect):
    import time

    assert len(text) < 3000  # small files: the point is that they expand
    f = tmp_path / "bomb.yaml"
    f.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert time.perf_counter() - t0 < 1.0
    assert expect in str(exc.value)
    assert exc.value.exit_code == 2
    assert len(str(exc.value)) < 400


def test_an_oversized_config_is_refused(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match="at most 1,000,000 bytes"):
        load_config(f)


def test_error_messages_never_print_more_than_about_200_characters_of_a_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "name: x\nbase_model: m\ntrain_data: d.jsonl\nseed: "
        + "9" * 5000
        + "\nlora_r: ["
        + ", ".join(["1"] * 3000)
        + "]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    for problem in exc.value.problems:
        assert len(problem) < 400, problem


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=1.0e+23", "seed"),
        ("seed=-1", "seed"),
        ("train.batch_size=99999999999", "train.batch_size"),
        ("train.lora_r=100000", "train.lora_r"),
        ("data.max_length=1e12", "data.max_length"),
    ],
)
def test_out_of_range_values_are_config_errors_before_any_work(tmp_path, override, key):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nbase_model: m\ntrain_data: d.jsonl\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, [override])
    assert exc.value.problems[0].startswith(key + ":")
    assert "Input should be" not in str(exc.value)
