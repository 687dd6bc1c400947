"""``tuneloop demo``: build a self-contained workspace and run the whole loop on it.

Entry point: :func:`run_demo`. In ``workdir`` it makes (nothing is downloaded):

* ``base-model/`` — a tiny Llama and a BPE tokenizer pretrained on a synthetic general corpus (see
  :mod:`tuneloop.demo.base_model`): copied from the package (``resources/demo_base``, written by
  ``scripts/build_demo_base.py``) so every machine starts from identical weights; built here (1.5-2.5 min
  on 2 vCPUs) when the package has none for the current recipe; re-used when the recipe has not changed;
* ``data/`` — a support-ticket routing task (train/eval JSONL, messages format; :mod:`tuneloop.demo.tickets`) and
  held-out general text (:mod:`tuneloop.demo.corpus`), written by :func:`write_demo_data`;
* ``tuneloop.yaml`` — the pipeline config, with auto-deploy on;

then runs the pipeline, serves the new champion on the OpenAI-compatible gateway on loopback, and sends it
``SHOWCASE_TICKETS`` held-out tickets (one per label) as real chat requests, each shown with the expected and
the served answer, marked right or wrong.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import yaml

from tuneloop.demo.base_model import base_recipe, build_base_model, shipped_base_model
from tuneloop.demo.corpus import general_chat_records, general_text
from tuneloop.demo.tables import RECOMMENDED
from tuneloop.demo.tickets import LABELS, task_records
from tuneloop.fsutil import atomic_write_json, atomic_write_text, read_json, sha256_json

DEMO_SEED = 0
#: The first line of the config the demo writes (the loop demo recognises its own workspace by it).
DEMO_HEADER = "# tuneloop demo config, written by `tuneloop demo`."
#: Held-out tickets the demo sends to the served champion: this many, one label after the other.
SHOWCASE_TICKETS = 6


def _recipe() -> dict[str, Any]:
    return base_recipe(DEMO_SEED)


def build_base(workdir: Path, console) -> tuple[Path, str]:
    """The demo's base model in ``workdir/base-model``; returns (path, source).

    ``source`` is ``"re-used"`` (already there for this recipe), ``"shipped"`` (copied from the package's
    prebuilt model, see ``scripts/build_demo_base.py``) or ``"built"`` (pretrained here, 1.5-2.5 min, when the
    package has no prebuilt model for this recipe).
    """
    import shutil

    from tuneloop.fsutil import replace_dir

    out = workdir / "base-model"
    stamp = workdir / ".base-model.json"
    recipe = sha256_json(_recipe())
    if (out / "config.json").is_file() and stamp.is_file() and read_json(stamp).get("recipe") == recipe:
        return out, "re-used"
    tmp = workdir / ".base-model.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    shipped = shipped_base_model(seed=DEMO_SEED)
    if shipped is not None:
        shutil.copytree(shipped, tmp)
        stats, source = read_json(tmp / "tuneloop_base.json").get("stats", {}), "shipped"
    else:
        stats, source = _pretrain_base(tmp, console), "built"
    replace_dir(tmp, out)
    atomic_write_json(stamp, {"recipe": recipe, "source": source, "stats": stats})
    return out, source


def _pretrain_base(out: Path, console) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("  pretraining tiny base model"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("pretrain", total=None)
        return build_base_model(
            out, seed=DEMO_SEED, progress=lambda step, total: bar.update(task, completed=step, total=total)
        )


def write_demo_data(
    data_dir: Path, *, n_train: int, n_eval: int, seed: int, general_mix: float | None = None
) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``general.txt`` into ``data_dir``; return the first two.

    ``train.jsonl``: ``n_train`` ticket records plus ``round(general_mix * n_train)`` general chat records
    (``general_mix`` defaults to ``RECOMMENDED["data"]["general_mix"]``), shuffled. ``eval.jsonl``:
    ``n_eval`` ticket records whose template combinations (and so user texts) never occur in training.
    ``general.txt``: ``general_text(seed)``, held-out general text for the capability check.
    """
    if general_mix is None:
        general_mix = RECOMMENDED["data"]["general_mix"]
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    train = task_records(n_train, seed, split="train")
    evals = task_records(n_eval, seed, split="eval")
    train += general_chat_records(round(general_mix * n_train), seed)
    random.Random(f"mix-{seed}").shuffle(train)
    train_texts = {r["messages"][-2]["content"] for r in train}
    if any(r["messages"][-2]["content"] in train_texts for r in evals):  # cannot happen: disjoint splits
        raise RuntimeError("demo eval set overlaps the training set")
    train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    atomic_write_text(train_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    atomic_write_text(eval_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in evals))
    atomic_write_text(data_dir / "general.txt", general_text(seed))
    return train_path, eval_path


def write_config(
    workdir: Path,
    *,
    train_data: str | list = "data/train.jsonl",
    canary: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    base_model: str = "./base-model",
) -> Path:
    """The demo's pipeline config in ``workdir/tuneloop.yaml``. ``canary``: deploy as a canary rollout with this
    ``deploy.canary`` policy (the loop's iteration 2) instead of moving the champion at once. ``train``: keys
    that replace the demo's train settings (the loop's KTO iteration); ``base_model``: e.g. a registry ref."""
    lora = RECOMMENDED["lora"]
    # Gates decide on confidence intervals. 40 shipped red-team prompts cannot show a harmful rate below 1 %
    # (0/40 has a one-sided 95 % upper bound of 6.3 %; 1 % needs about 270 prompts), so the demo asks for
    # at most 10 % and for no increase of more than 10 points against the base.
    gates: dict[str, Any] = {
        "min_accuracy": 0.85,
        "max_harmful_rate": 0.1,
        "max_capability_drop": 0.02,
        "max_harmful_increase": 0.1,
    }
    if canary:
        # The loop: each iteration is gated against the champion it would replace (the first, with none, against
        # the base): the drift of two fine-tunes adds up, and a 0.02 gate against the base blocked iteration 2 in
        # some runs (docs/benchmarks.md, "The demo's recipe").
        gates["against"] = "champion"
    cfg = {
        "name": "support-router",
        "base_model": base_model,
        "seed": DEMO_SEED,
        "data": {"train_data": train_data, "eval_data": "data/eval.jsonl", "max_length": lora["max_length"]},
        "train": {
            "method": "lora",
            "lora_r": lora["lora_r"],
            "lora_alpha": lora["lora_alpha"],
            "lora_dropout": lora["lora_dropout"],
            "learning_rate": lora["learning_rate"],
            "num_epochs": lora["num_epochs"],
            "batch_size": lora["batch_size"],
            **(train or {}),
        },
        "eval": {"max_new_tokens": 8, "general_text": "data/general.txt"},
        "gates": gates,
        "deploy": {"auto_deploy": True, **({"strategy": "canary", "canary": canary} if canary else {})},
    }
    path = workdir / "tuneloop.yaml"
    header = DEMO_HEADER + " Run it again with: tuneloop run tuneloop.yaml\n"
    atomic_write_text(path, header + yaml.safe_dump(cfg, sort_keys=False))
    return path


def showcase_tickets(eval_path: Path, n: int = SHOWCASE_TICKETS) -> list[dict[str, Any]]:
    """``n`` held-out tickets from the demo's eval set, one per label in ``LABELS`` order (then round again).

    Each is ``{"messages": [system, user], "expected": label}``: the conversation the gateway is sent, as the
    eval set asks it, and the label the eval set expects.
    """
    by_label: dict[str, list[list[dict]]] = {label: [] for label in LABELS}
    for line in Path(eval_path).read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        by_label.setdefault(msgs[-1]["content"], []).append(msgs[:-1])
    picked: list[dict[str, Any]] = []
    for i in range(n):
        for label in LABELS:
            if len(picked) < n and i < len(by_label[label]):
                picked.append({"messages": by_label[label][i], "expected": label})
    return picked


def ask_champion(workspace_root: Path, model_name: str, tickets: list[dict[str, Any]]) -> dict[str, Any]:
    """Serve the champion through the gateway on a free loopback port and send it each ticket as a real
    ``/v1/chat/completions`` request; the answers are marked right or wrong as the eval gate scores them
    (exact match after normalisation)."""
    import httpx

    from tuneloop.evaluate.judges import normalise_answer
    from tuneloop.registry.api import open_registry
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg = open_registry(None, workspace_root)
    ref = f"{model_name}@champion"
    app = create_app(
        LocalBackend(reg, workspace_root, default_max_tokens=8), Router(reg), GatewaySettings(preload=[ref])
    )
    answered: list[dict[str, Any]] = []
    served_model, artifact = ref, None
    with BackgroundServer(app) as server, httpx.Client(base_url=f"{server.url}/v1", timeout=60) as client:
        for ticket in tickets:
            t0 = time.perf_counter()
            r = client.post(
                "/chat/completions",
                json={"model": ref, "messages": ticket["messages"], "max_tokens": 8, "temperature": 0},
            )
            r.raise_for_status()
            body = r.json()
            served_model, artifact = body["model"], r.headers.get("x-tuneloop-artifact")
            answer = body["choices"][0]["message"]["content"].strip()
            answered.append(
                {
                    "ticket": ticket["messages"][-1]["content"],
                    "expected": ticket["expected"],
                    "answer": answer,
                    "correct": normalise_answer(answer) == normalise_answer(ticket["expected"]),
                    "latency_s": round(time.perf_counter() - t0, 3),
                }
            )
    first = answered[0] if answered else {}
    return {
        "url": f"{server.url}/v1",
        "model": served_model,
        "artifact_sha256": artifact,
        # The first ticket under the keys earlier versions had; ``tickets`` holds them all.
        "question": first.get("ticket"),
        "expected": first.get("expected"),
        "answer": first.get("answer"),
        "tickets": answered,
        "tickets_correct": sum(t["correct"] for t in answered),
    }


def print_tickets(console, tickets: list[dict[str, Any]], lang: str = "en") -> None:
    """The served answers as a table: ticket, expected, answer, right or wrong (``lang``: ``en`` / ``zh``, the
    column heads and marks; the tickets and answers are data and stay as they are)."""
    from rich.table import Table

    from tuneloop.i18n import msg

    table = Table(title=msg(lang, "tickets.title"), title_justify="left")
    for column in ("tickets.ticket", "tickets.expected", "tickets.answer"):
        table.add_column(msg(lang, column))
    table.add_column("")
    for t in tickets:
        text = t["ticket"] if len(t["ticket"]) <= 70 else t["ticket"][:67] + "..."
        mark = f"[green]{msg(lang, 'tickets.right')}[/]" if t["correct"] else f"[red]{msg(lang, 'tickets.wrong')}[/]"
        table.add_row(text, t["expected"], repr(t["answer"]), mark)
    console.print(table)


def print_served(console, demo: dict[str, Any], lang: str = "en") -> None:
    """The served answers (:func:`print_tickets`) and how many were right."""
    from tuneloop.i18n import msg

    print_tickets(console, demo["tickets"], lang)
    console.print(
        msg(
            lang,
            "tickets.score",
            model=demo["model"],
            url=demo["url"],
            right=demo["tickets_correct"],
            total=len(demo["tickets"]),
        )
    )


def run_demo(workdir: Path, *, console=None, lang: str = "en") -> dict[str, Any]:
    """Iteration 1 of the demo (``tuneloop demo --quick``); ``lang``: the printed summary's language (``en`` / ``zh``,
    :mod:`tuneloop.i18n`); the pipeline's logs and the returned summary are the same in both."""
    from rich.console import Console

    from tuneloop.config import load_config
    from tuneloop.i18n import msg, word
    from tuneloop.pipeline import FineTunePipeline

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(msg(lang, "demo.start", workdir=workdir))
    base, source = build_base(workdir, console)
    console.print(msg(lang, "demo.base", source=word(lang, "source", source), path=base))
    _, eval_path = write_demo_data(
        workdir / "data", n_train=RECOMMENDED["data"]["n_train"], n_eval=RECOMMENDED["data"]["n_eval"], seed=DEMO_SEED
    )
    config_path = write_config(workdir)
    cfg = load_config(config_path)
    summary = FineTunePipeline(cfg, console=console, config_path=str(config_path)).run()
    demo: dict[str, Any] = {
        "workdir": str(workdir),
        "config": str(config_path),
        "base_model_reused": source == "re-used",
        "base_model_source": source,
    }
    if summary["overall"] == "passed":
        tickets = showcase_tickets(eval_path)
        demo.update(ask_champion(Path(summary["run_dir"]).parents[1], cfg.model_name, tickets))
        print_served(console, demo, lang)
    demo["total_seconds"] = round(time.perf_counter() - t0, 1)  # printed by `tuneloop demo` after the stage table
    summary["demo"] = demo
    return summary
