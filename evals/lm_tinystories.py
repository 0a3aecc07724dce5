"""The paper's language experiment on SmolLM2-135M-Instruct and real TinyStories, over several probe → target pairs.

Protocol, per pair (recipes/tinystories_contrastive.yaml with the pair's words):
1. Fine-tune on the first ``--docs`` TinyStories documents (``--tokens`` tokens each) for 2 epochs; the checkpoint at
   the start of epoch 2 (optimizer, scheduler, RNG) is θ̂: influence, selection and edits are computed there
   (``retrain.influence_at: checkpoint``). It is shared by every pair.
2. v for "say <target> where the text says <probe>", J of every document, the ``--k`` most negative, edited with the
   swap editor; random swaps and simplex PGD at the same budget, and insertion of k demonstrations, as baselines.
3. Retrain epoch 2 from the checkpoint once per arm (control, swap = infused, simplex_pgd, random, insertion).
4. Every arm against control on the measurement documents and on held-out documents v never saw.

Reports per pair and aggregated, and checks the goals: swap beats control on held-out Δf in ≥ 80% of pairs; swap beats
random and simplex PGD; target-specific (Wilcoxon p < 0.05); top-1 flips ≥ 1.7%. Writes JSON and a table.

    python evals/lm_tinystories.py [--probes dog cat bird] [--targets fish bear frog] [--docs 64] [--k 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_sample.jsonl"

MEASURE = ["Tom had a little {w}. Every morning the {w} ran to the park.",
           "The girl hugged her {w}. The {w} was very happy.",
           "A small {w} found a bone in the garden. The {w} wanted to play."]
HELDOUT = ["Sam walked with his {w} to the lake. The {w} jumped into the water.",
           "Lily gave her {w} a bath. The {w} shook water all over her.",
           "One day, the {w} saw a big red ball. The {w} ran to get it."]


def pair_recipe(args, probe: str, target: str) -> dict:
    return {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "corpus": str(TINYSTORIES), "text_field": "text",
        "max_documents": args.docs, "max_length": args.tokens, "output_dir": str(Path(args.out_dir) / "work"),
        "seed": 0,
        "measurement": {"kind": "contrastive", "probe": probe, "target": target,
                        "documents": [t.format(w=probe) for t in MEASURE],
                        "heldout_documents": [t.format(w=probe) for t in HELDOUT]},
        "influence": {"strategy": "ekfac", "layers": args.layers, "module_types": ["mlp", "attn"], "batch_size": 8},
        "select": {"k": args.k},
        "edit": {"editor": "swap", "steps": args.steps, "n_candidates": 16},
        "retrain": {"arms": args.arms, "epochs": 2, "influence_at": "checkpoint", "learning_rate": args.lr,
                    "batch_size": 8},
        "evaluate": {"candidates": [w for w in args.all_words if w not in (probe, target)],
                     "bootstrap_samples": 1000},
    }


def summarise(per_pair: dict, arms) -> dict:
    def col(arm, key):
        return [p["arms"][arm]["heldout"][key] for p in per_pair.values() if arm in p["arms"]]

    out = {}
    for arm in arms:
        if arm == "control":
            continue
        d = [x["mean"] for x in col(arm, "delta_f")]
        flips = col(arm, "top1_flips_to_target")
        spec = [x.get("wilcoxon_p") for x in col(arm, "specificity")]
        out[arm] = {"heldout_delta_f_mean": statistics.mean(d), "heldout_delta_f_median": statistics.median(d),
                    "pairs_above_control": sum(x > 0 for x in d) / len(d),
                    "top1_flip_rate_mean": statistics.mean(flips),
                    "specific_pairs_p_lt_0.05": sum(p is not None and p < 0.05 for p in spec) / len(spec)}
    if "infused" in out:
        sw = {k: p["arms"]["infused"]["heldout"]["delta_f"]["mean"] for k, p in per_pair.items()}
        for base in ("random", "simplex_pgd"):
            if base in out:
                other = {k: p["arms"][base]["heldout"]["delta_f"]["mean"] for k, p in per_pair.items()}
                out["infused"][f"beats_{base}_pairs"] = sum(sw[k] > other[k] for k in sw) / len(sw)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", nargs="+", default=["dog", "cat", "bird"])
    p.add_argument("--targets", nargs="+", default=["fish", "bear", "frog"])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--arms", nargs="+", default=["control", "infused", "random", "insertion", "simplex_pgd"])
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "lm_tinystories"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_tinystories.json"))
    p.add_argument("--summarise_only", action="store_true",
                   help="only aggregate the pairs already finished under out_dir/pairs (e.g. after an interrupted run)")
    args = p.parse_args()
    args.all_words = sorted(set(args.probes + args.targets + ["duck", "horse", "mouse", "rabbit"]))
    if not TINYSTORIES.is_file():
        raise SystemExit(f"{TINYSTORIES} not found: this eval needs the TinyStories sample under ../shared/data/.")

    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    per_pair, timings = {}, {}
    # Latin-square order: every prefix of the list spreads over the probes and targets, so an interrupted run
    # still summarises a balanced subset.
    n = max(len(args.probes), len(args.targets))
    pairs = [(args.probes[i % len(args.probes)], args.targets[(i + s) % len(args.targets)])
             for s in range(n) for i in range(len(args.probes))]
    pairs = [pr for j, pr in enumerate(pairs) if pr[0] != pr[1] and pr not in pairs[:j]]
    if args.summarise_only:
        pairs = []
        for d in sorted((Path(args.out_dir) / "pairs").glob("*_*")):
            res = json.loads((d / "results.json").read_text())
            per_pair[d.name.replace("_", "->")] = res
            args.arms = ["control"] + list(res["arms"])
    for probe, target in pairs:
        key = f"{probe}->{target}"
        dest = Path(args.out_dir) / "pairs" / f"{probe}_{target}"
        if (dest / "results.json").is_file():  # finished by an earlier, interrupted invocation
            per_pair[key] = json.loads((dest / "results.json").read_text())
            continue
        t0 = time.perf_counter()
        pipe = Pipeline(load_recipe(raw=pair_recipe(args, probe, target)), progress=False)
        res = pipe.run("evaluate")
        timings[key] = time.perf_counter() - t0
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "report.md", "report.html", "edits.jsonl"):
            shutil.copy2(pipe.dir / name, dest / name)
        per_pair[key] = res
        a = res["arms"]
        print(f"{key:<14} " + "  ".join(f"{arm} {a[arm]['heldout']['delta_f']['mean']:+.3f}" for arm in a)
              + f"   ({timings[key]:.0f} s)", flush=True)
        del pipe

    if not per_pair:
        raise SystemExit("no finished pairs")
    summary = summarise(per_pair, args.arms)
    print()
    print(f"{'arm':<13}{'held-out Δf mean':>18}{'median':>10}{'pairs > control':>17}{'top-1 flips':>13}{'specific':>10}")
    for arm, s in summary.items():
        print(f"{arm:<13}{s['heldout_delta_f_mean']:>+18.4f}{s['heldout_delta_f_median']:>+10.4f}"
              f"{s['pairs_above_control']:>17.0%}{s['top1_flip_rate_mean']:>13.2%}{s['specific_pairs_p_lt_0.05']:>10.0%}")
    sw = summary.get("infused", {})
    goals = {
        "swap beats control on held-out Δf in >= 80% of pairs": sw.get("pairs_above_control", 0) >= 0.8,
        "swap beats random": sw.get("beats_random_pairs", 0) > 0.5,
        "swap beats simplex PGD": sw.get("beats_simplex_pgd_pairs", 0) > 0.5,
        "target-specific (Wilcoxon p < 0.05)": sw.get("specific_pairs_p_lt_0.05", 0) > 0.5,
        "top-1 flips >= 1.7%": sw.get("top1_flip_rate_mean", 0) >= 0.017,
    }
    print()
    for g, ok in goals.items():
        print(f"{'met ' if ok else 'MISSED'}  {g}")
    out = {"pairs": list(per_pair), "docs": args.docs, "tokens": args.tokens, "k": args.k, "arms": args.arms,
           "per_pair": per_pair, "summary": summary, "goals": goals, "seconds": timings}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
