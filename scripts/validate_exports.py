"""Validate `tuneloop export-config` output with LLaMA-Factory's and Axolotl's own parsers.

Builds a tiny model and dataset locally (nothing is downloaded), exports a tuneloop config with
``--to llamafactory`` and ``--to axolotl``, and hands each file to the tool's own code, run by the python of a
separate virtualenv (the tools pin versions of transformers/peft/trl that tuneloop's venv must not get):

- LLaMA-Factory: ``llamafactory.hparams.get_train_args`` on the exported YAML, then its tokenizer loading,
  ``get_template_and_fix_tokenizer`` and ``get_dataset`` on the exported ``dataset_info.json`` (packing off so
  that one record is one sequence); every training sequence and a probe conversation are decoded and
  compared with what tuneloop renders. A control run with ``bf16: true`` shows the parser refuses what the
  old export wrote on this CPU machine.
- Axolotl: ``axolotl.utils.config.validate_config`` and ``normalize_config`` on the exported YAML (with this
  machine's capabilities: no GPU), then the chat template Axolotl resolves from it
  (``get_chat_template_from_config``, what its ``chat_template`` dataset strategy uses) renders the probe
  conversation, compared with tuneloop's rendering. A control run with ``bf16: auto`` (what the old export
  wrote) shows what Axolotl makes of it here. (Axolotl's own dataset pipeline, ``load_datasets``, tokenized the
  data with the same template in a manual run but then hung on this CPU machine, so it is not run here.)

Three scenarios: the tiny model's tokenizer carries a ChatML template (tuneloop's default format); it carries a
different (Zephyr-style) template; it carries the Zephyr one but the config sets ``data.chat_template`` to
tuneloop's ChatML template (which tuneloop then uses instead).

Prints one JSON line: {"tuneloop": ..., "scenarios": {name: {"llamafactory": verdict, "axolotl": verdict}}}.
Exit status 0 when every verdict is ok, 1 otherwise, 2 on bad arguments.

Create the virtualenvs (ALWAYS install torch==2.13.0 first, and keep it pinned, so that pip does not replace it
with a CUDA build; on this project's machines torch's CPU wheel is in /opt/wheels):

    printf 'torch==2.13.0\ntorchvision==0.28.0\n' > /tmp/torch-pin.txt
    python3 -m venv /tmp/lf  && /tmp/lf/bin/pip install torch==2.13.0  && /tmp/lf/bin/pip install -c /tmp/torch-pin.txt llamafactory
    /tmp/lf/bin/pip uninstall -y torchvision && rm /tmp/lf/lib/python3.11/site-packages/torchaudio/lib/*.so
    python3 -m venv /tmp/axo && /tmp/axo/bin/pip install torch==2.13.0 && /tmp/axo/bin/pip install -c /tmp/torch-pin.txt axolotl

Why the extra steps (measured with llamafactory 0.9.5 and axolotl 0.19.0 on a CPU-only machine):
- Without the constraint file pip resolves llamafactory's `torchvision` to 0.29.1, which needs torch 2.14.1, and
  replaces the CPU torch with the CUDA build (plus ~3 GB of nvidia-* wheels).
- PyPI's torchvision 0.28.0 and torchaudio 2.11.1 wheels are CUDA builds: their compiled ops do not load with
  the CPU torch (`RuntimeError: operator torchvision::nms does not exist`; `OSError: libc10_cuda.so: cannot open
  shared object file`), which breaks `import transformers.modeling_utils` and llamafactory's unconditional
  `import torchaudio` (data/mm_plugin.py). Text-only training needs neither: without torchvision transformers
  skips it, and torchaudio without its compiled extension imports as "extension not available".
- Axolotl installs as is; it logs warnings that torchao's CUDA kernels and bitsandbytes' hub kernels could
  not load, which do not matter for validating a config.

Run from the repository root with tuneloop's venv:

    PYTHONPATH=src .venv/bin/python scripts/validate_exports.py --lf-python /tmp/lf/bin/python \\
        --axolotl-python /tmp/axo/bin/python

or set TUNELOOP_LF_PYTHON / TUNELOOP_AXOLOTL_PYTHON. A tool whose python is not given is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PROBE = [
    {"role": "system", "content": "Route the ticket."},
    {"role": "user", "content": "I was charged twice"},
    {"role": "assistant", "content": "billing"},
    {"role": "user", "content": "And the app crashes"},
    {"role": "assistant", "content": "technical"},
]
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

LF_CHILD = r"""
import json, os, sys, yaml
job = json.load(open(sys.argv[1]))
out = {"version": None}
try:
    import llamafactory
    out["version"] = llamafactory.__version__
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    cfg = yaml.safe_load(open(job["config"]))
    try:
        get_train_args({**cfg, "bf16": True, "fp16": False, "output_dir": job["work"] + "/control"})
        out["control_bf16_true"] = "accepted"
    except Exception as exc:  # the tool's refusal is the expected outcome here
        out["control_bf16_true"] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    cfg["output_dir"] = job["work"] + "/lf-out"
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(cfg)
    out["parsed"] = {"bf16": training_args.bf16, "fp16": training_args.fp16, "template": data_args.template,
                     "stage": finetuning_args.stage, "finetuning_type": finetuning_args.finetuning_type}
    tokmod = load_tokenizer(model_args)
    tok = tokmod["tokenizer"]
    template = get_template_and_fix_tokenizer(tok, data_args)
    msgs = job["probe"]
    pairs = template.encode_multiturn(tok, msgs[1:], msgs[0]["content"])
    ids = [i for p, r in pairs for i in p + r]
    out["probe_text"] = tok.decode(ids, skip_special_tokens=False)
    data_args.packing, data_args.neat_packing = False, False
    ds = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokmod)["train_dataset"]
    out["record_texts"] = [tok.decode(row["input_ids"], skip_special_tokens=False) for row in ds]
except Exception as exc:
    import traceback
    out["error"] = f"{type(exc).__name__}: {exc}"
    out["trace"] = traceback.format_exc()[-1500:]
print("RESULT " + json.dumps(out))
"""

AXOLOTL_CHILD = r"""
import json, sys, yaml
job = json.load(open(sys.argv[1]))
out = {"version": None}
try:
    import axolotl
    out["version"] = getattr(axolotl, "__version__", None)
    from axolotl.utils.dict import DictDefault
    from axolotl.utils import config as axcfg
    cfg = DictDefault(yaml.safe_load(open(job["config"])))
    cfg.output_dir = job["work"] + "/axolotl-out"
    caps = {"bf16": False, "fp8": False, "n_gpu": 0, "n_node": 1, "compute_capability": None}
    env_caps = {"torch_version": __import__("torch").__version__}
    def check(c):
        c = axcfg.validate_config(c, capabilities=caps, env_capabilities=env_caps)
        axcfg.normalize_config(c)
        return c
    control = check(DictDefault({**cfg, "bf16": "auto", "fp16": None}))
    out["control_bf16_auto"] = {"bf16": control.bf16, "fp16": control.fp16}
    cfg = check(cfg)
    out["parsed"] = {"bf16": cfg.bf16, "fp16": cfg.fp16, "chat_template": str(cfg.chat_template)}
    from transformers import AutoTokenizer
    from axolotl.utils.chat_templates import get_chat_template_from_config
    tok = AutoTokenizer.from_pretrained(job["base_model"])
    jinja = get_chat_template_from_config(cfg, ds_cfg=cfg.datasets[0], tokenizer=tok)
    out["probe_text"] = tok.apply_chat_template(job["probe"], chat_template=jinja, tokenize=False)
except Exception as exc:
    import traceback
    out["error"] = f"{type(exc).__name__}: {exc}"
    out["trace"] = traceback.format_exc()[-1500:]
print("RESULT " + json.dumps(out))
"""


def make_scenario(root: Path, name: str, chat_template: str | None, config_template: str | None) -> tuple[Path, Path]:
    """A tiny model (tokenizer with ``chat_template``) and a tuneloop config (with ``data.chat_template``
    ``config_template``) training it on ticket data."""
    from tuneloop.demo.base_model import make_model, make_tokenizer
    from tuneloop.demo.corpus import general_corpus
    from tuneloop.demo.tickets import task_records
    from tuneloop.modeling import save_tokenizer

    d = root / name
    model_dir = d / "model"
    texts = general_corpus(300, seed=1) + [m["content"] for r in task_records(200, seed=1) for m in r["messages"]]
    tok = make_tokenizer(texts, vocab_size=600)
    if chat_template:
        tok.chat_template = chat_template
    make_model(
        tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0
    ).save_pretrained(model_dir)
    save_tokenizer(tok, model_dir)
    train = d / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in task_records(24, seed=3, split="train")))
    cfg = {
        "name": f"tiny-{name}",
        "base_model": str(model_dir),
        "seed": 0,
        "data": {"train_data": str(train), "max_length": 256},  # no record is cut
        "train": {"method": "lora", "lora_r": 4, "lora_alpha": 8, "max_steps": 2, "batch_size": 2},
    }
    if config_template:
        cfg["data"]["chat_template"] = config_template
    path = d / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, train


def run_child(python: str, code: str, job: dict, work: Path) -> dict:
    """Run ``code`` with ``python`` on ``job``; its ``RESULT {...}`` line, or what went wrong."""
    job_file = work / f"job-{abs(hash(code))}.json"
    job_file.write_text(json.dumps(job))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
        "DISABLE_VERSION_CHECK": "1",
        "PYTHONPATH": "",
        "WANDB_DISABLED": "true",
    }
    try:
        r = subprocess.run(
            [python, "-c", code, str(job_file)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=work,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"{python} did not finish in 900 s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"ok": False, "error": f"exit {r.returncode}, no result; stderr tail: {r.stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def check_lf(cfg, python: str, work: Path, expected: dict) -> dict:
    from tuneloop.errors import ConfigError
    from tuneloop.train.external import export_config

    out_file = work / "lf" / "train.yaml"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_config(cfg, "llamafactory", out_file)
    except ConfigError as exc:
        return {"ok": False, "error": f"export refused: {exc}"}
    res = run_child(python, LF_CHILD, {"config": str(out_file), "work": str(work), "probe": PROBE}, work)
    res["export"] = {k: v for k, v in yaml.safe_load(out_file.read_text()).items() if k in ("template", "bf16", "fp16")}
    if "error" not in res:
        res["probe_matches_tuneloop"] = res.pop("probe_text") == expected["probe"]
        texts = res.pop("record_texts")
        res["train_records_rendered_as_tuneloop"] = f"{sum(t in expected['records'] for t in texts)}/{len(texts)}"
        res["first_mismatch"] = next((t[-400:] for t in texts if t not in expected["records"]), None)
        res["ok"] = (
            res["probe_matches_tuneloop"]
            and bool(texts)
            and all(t in expected["records"] for t in texts)
            and res["control_bf16_true"].startswith("refused")
        )
    res["ok"] = bool(res.get("ok"))
    return res


def check_axolotl(cfg, python: str, work: Path, expected: dict) -> dict:
    from tuneloop.train.external import export_config

    out_file = work / "axolotl.yaml"
    export_config(cfg, "axolotl", out_file)
    res = run_child(
        python,
        AXOLOTL_CHILD,
        {"config": str(out_file), "work": str(work), "probe": PROBE, "base_model": cfg.base_model},
        work,
    )
    res["export"] = {
        k: v for k, v in yaml.safe_load(out_file.read_text()).items() if k in ("chat_template", "bf16", "fp16")
    }
    if "error" not in res:
        res["probe_matches_tuneloop"] = res.pop("probe_text") == expected["probe"]
        same_precision = all(bool(res["parsed"][k]) == bool(res["export"][k]) for k in ("bf16", "fp16"))
        res["ok"] = res["probe_matches_tuneloop"] and same_precision
    res["ok"] = bool(res.get("ok"))
    return res


def tuneloop_rendering(cfg, train: Path) -> dict:
    """What tuneloop trains on: its tokenizer (with its template choice) rendering the probe and each record."""
    from tuneloop.modeling import load_tokenizer

    tok = load_tokenizer(cfg.base_model, cfg.data.chat_template)
    records = [json.loads(line)["messages"] for line in train.read_text().splitlines() if line.strip()]
    return {
        "probe": tok.apply_chat_template(PROBE, tokenize=False),
        "records": {tok.apply_chat_template(r, tokenize=False) for r in records},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--lf-python", default=os.environ.get("TUNELOOP_LF_PYTHON"), help="python of the LLaMA-Factory venv"
    )
    ap.add_argument(
        "--axolotl-python", default=os.environ.get("TUNELOOP_AXOLOTL_PYTHON"), help="python of the Axolotl venv"
    )
    ap.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = ap.parse_args()
    for flag, py in (("--lf-python", args.lf_python), ("--axolotl-python", args.axolotl_python)):
        if py and not Path(py).is_file():
            print(f"{flag} {py}: no such file; create the venv as the docstring of {__file__} says", file=sys.stderr)
            return 2
    import tuneloop
    from tuneloop import load_config

    root = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-validate-exports-"))
    report: dict = {"tuneloop": getattr(tuneloop, "__version__", None), "scenarios": {}}
    from tuneloop.modeling import CHATML_TEMPLATE

    scenarios = (
        ("chatml-tokenizer", None, None),
        ("zephyr-tokenizer", ZEPHYR_TEMPLATE, None),
        ("zephyr-tokenizer-chatml-config", ZEPHYR_TEMPLATE, CHATML_TEMPLATE),
    )
    for name, template, config_template in scenarios:
        path, train = make_scenario(root, name, template, config_template)
        cfg = load_config(path)
        expected = tuneloop_rendering(cfg, train)
        verdicts = {}
        for tool, py, check in (
            ("llamafactory", args.lf_python, check_lf),
            ("axolotl", args.axolotl_python, check_axolotl),
        ):
            work = root / name / tool
            work.mkdir(parents=True, exist_ok=True)
            verdicts[tool] = check(cfg, py, work, expected) if py else {"ok": None, "skipped": "no python given"}
        report["scenarios"][name] = verdicts
    print(json.dumps(report))
    oks = [v["ok"] for s in report["scenarios"].values() for v in s.values() if v["ok"] is not None]
    return 0 if oks and all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
