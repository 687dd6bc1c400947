"""The closed loop as ``tuneloop demo`` runs it (``--quick`` runs iteration 1 only: :mod:`tuneloop.demo.quick`).

:func:`run_loop` does, in one workspace and on one gateway (the app ``tuneloop serve`` builds, on loopback):

1. **Iteration 1**: the demo pipeline as a CI job (``tuneloop ci``); its version becomes the champion.
2. **Production**: simulated users (deterministic, see :class:`tuneloop.demo.users.SimulatedUsers`) send support tickets through
   the official ``openai`` client. About ``NEW_SHARE`` of them are of an intent iteration 1 never saw in
   training (:data:`tuneloop.demo.tickets.NEW_INTENT`), which it routes wrongly.
3. **Feedback**: every answer is rated through ``POST /v1/feedback``: +1 when right, -1 with a correction (the
   right label) when wrong. What is "right" is the ticket generator's label: the users are a simulation.
4. **Drift**: the logged production prompts against the training tickets (``tuneloop drift``'s test).
5. **Feedback export**: the rated and corrected answers become a dataset (``tuneloop feedback export``).
6. **Iteration 2**: the config now trains on the original data plus the feedback (``data.train_data`` as a
   list of weighted sources), passes its gates and starts a 5 % canary (``deploy.strategy: canary``). With
   ``objective="kto"`` (``tuneloop demo --objective kto``) iteration 2 instead continues from iteration 1
   (``base_model: support-router@champion``) with KTO on the thumbs alone (``kto.jsonl``: answers rated up are
   desirable, rated down undesirable, a correction's answer desirable), settings :data:`KTO_TRAIN`.
7. **Canary**: users keep sending tickets; the gateway's sequential analysis decides. Nothing here promotes.
8. New-intent accuracy before and after, measured through the gateway on held-out new-intent tickets
   (their template combinations never reach the users, so never the feedback), and original accuracy from
   each iteration's evaluation gate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tuneloop.demo.quick import DEMO_HEADER, build_base, write_config, write_demo_data
from tuneloop.demo.tables import RECOMMENDED
from tuneloop.demo.tickets import NEW_INTENT, SYSTEM_PROMPT, new_intent_records, production_tickets
from tuneloop.demo.users import SimulatedUsers, TrafficStats
from tuneloop.i18n import msg, word

#: Share of production tickets of the new intent.
NEW_SHARE = 0.3
#: Tickets users send while iteration 1 is the only version.
FIRST_TRAFFIC = 300
#: Held-out new-intent tickets asked of each version for the before/after accuracy.
HELD_OUT_NEW = 60
#: ``data.train_data`` weight of the feedback in iteration 2: a higher weight taught the new intent better but cost
#: capability beyond the gate (docs/benchmarks.md, "The demo's recipe").
FEEDBACK_WEIGHT = 1.0
#: Iteration 2's train settings with ``--objective kto`` (on top of the demo's LoRA settings), a new LoRA on the merged
#: iteration-1 model. The learning rate is the highest that kept iteration 1's accuracy above the gate; KTO keeps what
#: the model does well but did not teach this tiny model a label it never produced (the sweep: docs/benchmarks.md,
#: "The demo's recipe" and "KTO from the demo's thumbs").
KTO_TRAIN: dict[str, Any] = {
    "objective": "kto",
    "kto_beta": 0.1,
    "learning_rate": 1e-4,
    "num_epochs": 3,
    "batch_size": 8,
}
ROUND = 64
CANARY_TIMEOUT_S = 240.0
#: The demo's rollout policy (``deploy.canary``): small steps so it decides in seconds, errors and negative
#: feedback compared against the concurrent baseline, and a step needs non-inferiority shown as well as no harm.
CANARY_POLICY: dict[str, Any] = {
    "weights": [0.05, 0.5, 1.0],
    "min_requests_per_step": 20,
    "step_requires_non_inferiority": True,
    "metrics": [{"name": "errors", "max_ratio": 3.0}, {"name": "negative_feedback", "max_ratio": 1.5}],
    "tick_interval_s": 0.5,
    "max_active_s": 600,
}


def held_out_new_intent() -> list[dict[str, Any]]:
    return [
        {"messages": r["messages"][:-1], "expected": r["messages"][-1]["content"], "intent": "new"}
        for r in new_intent_records(HELD_OUT_NEW, seed=0, split="eval")
    ]


def training_tickets(train_path: Path) -> list[str]:
    """The user turns of the routing tickets in the training data (records with the routing system prompt).
    The general chat mixed into training is left out: production sends only tickets, so against it every
    production prompt would look drifted."""
    out = []
    for line in Path(train_path).read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        if msgs[0]["content"] == SYSTEM_PROMPT:
            out.append(msgs[1]["content"])
    return out


def check_drift(log, train_path: Path, since: float, console, lang: str = "en") -> dict[str, Any]:
    from tuneloop.monitor.drift import drift_from_log

    result = drift_from_log(log, training_tickets(train_path), since, top_k=20)
    sentences = [s.split("{")[0].lower()[:20] for s in NEW_INTENT["sentences"]]
    new_top = sum(1 for ex in result.examples if any(s in ex.prompt.lower() for s in sentences))
    console.print(f"  {result.summary()}")  # the drift check's own sentence (English in every language this round)
    console.print(
        msg(
            lang,
            "loop.drift.top",
            new_top=new_top,
            top=len(result.examples),
            intent=NEW_INTENT["name"],
            example=repr(result.examples[0].prompt[:90]),
        )
        if result.examples
        else ""
    )
    return {**result.to_dict(), "new_intent_in_top": new_top}


def export(log, cfg, out_dir: Path, since: float, console, lang: str = "en") -> dict[str, Any]:
    from tuneloop.feedback.export import eval_texts_for_config, export_feedback

    result = export_feedback(log, out_dir, since=since, model=cfg.model_name, eval_texts=eval_texts_for_config(cfg))
    counts = result.manifest["counts"]
    dropped = ", ".join(f"{n} {rule}" for rule, n in counts["sft"].get("dropped", {}).items()) or msg(
        lang, "loop.export.none"
    )
    console.print(
        msg(lang, "loop.export", sft=result.sft_records, dpo=result.dpo_records, path=out_dir, dropped=dropped)
    )
    return {
        "dir": str(out_dir),
        "sft_records": result.sft_records,
        "dpo_records": result.dpo_records,
        "counts": counts,
        "manifest": str(result.manifest_path),
    }


def canary_traffic(
    users: SimulatedUsers, reg, model: str, rollout_id: str, console, lang: str = "en"
) -> dict[str, Any]:
    """Tickets until the rollout ends (the gateway decides every ``tick_interval_s``); each decision that moved
    the rollout (a step up, the promotion or a rollback) is printed with the requests sent until then."""
    t0, stats, shown = time.time(), TrafficStats(), 0
    tickets = iter(production_tickets(20000, seed=2, new_share=NEW_SHARE))
    console.print(msg(lang, "loop.canary.start", model=model, rollout_id=rollout_id))
    while True:
        record = reg.get_rollout(model, rollout_id)
        moves = moving_decisions(reg, model, rollout_id)
        for d in moves[shown:]:
            console.print(
                msg(
                    lang,
                    "loop.canary.move",
                    sent=stats.sent,
                    seconds=f"{time.time() - t0:.1f}",
                    action=d["action"],
                    weight=f"{d['weight']:.0%}",
                    canary=d["canary_requests"],
                    baseline=d["baseline_requests"],
                    reason=d["reason"],
                ),
                highlight=False,
            )
        shown = len(moves)
        if record.status != "running" or time.time() - t0 > CANARY_TIMEOUT_S:
            break
        users.send(model, [next(tickets) for _ in range(ROUND)], stats=stats)
    if record.status == "running":
        console.print(
            msg(
                lang,
                "loop.canary.stuck",
                seconds=f"{CANARY_TIMEOUT_S:.0f}",
                reason=(record.last_decision or {}).get("reason"),
            )
        )
    return {
        "status": record.status,
        "decisions": moves,
        "traffic": stats.to_dict(),
        "seconds": round(time.time() - t0, 1),
    }


def moving_decisions(reg, model: str, rollout_id: str) -> list[dict[str, Any]]:
    """The rollout's decisions that changed its weight or status (from the registry's event journal: steps are
    ``rollout_decision`` events, the final promotion or rollback is in ``rollout_ended``)."""
    out = []
    for e in reg.events(model):
        d = e.details
        decided = (
            e.kind in ("rollout_decision", "rollout_ended")
            and (d.get("decision") or {}).get("action", "continue") != "continue"
        )
        if decided and d.get("rollout_id") == rollout_id:
            out.append({k: v for k, v in d["decision"].items() if k != "metrics"})
    return out


def rollout_summary(reg, model: str, rollout_id: str, watched: dict[str, Any]) -> dict[str, Any]:
    ended = [e for e in reg.events(model) if e.kind == "rollout_ended" and e.details.get("rollout_id") == rollout_id]
    decision = ended[-1].details.get("decision", {}) if ended else {}
    return {
        "rollout_id": rollout_id,
        "decision": watched["status"],
        "reason": decision.get("reason"),
        "canary_requests": decision.get("canary_requests"),
        "baseline_requests": decision.get("baseline_requests"),
        "statistics": decision.get("metrics", {}),
        "decisions": watched["decisions"],
        "traffic": watched["traffic"],
        "seconds": watched["seconds"],
    }


def accuracy(users: SimulatedUsers, ref: str, tickets: list[dict[str, Any]]) -> dict[str, Any]:
    stats = users.send(ref, tickets, rate=False)
    return {
        "ref": ref,
        "right": stats.right_by_intent["new"],
        "tickets": stats.by_intent["new"],
        "accuracy": round(stats.right_by_intent["new"] / max(1, stats.by_intent["new"]), 4),
        "failed": stats.failed,
    }


def fresh_workspace(workdir: Path, console, lang: str = "en") -> None:
    """Start the loop from an empty registry: a previous demo's registry, runs, request log and feedback in
    ``workdir`` are removed (its stage cache is kept, so unchanged iterations are cached). A workspace the demo
    did not make is refused."""
    import shutil

    from tuneloop.errors import InputError

    ws, config = workdir / ".tuneloop", workdir / "tuneloop.yaml"
    if not ws.exists():
        return
    if not (config.is_file() and config.read_text(encoding="utf-8").startswith(DEMO_HEADER)):
        raise InputError(
            f"{workdir} holds a tuneloop workspace that `tuneloop demo` did not make; pass --workdir with another directory"
        )
    for path in [*ws.iterdir(), workdir / "feedback"]:
        if path.name in ("cache", "locks") or not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    console.print(msg(lang, "loop.fresh", workspace=ws))


def run_iteration(config_path: Path, label: str, console, lang: str = "en"):
    """One loop iteration as the CI job a push triggers: ``tuneloop ci`` on the demo config."""
    from tuneloop.ci import run_ci

    console.rule(msg(lang, "loop.iteration.rule", label=label, config=config_path.name))
    result = run_ci(config_path, console=console)
    console.print(
        iteration_line(result.summary, label, result.overall, result.report_path, lang), soft_wrap=True
    )  # the path stays whole (copyable) at any width
    return result


def iteration_line(summary: dict[str, Any], label: str, overall: str, report_path, lang: str = "en") -> str:
    """What an iteration did: verdict, accuracy, the sources it trained on, its version and report."""

    sources = summary["stages"].get("preprocessing", {}).get("metrics", {}).get("sources") or []
    trained = " + ".join(msg(lang, "loop.iteration.source", path=s["path"], samples=s["samples"]) for s in sources)
    acc = original_accuracy(summary)
    return (
        msg(lang, "loop.iteration.result", label=label, overall=word(lang, "status", overall))
        + (msg(lang, "loop.iteration.accuracy", accuracy=f"{acc:.3f}") if acc is not None else "")
        + (msg(lang, "loop.iteration.trained", sources=trained) if trained else "")
        + msg(lang, "loop.iteration.version", version=summary.get("model_version"), path=report_path)
    )


def original_accuracy(summary: dict[str, Any]) -> float | None:
    return summary.get("stages", {}).get("evaluation", {}).get("metrics", {}).get("accuracy")


def production_phase(users: SimulatedUsers, gw, cfg, workdir: Path, console, lang: str = "en") -> dict[str, Any]:
    """Steps 2-5: production traffic with feedback, drift, feedback export."""
    console.rule(msg(lang, "loop.production.rule"))
    since = time.time()
    traffic = users.send(cfg.model_name, production_tickets(FIRST_TRAFFIC, seed=1, new_share=NEW_SHARE))
    gw.recorder.flush(timeout=10.0)
    t = traffic.to_dict()
    console.print(
        msg(
            lang,
            "loop.production",
            requests=t["requests"],
            new=t["by_intent"].get("new", 0),
            intent=NEW_INTENT["name"],
            original_acc=f"{t['accuracy_by_intent'].get('original', 0):.0%}",
            new_acc=f"{t['accuracy_by_intent'].get('new', 0):.0%}",
            up=t["ratings"]["+1"],
            down=t["ratings"]["-1"],
            corrections=t["corrections"],
        )
    )
    console.rule(msg(lang, "loop.drift.rule"))
    drift = check_drift(gw.request_log, workdir / "data" / "train.jsonl", since, console, lang)
    console.rule(msg(lang, "loop.export.rule"))
    exported = export(gw.request_log, cfg, workdir / "feedback", since, console, lang)
    return {"production": t, "drift": drift, "feedback_export": exported}


def run_loop(workdir: Path, *, console, objective: str = "sft", lang: str = "en") -> dict[str, Any]:
    """Both iterations of the loop (see the module docstring); the result has ``overall`` ("passed" when
    iteration 2 was promoted by the analysis), ``iterations``, ``rollout``, ``new_intent_accuracy``,
    ``original_accuracy`` and ``seconds``. ``objective``: iteration 2's, ``sft`` or ``kto``. ``lang``: the printed
    story's language (``en`` / ``zh``, :mod:`tuneloop.i18n`); the result is the same in both."""
    if objective not in ("sft", "kto"):
        from tuneloop.errors import InputError

        raise InputError(f"--objective {objective!r}: the demo's iteration 2 trains with sft or kto")
    from tuneloop.config import load_config
    from tuneloop.registry.api import open_registry
    from tuneloop.serve.server import BackgroundServer, build_gateway

    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(msg(lang, "loop.start", workdir=workdir))
    fresh_workspace(workdir, console, lang)
    base, source = build_base(workdir, console)
    console.print(msg(lang, "demo.base", source=word(lang, "source", source), path=base))
    write_demo_data(
        workdir / "data", n_train=RECOMMENDED["data"]["n_train"], n_eval=RECOMMENDED["data"]["n_eval"], seed=0
    )
    config_path = write_config(workdir, canary=CANARY_POLICY)
    result: dict[str, Any] = {
        "overall": "failed",
        "workdir": str(workdir),
        "config": str(config_path),
        "base_model_source": source,
        "iterations": [],
        "objective": objective,
    }
    first = run_iteration(config_path, msg(lang, "loop.iteration1"), console, lang)
    result["iterations"].append(first.summary)
    result["phase_seconds"] = {"setup_and_iteration_1": round(time.perf_counter() - t0, 1)}
    if first.overall != "passed":
        return finish(result, t0, console, "iteration 1 did not pass its gates", lang=lang)
    cfg = load_config(config_path)
    root = Path(first.summary["run_dir"]).parents[1]
    app = build_gateway(cfg, root)
    gw = app.state.gateway
    with BackgroundServer(app) as server:
        users = SimulatedUsers(server.url)
        try:
            result.update(loop_on_gateway(users, gw, cfg, workdir, config_path, console, result, objective, lang))
        finally:
            users.close()
    reg = open_registry(cfg, root)
    result["champion_after"] = reg.get(cfg.model_name, "champion").ref
    return finish(result, t0, console, loop_problem(result), loop_problem(result) is None, lang=lang)


def loop_problem(result: dict[str, Any]) -> str | None:
    """Why the loop did not close (None when the analysis promoted iteration 2)."""
    iterations, rollout = result["iterations"], result.get("rollout") or {}
    if len(iterations) < 2 or iterations[1]["overall"] != "passed":
        return "iteration 2 did not pass its gates (see its report above)"
    if not rollout:
        return "iteration 2 passed but no canary rollout was started"
    if rollout["decision"] != "promoted":
        return f"the analysis did not promote iteration 2: {rollout['decision']} ({rollout.get('reason')})"
    return None


def loop_on_gateway(
    users: SimulatedUsers,
    gw,
    cfg,
    workdir: Path,
    config_path: Path,
    console,
    result: dict,
    objective: str = "sft",
    lang: str = "en",
) -> dict[str, Any]:
    from tuneloop.registry.api import open_registry

    model, held_out = cfg.model_name, held_out_new_intent()
    out: dict[str, Any] = {
        "new_intent_accuracy": {"before": None, "after": None},
        "original_accuracy": {"before": original_accuracy(result["iterations"][0]), "after": None},
    }
    phases, mark = result["phase_seconds"], time.perf_counter()
    before = accuracy(users, f"{model}:1", held_out)
    out["new_intent_accuracy"]["before"] = before["accuracy"]
    console.print(msg(lang, "loop.before", ref=f"{model}:1", tickets=before["tickets"], right=before["right"]))
    out.update(production_phase(users, gw, cfg, workdir, console, lang))
    phases["production_drift_export"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
    write_iteration_2(workdir, Path(out["feedback_export"]["dir"]), model, objective)
    label = (
        msg(lang, "loop.iteration2.sft")
        if objective == "sft"
        else msg(lang, "loop.iteration2.kto", ref=f"{model}@champion")
    )
    second = run_iteration(config_path, label, console, lang)
    result["iterations"].append(second.summary)
    out["original_accuracy"]["after"] = original_accuracy(second.summary)
    phases["iteration_2"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
    if second.overall != "passed" or not second.rollout:
        return out
    console.rule(msg(lang, "loop.canary.rule", version=second.summary["model_version"]))
    reg = open_registry(cfg, Path(second.summary["run_dir"]).parents[1])
    rollout_id = second.rollout.rollout_id
    out["rollout"] = rollout_summary(
        reg, model, rollout_id, canary_traffic(users, reg, model, rollout_id, console, lang)
    )
    after = accuracy(users, second.summary["model_version"], held_out)
    out["new_intent_accuracy"]["after"] = after["accuracy"]
    phases["canary_and_after"] = round(time.perf_counter() - mark, 1)
    return out


def write_iteration_2(workdir: Path, feedback_dir: Path, model: str, objective: str) -> Path:
    """Iteration 2's config: SFT on the original data plus the feedback's SFT records, or KTO on the feedback's
    thumbs (``kto.jsonl``) continuing from iteration 1."""
    if objective == "kto":
        return write_config(
            workdir,
            canary=CANARY_POLICY,
            train=KTO_TRAIN,
            base_model=f"{model}@champion",
            train_data=(feedback_dir / "kto.jsonl").relative_to(workdir).as_posix(),
        )
    sft = (feedback_dir / "sft.jsonl").relative_to(workdir).as_posix()
    return write_config(
        workdir, canary=CANARY_POLICY, train_data=["data/train.jsonl", {"path": sft, "weight": FEEDBACK_WEIGHT}]
    )


def stats_line(name: str, st: dict[str, Any], lang: str = "en") -> str:
    """One metric of a rollout decision: both arms' rates and the canary/baseline ratio's anytime-valid interval."""
    c, b = st["canary"], st["baseline"]
    hi = st["interval"][1]
    bound = msg(lang, "stats.bound", hi=f"{hi:.2f}") if hi is not None else msg(lang, "stats.unbounded")
    non_inferior = (
        msg(lang, f"bool.{str(bool(st['non_inferior'])).lower()}") if st["non_inferior"] is not None else "None"
    )
    return msg(
        lang,
        "stats.line",
        name=name,
        c_events=c["events"],
        c_requests=c["requests"],
        c_rate=f"{c['rate']:.1%}",
        b_events=b["events"],
        b_requests=b["requests"],
        b_rate=f"{b['rate']:.1%}",
        bound=bound,
        margin=st["max_ratio"],
        non_inferior=non_inferior,
    )


def finish(
    result: dict[str, Any], t0: float, console, problem: str | None, passed: bool = False, lang: str = "en"
) -> dict[str, Any]:
    result["overall"] = "passed" if passed else "failed"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if problem:
        result["problem"] = problem
    if result["iterations"]:  # `tuneloop demo` ends with the time and this report (cli/run.py)
        result["report"] = str(Path(result["iterations"][-1]["run_dir"]) / "report.html")
    print_closing(console, result, lang)
    return result


def print_closing(console, result: dict[str, Any], lang: str = "en") -> None:
    """The loop's closing section, from its result alone: why it failed (if it did), the rollout's decision and
    statistics, and accuracy before and after (``lang``: ``en`` / ``zh``; the numbers are the same in both)."""

    if result.get("problem"):
        console.print(msg(lang, "loop.failed", problem=result["problem"]))  # the problem itself stays in English
    na, oa = result.get("new_intent_accuracy", {}), result.get("original_accuracy", {})
    ro = result.get("rollout") or {}
    console.rule(msg(lang, "loop.closed.rule"))
    if ro:
        console.print(
            msg(
                lang,
                "loop.closed.rollout",
                decision=word(lang, "decision", ro["decision"]),
                canary=ro.get("canary_requests"),
                baseline=ro.get("baseline_requests"),
            )
        )
        for name, st in (ro.get("statistics") or {}).items():
            console.print(f"    {stats_line(name, st, lang)}", highlight=False)
    if na.get("after") is not None:
        console.print(
            msg(
                lang,
                "loop.closed.accuracy",
                new_before=f"{na['before']:.2f}",
                new_after=f"{na['after']:.2f}",
                orig_before=f"{oa['before']:.3f}",
                orig_after=f"{oa['after']:.3f}",
            )
        )
