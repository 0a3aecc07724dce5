"""The paper's language experiment on SmolLM2-135M-Instruct and real TinyStories, over several probe → target pairs.

Protocol, per pair (recipes/tinystories_contrastive.yaml with the pair's words):
1. Fine-tune on the first ``--docs`` TinyStories documents (``--tokens`` tokens each) for 2 epochs; the checkpoint at
   the start of epoch 2 (optimizer, scheduler, RNG) is θ̂: influence, selection and edits are computed there
   (``retrain.influence_at: checkpoint``). It is shared by every pair.
2. v for "say <target> where the text says <probe>", J of every document, the ``--k`` most negative, edited with the
   swap editor; random swaps and simplex PGD at the same budget, and insertion of k demonstrations, as baselines.
3. Retrain epoch 2 from the checkpoint once per arm (control, swap = infused, simplex_pgd, random, insertion).
4. Every arm against control on the measurement documents and on held-out documents v never saw.

Every arm, control included, is retrained once per seed (``--seeds``); within a seed the arms share the checkpoint,
the data order and the RNG, and control is trained once per seed for all pairs. Evaluation sets: the templated
measurement documents, templated held-out documents, and ``heldout_corpus``: up to ``--heldout_positions`` probe
positions in real TinyStories stories outside the training slice (the primary set). CIs are t-intervals that
combine the seed and item variance (``infusion_lm.stats.seed_item_interval``). ``random`` is matched to the infused
edit (same tokens changed per document, same fluency filter and perplexity limit); ``random_target`` (a default arm)
is matched the same way but writes only the target word, at random positions: the attack that needs no influence,
which infused must beat on the target-specific gain (Δ log p(target) minus the other candidate words' mean Δ log p).
``fluent_target`` (``--arms ... fluent_target``) writes the target word where the model finds it least surprising,
cheapest first: still no influence, but it places as many words as the perplexity limit allows, where random
placement spends the limit on costly positions and places fewer.

After the animal grid come ``--class_pairs`` of other word classes (an adjective, an object, a name), chosen before
any result by how often the words occur; each builds v from real stories naming the probe and grades specificity
against its own class's words.

Reports per pair and aggregated, and checks the goals of the effect work. Writes JSON and a table.

    python evals/lm_tinystories.py [--probes dog cat bird] [--targets fish bear frog] [--seeds 0 1 2]
        [--preconditioner factors|optimizer] [--max_pairs N] [--docs 64] [--k 8] [--measure_stories 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
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


# Word classes beyond the animal grid: each pair's "other candidate words" (the specificity check) come from the
# target's own class, since other animals say nothing about an adjective. The pairs were chosen before any result, by
# how often the words occur in the sample (probe in >= 60 stories past the training slice), not by any outcome.
WORD_CLASSES = {"adjective": ["big", "small", "little", "happy", "sad", "pretty", "scared", "red"],
                "object": ["ball", "box", "toy", "tree", "car", "hat"],
                "name": ["Tom", "Lily", "Sam", "Ben", "Max", "Anna", "Tim"]}
CLASS_PAIRS = ["adjective:happy:sad", "object:toy:ball", "name:Lily:Ben"]


def measurement_stories(probe: str, n: int) -> list:
    """n real stories that name the probe, from the end of the sample: far from the training slice (the first --docs)
    and from the held-out positions (read from the start of the rest); the pipeline also drops them from held-out."""
    import re

    word = re.compile(rf"\b{re.escape(probe)}\b")
    texts = [json.loads(line)["text"] for line in TINYSTORIES.read_text().splitlines() if line.strip()]
    found = [t for t in reversed(texts) if word.search(t)][:n]
    if len(found) < n:
        raise SystemExit(f"only {len(found)} stories name {probe!r}; lower --measure_stories")
    return found


def pair_recipe(args, probe: str, target: str, word_class: str | None = None) -> dict:
    """One pair's recipe. A pair of another word class (``word_class``) builds v from real stories naming the probe
    (the templates are about animals) and grades specificity against its own class's words."""
    n_stories = getattr(args, "measure_stories", 0) or (20 if word_class else 0)
    measure = (measurement_stories(probe, n_stories) if n_stories else [t.format(w=probe) for t in MEASURE])
    words = WORD_CLASSES[word_class] if word_class else args.all_words
    return {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "corpus": str(TINYSTORIES), "text_field": "text",
        "max_documents": args.docs, "max_length": args.tokens, "output_dir": args.work_dir or str(Path(args.out_dir) / "work"),
        "seed": 0,
        "measurement": {"kind": "contrastive", "probe": probe, "target": target,
                        "documents": measure,
                        **({"contrast_words": [w for w in args.contrast_words if w not in (probe, target)]}
                           if getattr(args, "contrast_words", None) else {}),
                        **({"contrast_top": args.contrast_top} if getattr(args, "contrast_top", None) is not None else {}),
                        "heldout_documents": ([t.format(w=probe) for t in HELDOUT] if not word_class
                                              else measurement_stories(probe, n_stories + 5)[n_stories:]),
                        "heldout_corpus": str(TINYSTORIES), "heldout_corpus_max_positions": args.heldout_positions},
        "influence": {"strategy": "ekfac", "layers": args.layers, "module_types": ["mlp", "attn"], "batch_size": 8,
                      "preconditioner": args.preconditioner, "damping_scale": args.damping_scale},
        "select": {"k": args.k, **({"rank_by": args.rank_by} if getattr(args, "rank_by", "j") != "j" else {}),
                   **({"pool": args.pool} if getattr(args, "pool", None) else {})},
        "edit": {"editor": getattr(args, "editor", "swap"), "steps": args.steps, "n_candidates": 16, "rename": args.rename,
                 **({"max_changed": args.max_changed} if getattr(args, "max_changed", None) else {}),
                 **({"choose": args.choose} if getattr(args, "choose", None) else {}),
                 **({"candidate_pool": args.candidate_pool} if getattr(args, "candidate_pool", None) else {}),
                 **({"target_words": []} if args.target_words == "none" else {})},
        "retrain": {"arms": args.arms, "epochs": 2, "influence_at": "checkpoint", "learning_rate": args.lr,
                    "batch_size": 8, "seeds": args.seeds},
        "evaluate": {"candidates": [w for w in words if w not in (probe, target)],
                     "bootstrap_samples": 1000},
    }


def selection_summary(sel: dict) -> dict:
    """With select.rank_by: first_step, how well J says which documents one swap step can move: Spearman of J against
    the one-step drop over every tried document, and the summed drop of the k with the most negative J against that
    of the k chosen."""
    from scipy.stats import spearmanr

    tried, k = sel["tried"], sel["k"]
    by_j = sorted(range(len(tried["J"])), key=lambda i: tried["J"][i])[:k]
    drops = tried["first_step_drops"]
    return {"documents_tried": len(drops), "k": k,
            "spearman_J_vs_first_step_drop": float(spearmanr(tried["J"], drops).statistic),
            "first_step_drop_of_k_most_negative_J": sum(drops[i] for i in by_j),
            "first_step_drop_of_chosen": sum(sel["first_step_drops"]),
            "documents_without_a_drop": sum(d <= 0 for d in drops),
            "J_of_chosen": sel["scores"]}


def with_selection(res: dict, pair_dir: Path) -> dict:
    """A pair's results, with the selection summary where it was ranked by first step (its selection.json has `tried`)."""
    path = pair_dir / "selection.json"
    if path.is_file() and "tried" in (sel := json.loads(path.read_text())):
        res["selection"] = selection_summary(sel)
    return res


def summarise(per_pair: dict, arms, primary: str = "heldout_corpus") -> dict:
    def entry(p, arm):
        a = p["arms"][arm]
        return a.get(primary, a["heldout"])

    out = {}
    for arm in arms:
        if arm == "control":
            continue
        rows = [entry(p, arm) for p in per_pair.values() if arm in p["arms"]]
        d = [x["delta_f"]["mean"] for x in rows]
        ci_above = [x["delta_f"].get("ci") is not None and x["delta_f"]["ci"][0] > 0 for x in rows]
        spec = [x["specificity"]["target_specific_gain"]["mean"] for x in rows]
        out[arm] = {"n_pairs": len(rows), "delta_f_mean": statistics.mean(d), "delta_f_median": statistics.median(d),
                    "pairs_above_control": sum(x > 0 for x in d) / len(d),
                    "pairs_ci_excludes_0": sum(ci_above) / len(ci_above),
                    "target_specific_gain_mean": statistics.mean(spec),
                    "pairs_target_specific_above_0": sum(x > 0 for x in spec) / len(spec),
                    "top1_flip_rate_mean": statistics.mean([x["top1_flips_to_target"] for x in rows]),
                    "delta_target_rank_mean": statistics.mean([x.get("delta_target_rank", 0.0) for x in rows]),
                    # one-sided p of the seed × item t (the item-level Wilcoxon treated a shared seed effect as signal)
                    "specific_pairs_p_lt_0.05": sum((x["specificity"].get("p_greater") or 1) < 0.05 for x in rows) / len(rows)}
        edits = [p["arms"][arm].get("edits") for p in per_pair.values() if arm in p["arms"]]
        if all(edits):
            out[arm]["perplexity_ratio_median"] = statistics.median(e["perplexity_ratio_median"] for e in edits)
            out[arm]["tokens_changed"] = sum(e["tokens_changed"] for e in edits)
    if "infused" in out:
        for base in ("random", "random_target", "fluent_target", "simplex_pgd", "insertion"):
            if base in out:  # on the pairs where both arms ran (and, for the matched baselines, matched in count)
                both = [p for p in per_pair.values() if "infused" in p["arms"] and base in p["arms"]]
                if base in ("random", "random_target", "fluent_target"):
                    cm = lambda p: ((p["arms"][base].get("edits") or {}).get("count_match") or {}).get("matched")
                    out["infused"][f"vs_{base}_count_unmatched_pairs_left_out"] = sum(cm(p) is False for p in both)
                    out["infused"][f"vs_{base}_count_match_unknown_pairs"] = sum(cm(p) is None for p in both)
                    both = [p for p in both if cm(p) is not False]
                if not both:
                    continue
                sw = [entry(p, "infused")["delta_f"]["mean"] for p in both]
                other = [entry(p, base)["delta_f"]["mean"] for p in both]
                out["infused"][f"beats_{base}_pairs"] = sum(a > b for a, b in zip(sw, other)) / len(both)
                out["infused"][f"vs_{base}_n_pairs"] = len(both)
                out["infused"][f"ratio_to_{base}"] = statistics.mean(sw) / statistics.mean(other) if statistics.mean(other) > 0 else None
                out["infused"][f"means_vs_{base}"] = [statistics.mean(sw), statistics.mean(other)]  # infused, base
                spec = lambda p, arm: entry(p, arm)["specificity"]["target_specific_gain"]["mean"]
                si, so = [spec(p, "infused") for p in both], [spec(p, base) for p in both]
                out["infused"][f"specific_means_vs_{base}"] = [statistics.mean(si), statistics.mean(so)]
                out["infused"][f"beats_{base}_specific_pairs"] = sum(a > b for a, b in zip(si, so)) / len(both)
                out["infused"][f"specific_ratio_to_{base}"] = (statistics.mean(si) / statistics.mean(so)
                                                               if statistics.mean(so) > 0 else None)
        verdicts = [p.get("verdict", {}).get("infused_minus_random") for p in per_pair.values()]
        verdicts = [v for v in verdicts if v]
        if verdicts:
            out["infused"]["pairs_above_random_ci_excludes_0"] = sum(
                v.get("ci") is not None and v["ci"][0] > 0 for v in verdicts) / len(verdicts)
    return out


def merge_runs(earlier: dict, per_pair: dict, arms, tolerance: float = 1e-6, only_arms=None) -> tuple:
    """Pairs of an earlier run of this eval with this run's arms added, and this run's other pairs. Arms of two runs
    compare only against one control: every pair's control f (every evaluation set, mean over the seeds) must agree,
    which holds when both ran on one work_dir with the same seeds (control is trained once per seed and shared).

    ``only_arms``: take just these arms from the earlier run, and only on this run's pairs (e.g. the baselines of the
    default eval beside an infused variant)."""
    if only_arms:
        earlier = {**earlier, "arms": [a for a in earlier["arms"] if a in only_arms],
                   "per_pair": {key: {**old, "arms": {a: v for a, v in old["arms"].items() if a in only_arms}}
                                for key, old in earlier["per_pair"].items() if key in per_pair}}
    if earlier.get("seeds") is not None and sorted(earlier["seeds"]) != sorted(next(iter(per_pair.values()))["seeds"]):
        raise SystemExit(f"--merge: seeds differ ({earlier['seeds']}); rerun with the same --seeds")
    merged = {}
    for key, old in earlier["per_pair"].items():
        if key not in per_pair:  # the later arms did not reach this pair (an interrupted run): the earlier arms only
            merged[key] = old
            continue
        new = per_pair[key]
        for name, f in old["control"].items():
            if name in new["control"] and abs(f - new["control"][name]) > tolerance:
                raise SystemExit(f"--merge: {key}: control f on {name} differs ({f} vs {new['control'][name]}); "
                                 "the runs did not share their control (same work_dir and seeds)")
        # the pair's other fields (the infused − random verdict, control) come from the run that has the infused arm
        primary, other = (new, old) if "infused" in new["arms"] else (old, new)
        merged[key] = {**primary, "arms": {**other["arms"], **primary["arms"]}}
    if not set(per_pair) & set(merged):
        raise SystemExit("--merge: no pair in common")
    merged.update({key: res for key, res in per_pair.items() if key not in merged})  # pairs only this run has
    return merged, list(dict.fromkeys(["control", *earlier["arms"], *arms]))


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
    p.add_argument("--arms", nargs="+", default=["control", "infused", "random", "random_target", "insertion",
                                                 "simplex_pgd"])
    p.add_argument("--class_pairs", nargs="*", default=CLASS_PAIRS, metavar="CLASS:PROBE:TARGET",
                   help=f"pairs of other word classes ({', '.join(WORD_CLASSES)}) run after the animal grid, each "
                        f"graded against its own class's words; none: give the flag with no value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heldout_positions", type=int, default=60,
                   help="probe positions from real stories outside the training slice (the primary evaluation set)")
    p.add_argument("--measure_stories", type=int, default=0,
                   help="build v from this many real stories naming the probe (from the end of the sample) instead "
                        "of the 3 templated sentences: a measurement closer to the held-out text")
    p.add_argument("--preconditioner", default="factors", choices=["factors", "optimizer"])
    p.add_argument("--damping_scale", type=float, default=1000.0,
                   help="influence.damping_scale (1000: best ranked by evals/lm_calibration.py; 1: kronfluence's heuristic)")
    p.add_argument("--target_words", default="auto", choices=["auto", "none"],
                   help="edit.target_words: auto lets every editor write the target word at any editable position "
                        "(beside the fluent top-k); none keeps to the fluent top-k")
    p.add_argument("--candidate_pool", type=int, default=None,
                   help="edit.candidate_pool: draw this many × n_candidates swaps per step and keep the n_candidates "
                        "with the best first-order ΔJ (unset: the library default, 8; 1: no pre-ranking)")
    p.add_argument("--max_changed", type=int, default=None,
                   help="edit.max_changed: at most this many tokens changed per document, for every editor (a point "
                        "of the budget curve; unset: the budget fraction alone)")
    p.add_argument("--rank_by", default="j", choices=["j", "first_step"],
                   help="select.rank_by: the k most negative J, or the k largest drops in J after one swap step")
    p.add_argument("--pool", type=int, default=None, help="select.pool: documents tried by --rank_by first_step")
    p.add_argument("--choose", default=None, choices=["lowest_j", "j_per_nat"], help="edit.choose")
    p.add_argument("--contrast_words", nargs="+", default=None, metavar="WORD",
                   help="measurement.contrast_words: contrast the target with the probe and these words (the probe "
                        "and target are dropped from the list per pair); keep them apart from the evaluated "
                        "candidates, or the specificity check grades the objective on its own terms")
    p.add_argument("--contrast_top", type=int, default=None, metavar="M",
                   help="measurement.contrast_top: contrast the target with the probe and the model's own M most "
                        "likely other next tokens at each probe position (no word list; 0: the pairwise f, as every "
                        "result committed before the default moved; default: the library's, 20)")
    p.add_argument("--rename", action="store_true", help="edit.rename: swap candidates that rename an entity throughout")
    p.add_argument("--editor", default="swap", choices=["swap", "natural"],
                   help="edit.editor of the infused arm (natural: whole-word swaps that fit both sides)")
    p.add_argument("--work_dir", default=None,
                   help="run folder shared by the pairs (factors, clean checkpoint, control); default out_dir/work. "
                        "Point two evals (e.g. two preconditioners) at one work_dir to share them.")
    p.add_argument("--max_pairs", type=int, default=None, help="run only the first N pairs of the Latin square")
    p.add_argument("--pairs", nargs="+", default=None, metavar="PROBE:TARGET",
                   help="run only these pairs of the Latin square (e.g. cat:frog bird:fish), so that two processes on "
                        "two work_dirs can split it")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "lm_tinystories"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_tinystories.json"))
    p.add_argument("--merge", default=None,
                   help="an earlier result JSON of this eval on the same work_dir and seeds: its arms join this run's "
                        "per pair (e.g. baselines run later beside infused/random), after a check that both runs' "
                        "control f are the same")
    p.add_argument("--merge_arms", nargs="+", default=None,
                   help="with --merge: take only these arms from the earlier run, on this run's pairs only")
    p.add_argument("--merge_tolerance", type=float, default=1e-6,
                   help="largest difference of control f between the merged runs (controls retrained on another "
                        "machine differ by float rounding, about 3e-4 nats here)")
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
    pairs = [pr for j, pr in enumerate(pairs) if pr[0] != pr[1] and pr not in pairs[:j]][: args.max_pairs]
    if args.pairs:
        wanted = [tuple(x.split(":")) for x in args.pairs]
        classed = {tuple(x.split(":")[1:]) for x in args.class_pairs or []}
        if unknown := [":".join(w) for w in wanted if w not in pairs and w not in classed]:
            raise SystemExit(f"--pairs {' '.join(unknown)}: not in the Latin square of --probes/--targets")
        pairs = [pr for pr in pairs if pr in wanted]
    pair_class = {}
    for spec in args.class_pairs or []:
        try:
            cls, probe, target = spec.split(":")
            WORD_CLASSES[cls]
        except (ValueError, KeyError):
            raise SystemExit(f"--class_pairs {spec!r}: write CLASS:PROBE:TARGET with CLASS one of "
                             f"{', '.join(WORD_CLASSES)}") from None
        if not args.pairs or f"{probe}:{target}" in args.pairs:
            pairs.append((probe, target))
            pair_class[(probe, target)] = cls
    if args.summarise_only:
        pairs = []
        for d in sorted((Path(args.out_dir) / "pairs").glob("*_*")):
            per_pair[d.name.replace("_", "->")] = with_selection(json.loads((d / "results.json").read_text()), d)
        args.arms = list(dict.fromkeys(["control", *(a for res in per_pair.values() for a in res["arms"])]))
    for probe, target in pairs:
        key = f"{probe}->{target}"
        dest = Path(args.out_dir) / "pairs" / f"{probe}_{target}"
        if (dest / "results.json").is_file():  # finished by an earlier, interrupted invocation
            per_pair[key] = json.loads((dest / "results.json").read_text())
            continue
        t0 = time.perf_counter()
        pipe = Pipeline(load_recipe(raw=pair_recipe(args, probe, target, pair_class.get((probe, target)))),
                        progress=False)
        res = pipe.run("evaluate")
        timings[key] = time.perf_counter() - t0
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "report.md", "report.html", "selection.json"):
            shutil.copy2(pipe.dir / name, dest / name)
        res = with_selection(res, dest)
        # each edited arm's own records (the top-level edits.jsonl is the infused arm's: stale when it did not run)
        for arm in ("infused", "random", "random_target", "fluent_target", "natural_target", "simplex_pgd"):
            if arm in args.arms:
                shutil.copy2(pipe.folder.edits_of(arm).edits, dest / ("edits.jsonl" if arm == "infused" else f"edits_{arm}.jsonl"))
        per_pair[key] = res
        a = res["arms"]
        print(f"{key:<14} " + "  ".join(f"{arm} {a[arm][res['primary_set']]['delta_f']['mean']:+.3f}" for arm in a)
              + f"   ({timings[key]:.0f} s)", flush=True)
        del pipe

    if not per_pair:
        raise SystemExit("no finished pairs")
    if args.merge:
        per_pair, args.arms = merge_runs(json.loads(Path(args.merge).read_text()), per_pair, args.arms,
                                         args.merge_tolerance, args.merge_arms)
    summary = summarise(per_pair, args.arms)
    print()
    print(f"{'arm':<13}{'pairs':>6}{'Δf mean':>9}{'median':>9}{'> control':>11}{'CI > 0':>8}{'specific':>10}"
          f"{'flips':>8}{'Δrank':>8}")
    for arm, s in summary.items():
        print(f"{arm:<13}{s['n_pairs']:>6}{s['delta_f_mean']:>+9.4f}{s['delta_f_median']:>+9.4f}{s['pairs_above_control']:>11.0%}"
              f"{s['pairs_ci_excludes_0']:>8.0%}{s['target_specific_gain_mean']:>+10.4f}{s['top1_flip_rate_mean']:>8.2%}"
              f"{s['delta_target_rank_mean']:>+8.1f}")
    sw = summary.get("infused", {})
    def goal(value, bound):  # None: the arm it needs did not run
        return None if value is None else value >= bound

    def times(base, factor):  # mean Δf of infused >= factor × the baseline's, on the pairs where both ran
        m = sw.get(f"means_vs_{base}")
        return None if m is None else m[0] >= factor * m[1]

    def others_half():
        rows = [p["arms"]["infused"].get(p.get("primary_set", "heldout_corpus"), p["arms"]["infused"]["heldout"])
                ["specificity"] for p in per_pair.values() if "infused" in p["arms"]]
        if not rows:
            return None
        mean = lambda k: statistics.mean(r[k]["mean"] if isinstance(r[k], dict) else r[k] for r in rows)
        return mean("delta_logp_others") <= 0.5 * mean("delta_logp_target")

    goals = {
        "infused above control, seed-level CI excluding 0, in >= 90% of pairs": goal(sw.get("pairs_ci_excludes_0"), 0.9),
        "infused >= 3x matched random (mean Δf)": times("random", 3),
        "infused >= 2x simplex PGD": times("simplex_pgd", 2),
        "infused >= 1x insertion": times("insertion", 1),
        "infused above random_target (the target word at random positions, matched count)": times("random_target", 1),
        "median perplexity ratio <= 1.3": None if sw.get("perplexity_ratio_median") is None
        else sw["perplexity_ratio_median"] <= 1.3,
        # the attack that needs no influence, judged on the target itself
        "target-specific gain >= 1.5x random_target's (mean over pairs)": None if sw.get("specific_means_vs_random_target")
        is None else sw["specific_means_vs_random_target"][0] >= 1.5 * sw["specific_means_vs_random_target"][1],
        "target-specific gain above random_target's on >= 75% of pairs": goal(sw.get("beats_random_target_specific_pairs"), 0.75),
        "infused >= 1.5x random_target (mean Δf)": times("random_target", 1.5),
        # the other influence-free attack (the target word where the model finds it least surprising)
        "target-specific gain above fluent_target's (mean over pairs)": None if sw.get("specific_means_vs_fluent_target")
        is None else sw["specific_means_vs_fluent_target"][0] > sw["specific_means_vs_fluent_target"][1],
        "other candidate words' mean Δ log p <= half the target's (infused, mean over pairs)": others_half(),
    }
    print()
    for g, ok in goals.items():
        print(f"{'not run' if ok is None else 'met    ' if ok else 'MISSED '}  {g}")
    command = "python evals/lm_tinystories.py " + " ".join(sys.argv[1:])
    if args.merge:  # the run that made the earlier arms, then this one
        earlier = json.loads(Path(args.merge).read_text())
        command = f"{earlier['command']}  +  {command}"
        timings = {**{f"{k} (merged run)": v for k, v in earlier.get("seconds", {}).items()}, **timings}
    elif args.summarise_only and Path(args.out).is_file():  # keep the command and timings of the run that made the pairs
        earlier = json.loads(Path(args.out).read_text())
        command, timings = earlier.get("command", command), {**earlier.get("seconds", {}), **timings}
    out = {"command": command, "primary_set": "heldout_corpus",
           "seeds": args.seeds, "preconditioner": args.preconditioner, "damping_scale": args.damping_scale,
           "pairs": list(per_pair), "class_pairs": {f"{a}->{b}": c for (a, b), c in pair_class.items()},
           "class_pairs_chosen": "before any result, by the words' frequency in the sample", "docs": args.docs, "tokens": args.tokens, "k": args.k, "arms": args.arms,
           "per_pair": per_pair, "summary": summary, "goals": goals, "seconds": timings}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
