"""Task metrics that fit the data: chrF, and the ``auto`` rule that picks exact match or chrF per suite.

Entry points: :func:`chrf` (a sentence-level character n-gram F-score) and :func:`choose_auto` (which metric
``eval.suites[].metric: auto`` means for a suite, from its references).

chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation") as sacreBLEU computes it by
default (``CHRF()``: ``char_order=6``, ``word_order=0``, ``beta=2``, whitespace removed, case kept, no
eps smoothing): whitespace is removed from both strings; for each n = 1..6 the character n-grams of answer and
reference are counted, ``matches = sum(min(count_answer, count_reference))``, precision = matches / answer
n-grams, recall = matches / reference n-grams; precision and recall are averaged over the orders where both
strings have n-grams (the "effective order"), and the score is ``F_beta = (1 + beta^2) P R / (beta^2 P + R)``
(recall weighs beta^2 = 4 times precision). It works on characters, so it needs no tokeniser and treats
Chinese or Japanese as it treats English. sacreBLEU reports it x 100; here it is in [0, 1].

``auto`` (:func:`choose_auto`): ``exact`` when every reference of the suite is a short categorical answer, a
label, number, yes/no or choice: at most :data:`SHORT_WORDS` whitespace-separated words and at most
:data:`SHORT_CJK_CHARS` CJK characters (so ``"refund"``, ``"42"``, ``"B"``, ``"New York City"``, ``"是"``,
``"北京"``); otherwise ``chrf``, and an item passes when its chrF is at least the suite's ``threshold``
(default :data:`DEFAULT_CHRF_THRESHOLD`), so the suite stays 0/1 per item and the accuracy gate with its
Wilson interval applies unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CHAR_ORDER = 6
BETA = 2.0
#: Default pass mark of ``chrf`` (and of ``auto`` when it picks chrF), calibrated by ``scripts/calibrate_chrf.py``
#: on LLaMA-Factory's bilingual ``identity.json`` filled with Tuney / Acme Labs (references) against correct
#: paraphrases (16 English, 14 Chinese), answers giving another identity in their own words (10 + 8) and the real
#: SmolLM2-135M-Instruct's greedy answers on the 85 records that name Tuney or Acme Labs (16 + 69). Spread of chrF:
#: paraphrases English 0.62-0.93, Chinese 0.37-0.89 (median 0.57); other identity 0.03-0.32; the real model
#: 0.00-0.39. 0.4 is the lowest threshold (0.05 grid) at which no wrong answer passes (0/103), and fails 1 of
#: the 30 paraphrases (a Chinese one at 0.371). Not separable by any threshold: the reference itself with only
#: the name and maker swapped scores 0.56-0.93 (chrF measures wording; one swapped name changes few
#: characters): a fact that must be exact needs ``contains`` / ``regex`` on it, or a judge.
DEFAULT_CHRF_THRESHOLD = 0.4
#: ``auto``: a reference is short (categorical) with at most this many whitespace-separated words ...
SHORT_WORDS = 3
#: ... and at most this many CJK characters (Chinese, Japanese kana, Korean hangul).
SHORT_CJK_CHARS = 4

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff66-\uff9f]")


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(answer: str, reference: str | Iterable[str], *, order: int = CHAR_ORDER, beta: float = BETA) -> float:
    """Sentence chrF of ``answer`` against ``reference`` (or the best of several references), in [0, 1].

    Equal to sacreBLEU's ``CHRF().sentence_score(answer, [reference]).score / 100``.
    """
    if not isinstance(reference, str):
        refs = [str(r) for r in reference]
        return max((chrf(answer, r, order=order, beta=beta) for r in refs), default=0.0)
    hyp, ref = "".join(str(answer).split()), "".join(reference.split())
    factor = beta * beta
    avg_p = avg_r = 0.0
    effective = 0
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        n_h, n_r = sum(h.values()), sum(r.values())
        if n_h == 0 or n_r == 0:
            continue
        match = sum((h & r).values())
        avg_p += match / n_h
        avg_r += match / n_r
        effective += 1
    if effective == 0:
        return 0.0
    avg_p, avg_r = avg_p / effective, avg_r / effective
    if avg_p + avg_r == 0:
        return 0.0
    return (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)


def is_short(reference: Any) -> bool:
    """A short categorical reference: at most :data:`SHORT_WORDS` words and :data:`SHORT_CJK_CHARS` CJK characters."""
    text = "" if reference is None else str(reference).strip()
    return len(text.split()) <= SHORT_WORDS and len(_CJK.findall(text)) <= SHORT_CJK_CHARS


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` chose for a suite, and why (for the suite result and the run's output)."""

    metric: str  # exact | chrf
    reason: str


def choose_auto(references: Iterable[Any]) -> AutoChoice:
    """``exact`` when every reference is short and categorical (:func:`is_short`), else ``chrf``."""
    refs = list(references)
    long_refs = [r for r in refs if not is_short(r)]
    distinct = len({str(r).strip() for r in refs})
    if not refs:
        return AutoChoice("exact", "no references")
    if not long_refs:
        return AutoChoice(
            "exact",
            f"all {len(refs)} references are short ({distinct} distinct, each at most {SHORT_WORDS} words / {SHORT_CJK_CHARS} CJK characters)",
        )
    return AutoChoice(
        "chrf",
        f"{len(long_refs)} of {len(refs)} references are free text (longer than {SHORT_WORDS} words or {SHORT_CJK_CHARS} CJK characters)",
    )
