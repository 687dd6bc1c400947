"""Near-duplicate groups (MinHash LSH) and train-vs-eval contamination."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneloop.data import dedup
from tuneloop.data.dedup import contaminated_indices, lsh_params, near_duplicate_groups, normalise_text


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    w = normalise_text(text).split()
    return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)} if len(w) >= k else {tuple(w)}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _near_copy(rng: random.Random, words: list[str]) -> list[str]:
    """Case and punctuation changes (invisible after normalisation) and the last word replaced."""
    out = list(words)
    for pos in rng.sample(range(len(out)), 5):
        out[pos] = out[pos].upper() + rng.choice([",", "!", " --", ""])
    out[-1] = "zz" + out[-1]
    return out


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[tuple[int, int]]]:
    """300 unrelated texts of 120 words, plus 40 near copies (Jaccard 115/117) of the first 40."""
    rng = random.Random(7)
    base = [_words(rng, 120) for _ in range(300)]
    texts = [" ".join(w) for w in base]
    planted = []
    for i in range(40):
        planted.append((i, len(texts)))
        texts.append(" ".join(_near_copy(rng, base[i])))
    return texts, planted


def test_normalise_text():
    assert normalise_text("  Hello,   WORLD!\n\tfoo_bar--baz ") == "hello world foo bar baz"
    assert normalise_text("Café — “Ünïcode”") == "café ünïcode"
    assert normalise_text("...") == ""


def test_fast_word_split_matches_normalise_text():
    texts = [
        "Hello, World! foo_bar  baz",
        "",
        "Ünïcode — “quotes” café",
        "x\x00y\tZ",
        "don't",
        "a" * 300,
        "İstanbul ẞTRASSE ΣΑΣ Kelvin:\u212a x\u0301y",
        "\ud800 lone surrogate",
    ]
    words, docs = dedup._word_hashes(texts)
    expected = [normalise_text(t).split() for t in texts]
    assert np.bincount(docs, minlength=len(texts)).tolist() == [len(w) for w in expected]
    # the same word hashes the same wherever it appears, whatever its case or surrounding punctuation
    alone, _ = dedup._word_hashes([" ".join(w) for w in expected])
    assert np.array_equal(words, alone)
    a, _ = dedup._word_hashes(["Foo; BAR"])
    b, _ = dedup._word_hashes(["foo bar"])
    c, _ = dedup._word_hashes(["bar foo"])
    assert np.array_equal(a, b) and not np.array_equal(b, c)


def test_planted_near_duplicates_found_and_unrelated_not_grouped(corpus):
    texts, planted = corpus
    assert min(_jaccard(texts[i], texts[j]) for i, j in planted) > 0.98
    groups = near_duplicate_groups(texts, threshold=0.8)
    assert sorted(tuple(g) for g in groups) == sorted(planted)
    for g in groups:
        assert g == sorted(g) and len(g) >= 2


def test_exact_copies_grouped_and_empty_texts_never():
    rng = random.Random(3)
    a, b = " ".join(_words(rng, 50)), " ".join(_words(rng, 50))
    texts = [a, b, "", a, "   !!! ", a.upper() + "!", "", b]
    assert near_duplicate_groups(texts) == [[0, 3, 5], [1, 7]]
    assert near_duplicate_groups(["", "", ""]) == []
    assert near_duplicate_groups([]) == [] and near_duplicate_groups([a]) == []


def test_short_texts_use_all_words_as_one_shingle():
    texts = ["red apple", "Red, apple!", "green apple", "red"]
    assert near_duplicate_groups(texts, shingle_size=5) == [[0, 1]]


def test_threshold_respected():
    """Pairs clearly below the threshold are not linked; clearly above are."""
    rng = random.Random(11)
    texts, jac = [], []
    for _ in range(60):
        w = _words(rng, 100)
        copy = w[:60] + _words(rng, 40)  # ~0.4 Jaccard of 5-shingles
        texts += [" ".join(w), " ".join(copy)]
        jac.append(_jaccard(texts[-2], texts[-1]))
    assert max(jac) < 0.5
    assert near_duplicate_groups(texts, threshold=0.8) == []
    # at a lower threshold the same pairs (Jaccard ~0.35-0.45) are mostly found
    found = near_duplicate_groups(texts, threshold=0.25)
    assert len(found) >= 50 and all(len(g) == 2 and g[1] == g[0] + 1 for g in found)


def test_deterministic_under_seed_and_workers(corpus, monkeypatch):
    texts, _ = corpus
    monkeypatch.setattr(dedup, "_CHUNK_DOCS", 64)  # several chunks, so workers=2 really forks
    one = near_duplicate_groups(texts, seed=5, workers=1)
    assert one == near_duplicate_groups(texts, seed=5, workers=1)
    assert one == near_duplicate_groups(texts, seed=5, workers=2)  # forked workers, shared buffer
    sig1, keys1 = dedup._signatures(texts, 5, 64, 1, 1, 6, 10)
    sig2, keys2 = dedup._signatures(texts, 5, 64, 1, 2, 6, 10)
    assert np.array_equal(sig1, sig2) and np.array_equal(keys1, keys2)
    assert not np.array_equal(sig1, dedup._signatures(texts, 5, 64, 2, 1)[0])


def test_signature_estimates_jaccard_without_bias():
    rng = random.Random(5)
    a_texts, b_texts, true = [], [], []
    for _ in range(300):
        w = _words(rng, 80)
        m = rng.randint(1, 30)
        other = w[: 80 - m] + _words(rng, m)
        a_texts.append(" ".join(w))
        b_texts.append(" ".join(other))
        true.append(_jaccard(a_texts[-1], b_texts[-1]))
    est = (dedup._signatures(a_texts, 5, 128, 0, 1)[0] == dedup._signatures(b_texts, 5, 128, 0, 1)[0]).mean(axis=1)
    err = est - np.array(true)
    assert abs(err.mean()) < 0.01  # unbiased
    assert err.std() < 0.06  # binomial std at J~0.5 with 128 hashes is ~0.044


def test_lsh_params_like_datasketch():
    assert lsh_params(0.8, 128) == (9, 13)
    assert lsh_params(0.5, 128) == (25, 5)


def test_bad_parameters():
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_groups(["a", "b"], threshold=0)
    with pytest.raises(ValueError, match="shingle_size"):
        near_duplicate_groups(["a", "b"], shingle_size=0)
    with pytest.raises(ValueError, match="ngram"):
        contaminated_indices(["a"], ["b"], ngram=0)


def test_contamination_finds_pasted_eval_item_and_ignores_unrelated():
    rng = random.Random(2)
    eval_texts = [" ".join(_words(rng, 40)) for _ in range(20)]
    train = [" ".join(_words(rng, 40)) for _ in range(50)]
    train[10] = eval_texts[3].upper()  # pasted verbatim (case changes do not hide it)
    train[20] = " ".join(_words(rng, 10)) + " " + eval_texts[7] + " " + " ".join(_words(rng, 10))
    train[30] = eval_texts[5].split()[0] + " " + " ".join(_words(rng, 39))  # shares one word only
    train.append("")  # no n-grams: never reported
    found = contaminated_indices(train, eval_texts, ngram=8, threshold=0.5)
    assert set(found) == {10, 20}
    assert found[10] == 1.0
    assert found[20] == pytest.approx(33 / 53)  # 40 - 8 + 1 of 60 - 8 + 1 n-grams are eval's
    assert contaminated_indices(train, eval_texts, threshold=0.7) == {10: 1.0}
    assert contaminated_indices(train, [], threshold=0.5) == {}


def test_contamination_short_records():
    assert contaminated_indices(["Hello there!", "hello", "other words"], ["hello there"], ngram=8) == {0: 1.0}


def test_bands_match_datasketch_when_installed():
    """Skipped when datasketch (the `bench` extra) is not installed."""
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256), (0.7, 128), (0.85, 128), (0.6, 32), (0.95, 200)]:
        assert lsh_params(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=8))
def test_fast_path_sees_the_words_of_normalise_text(texts):
    """The numpy byte path splits every text exactly as ``normalise_text`` does (any Unicode)."""
    words, docs = dedup._word_hashes(texts)
    expected = [normalise_text(t).split() for t in texts]
    assert np.bincount(docs, minlength=len(texts)).tolist() == [len(w) for w in expected]
    flat = [w for ws in expected for w in ws]
    alone, _ = dedup._word_hashes(flat)  # each word as its own text
    assert np.array_equal(words, alone)


def test_contamination_same_with_workers(monkeypatch):
    monkeypatch.setattr(dedup, "_CHUNK_DOCS", 16)
    rng = random.Random(4)
    eval_texts = [" ".join(_words(rng, 30)) for _ in range(10)]
    train = [" ".join(_words(rng, 30)) for _ in range(100)]
    for i in (5, 50, 99):
        train[i] = eval_texts[i % 10]
    one = contaminated_indices(train, eval_texts, workers=1)
    assert one == contaminated_indices(train, eval_texts, workers=2) == {5: 1.0, 50: 1.0, 99: 1.0}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=12), st.integers(1, 6))
def test_groups_well_formed_on_any_text(texts, k):
    """No input crashes the detectors; groups are sorted, disjoint, in range; copies are grouped."""
    doubled = texts + texts  # every text with at least one word has an exact copy
    groups = near_duplicate_groups(doubled, shingle_size=k, num_perm=32)
    seen: set[int] = set()
    for g in groups:
        assert len(g) >= 2 and g == sorted(g) and all(0 <= i < len(doubled) for i in g)
        assert not seen & set(g)
        seen |= set(g)
    where = {i: n for n, g in enumerate(groups) for i in g}
    for i, t in enumerate(texts):
        if normalise_text(t):
            assert where[i] == where[i + len(texts)]
        else:
            assert i not in where
    cont = contaminated_indices(doubled, texts, ngram=k)
    assert all(0 <= i < len(doubled) and 0.5 <= f <= 1.0 for i, f in cont.items())
    assert all(cont.get(i) == 1.0 for i, t in enumerate(texts) if normalise_text(t))
