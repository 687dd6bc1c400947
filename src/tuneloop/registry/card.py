"""What an export says about itself: the base model name a Hub or vLLM user can resolve, and a model card.

:func:`portable_base_name` turns a version's lineage into the ``base_model_name_or_path`` written to an
exported adapter: the Hugging Face id when there is one (also recovered from a hub-cache snapshot path), else
the path as the config gave it, never this machine's absolute path when the config gave a relative one.
:func:`model_card` writes the README.md of an export: base model, data digests, metrics, gate verdicts and the
tuneloop version, under the YAML front matter the Hub reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tuneloop.fsutil import format_number
from tuneloop.registry.records import ModelVersion
from tuneloop.version import __version__

_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def hub_id_from_path(path: str) -> str | None:
    """``org/name`` for a directory inside the Hugging Face cache (``.../models--org--name/snapshots/<rev>``)."""
    m = _SNAPSHOT.search(Path(path).as_posix())
    return f"{m['org']}/{m['name']}" if m else None


def portable_base_name(version: ModelVersion) -> str:
    """The base model of ``version`` as a Hub id or the path the config (or ``--base``) gave.

    Order: the name recorded by the pipeline (``lineage.base_model_given``: a hub id, or a local path relative to
    the config's directory), else the id the base was registered under; a hub-cache snapshot path becomes its id.
    """
    lin = version.lineage or {}
    base = lin.get("base") or {}
    name = lin.get("base_model_given") or base.get("id") or version.base_model or ""
    return hub_id_from_path(name) or hub_id_from_path(base.get("path") or "") or name


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    ev = metrics.get("evaluation") or {}
    rows = []
    for key in sorted(ev):
        value = ev[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows


def _gate_rows(gates: dict[str, Any]) -> list[str]:
    rows = []
    for name in sorted(gates):
        g = gates[name] or {}
        verdict = g.get("verdict") or {True: "PASS", False: "FAIL", None: "NOT_APPLIED"}.get(g.get("passed"), "?")
        value = g.get("value")
        interval = g.get("interval")
        shown = format_number(value)
        lohi = (
            f"[{format_number(float(interval[0]))}, {format_number(float(interval[1]))}]"
            if isinstance(interval, list) and len(interval) == 2
            else ""
        )
        rows.append(
            f"| {name} | {verdict} | {shown} | {lohi} | {g.get('op', '')} {'' if g.get('threshold') is None else g['threshold']} |"
        )
    return rows


def model_card(version: ModelVersion, *, kind: str, base_name: str | None) -> str:
    """README.md text for an exported version (``kind``: ``adapter`` or ``model``)."""
    lin = version.lineage or {}
    data = lin.get("data") or {}
    front: dict[str, Any] = {"library_name": "peft" if kind == "adapter" else "transformers", "tags": ["tuneloop"]}
    if base_name:
        front["base_model"] = base_name
        if kind == "adapter":
            front["tags"] += [f"base_model:adapter:{base_name}", "lora"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {version.ref}", ""]
    lines += [
        f"Exported by tuneloop {__version__} from the registry version `{version.ref}` "
        f"(artifact sha256 `{version.artifact_digest}`).",
        "",
    ]
    lines += ["## Base model", "", f"- name: `{base_name or 'none (a full model)'}`"]
    digest = (lin.get("base") or {}).get("digest") or lin.get("base_model_fingerprint")
    if digest:
        lines.append(f"- digest: `{digest}`")
    lines += ["", "## Data", ""]
    if data:
        lines += [f"- train digest: `{data.get('train_digest')}`", f"- eval digest: `{data.get('eval_digest')}`"]
    else:
        lines.append("- not recorded (registered from a directory made outside tuneloop)")
    metric_rows = _metric_rows(version.metrics or {})
    lines += ["", "## Evaluation metrics", ""]
    lines += ["| metric | value |", "|---|---|", *metric_rows] if metric_rows else ["- none recorded"]
    gate_rows = _gate_rows(version.gates or {})
    lines += ["", "## Gate verdicts", ""]
    lines += (
        ["| gate | verdict | value | interval | threshold |", "|---|---|---|---|---|", *gate_rows]
        if gate_rows
        else ["- none recorded"]
    )
    lines += [
        "",
        "## Provenance",
        "",
        f"- tuneloop version at export: `{__version__}`",
        f"- tuneloop code version at registration: `{lin.get('code_version')}`",
    ]
    if lin.get("run_id"):
        lines.append(f"- pipeline run: `{lin.get('pipeline')}` / `{lin['run_id']}`")
    if lin.get("config_hash"):
        lines.append(f"- config hash: `{lin['config_hash']}`")
    return "\n".join(lines) + "\n"


def is_blank_peft_card(text: str) -> bool:
    """PEFT's generated template (no content of its own)."""
    return "# Model Card for Model ID" in text or not text.strip()


def clean_tokenizer_config(path: Path) -> None:
    """Drop flags that describe the machine that wrote the tokenizer (``is_local``, ``local_files_only``)."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if any(k in cfg for k in ("is_local", "local_files_only")):
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def base_layer_count(base: str | None) -> int | None:
    """``num_hidden_layers`` of a local base model directory, if it says."""
    try:
        n = (
            json.loads((Path(base) / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
            if base
            else None
        )
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) else None


def module_names(target_modules: Any, layers: int | None = None) -> Any:
    """PEFT ``target_modules`` as module names (``["q_proj", "v_proj"]``) instead of full paths
    (``model.layers.0.self_attn.q_proj``, one per layer), when the names mean the same modules: every name is
    targeted in the same layers, and those are all the layers (0..N-1, N = ``layers`` when the base says, else the
    layers seen). Otherwise (some layers only, a regex string) the value is left as it is, since module names
    would widen it."""
    if not isinstance(target_modules, list) or not all(isinstance(m, str) for m in target_modules):
        return target_modules
    by_name: dict[str, set[int]] = {}
    for path in target_modules:
        m = re.search(r"\.(\d+)\.", f".{path}")
        by_name.setdefault(path.rsplit(".", 1)[-1], set()).add(int(m.group(1)) if m else -1)
    seen = set().union(*by_name.values()) if by_name else set()
    every = set(range(layers if layers is not None else len(seen)))
    uniform = all(s == seen for s in by_name.values()) and (seen == {-1} or seen == every)
    return sorted(by_name) if uniform else target_modules
