"""The statistics every comparison uses: the paired bootstrap CI over items, the seed × item interval (and its one-sided
test), AUROC with ties, and top-1 flip counts.

Directions are fixed here once: a difference is always *arm minus control*, a specificity test asks whether the
target rose *more* than the other words, and an AUROC is the chance that an edited document scores *higher* than a
clean one. Each is tested against hand-computed answers in tests/test_stats.py.
"""

from __future__ import annotations

import functools
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


CI_METHOD = ("seed_item_t: mean ± t_df · sqrt(var(seed means)/S + var(item means)/n), df the smaller Satterthwaite df "
             "with either piece at its 80% upper confidence bound")

# Satterthwaite's degrees of freedom are a plug-in: with 2–3 seeds the seed piece's estimate is often far below its
# true value (one degree of freedom), the formula then credits the whole variance with the items' n − 1 degrees of
# freedom, and t falls to ~2 just when the variance is underestimated (12–13% false positives at nominal 5%, S = 2).
# Computing the degrees of freedom with each piece raised to the upper confidence bound below, and keeping the smaller,
# holds the level in every cell of evals/interval_coverage.py (S ∈ {2, 3, 5}, n ∈ {6, 60}, seed share 0 to 1).
DF_GUARD_QUANTILE = 0.2


@functools.lru_cache(maxsize=None)
def _chi2_lower(df: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(DF_GUARD_QUANTILE, df))


def _satterthwaite(parts) -> float:
    return sum(v for v, _ in parts) ** 2 / sum(v ** 2 / k for v, k in parts if v > 0)


def guarded_df(parts) -> float:
    """Degrees of freedom for a sum of independent variance pieces ``[(variance, df), ...]``: the smallest of the
    Welch–Satterthwaite df and the Satterthwaite df of each variant in which one piece is raised to its upper
    confidence bound v·k/χ²_k(DF_GUARD_QUANTILE). One piece: its own df."""
    if len(parts) == 1:
        return float(parts[0][1])
    dfs = [_satterthwaite(parts)]
    for j in range(len(parts)):
        raised = [(v * k / _chi2_lower(k), k) if i == j else (v, k) for i, (v, k) in enumerate(parts)]
        if any(v > 0 for v, _ in raised):
            dfs.append(_satterthwaite(raised))
    return float(min(dfs))


def seed_item_interval(d: np.ndarray, confidence: float) -> Dict:
    """Mean of a [seeds, items] matrix of paired differences, with a CI that carries both noise sources.

    Every seed observes the *same* items, so the model is d[s, i] = μ + a_s + b_i + e_si: a retraining effect a_s
    shared by a seed's items, an item effect b_i shared by the seeds, and noise. The grand mean's variance is
    Var(a)/S + Var(b)/n + Var(e)/(S·n), estimated by two pieces:

    - the items: the variance of the n column means (each item averaged over the seeds) over n. Items are resampled
      as whole columns, never independently within each seed (that divides the item variance by S);
    - the seeds: the variance of the S seed means over S, with S − 1 degrees of freedom.

    Both pieces contain Var(e)/(S·n), so their sum overstates the variance by that much: conservative by design
    (e is the smallest term whenever either effect matters). The interval is mean ± t_df · √(V_seeds + V_items), with
    ``guarded_df`` degrees of freedom (never more than plain Welch–Satterthwaite). One seed: the item piece alone, and
    ``"seed_noise": "not measured"``; one item: the seed piece alone (S − 1 degrees of freedom); one of each: no CI.
    ``p_greater`` is the one-sided p-value of "the mean is above 0" from the same t (the test the CI inverts).

    Checked by simulation (evals/interval_coverage.py, 20,000 null trials per cell, in
    evals/results/interval_coverage.json; a smaller grid in tests/test_stats.py): at nominal 95% the interval excludes
    0 in at most 6% of trials for S ∈ {2, 3, 5}, n ∈ {6, 60} and seed shares from 0 to 1 (plain Satterthwaite: up to
    13% at S = 2).
    """
    from scipy.stats import t as student_t

    d = np.atleast_2d(np.asarray(d, dtype=float))
    S, n = d.shape
    out = {"mean": float(d.mean()) if d.size else None, "n_seeds": S, "n_items": n,
           "per_seed": [float(x) for x in d.mean(axis=1)], "ci": None, "ci_method": CI_METHOD,
           "per_seed_item": d.tolist()}
    if S == 1:
        out["seed_noise"] = "not measured: one retraining seed"
    parts = []  # (variance of the mean, degrees of freedom)
    if S >= 2:
        parts.append((d.mean(axis=1).var(ddof=1) / S, S - 1))
    if n >= 2:
        parts.append((d.mean(axis=0).var(ddof=1) / n, n - 1))
    if not parts:
        return out
    var = sum(v for v, _ in parts)
    if var == 0:
        out["ci"] = [out["mean"], out["mean"]]
        return out
    df = guarded_df(parts)
    se = float(np.sqrt(var))
    half = float(student_t.ppf(0.5 + confidence / 2, df) * se)
    out["ci"] = [out["mean"] - half, out["mean"] + half]
    out["df"] = df
    out["p_greater"] = float(student_t.sf(out["mean"] / se, df))
    return out


def seed_t_interval(seed_means: Sequence[float], confidence: float) -> Optional[list]:
    """A t-interval on per-seed means alone (the seed piece of ``seed_item_interval``, one item per seed): what can be
    recomputed for a result whose per-item data are gone. It leaves out the item variance every seed shares."""
    return seed_item_interval(np.asarray(seed_means, dtype=float)[:, None], confidence)["ci"]


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
