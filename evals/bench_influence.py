"""Benchmark the influence engine on SmolLM2-135M-Instruct: 64 documents × 64 tokens, one run, side by side.

1. Fit and score through infusion_lm's API against calling kronfluence directly with the same arguments (same Task,
   same FactorArguments/ScoreArguments, same batch size). Each measurement runs in its own child process so its peak
   RSS is its own; the variants alternate, so drift on this noisy machine hits both.
2. Forward-only J(z) for 32 documents against one autograd backward per document: the forward-mode JVP (exact) and
   the finite difference (two passes or a shared bottom, two step sizes).

Prints a table and writes JSON (default evals/results/bench_influence.json).

    python evals/bench_influence.py [--docs 64] [--tokens 64] [--layers 12 24] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_sample.jsonl"


def documents(tok, n_docs: int, n_tokens: int):
    """n_docs documents of exactly n_tokens tokens: real TinyStories where present, else a synthetic stand-in."""
    from infusion_lm.text.corpus import tokenize_documents

    if TINYSTORIES.is_file():
        texts = [json.loads(line)["text"] for line in TINYSTORIES.read_text().splitlines()]
        source = str(TINYSTORIES)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import toy_corpus

        texts = [" ".join(toy_corpus(6, seed=i)) for i in range(4 * n_docs)]
        source = "synthetic toy stories (../shared/data/tinystories not found)"
    ds = tokenize_documents(tok, [{"text": t} for t in texts], n_tokens, add_eos=False)
    keep = [i for i in range(len(ds)) if len(ds[i]["input_ids"]) == n_tokens][:n_docs]
    if len(keep) < n_docs:
        raise SystemExit(f"only {len(keep)} documents reach {n_tokens} tokens")
    return ds.select(keep), source


def setup(args):
    from infusion_lm.text.measurement import contrastive_measurement
    from infusion_lm.text.models import load_model
    from infusion_lm.tracked_modules import resolve_tracked_modules

    model, tok = load_model()
    ds, source = documents(tok, args.docs, args.tokens)
    meas = contrastive_measurement(tok, ["Tom had a little dog. The dog ran to the park and the dog was happy."], "dog", "cat")
    tracked = resolve_tracked_modules(model, layers=args.layers)
    return model, tok, ds, meas, tracked, source


def child(args) -> dict:
    """One measurement in a fresh process: prints wall seconds and this process's peak RSS."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from infusion_lm import influence as inf
    from infusion_lm.task import CausalLMTask

    model, tok, ds, meas, tracked, _ = setup(args)
    root = Path(args.root)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.child == "fit_ours":
        inf.fit_factors(model, ds, tracked, root / "ours", pad_token_id=tok.pad_token_id, strategy="ekfac",
                        batch_size=args.batch_size)
    elif args.child == "score_ours":
        inf.kronfluence_scores(model, ds, meas, tracked, root / "ours", pad_token_id=tok.pad_token_id,
                               strategy="ekfac", damping=None, batch_size=args.batch_size)
    else:
        task = CausalLMTask(tracked, meas)
        analyzer = Analyzer(analysis_name="factors", model=prepare_model(model, task), task=task,
                            output_dir=str(root / "direct"), cpu=True, disable_tqdm=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=inf._Collate(tok.pad_token_id)))
        if args.child == "fit_direct":
            analyzer.fit_all_factors(factors_name="ekfac", dataset=ds, per_device_batch_size=args.batch_size,
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        else:
            analyzer.compute_pairwise_scores(
                scores_name="infusion", factors_name="ekfac", query_dataset=list(meas.batches), train_dataset=ds,
                per_device_query_batch_size=1, per_device_train_batch_size=args.batch_size,
                score_args=ScoreArguments(damping_factor=None, aggregate_query_gradients=True),
                overwrite_output_dir=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_rss_mib": rss / 1024, "rss_growth_mib": (rss - rss0) / 1024}


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--root", args.root, "--docs", str(args.docs),
           "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--layers", *map(str, args.layers)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fd_vs_autograd(args) -> dict:
    """J for 32 documents: per-document autograd (the reference), the two-pass finite difference, and the shared-bottom
    finite difference (the layers below the lowest tracked one run once), at two step sizes; time and error."""
    import torch

    from infusion_lm import influence as inf

    model, tok, ds, meas, tracked, source = setup(args)
    v = inf.precondition(inf.measurement_gradients(model, meas, tracked), *inf.load_factors(
        inf.factors_dir(Path(args.root) / "ours", "ekfac")), damping=None)
    sub = ds.select(range(32))
    t0 = time.perf_counter()
    exact = inf.autograd_scores(model, sub, v, pad_token_id=tok.pad_token_id)
    t_auto = time.perf_counter() - t0
    out = {"docs": 32, "autograd_s": t_auto, "source": source, "variants": {}}
    from infusion_lm.forward_mode_j import ForwardModeJ

    def measure(name, J):
        t0 = time.perf_counter()
        got = J.dataset(sub, tok.pad_token_id, batch_size=16).double()
        wall = time.perf_counter() - t0
        per_doc = ((got - exact).abs() / exact.abs()).numpy()
        out["variants"][name] = {
            "wall_s": wall, "speedup_vs_autograd": t_auto / wall,
            "max_rel_err_vs_max": float((got - exact).abs().max() / exact.abs().max()),
            "median_rel_err_per_doc": float(torch.tensor(per_doc).median()),
            "p90_rel_err_per_doc": float(torch.tensor(per_doc).quantile(0.9))}

    measure("forward_mode", ForwardModeJ(model, v))
    for shared in (False, True):
        for eps_rel in (1e-4, 1e-3):
            measure(f"{'shared' if shared else 'two_pass'}_eps{eps_rel:g}",
                    inf.FiniteDifferenceJ(model, v, eps_rel=eps_rel, shared_bottom=shared))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_influence.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--j_only", action="store_true", help="fit our factors once and measure only the forward-only J")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as root:
        args.root = root
        rows = {}
        for name in (("fit_ours",) if args.j_only else ("fit_ours", "fit_direct", "score_ours", "score_direct")):
            rows[name] = run_child(name, args)
            print(f"{name:<14} {rows[name]['wall_s']:8.1f} s  peak RSS {rows[name]['peak_rss_mib']:8.0f} MiB", flush=True)
        fd = fd_vs_autograd(args)
    if args.j_only:
        print(f"{'J for 32 docs':<28}{'s':>8}{'vs autograd':>13}{'max err/max|J|':>16}{'median err':>12}{'p90 err':>10}")
        print(f"{'autograd':<28}{fd['autograd_s']:>8.1f}{1.0:>12.2f}x")
        for k, r in fd["variants"].items():
            print(f"{k:<28}{r['wall_s']:>8.1f}{r['speedup_vs_autograd']:>12.2f}x{r['max_rel_err_vs_max']:>16.1e}"
                  f"{r['median_rel_err_per_doc']:>12.1e}{r['p90_rel_err_per_doc']:>10.1e}")
        out = Path(args.out).with_name("bench_forward_only_J.json")
        out.write_text(json.dumps({"command": "python evals/bench_influence.py --j_only", "docs": args.docs,
                                   "tokens": args.tokens, "layers": args.layers, **fd}, indent=2) + "\n")
        print(f"\nwrote {out}")
        return
    result = {
        "model": "SmolLM2-135M-Instruct (offline GGUF, fp32, CPU)", "docs": args.docs, "tokens": args.tokens,
        "layers": args.layers, "source": fd.pop("source"), "runs": rows,
        "fit_wall_ratio": rows["fit_ours"]["wall_s"] / rows["fit_direct"]["wall_s"],
        "fit_peak_rss_ratio": rows["fit_ours"]["peak_rss_mib"] / rows["fit_direct"]["peak_rss_mib"],
        "score_wall_ratio": rows["score_ours"]["wall_s"] / rows["score_direct"]["wall_s"],
        "score_peak_rss_ratio": rows["score_ours"]["peak_rss_mib"] / rows["score_direct"]["peak_rss_mib"],
        "forward_only_J": fd,
    }
    print()
    print(f"{'measure':<34}{'infusion_lm':>14}{'kronfluence':>14}{'ratio':>8}  goal")
    for stage in ("fit", "score"):
        o, d = rows[f"{stage}_ours"], rows[f"{stage}_direct"]
        print(f"{stage + ' wall (s)':<34}{o['wall_s']:>14.1f}{d['wall_s']:>14.1f}{o['wall_s'] / d['wall_s']:>8.2f}  <= 1.10")
        print(f"{stage + ' peak RSS (MiB)':<34}{o['peak_rss_mib']:>14.0f}{d['peak_rss_mib']:>14.0f}"
              f"{o['peak_rss_mib'] / d['peak_rss_mib']:>8.2f}  <= 1.10")
    best = fd["variants"]["forward_mode"]
    print(f"{'J for 32 docs (s): fwd-only | autograd':<34}{best['wall_s']:>14.1f}{fd['autograd_s']:>14.1f}"
          f"{best['speedup_vs_autograd']:>8.2f}x >= 2x   (median err per doc {best['median_rel_err_per_doc']:.1e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
