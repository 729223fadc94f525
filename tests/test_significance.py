"""Paired bootstrap intervals, the sign test and length ratios: the numbers that say whether fine-tuning helped."""

import numpy as np
import pytest
import sacrebleu

from desctune.evaluation import significance as sig
from desctune.evaluation.evaluate import score, significance_lines


def test_sign_test_matches_the_binomial_distribution():
    assert sig.sign_test(0, 0) == 1.0
    assert sig.sign_test(5, 5) == 1.0
    assert sig.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sig.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sig.sign_test(2, 8) == sig.sign_test(8, 2)


def test_paired_interval_is_seeded_and_brackets_a_real_gain():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 0.3, 200)
    tuned = base + 0.05 + rng.normal(0, 0.02, 200)
    first, again = sig.paired_mean(base, tuned), sig.paired_mean(base, tuned)
    assert first == again
    assert 0 < first["low"] < first["delta"] < first["high"] and sig.verdict(first) == "better"
    assert first["delta"] == pytest.approx(float(np.mean(tuned - base)))


def test_noise_is_no_significant_difference():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 0.3, 100)
    noise = base + rng.normal(0, 0.05, 100)
    noise -= (noise - base).mean()  # no gain at all on average
    interval = sig.paired_mean(base, noise)
    assert interval["low"] < 0 < interval["high"]
    assert sig.describe("ROUGE-L", interval).startswith("no significant difference: ROUGE-L")
    worse = sig.paired_mean(base, base - 0.1)
    assert sig.verdict(worse) == "worse"


def test_corpus_scores_from_statistics_equal_sacrebleu():
    hyps = ["a blue mug for coffee", "stainless kettle with a whistle", "a book"]
    refs = ["a blue ceramic mug for your coffee", "a stainless steel kettle that whistles", "a novel about a war"]
    for name, full in (("bleu", sacrebleu.corpus_bleu(hyps, [refs]).score),
                       ("chrf", sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score)):
        stats = sig.corpus_stats(name, hyps, refs)
        assert stats.shape[0] == 3
        assert sig.corpus_score(name, stats.sum(axis=0)) == pytest.approx(full)
    same = sig.paired_corpus("chrf", sig.corpus_stats("chrf", hyps, refs), sig.corpus_stats("chrf", hyps, refs))
    assert same == {"delta": 0.0, "low": 0.0, "high": 0.0}


def test_length_ratios_by_reference_length():
    refs = ["x" * 100, "x" * 500, "x" * 1000, "x" * 2000]
    ratios = sig.length_ratios(["y" * 50, "y" * 500, "y" * 250, "y" * 500], refs)
    assert ratios["median"] == pytest.approx(0.375)
    assert ratios["buckets"]["0-300"] == {"n": 1, "median": 0.5}
    assert ratios["buckets"]["800+"] == {"n": 2, "median": 0.25}


def test_score_reports_intervals_chrf_lengths_and_wording():
    refs = ["A sturdy blue ceramic mug that holds twelve ounces of coffee."] * 12
    outs = {"base": ["a mug"] * 12, "finetuned": ["A sturdy ceramic mug for twelve ounces of coffee."] * 12}
    _, m = score(refs, outs)
    assert m["finetuned"]["chrf"] > m["base"]["chrf"] and m["base"]["length_ratio"] < m["finetuned"]["length_ratio"]
    assert set(m["comparison"]) == {"bleu", "rougeL", "chrf"}
    assert all(c["verdict"] == "better" for c in m["comparison"].values())
    assert m["sign_test_p"] == pytest.approx(2 / 4096)
    assert significance_lines(m)[0].startswith("fine-tuned better: ROUGE-L +")
