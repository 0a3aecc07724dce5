"""Summary of the measurement levers (evals/results/lm_tinystories_levers/).

    python evals/summarise_levers.py DIR [--set S]

From each finished pair (DIR/<lever>/pairs/<pair>/results.json): the held-out Δf and target-specific gain of infused
and random_target, their ratio per pair, per lever, and on the pairs every lever has; writes DIR/summary.json
(DIR/summary_<S>.json with --set S).

Every comparison is given twice, the count-matched one first:

- ``count_matched``: only the pairs where the baseline placed the infused edit's full count of tokens in every
  document, the filter evals/lm_tinystories.py applies (``count_match.matched`` of the baseline's edits). Where the
  perplexity limit rejected some of random_target's tokens it is a smaller edit, and the raw ratio credits the
  infused edit with the difference.
- ``raw``: every pair, whatever the baseline placed (with the ratio per token placed beside it).

Each gives the pairs and seeds it rests on and the ratio without its single most favourable pair (the pair whose
removal lowers the ratio of means most). A run with the ``fluent_target`` arm instead (DIR/contrast_top_fluent: the
target word where the model expects it most, the other influence-free attack) is set against the contrast_top
lever's infused edit on the same pairs, and its own infused arm is checked to reproduce that lever's.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_tinystories import summarise as eval_summary  # noqa: E402  (the eval's own count filter and ratios)

from infusion_lm.stats import CI_METHOD, seed_item_interval  # noqa: E402

COMMON = "python evals/lm_tinystories.py --seeds 0 1 --arms control infused random_target --work_dir WORK2 --pairs PAIRS"
META = {"commands": {
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
    "pairs_chosen_before_results": ["dog:fish", "cat:bear", "bird:frog", "happy:sad", "toy:ball", "Lily:Ben"]}
BASELINES = ("random_target", "fluent_target")


def count_matched(results: dict, base: str) -> bool:
    """lm_tinystories.summarise's filter: a pair counts unless the baseline's count_match says it fell short."""
    return ((results["arms"][base].get("edits") or {}).get("count_match") or {}).get("matched") is not False


def interval(x: dict) -> list:
    # the committed per-pair intervals predate the guarded degrees of freedom: recomputed where the items are kept
    return seed_item_interval(np.array(x["per_seed_item"]), 0.95)["ci"] if "per_seed_item" in x else x.get("ci")


def pair_entry(results: dict, base: str, set_name: str, pair_dir: str) -> dict:
    e = {"n_seeds": len(results["seeds"]), "count_matched": count_matched(results, base),
         "baseline_shortfall_tokens": ((results["arms"][base].get("edits") or {}).get("count_match") or {})
         .get("shortfall_total")}
    for arm in ("infused", base):
        h = results["arms"][arm][set_name]
        sp = h["specificity"]
        mean = lambda x: x["mean"] if isinstance(x, dict) else x  # noqa: E731
        e[arm] = {"delta_f": h["delta_f"]["mean"], "delta_f_ci": interval(h["delta_f"]),
                  "target_specific_gain": sp["target_specific_gain"]["mean"],
                  "target_specific_gain_ci": interval(sp["target_specific_gain"]),
                  "delta_logp_target": mean(sp["delta_logp_target"]),
                  "delta_logp_others": mean(sp["delta_logp_others"])}
        edits = Path(pair_dir) / ("edits.jsonl" if arm == "infused" else f"edits_{arm}.jsonl")
        e[arm]["tokens_changed"] = sum(json.loads(line)["n_changed"] for line in edits.read_text().splitlines())
    e[f"specific_ratio_to_{base}"] = e["infused"]["target_specific_gain"] / e[base]["target_specific_gain"]
    e[f"delta_f_ratio_to_{base}"] = e["infused"]["delta_f"] / e[base]["delta_f"]
    return e


def ratio_of_means(pairs: dict, base: str, key: str = "target_specific_gain"):
    den = sum(p[base][key] for p in pairs.values())
    return sum(p["infused"][key] for p in pairs.values()) / den if den > 0 else None


def comparison(pairs: dict, base: str) -> dict:
    """infused against the baseline over these pairs: the ratio of the means, the pairs and seeds it rests on, and
    the ratio without the single most favourable pair."""
    out = {"pairs": sorted(pairs), "n_pairs": len(pairs), "n_seeds": sorted({p["n_seeds"] for p in pairs.values()})}
    if not pairs:
        return {**out, "specific_ratio_of_means": None, "goals": None}
    inf = [p["infused"]["target_specific_gain"] for p in pairs.values()]
    other = [p[base]["target_specific_gain"] for p in pairs.values()]
    out["specific_ratio_of_means"] = ratio_of_means(pairs, base)
    without = {c: ratio_of_means({k: v for k, v in pairs.items() if k != c}, base) for c in pairs if len(pairs) > 1}
    worst = min((c for c in without if without[c] is not None), key=without.get, default=None)
    out["without_most_favourable_pair"] = {"pair_left_out": worst, "n_pairs": len(pairs) - 1,
                                           "specific_ratio_of_means": without.get(worst)}
    out["delta_f_ratio_of_means"] = ratio_of_means(pairs, base, "delta_f")
    out[f"beats_{base}_specific_pairs"] = sum(a > b for a, b in zip(inf, other))
    out["others_at_most_half_of_target_pairs"] = sum(
        p["infused"]["delta_logp_others"] <= 0.5 * p["infused"]["delta_logp_target"] for p in pairs.values())
    out["mean_of_specific_ratios"] = sum(p[f"specific_ratio_to_{base}"] for p in pairs.values()) / len(pairs)
    # the ratio per token placed, over the pairs' totals: the raw comparison's correction for the baseline's shortfall
    tokens = out["tokens_changed"] = {a: sum(p[a]["tokens_changed"] for p in pairs.values()) for a in ("infused", base)}
    out["specific_ratio_per_token"] = ((sum(inf) / tokens["infused"]) / (sum(other) / tokens[base])
                                       if sum(other) > 0 else None)
    r = out["specific_ratio_of_means"]
    out["goals"] = {f"target-specific gain >= 1.5x {base}'s (ratio of the means over pairs)": (r or 0) >= 1.5,
                    f"above {base} on >= 75% of pairs": out[f"beats_{base}_specific_pairs"] >= 0.75 * len(pairs),
                    f"delta f >= 1.5x {base}'s": (out["delta_f_ratio_of_means"] or 0) >= 1.5,
                    "other words' mean delta log p <= half the target's, every pair":
                    out["others_at_most_half_of_target_pairs"] == len(pairs)}
    return out


def both_ways(pairs: dict, base: str) -> dict:
    """The count-matched comparison first, the raw one second."""
    matched = {c: p for c, p in pairs.items() if p["count_matched"]}
    left_out = {c: p["baseline_shortfall_tokens"] for c, p in pairs.items() if c not in matched}
    return {"count_matched": {**comparison(matched, base), "pairs_left_out_baseline_shortfall_tokens": left_out},
            "raw": comparison(pairs, base)}


def summarise(root: str, set_name: str | None = None) -> dict:
    out = {**META, "evaluation_set": set_name or "the eval's primary set (heldout_corpus: 60 real probe positions)",
           "count_filter": "count_matched: the pairs where the baseline placed the infused edit's count in every "
                           "document (count_match.matched, the filter of evals/lm_tinystories.py); raw: every pair",
           "ci_method": CI_METHOD, "per_pair": {}, "by_lever": {}}
    results = {}  # lever -> pair -> results.json
    for f in sorted(glob.glob(f"{root}/*/pairs/*/results.json")):
        lever, pair = f.split("/")[-4], f.split("/")[-2]
        d = json.loads(Path(f).read_text())
        base = next(b for b in BASELINES if b in d["arms"])
        results.setdefault(lever, {})[pair] = d
        # a lever's runs set infused against random_target; a fluent_target run is another baseline for contrast_top
        key = "per_pair" if base == "random_target" else "baseline_runs"
        out.setdefault(key, {}).setdefault(lever, {})[pair] = pair_entry(d, base, set_name or d["primary_set"],
                                                                          f.rsplit("/", 1)[0])
    for lever, pairs in out["per_pair"].items():
        out["by_lever"][lever] = both_ways(pairs, "random_target")
        # the count-matched figure must be the eval's own (lm_tinystories.summarise on the same results)
        primary = set_name or next(iter(results[lever].values()))["primary_set"]
        s = eval_summary(results[lever], ["control", "infused", "random_target"], primary)["infused"]
        cm = out["by_lever"][lever]["count_matched"]
        assert cm["n_pairs"] == s.get("vs_random_target_n_pairs", 0), (lever, cm["n_pairs"], s)
        assert cm["specific_ratio_of_means"] is None or math.isclose(cm["specific_ratio_of_means"],
                                                                      s["specific_ratio_to_random_target"]), lever
    common = sorted(set.intersection(*(set(p) for p in out["per_pair"].values()))) if out["per_pair"] else []
    matched_common = [c for c in common if all(p[c]["count_matched"] for p in out["per_pair"].values())]
    out["common_pairs"] = {"count_matched": matched_common, "raw": common}
    out["on_common_pairs"] = {
        way: {lever: {"infused_specific_mean": (sum(pairs[c]["infused"]["target_specific_gain"] for c in cs) / len(cs)
                                                if cs else None),
                      "specific_ratio_of_means": ratio_of_means({c: pairs[c] for c in cs}, "random_target")}
              for lever, pairs in out["per_pair"].items()}
        for way, cs in (("count_matched", matched_common), ("raw", common))}
    # the other free attack against the chosen lever's infused edit, on the pairs both have
    ct = out["per_pair"].get("contrast_top", {})
    for lever, pairs in out.get("baseline_runs", {}).items():
        both = sorted(set(pairs) & set(ct))
        if not both:
            continue
        base = next(b for b in BASELINES if b in next(iter(pairs.values())))
        # contrast_top's infused edit against this run's baseline; the count filter is this run's baseline's
        mixed = {c: {**pairs[c], "infused": ct[c]["infused"], f"specific_ratio_to_{base}":
                     ct[c]["infused"]["target_specific_gain"] / pairs[c][base]["target_specific_gain"]} for c in both}
        out.setdefault(f"vs_{base}", {})[lever] = {
            **both_ways(mixed, base),
            "random_target_specific": {c: ct[c]["random_target"]["target_specific_gain"] for c in both},
            "random_target_tokens_changed": sum(ct[c]["random_target"]["tokens_changed"] for c in both),
            # the same recipe on the same work folder: this run's infused arm must be the contrast_top lever's
            "infused_reproduced_max_abs_diff": max(abs(pairs[c]["infused"]["target_specific_gain"]
                                                       - ct[c]["infused"]["target_specific_gain"]) for c in both)}
    return out


def line(name: str, c: dict) -> str:
    w = c.get("without_most_favourable_pair") or {}
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}x"  # noqa: E731
    seeds = "/".join(map(str, c["n_seeds"])) or "0"
    return (f"  {name:<14}{fmt(c['specific_ratio_of_means']):>8} on {c['n_pairs']} pairs x {seeds} seeds; without "
            f"{w.get('pair_left_out')}: {fmt(w.get('specific_ratio_of_means'))}; per token placed: "
            f"{fmt(c.get('specific_ratio_per_token'))}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--set", default=None, help="the evaluation set (default: each result's primary set, "
                   "heldout_corpus: 60 real probe positions; heldout: the 6 templated items)")
    args = p.parse_args(argv)
    out = summarise(args.root, args.set)
    path = Path(args.root) / f"summary{'_' + args.set if args.set else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for lever, b in out["by_lever"].items():
        print(f"{lever}: infused / random_target, target-specific gain (ratio of means)")
        print(line("count-matched", b["count_matched"]))
        print(line("raw", b["raw"]))
    for key in (k for k in out if k.startswith("vs_")):
        for lever, b in out[key].items():
            print(f"{lever}: contrast_top's infused / {key[3:]}")
            print(line("count-matched", b["count_matched"]))
            print(line("raw", b["raw"]))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
