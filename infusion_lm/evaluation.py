"""Every arm against control: Δf with paired bootstrap CIs, target probabilities, flips, specificity, completion rates,
edit size and perplexity, predicted against actual Δf, and the defender's view. Writes results.json and the report.

All comparisons are paired by measurement item (probe position or prompt): both arms saw the same items, so each
Δ is computed item by item and the CI resamples items.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .storage import read_json, write_json


def paired_delta(arm: Sequence[float], control: Sequence[float], samples: int, confidence: float, seed: int) -> Dict:
    from scipy.stats import bootstrap

    d = np.asarray(arm, dtype=float) - np.asarray(control, dtype=float)
    out = {"mean": float(d.mean()), "n": int(d.size), "ci": None}
    if d.size >= 2 and np.ptp(d) > 0:
        res = bootstrap((d,), np.mean, n_resamples=samples, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
        out["ci"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    elif d.size >= 1:
        out["ci"] = [float(d.mean()), float(d.mean())]
    return out


def auroc(positive: Sequence[float], negative: Sequence[float]) -> Optional[float]:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n₁n₀)."""
    from scipy.stats import mannwhitneyu

    if not len(positive) or not len(negative):
        return None
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def compare(arm: Dict, control: Dict, samples: int, confidence: float, seed: int) -> Dict:
    out = {"delta_f": paired_delta(arm["f"], control["f"], samples, confidence, seed),
           "f_arm": arm["f_mean"], "f_control": control["f_mean"]}
    if arm.get("kind") == "contrastive":
        out["delta_p_target"] = paired_delta(arm["p_target"], control["p_target"], samples, confidence, seed)
        n = len(arm["f"])
        out["top1_flips_to_target"] = sum(a and not c for a, c in zip(arm["top1_is_target"], control["top1_is_target"])) / n
        out["top1_flips_away"] = sum(c and not a for a, c in zip(arm["top1_is_target"], control["top1_is_target"])) / n
        out["target_over_probe_flips"] = sum(a and not c for a, c in zip(arm["target_over_probe"], control["target_over_probe"])) / n
        out["top1_is_target_rate"] = sum(arm["top1_is_target"]) / n
        words = list(arm["logp"])
        target, others = words[0], words[2:]
        if others:
            from scipy.stats import wilcoxon

            d_target = np.subtract(arm["logp"][target], control["logp"][target])
            d_others = np.mean([np.subtract(arm["logp"][w], control["logp"][w]) for w in others], axis=0)
            diff = d_target - d_others
            p = float(wilcoxon(diff, alternative="greater").pvalue) if diff.size >= 2 and np.any(diff != 0) else None
            out["specificity"] = {"delta_logp_target": float(d_target.mean()), "delta_logp_others": float(d_others.mean()),
                                  "others": others, "wilcoxon_p": p}
    if arm.get("kind") == "completion":
        out["greedy_rate"] = {"arm": float(np.mean(arm["greedy_hit"])), "control": float(np.mean(control["greedy_hit"]))}
        if arm.get("sampled_hit_rate"):
            out["sampled_rate"] = {"arm": float(np.mean(arm["sampled_hit_rate"])),
                                   "control": float(np.mean(control["sampled_hit_rate"]))}
    return out


def _edit_summary(records: List[Dict]) -> Dict:
    ratios = [r["perplexity_after"] / r["perplexity_before"] for r in records]
    return {"documents": len(records), "tokens_changed": sum(r["n_changed"] for r in records),
            "budget": sum(r["budget"] for r in records),
            "J_before": sum(r["J_before"] for r in records), "J_after": sum(r["J_after"] for r in records),
            "predicted_delta_f": sum(r["predicted_delta_f"] for r in records),
            "perplexity_ratio_median": statistics.median(ratios) if ratios else None,
            "perplexity_ratio_max": max(ratios) if ratios else None}


def _arm_records(run_dir: Path, arm: str) -> Optional[List[Dict]]:
    import json

    path = run_dir / ("edits.jsonl" if arm == "infused" else f"baselines/{arm}/edits.jsonl")
    if arm in ("control", "insertion") or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def detectors(records: List[Dict], clean_J: Sequence[float], clean_ppl: Sequence[float]) -> Dict:
    """AUROC of flagging the edited documents by most negative J, and by highest perplexity under the base model.

    The same indices in the clean corpus give the baseline: they were selected for their negative J, so an influence
    detector singles them out somewhat even before any edit.
    """
    edited = {r["doc_index"]: r for r in records}
    J = [edited[i]["J_after"] if i in edited else clean_J[i] for i in range(len(clean_J))]
    ppl = [edited[i]["perplexity_after"] if i in edited else clean_ppl[i] for i in range(len(clean_ppl))]

    def split(values):
        return [values[i] for i in edited], [values[i] for i in range(len(values)) if i not in edited]

    pos, neg = split([-j for j in J])
    cpos, cneg = split([-float(j) for j in clean_J])
    ppos, pneg = split(ppl)
    cppos, cpneg = split(list(clean_ppl))
    return {"influence_auroc": auroc(pos, neg), "influence_auroc_before_edit": auroc(cpos, cneg),
            "perplexity_auroc": auroc(ppos, pneg), "perplexity_auroc_before_edit": auroc(cppos, cpneg)}


def evaluate_run(pipe) -> Dict:
    """Reads every arm's observations, compares them with control, writes results.json and the report."""
    from .losses import perplexities
    from .report import write_report

    run_dir, ev, seed = pipe.dir, pipe.recipe.evaluate, pipe.recipe.run.seed
    arms = pipe.recipe.retrain.arms
    obs = {a: read_json(run_dir / "retrain" / a / "observations.json") for a in arms}
    control = obs["control"]
    summary = read_json(run_dir / "retrain" / "summary.json")
    results: Dict = {"measurement": pipe.measurement.description, "theta_hat": summary.get("theta_hat"),
                     "control": {s: control[s]["f_mean"] for s in ("measurement", "heldout")},
                     "n_documents": len(pipe.dataset), "k": pipe.recipe.select.k, "arms": {}}
    clean_J = clean_ppl = None
    if ev.detectors and any(_arm_records(run_dir, a) for a in arms):
        from .storage import read_tensors

        clean_J = read_tensors(run_dir / "scores.safetensors")["scores"].tolist()
        clean_ppl = perplexities(pipe.model, [pipe.dataset[i] for i in range(len(pipe.dataset))],
                                 pipe.tokenizer.pad_token_id)
    for arm in arms:
        if arm == "control":
            continue
        entry = {s: compare(obs[arm][s], control[s], ev.bootstrap_samples, ev.confidence, seed)
                 for s in ("measurement", "heldout")}
        entry["weights_equal_control"] = obs[arm]["weights"] == control["weights"]
        records = _arm_records(run_dir, arm)
        if records:
            entry["edits"] = _edit_summary(records)
            entry["predicted_vs_actual"] = {"predicted_delta_f": entry["edits"]["predicted_delta_f"],
                                            "actual_delta_f": entry["measurement"]["delta_f"]["mean"]}
            if clean_J is not None:
                entry["detectors"] = detectors(records, clean_J, clean_ppl)
        results["arms"][arm] = entry
    write_json(run_dir / "results.json", results)
    write_report(run_dir, results, pipe.tokenizer)
    return results
