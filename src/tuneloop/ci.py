"""``tuneloop ci``: the pipeline as a CI job.

Entry point: ``run_ci(config_path, overrides) -> CiResult``. It reads top to bottom:

1. load the config and run the preflight checks (a bad config or a missing file raises ``ConfigError`` /
   ``InputError`` -- exit code 2 -- before any work is done);
2. run the pipeline (``FineTunePipeline(cfg, config_path=...).run()``); stages are cached by a content
   hash of their inputs, so a push that changes neither data nor config does no work;
3. collect every gate of the run: the data gates (``<run_dir>/data/<split>.report.json``), the evaluation
   gates (the evaluation stage's metrics) and, as a failed row ``stage.<name>``, a stage that failed
   without a gate saying why (a crash, a missing file);
4. write ``<run_dir>/ci/junit.xml`` (one testcase per gate) and ``<run_dir>/ci/summary.md``, and append the
   Markdown to ``$GITHUB_STEP_SUMMARY`` when it is set. Nothing is uploaded: the CI job uploads the run
   directory (its ``report.html`` is the readable report);
5. notify the ``notify.webhooks``: ``gate_failed`` with the gate table when the run is blocked,
   ``registered`` with the new version when it passed;
6. on a pass with ``deploy.strategy: canary``, start the canary rollout (:func:`start_canary_rollout`).

Exit codes (``CiResult.exit_code``): 0 passed, 1 blocked or a stage failed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError
from tuneloop.evaluate.reports import junit_xml, markdown_summary
from tuneloop.fsutil import atomic_write_text, read_json
from tuneloop.registry.rollouts import Rollout
from tuneloop.rollout.notify import DeliveryResult, Notifier, notifier_for

__all__ = ["CiResult", "RolloutUnavailable", "collect_gates", "run_ci", "start_canary_rollout"]

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


@dataclass
class CiResult:
    """What a CI run did: the pipeline summary, every gate, the files written and the notifications sent."""

    summary: dict[str, Any]
    gates: dict[str, dict[str, Any]]
    junit_path: Path
    markdown_path: Path
    report_path: Path
    step_summary: Path | None = None
    notifications: list[DeliveryResult] = field(default_factory=list)
    rollout: Rollout | None = None

    @property
    def overall(self) -> str:
        return self.summary["overall"]

    @property
    def blocking(self) -> list[str]:
        return [name for name, g in self.gates.items() if g.get("blocks")]

    @property
    def exit_code(self) -> int:
        return 0 if self.overall == "passed" else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "exit_code": self.exit_code,
            "blocking": self.blocking,
            "run_id": self.summary["run_id"],
            "run_dir": self.summary["run_dir"],
            "model_version": self.summary.get("model_version"),
            "gates": self.gates,
            "junit": str(self.junit_path),
            "markdown": str(self.markdown_path),
            "report": str(self.report_path),
            "step_summary": str(self.step_summary) if self.step_summary else None,
            "notifications": [vars(n) for n in self.notifications],
            "rollout": self.rollout.to_dict() if self.rollout is not None else None,
            "summary": self.summary,
        }


class RolloutUnavailable(TuneloopError):
    """``deploy.strategy: canary`` was asked for, but this build cannot start a rollout."""

    exit_code = 1


def run_ci(config_path: str | os.PathLike, overrides: list[str] | None = None, *, console=None) -> CiResult:
    """Run the pipeline of ``config_path`` as a CI job (see the module docstring)."""
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline

    config_path = Path(config_path).resolve()
    cfg = load_config(config_path, overrides or [])
    notifier = notifier_for(cfg)  # a bad webhook is a config error, found before any work
    pipe = FineTunePipeline(cfg, console=console, config_path=str(config_path))
    pipe.preflight()
    summary = pipe.run()
    gates = collect_gates(summary)
    result = write_reports(summary, gates, title=f"tuneloop ci: {cfg.name}")
    try:
        send_notifications(notifier, cfg.model_name, result)
        if result.overall == "passed" and cfg.deploy.strategy == "canary":
            result.rollout = start_canary_rollout(cfg, summary, notifier)
    finally:
        notifier.close(timeout=30.0)
        result.notifications = notifier.results
    return result


def start_canary_rollout(cfg, summary: dict[str, Any], notifier: Notifier) -> Rollout | None:
    """The canary rollout of a passed run (``deploy.strategy: canary``): the one the deployment stage started
    (with ``auto_deploy``), else one started here for the registered version. ``None`` when there is nothing to
    compare against: the version is the champion already (the model's first version, which the deployment
    stage made champion directly, or an unchanged re-run)."""
    from tuneloop.registry.api import open_registry
    from tuneloop.rollout import controller
    from tuneloop.workspace import Workspace

    deployed = summary["stages"].get("deployment", {})
    reg = open_registry(cfg, Workspace.for_config(cfg))
    if deployed.get("status") == "passed" and deployed.get("metrics", {}).get("rollout_id"):
        return reg.get_rollout(cfg.model_name, deployed["metrics"]["rollout_id"])
    ref = summary.get("model_version")
    if not ref:
        raise RolloutUnavailable("deploy.strategy: canary, but the run registered no version to roll out")
    champion = reg.get_alias(cfg.model_name, "champion")
    if champion is not None and f"{cfg.model_name}:{champion}" == ref:
        return None
    return controller.start(
        reg,
        ref,
        policy=cfg.deploy.canary.policy_dict(),
        notifier=notifier,
        reason=f"tuneloop ci, run {summary['run_id']}",
    )


# ------------------------------------------------------------------------------------------------ gates


def collect_gates(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every gate of a run in the evaluation gates' shape (``verdict``, ``blocks``, ``value``, ``op``,
    ``threshold``, ``reason``...): data gates as ``data.<split>.<gate>``, the evaluation gates by name, and
    ``stage.<name>`` for a stage that failed without a blocking gate."""
    run_dir = Path(summary["run_dir"])
    gates: dict[str, dict[str, Any]] = {}
    for split in ("train", "eval"):
        path = run_dir / "data" / f"{split}.report.json"
        if path.is_file():
            report = read_json(path)
            for g in report.get("gates", []):
                gates[f"data.{split}.{g['name']}"] = data_gate(g, report.get("records"))
    stages = summary["stages"]
    evaluation = stages.get("evaluation", {}).get("metrics", {}).get("gates") or {}
    gates.update(evaluation)
    owned = {"data_validation": [n for n in gates if n.startswith("data.")], "evaluation": list(evaluation)}
    for name, st in stages.items():
        if st["status"] == "failed" and not any(gates[n].get("blocks") for n in owned.get(name, [])):
            gates[f"stage.{name}"] = {
                "verdict": "FAIL",
                "passed": False,
                "blocks": True,
                "suite": "stage",
                "metric": "status",
                "value": "failed",
                "reason": st["error"],
            }
    return gates


def data_gate(g: dict[str, Any], records: int | None) -> dict[str, Any]:
    """A data gate (``data.validate.Gate``) in the evaluation gates' shape."""
    return {
        "verdict": "PASS" if g["passed"] else "FAIL",
        "passed": g["passed"],
        "blocks": not g["passed"],
        "suite": "data",
        "metric": g["name"],
        "value": g["value"],
        "op": g["op"],
        "threshold": g["threshold"],
        "n": records,
        "reason": g.get("detail", ""),
    }


# ---------------------------------------------------------------------------------------------- reports


def write_reports(summary: dict[str, Any], gates: dict[str, dict[str, Any]], *, title: str) -> CiResult:
    """``<run_dir>/ci/junit.xml`` and ``summary.md``; the Markdown also goes to ``$GITHUB_STEP_SUMMARY``."""
    run_dir = Path(summary["run_dir"])
    report = run_dir / "report.html"
    junit, markdown = run_dir / "ci" / "junit.xml", run_dir / "ci" / "summary.md"
    atomic_write_text(junit, junit_xml(gates, suite_name="tuneloop.ci"))
    metrics = summary["stages"].get("evaluation", {}).get("metrics", {})
    text = markdown_summary(gates, metrics, title=title) + "\n" + run_lines(summary, report)
    atomic_write_text(markdown, text)
    step_summary = os.environ.get(STEP_SUMMARY_ENV)
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return CiResult(summary, gates, junit, markdown, report, Path(step_summary) if step_summary else None)


def run_lines(summary: dict[str, Any], report: Path) -> str:
    """The Markdown lines under the gate table: the run, its stages, the registered version, the report."""
    lines = [
        f"Run `{summary['run_id']}`: **{summary['overall']}**"
        + (f", registered `{summary['model_version']}`" if summary.get("model_version") else ""),
        "",
    ]
    lines += ["| stage | status | cached | seconds |", "|---|---|---|---|"]
    for name, st in summary["stages"].items():
        lines.append(f"| {name} | {st['status']} | {'yes' if st.get('cached') else ''} | {st['duration_s']:.1f} |")
    lines += ["", f"Report: `{report}` (in the uploaded run directory)."]
    return "\n".join(lines) + "\n"


def send_notifications(notifier: Notifier, model: str, result: CiResult) -> None:
    """``gate_failed`` with the gate table when blocked; ``registered`` with the version on a pass."""
    summary, run_id = result.summary, result.summary["run_id"]
    table = [
        {"name": n, "verdict": g.get("verdict"), "value": g.get("value"), "threshold": g.get("threshold")}
        for n, g in result.gates.items()
    ]
    details = {"run_id": run_id, "run_dir": summary["run_dir"], "report": str(result.report_path)}
    if result.overall == "passed":
        ref = summary.get("model_version")
        notifier.notify(
            "registered",
            subject=ref or model,
            gate_results=table,
            details={**details, "ref": ref},
            message=f"passed every gate in run {run_id}; registered {ref}",
        )
    else:
        notifier.notify(
            "gate_failed",
            subject=model,
            gate_results=table,
            details=details,
            message=f"run {run_id} blocked by {', '.join(result.blocking) or 'a failed stage'}",
        )
