"""External trainers: ``train.backend: command`` and ``tuneloop export-config``.

:func:`run_command` runs a user-given training command (``axolotl train ...``, ``llamafactory-cli train ...``,
an Unsloth script) with templated arguments, streams its output into the stage log, and picks up the adapter
or model it wrote to ``{output_dir}``; the rest of the loop (evaluation gates, registry) treats it like a model
tuneloop trained itself.

:func:`export_config` writes the equivalent Axolotl or LLaMA-Factory YAML for a tuneloop config, using the
keys those projects document.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import string
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneloop.config import PipelineConfig
from tuneloop.errors import ConfigError, StageError
from tuneloop.fsutil import atomic_write_json, atomic_write_text, replace_dir
from tuneloop.train.launch import stream_process
from tuneloop.train.objectives import OBJECTIVES, uses_preferences

log = logging.getLogger(__name__)

#: Placeholders a ``train.command`` may use.
PLACEHOLDERS = {
    "base_model": "the base model (path or hub id)",
    "train_file": "training records of this run's split, canonical JSONL (`messages`, or prompt/chosen/rejected for dpo, orpo and simpo), with the `data.train_data` source weights applied",
    "eval_file": "held-out records in the same format",
    "output_dir": "where the command must write the adapter or model",
    "config_file": "the resolved tuneloop config (YAML)",
    "seed": "train seed",
    "method": "lora | qlora | full",
    "objective": "train.objective: " + " | ".join(OBJECTIVES),
    "learning_rate": "train.learning_rate",
    "num_epochs": "train.num_epochs",
    "max_steps": "train.max_steps (0 when unset)",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "lora_r": "train.lora_r",
    "lora_alpha": "train.lora_alpha",
    "lora_dropout": "train.lora_dropout",
    "max_length": "data.max_length",
}


def command_problems(command: str | None) -> list[str]:
    """Config problems of ``train.command`` (for preflight): missing, or unknown placeholders."""
    if not command or not command.strip():
        return ["train.command: required when train.backend is `command`; e.g. `axolotl train {config_file}`"]
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
    except ValueError as exc:
        return [f"train.command: bad template ({exc}); write literal braces as {{{{ and }}}}"]
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if unknown:
        return [
            f"train.command: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; known: "
            + ", ".join("{" + n + "}" for n in PLACEHOLDERS)
        ]
    return []


def find_model_output(out: Path) -> str | None:
    """``adapter`` or ``model`` when ``out`` holds a PEFT adapter or a full safetensors model, else None."""
    if (out / "adapter_config.json").is_file() and any(out.glob("adapter_model*.safetensors")):
        return "adapter"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return "model"
    return None


def run_command(cfg: PipelineConfig, prep: dict[str, str], work_dir: Path, tokenizer) -> dict[str, Any]:
    """Run ``train.command``; returns training metrics. The result ends up in ``work_dir/model``."""
    t = cfg.train
    work_dir = Path(work_dir)
    out = work_dir / "external_output"
    if out.exists():
        shutil.rmtree(out)  # a killed command may have left half an output: start it again
    out.mkdir(parents=True)
    config_file = work_dir / "tuneloop_config.yaml"
    atomic_write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    values = {
        "base_model": cfg.base_model,
        "train_file": prep["train_records"],
        "eval_file": prep["eval_records"],
        "output_dir": str(out),
        "config_file": str(config_file),
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
    if t.command is None:  # preflight (command_problems) refuses this before any work; here for a direct caller
        raise ConfigError("train.command: required when train.backend is `command`; e.g. `axolotl train {config_file}`")
    command = t.command.format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    log.info("running the training command: %s", command)
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()

    def on_line(line: str) -> None:
        tail.append(line)
        log.info("[command] %s", line)

    rc = stream_process(command, on_line, env={**os.environ, "PYTHONUNBUFFERED": "1"}, shell=True)
    seconds = time.perf_counter() - t0
    last = "\n".join(tail)
    if rc != 0:
        raise StageError(f"the training command exited with status {rc}: {command}\nlast lines of its log:\n{last}")
    kind = find_model_output(out)
    if kind is None:
        found = ", ".join(sorted(p.name for p in out.iterdir())[:20]) or "nothing"
        raise StageError(
            f"the training command succeeded but {out} holds no model: expected adapter_config.json + "
            f"adapter_model.safetensors (LoRA) or config.json + *.safetensors (full model); found {found}. "
            "Make the command write its final model to {output_dir}."
        )
    if not any(out.glob("tokenizer*")):
        from tuneloop.modeling import save_tokenizer

        save_tokenizer(tokenizer, out)
    # What trainers leave beside the final model but the registry must not store (pickles, resumable state).
    (out / "training_args.bin").unlink(missing_ok=True)
    for ckpt in out.glob("checkpoint-*"):
        if ckpt.is_dir():
            dest = work_dir / "command_checkpoints" / ckpt.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            ckpt.rename(dest)
    atomic_write_json(out / "tuneloop_config.json", cfg.to_dict())
    rows = _trainer_state_rows(out)
    metrics_path = work_dir / "train_metrics.jsonl"
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    replace_dir(out, work_dir / "model")
    metrics: dict[str, Any] = {
        "backend": "command",
        "objective": t.objective,
        "method": t.method,
        "kind": kind,
        "exit_code": rc,
        "seconds": round(seconds, 2),
    }
    if rows:
        metrics.update(steps=rows[-1]["step"], first_loss=rows[0]["loss"], final_loss=rows[-1]["loss"])
    return metrics


def _trainer_state_rows(out: Path) -> list[dict[str, Any]]:
    """Per-step losses from a transformers ``trainer_state.json`` the command left, when there is one."""
    states = sorted(out.rglob("trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return []
    try:
        history = json.loads(states[-1].read_text()).get("log_history", [])
    except (OSError, json.JSONDecodeError):
        return []
    return [
        {
            "step": h["step"],
            "epoch": h.get("epoch"),
            "loss": h["loss"],
            "learning_rate": h.get("learning_rate"),
            "grad_norm": h.get("grad_norm"),
        }
        for h in history
        if "loss" in h and "step" in h
    ]


# ------------------------------------------------------------------------------------------ export-config


def _data_format(cfg: PipelineConfig) -> str:
    if uses_preferences(cfg):
        return "preference"
    if cfg.data.format != "auto":
        return cfg.data.format
    from tuneloop.data.formats import detect_format

    if isinstance(cfg.data.train_data, list):
        return _sources_format(cfg)
    path = Path(cfg.data.train_data)
    if not path.is_file():
        raise ConfigError(f"data.train_data: file not found: {path}")
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))[:100]
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for _, line in zip(range(100), f, strict=False) if line.strip()]
    return detect_format(records)


def _sources_format(cfg: PipelineConfig) -> str:
    """The one record format of a list of training sources (each detected; they must agree)."""
    from tuneloop.data.sources import open_sources
    from tuneloop.errors import InputError

    try:
        return open_sources(cfg.data.train_sources).format
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def _export_sources(cfg: PipelineConfig) -> list[str]:
    """The training sources' paths for an export: other trainers have no per-source weight, so a list with a
    weight other than 1 is refused with what to do instead."""
    sources = cfg.data.train_sources
    weighted = [f"{s.label} (weight {s.weight:g})" for s in sources if s.weight != 1]
    if weighted:
        raise ConfigError(
            f"data.train_data: export-config cannot carry source weights ({', '.join(weighted)}): Axolotl and "
            "LLaMA-Factory have no per-source repeat. Set every weight to 1 to export the sources as separate "
            "datasets, or run `tuneloop run` and train on its weighted records (`train_records.jsonl` in the "
            "preprocessing output; `train.backend: command` passes that file as {train_file})"
        )
    return [s.path for s in sources]


#: A conversation that tells chat templates apart: a system prompt, two user/assistant turns.
_PROBE = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Refund me"},
    {"role": "assistant", "content": "billing"},
)
#: (messages, add_generation_prompt) renderings that must agree for two templates to count as the same.
_PROBE_CASES = ((_PROBE, False), (_PROBE[:2], True), (_PROBE[1:2], True), (_PROBE[1:4], True), (_PROBE[1:], False))


@dataclass(frozen=True)
class ExportTemplate:
    """The chat template tuneloop trains, evaluates and serves with for a config (see ``modeling.load_tokenizer``)."""

    source: str  #: ``data.chat_template``, ``tokenizer`` (the base model's own) or ``chatml-default``
    text: str  #: the Jinja template itself
    chatml: bool  #: renders every probe conversation exactly like tuneloop's ChatML default


#: How export headers name each template source.
_SOURCE_NAMES = {
    "data.chat_template": "the template in data.chat_template",
    "tokenizer": "the base model tokenizer's own template",
    "chatml-default": "tuneloop's ChatML default",
}


@dataclass(frozen=True)
class ExportPrecision:
    """``train.precision`` resolved the way tuneloop resolves it on this machine."""

    bf16: bool
    fp16: bool
    note: str  #: how it was resolved, for the exported file's header


def export_template(cfg: PipelineConfig) -> ExportTemplate:
    """Which chat template tuneloop uses for ``cfg``: ``data.chat_template``, else the base model tokenizer's own,
    else the ChatML default; and whether it renders like ChatML (checked on probe conversations)."""
    from transformers import AutoTokenizer

    from tuneloop.modeling import CHATML_TEMPLATE

    try:
        tok = AutoTokenizer.from_pretrained(cfg.base_model)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"base_model {cfg.base_model!r}: cannot load its tokenizer to find its chat template ({exc}); "
            "export-config needs it locally (a model directory or the Hugging Face cache)"
        ) from None
    own = tok.chat_template.get("default") if isinstance(tok.chat_template, dict) else tok.chat_template
    if cfg.data.chat_template:
        source, text = "data.chat_template", cfg.data.chat_template
    elif isinstance(own, str) and own:
        source, text = "tokenizer", own
    else:
        source, text = "chatml-default", CHATML_TEMPLATE
    return ExportTemplate(source, text, _renders_alike(tok, text, CHATML_TEMPLATE))


def _renders_alike(tok, template: str, reference: str) -> bool:
    from jinja2 import TemplateError

    def render(t: str, messages, generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            list(messages), chat_template=t, tokenize=False, add_generation_prompt=generation_prompt
        )

    try:
        return all(render(template, m, g) == render(reference, m, g) for m, g in _PROBE_CASES)
    except (TemplateError, ValueError, TypeError, KeyError):  # e.g. a template that refuses a system turn
        return False


def export_precision(precision: str) -> ExportPrecision:
    """bf16/fp16 flags for ``train.precision``; ``auto`` is bf16 only when this machine has a CUDA GPU with bf16
    (what tuneloop's trainers do), fp32 otherwise."""
    if precision == "auto":
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return ExportPrecision(
                True,
                False,
                "train.precision auto -> bf16: this machine has a CUDA GPU with bf16, "
                "so tuneloop would train in bf16 here",
            )
        return ExportPrecision(
            False,
            False,
            "train.precision auto -> fp32 (bf16 and fp16 off): no CUDA GPU with bf16 "
            "on this machine, so tuneloop would train in fp32 here; set bf16 to true by hand to "
            "train on a bf16 GPU",
        )
    if precision == "fp32":
        return ExportPrecision(False, False, "train.precision fp32 -> bf16 and fp16 off")
    return ExportPrecision(
        precision == "bf16",
        precision == "fp16",
        f"train.precision {precision} -> {precision}: true (needs a GPU that supports it)",
    )


def _axolotl(cfg: PipelineConfig, fmt: str, tpl: ExportTemplate, prec: ExportPrecision) -> tuple[dict[str, Any], str]:
    """The Axolotl config and a note on how its chat template was chosen."""
    t, d = cfg.train, cfg.data

    def dataset(path: str) -> dict[str, Any]:
        if fmt == "alpaca":
            return {"path": path, "type": "alpaca"}
        if fmt == "preference":
            return {
                "path": path,
                "type": "chat_template.default",
                "field_messages": "conversations",
                "field_chosen": "chosen",
                "field_rejected": "rejected",
            }
        # Axolotl gives a `chat_template` dataset without its own template `tokenizer_default`, whatever the
        # top-level key says, so the template goes on the dataset too.
        return {
            "path": path,
            "type": "chat_template",
            **template,
            "field_messages": "messages",
            "message_property_mappings": {"role": "role", "content": "content"},
        }

    if tpl.source == "tokenizer":
        template: dict[str, Any] = {"chat_template": "tokenizer_default"}
        note = "chat template: the base model tokenizer's own (chat_template: tokenizer_default), as tuneloop uses it"
    else:
        template = {"chat_template": "jinja", "chat_template_jinja": tpl.text}
        note = (
            f"chat template: {_SOURCE_NAMES[tpl.source]}, as tuneloop uses it, passed verbatim as chat_template_jinja"
        )
    y: dict[str, Any] = {"base_model": cfg.base_model}
    if t.method == "qlora":
        y["load_in_4bit"] = True
    if t.method in ("lora", "qlora"):
        y.update(adapter=t.method, lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout)
        if t.target_modules == "all-linear":
            y["lora_target_linear"] = True
        else:
            y["lora_target_modules"] = (
                list(t.target_modules) if not isinstance(t.target_modules, str) else [t.target_modules]
            )
        if t.use_rslora:
            y["peft_use_rslora"] = True
        if t.use_dora:
            y["peft_use_dora"] = True
    if t.objective == "dpo":
        y.update(rl="dpo", rl_beta=t.dpo_beta)
    elif (
        t.objective == "simpo"
    ):  # Axolotl's CPO trainer; cpo_alpha 0 leaves out CPO's NLL term, as tuneloop trains SimPO
        y.update(rl="simpo", rl_beta=t.simpo_beta, simpo_gamma=t.simpo_gamma, cpo_alpha=0.0)
    elif t.objective == "orpo":
        raise ConfigError(
            "train.objective: orpo cannot be exported to Axolotl: its ORPO trainer reads only its own "
            "`chat_template.argilla` records (chosen and rejected each a whole user/assistant conversation), which are "
            "not tuneloop preference records (prompt + assistant answers). Export with --to llamafactory (stage: dpo, "
            "pref_loss: orpo), or train with tuneloop itself"
        )
    y["datasets"] = [dataset(path) for path in _export_sources(cfg)]
    if d.eval_data:
        y["test_datasets"] = [{**dataset(d.eval_data), "split": "train"}]
    else:
        y["val_set_size"] = d.eval_split
    y.update(template)  # top level: what the DPO strategy uses and what Axolotl saves with the model
    y.update(
        sequence_len=d.max_length,
        sample_packing=t.packing and t.objective == "sft",
        train_on_inputs=t.train_on_inputs,
        micro_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_epochs=t.num_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optimizer="adamw_torch",
        gradient_checkpointing=t.gradient_checkpointing,
        seed=cfg.seed,
        save_steps=t.save_steps,
        output_dir=f"./outputs/{cfg.name}",
    )
    if t.max_steps:
        y["max_steps"] = t.max_steps
    y.update(bf16=prec.bf16, fp16=prec.fp16)
    if t.report_to == "wandb":
        y["wandb_project"] = cfg.name
    return y, note


def _llamafactory_template(tpl: ExportTemplate) -> tuple[dict[str, Any], str]:
    """LLaMA-Factory's ``template`` key for tuneloop's chat template, and a note on the choice.

    LLaMA-Factory takes a named template from its registry, or (``template`` unset) parses the tokenizer's own
    Jinja template into one; it has no key for an arbitrary Jinja string.
    """
    if tpl.chatml:
        return {"template": "chatml"}, (
            f"chat template: {_SOURCE_NAMES[tpl.source]}, as tuneloop uses it, renders as ChatML; "
            "LLaMA-Factory's `chatml` template renders the same (no default system prompt)"
        )
    if tpl.source == "tokenizer":
        return {}, (
            "chat template: the base model tokenizer's own; `template` is left unset so that LLaMA-Factory "
            "parses the tokenizer's Jinja template"
        )
    raise ConfigError(
        "data.chat_template: LLaMA-Factory cannot use this template (it is not ChatML, and LLaMA-Factory takes "
        "only a named template or the tokenizer's own): save the base model's tokenizer with this chat template "
        "and point base_model at it, or export with --to axolotl, which takes any Jinja template"
    )


def _llamafactory(
    cfg: PipelineConfig, fmt: str, data_dir: Path, tpl: ExportTemplate, prec: ExportPrecision
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The LLaMA-Factory config, its ``dataset_info.json`` entries, and a note on the chat template."""
    t, d = cfg.train, cfg.data

    def info(path: str) -> dict[str, Any]:
        if fmt == "alpaca":
            return {"file_name": path}
        if fmt == "preference":
            return {
                "file_name": path,
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
            }
        return {
            "file_name": path,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }

    paths = _export_sources(cfg)
    names = [f"{cfg.name}_train" + (f"_{i}" if i else "") for i in range(len(paths))]
    dataset_info = {n: info(path) for n, path in zip(names, paths, strict=True)}
    template, note = _llamafactory_template(tpl)
    y: dict[str, Any] = {
        "model_name_or_path": cfg.base_model,
        "stage": t.objective,
        "do_train": True,
        "finetuning_type": "full" if t.method == "full" else "lora",
    }
    if t.method == "qlora":
        y["quantization_bit"] = 4
    if t.method in ("lora", "qlora"):
        y.update(
            lora_rank=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            lora_target="all"
            if t.target_modules == "all-linear"
            else ",".join([t.target_modules] if isinstance(t.target_modules, str) else t.target_modules),
        )
        if t.use_rslora:
            y["use_rslora"] = True
        if t.use_dora:
            y["use_dora"] = True
    if t.objective == "dpo":
        y["pref_beta"] = t.dpo_beta
    elif t.objective in ("orpo", "simpo"):  # LLaMA-Factory's DPO stage with its reference-free losses
        y.update(stage="dpo", pref_loss=t.objective, pref_beta=t.orpo_beta if t.objective == "orpo" else t.simpo_beta)
        if t.objective == "simpo":
            y["simpo_gamma"] = t.simpo_gamma
    y.update(dataset=",".join(names), dataset_dir=str(data_dir), **template, cutoff_len=d.max_length)
    if d.eval_data:
        dataset_info[f"{cfg.name}_eval"] = info(d.eval_data)
        y["eval_dataset"] = f"{cfg.name}_eval"
    else:
        y["val_size"] = d.eval_split
    y.update(
        packing=t.packing and t.objective == "sft",
        neat_packing=t.packing and t.objective == "sft",
        train_on_prompt=t.train_on_inputs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=float(t.num_epochs),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        seed=cfg.seed,
        save_steps=t.save_steps,
        logging_steps=1,
        output_dir=f"saves/{cfg.name}",
        report_to=t.report_to,
    )
    if t.max_steps:
        y["max_steps"] = t.max_steps
    y.update(bf16=prec.bf16, fp16=prec.fp16)
    if not t.gradient_checkpointing:
        y["disable_gradient_checkpointing"] = True
    return y, dataset_info, note


def export_config(cfg: PipelineConfig, to: str, out_file: Path | None = None) -> str:
    """The Axolotl or LLaMA-Factory YAML equivalent to ``cfg``; with ``out_file`` it is written there
    (for LLaMA-Factory together with the ``dataset_info.json`` it needs, in the same directory).

    Precision and chat template follow what tuneloop itself would use on this machine; the header comments
    say how each was resolved."""
    if to not in ("axolotl", "llamafactory"):
        raise ConfigError(f"--to {to!r}: expected axolotl or llamafactory")
    fmt = _data_format(cfg)
    tpl, prec = export_template(cfg), export_precision(cfg.train.precision)
    header = f"# Generated by `tuneloop export-config --to {to}` from tuneloop config `{cfg.name}`.\n# {prec.note}.\n"
    if to == "axolotl":
        y, note = _axolotl(cfg, fmt, tpl, prec)
        text = header + f"# {note}.\n" + yaml.safe_dump(y, sort_keys=False)
        if out_file:
            atomic_write_text(Path(out_file), text)
        return text
    data_dir = Path(out_file).resolve().parent if out_file else Path(".")
    y, info, note = _llamafactory(cfg, fmt, data_dir, tpl, prec)
    data_note = "# LLaMA-Factory reads datasets from dataset_info.json in dataset_dir; " + (
        "it was written next to this file.\n"
        if out_file
        else "put this entry there:\n" + "".join(f"#   {line}\n" for line in json.dumps(info, indent=2).splitlines())
    )
    text = header + f"# {note}.\n" + data_note + yaml.safe_dump(y, sort_keys=False)
    if out_file:
        atomic_write_text(data_dir / "dataset_info.json", json.dumps(info, indent=2) + "\n")
        atomic_write_text(Path(out_file), text)
    return text
