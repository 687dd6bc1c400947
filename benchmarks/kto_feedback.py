"""KTO from the demo's thumbs against SFT from the same feedback, in one run.

    PYTHONPATH=src python benchmarks/kto_feedback.py [--workdir /tmp/kto-bench] [--kto-lr 1e-4 ...]

What it does, on the demo's own pieces (``tuneloop.demo.loop``): iteration 1 (the demo config as ``tuneloop ci``),
production traffic from the simulated users through the gateway with their ratings and corrections, the feedback
export; then, from that one export, two iteration-2 candidates trained and gated (not deployed):

- ``sft``: the demo's iteration 2, the original data plus the feedback's SFT records (``demo.loop.write_iteration_2``);
- ``kto``: continuing from iteration 1 (``base_model: support-router@champion``) with KTO on ``kto.jsonl`` alone,
  once per ``--kto-lr`` (default: ``demo.loop.KTO_TRAIN``'s).

Each candidate's held-out new-intent accuracy (60 tickets of the intent iteration 1 never saw, whose template
combinations never reach the users) is measured by greedy generation on the trained model, next to iteration 1's;
the original intents' accuracy and the gate verdict come from each run's evaluation stage. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def new_intent_accuracy(base: str, adapter: str | None) -> dict:
    from tuneloop.demo.loop import held_out_new_intent
    from tuneloop.evaluate.judges import normalise_answer
    from tuneloop.modeling import generate, load_causal_lm, load_tokenizer

    tok = load_tokenizer(adapter or base)
    model = load_causal_lm(base, adapter=adapter)
    model.eval()
    tickets = held_out_new_intent()
    outs = generate(model, tok, [t["messages"] for t in tickets], max_new_tokens=4)
    right = sum(
        normalise_answer(o["text"].strip()) == normalise_answer(t["expected"])
        for o, t in zip(outs, tickets, strict=True)
    )
    return {"right": right, "tickets": len(tickets), "accuracy": round(right / len(tickets), 4)}


def candidate(config: Path, overrides: list[str], console) -> dict:
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline

    cfg = load_config(config, ["deploy.auto_deploy=false", *overrides])
    pipe = FineTunePipeline(cfg, console=console)
    t0 = time.perf_counter()
    summary = pipe.run()
    seconds = round(time.perf_counter() - t0, 1)
    stages = summary["stages"]
    ev = stages.get("evaluation", {}).get("metrics", {})
    out = {
        "overall": summary["overall"],
        "accuracy": ev.get("accuracy"),
        "capability_drop": ev.get("capability_drop"),
        "seconds": seconds,
        "error": stages.get("evaluation", {}).get("error") or None,
    }
    stage_file = Path(summary["run_dir"]) / "stages" / "training.json"
    training = json.loads(stage_file.read_text()).get("outputs") or {} if stage_file.is_file() else {}
    if training.get("model_dir"):
        adapter = training["model_dir"] if training.get("kind") == "adapter" else None
        out["new_intent"] = new_intent_accuracy(pipe.cfg.base_model if adapter else training["model_dir"], adapter)
    return out


def main() -> None:
    from rich.console import Console

    from tuneloop.config import load_config
    from tuneloop.demo.loop import (
        CANARY_POLICY,
        KTO_TRAIN,
        fresh_workspace,
        production_phase,
        run_iteration,
        write_iteration_2,
    )
    from tuneloop.demo.quick import build_base, write_config, write_demo_data
    from tuneloop.demo.tables import RECOMMENDED
    from tuneloop.demo.users import SimulatedUsers
    from tuneloop.serve.server import BackgroundServer, build_gateway

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kto-bench"))
    ap.add_argument("--kto-lr", type=float, nargs="+", default=[KTO_TRAIN["learning_rate"]])
    args = ap.parse_args()
    console = Console(stderr=True)
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fresh_workspace(workdir, console)
    build_base(workdir, console)
    write_demo_data(
        workdir / "data", n_train=RECOMMENDED["data"]["n_train"], n_eval=RECOMMENDED["data"]["n_eval"], seed=0
    )
    config = write_config(workdir, canary=CANARY_POLICY)
    first = run_iteration(config, "iteration 1", console)
    if first.overall != "passed":
        raise SystemExit("iteration 1 did not pass its gates")
    cfg = load_config(config)
    root = Path(first.summary["run_dir"]).parents[1]
    app = build_gateway(cfg, root)
    with BackgroundServer(app) as server:
        users = SimulatedUsers(server.url)
        try:
            prod = production_phase(users, app.state.gateway, cfg, workdir, console)
        finally:
            users.close()
    feedback = Path(prod["feedback_export"]["dir"])
    from tuneloop.registry.api import open_registry

    v1 = open_registry(cfg, root).get(cfg.model_name, "champion")
    v1_dir = open_registry(cfg, root).open_artifact(cfg.model_name, v1.version)
    result = {
        "iteration_1": {
            "accuracy": first.summary["stages"]["evaluation"]["metrics"].get("accuracy"),
            "new_intent": new_intent_accuracy(v1.base_model, str(v1_dir)),
        },
        "feedback": {
            f"{k}_records": sum(1 for _ in open(feedback / f"{k}.jsonl")) if (feedback / f"{k}.jsonl").is_file() else 0
            for k in ("sft", "dpo", "kto")
        },
    }
    write_iteration_2(workdir, feedback, cfg.model_name, "sft")
    result["sft"] = candidate(config, [], console)
    for lr in args.kto_lr:
        write_iteration_2(workdir, feedback, cfg.model_name, "kto")
        result[f"kto_lr_{lr:g}"] = candidate(config, [f"train.learning_rate={lr}"], console)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_implementation()} {platform.python_version()}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
