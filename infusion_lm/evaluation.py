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

from .stats import auroc, flip_counts, paired_delta, two_level_bootstrap, wilcoxon_greater  # noqa: F401 - re-exported
from .run_folder import RunFolder
from .atomic_io import read_json, write_json


def per_seed(obs: Dict, name: str) -> List[Dict]:
    """One arm's observations of one set, seed by seed (a single-seed record is one seed)."""
    if "per_seed" in obs:
        return [obs["per_seed"][s][name] for s in sorted(obs["per_seed"], key=int)]
    return [obs[name]]


def paired_seeds(arm: Sequence[Dict] | Dict, control: Sequence[Dict] | Dict):
    """(arm, control) as lists of per-seed observations (a single dict is one seed), and ``diffs(key)``: the
    [seeds, items] matrix of arm − control for one per-item field."""
    arm = [arm] if isinstance(arm, dict) else list(arm)
    control = [control] if isinstance(control, dict) else list(control)

    def diffs(key):
        return np.array([np.subtract(a[key], c[key]) for a, c in zip(arm, control)], dtype=float)

    return arm, control, diffs


def compare(arm: Sequence[Dict] | Dict, control: Sequence[Dict] | Dict, samples: int, confidence: float,
            seed: int) -> Dict:
    """One arm against control on one evaluation set, paired by seed and by item.

    ``arm`` and ``control`` are lists of observations, one per retraining seed (the same seeds in the same order);
    a single dict is one seed. Δ = arm − control item by item within a seed; CIs are two-level bootstraps (seeds,
    then items)."""
    arm, control, diffs = paired_seeds(arm, control)

    def boot(d):
        return two_level_bootstrap(d, samples, confidence, seed)

    out = {"delta_f": boot(diffs("f")), "f_arm": float(np.mean([a["f_mean"] for a in arm])),
           "f_control": float(np.mean([c["f_mean"] for c in control])), "n_seeds": len(arm)}
    if arm[0].get("kind") == "contrastive":
        out["delta_p_target"] = boot(diffs("p_target"))
        flips = [flip_counts(a["top1_is_target"], c["top1_is_target"]) for a, c in zip(arm, control)]
        n = flips[0]["n"]
        out["top1_flips_to_target"] = float(np.mean([f["to_target"] for f in flips])) / n
        out["top1_flips_away"] = float(np.mean([f["away"] for f in flips])) / n
        out["target_over_probe_flips"] = float(np.mean(
            [flip_counts(a["target_over_probe"], c["target_over_probe"])["to_target"] for a, c in zip(arm, control)])) / n
        out["top1_is_target_rate"] = float(np.mean([np.mean(a["top1_is_target"]) for a in arm]))
        if "target_rank" in arm[0]:
            out["delta_target_rank"] = float(diffs("target_rank").mean())  # negative: the target moved up
        words = list(arm[0]["logp"])
        target, others = words[0], words[2:]
        if others:
            d_target = np.array([np.subtract(a["logp"][target], c["logp"][target]) for a, c in zip(arm, control)])
            d_others = np.array([np.mean([np.subtract(a["logp"][w], c["logp"][w]) for w in others], axis=0)
                                 for a, c in zip(arm, control)])
            specific = d_target - d_others  # [seeds, items]: the target's rise beyond the other words'
            out["specificity"] = {"delta_logp_target": float(d_target.mean()),
                                  "delta_logp_others": float(d_others.mean()), "others": others,
                                  "target_specific_gain": boot(specific),
                                  "wilcoxon_p": wilcoxon_greater(specific.mean(axis=0))}
    if arm[0].get("kind") == "completion":
        out["greedy_rate"] = {"arm": float(np.mean([np.mean(a["greedy_hit"]) for a in arm])),
                              "control": float(np.mean([np.mean(c["greedy_hit"]) for c in control]))}
        if arm[0].get("sampled_hit_rate"):
            out["sampled_rate"] = {"arm": float(np.mean([np.mean(a["sampled_hit_rate"]) for a in arm])),
                                   "control": float(np.mean([np.mean(c["sampled_hit_rate"]) for c in control])),
                                   "delta": boot(diffs("sampled_hit_rate"))}
    return out


def _edit_summary(records: List[Dict]) -> Dict:
    ratios = [r["perplexity_after"] / r["perplexity_before"] for r in records]
    return {"documents": len(records), "tokens_changed": sum(r["n_changed"] for r in records),
            "budget": sum(r["budget"] for r in records),
            "J_before": sum(r["J_before"] for r in records), "J_after": sum(r["J_after"] for r in records),
            "predicted_delta_f": sum(r["predicted_delta_f"] for r in records),
            **({"predicted_delta_f_same_v": sum(r["predicted_delta_f_same_v"] for r in records)}
               if all("predicted_delta_f_same_v" in r for r in records) else {}),
            "perplexity_ratio_median": statistics.median(ratios) if ratios else None,
            "perplexity_ratio_max": max(ratios) if ratios else None}


def _arm_records(run_dir: Path, arm: str) -> Optional[List[Dict]]:
    import json

    path = RunFolder(run_dir).edits_of(arm).edits
    if arm in ("control", "insertion") or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


DETECTOR_ASSUMPTIONS = {
    "perplexity": "The defender has the public base model and flags the documents it finds least likely (highest "
                  "perplexity). Needs nothing from the attacker.",
    "defender_influence": "The defender states a behaviour it guards against (any of `evaluate.defender_words` where "
                          "the text names the probe, on the held-out documents), fits influence on the corpus it "
                          "received, and flags the documents that most push that behaviour up (most negative J "
                          "under its own v). It does not know the attacker's target or measurement documents. "
                          "Here its v uses the run's preconditioner (factors fitted on the clean corpus, or the "
                          "optimizer's statistics).",
}


def detectors(edited: Dict[int, Dict], clean: Dict[str, Sequence[float]], scores: Dict[str, Dict[int, float]]) -> Dict:
    """AUROC of singling out the edited documents, per detector: after the edit (the corpus the defender receives)
    and before it (the same indices in the clean corpus: the selection alone may already stand out).

    ``clean[name]`` is a detector's score of every clean document (higher: more suspicious); ``scores[name]`` its
    score of each edited document."""
    n = len(next(iter(clean.values())))
    out = {}
    for name, values in clean.items():
        after = [scores[name].get(i, values[i]) for i in range(n)]
        pos = [after[i] for i in edited]
        neg = [after[i] for i in range(n) if i not in edited]
        out[f"{name}_auroc"] = auroc(pos, neg)
        out[f"{name}_auroc_before_edit"] = auroc([values[i] for i in edited],
                                                 [values[i] for i in range(n) if i not in edited])
    return out


class DefenderView:
    """What a defender can compute without the attacker's v: perplexity under the base model, and influence under a
    measurement the defender states itself. Clean-corpus scores are computed once and shared by every arm."""

    def __init__(self, pipe):
        from .forward_mode_j import document_j
        from .influence import compute_ihvp
        from .losses import perplexities
        from .measurement import any_word_measurement

        self.pipe = pipe
        m, ev = pipe.recipe.measurement, pipe.recipe.evaluate
        self.pad = pipe.tokenizer.pad_token_id
        self.base = pipe.base_model
        rows = [pipe.dataset[i] for i in range(len(pipe.dataset))]
        self.clean = {"perplexity": perplexities(self.base, rows, self.pad)}
        self.J = None
        if m.kind == "contrastive":
            words = list(ev.defender_words) or [w for w in [m.target, *ev.candidates] if w.strip() != m.probe.strip()]
            docs = m.heldout_documents or m.documents
            measurement = any_word_measurement(pipe.tokenizer, docs, m.probe, words)
            if pipe.uses_factors:
                v = compute_ihvp(pipe.model, measurement, pipe.tracked, pipe.factors_dir, pipe.damping)
            else:
                from .optimizer_influence import optimizer_ihvp

                v, _ = optimizer_ihvp(pipe.model, measurement, pipe.tracked, pipe.arm_rows({}), pipe.recipe.retrain,
                                      self.pad, pipe.checkpoint_step(), stats=pipe.optimizer_stats())
            i = pipe.recipe.influence
            self.J = document_j(pipe.model, v, i.j_method, i.fd_eps_rel)
            self.words = words
            self.clean["defender_influence"] = (-self.J.dataset(rows, self.pad)).tolist()

    def scores(self, records: List[Dict]) -> Dict:
        from .losses import perplexities

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
        idx = [r["doc_index"] for r in records]
        scores = {"perplexity": dict(zip(idx, perplexities(self.base, rows, self.pad)))}
        if self.J is not None:
            scores["defender_influence"] = dict(zip(idx, (-self.J.dataset(rows, self.pad)).tolist()))
        out = detectors({i: True for i in idx}, self.clean, scores)
        if self.J is not None:
            out["defender_words"] = self.words
        return out


def arm_difference(a: Dict, b: Dict, c: Dict, name: str, samples: int, confidence: float, seed: int) -> Dict:
    """Arm a minus arm b on one set, paired by seed and item (both against the same control)."""
    da = np.array([np.subtract(x["f"], y["f"]) for x, y in zip(per_seed(a, name), per_seed(c, name))])
    db = np.array([np.subtract(x["f"], y["f"]) for x, y in zip(per_seed(b, name), per_seed(c, name))])
    return two_level_bootstrap(da - db, samples, confidence, seed)


def primary_set(sets: Sequence[str]) -> str:
    """The set a verdict is read on: real held-out text where there is some, else the templated held-out set."""
    return "heldout_corpus" if "heldout_corpus" in sets else ("heldout" if "heldout" in sets else sets[0])


def verdict(results: Dict) -> str:
    """One sentence: does infused beat control, and does it beat random, on the primary held-out set?"""
    v = results.get("verdict")
    arms = results["arms"]
    if "infused" not in arms:
        return "No infused arm was trained."
    name = results["primary_set"]
    d = arms["infused"][name]["delta_f"]
    seeds = d.get("n_seeds", 1)

    def excl(ci):
        return ci is not None and (ci[0] > 0 or ci[1] < 0)

    ci_txt = lambda x: f"[{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]" if x.get("ci") else "(no CI)"
    s = (f"On {name} ({d['n_items']} items, {seeds} seed{'s' if seeds != 1 else ''}), infused moved f by "
         f"{d['mean']:+.3f} {ci_txt(d)} against control"
         f"{' (CI excludes 0)' if excl(d.get('ci')) else ' (CI includes 0)'}")
    if v:
        r = v["infused_minus_random"]
        better = "above" if r["mean"] > 0 else "below"
        s += (f"; it is {better} matched random by {r['mean']:+.3f} {ci_txt(r)}"
              f"{', a difference the CI separates from 0' if excl(r.get('ci')) else ', not separated from 0 by the CI'}")
    return s + "."


def evaluate_run(pipe) -> Dict:
    """Reads every arm's observations, compares them with control, writes results.json and the report."""
    from .report import write_report

    run_dir, ev, seed = pipe.dir, pipe.recipe.evaluate, pipe.recipe.run.seed
    arms = pipe.recipe.retrain.arms
    sets = pipe.observed_sets()
    obs = {a: read_json(pipe.folder.observations(a)) for a in arms}
    control = obs["control"]
    summary = read_json(pipe.folder.retrain_summary)
    results: Dict = {"measurement": pipe.measurement.description, "theta_hat": summary.get("theta_hat"),
                     "theta_hat_target_rate": summary.get("theta_hat_target_rate"),
                     "control": {s: control["summary"][s] if "summary" in control else control[s]["f_mean"]
                                 for s in sets},
                     "seeds": control.get("seeds", [seed]), "sets": sets, "primary_set": primary_set(sets),
                     "n_documents": len(pipe.dataset), "k": pipe.recipe.select.k, "arms": {},
                     "detector_assumptions": DETECTOR_ASSUMPTIONS}
    defender = DefenderView(pipe) if ev.detectors and any(_arm_records(run_dir, a) for a in arms) else None
    for arm in arms:
        if arm == "control":
            continue
        entry = {s: compare(per_seed(obs[arm], s), per_seed(control, s), ev.bootstrap_samples, ev.confidence, seed)
                 for s in sets}
        entry["weights_equal_control"] = obs[arm]["weights"] == control["weights"]
        records = _arm_records(run_dir, arm)
        if records:
            entry["edits"] = _edit_summary(records)
            entry["predicted_vs_actual"] = {"predicted_delta_f": entry["edits"]["predicted_delta_f"],
                                            "actual_delta_f": entry["measurement"]["delta_f"]["mean"]}
            if defender is not None:
                entry["detectors"] = defender.scores(records)
        results["arms"][arm] = entry
    if "infused" in arms and "random" in arms:
        name = results["primary_set"]
        results["verdict"] = {"set": name, "infused_minus_random": arm_difference(
            obs["infused"], obs["random"], control, name, ev.bootstrap_samples, ev.confidence, seed)}
    results["verdict_sentence"] = verdict(results)
    write_json(pipe.folder.results, results)
    write_report(run_dir, results, pipe.tokenizer)
    return results


def headline(results: Dict) -> str:
    """The lines a user sees at the end of `infusion-lm run`: per arm, Δf on the primary held-out set with its CI,
    then the verdict."""
    name = results.get("primary_set", "heldout")
    lines = [f"held-out Δf against control ({name}, {len(results.get('seeds', [0]))} seed(s)):"]
    for arm, e in results["arms"].items():
        d = e.get(name, e.get("measurement"))["delta_f"]
        ci = f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d.get("ci") else "(no CI: fewer than 2 items)"
        spec = e.get(name, {}).get("specificity", {}).get("target_specific_gain")
        extra = f"   target-specific {spec['mean']:+.3f}" if spec else ""
        lines.append(f"  {arm:<18}{d['mean']:+.3f} {ci}{extra}")
    lines.append(results.get("verdict_sentence", ""))
    return "\n".join(lines)
