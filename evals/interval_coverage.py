"""Null simulation of the seed × item interval: how often its 95% CI excludes 0 when the true difference is 0.

    python evals/interval_coverage.py [--trials 20000] [--out evals/results/interval_coverage.json]

Every comparison the library reports is a [seeds, items] matrix of paired differences d[s, i] = μ + a_s + b_i + e_si:
a retraining effect a_s shared by a seed's items, an item effect b_i shared by every seed (all seeds observe the same
probe positions), and noise. Each cell fixes the number of seeds S, of items n, and how the grand mean's variance
Var(a)/S + Var(b)/n + Var(e)/(S·n) splits:

- ``seed share``: Var(a)/S over that total, from 0 (no seed effect) to 0.99;
- ``regime``: how the rest splits between the item effect and the noise (item-dominated: Var(b) = 9 Var(e);
  items equal to noise: Var(b) = Var(e); no item effect: Var(b) = 0), plus the issue's "equal raw variance" cell
  (Var(a) = Var(b) = Var(e)).

It runs the library's own ``stats.seed_item_interval`` on every trial and, beside it, the same interval with plain
Welch–Satterthwaite degrees of freedom (what the library used before), and writes per cell: the false-positive rate
of each, and the mean half-width of the new interval over the old one (what the guard costs in width). The goal
(issue #42): at most 6% in every cell.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.stats import t as student_t

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infusion_lm import stats  # noqa: E402
from infusion_lm.atomic_io import write_json  # noqa: E402

REGIMES = {"item-dominated": 9.0, "items equal to noise": 1.0, "no item effect": 0.0}  # Var(b) / Var(e)
SHARES = [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.99]


def null_trials(S, n, seed_var, item_var, trials, rng):
    return (rng.normal(0, np.sqrt(seed_var), (trials, S, 1)) + rng.normal(0, np.sqrt(item_var), (trials, 1, n))
            + rng.normal(0, 1.0, (trials, S, n)))


def plain_satterthwaite_half(d, confidence):
    """The interval before the guard: the same two variance pieces, Welch–Satterthwaite degrees of freedom."""
    S, n = d.shape
    vs, vi = d.mean(axis=1).var(ddof=1) / S, d.mean(axis=0).var(ddof=1) / n
    df = (vs + vi) ** 2 / (vs ** 2 / (S - 1) + vi ** 2 / (n - 1))
    return student_t.ppf(0.5 + confidence / 2, df) * np.sqrt(vs + vi)


def cell(S, n, seed_var, item_var, trials, rng, confidence=0.95):
    new_fp = old_fp = 0
    new_w, old_w = [], []
    for d in null_trials(S, n, seed_var, item_var, trials, rng):
        out = stats.seed_item_interval(d, confidence)
        lo, hi = out["ci"]
        new_fp += not (lo <= 0 <= hi)
        new_w.append((hi - lo) / 2)
        h = plain_satterthwaite_half(d, confidence)
        old_fp += abs(out["mean"]) > h
        old_w.append(h)
    total = seed_var / S + item_var / n + 1.0 / (S * n)
    return {"seeds": S, "items": n, "seed_share": round(seed_var / S / total, 3),
            "var_seed": seed_var, "var_item": item_var, "var_noise": 1.0,
            "false_positive_rate": new_fp / trials, "false_positive_rate_plain_satterthwaite": old_fp / trials,
            "half_width_over_plain_satterthwaite": float(np.mean(new_w) / np.mean(old_w)),
            "half_width_over_true_se": float(np.mean(new_w) / np.sqrt(total))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--out", default="evals/results/interval_coverage.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(42)
    t0 = time.time()
    rows = []
    for S in (2, 3, 5):
        for n in (6, 60):
            cells = [("equal raw variance", 1.0, 1.0)]
            for regime, item_over_noise in REGIMES.items():
                rest = item_over_noise / n + 1.0 / (S * n)  # the item and noise part of the grand mean's variance
                for share in SHARES:
                    cells.append((regime, S * rest * share / (1 - share), item_over_noise))
            for regime, seed_var, item_var in cells:
                r = cell(S, n, seed_var, item_var, args.trials, rng)
                r["regime"] = regime
                rows.append(r)
                print(f"S={S} n={n:>2} {regime:<21} seed share {r['seed_share']:.2f}: "
                      f"{100 * r['false_positive_rate']:5.2f}% (plain {100 * r['false_positive_rate_plain_satterthwaite']:5.2f}%)"
                      f"  width x{r['half_width_over_plain_satterthwaite']:.2f}", flush=True)
    worst = max(rows, key=lambda r: r["false_positive_rate"])
    worst_old = max(rows, key=lambda r: r["false_positive_rate_plain_satterthwaite"])
    summary = {
        "command": "python evals/interval_coverage.py --trials %d" % args.trials,
        "ci_method": stats.CI_METHOD, "df_guard_quantile": stats.DF_GUARD_QUANTILE,
        "trials_per_cell": args.trials, "confidence": 0.95, "goal": "false positives <= 6% in every cell",
        "goal_met": worst["false_positive_rate"] <= 0.06,
        "worst_cell": worst, "worst_cell_plain_satterthwaite": worst_old,
        "width_cost": {f"S={S}": {"median": float(np.median([r["half_width_over_plain_satterthwaite"] for r in rows if r["seeds"] == S])),
                                  "max": float(max(r["half_width_over_plain_satterthwaite"] for r in rows if r["seeds"] == S))}
                       for S in (2, 3, 5)},
        "seconds": round(time.time() - t0, 1),
        "machine": "2 CPU cores, 1 thread; shared with the session's other work",
        "cells": rows}
    write_json(args.out, summary)
    print(f"worst cell: {100 * worst['false_positive_rate']:.2f}% (plain Satterthwaite's worst: "
          f"{100 * worst_old['false_positive_rate_plain_satterthwaite']:.2f}%); goal met: {summary['goal_met']}")
    print("half-width over plain Satterthwaite:", json.dumps(summary["width_cost"]))


if __name__ == "__main__":
    main()
