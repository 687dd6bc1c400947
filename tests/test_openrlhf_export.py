"""`tuneloop export-config --to openrlhf`, checked against OpenRLHF's own argument parsers (tests/openrlhf_parser.py).

OpenRLHF cannot train here (no GPU, no deepspeed): what is checked is that every exported command is accepted by
the parser of the OpenRLHF CLI module it launches and by that module's checks after parsing, with tuneloop's
placeholders filled as `train.backend: command` fills them; that the arguments mean what the config says; and, with
a stand-in launcher (tests/openrlhf_standin.py) that reads the data through OpenRLHF's own preprocess_data and saves
the model the way OpenRLHF's save_model does, that `tuneloop run` picks up, gates and registers what it wrote.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openrlhf_parser import INSTALL, Rejected, openrlhf_args, openrlhf_dir, openrlhf_function
from tuneloop import FineTunePipeline, load_config
from tuneloop.errors import ConfigError
from tuneloop.train.external import PLACEHOLDERS
from tuneloop.train.openrlhf import export_openrlhf, openrlhf_command

pytestmark = pytest.mark.skipif(
    openrlhf_dir() is None,
    reason=f"openrlhf is not installed; {INSTALL} (its argument "
    "parsers are what these tests check the exported commands against)",
)

README = Path(__file__).parents[1] / "README.md"
STANDIN = Path(__file__).with_name("openrlhf_standin.py")


def _pairs(path: Path, n: int, seed: int) -> Path:
    from tuneloop.demo.tickets import LABELS, task_records

    rows = []
    for r in task_records(n, seed=seed):
        right = r["messages"][-1]["content"]
        wrong = LABELS[(LABELS.index(right) + 1) % len(LABELS)]
        rows.append({"prompt": r["messages"][:-1], "chosen": right, "rejected": wrong})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


@pytest.fixture
def pref_data(tmp_path) -> tuple[Path, Path]:
    return _pairs(tmp_path / "pairs.jsonl", 24, 3), _pairs(tmp_path / "pairs_eval.jsonl", 8, 4)


def _fill(cfg, command: str, where: Path) -> str:
    """``command`` with its placeholders filled the way ``train.backend: command`` fills them (external.run_command)."""
    t = cfg.train
    values = {
        "base_model": cfg.base_model,
        "train_file": where / "train_records.jsonl",
        "eval_file": where / "eval_records.jsonl",
        "output_dir": where / "external_output",
        "config_file": where / "tuneloop_config.yaml",
        "seed": cfg.seed,
        "method": t.method,
        "objective": t.objective,
        "learning_rate": t.learning_rate,
        "num_epochs": t.num_epochs,
        "max_steps": t.max_steps or 0,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "lora_r": t.lora_r,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "max_length": cfg.data.max_length,
    }
    assert set(values) == set(PLACEHOLDERS)  # every placeholder a command may use
    return command.format(**{k: shlex.quote(str(v)) for k, v in values.items()})


def _launch(filled: str) -> tuple[str, list[str], list[str]]:
    """(OpenRLHF module, its arguments, the words after `&&`) of a filled deepspeed command."""
    words = shlex.split(filled)
    after = words[words.index("&&") + 1 :] if "&&" in words else []
    words = words[: words.index("&&")] if "&&" in words else words
    assert words[:2] == ["deepspeed", "--num_gpus"] and words[3] == "--module", words[:5]
    return words[4], words[5:], after


def test_the_check_rejects_what_openrlhf_rejects():
    """The check can fail: an unknown option, a malformed value and a failed check after parsing are each refused."""
    ok = openrlhf_args(
        "openrlhf.cli.train_sft", ["--model.model_name_or_path", "m", "--data.apply_chat_template", "--data.multiturn"]
    )
    assert ok.model.model_name_or_path == "m" and ok.data.multiturn is True
    with pytest.raises(Rejected, match="unrecognized arguments: --actor.model_name_or_path"):
        # the name OpenRLHF's own README gives train_sft; its 0.11.2 parser has --model.model_name_or_path
        openrlhf_args("openrlhf.cli.train_sft", ["--actor.model_name_or_path", "m"])
    with pytest.raises(Rejected, match="invalid int value: '3.0'"):
        openrlhf_args("openrlhf.cli.train_sft", ["--train.max_epochs", "3.0"])
    with pytest.raises(Rejected, match="apply_chat_template must be enabled"):
        openrlhf_args("openrlhf.cli.train_sft", ["--data.multiturn"])


CASES = {
    "sft-lora": dict(objective="sft", method="lora"),
    "sft-full": dict(objective="sft", method="full", gradient_checkpointing=True),
    "sft-qlora-modules": dict(objective="sft", method="qlora", target_modules=["q_proj", "v_proj"], precision="bf16"),
    "dpo-lora": dict(objective="dpo", method="lora", dpo_beta=0.25),
    "dpo-full": dict(objective="dpo", method="full", precision="fp16"),
    "reward-full": dict(objective="reward", method="full"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_commands_pass_openrlhfs_parser(case, make_config, pref_data, tmp_path):
    train = {
        **CASES[case],
        "num_epochs": 2,
        "batch_size": 4,
        "gradient_accumulation_steps": 3,
        "learning_rate": 5e-5,
        "max_steps": None,
    }
    data = (
        {}
        if train["objective"] == "sft"
        else {"data__train_data": str(pref_data[0]), "data__eval_data": str(pref_data[1])}
    )
    cfg = load_config(make_config(train=train, **data))
    text = export_openrlhf(cfg)
    snippet = yaml.safe_load(text)["train"]
    assert snippet["backend"] == "command" and snippet["objective"] == cfg.train.objective
    assert snippet["command"] == openrlhf_command(cfg)  # the YAML holds the command exactly

    module, argv, after = _launch(_fill(cfg, snippet["command"], tmp_path))
    assert (
        module
        == {"sft": "openrlhf.cli.train_sft", "dpo": "openrlhf.cli.train_dpo", "reward": "openrlhf.cli.train_rm"}[
            cfg.train.objective
        ]
    )
    a = openrlhf_args(module, argv)  # raises Rejected on anything OpenRLHF's parser or its checks refuse

    t = cfg.train
    assert a.model.model_name_or_path == cfg.base_model and a.ckpt.output_dir == str(tmp_path / "external_output")
    assert a.data.dataset == str(tmp_path / "train_records.jsonl") and a.eval.dataset == str(
        tmp_path / "eval_records.jsonl"
    )
    assert a.eval.split == "train"  # a JSON file's one split (train_dpo's default, "test", would find nothing)
    assert a.data.max_len == cfg.data.max_length and a.train.seed == cfg.seed and a.adam.lr == t.learning_rate
    assert a.train.micro_batch_size == 4 and a.train.batch_size == 12 and a.train.max_epochs == 2
    assert tuple(a.adam.betas) == (0.9, 0.999) and a.lr_scheduler == t.lr_scheduler and a.lr_warmup_ratio == 0
    assert a.ds.zero_stage == 2 and a.ds.param_dtype == ("fp16" if t.precision == "fp16" else "bf16")
    assert a.model.gradient_checkpointing_enable is t.gradient_checkpointing
    if t.method == "full":
        assert a.ds.lora.rank == 0 and a.ds.load_in_4bit is False
    else:
        assert (a.ds.lora.rank, a.ds.lora.alpha, a.ds.lora.dropout) == (t.lora_r, t.lora_alpha, t.lora_dropout)
        assert a.ds.load_in_4bit is (t.method == "qlora")
        assert a.ds.lora.target_modules == (t.target_modules if isinstance(t.target_modules, list) else "all-linear")
    if t.objective == "sft":
        assert (a.data.input_key, a.data.apply_chat_template, a.data.multiturn) == ("messages", True, True)
        assert a.data.output_key is None and a.model.pretrain_mode_enable is False
    else:
        assert (a.data.prompt_key, a.data.chosen_key, a.data.rejected_key) == ("messages", "chosen", "rejected")
        assert a.data.apply_chat_template is True
    if t.objective == "dpo":
        assert a.model.beta == t.dpo_beta and a.ref.model_name_or_path == cfg.base_model
    if t.objective == "reward":
        assert a.model.loss_type == "sigmoid" and a.ds.value_head_prefix == "score"
        assert after == ["python", "-m", "tuneloop.train.openrlhf", "reward-config", str(tmp_path / "external_output")]
    else:
        assert after == []


def test_the_cli_writes_the_snippet(make_config, tmp_path):
    path = make_config()
    out = tmp_path / "openrlhf.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "openrlhf", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(out.read_text())["train"]["command"] == openrlhf_command(load_config(path))
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "trlx"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "expected axolotl, llamafactory or openrlhf" in r.stderr


def test_a_custom_chat_template_reaches_openrlhf_verbatim_through_the_shell(make_config, tmp_path):
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m[\"content\"] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    cfg = load_config(make_config(data__chat_template=template))
    command = openrlhf_command(cfg)
    assert "data.chat_template" in export_openrlhf(cfg)
    filled = _fill(cfg, command, tmp_path)
    # The words the shell gives the launcher (run_command runs the command with a shell).
    r = subprocess.run(
        ["bash", "-c", filled.replace("deepspeed ", "printf '%s\\0' ", 1)], capture_output=True, text=True, check=True
    )
    words = r.stdout.split("\0")[:-1]
    a = openrlhf_args(words[3], words[4:])
    assert a.data.tokenizer_chat_template == template


def test_settings_openrlhf_has_no_equivalent_for(make_config, pref_data, tmp_path):
    cfg = load_config(make_config(train={"max_steps": 6, "warmup_steps": 10, "report_to": "tensorboard"}))
    text = export_openrlhf(cfg)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("train.max_steps 6 is not carried" in c for c in comments)
    assert any("train.warmup_steps 10 is not carried" in c and "--lr_warmup_ratio" in c for c in comments)
    assert any("train.report_to tensorboard is not carried" in c for c in comments)
    assert "--lr_warmup_ratio" not in openrlhf_command(cfg)  # left to OpenRLHF's default, as the comment says

    # What would change what is trained, or leave a model tuneloop cannot load, is refused, every problem at once.
    cfg = load_config(
        make_config(train={"use_dora": True, "precision": "fp32", "num_epochs": 1.5, "train_on_inputs": True})
    )
    with pytest.raises(ConfigError) as exc:
        openrlhf_command(cfg)
    keys = [p.split(":")[0] for p in exc.value.problems]
    assert keys == ["train.use_dora", "train.precision", "train.num_epochs", "train.train_on_inputs"], (
        exc.value.problems
    )
    cfg = load_config(
        make_config(
            train={"objective": "reward", "method": "lora"},
            data__train_data=str(pref_data[0]),
            data__eval_data=str(pref_data[1]),
        )
    )
    with pytest.raises(ConfigError, match="without its score head"):
        openrlhf_command(cfg)


@pytest.mark.parametrize(
    "objective,needle",
    [
        ("kto", "no KTO trainer"),
        ("orpo", "no ORPO trainer"),
        ("simpo", "no SimPO trainer"),
        ("grpo", "metric exact is tuneloop's own reward"),
    ],
)
def test_objectives_openrlhf_cannot_train_are_refused(objective, needle, make_config):
    extra = {"rewards": [{"metric": "exact"}]} if objective == "grpo" else {}
    path = make_config(train={"objective": objective, **extra})
    with pytest.raises(ConfigError, match=needle):
        openrlhf_command(load_config(path))
    if objective == "kto":
        r = subprocess.run(
            [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "openrlhf"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and "train.objective: kto cannot be exported to OpenRLHF" in r.stderr
        assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ tuneloop runs the command (stand-in launcher)


def _standin_path(tmp_path: Path) -> dict[str, str]:
    """PATH with `deepspeed` -> the stand-in, `python` -> this interpreter (the one tuneloop is installed in), and
    `python3` -> the stand-in for `-m openrlhf.cli.train_ppo_ray`, else this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("deepspeed", f"{sys.executable} {STANDIN}"), ("python", sys.executable)):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\nif [ "$1 $2" = "-m openrlhf.cli.train_ppo_ray" ]; then shift 2; '
        f'exec {sys.executable} {STANDIN} --ppo "$@"; fi\nexec {sys.executable} "$@"\n'
    )
    (bin_dir / "python3").chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OPENRLHF_STANDIN_LOG": str(tmp_path / "standin.json"),
    }


@pytest.mark.slow
def test_tuneloop_runs_the_exported_sft_command_and_registers_the_adapter(make_config, tmp_path, monkeypatch):
    for k, v in _standin_path(tmp_path).items():
        monkeypatch.setenv(k, v)
    path = make_config(train={"method": "lora", "num_epochs": 1, "max_steps": None})
    command = yaml.safe_load(export_openrlhf(load_config(path)))["train"]["command"]
    path = make_config(
        train={"method": "lora", "num_epochs": 1, "max_steps": None, "backend": "command", "command": command}
    )
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items()}
    assert st["training"]["metrics"]["kind"] == "adapter" and st["training"]["metrics"]["backend"] == "command"
    log = (tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "logs" / "training.log").read_text()
    assert "every record read through OpenRLHF's preprocess_data" in log
    assert json.loads((tmp_path / "standin.json").read_text())["module"] == "openrlhf.cli.train_sft"
    assert st["model_registry"]["status"] == "passed"


@pytest.mark.slow
def test_tuneloop_scores_gates_and_registers_an_openrlhf_reward_model(make_config, pref_data, tmp_path, monkeypatch):
    from tuneloop.train.reward import load_reward_model

    for k, v in _standin_path(tmp_path).items():
        monkeypatch.setenv(k, v)
    common = dict(
        data__train_data=str(pref_data[0]), data__eval_data=str(pref_data[1]), gates={"min_reward_accuracy": 0.0}
    )
    train = {"objective": "reward", "method": "full", "num_epochs": 1, "max_steps": None}
    command = openrlhf_command(load_config(make_config(train=train, **common)))
    path = make_config(train={**train, "backend": "command", "command": command}, **common)
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items()}
    log = (tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "logs" / "training.log").read_text()
    assert "is now a LlamaForSequenceClassification with one output" in log
    assert st["evaluation"]["metrics"]["reward_pairs"] == 8 and "reward_accuracy" in st["evaluation"]["metrics"]

    # tuneloop reads back the head OpenRLHF's RewardModel saved (not a new random one): the same score.
    standin = json.loads((tmp_path / "standin.json").read_text())
    assert standin["architectures"] == ["RewardModel"]  # what OpenRLHF's save_pretrained writes
    model_dir = Path(
        json.loads((tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "stages" / "training.json").read_text())[
            "outputs"
        ]["model_dir"]
    )
    rm = load_reward_model(model_dir)
    pair = standin["pair"]
    assert rm.score([pair["messages"]], [pair["chosen"]])[0] == pytest.approx(standin["score"], abs=1e-5)


def test_reward_config_refuses_what_is_not_a_sequence_classifier(tmp_path, tiny_model):
    """A causal LM (no score head in its weights) is refused rather than loaded with a random head."""
    import shutil

    from tuneloop.train.openrlhf import main

    d = tmp_path / "lm"
    shutil.copytree(tiny_model, d)
    assert main(["reward-config", str(d)]) == 2
    assert main(["reward-config", str(tmp_path / "missing")]) == 2
    assert main(["nonsense"]) == 2


# ---------------------------------------------------------------------------------------------- PPO (README)


def _readme_ppo_snippet() -> dict:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if "openrlhf.cli.train_ppo_ray" in b]
    assert len(found) == 1, "README: expected one yaml block with the train_ppo_ray command"
    return yaml.safe_load(found[0])


def test_the_readme_ppo_command_passes_openrlhfs_parser(make_config, tmp_path):
    snippet = _readme_ppo_snippet()["train"]
    assert snippet["backend"] == "command"
    cfg = load_config(make_config(train={"objective": snippet["objective"]}))
    filled = _fill(cfg, snippet["command"], tmp_path)
    words = shlex.split(filled)
    prep, ppo = words[: words.index("&&")], words[words.index("&&") + 1 :]
    assert prep[:4] == ["python", "-m", "tuneloop.train.openrlhf", "prompts"]
    assert ppo[:3] == ["python3", "-m", "openrlhf.cli.train_ppo_ray"]
    a = openrlhf_args("openrlhf.cli.train_ppo_ray", ppo[3:])
    assert a.actor.model_name_or_path == cfg.base_model and a.ckpt.output_dir == str(tmp_path / "external_output")
    assert (
        a.reward.model_name_or_path
        and a.algo.advantage.estimator == "gae"
        and a.critic.model_name_or_path == a.reward.model_name_or_path
    )
    assert a.data.prompt_dataset == prep[5] and a.data.input_key == "prompt" and a.data.apply_chat_template is True

    # The prompts step turns the run's training records into what OpenRLHF's PromptDataset reads.
    from tuneloop.demo.tickets import task_records
    from tuneloop.train.openrlhf import main

    records = tmp_path / "train_records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in task_records(5, seed=1)))
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", str(records), str(out)]) == 0
    preprocess = openrlhf_function(
        "datasets/prompts_dataset.py",
        "preprocess_data",
        _str_to_content_list=lambda text: text,
        copy=__import__("copy"),
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    for rec, src in zip(map(json.loads, out.read_text().splitlines()), task_records(5, seed=1), strict=True):
        prompt, label = preprocess(rec, None, a.data.input_key, "reference", tok.apply_chat_template)
        assert prompt == tok.apply_chat_template(src["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert label == src["messages"][-1]["content"]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": []}) + "\n")
    assert main(["prompts", str(bad), str(out)]) == 2


def test_a_full_tuneloop_reward_model_loads_as_openrlhfs_reward_model(tiny_model, tmp_path):
    """What the README says for PPO: a full reward model tuneloop registered (a transformers sequence-classification
    model, exported with `tuneloop models export`) loads with OpenRLHF's RewardModel class, its head included."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tuned = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tuned.save_pretrained(tmp_path / "rm")
    config = AutoConfig.from_pretrained(tmp_path / "rm")
    config.normalize_reward = False
    base_class = AutoModel._model_mapping[type(config)]
    from typing import Optional

    get_reward_model = openrlhf_function(
        "models/model.py", "_get_reward_model", nn=nn, torch=torch, Optional=Optional, AutoConfig=AutoConfig
    )
    cls = get_reward_model(base_class.__base__, base_class, "score", False)
    theirs, info = cls.from_pretrained(tmp_path / "rm", config=config, output_loading_info=True)
    assert not info["missing_keys"], info
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "refund"}]
    ids = torch.tensor([list(tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = tuned.eval()(input_ids=ids, attention_mask=mask).logits[0, 0]
        assert float(theirs.eval()(ids, attention_mask=mask)[0]) == pytest.approx(float(ours), abs=1e-5)


# ------------------------------------------------------------------- GRPO (train_ppo_ray --algo.advantage.estimator group_norm)

REWARD_FN = """
def score(prompts, completions, reference, **kwargs):
    assert isinstance(prompts[0], list) and prompts[0][-1]["role"] == "user", prompts  # tuneloop's conversational prompt
    assert completions[0][0]["role"] == "assistant"
    return [float(c[0]["content"] == r) + len(p) / 10 for p, c, r in zip(prompts, completions, reference)]

def broken(prompts, completions, reference, **kwargs):
    return [float("nan") for _ in completions]
"""


def _reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FN)
    return path


def _register_reward_model(
    cfg_path: Path, tiny_model: Path, *, kind: str = "reward", name: str = "tiny-rm", tokenizer=None
) -> None:
    """NAME:1 (alias champion), a full one-output sequence-classification model on the tiny model's tokenizer (or
    ``tokenizer``), not trained."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop.registry.api import open_registry

    torch.manual_seed(0)
    d = cfg_path.parent / name
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(d)
    (tokenizer or AutoTokenizer.from_pretrained(tiny_model)).save_pretrained(d)
    reg = open_registry(load_config(cfg_path), cfg_path.parent / ".tuneloop")
    reg.register(
        name,
        d,
        artifact_kind="model",
        base_model=str(d),
        lineage={"kind": kind} if kind else {"objective": "sft"},
        metrics={},
        gates={},
    )
    reg.set_alias(name, "champion", 1)


def _ppo_words(filled: str) -> tuple[list[list[str]], list[str]]:
    """(the steps before train_ppo_ray, each a word list; train_ppo_ray's arguments) of a filled grpo command."""
    words = shlex.split(filled)
    steps, cur = [], []
    for w in words:
        if w == "&&":
            steps.append(cur)
            cur = []
        else:
            cur.append(w)
    assert cur[:3] == ["python3", "-m", "openrlhf.cli.train_ppo_ray"], cur[:3]
    return steps, cur[3:]


GRPO = {
    "objective": "grpo",
    "num_generations": 4,
    "max_completion_length": 32,
    "temperature": 0.8,
    "batch_size": 2,
    "gradient_accumulation_steps": 3,
    "learning_rate": 5e-6,
    "num_epochs": 2,
    "max_steps": None,
}


@pytest.mark.parametrize("case", ["function-lora", "model-full-kl"])
def test_exported_grpo_commands_pass_openrlhfs_ppo_parser(case, make_config, tiny_model, tmp_path):
    if case == "function-lora":
        train = {**GRPO, "method": "lora", "rewards": [{"function": "rewards.py:score"}]}
        _reward_file(tmp_path)
    else:
        train = {
            **GRPO,
            "method": "full",
            "grpo_beta": 0.04,
            "loss_type": "grpo",
            "gradient_checkpointing": True,
            "rewards": [{"model": "tiny-rm@champion"}],
        }
        _register_reward_model(make_config(), tiny_model)
    cfg = load_config(make_config(train=train))
    text = export_openrlhf(cfg)
    snippet = yaml.safe_load(text)["train"]
    assert snippet == {"objective": "grpo", "backend": "command", "command": openrlhf_command(cfg)}
    assert "it has not run it" in text  # the comments say the command was only parsed, not run

    steps, argv = _ppo_words(_fill(cfg, snippet["command"], tmp_path))
    a = openrlhf_args("openrlhf.cli.train_ppo_ray", argv)  # OpenRLHF's parser and its checks after parsing

    t = cfg.train
    prompts = str(tmp_path / "external_output" / ".." / "openrlhf_prompts.jsonl")
    assert steps[0] == [
        "python",
        "-m",
        "tuneloop.train.openrlhf",
        "prompts",
        str(tmp_path / "train_records.jsonl"),
        prompts,
    ]
    assert a.algo.advantage.estimator == "group_norm" and a.critic.model_name_or_path is None  # no critic: GRPO
    assert a.actor.model_name_or_path == cfg.base_model and a.ckpt.output_dir == str(tmp_path / "external_output")
    assert a.data.prompt_dataset == prompts and a.data.input_key == "prompt" and a.data.apply_chat_template is True
    assert a.rollout.n_samples_per_prompt == 4 and a.rollout.max_new_tokens == 32 and a.rollout.temperature == 0.8
    assert a.data.max_len == cfg.data.max_length + 32
    # One optimizer step per rollout of batch_size x accumulation x GPUs prompts, as TRL's GRPO.
    assert (
        a.rollout.batch_size == 6
        and a.train.batch_size == 24
        and a.train.micro_batch_size == 8
        and a.train.max_epochs == 1
    )
    assert a.train.num_episodes == 2 and a.train.seed == cfg.seed and a.actor.adam.lr == 5e-6
    assert (
        tuple(a.actor.adam.betas) == (0.9, 0.999)
        and a.actor.lr_scheduler == t.lr_scheduler
        and a.actor.lr_warmup_ratio == 0
    )
    assert (
        a.ds.zero_stage == 2 and a.ds.param_dtype == "bf16" and a.vllm.num_engines == 1 and a.train.colocate_all is True
    )
    if case == "function-lora":
        assert (a.ds.lora.rank, a.ds.lora.alpha, a.ds.lora.dropout) == (t.lora_r, t.lora_alpha, t.lora_dropout)
        assert (
            a.algo.kl.init_coef == 0 and a.algo.kl.use_loss is False
        )  # beta 0: train_ppo_ray creates no reference model
        assert a.actor.loss_agg_mode == "token-mean"  # dapo
        reward_file = str(tmp_path / "external_output" / ".." / "openrlhf_reward.py")
        assert steps[1] == [
            "python",
            "-m",
            "tuneloop.train.openrlhf",
            "reward-func",
            f"{tmp_path / 'rewards.py'}:score",
            cfg.base_model,
            reward_file,
        ]
        assert (
            a.reward.remote_url == [reward_file]
            and a.data.label_key == "tuneloop_reward"
            and a.reward.model_name_or_path is None
        )
    else:
        assert a.ds.lora.rank == 0 and a.actor.gradient_checkpointing_enable is True
        assert a.algo.kl.init_coef == 0.04 and a.algo.kl.use_loss is True and a.algo.kl.estimator == "k3"  # TRL's beta
        assert a.actor.loss_agg_mode == "seq-mean-token-mean"  # grpo
        assert len(steps) == 1 and a.reward.remote_url is None
        rm = Path(a.reward.model_name_or_path)
        assert json.loads((rm / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
        assert ".tuneloop" in rm.parts  # the registered artifact, in the workspace's store


def test_what_openrlhfs_grpo_cannot_carry_is_refused(make_config, tiny_model, tmp_path):
    _reward_file(tmp_path)
    cases = [
        ([{"metric": "exact"}], "train.rewards[0].metric", "metric exact is tuneloop's own reward"),
        ([{"judge": True}], "train.rewards[0].judge", "the judge (eval.judge) is tuneloop's own reward"),
        ([{"function": "rewards.py:score"}, {"metric": "exact"}], "train.rewards", "2 rewards"),
        ([{"function": "rewards.py:score", "weight": 2.0}], "train.rewards[0].weight", "set the weight to 1"),
        ([{"model": "tiny-rm@champion"}], "train.rewards[0].model", "not a reward model"),
        ([{"model": "other-rm@champion"}], "train.rewards[0].model", "has another tokenizer than base_model"),
    ]
    from tuneloop.demo.base_model import make_tokenizer
    from tuneloop.demo.corpus import general_corpus

    _register_reward_model(make_config(), tiny_model, kind="")  # tiny-rm:1 is registered as a chat model
    _register_reward_model(
        make_config(), tiny_model, name="other-rm", tokenizer=make_tokenizer(general_corpus(50, seed=3), vocab_size=300)
    )
    for rewards, key, needle in cases:
        with pytest.raises(ConfigError) as exc:
            openrlhf_command(load_config(make_config(train={**GRPO, "rewards": rewards})))
        assert any(p.startswith(key + ":") and needle in p for p in exc.value.problems), exc.value.problems
    with pytest.raises(ConfigError) as exc:
        openrlhf_command(
            load_config(
                make_config(
                    train={**GRPO, "rewards": [{"function": "rewards.py:score"}], "loss_type": "bnpo"},
                    data__chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
                )
            )
        )
    assert [p.split(":")[0] for p in exc.value.problems] == ["train.loss_type", "data.chat_template"], (
        exc.value.problems
    )
    path = make_config(train={**GRPO, "rewards": [{"metric": "exact"}]})
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "export-config", str(path), "--to", "openrlhf"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "train.rewards[0].metric" in r.stderr and "Traceback" not in r.stderr


def _executor(agent_source_names):
    """OpenRLHF's SingleTurnAgentExecutor (openrlhf/utils/agent.py), the class that loads and calls reward_func."""
    import asyncio
    import copy
    import itertools
    import logging

    return openrlhf_function(
        "utils/agent.py",
        "SingleTurnAgentExecutor",
        AgentExecutorBase=object,
        asyncio=asyncio,
        deepcopy=copy.deepcopy,
        cycle=itertools.cycle,
        logger=logging.getLogger("openrlhf-agent"),
        aiohttp=None,
        **agent_source_names,
    )


def test_a_function_reward_is_called_by_openrlhfs_executor_with_tuneloops_signature(tmp_path, tiny_model, capsys):
    """The prompts and reward-func steps, then OpenRLHF's own code: its PromptDataset.preprocess_data reads a prompt and
    label, its SingleTurnAgentExecutor loads the written file from --reward.remote_url and scores a generated completion."""
    import asyncio
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneloop.demo.tickets import task_records
    from tuneloop.train.openrlhf import main

    _reward_file(tmp_path)
    src = task_records(3, seed=2)
    records = tmp_path / "train_records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in src))
    prompts_file, reward_py = tmp_path / "prompts.jsonl", tmp_path / "openrlhf_reward.py"
    assert main(["prompts", str(records), str(prompts_file)]) == 0
    assert main(["reward-func", f"{tmp_path / 'rewards.py'}:score", str(tiny_model), str(reward_py)]) == 0

    tok = AutoTokenizer.from_pretrained(tiny_model)
    str_to_content = openrlhf_function("datasets/prompts_dataset.py", "_str_to_content_list")
    preprocess = openrlhf_function(
        "datasets/prompts_dataset.py", "preprocess_data", _str_to_content_list=str_to_content, copy=__import__("copy")
    )

    class Engine:  # a vLLM engine that "generates" a fixed answer, then the end of turn, then more text
        def __init__(self, text):
            self.ids = tok(text, add_special_tokens=False)["input_ids"]

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            out = SimpleNamespace(token_ids=self.ids, text=tok.decode(self.ids), finish_reason="stop", logprobs=None)
            return SimpleNamespace(outputs=[out])

    Executor = _executor({})
    executor = Executor(str(reward_py))  # loads reward_func from the .py file, as OpenRLHF does
    params = SimpleNamespace(max_tokens=16, logprobs=None)
    for rec, row in zip(src, map(json.loads, prompts_file.read_text().splitlines()), strict=True):
        prompt, label = preprocess(row, None, "prompt", "tuneloop_reward", tok.apply_chat_template)
        right = rec["messages"][-1]["content"]
        for answer, tail in ((right, "<|im_end|>\nuser: more"), ("shipping", "<|im_end|>")):
            out = asyncio.run(executor.execute(prompt, label, params, 96, tok, Engine(answer + tail)))
            expected = float(answer == right) + len(rec["messages"][:-1]) / 10  # score() on tuneloop's arguments
            assert out["reward"] == pytest.approx(expected) and out["scores"] == pytest.approx(expected), (answer, out)

    # A function that returns NaN: OpenRLHF's executor swallows the exception (no reward), tuneloop's message is on stderr.
    assert main(["reward-func", f"{tmp_path / 'rewards.py'}:broken", str(tiny_model), str(reward_py)]) == 0
    capsys.readouterr()
    out = asyncio.run(Executor(str(reward_py)).execute(prompt, label, params, 96, tok, Engine("refund<|im_end|>")))
    assert out["reward"] is None
    err = capsys.readouterr().err
    assert "tuneloop reward: train.rewards[0] (" in err and "returned nan for item 0" in err, err

    # Bad input to the step: exit 2, nothing written.
    missing = tmp_path / "none.py"
    assert main(["reward-func", f"{tmp_path / 'rewards.py'}:nothing", str(tiny_model), str(missing)]) == 2
    assert main(["reward-func", f"{tmp_path / 'absent.py'}:score", str(tiny_model), str(missing)]) == 2
    assert main(["reward-func", f"{tmp_path / 'rewards.py'}:score", str(tiny_model), str(tmp_path / "out.txt")]) == 2
    assert not missing.exists()


@pytest.mark.slow
def test_tuneloop_runs_the_exported_grpo_command_with_a_function_reward(make_config, tmp_path, monkeypatch):
    """`tuneloop run` with the exported grpo command: the prompts and reward-func steps, then a stand-in train_ppo_ray
    (OpenRLHF's parser, PromptDataset preprocessing, and SingleTurnAgentExecutor scoring each reference answer through
    the written reward file), and the adapter it saves is gated and registered. OpenRLHF's training is not run."""
    for k, v in _standin_path(tmp_path).items():
        monkeypatch.setenv(k, v)
    _reward_file(tmp_path)
    train = {**GRPO, "method": "lora", "num_epochs": 1, "rewards": [{"function": "rewards.py:score"}]}
    command = openrlhf_command(load_config(make_config(train=train)))
    path = make_config(train={**train, "backend": "command", "command": command})
    summary = FineTunePipeline(load_config(path)).run()
    st = summary["stages"]
    assert summary["overall"] == "passed", {k: v["error"] for k, v in st.items()}
    assert st["training"]["metrics"]["kind"] == "adapter" and st["training"]["metrics"]["objective"] == "grpo"
    log = (tmp_path / ".tuneloop" / "runs" / summary["run_id"] / "logs" / "training.log").read_text()
    assert "reward-func: " in log and "calls " in log
    standin = json.loads((tmp_path / "standin.json").read_text())
    assert standin["module"] == "openrlhf.cli.train_ppo_ray" and standin["rewards"]
    # score() gives 1 + turns/10 to the exact reference: each reference answer scored as tuneloop would score it.
    assert all(1.0 < r < 2.0 for r in standin["rewards"]), standin["rewards"]
    assert st["model_registry"]["status"] == "passed"
