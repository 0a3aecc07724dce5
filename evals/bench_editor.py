"""Benchmark the token editors on SmolLM2-135M-Instruct: 8 documents × 64 tokens, one run, side by side.

Setup: EK-FAC on 64 TinyStories documents × 64 tokens (layers 12 and 24, MLP and attention), the contrastive
measurement dog→cat, v, forward-only J for all 64, and the 8 with the most negative J.

1. Candidate throughput: J of the 32 candidates one swap-editor step draws for one document (8 positions × 4 tokens),
   forward-only on the prefix cache, forward-only as one full batch, and one autograd backward per candidate
   (⟨∇L(z'), v⟩), with the relative error against autograd.
2. The three editors at the same budget (``--budget`` of each document's editable tokens) and seed: per-document
   edit time, J reduction per changed token, and the perplexity of the edited documents under the base model relative
   to their originals (median).

Prints a table and writes JSON (default evals/results/bench_editor.json).

    python evals/bench_editor.py [--docs 8] [--tokens 64] [--steps 12] [--budget 0.08] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_influence import ROOT, documents  # noqa: E402  (also sets HF_HUB_OFFLINE and TQDM_DISABLE)


def candidate_throughput(model, tok, v, row, n: int = 32, seed: int = 0) -> dict:
    from infusion_lm import influence as inf
    from infusion_lm.text.config import EditArguments
    from infusion_lm.text.editors import SwapEditor

    ed = SwapEditor(model, tok, v, EditArguments(seed=seed, n_candidates=n, max_perplexity_ratio=None))
    st = ed.prepare([row])[0]
    delta = ed.predicted_delta_batch([st.ids], [st.labels])[0]
    cands = ed._candidates(st, delta)  # what the editor scores in one step: groups sharing a swap position
    n = len(cands)
    labels = [st.labels_for(c) for c in cands]
    ed.exact_J(cands[:2], labels[:2])  # warm-up
    t0 = time.perf_counter()
    fwd = ed.exact_J(cands, labels)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = ed.variants_J(st, cands, labels)[0]
    t_pre = time.perf_counter() - t0
    import datasets

    ds = datasets.Dataset.from_list([{"input_ids": c.tolist(), "labels": l.tolist()} for c, l in zip(cands, labels)])
    t0 = time.perf_counter()
    auto = inf.autograd_scores(model, ds, v, pad_token_id=tok.pad_token_id)  # one backward per candidate
    t_auto = time.perf_counter() - t0
    def rel(a):
        return float(((a - auto.double()).abs() / auto.double().abs().clamp(min=1e-12)).median())

    return {"candidates": n, "tokens": len(st.ids0), "forward_only_s": t_fwd, "prefix_cache_s": t_pre,
            "autograd_s": t_auto, "forward_only_per_s": n / t_fwd, "prefix_cache_per_s": n / t_pre,
            "autograd_per_s": n / t_auto, "speedup_forward_only": t_auto / t_fwd, "speedup_prefix_cache": t_auto / t_pre,
            "median_rel_err_forward_only": rel(fwd), "median_rel_err_prefix_cache": rel(pre)}


def pruning_recall(model, tok, v, rows, n: int = 16, pool: int = 4, seed: int = 0) -> dict:
    """Probe sampling: draw pool × n candidates, keep the n best by the first-order ΔJ, score those exactly. Recall:
    the share of the pool's exact top-4 (and of its exact best) that the first-order ranking keeps, per document.
    Speed: pool candidates per second of the first-order pass plus the exact scoring of the kept n."""
    import torch

    from infusion_lm.text.config import EditArguments
    from infusion_lm.text.editors import SwapEditor

    ed = SwapEditor(model, tok, v, EditArguments(seed=seed, n_candidates=n * pool, max_perplexity_ratio=None))
    top4, best, kept_frac, t_exact = [], [], [], 0.0
    for row in rows:
        st = ed.prepare([row])[0]
        t_first = time.perf_counter()  # the first-order pass is part of the pruned scoring's cost
        delta = ed.predicted_delta_batch([st.ids], [st.labels])[0]
        cands = ed._candidates(st, delta)
        if len(cands) <= n:
            continue
        pred = torch.stack([delta[(c != st.ids).nonzero().flatten(), c[c != st.ids]].sum() for c in cands]).cpu()
        t_first = time.perf_counter() - t_first
        exact = ed.variants_J(st, cands, [st.labels_for(c) for c in cands])[0]
        kept = set(torch.argsort(pred, stable=True)[:n].tolist())
        ex_order = torch.argsort(exact).tolist()
        top4.append(len(kept & set(ex_order[:4])) / 4)
        best.append(float(ex_order[0] in kept))
        t0 = time.perf_counter()
        ed.variants_J(st, [cands[i] for i in kept], [st.labels_for(cands[i]) for i in kept])
        t_exact += time.perf_counter() - t0 + t_first
        kept_frac.append(len(kept) / len(cands))
    return {"n_exact": n, "pool": n * pool, "documents": len(top4), "recall_top4": statistics.mean(top4),
            "recall_best": statistics.mean(best), "chance_recall": statistics.mean(kept_frac),
            "pool_candidates_per_s": n * pool * len(top4) / t_exact}


def run_editor(name, model, tok, v, rows, args) -> dict:
    from infusion_lm.text.config import EditArguments
    from infusion_lm.text.editors import build_editor
    from infusion_lm.causal_lm import perplexities

    pool = 1
    if name.startswith("swap_pool"):
        name, pool = "swap", int(name[len("swap_pool"):])
    eargs = EditArguments(editor=name, budget_fraction=args.budget, steps=args.steps, n_candidates=args.candidates,
                          eval_every=max(1, args.steps // 4), seed=0, doc_batch_size=len(rows), candidate_pool=pool)
    ed = build_editor(model, tok, v, eargs)
    t0 = time.perf_counter()
    res = ed.edit_many(rows)
    wall = time.perf_counter() - t0
    after = [{"input_ids": r.input_ids, "labels": r.labels} for r in res]
    ppl0 = perplexities(model, rows, tok.pad_token_id)
    ppl1 = perplexities(model, after, tok.pad_token_id)
    changed = sum(r.n_changed for r in res)
    drop = sum(r.J_before - r.J_after for r in res)
    return {
        "editor": name, "wall_s": wall, "per_doc_s": wall / len(rows), "tokens_changed": changed,
        "budget_tokens": sum(r.budget for r in res), "J_drop_total": drop,
        "J_drop_per_token": drop / changed if changed else 0.0,
        "docs_improved": sum(r.J_after < r.J_before for r in res),
        "ppl_ratio_median": statistics.median(b / a for a, b in zip(ppl0, ppl1)),
        "ppl_ratio_max": max(b / a for a, b in zip(ppl0, ppl1)),
        "per_doc": [{"J_before": r.J_before, "J_after": r.J_after, "n_changed": r.n_changed, "budget": r.budget,
                     "text": tok.decode(r.input_ids, skip_special_tokens=True)} for r in res],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--pool", type=int, default=64, help="documents scored to choose the edited ones")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--budget", type=float, default=0.08)
    p.add_argument("--editors", nargs="*", default=["swap", "swap_pool4", "simplex_pgd", "random"],
                   help="swap_poolN: the swap editor with candidate_pool N (probe sampling); none: throughput and "
                        "pruning only")
    p.add_argument("--probe_pool", type=int, default=8,
                   help="pruning: draw this many × --candidates swaps and keep --candidates by the first-order ΔJ "
                        "(edit.candidate_pool; 8 is the library default)")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_editor.json"))
    args = p.parse_args()

    import torch

    from infusion_lm import influence as inf
    from infusion_lm.text.measurement import contrastive_measurement
    from infusion_lm.text.models import load_model
    from infusion_lm.tracked_modules import resolve_tracked_modules

    torch.manual_seed(0)
    model, tok = load_model()
    ds, source = documents(tok, args.pool, args.tokens)
    meas = contrastive_measurement(tok, ["Tom had a little dog. The dog ran to the park and the dog was happy."], "dog", "cat")
    tracked = resolve_tracked_modules(model, layers=args.layers)
    t0 = time.perf_counter()
    fdir = inf.fit_factors(model, ds, tracked, tempfile.mkdtemp(), pad_token_id=tok.pad_token_id, strategy="ekfac")
    v = inf.compute_ihvp(model, meas, tracked, fdir, damping=None)
    J = inf.FiniteDifferenceJ(model, v).dataset(ds, tok.pad_token_id)
    setup_s = time.perf_counter() - t0
    chosen = torch.argsort(J)[: args.docs].tolist()
    rows = [ds[i] for i in chosen]
    print(f"setup (fit + v + J of {args.pool}) {setup_s:.0f} s; editing documents {chosen}", flush=True)

    thr = candidate_throughput(model, tok, v, rows[0])
    print(f"throughput: prefix cache {thr['prefix_cache_per_s']:.2f}, full forward {thr['forward_only_per_s']:.2f}, "
          f"autograd {thr['autograd_per_s']:.2f} candidates/s", flush=True)
    prune = pruning_recall(model, tok, v, rows, n=args.candidates, pool=args.probe_pool)
    print(f"pruning: recall of the exact top-4 {prune['recall_top4']:.2f}, of the best {prune['recall_best']:.2f} "
          f"(chance {prune['chance_recall']:.2f}); {prune['pool_candidates_per_s']:.1f} pool candidates/s", flush=True)
    editors = {}
    for name in args.editors:
        editors[name] = run_editor(name, model, tok, v, rows, args)
        e = editors[name]
        print(f"{name}: {e['per_doc_s']:.1f} s/doc, {e['tokens_changed']}/{e['budget_tokens']} tokens, "
              f"ΔJ/token {e['J_drop_per_token']:.1f}, ppl ratio {e['ppl_ratio_median']:.3f}", flush=True)

    print()
    print(f"{'measure':<44}{'value':>12}  goal")
    print(f"{'candidates/s forward-only, prefix cache':<44}{thr['prefix_cache_per_s']:>12.2f}")
    print(f"{'candidates/s forward-only, full batch':<44}{thr['forward_only_per_s']:>12.2f}")
    print(f"{'candidates/s per-candidate autograd':<44}{thr['autograd_per_s']:>12.2f}")
    print(f"{'speed-up, prefix cache':<44}{thr['speedup_prefix_cache']:>12.2f}  >= 3")
    print(f"{'speed-up, full batch':<44}{thr['speedup_forward_only']:>12.2f}")
    print(f"{'median rel. error vs autograd (prefix cache)':<44}{thr['median_rel_err_prefix_cache']:>12.1e}")
    print(f"{f'pool candidates/s with probe sampling ({args.probe_pool}x)':<44}{prune['pool_candidates_per_s']:>12.2f}")
    print(f"{'  speed-up vs autograd':<44}{prune['pool_candidates_per_s'] / thr['autograd_per_s']:>12.2f}  >= 3")
    print(f"{'  recall of the exact top-4 | best':<44}{prune['recall_top4']:>6.2f} | {prune['recall_best']:.2f}"
          f"  (chance {prune['chance_recall']:.2f})")
    print()
    print(f"{'editor':<14}{'s/doc':>8}{'changed':>9}{'improved':>10}{'J drop/token':>14}{'ppl ratio (med)':>17}")
    for name, e in editors.items():
        print(f"{name:<14}{e['per_doc_s']:>8.1f}{e['tokens_changed']:>5}/{e['budget_tokens']:<3}"
              f"{e['docs_improved']:>7}/{len(rows):<2}{e['J_drop_per_token']:>14.1f}{e['ppl_ratio_median']:>17.3f}")
    print("goal: swap perplexity ratio <= 1.3")
    result = {"command": "python evals/bench_editor.py " + " ".join(sys.argv[1:]), "model": "SmolLM2-135M-Instruct", "source": source, "docs": args.docs, "tokens": args.tokens,
              "layers": args.layers, "steps": args.steps, "candidates": args.candidates, "budget": args.budget,
              "setup_s": setup_s, "chosen": chosen, "throughput": thr, "pruning": prune, "editors": editors,
              "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
