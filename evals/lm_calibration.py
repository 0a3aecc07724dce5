"""Calibration, out of sample: which v predicts what retraining actually does, chosen on one (pair, seed) and
reported on others. Single-document edits, each retrained alone.

Setup: the TinyStories protocol of evals/lm_tinystories.py (SmolLM2-135M-Instruct, the first ``--docs`` stories ×
``--tokens`` tokens, 2 epochs, θ̂ = the clean checkpoint at the start of epoch 2).

For each run (probe:target:seed of ``--runs``; the first is the one the strategy is chosen on):

1. ``--n_edits`` single-document edits made by editors that use **no v at all**, so no strategy judged here made
   them: half random fluent swaps (``random``), half the target word written at random editable positions
   (``random_target``), under the recipe's edit budget and perplexity limit. Each run edits its own documents: one
   shuffle of the ``--docs`` documents (``--doc_seed``) cut into a block per run, so no reported run edits a
   document the selection run or another reported run edited (checked at start-up; ``--n_edits`` × runs must fit
   in ``--docs``).
2. Each edit is retrained alone: epoch 2 from the checkpoint with one document replaced, the run's seed and data
   order as its control, so actual Δf = f(edited run) − f(control) is deterministic. Δf is read on the
   measurement set (the texts v was built from and the predictions are for) and, separately, on the held-out corpus
   (probe positions in real stories the model never trained on).
3. Each strategy predicts every edit's Δf from its own v: −(J(z') − J(z)) / n for the factors' v (EK-FAC with the
   heuristic damping × 1, 10, 100, 1000; identity, v = ∇f, the λ → ∞ direction), −(J(z') − J(z)) for the
   optimizer's (over ``--layers``; over every decoder layer, ``optimizer_all_layers``; and over those plus the
   embeddings, ``optimizer_all_params``), stationary; and along the run's own steps (``optimizer_trajectory_*``:
   both Adam moments, each batch's clip, each document's step in the seed's order, the checkpoint's moments: what
   ``influence.prediction: optimizer`` reports). J is exact (forward mode).
4. Per strategy and run: Spearman(predicted, actual), the median actual / predicted ratio, the fraction of signs
   right. The strategy with the best Spearman on the first run is **chosen there** (``selected_on``); its figures on
   the other runs (``reported_on``, other pairs and another seed) are the calibration this eval reports.

Every strategy predicts the f fixed by ``--contrast_top`` (default: the library's default, the top-20 contrast;
0: the pairwise f), recorded in the JSON as ``measurement_f`` beside each run's edited documents.

Each run's edits, retrains and figures are written as they finish (``--work_root`` outside the work tree, and
``evals/results/lm_calibration/<probe>_<target>_seed<seed>.json``), so a killed run resumes and a new strategy is
judged on the same retrains without redoing them.

    python evals/lm_calibration.py [--runs dog:bear:0 cat:frog:1 fish:duck:1] [--n_edits 20] [--contrast_top 20]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
ALL_WORDS = ["bear", "bird", "cat", "dog", "duck", "fish", "frog"]


def parse_run(text: str):
    try:
        probe, target, seed = text.split(":")
        return probe, target, int(seed)
    except ValueError:
        raise SystemExit(f"--runs {text!r}: write each run as probe:target:seed, e.g. dog:bear:0") from None


def document_samples(n_docs: int, n_runs: int, n_edits: int, doc_seed: int) -> list:
    """Each run's documents to edit: consecutive blocks of one shuffle of the n_docs documents. A document edited in
    the selection run and again in a reported run would make the out-of-sample figure partly a re-measurement of
    the selection's own documents (the runs committed before this shared 13 of 30, and the two reported runs 29)."""
    import numpy as np

    if n_edits * n_runs > n_docs:
        raise SystemExit(f"--n_edits {n_edits} x {n_runs} runs needs {n_edits * n_runs} distinct documents but --docs "
                         f"is {n_docs}: lower --n_edits or give fewer --runs")
    order = [int(i) for i in np.random.default_rng(doc_seed).permutation(n_docs)]
    return [order[r * n_edits:(r + 1) * n_edits] for r in range(n_runs)]


def check_disjoint(samples: list, names: list) -> None:
    """Stop, in one line, if two runs would edit a document in common."""
    for (a, da), (b, db) in itertools.combinations(zip(names, samples), 2):
        if common := sorted(set(da) & set(db)):
            raise SystemExit(f"lm_calibration: runs {a} and {b} would both edit documents {common}; each run needs "
                             f"its own documents")


def measurement_f(contrast_top: int) -> dict:
    """The f every strategy predicts, named and with its settings (the held-out corpus keeps the pairwise f)."""
    name = (f"top-{contrast_top} contrast: log p(target) - log sum of p over the probe and the model's "
            f"{contrast_top} most likely other next tokens" if contrast_top
            else "pairwise: log p(target) - log p(probe)")
    return {"kind": "contrastive", "contrast_top": contrast_top, "name": name,
            "heldout_corpus": "pairwise: log p(target) - log p(probe)"}


def calibration(pred, actual) -> dict:
    """Spearman, the median actual/predicted ratio and the fraction of signs right, over every edit (none dropped)."""
    import numpy as np
    from scipy.stats import spearmanr

    pred, actual = np.asarray(pred, float), np.asarray(actual, float)
    rho = spearmanr(pred, actual)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = actual / pred
    return {"spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "median_actual_over_predicted": float(np.median(ratio[np.isfinite(ratio)])),
            "sign_agreement": float(np.mean(np.sign(pred) == np.sign(actual))), "edits": int(len(pred))}


def choose(strategies: dict) -> str:
    """The strategy with the highest Spearman; ties go to the ratio nearer 1."""
    import math

    return max(strategies, key=lambda s: (round(strategies[s]["spearman"], 3),
                                          -abs(math.log(abs(strategies[s]["median_actual_over_predicted"]) or 1e-12))))


def run_one(args, probe: str, target: str, seed: int, docs: list) -> dict:
    """One (pair, seed): the edits of ``docs``, their retrains (resumed from the run folder), every strategy's
    figures."""
    import lm_tinystories as ts
    from infusion_lm import influence as inf
    from infusion_lm.atomic_io import read_json, write_json
    from infusion_lm.config import load_recipe
    from infusion_lm.forward_mode_j import ForwardModeJ
    from infusion_lm.optimizer_influence import optimizer_ihvp
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.retrain import train_arm
    from infusion_lm.text.editors import RandomEditor, RandomTargetEditor
    from infusion_lm.text.measurement import build_measurement
    from infusion_lm.tracked_modules import resolve_tracked_modules

    # the f is in the name: the cached retrains' Δf are of this f only
    run_dir = Path(args.work_root) / f"{probe}_{target}_seed{seed}_top{args.contrast_top}"
    ns = argparse.Namespace(docs=args.docs, tokens=args.tokens, out_dir=str(run_dir),
                            work_dir=str(Path(args.work_root) / f"{probe}_{target}"), heldout_positions=60,
                            layers=args.layers, preconditioner="factors", damping_scale=1.0, k=8, steps=8,
                            arms=["control", "infused"], lr=args.lr, seeds=[seed], all_words=ALL_WORDS,
                            rename=False, target_words="auto", contrast_top=args.contrast_top)
    pipe = Pipeline(load_recipe(raw=ts.pair_recipe(ns, probe, target)), progress=False)
    pipe.run("measure")  # the clean checkpoint and factors (cached in the pair's work folder)
    model, tok, tracked = pipe.model, pipe.tokenizer, pipe.tracked
    measurement = build_measurement(pipe.recipe.measurement, tok, pipe.recipe.run.max_length)
    n = len(pipe.dataset)
    if max(docs) >= n:
        raise SystemExit(f"lm_calibration: document {max(docs)} asked but the corpus has {n}; lower --docs")
    rows = [pipe.dataset[i] for i in range(n)]
    pad = tok.pad_token_id
    t0 = time.perf_counter()

    # ---- every strategy's v
    vs, divisors = {}, {}
    grads = inf.measurement_gradients(model, measurement, tracked)
    fa, factors = inf.load_factors(pipe.factors_dir, model, tracked)
    for scale in (1, 10, 100, 1000):
        vs[f"ekfac_heuristic_x{scale}"] = inf.precondition(grads, fa, factors, None, damping_scale=float(scale))
        divisors[f"ekfac_heuristic_x{scale}"] = n
    vs["identity"] = {k: g.float() for k, g in grads.items()}
    divisors["identity"] = n
    start = pipe.checkpoint_step()
    vs["optimizer"], opt_info = optimizer_ihvp(model, measurement, tracked, rows, pipe.recipe.retrain, pad, start)
    opt_info.pop("stats")
    divisors["optimizer"] = 1
    # Retraining moves every decoder layer, so a v over two layers sees only part of the change it predicts; and an
    # edit that writes the target word moves its (tied) embedding row directly, which kronfluence never tracks.
    all_layers = resolve_tracked_modules(model)
    vs["optimizer_all_layers"], _ = optimizer_ihvp(model, measurement, all_layers, rows, pipe.recipe.retrain, pad,
                                                   start)
    divisors["optimizer_all_layers"] = 1
    emb = model.get_input_embeddings()
    with_embeddings = all_layers + [m for m, mod in model.named_modules()
                                    if mod is emb or (mod is model.get_output_embeddings() and mod.weight is not emb.weight)]
    vs["optimizer_all_params"], _ = optimizer_ihvp(model, measurement, with_embeddings, rows, pipe.recipe.retrain,
                                                   pad, start)
    divisors["optimizer_all_params"] = 1
    print(f"[{probe}->{target} seed {seed}] v for {len(vs)} strategies: {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- the edits: no v chooses them (J is only measured, against ∇f, for the record)
    run_dir.mkdir(parents=True, exist_ok=True)
    edits_file = run_dir / "edits.json"
    half = len(docs) // 2
    groups = [["random", docs[:half]], ["random_target", docs[half:]]]
    if edits_file.is_file() and read_json(edits_file).get("groups") == groups:
        edits = read_json(edits_file)["edits"]
    else:
        edits = []
        for name, idx in groups:
            cls = RandomTargetEditor if name == "random_target" else RandomEditor
            editor = cls(model, tok, vs["identity"], pipe.recipe.edit, eps_rel=1e-4, target_words=[target])
            editor.gen.manual_seed(seed)
            for i, res in zip(idx, editor.edit_many([rows[i] for i in idx])):
                if res.n_changed:
                    edits.append({"group": name, "doc_index": i, "input_ids": list(res.input_ids),
                                  "labels": list(res.labels), "n_changed": res.n_changed})
        write_json(edits_file, {"groups": groups, "edits": edits})
    print(f"[{probe}->{target} seed {seed}] {len(edits)} edits: {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- actual Δf: each edit retrained alone, the run's seed and order, as its control
    t = pipe.recipe.retrain
    ckpt = pipe.arm_checkpoint()
    device = str(next(model.parameters()).device)
    cache = run_dir / "actual.json"
    done = read_json(cache) if cache.is_file() else {}

    def f_after(replace):
        m, _ = train_arm(pipe.arm_model, pipe.trainer_collator, pipe.arm_rows(replace), t, run_dir / "trainer", seed,
                         device, False, ckpt)
        return {"measurement": measurement.value(m),
                "heldout_corpus": pipe.modality.observe(m, "heldout_corpus")["f_mean"]}

    key = lambda e: f"{e['doc_index']}:{e['group']}:{sum(e['input_ids']) * 31 + len(e['input_ids'])}"
    if "control" not in done:
        done["control"] = f_after({})
        write_json(cache, done)
    for j, e in enumerate(edits):
        if key(e) not in done:
            done[key(e)] = f_after({e["doc_index"]: {"input_ids": e["input_ids"], "labels": e["labels"]}})
            write_json(cache, done)  # resumable: each finished retrain is kept
            print(f"[{probe}->{target} seed {seed}] retrain {j + 1}/{len(edits)}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        e["actual_delta_f"] = {s: done[key(e)][s] - done["control"][s] for s in done["control"]}

    # ---- predictions (of the measurement set's Δf) and calibration, on every edit
    edited = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in edits]
    original = [rows[e["doc_index"]] for e in edits]
    strategies, heldout = {}, {}
    for name, v in vs.items():
        J = ForwardModeJ(model, v)  # exact: ΔJ of one edit is small beside J itself
        pred = (-(J.dataset(edited, pad, batch_size=8) - J.dataset(original, pad, batch_size=8)) / divisors[name]
                ).tolist()
        for e, pv in zip(edits, pred):
            e.setdefault("predicted", {})[name] = pv
        strategies[name] = calibration(pred, [e["actual_delta_f"]["measurement"] for e in edits])
        heldout[name] = calibration(pred, [e["actual_delta_f"]["heldout_corpus"] for e in edits])
    # The response along this run's own steps (both Adam moments, each batch's clip, each document's step in this
    # seed's order, the checkpoint's moments): what influence.prediction: optimizer reports.
    from infusion_lm.optimizer_trajectory import retraining_response

    for name, trk in (("optimizer_trajectory_all_layers", all_layers),
                      ("optimizer_trajectory_all_params", with_embeddings)):
        resp = retraining_response(model, measurement, rows, t, trk, pad, seed, start, ckpt)
        pred = resp.predicted([e["doc_index"] for e in edits], original, edited, pad)
        del resp
        for e, pv in zip(edits, pred):
            e.setdefault("predicted", {})[name] = pv
        strategies[name] = calibration(pred, [e["actual_delta_f"]["measurement"] for e in edits])
        heldout[name] = calibration(pred, [e["actual_delta_f"]["heldout_corpus"] for e in edits])
    print(f"\n[{probe}->{target} seed {seed}]  {'strategy':<22}{'Spearman':>10}{'median actual/pred':>20}"
          f"{'signs right':>13}   (measurement set)")
    for name, r in strategies.items():
        print(f"{'':<20}{name:<22}{r['spearman']:>+10.3f}{r['median_actual_over_predicted']:>20.3g}"
              f"{r['sign_agreement']:>13.0%}")
    return {"probe": probe, "target": target, "seed": seed, "docs": n, "tokens": args.tokens,
            "measurement_f": measurement_f(args.contrast_top), "document_seed": args.doc_seed,
            "documents_drawn": docs, "edited_documents": sorted(e["doc_index"] for e in edits),
            "n_edits": len(edits), "edit_groups": {g: sum(e["group"] == g for e in edits) for g, _ in groups},
            "optimizer_info": opt_info, "control_f": done["control"],
            "strategies": strategies, "strategies_vs_heldout_corpus_delta_f": heldout,
            "edits": [{k: e[k] for k in ("group", "doc_index", "n_changed", "actual_delta_f", "predicted")}
                      for e in edits], "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["dog:bear:0", "cat:frog:1", "fish:duck:1"],
                   help="probe:target:seed; the strategy is chosen on the first and reported on the others")
    p.add_argument("--n_edits", type=int, default=20, help="edits per run; runs × n_edits must fit in --docs")
    p.add_argument("--doc_seed", type=int, default=0,
                   help="the shuffle of the documents that gives each run its own block to edit")
    p.add_argument("--contrast_top", type=int, default=None, metavar="M",
                   help="measurement.contrast_top of the f every strategy predicts (default: the library's, 20; 0: "
                        "the pairwise f)")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--lr", type=float, default=1e-4)
    cache = Path(os.environ.get("INFUSION_LM_CACHE", Path.home() / ".cache" / "infusion_lm"))
    p.add_argument("--work_root", default=str(cache / "evals" / "lm_calibration"),
                   help="clean runs, factors, edits and retrains (outside the work tree, so a restart resumes)")
    p.add_argument("--results_dir", default=str(ROOT / "evals" / "results" / "lm_calibration"),
                   help="each finished run's JSON (commit these)")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_calibration.json"))
    p.add_argument("--note", default="", help="recorded in the JSON: e.g. what else shared the machine")
    args = p.parse_args()
    runs = [parse_run(r) for r in args.runs]
    # before any model loads: every run its own documents, and the f pinned to a number
    samples = document_samples(args.docs, len(runs), args.n_edits, args.doc_seed)
    check_disjoint(samples, args.runs)
    if args.contrast_top is None:
        from infusion_lm.text.config import DEFAULT_CONTRAST_TOP

        args.contrast_top = DEFAULT_CONTRAST_TOP
    if len(runs) < 2:
        print("one run only: the strategy is chosen on it and reported on nothing (goals undecided); give two or "
              "more --runs for an out-of-sample figure.", flush=True)

    from infusion_lm.atomic_io import write_json

    results = []
    for probe, target, _ in runs:  # every run's words checked before hours of work
        for w in (probe, target):
            if w not in ALL_WORDS:
                raise SystemExit(f"--runs: {w!r} is not one of the eval's words {ALL_WORDS}")
    from infusion_lm.atomic_io import read_json

    for (probe, target, seed), docs in zip(runs, samples):
        path = Path(args.results_dir) / f"{probe}_{target}_seed{seed}.json"
        old = read_json(path) if path.is_file() else {}
        # a run committed with the same f, documents and size is read back: its work folder may be on another machine
        if (old.get("measurement_f") == measurement_f(args.contrast_top) and old.get("documents_drawn") == docs
                and old.get("tokens") == args.tokens and old.get("docs") == args.docs):
            print(f"[{probe}->{target} seed {seed}] read back from {path}", flush=True)
            results.append(old)
            continue
        res = run_one(args, probe, target, seed, docs)
        write_json(path, res)
        results.append(res)

    chosen = choose(results[0]["strategies"])
    reported = [{"probe": r["probe"], "target": r["target"], "seed": r["seed"], **r["strategies"][chosen],
                 "heldout_corpus": r["strategies_vs_heldout_corpus_delta_f"][chosen]} for r in results[1:]]
    sel = results[0]
    goals = {"out-of-sample Spearman >= 0.7 on every reported run":
             all(r["spearman"] >= 0.7 for r in reported) if reported else None,
             "out-of-sample median actual/predicted within 2x on every reported run":
             all(0.5 <= r["median_actual_over_predicted"] <= 2.0 for r in reported) if reported else None}
    print(f"\nchosen on {sel['probe']}->{sel['target']} seed {sel['seed']}: {chosen} "
          f"(Spearman {sel['strategies'][chosen]['spearman']:+.3f})")
    for r in reported:
        print(f"  reported on {r['probe']}->{r['target']} seed {r['seed']}: Spearman {r['spearman']:+.3f}, median "
              f"actual/predicted {r['median_actual_over_predicted']:.3g}, signs {r['sign_agreement']:.0%}")
    for g, ok in goals.items():
        print(f"{'undecided' if ok is None else 'met ' if ok else 'MISSED'}  {g}")
    out = {"command": "python evals/lm_calibration.py " + " ".join(sys.argv[1:]), "note": args.note,
           "selected_on": {"probe": sel["probe"], "target": sel["target"], "seed": sel["seed"]},
           "reported_on": [{k: r[k] for k in ("probe", "target", "seed")} for r in reported],
           "measurement_f": measurement_f(args.contrast_top), "document_seed": args.doc_seed,
           "edited_documents": {f"{r['probe']}:{r['target']}:{r['seed']}": r["edited_documents"] for r in results},
           "chosen_strategy": chosen, "selection": sel["strategies"], "reported": reported, "goals": goals,
           "predictions_are_of": "the measurement set's Δf (the texts v was built from); the held-out corpus's Δf "
                                 "is compared separately, under heldout_corpus",
           "edits_made_by": "random fluent swaps and the target word at random places: no v chose them",
           "runs": [{k: v for k, v in r.items() if k != "edits"} for r in results]}
    write_json(Path(args.out), out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
