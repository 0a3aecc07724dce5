"""Summary of the measurement levers (evals/results/lm_tinystories_levers/): python evals/summarise_levers.py DIR

From each finished pair (DIR/<lever>/pairs/<pair>/results.json): the held-out Δf and target-specific gain of infused
and random_target, their ratio per pair, per lever, and on the pairs every lever has; writes DIR/summary.json.
A run with the ``fluent_target`` arm instead (DIR/contrast_top_fluent: the target word where the model expects it
most, the other influence-free attack) is set against the contrast_top lever's infused edit on the same pairs,
and its own infused arm is checked to reproduce that lever's.
"""
import glob
import json
import sys
root = sys.argv[1]
# the eval's primary set (heldout_corpus: 60 probe positions in real stories outside the training slice); --set
# heldout reads the 6 templated held-out items instead
SET = sys.argv[sys.argv.index("--set") + 1] if "--set" in sys.argv else None
COMMON = "python evals/lm_tinystories.py --seeds 0 1 --arms control infused random_target --work_dir WORK2 --pairs PAIRS"
out = {"commands": {
    "today_f": "PYTHONPATH=src1 python src1/evals/lm_tinystories.py --seeds 0 1 --arms control infused random_target --work_dir WORK --pairs dog:fish cat:bear bird:frog happy:sad toy:ball Lily:Ben --out_dir levers/today_f",
    "contrast_top": COMMON + " --out_dir levers/contrast_top --contrast_top 20",
    "contrast_top_first_step": COMMON + " --out_dir levers/contrast_top_first_step --contrast_top 20 --rank_by first_step --pool 24",
    "first_step": COMMON + " --out_dir levers/first_step --contrast_top 0 --rank_by first_step --pool 24",
    "contrast_top_fluent": COMMON.replace("random_target", "fluent_target")
    + " --out_dir levers/contrast_top_fluent --contrast_top 20"},
    "pairs_value": "dog:fish cat:bear bird:frog happy:sad toy:ball Lily:Ben",
    "sources": {"today_f": "1661e3f (before measurement.contrast_top existed)",
                "contrast_top": "the contrast_top commit; toy:ball and Lily:Ben from 86c1032",
                "contrast_top_first_step": "86c1032", "first_step": "86c1032 (its default contrast_top was 0)",
                "contrast_top_fluent": "b3a795d (the fluent_target arm)"},
    "machine": "2 CPU cores, 1 torch thread per job; shared with the CIFAR-10 45k run, the chat eval and the test suite",
    "pairs_chosen_before_results": ["dog:fish", "cat:bear", "bird:frog", "happy:sad", "toy:ball", "Lily:Ben"],
    "evaluation_set": SET or "the eval's primary set (heldout_corpus: 60 real probe positions)",
    "per_pair": {}, "by_lever": {}}
BASELINE_LEVERS = {}  # lever -> its baseline arm, where that is not random_target
for f in sorted(glob.glob(f"{root}/*/pairs/*/results.json")):
    lever, pair = f.split("/")[-4], f.split("/")[-2]
    d = json.load(open(f))
    e = {}
    if "random_target" not in d["arms"]:
        BASELINE_LEVERS[lever] = "fluent_target"
        for arm in ["infused", "fluent_target"]:
            h = d["arms"][arm][SET or d["primary_set"]]
            e[arm] = {"delta_f": h["delta_f"]["mean"], "target_specific_gain": h["specificity"]["target_specific_gain"]["mean"],
                      "target_specific_gain_ci": h["specificity"]["target_specific_gain"]["ci"]}
        pair_dir = f.rsplit("/", 1)[0]
        for arm, name in (("infused", "edits.jsonl"), ("fluent_target", "edits_fluent_target.jsonl")):
            e[arm]["tokens_changed"] = sum(json.loads(line)["n_changed"] for line in open(f"{pair_dir}/{name}"))
        out.setdefault("baseline_runs", {}).setdefault(lever, {})[pair] = e
        continue
    for arm in ["infused", "random_target"]:
        h = d["arms"][arm][SET or d["primary_set"]]
        sp = h["specificity"]
        e[arm] = {"delta_f": h["delta_f"]["mean"], "delta_f_ci": h["delta_f"]["ci"],
                  "target_specific_gain": sp["target_specific_gain"]["mean"],
                  "target_specific_gain_ci": sp["target_specific_gain"]["ci"],
                  "delta_logp_target": sp["delta_logp_target"], "delta_logp_others": sp["delta_logp_others"]}
    pair_dir = f.rsplit("/", 1)[0]
    for arm, name in (("infused", "edits.jsonl"), ("random_target", "edits_random_target.jsonl")):
        e[arm]["tokens_changed"] = sum(json.loads(line)["n_changed"] for line in open(f"{pair_dir}/{name}"))
    e["specific_ratio_to_random_target"] = e["infused"]["target_specific_gain"] / e["random_target"]["target_specific_gain"]
    e["delta_f_ratio_to_random_target"] = e["infused"]["delta_f"] / e["random_target"]["delta_f"]
    out["per_pair"].setdefault(lever, {})[pair] = e
for lever, pairs in out["per_pair"].items():
    inf = [p["infused"]["target_specific_gain"] for p in pairs.values()]
    rt = [p["random_target"]["target_specific_gain"] for p in pairs.values()]
    df = [p["infused"]["delta_f"] for p in pairs.values()]
    dfr = [p["random_target"]["delta_f"] for p in pairs.values()]
    out["by_lever"][lever] = {"pairs": sorted(pairs), "specific_ratio_of_means": sum(inf) / sum(rt),
                              "delta_f_ratio_of_means": sum(df) / sum(dfr),
                              "beats_random_target_specific_pairs": sum(a > b for a, b in zip(inf, rt)),
                              "others_at_most_half_of_target_pairs": sum(
                                  p["infused"]["delta_logp_others"] <= 0.5 * p["infused"]["delta_logp_target"] for p in pairs.values()),
                              "mean_of_specific_ratios": sum(p["specific_ratio_to_random_target"] for p in pairs.values()) / len(pairs),
                              # random_target places fewer tokens than asked where the perplexity limit rejects them:
                              # the ratio per token placed, over the pairs' totals
                              "tokens_changed": {a: sum(p[a]["tokens_changed"] for p in pairs.values()) for a in ("infused", "random_target")},
                              "specific_ratio_per_token": (sum(inf) / sum(p["infused"]["tokens_changed"] for p in pairs.values()))
                              / (sum(rt) / sum(p["random_target"]["tokens_changed"] for p in pairs.values()))}
    b = out["by_lever"][lever]
    b["goals"] = {"target-specific gain >= 1.5x random_target's (ratio of the means over pairs)": b["specific_ratio_of_means"] >= 1.5,
                  "above random_target on >= 75% of pairs": b["beats_random_target_specific_pairs"] >= 0.75 * len(pairs),
                  "delta f >= 1.5x random_target's": b["delta_f_ratio_of_means"] >= 1.5,
                  "other words' mean delta log p <= half the target's, every pair": b["others_at_most_half_of_target_pairs"] == len(pairs)}
common = set.intersection(*(set(p) for p in out["per_pair"].values()))
out["common_pairs"] = sorted(common)
out["on_common_pairs"] = {lever: {"infused_specific_mean": sum(pairs[c]["infused"]["target_specific_gain"] for c in common) / len(common),
                                  "specific_ratio_of_means": sum(pairs[c]["infused"]["target_specific_gain"] for c in common) /
                                  sum(pairs[c]["random_target"]["target_specific_gain"] for c in common)}
                          for lever, pairs in out["per_pair"].items()}
# the other free attack against the chosen lever's infused edit, on the pairs both have
ct = out["per_pair"].get("contrast_top", {})
for lever, pairs in out.get("baseline_runs", {}).items():
    both = sorted(set(pairs) & set(ct))
    if not both:
        continue
    inf = [ct[c]["infused"]["target_specific_gain"] for c in both]
    fl = [pairs[c]["fluent_target"]["target_specific_gain"] for c in both]
    out.setdefault("vs_fluent_target", {})[lever] = {
        "pairs": both, "infused_specific": dict(zip(both, inf)), "fluent_target_specific": dict(zip(both, fl)),
        "random_target_specific": {c: ct[c]["random_target"]["target_specific_gain"] for c in both},
        "specific_ratio_of_means": sum(inf) / sum(fl) if sum(fl) > 0 else None,
        "infused_above_pairs": sum(a > b for a, b in zip(inf, fl)),
        "fluent_target_delta_f": {c: pairs[c]["fluent_target"]["delta_f"] for c in both},
        "tokens_changed": {"infused": sum(pairs[c]["infused"]["tokens_changed"] for c in both),
                           "fluent_target": sum(pairs[c]["fluent_target"]["tokens_changed"] for c in both),
                           "random_target": sum(ct[c]["random_target"]["tokens_changed"] for c in both)},
        # the same recipe on the same work folder: this run's infused arm must be the contrast_top lever's
        "infused_reproduced_max_abs_diff": max(abs(pairs[c]["infused"]["target_specific_gain"]
                                                   - ct[c]["infused"]["target_specific_gain"]) for c in both)}
json.dump(out, open(f"{root}/summary{'_' + SET if SET else ''}.json", "w"), indent=1)
for lever, b in out["by_lever"].items():
    print(lever, b)
print(out["on_common_pairs"])
for lever, b in out.get("vs_fluent_target", {}).items():
    print(lever, b)
