"""Is the fine-tuned model really better? Paired bootstrap intervals, a sign test and length ratios for two sets of
outputs on the same references.

Both systems are scored on the same resampled examples in every bootstrap round (a paired bootstrap), so the
interval is of the difference itself. Corpus-level metrics (BLEU, chrF++) are recomputed from per-example
sufficient statistics on each resample, as sacrebleu's own paired bootstrap does; ROUGE-L is a mean of per-example
F-measures. All of it is seeded, so a report can be reproduced.
"""

from __future__ import annotations

import math

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

RESAMPLES = 1000
CONFIDENCE = 0.95
# Reference lengths (characters) at which the length ratio is reported separately.
LENGTH_BUCKETS = ((0, 300), (300, 800), (800, None))


def _corpus_metric(name: str):
    return BLEU() if name == "bleu" else CHRF(word_order=2)


def corpus_stats(name: str, outputs: list[str], references: list[str]) -> np.ndarray:
    """Per-example sufficient statistics of a corpus metric ('bleu' or 'chrf'), one row per example."""
    metric = _corpus_metric(name)
    return np.asarray(metric._extract_corpus_statistics(outputs, [references]), dtype=np.float64)


def corpus_score(name: str, stats: np.ndarray) -> float:
    """The corpus score (0-100) from summed sufficient statistics."""
    return float(_corpus_metric(name)._compute_score_from_stats(list(stats)).score)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_mean(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """b - a for a per-example metric averaged over examples (ROUGE-L): point estimate and 95% interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(diff) == 0:
        return {"delta": 0.0, "low": 0.0, "high": 0.0}
    means = diff[_indices(len(diff), resamples, seed)].mean(axis=1)
    low, high = _interval(means)
    return {"delta": float(diff.mean()), "low": low, "high": high}


def paired_corpus(name: str, a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """b - a for a corpus metric, from per-example sufficient statistics: point estimate and 95% interval."""
    if len(a) == 0:
        return {"delta": 0.0, "low": 0.0, "high": 0.0}
    deltas = np.array([corpus_score(name, b[i].sum(axis=0)) - corpus_score(name, a[i].sum(axis=0))
                       for i in _indices(len(a), resamples, seed)])
    low, high = _interval(deltas)
    return {"delta": corpus_score(name, b.sum(axis=0)) - corpus_score(name, a.sum(axis=0)), "low": low, "high": high}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of wins vs losses (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def verdict(interval: dict) -> str:
    """'better', 'worse' or 'no significant difference', from a 95% interval of (fine-tuned - base)."""
    if interval["low"] > 0:
        return "better"
    if interval["high"] < 0:
        return "worse"
    return "no significant difference"


def length_ratios(outputs: list[str], references: list[str]) -> dict:
    """Output length / reference length (characters): the median overall and per reference-length bucket."""
    ratio = np.array([len(o) / max(len(r), 1) for o, r in zip(outputs, references)], dtype=np.float64)
    ref_len = np.array([len(r) for r in references])
    out = {"median": float(np.median(ratio)) if len(ratio) else 0.0, "buckets": {}}
    for low, high in LENGTH_BUCKETS:
        mask = (ref_len >= low) & (ref_len < (high if high is not None else np.inf))
        label = f"{low}-{high}" if high is not None else f"{low}+"
        out["buckets"][label] = {"n": int(mask.sum()),
                                 "median": float(np.median(ratio[mask])) if mask.any() else None}
    return out


def describe(metric: str, interval: dict, digits: int = 4) -> str:
    """One line for people: 'fine-tuned better: ROUGE-L +0.0120 [+0.0040, +0.0200], 95% CI'."""
    what = verdict(interval)
    head = f"fine-tuned {what}" if what != "no significant difference" else what
    d = digits
    return (f"{head}: {metric} {interval['delta']:+.{d}f} [{interval['low']:+.{d}f}, {interval['high']:+.{d}f}], "
            f"{CONFIDENCE:.0%} CI")
