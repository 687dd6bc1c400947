"""Task metrics that fit the data: chrF against its published definition, the ``auto`` rule, and the chosen
metric recorded in the suite result, the audit records and the gates."""

from __future__ import annotations

import json
import random

import pytest

from tuneloop.config import EvalConfig, SuiteConfig, coerce_config
from tuneloop.evaluate.metrics import DEFAULT_CHRF_THRESHOLD, choose_auto, chrf, is_short


def _f2(p: float, r: float) -> float:
    return 5 * p * r / (4 * p + r)


def test_chrf_follows_the_published_definition_on_hand_computed_pairs():
    # "yes." vs "yes": 1-grams P 3/4 R 1, 2-grams P 2/3 R 1, 3-grams P 1/2 R 1; the answer's 4-gram has no
    # reference 4-gram to match, so the effective order is 3 (sacreBLEU's default, no eps smoothing).
    p = (3 / 4 + 2 / 3 + 1 / 2) / 3
    assert chrf("yes.", "yes") == pytest.approx(_f2(p, 1.0))
    # Characters, not words: one shared character of four in Chinese, nothing longer.
    assert chrf("我是学生", "他是老师") == pytest.approx(_f2(0.25 / 4, 0.25 / 4))
    assert chrf("我 是 学生", "我是学生") == 1.0  # whitespace is removed
    assert chrf("", "abc") == 0.0 and chrf("no", "yes") == 0.0
    # The example of the chrF metric card (Hugging Face datasets, sacreBLEU's chrF): 61.576379378113785.
    assert chrf(
        "The relationship between Obama and Netanyahu is not exactly friendly.",
        "The ties between Obama and Netanyahu are not particularly friendly.",
    ) == pytest.approx(0.61576379378113785, abs=1e-12)
    assert chrf("abc", ["xyz", "abc"]) == 1.0  # several references: the best


def test_chrf_equals_sacrebleu_sentence_chrf_where_it_is_installed():
    sacrebleu = pytest.importorskip("sacrebleu")
    scorer = sacrebleu.metrics.CHRF()
    rng = random.Random(0)
    alphabet = "ab cd.我你是"
    pairs = [
        ("Hello! I am Tuney, an AI assistant.", "I am Tuney, an AI assistant developed by Acme Labs."),
        ("您好，我是 Tuney，由 Acme Labs 开发。", "您好，我是 Tuney，一个由 Acme Labs 开发的 AI 助手。"),
    ]
    pairs += [
        (
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))),
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))),
        )
        for _ in range(200)
    ]
    for hyp, ref in pairs:
        assert chrf(hyp, ref) == pytest.approx(scorer.sentence_score(hyp, [ref]).score / 100, abs=1e-9), (hyp, ref)


@pytest.mark.parametrize(
    "refs, metric",
    [
        (["refund", "shipping", "billing", "other"], "exact"),  # labels
        (["42", "3.14", "-7"], "exact"),  # numbers
        (["yes", "no", "Yes."], "exact"),
        (["A", "B", "(C) Paris"], "exact"),  # choices
        (["是", "否", "北京", "上海市"], "exact"),  # short Chinese
        (["New York City", "Salt Lake City"], "exact"),  # three words at most
        (["I am Tuney, an AI assistant developed by Acme Labs."], "chrf"),
        (["refund", "您好，我是 Tuney，由 Acme Labs 开发的人工智能助手。"], "chrf"),  # one free-text reference decides
        (["人工智能助手"], "chrf"),  # six CJK characters: not a short label
    ],
)
def test_auto_picks_exact_for_short_categorical_references_and_chrf_for_free_text(refs, metric):
    choice = choose_auto(refs)
    assert choice.metric == metric and choice.reason
    assert all(is_short(r) for r in refs) is (metric == "exact")


def test_calibrated_threshold_passes_a_paraphrase_and_fails_another_identity():
    """Pairs from scripts/calibrate_chrf.py (identity.json filled with Tuney / Acme Labs)."""
    ref_en = "Hello! I am Tuney, an AI assistant developed by Acme Labs. How can I assist you today?"
    ref_zh = "您好，我是 Tuney，一个由 Acme Labs 开发的人工智能助手，我可以帮助人们解决各种语言相关的问题和任务。"
    assert (
        chrf("Hi there! I'm Tuney, an AI assistant built by Acme Labs. How can I help you today?", ref_en)
        >= DEFAULT_CHRF_THRESHOLD
    )
    assert (
        chrf("Hello! I'm SmolLM, a language model created by Hugging Face. How can I help you?", ref_en)
        < DEFAULT_CHRF_THRESHOLD
    )
    assert (
        chrf("您好，我是 Tuney，由 Acme Labs 开发的人工智能助手，可以帮助人们解决各种和语言有关的问题与任务。", ref_zh)
        >= DEFAULT_CHRF_THRESHOLD
    )
    assert chrf("你好，我是通义千问，由阿里云开发的大语言模型。有什么可以帮你的吗？", ref_zh) < DEFAULT_CHRF_THRESHOLD


def test_threshold_belongs_to_chrf():
    assert SuiteConfig(kind="task").metric == "auto"
    assert SuiteConfig(kind="task", metric="chrf", threshold=0.6).threshold == 0.6
    with pytest.raises(ValueError, match="threshold"):
        SuiteConfig(kind="task", metric="exact", threshold=0.6)


def _suite(tmp_path, records, **spec):
    from tuneloop.evaluate.suites import load_suite

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return load_suite(SuiteConfig(kind="task", **spec), EvalConfig(), path)


def test_auto_suite_records_the_chosen_metric_the_chrf_scores_and_the_gate_label(tmp_path):
    from tuneloop.evaluate.gates import check_gates
    from tuneloop.evaluate.suites import score_suite

    refs = ["I am Tuney, an AI assistant developed by Acme Labs.", "我是 Tuney，由 Acme Labs 开发的人工智能助手。"]
    suite = _suite(
        tmp_path, [{"prompt": "Who are you?", "reference": refs[0]}, {"prompt": "你是谁？", "reference": refs[1]}]
    )
    assert (suite.metric, suite.metric_label, suite.threshold) == ("chrf", "auto -> chrf", DEFAULT_CHRF_THRESHOLD)
    base = {"text": ["I'm SmolLM, a language model by Hugging Face.", "我是通义千问。"]}
    cand = {"text": ["I am Tuney, an AI assistant built by Acme Labs.", refs[1]]}
    res, recs = score_suite(suite, base, cand, None)
    assert (
        res["metric"] == "auto -> chrf"
        and res["threshold"] == DEFAULT_CHRF_THRESHOLD
        and "free text" in res["metric_reason"]
    )
    assert res["metric_name"] == f"accuracy (auto -> chrf >= {DEFAULT_CHRF_THRESHOLD:g})"
    assert res["candidate"] == [1.0, 1.0] and res["base"] == [0.0, 0.0] and res["binary"] is True
    assert (
        recs[1]["candidate_chrf"] == 1.0
        and 0.0 <= recs[0]["base_chrf"] < DEFAULT_CHRF_THRESHOLD <= recs[0]["candidate_chrf"] < 1.0
    )
    assert recs[0]["metric"] == "chrf" and recs[0]["threshold"] == DEFAULT_CHRF_THRESHOLD

    cfg = coerce_config({"name": "x", "base_model": "m", "train_data": "t.jsonl"})
    gate = check_gates(cfg, {"task": res})["min_accuracy"]
    assert gate.task_metric == "auto -> chrf" and gate.task_metric_threshold == DEFAULT_CHRF_THRESHOLD
    assert gate.metric.startswith("accuracy (auto -> chrf")
    from tuneloop.evaluate.reports import gate_line

    assert "auto -> chrf >= " in gate_line("min_accuracy", gate.to_dict())  # printed where the gates are printed


def test_auto_keeps_exact_for_labels_and_an_explicit_threshold_is_used(tmp_path):
    from tuneloop.evaluate.suites import score_suite

    labels = _suite(
        tmp_path, [{"prompt": f"ticket {i}", "reference": lab} for i, lab in enumerate(["refund", "billing", "other"])]
    )
    assert (labels.metric, labels.metric_label, labels.threshold) == ("exact", "auto -> exact", None)
    res, _ = score_suite(labels, {"text": ["Refund.", "other", "x"]}, {"text": ["refund", "billing", "other"]}, None)
    assert (
        res["base"] == [1.0, 0.0, 0.0]
        and res["candidate"] == [1.0, 1.0, 1.0]
        and res["metric_name"] == "accuracy (auto -> exact)"
    )

    strict = _suite(
        tmp_path,
        [{"prompt": "Who are you?", "reference": "I am Tuney, an AI assistant developed by Acme Labs."}],
        metric="chrf",
        threshold=0.95,
    )
    assert (strict.metric_label, strict.threshold) == ("chrf", 0.95)
    res, recs = score_suite(
        strict, {"text": ["x"]}, {"text": ["I am Tuney, an AI assistant built by Acme Labs."]}, None
    )
    assert res["candidate"] == [0.0] and 0.5 < recs[0]["candidate_chrf"] < 0.95
    exact = _suite(tmp_path, [{"prompt": "Who are you?", "reference": "I am Tuney."}], metric="exact")
    assert (
        exact.metric_label == "exact"
        and score_suite(exact, {"text": ["x"]}, {"text": ["I am Tuney"]}, None)[0]["metric_name"] == "accuracy"
    )
