"""Reward models (``train.objective: reward``): a real run of the CLI on the tiny model, the held-out pairwise
accuracy gate on separable and on random preferences, the artifact as plain transformers (+ PEFT) loads it,
``load_reward_model``, resume, the decidability preflight, and the gateway refusing to chat with one."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl

NAMES = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lea",
    "Mo",
    "Nia",
    "Oli",
    "Pia",
]
THINGS = ["parcel", "refund", "invoice", "password", "order", "account", "delivery", "payment", "ticket", "voucher"]
VERBS = ["is late", "went missing", "looks wrong", "was charged twice", "cannot be found", "needs a change"]
ANSWERS = [
    "it is on its way",
    "we checked it today",
    "please wait one more day",
    "the team will look at it",
    "we fixed it this morning",
    "you will get an email soon",
    "it was sent again",
    "we need your order number",
]


def pairs(n: int, seed: int, *, separable: bool = True) -> list[dict[str, str]]:
    """Support tickets with two answers that differ only in their first word: the chosen one starts with the marker
    "Sure:", the rejected one with "Nope:". ``separable=False``: which one is chosen is a coin flip per pair."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = (
            f"Hi, this is {rng.choice(NAMES)}. My {rng.choice(THINGS)} {rng.choice(VERBS)} since {rng.randint(2, 28)} May. "
            f"Case {rng.randint(1000, 9999)}."
        )
        answer = rng.choice(ANSWERS)
        chosen, rejected = f"Sure: {answer}.", f"Nope: {answer}."
        if not separable and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def reward_config(directory: Path, base: Path, *, separable: bool = True, method: str = "lora", **gates) -> Path:
    """A reward run on 96 training and 40 held-out pairs (the make_config defaults otherwise)."""
    train = write_jsonl(directory / "prefs_train.jsonl", pairs(96, 1, separable=separable))
    held_out = write_jsonl(directory / "prefs_eval.jsonl", pairs(40, 2, separable=separable))
    cfg = {
        "name": "tiny-rm",
        "base_model": str(base),
        "seed": 0,
        "data": {"train_data": str(train), "eval_data": str(held_out), "max_length": 96},
        "train": {
            "objective": "reward",
            "method": method,
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 1e-2 if method == "lora" else 1e-3,
            "max_steps": 30,
            "batch_size": 8,
            "save_steps": 10,
        },
        "eval": {"max_new_tokens": 4},
        "gates": {
            "min_accuracy": 0.0,
            "max_harmful_rate": 1.0,
            "max_capability_drop": 1.0,
            "min_reward_accuracy": 0.8,
            **gates,
        },
        "deploy": {"auto_deploy": True},
    }
    path = directory / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory):
    """One reward run of the CLI (`tuneloop run CONFIG --json`) on separable pairs: (config path, summary)."""
    d = tmp_path_factory.mktemp("reward-run")
    path = reward_config(d, tiny_model)
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "run", str(path), "--json"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return path, json.loads(r.stdout)


def test_a_reward_run_from_the_cli_is_gated_on_held_out_pairwise_accuracy_and_registered_with_kind_reward(reward_run):
    from tuneloop import load_config
    from tuneloop.registry.api import open_registry

    path, summary = reward_run
    st = summary["stages"]
    assert summary["overall"] == "passed" and st["deployment"]["status"] == "passed"
    tr = st["training"]["metrics"]
    assert (
        tr["objective"] == "reward"
        and tr["steps"] == 30
        and tr["train_pairs"] == 96
        and tr["overlong_pairs_dropped"] == 0
    )
    assert tr["first_loss"] == pytest.approx(
        0.693, abs=0.05
    )  # a fresh head scores both answers alike: -log sigmoid(~0)
    assert tr["final_loss"] < 0.1 and tr["final_rewards_accuracy"] == 1.0
    run_dir = path.parent / ".tuneloop" / "runs" / summary["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all("rewards/accuracy" in r and "rewards/margin" in r and "rewards/mean_reward" in r for r in rows)

    ev = st["evaluation"]["metrics"]
    assert ev["reward_pairs"] == 40 and ev["reward_accuracy"] >= 0.95 and ev["reward_margin"] > 1.0
    assert "harmful_rate" not in ev and "accuracy" not in ev  # no generation suite ran
    assert "base model" in ev["reference_note"] and "random" in ev["reference_note"] and ev["against"] is None
    gates = ev["gates"]
    g = gates["min_reward_accuracy"]
    assert (
        g["verdict"] == "PASS"
        and g["threshold"] == 0.8
        and g["interval"][0] >= 0.8
        and g["n"] == 40
        and g["method"] == "wilson"
    )
    # The generation gates with a threshold are reported as not applicable, never passed.
    for name in (
        "min_accuracy",
        "max_harmful_rate",
        "max_capability_drop",
        "max_over_refusal_increase",
        "min_preference_accuracy",
    ):
        assert gates[name]["verdict"] == "NOT_APPLIED" and gates[name]["passed"] is None, name
        assert "reward model" in gates[name]["reason"] and "not applicable" in gates[name]["reason"]
    items = [json.loads(x) for x in (run_dir / "eval_items.jsonl").read_text().splitlines()]
    assert len(items) == 40 and all(it["kind"] == "reward" and len(it["candidate_scores"]) == 2 for it in items)
    assert sum(it["candidate_score"] for it in items) == round(ev["reward_accuracy"] * 40)

    cfg = load_config(path)
    reg = open_registry(cfg, path.parent / ".tuneloop")
    v = reg.get("tiny-rm", "champion")
    assert v.lineage["kind"] == "reward" and v.lineage["objective"] == "reward" and v.artifact_kind == "adapter"
    assert v.gates["min_reward_accuracy"]["verdict"] == "PASS"

    # Changing only the floor re-uses the trained model, and a floor no held-out accuracy reaches blocks it.
    from tuneloop import FineTunePipeline

    strict = FineTunePipeline(load_config(path, ["gates.min_reward_accuracy=0.95"])).run()["stages"]
    assert strict["training"]["cached"] is True and strict["evaluation"]["status"] == "failed"
    assert "min_reward_accuracy INCONCLUSIVE" in strict["evaluation"]["error"]  # 40/40 right: lower bound 0.937 < 0.95


def test_the_artifact_loads_with_plain_transformers_and_peft_and_load_reward_model_ranks_chosen_first(
    reward_run, tiny_model
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop import load_config
    from tuneloop.registry.api import open_registry
    from tuneloop.train.reward import load_reward_model

    path, _ = reward_run
    reg = open_registry(load_config(path), path.parent / ".tuneloop")
    artifact = reg.open_artifact("tiny-rm", "champion")
    assert (artifact / "adapter_model.safetensors").is_file() and not list(artifact.glob("*.bin"))
    assert json.loads((artifact / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    held_out = pairs(40, 2)
    rm = load_reward_model("tiny-rm@champion", registry=reg)
    assert rm.source == "tiny-rm:1" and rm.max_length == 96
    prompts = [p["prompt"] for p in held_out]
    chosen, rejected = (
        rm.score(prompts, [p["chosen"] for p in held_out]),
        rm.score(prompts, [p["rejected"] for p in held_out]),
    )
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 38
    # Chat messages give the same scores as strings.
    as_messages = rm.score(
        [[{"role": "user", "content": prompts[0]}]], [[{"role": "assistant", "content": held_out[0]["chosen"]}]]
    )
    assert as_messages[0] == pytest.approx(chosen[0], abs=1e-5)

    # Plain transformers + PEFT, one sequence at a time (no padding): the same scores.
    tok = AutoTokenizer.from_pretrained(str(artifact))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1)
    model = PeftModel.from_pretrained(base, str(artifact)).eval()
    for i in range(3):
        for answer, expected in ((held_out[i]["chosen"], chosen[i]), (held_out[i]["rejected"], rejected[i])):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": answer}],
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )["input_ids"]
            with torch.no_grad():
                assert float(model(input_ids=ids).logits[0, 0]) == pytest.approx(expected, abs=1e-4)

    # The training run's own model directory loads the same way.
    from_dir = load_reward_model(artifact)
    assert from_dir.score(prompts[:2], [p["chosen"] for p in held_out[:2]]) == pytest.approx(chosen[:2], abs=1e-5)


def test_a_version_that_is_not_a_reward_model_is_refused_by_load_reward_model(reward_run, tiny_model):
    from tuneloop import load_config
    from tuneloop.errors import InputError
    from tuneloop.registry.api import open_registry
    from tuneloop.train.reward import load_reward_model

    path, _ = reward_run
    reg = open_registry(load_config(path), path.parent / ".tuneloop")
    reg.register(
        "tiny-chat",
        tiny_model,
        artifact_kind="model",
        base_model=str(tiny_model),
        lineage={"objective": "sft"},
        metrics={},
        gates={},
    )
    with pytest.raises(InputError, match=r"tiny-chat:1 is not a reward model.*train.objective sft"):
        load_reward_model("tiny-chat:1", registry=reg)
    with pytest.raises(InputError, match="not a reward model"):
        load_reward_model(tiny_model)  # a causal LM directory
    with pytest.raises(InputError, match="pass registry="):
        load_reward_model("tiny-rm@champion")


def test_the_gateway_does_not_serve_a_reward_model_as_a_chat_model(reward_run):
    import httpx

    from serve_helpers import install_monitor_standin
    from tuneloop import load_config
    from tuneloop.serve.server import BackgroundServer, build_gateway

    install_monitor_standin()
    path, _ = reward_run
    app = build_gateway(
        load_config(path), path.parent / ".tuneloop"
    )  # preloads every model's champion: tiny-rm@champion
    with BackgroundServer(app) as server:
        for model in ("tiny-rm", "tiny-rm@champion", "tiny-rm:1"):
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert (
                err["code"] == "not_a_chat_model"
                and err["param"] == "model"
                and "tiny-rm:1 is a reward model" in err["message"]
            )
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-rm", "prompt": "hi"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_chat_model"
        loaded = [v["version"] for v in app.state.gateway.backend.loaded()]
        assert not any(v.startswith("tiny-rm") for v in loaded), loaded  # not loaded at start-up either
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200


def test_eval_and_rollout_start_refuse_a_reward_model_with_exit_2(reward_run):
    """`tuneloop eval --model` and `tuneloop rollout start` on a reward model: exit 2 saying why, nothing started."""
    path, _ = reward_run

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "tuneloop.cli", *args], capture_output=True, text=True, timeout=300, cwd=path.parent
        )

    r = cli("eval", str(path), "--model", "tiny-rm:1")
    assert r.returncode == 2 and "tiny-rm:1 is a reward model" in r.stderr and "train.objective: reward" in r.stderr, (
        r.stderr
    )
    r = cli("rollout", "start", "tiny-rm:1", "--config", str(path))
    assert r.returncode == 2 and "tiny-rm:1 is a reward model" in r.stderr and "canary" in r.stderr, r.stderr
    status = cli("rollout", "status", "tiny-rm", "--config", str(path), "--json")
    assert "running" not in status.stdout, status.stdout


def test_random_preferences_give_chance_accuracy_and_a_floor_of_0_8_fails_full_model_loads_with_transformers(
    tmp_path, tiny_model
):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop import FineTunePipeline, load_config

    path = reward_config(tmp_path, tiny_model, separable=False, method="full")
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert (
        summary["overall"] == "failed"
        and st["evaluation"]["status"] == "failed"
        and st["model_registry"]["status"] == "skipped"
    )
    ev = st["evaluation"]["metrics"]
    assert 0.3 <= ev["reward_accuracy"] <= 0.7 and ev["reward_pairs"] == 40
    g = ev["gates"]["min_reward_accuracy"]
    assert g["verdict"] == "FAIL" and g["interval"][1] < 0.8
    assert "min_reward_accuracy FAIL" in st["evaluation"]["error"]
    assert all(v in ("NOT_APPLIED", "FAIL") for v in ev["gate_verdicts"].values())  # nothing else was decided

    stage = json.loads((tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "stages" / "training.json").read_text())
    model_dir = Path(stage["outputs"]["model_dir"])
    assert stage["outputs"]["kind"] == "model" and (model_dir / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir)
    ).eval()  # plain transformers, nothing else
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}], tokenize=False
        )
        for p in pairs(3, 5)
    ]
    with torch.no_grad():
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batched = model(**batch).logits[:, 0]
        single = [float(model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts]
    assert batched.tolist() == pytest.approx(
        single, abs=1e-4
    )  # the score is read at the last real token, padding or not


def test_reward_training_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(tmp_path, tiny_model):
    from tuneloop import load_config
    from tuneloop.data.prepare import prepare_preferences
    from tuneloop.data.validate import validate_dataset
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.reward import train_reward

    path = reward_config(tmp_path, tiny_model)
    cfg = load_config(path, ["train.max_steps=4", "train.save_steps=2", "train.lora_dropout=0.0"])
    rep = validate_dataset(tmp_path / "prefs_train.jsonl", tmp_path / "valid", fmt="preference")
    prepare_preferences(Path(rep["clean_path"]), None, tmp_path / "prep", eval_split=0.1, seed=0)
    tok = load_tokenizer(cfg.base_model)
    work = tmp_path / "work"
    first = train_reward(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert first["resumed_from_step"] == 0
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")  # as if killed after the step-2 checkpoint
    shutil.rmtree(work / "model")
    again = train_reward(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert again["resumed_from_step"] == 2
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-5)
    assert again["final_rewards_margin"] == pytest.approx(first["final_rewards_margin"], abs=1e-5)
    assert [json.loads(x)["step"] for x in (work / "train_metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_the_decidability_preflight_checks_the_reward_floor_and_not_the_generation_gates(tmp_path, tiny_model):
    from tuneloop import load_config
    from tuneloop.preflight import gate_decidability, suite_sizes

    tiny_suite = write_jsonl(tmp_path / "redteam5.jsonl", [{"prompt": f"harmful request {i}"} for i in range(5)])
    path = reward_config(tmp_path, tiny_model, max_harmful_rate=0.01)
    over = ["eval.suites=" + json.dumps([{"kind": "harmful", "path": str(tiny_suite)}])]
    # An SFT run of the same gates is refused: 5 red-team prompts cannot show a harmful rate under 0.01 ...
    sft = load_config(
        path,
        [
            *over,
            "train.objective=sft",
            "data.train_data="
            + str(
                write_jsonl(
                    tmp_path / "c.jsonl",
                    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4,
                )
            ),
            "data.eval_data=null",
        ],
    )
    assert any("gates.max_harmful_rate" in p for p in gate_decidability(sft)[0])
    # ... a reward run generates nothing: only its floor on the 40 held-out pairs is checked.
    cfg = load_config(path, over)
    assert list(suite_sizes(cfg)) == ["reward"] and suite_sizes(cfg)["reward"].n == 40
    problems, _warnings = gate_decidability(cfg)
    assert problems == []
    strict = load_config(path, [*over, "gates.min_reward_accuracy=0.99"])
    problems, _ = gate_decidability(strict)
    assert len(problems) == 1 and "gates.min_reward_accuracy" in problems[0] and "40 pairs" in problems[0]
