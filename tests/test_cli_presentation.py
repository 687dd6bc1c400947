"""What a newcomer reads, checked as they would read it: `tuneloop status`, `models list` and `rollout status`
piped at 80 columns (what CI logs get) with every run id, ref and alias whole; `--help` without a value
placeholder on flags; no "-0" anywhere; the run report (gate chart labels, the comparison model's name, the
contamination counts explained); the same rollout numbers, in the same words, in `rollout status` and on the
dashboard; `tuneloop demo` ending with its time and its report. All on small hand-made workspaces: no training."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from test_rollout_controller import POLICY, make_model_dir, traffic
from tuneloop.cli import app
from tuneloop.evaluate.gates import GateInput, GateSpec, decide
from tuneloop.evaluate.reports import intervals_svg
from tuneloop.fsutil import format_number, format_time
from tuneloop.monitor.requestlog import open_request_log
from tuneloop.registry.sqlite import SqliteRegistry
from tuneloop.report.html import write_run_report
from tuneloop.rollout import controller
from tuneloop.rollout.display import evalue_text, interval_text, metric_cells, needed_text, percent
from tuneloop.serve.dashboard import DASHBOARD_HTML, dashboard_data

MODEL = "customer-support-router"  # longer than the 7 characters a squeezed 80-column column kept
STAGES = ("data_validation", "preprocessing", "training", "evaluation", "model_registry", "deployment")
RUN_PASSED, RUN_FAILED = "20261207-101500-8473b0", "20261207-143329-42c46b"


def tl(cwd: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    """The CLI as a pipe sees it (stdout is not a terminal), at ``columns`` columns."""
    env = {**os.environ, "COLUMNS": str(columns)}
    r = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def run_record(run_id: str, statuses: list[str], model_version: str | None) -> dict:
    stages = {
        name: {
            "status": s,
            "duration_s": 1.0,
            "cached": False,
            "metrics": {},
            "error": "gate failed" if s == "failed" else "",
        }
        for name, s in zip(STAGES, statuses, strict=True)
    }
    overall = "failed" if "failed" in statuses else "passed"
    return {
        "run_id": run_id,
        "pipeline": MODEL,
        "status": overall,
        "pid": 0,
        "started_at": "2026-12-07T10:15:00+00:00",
        "ended_at": "2026-12-07T10:16:00+00:00",
        "model_version": model_version,
        "stages": stages,
    }


@pytest.fixture
def workspace(tmp_path):
    """``tmp_path/.tuneloop``: MODEL:1 (previous) and :2 (champion), a run that passed and one blocked at evaluation."""
    reg = SqliteRegistry(tmp_path / ".tuneloop")
    for i in (1, 2):
        reg.register(
            MODEL,
            make_model_dir(tmp_path / f"m{i}", i),
            artifact_kind="model",
            base_model=str(tmp_path / "base-model"),
            lineage={},
            metrics={"evaluation": {"accuracy": 0.9}},
            gates={},
        )
    reg.promote(MODEL, 1, actor="test")
    reg.promote(MODEL, 2, actor="test")
    for run_id, statuses, version in (
        (RUN_PASSED, ["passed"] * 6, f"{MODEL}:2"),
        (RUN_FAILED, ["passed"] * 3 + ["failed", "skipped", "skipped"], None),
    ):
        d = tmp_path / ".tuneloop" / "runs" / run_id
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps(run_record(run_id, statuses, version)))
    return tmp_path, reg


def assert_fits(text: str, width: int = 80) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, long
    assert "…" not in text  # nothing cut with an ellipsis


def test_status_at_80_columns_prints_whole_run_ids_and_labelled_stages(workspace):
    root, _ = workspace
    out = tl(root, "status").stdout
    assert_fits(out)
    assert RUN_PASSED in out and RUN_FAILED in out and f"{MODEL}:2" in out
    assert "✓ all 6 passed" in out  # the passed run, in words
    stages = " ".join(line.split("│")[-2].strip() for line in out.splitlines() if line.startswith("│"))
    assert "✓ data prep train ✗ eval - registry deploy" in stages  # the blocked one, stage by stage, named
    assert "eval = evaluation" in re.sub(r"\s+", " ", out)  # the legend of the short names and marks
    assert "not shown at 80 columns" in out  # what was left out is said, not silently dropped
    wide = tl(root, "status", columns=160).stdout
    assert "2026-12-07 10:15:00 UTC" in wide and "not shown" not in wide


def test_models_list_at_80_columns_prints_whole_refs_and_aliases(workspace):
    root, _ = workspace
    out = tl(root, "models", "list").stdout
    assert_fits(out)
    for text in (f"{MODEL}:1", f"{MODEL}:2", "previous", "champion"):
        assert text in out
    assert re.search(r"not shown at 80 columns: base, artifact sha256", re.sub(r"\s+", " ", out))
    wide = tl(root, "models", "list", columns=200).stdout
    assert "base-model" in wide and "not shown" not in wide


def help_texts() -> dict[str, str]:
    """``--help`` of every command and group, at 80 columns."""
    runner = CliRunner()
    texts = {}

    def walk(command, path: list[str]) -> None:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0, (path, r.output)
        texts[" ".join(path) or "tuneloop"] = r.output
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return texts


def test_help_shows_flags_without_a_value_placeholder():
    texts = help_texts()
    assert len(texts) > 25 and {"demo", "run", "status", "models list", "rollout status"} <= set(texts)
    flagged = {name: t for name, t in texts.items() if "<bool>" in t}
    assert not flagged, sorted(flagged)
    demo = texts["demo"]
    quick = next(line for line in demo.splitlines() if "--quick" in line)
    assert "<" not in quick and "Iteration 1 only" in quick  # the flag, then straight its help
    assert "<path>" in demo  # options that take a value still say which
    assert "made locally" not in demo and "shipped in the package" in re.sub(r"\s*│\s*", " ", demo)


def test_no_negative_zero_in_numbers_gate_reasons_and_charts():
    assert format_number(-0.0) == "0" and format_number(0.0) == "0" and format_number(-0.5) == "-0.5"
    assert evalue_text(-2.7e-05, 3.6888794541139363) == "1.00 / 40"  # was "log -0.00 / 3.69"
    assert interval_text([-0.0, None]) == "[0.00, ∞)" and interval_text([0.0, 0.5946]) == "[0.00, 0.59]"
    same = [0] * 50 + [1] * 10
    gate = decide(GateSpec("max_harmful_increase", "harmful_increase", "paired", 0.1), GateInput(same, same, sign=-1))
    assert gate.verdict == "PASS" and "harmful_increase 0 (" in gate.reason  # was "-0 ("
    svg = intervals_svg({"max_harmful_increase": {**gate.to_dict(), "value": -0.0, "interval": [-0.0, 0.01]}})
    assert not re.search(r">-0(\.0+)?<", svg)


def test_report_labels_long_gate_names_the_comparison_and_the_contamination_counts(tmp_path):
    long_gate = "max_mc_capability_drop[capability_mc]"
    gates = {
        "min_accuracy": {
            "metric": "accuracy",
            "value": 0.98,
            "interval": [0.95, 0.99],
            "op": ">=",
            "threshold": 0.85,
            "verdict": "PASS",
            "passed": True,
            "n": 120,
        },
        long_gate: {
            "metric": "mc_capability_drop",
            "value": -0.0,
            "interval": [-0.0796, 0.0796],
            "op": "<=",
            "threshold": None,
            "verdict": "NOT_APPLIED",
            "passed": None,
            "n": 60,
        },
    }
    stages = {name: {"status": "passed", "duration_s": 1.0, "metrics": {}, "error": ""} for name in STAGES}
    stages["data_validation"]["metrics"] = {
        "records": 3001,
        "valid": 2916,
        "near_duplicates": 24,
        "contaminated": 61,
        "rules": {"contaminated": 74, "near_duplicate": 24},
    }
    stages["evaluation"]["metrics"] = {
        "accuracy": 0.98,
        "base_accuracy": 0.97,
        "gates": gates,
        "against": f"champion {MODEL}:1",
    }
    (tmp_path / "run.json").write_text(
        json.dumps({**run_record(RUN_PASSED, ["passed"] * 6, f"{MODEL}:2"), "stages": stages})
    )
    (tmp_path / "eval_items.jsonl").write_text(
        json.dumps({"suite": "task", "prompt": "p", "reference": "cancel", "base": "cancel", "candidate": "cancel"})
        + "\n"
    )
    html = write_run_report(tmp_path).read_text()
    assert f"<th>champion {MODEL}:1</th><th>candidate</th>" in html  # not "base": iteration 2 is gated on the champion
    assert f"compared with the <b>champion {MODEL}:1</b>" in html and "measured on the champion" in html
    assert "Here 74 records were found contaminated: 61 removed for that alone, the other 13" in html
    assert "rules.contaminated" in html
    assert not re.search(r">-0(\.0+)?<", html)
    svg = html[html.index("<svg") : html.index("</svg>")]
    # each gate's name is written on its own line, above its axis: the name's baseline is above the bar
    for name in ("min_accuracy", long_gate):
        label_y = float(
            re.search(rf'<text x="\d+" y="([\d.]+)"><tspan font-weight="600">{re.escape(name)}</tspan>', svg)[1]
        )
        bars = [float(y) for y in re.findall(r'y1="([\d.]+)" y2="[\d.]+" stroke="#[0-9a-f]+" stroke-width="6"', svg)]
        assert any(0 < bar - label_y <= 20 for bar in bars), (name, label_y, bars)
    assert "2026-12-07 10:15:00 UTC" in html


def test_rollout_status_and_dashboard_show_the_same_numbers_the_same_way(workspace):
    root, reg = workspace
    log = open_request_log(root / ".tuneloop" / "requests.db")
    try:
        reg.promote(MODEL, 1, actor="test")  # the champion goes back to :1; :2 is the canary
        rollout = controller.start(reg, f"{MODEL}:2", policy=POLICY, actor="ci", now=1000.0)
        traffic(
            log,
            reg.get_rollout(MODEL),
            400,
            t0=1000.0,
            err={"baseline": 0.02, "canary": 0.02},
            neg={"baseline": 0.1, "canary": 0.3},
            rng=random.Random(0),
        )
        assert controller.tick(reg, log, MODEL, now=1010.0) is not None
    finally:
        log.close()
    view = dashboard_data(reg)["models"][0]["rollout"]
    assert view["rollout_id"] == rollout.rollout_id and view["status"] == "running" and view["metrics"]
    cli = tl(root, "rollout", "status", MODEL, columns=200).stdout
    cli_80 = tl(root, "rollout", "status", MODEL).stdout
    assert_fits(cli_80[: cli_80.rindex("┘")])  # up to the table's end (the decision lines after it are sentences)
    for m in view["metrics"]:
        for cell in m["cells"]:  # every text the page shows, the terminal shows too, at both widths
            assert cell in cli, (m["metric"], cell)
            assert cell in cli_80, (m["metric"], cell)
        assert re.fullmatch(r"[\d.]+ / \d+", m["cells"][5])  # the e-value and the one that rolls back, not logs
    assert not re.search(r"\blog -?\d|-0\.00|\d-inf", cli)  # was "log -0.00 / 3.69" and "0.00-inf"
    assert view["weight_text"] == percent(view["weight"]) and f"weight {view['weight_text']}" in cli
    assert view["started_text"] in cli and view["started_text"].endswith(" UTC")
    assert all(d["at_text"] in cli for d in view["decisions"][:5])  # times: the same UTC text in both

    controller.promote(reg, MODEL, actor="test", reason="looks good")
    done = dashboard_data(reg)["models"][0]["rollout"]
    assert done["status"] == "promoted"
    assert all(m["cells"][-1] == "–" for m in done["metrics"])  # nothing is "needed" of a decided rollout
    promoted = tl(root, "rollout", "status", MODEL, columns=200).stdout
    assert "more for" not in promoted and "enough for" not in promoted


def test_dashboard_page_formats_nothing_itself():
    """The page shows the JSON's texts; its one formatting of its own, the chart's axis, is UTC too."""
    assert "toLocale" not in DASHBOARD_HTML and "m.cells" in DASHBOARD_HTML and "generated_text" in DASHBOARD_HTML
    assert needed_text(0, "non_inferiority", running=True) == "enough for non-inferiority"
    assert needed_text(0, "non_inferiority", running=False) == "–"
    assert needed_text(12, "rollback", running=True) == "12 more for rollback"
    cells = metric_cells(
        "errors",
        {
            "canary": {"events": 4, "requests": 48, "rate": 4 / 48},
            "baseline": None,
            "estimate": -0.0,
            "interval": [0.0, None],
            "log_evalue": -3.6,
            "threshold": 3.69,
            "non_inferior": False,
        },
        running=False,
    )
    assert cells == ["errors", "8.3% (4/48)", "–", "0.00", "[0.00, ∞)", "0.03 / 40", "no", "–"]
    assert (
        format_time(1796654063.2) == "2026-12-07 14:34:23 UTC"
        and format_time("2026-12-07T15:34:23+01:00") == "2026-12-07 14:34:23 UTC"
    )


def test_demo_ends_with_its_time_then_its_report(monkeypatch, tmp_path):
    """Quick: the stage table, then the time, then report.html; the loop: the time, then the last run's report.html."""
    import tuneloop.demo.loop
    import tuneloop.demo.quick

    run_dir = tmp_path / ".tuneloop" / "runs" / RUN_PASSED
    summary = {
        "pipeline": MODEL,
        "run_id": RUN_PASSED,
        "overall": "passed",
        "run_dir": str(run_dir),
        "stages": {name: {"status": "passed", "duration_s": 1.0, "metrics": {}, "error": ""} for name in STAGES},
        "demo": {"total_seconds": 61.2},
    }
    monkeypatch.setattr(tuneloop.demo.quick, "run_demo", lambda workdir, console, lang="en": summary)
    monkeypatch.setattr(
        tuneloop.demo.loop,
        "run_loop",
        lambda workdir, console, objective, lang="en": {
            "overall": "passed",
            "seconds": 111.4,
            "report": str(run_dir / "report.html"),
            "iterations": [],
        },
    )
    runner = CliRunner()
    for args, secs in ((["demo", "--quick"], "61"), (["demo"], "111")):
        r = runner.invoke(
            app, [*args, "--workdir", str(tmp_path)], env={"COLUMNS": "80", "LC_ALL": "C.UTF-8"}
        )  # English
        assert r.exit_code == 0, r.output
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        assert lines[-2] == f"demo finished in {secs} s" and lines[-1] == f"report: {run_dir}/report.html", lines[-4:]
        if "--quick" in args:
            assert r.stdout.index("data_validation") < r.stdout.index("demo finished")  # the table first
    assert (
        "ci/summary.md"
        not in Path(tuneloop.demo.loop.__file__).read_text().split("def run_iteration")[1].split("def ")[0]
    )


def test_init_config_shows_the_list_of_sources():
    """The starter config shows the list form of data.train_data (original data + feedback), and it is valid."""
    from tuneloop.config import DataConfig

    text = (Path(__file__).resolve().parents[1] / "src/tuneloop/resources/init_tuneloop.yaml").read_text()
    assert "supports a list" not in text
    example = "\n".join(
        line.strip()[2:]
        for line in text.splitlines()
        if line.strip().startswith("# ") and ("train_data:" in line or line.strip().startswith("#   -"))
    )
    data = yaml.safe_load(example)
    assert data["train_data"][1] == {"path": "data/feedback/sft.jsonl", "weight": 3}
    assert [s.path for s in DataConfig(**data).train_sources] == ["data/train.jsonl", "data/feedback/sft.jsonl"]


def test_summary_table_names_the_champion_when_it_was_the_comparison():
    """`tuneloop run`/`status RUN_ID`: a run compared with the champion says champion_accuracy, not base_accuracy."""
    from rich.console import Console

    from tuneloop.cli.run import summary_table

    def render(against: str) -> str:
        ev = {
            "status": "passed",
            "cached": False,
            "duration_s": 1.0,
            "error": None,
            "metrics": {"accuracy": 0.9, "base_accuracy": 0.8, "against": against},
        }
        summary = {"pipeline": "p", "run_id": "r1", "overall": "passed", "stages": {"evaluation": ev}}
        console = Console(width=200, record=True)
        console.print(summary_table(summary))
        return console.export_text()

    assert "champion_accuracy=0.8" in render("champion support-bot:1") and "base_accuracy" not in render(
        "champion support-bot:1"
    )
    assert "base_accuracy=0.8" in render("base")
