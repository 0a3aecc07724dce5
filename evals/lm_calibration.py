"""Calibration: which v predicts what retraining actually does? Single-document edits, each retrained alone.

Setup: the TinyStories protocol of evals/lm_tinystories.py (SmolLM2-135M-Instruct, the first ``--docs`` stories ×
``--tokens`` tokens, 2 epochs, θ̂ = the clean checkpoint at the start of epoch 2, one probe → target pair).

1. ``--n_edits`` single-document edits: a third swap-edited against the EK-FAC v (the most negative documents under
   it), a third swap-edited against the optimizer v (the most negative under it, not yet used), a third random fluent
   swaps (the same budget and perplexity limit) of random documents. Varied edits, so the calibration is not tuned to
   one v.
2. Each edit is retrained alone: epoch 2 from the checkpoint with one document replaced, same seed and data order as
   control, so actual Δf = f(edited run) − f(control) is deterministic. f is the measurement v was built from.
3. Each strategy predicts every edit's Δf from its own v: −(J(z') − J(z)) / n for the factors' v (EK-FAC with the
   heuristic damping × 1, 10, 100, 1000; identity, v = ∇f, the λ → ∞ direction), −(J(z') − J(z)) for the optimizer's
   (over ``--layers``; over every decoder layer, ``optimizer_all_layers``; and over those plus the embeddings,
   ``optimizer_all_params``).
4. Per strategy: Spearman(predicted, actual), the median actual / predicted ratio, and the fraction of signs right.
   J(z) for the predictions is exact (forward-mode, ``infusion_lm.forward_mode_j``).

    python evals/lm_calibration.py [--probe dog --target bear] [--n_edits 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", default="dog")
    p.add_argument("--target", default="bear")
    p.add_argument("--n_edits", type=int, default=30)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "lm_ts_work"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_calibration.json"))
    args = p.parse_args()

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    import lm_tinystories as ts
    from infusion_lm import influence as inf
    from infusion_lm.config import load_recipe
    from infusion_lm.text.editors import RandomEditor, SwapEditor
    from infusion_lm.text.measurement import build_measurement
    from infusion_lm.optimizer_influence import optimizer_ihvp
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.retrain import train_arm
    from infusion_lm.atomic_io import read_json, write_json
    from infusion_lm.tracked_modules import resolve_tracked_modules

    ns = argparse.Namespace(docs=args.docs, tokens=args.tokens, out_dir=str(ROOT / "runs" / "lm_calibration"),
                            work_dir=args.work_dir, heldout_positions=60, layers=args.layers, preconditioner="factors",
                            damping_scale=1.0, k=8, steps=8, arms=["control", "infused"], lr=args.lr,
                            seeds=[args.seed], all_words=["bear", "bird", "cat", "dog", "duck", "fish", "frog"])
    raw = ts.pair_recipe(ns, args.probe, args.target)
    pipe = Pipeline(load_recipe(raw=raw), progress=False)
    pipe.run("measure")  # factors at the clean checkpoint (cached in work_dir when lm_tinystories ran there)
    model, tok, tracked = pipe.model, pipe.tokenizer, pipe.tracked
    measurement = build_measurement(pipe.recipe.measurement, tok, pipe.recipe.run.max_length)
    n = len(pipe.dataset)
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
    vs["optimizer"], opt_info = optimizer_ihvp(model, measurement, tracked, rows, pipe.recipe.retrain, pad,
                                               pipe.checkpoint_step())
    opt_info.pop("stats")
    divisors["optimizer"] = 1
    # The same first-order model with every decoder layer's projections perturbed: retraining moves all of them, so
    # a v over two layers sees only part of the change it predicts.
    all_layers = resolve_tracked_modules(model)
    vs["optimizer_all_layers"], _ = optimizer_ihvp(model, measurement, all_layers, rows, pipe.recipe.retrain, pad,
                                                   pipe.checkpoint_step())
    divisors["optimizer_all_layers"] = 1
    # ... and with the (tied) input/output embeddings too: an edit that writes the target word moves its output row
    # directly. Diagonal, so the vocabulary-sized matrix costs one extra vector (kronfluence never tracks it).
    emb = model.get_input_embeddings()
    with_embeddings = all_layers + [n for n, m in model.named_modules()
                                    if m is emb or (m is model.get_output_embeddings() and m.weight is not emb.weight)]
    vs["optimizer_all_params"], _ = optimizer_ihvp(model, measurement, with_embeddings, rows, pipe.recipe.retrain, pad,
                                                   pipe.checkpoint_step())
    divisors["optimizer_all_params"] = 1
    print(f"v for {len(vs)} strategies: {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- the edits
    def J_all(v):
        return inf.FiniteDifferenceJ(model, v, eps_rel=1e-4).dataset(rows, pad, batch_size=8)

    per = max(1, args.n_edits // 3)
    J_ek, J_opt = J_all(vs["ekfac_heuristic_x1"]), J_all(vs["optimizer"])
    used: list = []
    groups = []
    for name, J in (("swap_ekfac", J_ek), ("swap_optimizer", J_opt)):
        idx = [int(i) for i in torch.argsort(J) if int(i) not in used][:per]
        used += idx
        groups.append((name, idx))
    rng = np.random.default_rng(args.seed)
    rest = [i for i in range(n) if i not in used]
    groups.append(("random", [int(i) for i in rng.choice(rest, size=args.n_edits - 2 * per, replace=False)]))
    edits = []
    edits_file = Path(ns.out_dir) / "edits.json"
    groups_key = [[name, idx] for name, idx in groups]
    if edits_file.is_file() and read_json(edits_file).get("groups") == groups_key:
        edits = read_json(edits_file)["edits"]  # the same selection as a finished run: its edits, not recomputed
        groups = []
    for name, idx in groups:
        v = vs["optimizer"] if name == "swap_optimizer" else vs["ekfac_heuristic_x1"]
        cls = RandomEditor if name == "random" else SwapEditor
        editor = cls(model, tok, v, pipe.recipe.edit, eps_rel=1e-4)
        for i, res in zip(idx, editor.edit_many([rows[i] for i in idx])):
            if res.n_changed:
                edits.append({"group": name, "doc_index": i, "input_ids": res.input_ids, "labels": res.labels,
                              "n_changed": res.n_changed})
    if groups:
        write_json(edits_file, {"groups": groups_key, "edits": edits})  # a rerun (e.g. a new strategy) reuses them
    print(f"{len(edits)} edits: {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- actual Δf: each edit retrained alone, same seed and order as control
    t = pipe.recipe.retrain
    ckpt = pipe.arm_checkpoint()
    device = str(next(model.parameters()).device)
    out_dir = Path(ns.out_dir)
    cache = out_dir / "actual.json"
    done = read_json(cache) if cache.is_file() else {}

    def f_after(replace):
        rows_arm = pipe.arm_rows(replace)
        m, _ = train_arm(pipe.arm_model, pipe.trainer_collator, rows_arm, t, out_dir / "trainer", args.seed, device,
                         False, ckpt)
        return measurement.value(m)

    key = lambda e: f"{e['doc_index']}:{e['group']}:{hash(tuple(e['input_ids'])) & 0xffffffff}"
    if "control" not in done:
        done["control"] = f_after({})
        write_json(cache, done)
    for e in edits:
        if key(e) not in done:
            done[key(e)] = f_after({e["doc_index"]: {"input_ids": e["input_ids"], "labels": e["labels"]}})
            write_json(cache, done)  # resumable: each finished retrain is kept
        e["actual_delta_f"] = done[key(e)] - done["control"]
    print(f"retrains: {time.perf_counter() - t0:.0f} s", flush=True)

    # ---- predictions and calibration
    edited_rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in edits]
    results = {}
    actual = np.array([e["actual_delta_f"] for e in edits])
    from infusion_lm.forward_mode_j import ForwardModeJ

    for name, v in vs.items():
        # Exact J (a Jacobian-vector product): ΔJ of a one-document edit is small beside J itself, so the finite
        # difference's ~1% error per document would blur the ranking.
        Jv = ForwardModeJ(model, v)
        before = Jv.dataset([rows[e["doc_index"]] for e in edits], pad, batch_size=8).numpy()
        after = Jv.dataset(edited_rows, pad, batch_size=8).numpy()
        pred = -(after - before) / divisors[name]
        for e, pv in zip(edits, pred):
            e.setdefault("predicted", {})[name] = float(pv)
        ratio = actual / pred
        results[name] = {"spearman": float(spearmanr(pred, actual).statistic),
                         "spearman_p": float(spearmanr(pred, actual).pvalue),
                         "median_actual_over_predicted": float(np.median(ratio)),
                         "sign_agreement": float(np.mean(np.sign(pred) == np.sign(actual)))}
    print()
    print(f"{'strategy':<22}{'Spearman':>10}{'p':>10}{'median actual/pred':>20}{'signs right':>13}")
    for name, r in results.items():
        print(f"{name:<22}{r['spearman']:>+10.3f}{r['spearman_p']:>10.2g}{r['median_actual_over_predicted']:>20.3g}"
              f"{r['sign_agreement']:>13.0%}")
    out = {"command": "python evals/lm_calibration.py " + " ".join(sys.argv[1:]), "probe": args.probe,
           "target": args.target, "n_edits": len(edits), "docs": n, "tokens": args.tokens,
           "optimizer_info": opt_info, "strategies": results,
           "edits": [{k: e[k] for k in ("group", "doc_index", "n_changed", "actual_delta_f", "predicted")}
                     for e in edits], "seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
