"""The statistics every comparison uses: paired and two-level bootstrap CIs, the one-sided Wilcoxon test of
specificity, AUROC with ties, and top-1 flip counts.

Directions are fixed here once: a difference is always *arm minus control*, a specificity test asks whether the
target rose *more* than the other words, and an AUROC is the chance that an edited document scores *higher* than a
clean one. Each is tested against hand-computed answers in tests/test_stats.py.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def percentile_ci(samples: np.ndarray, confidence: float) -> list:
    alpha = (1 - confidence) / 2
    return [float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))]


def paired_delta(arm: Sequence[float], control: Sequence[float], samples: int, confidence: float, seed: int) -> Dict:
    """Mean of arm − control over paired items, with a percentile bootstrap CI over items (None below 2 items)."""
    d = np.asarray(arm, dtype=float) - np.asarray(control, dtype=float)
    out = {"mean": float(d.mean()) if d.size else None, "n": int(d.size), "ci": None}
    if d.size >= 2:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
        out["ci"] = percentile_ci(means, confidence)
    return out


def two_level_bootstrap(d: np.ndarray, samples: int, confidence: float, seed: int) -> Dict:
    """Mean of a [seeds, items] matrix of paired differences, with a two-level percentile bootstrap CI.

    Each resample draws seeds with replacement, then, within each drawn seed, items with replacement, so the CI
    carries both the retraining noise (seeds) and the choice of items. With one seed it is the item-level
    bootstrap; with fewer than 2 items and 2 seeds there is nothing to resample and the CI is None.
    """
    d = np.atleast_2d(np.asarray(d, dtype=float))
    S, n = d.shape
    out = {"mean": float(d.mean()) if d.size else None, "n_seeds": S, "n_items": n,
           "per_seed": [float(x) for x in d.mean(axis=1)], "ci": None}
    if S * n < 2 or (S == 1 and n < 2):
        return out
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(samples, S))
    items = rng.integers(0, n, size=(samples, S, n))
    means = d[seeds[:, :, None], items].mean(axis=(1, 2))
    out["ci"] = percentile_ci(means, confidence)
    return out


def wilcoxon_greater(diff: Sequence[float]) -> Optional[float]:
    """One-sided Wilcoxon signed-rank p for "diff is above 0" (None when there are under 2 non-zero values)."""
    from scipy.stats import wilcoxon

    diff = np.asarray(diff, dtype=float)
    if np.count_nonzero(diff) < 2:
        return None
    return float(wilcoxon(diff, alternative="greater").pvalue)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> Optional[float]:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n₁n₀)."""
    from scipy.stats import mannwhitneyu

    if not len(positive) or not len(negative):
        return None
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def flip_counts(arm_top1: Sequence[bool], control_top1: Sequence[bool]) -> Dict[str, int]:
    """Items whose top-1 became the target (to_target) and items whose top-1 stopped being it (away)."""
    to_target = sum(bool(a) and not bool(c) for a, c in zip(arm_top1, control_top1))
    away = sum(bool(c) and not bool(a) for a, c in zip(arm_top1, control_top1))
    return {"to_target": to_target, "away": away, "n": len(arm_top1)}
