"""Does J(z) say which documents an edit can move? One swap step on every document, against its J.

On the TinyStories setup of ``evals/lm_tinystories.py`` (same recipe, checkpoint θ̂ and v per pair), the selection
stage runs with ``select.rank_by: first_step`` over every document: one step of the swap editor on each, under the
edit's budget, fluency filter and perplexity limit. Replacing z by z' moves f by about the drop J(z) − J(z'), so the
documents worth editing are those with the largest drop, whatever their J. Reported per pair: Spearman of J against
the drop over all documents, the summed one-step drop of the k most negative J (the default selection) against that of
the k largest drops, and the same from a pool of the most negative J (select.pool). No retraining.

    python evals/lm_selection_drops.py [--pairs dog:fish cat:bear] [--work_dir runs/selection_drops] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_tinystories as ts  # noqa: E402  (also sets HF_HUB_OFFLINE and TQDM_DISABLE)

ROOT = ts.ROOT


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["dog:fish", "cat:bear"], metavar="PROBE:TARGET")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "selection_drops"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_selection_drops.json"))
    args = p.parse_args()
    pairs = [tuple(x.split(":")) for x in args.pairs]
    if bad := [":".join(x) for x in pairs if len(x) != 2]:
        raise SystemExit(f"--pairs {' '.join(bad)}: write PROBE:TARGET, e.g. dog:fish")
    # the eval's recipe, up to the selection
    args.probes, args.targets = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
    args.all_words = sorted(set(args.probes + args.targets + ["duck", "horse", "mouse", "rabbit"]))
    args.arms, args.seeds, args.rename, args.target_words, args.lr, args.layers = ["control"], [0], False, "auto", 1e-4, [12, 24]
    args.preconditioner, args.damping_scale, args.heldout_positions, args.measure_stories = "factors", 1000.0, 60, 0
    args.out_dir, args.rank_by, args.pool = args.work_dir, "first_step", None

    from scipy.stats import spearmanr

    from infusion_lm.atomic_io import read_json, write_json
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    per_pair = {}
    for probe, target in pairs:
        done = Path(args.work_dir) / "pairs" / f"{probe}_{target}.json"
        if done.is_file():
            per_pair[f"{probe}->{target}"] = read_json(done)
            continue
        recipe = ts.pair_recipe(args, probe, target)
        recipe["output_dir"] = str(Path(args.work_dir) / "work")
        pipe = Pipeline(load_recipe(raw=recipe), progress=False)
        tried = pipe.select()["tried"]
        J, drop, idx = tried["J"], tried["first_step_drops"], tried["indices"]
        by_j = sorted(range(len(idx)), key=lambda i: J[i])
        k = args.k

        def top_drops(pool):
            return sum(sorted((drop[i] for i in by_j[:pool]), reverse=True)[:k])

        res = {"documents": len(idx), "k": k, "spearman_J_vs_drop": float(spearmanr(J, drop).statistic),
               "drop_of_most_negative_J": sum(drop[i] for i in by_j[:k]),
               "drop_of_largest_drops": top_drops(len(idx)),
               "largest_drops_from_pool": {str(m): top_drops(m) for m in (2 * k, 4 * k, len(idx)) if m <= len(idx)},
               "docs_with_no_drop": sum(d <= 0 for d in drop),
               "tried": tried}
        write_json(done, res)
        per_pair[f"{probe}->{target}"] = res
        print(f"{probe}->{target}: Spearman(J, drop) {res['spearman_J_vs_drop']:+.2f}; one-step drop of the "
              f"{k} most negative J {res['drop_of_most_negative_J']:.0f}, of the {k} largest drops "
              f"{res['drop_of_largest_drops']:.0f}", flush=True)
        del pipe

    ratio = [r["drop_of_largest_drops"] / r["drop_of_most_negative_J"] for r in per_pair.values()
             if r["drop_of_most_negative_J"] > 0]
    summary = {"spearman_J_vs_drop_mean": statistics.mean(r["spearman_J_vs_drop"] for r in per_pair.values()),
               "ratio_largest_drops_to_most_negative_J": ratio}
    print(f"\nmean Spearman(J, drop) {summary['spearman_J_vs_drop_mean']:+.2f}; largest drops / most negative J: "
          + ", ".join(f"{x:.1f}×" for x in ratio))
    write_json(Path(args.out), {"command": "python evals/lm_selection_drops.py " + " ".join(sys.argv[1:]),
                                "per_pair": per_pair, "summary": summary})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
