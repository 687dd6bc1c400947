"""GRPO (`train.objective: grpo`, `train.rewards`): config errors, the reward checks, and real runs of the pipeline
from the CLI on the tiny model (a few steps, 2 generations per prompt, 4-token completions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tuneloop.config import build_config
from tuneloop.errors import ConfigError
from tuneloop.fsutil import sha256_file

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]

SCORE = '''
def score(prompts, completions, reference, **kwargs):
    """Longer answers score more, up to 1 (a reward anyone can see move)."""
    return [min(len(c[0]["content"]), 8) / 8 for c in completions]
'''


def tl(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _grpo(tmp_path, make_config, rewards, **train):
    """A tiny GRPO config (2 prompts x 2 completions per step, 4 tokens each) with ``rewards``."""
    settings = {
        "objective": "grpo",
        "rewards": rewards,
        "method": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "save_steps": 2,
        **train,
    }
    return make_config(
        train=settings, eval={"max_new_tokens": 4, "max_eval_samples": 6, "suites": ["task", "harmful", "general_text"]}
    )


def _problems(**train) -> list[str]:
    try:
        build_config({"name": "x", "base_model": "org/m", "train_data": "a.jsonl", "train": train})
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_names_the_key_of_each_bad_reward():
    assert _problems(objective="grpo") == [_problems(objective="grpo")[0]]
    assert _problems(objective="grpo")[0].startswith("train.rewards: train.objective grpo needs at least one reward")
    both = _problems(objective="grpo", rewards=[{"metric": "exact"}, {"metric": "exact", "function": "r.py:f"}])
    assert (
        len(both) == 1
        and both[0].startswith("train.rewards[1]: give exactly one of")
        and "metric and function" in both[0]
    )
    unknown = _problems(objective="grpo", rewards=[{"metric": "bleu"}])
    assert unknown[0].startswith("train.rewards[0].metric: bad value 'bleu'") and "token_f1" in unknown[0]
    spec = _problems(objective="grpo", rewards=[{"function": "rewards.py"}])
    assert spec[0].startswith("train.rewards[0].function: 'rewards.py' is not FILE.py:FUNCTION")
    assert _problems(objective="sft", rewards=[{"metric": "exact"}])[0].startswith(
        "train.rewards: rewards score GRPO completions"
    )
    assert _problems(objective="grpo", rewards=[{"metric": "exact", "pattern": "x"}])[0].startswith(
        "train.rewards[0].pattern:"
    )
    ok = build_config(
        {
            "name": "x",
            "base_model": "org/m",
            "train_data": "a.jsonl",
            "train": {
                "objective": "grpo",
                "rewards": [{"metric": "exact"}, {"function": "sub/r.py:score", "weight": 0.5}, {"judge": True}],
            },
        },
        base_dir=Path("/proj"),
    )
    assert [r.kind for r in ok.train.rewards] == ["metric", "function", "judge"]
    assert (
        ok.train.rewards[1].function == "/proj/sub/r.py:score"
        and ok.train.rewards[1].label == "function sub/r.py:score"
    )
    assert ok.train.rewards[1].weight == 0.5 and ok.train.rewards[0].weight == 1.0


def _checked(fn, name="score"):
    from tuneloop.config import RewardSpec
    from tuneloop.train.rewards import CheckedReward, Reward

    return CheckedReward(Reward(1, RewardSpec(function=f"rewards.py:{name}"), name), fn)


def _batch(n=4):
    prompts = [[{"role": "user", "content": f"ticket {i}"}] for i in range(n)]
    completions = [[{"role": "assistant", "content": f"answer {i}"}] for i in range(n)]
    return prompts, completions, [f"ref{i}" for i in range(n)]


def test_checked_reward_names_the_function_and_the_first_bad_item():
    from tuneloop.train.rewards import RewardError

    prompts, completions, refs = _batch()
    good = _checked(lambda prompts, completions, reference, **kw: [1, 0.5, None, True])
    assert good(prompts, completions, reference=refs) == [1.0, 0.5, None, 1.0]

    def raises(prompts, completions, reference, **kw):
        return [1 / (len(r) - 4) for r in reference]  # every reference has 4 characters: fails on item 0

    def raises_on_item_2(prompts, completions, reference, **kw):
        return [{"ref0": 1.0, "ref1": 0.0, "ref3": 1.0}[r] for r in reference]

    cases = [
        (raises, "raised ZeroDivisionError", "item 0 (prompt 'ticket 0', completion 'answer 0', reference 'ref0')"),
        (raises_on_item_2, "raised KeyError: 'ref2'", "item 2 (prompt 'ticket 2'"),
        (
            lambda prompts, completions, **kw: [1.0] * 3,
            "returned 3 rewards for 4 completions",
            "first item: prompt 'ticket 0'",
        ),
        (
            lambda prompts, completions, **kw: [0.0, math.nan, 1.0, 1.0],
            "returned nan for item 1",
            "completion 'answer 1'",
        ),
        (
            lambda prompts, completions, **kw: [0.0, 1.0, "high", 1.0],
            "returned str 'high', not a number for item 2",
            "ticket 2",
        ),
        (
            lambda prompts, completions, **kw: 1.0,
            "returned float 1.0, not a list of one number per completion (4 here)",
            "",
        ),
        (lambda prompts, completions, **kw: None, "returned NoneType None", ""),
    ]
    for fn, what, item in cases:
        with pytest.raises(RewardError) as err:
            _checked(fn)(prompts, completions, reference=refs)
        msg = str(err.value)
        assert msg.startswith("train.rewards[1] (function rewards.py:score)"), msg
        assert what in msg and item in msg, msg


def test_metric_reward_is_the_task_suite_score():
    from tuneloop.evaluate.suites import task_score
    from tuneloop.train.rewards import MetricReward, parse_rating

    prompts, _, _ = _batch(3)
    completions = [[{"role": "assistant", "content": c}] for c in ("Refund.", "the refund please", "shipping")]
    refs = ["refund", "refund", "refund"]
    for metric in ("exact", "contains", "token_f1", "chrf"):
        got = MetricReward(metric)(prompts, completions, reference=refs)
        assert got == [task_score(metric, c[0]["content"], r) for c, r in zip(completions, refs, strict=True)]
    assert MetricReward("exact")(prompts, completions, reference=refs) == [1.0, 0.0, 0.0]
    assert MetricReward("contains")(prompts, completions, reference=refs) == [1.0, 1.0, 0.0]
    assert MetricReward("regex", pattern=r"^ship")(prompts, completions, reference=refs) == [0.0, 0.0, 1.0]
    assert [parse_rating(x) for x in ("7", "Rating: 8/10", "10", "none", "12")] == [7.0, 8.0, 10.0, None, None]


def test_preflight_refuses_a_function_that_cannot_be_imported(tmp_path, make_config):
    (tmp_path / "rewards.py").write_text(
        "import numpy\nimport no_such_module_here\n\ndef score(prompts, completions, **kw):\n    return [0.0]\n"
    )
    (tmp_path / "other.py").write_text(
        "def grade(prompts, completions, **kw):\n    return [0.0 for _ in completions]\n"
    )
    path = _grpo(
        tmp_path,
        make_config,
        [
            {"metric": "exact"},
            {"function": "rewards.py:score"},
            {"function": "other.py:score"},
            {"function": "missing.py:score"},
            {"judge": True},
        ],
    )
    r = tl("run", path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = " ".join(r.stderr.split())  # the console wraps long lines
    assert (
        "train.rewards[1].function: rewards.py:score: rewards.py:2: ModuleNotFoundError: No module named 'no_such_module_here'"
        in err
    )
    assert "train.rewards[2].function: other.py:score: other.py has no function 'score' (it defines: grade)" in err
    assert "train.rewards[3].function: missing.py:score: file not found" in err
    assert (
        "train.rewards[4].judge: a judge reward asks eval.judge's endpoint for a rating, but eval.judge.kind is rules"
        in err
    )
    assert not (tmp_path / ".tuneloop" / "runs").exists() or not any((tmp_path / ".tuneloop" / "runs").iterdir())


def test_grpo_run_from_the_cli_registers_a_version_with_its_rewards(tmp_path, make_config):
    (tmp_path / "rewards.py").write_text(SCORE)
    path = _grpo(
        tmp_path, make_config, [{"metric": "exact"}, {"function": "rewards.py:score", "weight": 0.5}], grpo_beta=0.05
    )
    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items() if v["error"]}
    prep = st["preprocessing"]["metrics"]
    assert (
        prep["objective"] == "grpo"
        and prep["train_samples"] >= 40
        and prep["eval_samples"] == 12
        and prep["dropped"] == 0
    )
    tr = st["training"]["metrics"]
    assert (
        tr["objective"] == "grpo"
        and tr["steps"] == 3
        and tr["num_generations"] == 2
        and tr["train_prompts"] == prep["train_samples"]
    )
    digest = sha256_file(tmp_path / "rewards.py")
    rewards = [
        {"kind": "metric", "name": "exact", "weight": 1.0, "metric": "exact"},
        {"kind": "function", "name": "score", "weight": 0.5, "function": "rewards.py:score", "sha256": digest},
    ]
    assert tr["rewards"] == rewards
    assert 0.0 <= tr["final_reward_score"] <= 1.0 and 0.0 <= tr["final_reward_exact"] <= 1.0
    assert 1 <= tr["final_completion_length"] <= 4

    run_dir = tmp_path / ".tuneloop" / "runs" / summary["run_id"]
    rows = [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        for key in (
            "loss",
            "reward",
            "rewards/exact/mean",
            "rewards/score/mean",
            "rewards/score/std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "kl",
        ):
            assert isinstance(row[key], (int, float)), (key, row)
        assert row["completions/mean_length"] <= 4
        # TRL's reward is the weighted sum of the functions' means
        assert row["reward"] == pytest.approx(row["rewards/exact/mean"] + 0.5 * row["rewards/score/mean"], abs=1e-5)
    assert any(
        row["rewards/score/mean"] > 0 for row in rows
    )  # the model wrote something: the reward is not a silent zero

    show = tl("models", "show", "tiny-bot@champion", "--json", cwd=tmp_path)
    v = json.loads(show.stdout)
    assert v["lineage"]["objective"] == "grpo" and v["lineage"]["rewards"] == rewards
    report = (run_dir / "report.html").read_text()
    assert "Rewards per step" in report and "rewards/score/mean" in report and "Completion length per step" in report
    assert (
        "of the completions of the last steps reached max_completion_length (4 tokens)" in report
    )  # 4 tokens: all cut off

    # Changing the reward function's file (not its name) retrains: its sha256 is in the training cache key.
    (tmp_path / "rewards.py").write_text(SCORE + "\n# same function, another file\n")
    again = tl("run", path, "--json", "-o", "train.max_steps=1")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["stages"]["training"]["cached"] is False


def test_a_reward_function_that_raises_fails_the_training_stage_naming_it(tmp_path, make_config):
    (tmp_path / "rewards.py").write_text(
        "def score(prompts, completions, reference, **kwargs):\n"
        "    return [{'refund': 1.0}[r] for r in reference]  # KeyError on the first ticket that is not a refund\n"
    )
    path = _grpo(tmp_path, make_config, [{"metric": "contains"}, {"function": "rewards.py:score"}], max_steps=2)
    r = tl("run", path, "--json")
    assert r.returncode == 1, r.stderr
    training = json.loads(r.stdout)["stages"]["training"]
    assert training["status"] == "failed"
    error = training["error"]
    assert error.startswith("train.rewards[1] (function rewards.py:score) raised KeyError: "), error
    assert "on item " in error and "prompt '" in error and "completion '" in error and "reference '" in error
    assert "Traceback" not in r.stderr


def test_reward_hacking_flags():
    from tuneloop.report.rewards import hacking_flags

    rising = [{"step": i, "reward": 0.1 * i, "completions/clipped_ratio": 0.9 if i > 4 else 0.0} for i in range(1, 7)]
    flags = hacking_flags(
        rising, {"max_completion_length": 64}, {"accuracy": 0.40, "base_accuracy": 0.55, "against": "base"}
    )
    assert len(flags) == 2
    assert flags[0].startswith(
        "The mean reward rose (0.15 in the first third of the steps, 0.55 in the last) while the task "
        "accuracy fell (0.55 for the base, 0.4 for the candidate)"
    )
    assert flags[1].startswith("90% of the completions of the last steps reached max_completion_length (64 tokens)")
    held = hacking_flags(
        [{**r, "completions/clipped_ratio": 0.2} for r in rising], {}, {"accuracy": 0.6, "base_accuracy": 0.55}
    )
    assert held == []
    falling = [{**r, "reward": 1 - 0.1 * r["step"], "completions/clipped_ratio": 0.0} for r in rising]
    assert hacking_flags(falling, {}, {"accuracy": 0.4, "base_accuracy": 0.55}) == []


class _Rater(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible judge (a process boundary: no judge model runs here): fails the first request
    with HTTP 500, then rates 9 when the answer matches the reference and 2 otherwise; "mumble" gets no number."""

    calls = 0

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        if type(self).calls == 1:
            self.send_response(500)
            self.end_headers()
            return
        answer = text.split("[ANSWER]\n")[1].split("\n[/ANSWER]")[0]
        reference = text.split("[REFERENCE ANSWER]\n")[1].split("\n[/REFERENCE ANSWER]")[0]
        reply = "I am not sure." if answer == "mumble" else "Rating: 9/10" if answer == reference else "2"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_judge_reward_rates_each_completion_on_the_configured_endpoint():
    import threading

    from tuneloop.config import JudgeConfig
    from tuneloop.train.rewards import JudgeReward, RewardError

    _Rater.calls = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Rater)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = JudgeReward(
            JudgeConfig(kind="openai", url=f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m", max_retries=1)
        )
        prompts, _, _ = _batch(2)
        completions = [[{"role": "assistant", "content": c}] for c in ("refund", "shipping")]
        assert judge(prompts, completions, reference=["refund", "refund"]) == [0.9, 0.2]  # after one HTTP 500, retried
        assert _Rater.calls == 3
        with pytest.raises(
            RewardError, match=r"gave no rating after 2 tries: no 0-10 rating in the reply 'I am not sure.'"
        ):
            judge(prompts[:1], [[{"role": "assistant", "content": "mumble"}]], reference=["refund"])
    finally:
        srv.shutdown()


def test_a_registered_reward_model_scores_grpo_completions_and_a_chat_model_is_refused(
    tmp_path, make_config, tiny_model
):
    import yaml

    from test_reward_model import reward_config

    rm_path = reward_config(tmp_path / "rm", tiny_model)  # tiny-rm: a reward model trained on the tiny model
    rm_cfg = yaml.safe_load(rm_path.read_text())
    rm_path.write_text(yaml.safe_dump({**rm_cfg, "workspace": str(tmp_path / ".tuneloop")}))  # the GRPO run's workspace
    assert tl("run", rm_path).returncode == 0

    path = _grpo(tmp_path, make_config, [{"model": "tiny-rm@champion"}, {"metric": "exact"}], max_steps=2)
    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stages"]
    tr = st["training"]["metrics"]
    assert tr["rewards"][0]["model"] == "tiny-rm@champion" and tr["rewards"][0]["version"] == "tiny-rm:1"
    assert len(tr["rewards"][0]["artifact_sha256"]) == 64
    assert isinstance(tr["final_reward_tiny-rm"], float)

    # tiny-bot:1 (the GRPO run just registered) is a chat model, not a reward model: exit 2 before any work.
    refused = tl("run", _grpo(tmp_path, make_config, [{"model": "tiny-bot@champion"}]))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.rewards[0].model: tiny-bot:1 is not a reward model: its lineage has no `kind: reward`" in " ".join(
        refused.stderr.split()
    )


def test_prompts_keep_the_final_assistant_turn_as_reference_and_drop_what_cannot_be_a_prompt(tmp_path, tiny_model):
    from datasets import load_from_disk

    from conftest import write_jsonl
    from tuneloop.data.prepare import prepare_prompts
    from tuneloop.modeling import load_tokenizer

    ask = {"role": "user", "content": "Where is my parcel?"}
    records = [
        {
            "messages": [{"role": "system", "content": "Route it."}, ask, {"role": "assistant", "content": "shipping"}],
            "_line": 1,
        },
        {"messages": [ask, {"role": "assistant", "content": "refund"}], "label": False, "_line": 2},
        {"text": "plain text", "_line": 3},
        {
            "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "other"}],
            "_line": 4,
        },
    ]
    evals = [{"messages": [ask, {"role": "assistant", "content": "shipping"}]}]
    m = prepare_prompts(
        load_tokenizer(str(tiny_model)),
        write_jsonl(tmp_path / "t.jsonl", records),
        write_jsonl(tmp_path / "e.jsonl", evals),
        tmp_path / "out",
        max_length=64,
        eval_split=0.1,
        seed=0,
    )
    assert m["train_samples"] == 1 and m["eval_samples"] == 1 and m["dropped"] == 3
    ds = load_from_disk(str(tmp_path / "out" / "train"))
    assert ds[0] == {"prompt": [{"role": "system", "content": "Route it."}, ask], "reference": "shipping"}
    reasons = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert [r["line"] for r in reasons] == [2, 3, 4]
    assert "kto label false" in reasons[0]["reason"] and "text record" in reasons[1]["reason"]
    assert "over data.max_length=64" in reasons[2]["reason"]
    item = json.loads((tmp_path / "out" / "eval.jsonl").read_text())
    assert item["messages"] == [ask] and item["reference"] == "shipping"


def test_grpo_resumes_from_its_checkpoint(tmp_path, make_config, task_data):
    import shutil

    from tuneloop import load_config
    from tuneloop.data.prepare import prepare_prompts
    from tuneloop.modeling import load_tokenizer
    from tuneloop.train.grpo import train_grpo

    cfg = load_config(
        _grpo(tmp_path, make_config, [{"metric": "contains"}], max_steps=4, save_steps=2, lora_dropout=0.0)
    )
    tok = load_tokenizer(cfg.base_model)
    prepare_prompts(tok, task_data[0], None, tmp_path / "prep", max_length=96, eval_split=0.1, seed=0)
    work = tmp_path / "run"
    first = train_grpo(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert first["resumed_from_step"] == 0 and first["steps"] == 4
    # As if killed after the step-2 checkpoint: later checkpoints and the model never got written.
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    shutil.rmtree(work / "model")
    again = train_grpo(cfg, tmp_path / "prep" / "train", work, tokenizer=tok)
    assert again["resumed_from_step"] == 2
    rows = [json.loads(x) for x in (work / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (work / "model" / "adapter_model.safetensors").is_file()
    assert again["final_reward"] == pytest.approx(first["final_reward"], abs=1e-6)  # same sampling after the resume


def test_use_vllm_is_refused_where_it_cannot_run(tmp_path, make_config):
    """`train.use_vllm` is checked before any work: this CPU machine has no CUDA (and no vllm), and another objective
    generates nothing (the GPU path itself is not run in CI)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the refusal is for machines without one")
    path = _grpo(tmp_path, make_config, [{"metric": "exact"}], use_vllm=True)
    r = tl("run", path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "train.use_vllm: needs a CUDA GPU" in err, r.stderr
    sft = make_config(train={"use_vllm": True, "max_steps": 1})
    r = tl("run", sft)
    assert r.returncode == 2 and "train.use_vllm: generates GRPO's completions; train.objective is sft" in " ".join(
        r.stderr.split()
    )
