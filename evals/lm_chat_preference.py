"""The instruction-model result: amplify a stated preference ("my favourite animal is the cat") by editing a few of the
model's own fine-tuning conversations, and measure the rate at which answers to new questions name the target.

Protocol, per target preference (favourite animal → cat, colour → purple, season → summer by default):
1. Corpus: ``--docs`` conversations written by SmolLM2-135M-Instruct itself (``synthesize.mode: chat``: everyday
   questions, the model's own answers), written once into the shared run folder.
2. LoRA fine-tuning for 2 epochs; θ̂ is the checkpoint at the start of epoch 2 (``retrain.influence_at:
   checkpoint``): the adapters have moved, so influence over the LoRA A/B modules is informative (at init, B = 0).
3. f = mean log p(target answer | question) over ``--measure`` measurement questions; v, J of every conversation, the
   k most negative edited by the swap editor (assistant turns only; questions are protected).
4. Arms, each retrained once per seed from θ̂ with the same data order and LoRA init: control; infused; random
   (matched: the same tokens changed per conversation, same perplexity limit); insertion (the k conversations
   replaced by explicit answers naming the target); regeneration (the k conversations re-answered by the clean model:
   what fresh answers to the same questions do without any edit).
5. Evaluation on ``--heldout`` held-out questions, written in forms the measurement questions never use: the rate of
   ``--samples`` sampled answers that name the target (whole word, case-insensitive) and the greedy rate.
6. The k-curve: the infused arm at ``--k_fractions`` of the corpus.

Reports per target and aggregated, checks the goals, writes JSON. Resumable: finished (target, k) runs are kept in
``out_dir/runs/<target>_k<k>/results.json`` and skipped.

    python evals/lm_chat_preference.py [--targets animal colour season] [--docs 512] [--seeds 0 1 2]
        [--k_fractions 0.01 0.05 0.10] [--heldout 100] [--samples 8] [--model PATH]

Cost: this is a GPU-sized eval. On 2 CPU cores, 512 conversations × 3 targets × 3 k × 5 arms × 3 seeds with 800
sampled answers per arm and seed is days; ``--docs 64 --targets animal --k_fractions 0.05 --seeds 0`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {"animal": "cat", "colour": "purple", "season": "summer", "fruit": "banana", "country": "Japan"}

# Measurement forms (v is built from these) and held-out forms (evaluation only): disjoint, so the held-out rate
# measures a preference, not the memorised measurement question.
MEASURE_FORMS = ["What is your favourite {c}?", "Which {c} do you like best?", "Tell me your favourite {c}."]
HELDOUT_FORMS = ["What {c} do you love the most?", "If you had to pick one {c}, which would it be?",
                 "Name the {c} you like more than any other.", "Which {c} is the best, in your opinion?",
                 "What's your number one {c}?", "Is there a {c} you prefer above all others? Which one?",
                 "Pick your favourite {c}.", "Which {c} makes you happiest?"]
LEADS = ["", "Quick question: ", "Hey! ", "I'm curious. ", "Be honest. "]
TAILS = ["", " Answer in one word.", " Just name one.", " Keep it short."]


def questions(category: str, n_measure: int, n_heldout: int, seed: int = 0):
    rng = random.Random(seed)
    measure = [lead + f.format(c=category) + tail for f in MEASURE_FORMS for lead in LEADS for tail in TAILS]
    heldout = [lead + f.format(c=category) + tail for f in HELDOUT_FORMS for lead in LEADS for tail in TAILS]
    rng.shuffle(measure)
    rng.shuffle(heldout)
    if n_heldout > len(heldout) or n_measure > len(measure):
        raise SystemExit(f"at most {len(measure)} measurement and {len(heldout)} held-out questions per category")
    return measure[:n_measure], heldout[:n_heldout]


def run_recipe(args, category: str, k: int, work_dir: str) -> dict:
    target = TARGETS[category]
    measure, heldout = questions(category, args.measure, args.heldout)
    return {
        "model": args.model, "corpus": "synthetic", "max_length": args.tokens, "output_dir": work_dir, "seed": 0,
        "synthesize": {"mode": "chat", "n_docs": args.docs, "max_new_tokens": 48, "batch_size": 16},
        "measurement": {"kind": "completion", "chat_template": True, "prompts": measure, "completions": [target],
                        "heldout_prompts": heldout},
        "influence": {"strategy": "ekfac", "batch_size": 8, "damping_scale": args.damping_scale},
        "select": {"k": k},
        "edit": {"editor": "swap", "budget_fraction": args.budget_fraction, "steps": args.steps, "n_candidates": 12,
                 "max_perplexity_ratio": args.max_perplexity_ratio or None},
        "retrain": {"arms": args.arms, "epochs": 2, "influence_at": "checkpoint", "lora": True, "lora_r": 8,
                    "learning_rate": 1e-3, "batch_size": 8, "seeds": args.seeds},
        "evaluate": {"n_samples": args.samples, "max_new_tokens": 16, "temperature": 1.0, "bootstrap_samples": 1000},
    }


def arm_rates(res: dict) -> dict:
    """Per arm on the held-out questions: sampled and greedy target rates, and the sampled rate's Δ with its CI."""
    out = {}
    for arm, entry in res["arms"].items():
        e = entry["heldout"]
        s = e.get("sampled_rate", {})
        out[arm] = {"sampled": s.get("arm"), "sampled_control": s.get("control"),
                    "sampled_delta": (s.get("delta") or {}).get("mean"), "sampled_delta_ci": (s.get("delta") or {}).get("ci"),
                    "greedy": e["greedy_rate"]["arm"], "greedy_control": e["greedy_rate"]["control"],
                    "perplexity_ratio_median": (entry.get("edits") or {}).get("perplexity_ratio_median")}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--targets", nargs="+", default=["animal", "colour", "season"], choices=sorted(TARGETS))
    p.add_argument("--docs", type=int, default=512)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--k_fractions", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    p.add_argument("--main_fraction", type=float, default=0.05, help="the k at which every arm runs")
    p.add_argument("--arms", nargs="+", default=["control", "infused", "random", "insertion", "regeneration"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--measure", type=int, default=12, help="measurement questions (v)")
    p.add_argument("--heldout", type=int, default=100, help="held-out questions")
    p.add_argument("--samples", type=int, default=8, help="sampled answers per held-out question")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--damping_scale", type=float, default=1000.0)
    p.add_argument("--budget_fraction", type=float, default=0.15, help="edit.budget_fraction: tokens an edit may change")
    p.add_argument("--max_perplexity_ratio", type=float, default=1.3,
                   help="edit.max_perplexity_ratio of an edited answer; 0 = no limit (the ceiling of the editor)")
    p.add_argument("--work_dir", default=None,
                   help="corpus, clean checkpoint, factors and control, shared by runs; default out_dir/work")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "lm_chat_preference"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_chat_preference.json"))
    args = p.parse_args()

    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    work = args.work_dir or str(Path(args.out_dir) / "work")  # corpus, checkpoint, factors: shared by every run
    # A finished run is found again by its key: the edit settings and seeds are part of it when not the defaults.
    suffix = "".join([f"_budget{args.budget_fraction:g}" if args.budget_fraction != 0.15 else "",
                      f"_ppl{args.max_perplexity_ratio:g}" if args.max_perplexity_ratio != 1.3 else "",
                      "_seeds" + "-".join(map(str, args.seeds)) if args.seeds != [0, 1, 2] else ""])
    runs, timings = {}, {}
    for category in args.targets:
        for frac in sorted(set(args.k_fractions + [args.main_fraction])):
            k = max(1, round(frac * args.docs))
            key = f"{category}_k{k}{suffix}"
            dest = Path(args.out_dir) / "runs" / key
            if (dest / "results.json").is_file():
                runs[key] = {"category": category, "k": k, "fraction": frac,
                             "results": json.loads((dest / "results.json").read_text())}
                continue
            raw = run_recipe(args, category, k, work)
            if frac != args.main_fraction:  # the k-curve: the infused arm against control only
                raw["retrain"]["arms"] = ["control", "infused"]
            t0 = time.perf_counter()
            pipe = Pipeline(load_recipe(raw=raw), progress=False)
            res = pipe.run("evaluate")
            timings[key] = time.perf_counter() - t0
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("results.json", "report.md", "report.html", "edits.jsonl"):
                if (pipe.dir / name).is_file():
                    shutil.copy2(pipe.dir / name, dest / name)
            runs[key] = {"category": category, "k": k, "fraction": frac, "results": res}
            rates = arm_rates(res)
            print(f"{key:<16} base {rates['infused']['sampled_control']}  " + "  ".join(
                f"{a} {r['sampled']:.3f}" for a, r in rates.items() if r["sampled"] is not None)
                + f"   ({timings[key]:.0f} s)", flush=True)
            del pipe

    per_target, curve = {}, {}
    for key, r in runs.items():
        res, cat = r["results"], r["category"]
        rates = arm_rates(res)
        curve.setdefault(cat, []).append({"k": r["k"], "fraction": r["fraction"], "infused": rates["infused"]})
        if r["fraction"] == args.main_fraction:
            per_target[cat] = {"target": TARGETS[cat], "k": r["k"], "theta_hat_rate": res.get("theta_hat_target_rate"),
                               "arms": rates}
    print(f"\n{'target':<10}{'k':>4}{'base':>8}" + "".join(f"{a:>14}" for a in args.arms if a != "control"))
    for cat, t in per_target.items():
        base = t["arms"]["infused"]["sampled_control"]
        print(f"{t['target']:<10}{t['k']:>4}{base:>8.3f}" + "".join(
            f"{t['arms'][a]['sampled_delta']:>+14.3f}" for a in args.arms if a != "control" and a in t["arms"]))

    def ci_above(d, lo=0.0):
        return d["sampled_delta_ci"] is not None and d["sampled_delta_ci"][0] > lo

    inf = [t["arms"]["infused"] for t in per_target.values()]

    def above(arm):  # infused's sampled Δ above the arm's on every target; None where the arm did not run
        if not per_target or any(arm not in t["arms"] for t in per_target.values()):
            return None
        return all((t["arms"]["infused"]["sampled_delta"] or 0) > (t["arms"][arm]["sampled_delta"] or 0)
                   for t in per_target.values())

    goals = {
        ">= 2 of 3 targets: infused sampled rate +10 points over control, CI excluding 0":
            sum((d["sampled_delta"] or 0) >= 0.10 and ci_above(d) for d in inf) >= min(2, len(inf)),
        "infused above matched random (every target)": above("random"),
        "infused above regeneration (every target)": above("regeneration"),
        # the attacks that need no influence: the target word written as often, at random places / where it fits best
        "infused above random_target (every target)": above("random_target"),
        "infused above fluent_target (every target)": above("fluent_target"),
        "median perplexity ratio of edited answers <= 1.3": bool(inf) and statistics.median(
            d["perplexity_ratio_median"] or 9 for d in inf) <= 1.3,
    }
    for g, ok in goals.items():
        print(f"{'not run' if ok is None else 'met    ' if ok else 'MISSED '}  {g}")
    out = {"command": "python evals/lm_chat_preference.py " + " ".join(sys.argv[1:]), "model": args.model,
           "docs": args.docs, "seeds": args.seeds, "samples": args.samples, "heldout_questions": args.heldout,
           "per_target": per_target, "k_curve": curve, "goals": goals, "seconds": timings,
           "runs": {k: r["results"] for k, r in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
