"""The CLI as users call it (real subprocesses): JSON on stdout, exit codes, bad input, status, models,
SIGKILL during training followed by a resuming re-run, and serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def tl(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_run_json_prints_exactly_one_document_and_exit_codes(make_config, tmp_path):
    path = make_config()
    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout holds the JSON document and nothing else
    assert summary["overall"] == "passed" and summary["pipeline"] == "tiny-bot"
    assert "training" in r.stderr  # progress and logs go to stderr

    blocked = tl("run", path, "--json", "-o", "gates.min_accuracy=0.5")  # 1.0 is undecidable (exit 2 before any work)
    assert blocked.returncode == 1
    assert json.loads(blocked.stdout)["stages"]["evaluation"]["status"] == "failed"

    status = tl("status", "--json", cwd=tmp_path)
    assert status.returncode == 0
    runs = json.loads(status.stdout)
    assert [r["status"] for r in runs] == ["failed", "passed"]
    one = tl("status", runs[1]["run_id"][:17], cwd=tmp_path / ".tuneloop")  # found by searching upwards
    assert one.returncode == 0 and "training" in one.stdout

    models = tl("models", "list", "--json", cwd=tmp_path)
    assert models.returncode == 0
    versions = json.loads(models.stdout)
    assert [v["ref"] for v in versions] == ["tiny-bot:1"]
    show = tl("models", "show", "tiny-bot@champion", "--json", cwd=tmp_path)
    v = json.loads(show.stdout)
    assert v["lineage"]["base_model"] and v["artifact_digest"] and v["gates"]
    assert tl("models", "show", "tiny-bot:9", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize(
    "content, needle",
    [
        ("name: x\nbase_model: m\n  train_data: [oops\n", "malformed YAML"),
        ("name: x\nbase_model: m\ntrain_data: t.jsonl\nlearning_rat: 0.1\n", "did you mean `learning_rate`"),
        ("name: x\nbase_model: m\ntrain_data: t.jsonl\ntrain:\n  batch_size: -1\n", "train.batch_size"),
        ("name: x\nbase_model: m\ntrain_data: missing.jsonl\n", "data.train_data: file not found"),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, content, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    (tmp_path / "t.jsonl").write_text('{"messages": []}\n')
    r = tl("run", cfg)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert str(cfg) in r.stderr or "c.yaml" in r.stderr
    assert not (tmp_path / ".tuneloop").exists()  # nothing was started


def test_qlora_without_cuda_is_refused_up_front(make_config):
    r = tl("run", make_config(train__method="qlora"))
    assert r.returncode == 2
    assert "qlora needs a CUDA GPU" in r.stderr


def _start_and_wait_for_checkpoint(path, cache, min_step):
    """Start `tuneloop run` and return the process once a checkpoint >= min_step is complete."""
    # SIGINT back to its default in the child: pytest started as a background job (`pytest &` in a script, some CI
    # runners) ignores it, the child would inherit that, and Ctrl-C would do nothing (seen: the run finished, exit 0)
    proc = subprocess.Popen(
        [*TUNELOOP, "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [
            int(p.name.split("-")[1])
            for p in cache.glob("*/checkpoints/checkpoint-*")
            if (p / "trainer_state.json").is_file()
        ]
        if steps and max(steps) >= min_step:
            return proc
        assert proc.poll() is None, "the run ended before reaching the checkpoint"
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no checkpoint >= {min_step} appeared")


def test_ctrl_c_then_sigkill_during_training_then_rerun_resumes(make_config, tmp_path):
    path = make_config(train__max_steps=30, train__save_steps=5, train__batch_size=4)
    cache = tmp_path / ".tuneloop" / "cache" / "training"

    proc = _start_and_wait_for_checkpoint(path, cache, 5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 130
    runs = json.loads(tl("status", "--json", cwd=tmp_path).stdout)
    assert runs[0]["status"] == "interrupted"
    assert "interrupted" in runs[0]["stages"]["training"]["error"]

    proc = _start_and_wait_for_checkpoint(path, cache, 10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    runs = json.loads(tl("status", "--json", cwd=tmp_path).stdout)
    assert runs[0]["status"] == "interrupted"  # its process is gone: read as interrupted

    r = tl("run", path, "--json")
    assert r.returncode == 0, r.stderr
    tr = json.loads(r.stdout)["stages"]["training"]
    assert tr["cached"] is False and tr["metrics"]["resumed_from_step"] >= 10
    assert tr["metrics"]["steps"] == 30

    # The resumed run ends where an uninterrupted one does.
    fresh = tl("run", path, "--json", "--no-cache")
    assert fresh.returncode == 0
    fresh_tr = json.loads(fresh.stdout)["stages"]["training"]["metrics"]
    assert fresh_tr["resumed_from_step"] == 0
    assert fresh_tr["final_loss"] == pytest.approx(tr["metrics"]["final_loss"], rel=1e-4)


def test_serve_answers_openai_chat_requests(make_config, tmp_path):
    import httpx

    path = make_config()
    assert tl("run", path).returncode == 0
    port = _free_port()
    proc = subprocess.Popen(
        [*TUNELOOP, "serve", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.3)
        models = httpx.get(f"{base}/v1/models").json()
        assert models["data"][0]["id"] == "tiny-bot:1"
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "tiny-bot", "messages": [{"role": "user", "content": "my parcel is late"}], "max_tokens": 5},
        )
        body = r.json()
        assert r.status_code == 200 and body["object"] == "chat.completion"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert 0 < body["usage"]["completion_tokens"] <= 5
        bad = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny-bot", "messages": []})
        assert (
            bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        )  # OpenAI's shape, not FastAPI's 422
        assert (
            httpx.post(
                f"{base}/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "x"}]}
            ).status_code
            == 404
        )
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM: a clean shutdown


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
