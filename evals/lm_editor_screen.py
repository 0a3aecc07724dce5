"""Screen swap-editor variants by the drop in J they reach, before paying for retraining.

On the TinyStories setup of ``evals/lm_tinystories.py`` (same recipe, checkpoint θ̂, v and selection per pair), every
variant edits the same k selected documents under the same budget, fluency filter and perplexity limit. Reported per
variant, summed over pairs: −ΔJ (the held-out Δf of an edited arm follows it, see ``evals/lm_effect_curve.py``), tokens
changed, the median perplexity ratio and the edit time. No retraining: a variant worth keeping then goes through
``evals/lm_tinystories.py``.

    python evals/lm_editor_screen.py --pairs dog:fish cat:bear --variants default= per_nat=choose:j_per_nat \\
        rename=rename:true [--work_dir runs/screen] [--out PATH]

A variant is NAME=key:value,key:value over edit.* settings (empty: the recipe's own). Finished (pair, variant) cells
are kept under the work_dir and not recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_tinystories as ts  # noqa: E402  (also sets HF_HUB_OFFLINE and TQDM_DISABLE)

ROOT = ts.ROOT


def parse_variant(spec: str) -> tuple:
    """NAME=key:value,... → (NAME, {key: value}) with values read as YAML scalars (true, 3, 0.5, text)."""
    import yaml

    name, sep, body = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variants {spec!r}: write NAME=key:value,... (NAME= alone for the recipe's own settings)")
    settings = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"--variants {spec!r}: {item!r} is not key:value")
        settings[key.strip()] = yaml.safe_load(value)
    return name, settings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["dog:fish", "cat:bear", "bird:frog"], metavar="PROBE:TARGET")
    p.add_argument("--variants", nargs="+", default=["default=", "j_per_nat=choose:j_per_nat", "rename=rename:true"])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "editor_screen"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_editor_screen.json"))
    args = p.parse_args()
    variants = dict(parse_variant(s) for s in args.variants)
    pairs = [tuple(x.split(":")) for x in args.pairs]
    if bad := [":".join(x) for x in pairs if len(x) != 2]:
        raise SystemExit(f"--pairs {' '.join(bad)}: write PROBE:TARGET, e.g. dog:fish")
    # the eval's recipe, edit-only: no arms are retrained here
    args.probes, args.targets = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
    args.all_words = sorted(set(args.probes + args.targets + ["duck", "horse", "mouse", "rabbit"]))
    args.arms, args.seeds, args.rename, args.target_words = ["control"], [0], False, "auto"
    args.preconditioner, args.damping_scale, args.heldout_positions, args.measure_stories = "factors", 1000.0, 60, 0
    args.out_dir = args.work_dir

    from infusion_lm.atomic_io import read_json, write_json
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    cells = []
    for probe, target in pairs:
        recipe = ts.pair_recipe(args, probe, target)
        recipe["output_dir"] = str(Path(args.work_dir) / "work")
        pipe = None
        for name, settings in variants.items():
            cell_dir = Path(args.work_dir) / "cells" / f"{probe}_{target}" / name
            done = cell_dir / "cell.json"
            if done.is_file():
                cells.append(read_json(done))
                continue
            if pipe is None:
                pipe = Pipeline(load_recipe(raw=recipe), progress=False)
                pipe.run("select")
                indices = read_json(pipe.folder.selection)["indices"]
            try:
                edit_args = dataclasses.replace(pipe.recipe.edit, **settings)
            except TypeError as e:
                raise SystemExit(f"--variants {name}: {e} (keys are edit.* settings)") from None
            t0 = time.perf_counter()
            pipe.modality.edit_into(cell_dir, edit_args, indices)
            wall = time.perf_counter() - t0
            recs = [json.loads(line) for line in (cell_dir / "edits.jsonl").read_text().splitlines() if line.strip()]
            cell = {"pair": f"{probe}->{target}", "variant": name, "settings": settings, "edit_s": wall,
                    "minus_delta_J": sum(r["J_before"] - r["J_after"] for r in recs),
                    "J_before": sum(r["J_before"] for r in recs),
                    "tokens_changed": sum(r["n_changed"] for r in recs),
                    "docs_changed": sum(r["n_changed"] > 0 for r in recs),
                    "perplexity_ratio_median": statistics.median(r["perplexity_after"] / r["perplexity_before"] for r in recs),
                    "per_doc": [{"doc_index": r["doc_index"], "minus_delta_J": r["J_before"] - r["J_after"],
                                 "n_changed": r["n_changed"], "text": r["text"]} for r in recs]}
            write_json(done, cell)
            cells.append(cell)
            print(f"{cell['pair']:<12}{name:<14} −ΔJ {cell['minus_delta_J']:8.1f}  tokens {cell['tokens_changed']:3d}  "
                  f"ppl {cell['perplexity_ratio_median']:.3f}  ({wall:.0f} s)", flush=True)
        del pipe

    base = next(iter(variants))
    summary = {}
    for name in variants:
        mine = {c["pair"]: c for c in cells if c["variant"] == name}
        ref = {c["pair"]: c for c in cells if c["variant"] == base}
        both = [k for k in mine if k in ref]
        summary[name] = {
            "pairs": len(mine), "minus_delta_J_total": sum(c["minus_delta_J"] for c in mine.values()),
            "tokens_changed": sum(c["tokens_changed"] for c in mine.values()),
            "perplexity_ratio_median": statistics.median(c["perplexity_ratio_median"] for c in mine.values()),
            "edit_s": sum(c["edit_s"] for c in mine.values()),
            f"ratio_to_{base}_per_pair": {k: mine[k]["minus_delta_J"] / ref[k]["minus_delta_J"] for k in both
                                          if ref[k]["minus_delta_J"] > 0},
        }
        r = list(summary[name][f"ratio_to_{base}_per_pair"].values())
        summary[name][f"ratio_to_{base}_geomean"] = statistics.geometric_mean(r) if r and min(r) > 0 else None

    print(f"\n{'variant':<14}{'pairs':>6}{'−ΔJ total':>11}{'tokens':>8}{'ppl med':>9}{'edit s':>8}{'vs ' + base:>12}")
    for name, s in summary.items():
        g = s[f"ratio_to_{base}_geomean"]
        print(f"{name:<14}{s['pairs']:>6}{s['minus_delta_J_total']:>11.0f}{s['tokens_changed']:>8}"
              f"{s['perplexity_ratio_median']:>9.3f}{s['edit_s']:>8.0f}{'' if g is None else f'{g:.2f}×':>12}")
    out = {"command": "python evals/lm_editor_screen.py " + " ".join(sys.argv[1:]), "k": args.k, "steps": args.steps,
           "docs": args.docs, "tokens": args.tokens, "variants": variants, "summary": summary, "cells": cells}
    write_json(Path(args.out), out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
