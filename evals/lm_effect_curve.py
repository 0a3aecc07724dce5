"""What sets the held-out effect of an edited arm: its drop in J, whichever editor made it.

Reads finished ``evals/lm_tinystories.py`` results (any number of runs: the 9-pair eval, budget points, editor
variants) and pools every edited arm of every pair: infused (swap), simplex PGD, matched random, and variants. For
each point: the tokens changed, −ΔJ = J_before − J_after summed over the k edited documents, the held-out Δf (mean
over seeds, with its CI) and the target-specific gain. Then:

1. Spearman and Pearson of −ΔJ against Δf, pooled and per arm;
2. a power law Δf = c · sign(−ΔJ) |−ΔJ|^α, fitted by least squares on every point, negative Δf included (the
   log-log fit on the positive points alone, which drops the arms that went the wrong way, is kept beside it);
3. per pair, the −ΔJ the fit says infused would need for 2× simplex PGD's Δf, against the −ΔJ it reached;
4. Δf per changed token, per arm;
5. the calibrated prediction (``predicted_delta_f``, a prediction for the measurement texts) against the actual Δf
   of those same texts, and separately against the held-out Δf: Spearman and median actual/predicted, every point.

Prints a table, writes JSON and a scatter plot (−ΔJ against Δf, coloured by arm, with the fit).

    python evals/lm_effect_curve.py [--runs label=evals/results/lm_tinystories.json ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ["default=evals/results/lm_tinystories.json",
                "max_changed_1=evals/results/lm_tinystories_budget_dog_bear.json",
                "first_step=evals/results/lm_tinystories_first_step.json"]


def points(label: str, result: dict) -> list:
    """One row per (pair, edited arm) of an lm_tinystories result (or of a file that keeps one under ``run``)."""
    result = result.get("run", result)
    primary = result.get("primary_set", "heldout_corpus")
    rows = []
    for pair, res in result["per_pair"].items():
        for arm, a in res["arms"].items():
            e = a.get("edits")
            if not e or e.get("J_after") is None:  # insertion and control edit nothing
                continue
            h = a.get(primary, a.get("heldout"))
            rows.append({"run": label, "pair": pair, "arm": arm, "tokens_changed": e["tokens_changed"],
                         "minus_delta_J": e["J_before"] - e["J_after"], "J_before": e["J_before"],
                         "delta_f": h["delta_f"]["mean"], "ci": h["delta_f"].get("ci"),
                         "target_specific_gain": h["specificity"]["target_specific_gain"]["mean"],
                         "predicted_delta_f": e.get("predicted_delta_f"),
                         "measurement_delta_f": (a.get("measurement") or {}).get("delta_f", {}).get("mean")})
    return rows


def power_fit(rows: list) -> dict:
    """Δf = c · sign(x) |x|^α with x = −ΔJ, by least squares on every point (negatives included); and, for
    reference, the log-log fit on the points with x > 0 and Δf > 0 alone."""
    import numpy as np
    from scipy.optimize import curve_fit

    x = np.array([r["minus_delta_J"] for r in rows], float)
    y = np.array([r["delta_f"] for r in rows], float)
    pos = (x > 0) & (y > 0)
    loglog = None
    a0, c0 = 0.5, float(np.median(np.abs(y)) / max(np.median(np.abs(x)), 1e-12) ** 0.5)
    if pos.sum() >= 3:
        lx, ly = np.log(x[pos]), np.log(y[pos])
        alpha, logc = np.polyfit(lx, ly, 1)
        resid = ly - (alpha * lx + logc)
        loglog = {"alpha": float(alpha), "c": float(np.exp(logc)), "n_points": int(pos.sum()),
                  "points_dropped": int((~pos).sum()), "r2_loglog": float(1 - resid.var() / ly.var())}
        a0, c0 = float(alpha), float(np.exp(logc))
    model = lambda t, c, a: c * np.sign(t) * np.abs(t) ** a
    (c, alpha), _ = curve_fit(model, x, y, p0=[c0, a0], maxfev=20000)
    resid = y - model(x, c, alpha)
    return {"alpha": float(alpha), "c": float(c), "n_points": int(len(x)),
            "r2": float(1 - resid.var() / y.var()), "residual_sd": float(resid.std(ddof=2)),
            "loglog_positive_points_only": loglog}


def correlations(rows: list) -> dict:
    from scipy.stats import pearsonr, spearmanr

    x, y = [r["minus_delta_J"] for r in rows], [r["delta_f"] for r in rows]
    if len(rows) < 4:
        return {"n_points": len(rows)}
    return {"n_points": len(rows), "spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="LABEL=PATH",
                   help="finished lm_tinystories results; the label names the run's variant in the table")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_effect_curve.json"))
    args = p.parse_args()

    rows = []
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--runs {spec!r}: write LABEL=PATH, e.g. default=evals/results/lm_tinystories.json")
        if not Path(path).is_absolute() and not Path(path).is_file():  # relative to the repository, wherever run
            path = str(ROOT / path)
        if not Path(path).is_file():
            raise SystemExit(f"--runs {spec!r}: {path} not found; run evals/lm_tinystories.py first")
        rows += points(label, json.loads(Path(path).read_text()))
    seen, unique = set(), []
    for r in rows:  # an arm merged into several results files (a baseline beside a variant) counts once
        key = (r["pair"], r["arm"], r["minus_delta_J"], r["delta_f"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rows = unique
    if len(rows) < 4:
        raise SystemExit(f"only {len(rows)} edited arms in --runs; the fit needs at least 4")

    groups = sorted({(r["run"], r["arm"]) for r in rows})
    fit = power_fit([r for r in rows if r["arm"] != "random"])  # random's ΔJ sits at the noise floor, near 0
    by_group = {}
    for g in groups:
        sel = [r for r in rows if (r["run"], r["arm"]) == g]
        by_group[f"{g[0]}/{g[1]}"] = {
            "n_pairs": len(sel), "delta_f_mean": statistics.mean(r["delta_f"] for r in sel),
            "minus_delta_J_mean": statistics.mean(r["minus_delta_J"] for r in sel),
            "tokens_changed": sum(r["tokens_changed"] for r in sel),
            "delta_f_per_token": statistics.mean(r["delta_f"] / max(r["tokens_changed"], 1) for r in sel),
            "target_specific_gain_mean": statistics.mean(r["target_specific_gain"] for r in sel)}
        on_fit = [r for r in sel if r["minus_delta_J"] > 0 and r["delta_f"] > 0]
        if on_fit and g[1] != "random":  # above 0: more Δf than the pooled fit gives for the arm's −ΔJ
            by_group[f"{g[0]}/{g[1]}"]["mean_log_residual"] = statistics.mean(
                math.log(r["delta_f"] / (fit["c"] * r["minus_delta_J"] ** fit["alpha"])) for r in on_fit)

    # What 2× simplex PGD would take, per pair of the default run, by the fit.
    need = []
    default = [r for r in rows if r["run"] == rows[0]["run"]]
    for pair in sorted({r["pair"] for r in default}):
        arm = {r["arm"]: r for r in default if r["pair"] == pair}
        if "infused" in arm and "simplex_pgd" in arm and arm["simplex_pgd"]["delta_f"] > 0:
            goal = 2 * arm["simplex_pgd"]["delta_f"]
            needed = (goal / fit["c"]) ** (1 / fit["alpha"])
            need.append({"pair": pair, "pgd_delta_f": arm["simplex_pgd"]["delta_f"], "goal_delta_f": goal,
                         "infused_minus_delta_J": arm["infused"]["minus_delta_J"], "minus_delta_J_needed": needed,
                         "factor": needed / arm["infused"]["minus_delta_J"]})

    with_pred = [r for r in rows if r.get("predicted_delta_f") is not None and r["arm"] != "random"]
    calibration = None
    if len(with_pred) >= 4:
        from scipy.stats import spearmanr

        def versus(key):
            pts = [r for r in with_pred if r.get(key) is not None and r["predicted_delta_f"] != 0]
            if len(pts) < 4:
                return None
            return {"n_points": len(pts),
                    "spearman": float(spearmanr([r["predicted_delta_f"] for r in pts], [r[key] for r in pts]).statistic),
                    "median_actual_over_predicted": statistics.median(r[key] / r["predicted_delta_f"] for r in pts)}

        calibration = {"against_measurement_delta_f": versus("measurement_delta_f"),
                       "against_heldout_delta_f": versus("delta_f"),
                       "note": "predicted_delta_f predicts the measurement texts' Δf; the held-out Δf is another set"}

    runs = " ".join(r.replace(f"{ROOT}/", "") for r in args.runs)
    out = {"command": "python evals/lm_effect_curve.py --runs " + runs,
           "correlation_pooled": correlations(rows),
           "correlation_per_arm": {f"{g[0]}/{g[1]}": correlations([r for r in rows if (r["run"], r["arm"]) == g])
                                   for g in groups},
           "power_fit_edited_arms": fit, "by_run_and_arm": by_group, "two_x_pgd_needs": need,
           "prediction_vs_actual": calibration, "points": rows}

    print(f"{len(rows)} edited arms from {len(args.runs)} runs")
    c = out["correlation_pooled"]
    print(f"−ΔJ against Δf, pooled: Spearman {c['spearman']:.3f}, Pearson {c['pearson']:.3f}")
    print(f"fit (random left out, every point): Δf = {fit['c']:.4g} · (−ΔJ)^{fit['alpha']:.3f}   R² {fit['r2']:.3f}, "
          f"{fit['n_points']} points")
    if fit["loglog_positive_points_only"]:
        ll = fit["loglog_positive_points_only"]
        print(f"  (log-log on the positive points only: α {ll['alpha']:.3f}, {ll['points_dropped']} points dropped)")
    print(f"\n{'run/arm':<28}{'pairs':>6}{'Δf mean':>9}{'−ΔJ mean':>10}{'tokens':>8}{'Δf/token':>10}{'specific':>10}")
    for name, s in by_group.items():
        print(f"{name:<28}{s['n_pairs']:>6}{s['delta_f_mean']:>+9.3f}{s['minus_delta_J_mean']:>10.0f}{s['tokens_changed']:>8}"
              f"{s['delta_f_per_token']:>+10.4f}{s['target_specific_gain_mean']:>+10.3f}"
              + (f"{math.exp(s['mean_log_residual']):>7.2f}×" if "mean_log_residual" in s else ""))
    if need:
        print(f"\n{'pair':<12}{'PGD Δf':>8}{'goal':>8}{'infused −ΔJ':>13}{'needed':>9}{'factor':>8}")
        for n in need:
            print(f"{n['pair']:<12}{n['pgd_delta_f']:>+8.3f}{n['goal_delta_f']:>+8.3f}{n['infused_minus_delta_J']:>13.0f}"
                  f"{n['minus_delta_J_needed']:>9.0f}{n['factor']:>7.1f}×")
        print(f"median factor of −ΔJ needed for 2× PGD: {statistics.median(n['factor'] for n in need):.1f}×")
    if calibration:
        for key, c in calibration.items():
            if isinstance(c, dict):
                print(f"\nprediction vs actual, {key} ({c['n_points']} edited arms): Spearman {c['spearman']:.3f}, "
                      f"median actual/predicted {c['median_actual_over_predicted']:.2f}")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    png = out_path.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in groups:
        sel = [r for r in rows if (r["run"], r["arm"]) == g]
        ax.scatter([r["minus_delta_J"] for r in sel], [r["delta_f"] for r in sel], label=f"{g[0]}/{g[1]}", s=22)
    xs = np.linspace(0, max(r["minus_delta_J"] for r in rows) * 1.2, 100)
    ax.plot(xs, fit["c"] * xs ** fit["alpha"], "k--", lw=1, label=f"Δf = {fit['c']:.3g}·(−ΔJ)^{fit['alpha']:.2f}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("−ΔJ (sum over the k edited documents)")
    ax.set_ylabel("held-out Δf (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(out_path)
    print(f"\nwrote {out_path} and {png}")


if __name__ == "__main__":
    main()
