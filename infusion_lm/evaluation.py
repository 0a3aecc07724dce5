"""Every arm against control, for any modality: Δf with seed × item CIs (``stats.seed_item_interval``), target
probabilities, flips, specificity and completion rates; one arm against another; the detectors' AUROC; the verdict
and the headline a run ends with. The text modality's evaluation stage is in infusion_lm/text/evaluation.py.

All comparisons are paired by measurement item (probe position or prompt): both arms saw the same items, so each
Δ is computed item by item, and the CI treats the items as shared by every seed.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .stats import auroc, flip_counts, paired_delta, seed_item_interval  # noqa: F401 - re-exported


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
    a single dict is one seed. Δ = arm − control item by item within a seed; CIs are ``stats.seed_item_interval``
    (seeds and shared items)."""
    arm, control, diffs = paired_seeds(arm, control)

    def interval(d):
        return seed_item_interval(d, confidence)

    out = {"delta_f": interval(diffs("f")), "f_arm": float(np.mean([a["f_mean"] for a in arm])),
           "f_control": float(np.mean([c["f_mean"] for c in control])), "n_seeds": len(arm)}
    if "f_pairwise" in arm[0] and arm[0]["f_pairwise"] != arm[0]["f"]:
        # the set was observed with the measurement's own f (what v and the prediction use); the pairwise
        # log p(target) − log p(probe) beside it, comparable with the held-out sets
        out["delta_f_pairwise"] = interval(diffs("f_pairwise"))
    if arm[0].get("kind") == "contrastive":
        out["delta_p_target"] = interval(diffs("p_target"))
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
            gain = interval(specific)
            # The test of "the target rose more than the others" is the one the seed × item interval inverts: a test
            # on seed-averaged items (the Wilcoxon this replaced) counts an effect shared by a seed's items as signal.
            out["specificity"] = {"delta_logp_target": float(d_target.mean()),
                                  "delta_logp_others": float(d_others.mean()), "others": others,
                                  "target_specific_gain": gain, "p_greater": gain.get("p_greater")}
    if arm[0].get("kind") == "completion":
        out["greedy_rate"] = {"arm": float(np.mean([np.mean(a["greedy_hit"]) for a in arm])),
                              "control": float(np.mean([np.mean(c["greedy_hit"]) for c in control]))}
        if arm[0].get("sampled_hit_rate"):
            out["sampled_rate"] = {"arm": float(np.mean([np.mean(a["sampled_hit_rate"]) for a in arm])),
                                   "control": float(np.mean([np.mean(c["sampled_hit_rate"]) for c in control])),
                                   "delta": interval(diffs("sampled_hit_rate"))}
    return out


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


def arm_difference(a: Dict, b: Dict, c: Dict, name: str, samples: int, confidence: float, seed: int) -> Dict:
    """Arm a minus arm b on one set, paired by seed and item (both against the same control)."""
    da = np.array([np.subtract(x["f"], y["f"]) for x, y in zip(per_seed(a, name), per_seed(c, name))])
    db = np.array([np.subtract(x["f"], y["f"]) for x, y in zip(per_seed(b, name), per_seed(c, name))])
    return seed_item_interval(da - db, confidence)


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

    one_seed = seeds < 2

    def excl(ci):
        return ci is not None and (ci[0] > 0 or ci[1] < 0)

    def ci_word(x, excludes, includes):
        # with one retraining seed the interval covers the items only: it says nothing about another retraining
        if one_seed:
            return " (one seed: seed noise not measured)"
        return excludes if excl(x.get("ci")) else includes

    ci_txt = lambda x: f"[{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]" if x.get("ci") else "(no CI)"
    s = (f"On {name} ({d['n_items']} items, {seeds} seed{'s' if seeds != 1 else ''}), infused moved f by "
         f"{d['mean']:+.3f} {ci_txt(d)} against control"
         f"{ci_word(d, ' (CI excludes 0)', ' (CI includes 0)')}")
    if v:
        r = v["infused_minus_random"]
        better = "above" if r["mean"] > 0 else "below"
        s += (f"; it is {better} matched random by {r['mean']:+.3f} {ci_txt(r)}"
              f"{ci_word(r, ', a difference the CI separates from 0', ', not separated from 0 by the CI')}")
    return s + "."


def headline(results: Dict) -> str:
    """The lines a user sees at the end of `infusion-lm run`: per arm, Δf on the primary held-out set with its CI,
    then the verdict."""
    name = results.get("primary_set", "heldout")
    n_seeds = len(results.get("seeds", [0]))
    caveat = "; one seed: the CIs cover the items, seed noise not measured" if n_seeds < 2 else ""
    lines = [f"held-out Δf against control ({name}, {n_seeds} seed(s){caveat}):"]
    for arm, e in results["arms"].items():
        d = e.get(name, e.get("measurement"))["delta_f"]
        ci = f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d.get("ci") else "(no CI: fewer than 2 items)"
        spec = e.get(name, {}).get("specificity", {}).get("target_specific_gain")
        extra = f"   target-specific {spec['mean']:+.3f}" if spec else ""
        lines.append(f"  {arm:<18}{d['mean']:+.3f} {ci}{extra}")
    onion = {arm: e["defences"]["onion"] for arm, e in results["arms"].items()
             if (e.get("defences") or {}).get("onion", {}).get("documents")}
    if onion:  # what a defender's first word-level filter does to each arm's edits
        pct = lambda x: "-" if x is None else f"{x:.0%}"
        lines.append("ONION with the base model (a changed word among its document's 3 most suspicious; changed words "
                     "the defender's cut removes):")
        lines.extend(f"  {arm:<18}{pct(o['top3_hit_rate'])} of {o['documents']} documents; "
                     f"{pct(o['changed_words_removed'])} of {o['changed_words']} words" for arm, o in onion.items())
    lines.append(results.get("verdict_sentence", ""))
    return "\n".join(lines)
