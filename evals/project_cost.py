"""What the default text recipe would cost on a real corpus and one GPU: a projection from counted FLOPs.

1. FLOPs per token of one forward and one forward + backward pass, counted by torch's FlopCounterMode on a weightless
   copy of each model (``meta`` device, so nothing is loaded): SmolLM2-135M (the recipe's model, its own config) and
   a 1B-class model of the same family's layout (Llama-3.2-1B's shape: hidden 2048, 16 layers, 8 KV heads, MLP 8192,
   vocabulary 128,256).
2. Token-passes per stage (one token through one forward; a backward counts two) from the library's own
   ``--dry-run`` cost model (``infusion_lm.text.dry_run``), run on the default recipe resized to the target corpus;
   FLOPs = token-passes × forward FLOPs per token.
3. Seconds = FLOPs / (peak × utilisation), with the H200's published dense bf16 peak (989 TFLOP/s) and a stated
   utilisation per kind of pass. Checked against this machine: the same FLOP count, divided by the seconds each stage
   of `make run` took on 2 idle CPU cores (the pairwise run, README's figures), gives the CPU's effective rate per
   stage, which should be about the same for the stages that are all matrix products.

    python evals/project_cost.py [--docs 10000] [--tokens 512] [--k 100] [--out evals/results/cost_projection.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

H200_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's published dense (no sparsity) bf16 tensor-core peak, H200 SXM
UTILISATION = {"batched": 0.35, "editor": 0.10}  # assumed: large batched passes; small candidate batches (latency)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
# `make run` on 2 idle CPU cores (README): the pairwise run, 4 arms x 3 seeds, candidate pool 1; seconds per stage
CPU_RUN = {"overrides": ["retrain.arms=[control,infused,random,insertion]", "edit.candidate_pool=1",
                         "measurement.contrast_top=0"],
           "seconds": {"fit": 54, "score": 15, "edit": 102, "retrain": 469}}
STAGES = ("fit", "measure", "score", "select", "edit", "retrain", "evaluate")  # synthesis aside: users bring data
BATCHED = {"select": "editor", "edit": "editor"}  # the rest are large batched passes


def flops_per_token(config, tokens: int) -> dict:
    """Forward and forward + backward FLOPs per token at this sequence length (one sequence, batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids).logits.sum()
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids).logits.float().sum().backward()
    n_params = sum(p.numel() for p in model.parameters())
    return {"forward": fwd / tokens, "forward_backward": fc.get_total_flops() / tokens, "params": n_params}


def token_passes(overrides) -> dict:
    """Token-passes per stage of recipes/smollm2_default.yaml with these overrides, from --dry-run's cost model."""
    import tempfile

    from infusion_lm.config import load_recipe
    from infusion_lm.dry_run import plan
    from infusion_lm.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as out:  # the plan writes nothing; the folder only has to be new
        rec = load_recipe(str(ROOT / "recipes" / "smollm2_default.yaml"), list(overrides) + [f"output_dir={out}/run"])
        return {r["stage"]: r["token_passes"] for r in plan(Pipeline(rec, progress=False))["stages"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10000)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", type=int, default=100, help="documents edited (1%% of 10,000)")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "cost_projection.json"))
    args = p.parse_args()

    from transformers import AutoConfig, LlamaConfig

    from infusion_lm.text.models import resolve_model_source

    smol = AutoConfig.from_pretrained(resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")[0])
    models = {"SmolLM2-135M": smol, "1B (Llama-3.2-1B shape)": LlamaConfig(**LLAMA_1B)}

    # the check on this machine: FLOPs of make run's stages against the seconds they took on 2 CPU cores
    cpu_passes = token_passes(CPU_RUN["overrides"])
    cpu_fwd = flops_per_token(smol, 96)["forward"]  # 48 stories of about 96 tokens
    cpu_flops = {s: cpu_passes[s] * cpu_fwd for s in CPU_RUN["seconds"]}
    cpu_rate = {s: cpu_flops[s] / t for s, t in CPU_RUN["seconds"].items()}
    # the target size: the default recipe (5 arms x 3 seeds) on docs x tokens, k edited
    size = [f"synthesize.n_docs={args.docs}", f"max_length={args.tokens}",
            f"synthesize.max_new_tokens={args.tokens - 32}", f"select.k={args.k}"]
    passes = {s: n for s, n in token_passes(size).items() if s in STAGES}

    out = {"command": "python evals/project_cost.py", "size": {"docs": args.docs, "tokens": args.tokens, "k": args.k,
                                                               "recipe": "recipes/smollm2_default.yaml"},
           "token_passes": passes,
           "gpu": {"name": "H200 SXM", "bf16_dense_peak_flops": H200_BF16_DENSE, "utilisation": UTILISATION},
           "cpu_check": {"run": CPU_RUN, "flops": cpu_flops, "effective_flops_per_s": cpu_rate},
           "assumptions": [
               "bf16 on the GPU; kronfluence's eigendecompositions (2 layers' MLP and attention projections) and the "
               "data loading are left out (seconds, against minutes of passes)",
               "utilisation 35% for the batched fit, score and retrain passes, 10% for the editor's small candidate "
               "batches (one document, 12 candidates)",
               "token-passes per stage from --dry-run's cost model (infusion_lm/text/dry_run.py) on the default recipe "
               "resized; FLOPs = token-passes x forward FLOPs per token; synthesis excluded",
               "FLOPs counted by torch.utils.flop_counter on the meta device (matrix products and attention; "
               "elementwise work not counted)"],
           "models": {}}
    print("CPU check (make run, 48 stories x ~96 tokens, 2 cores): effective GFLOP/s per stage "
          + ", ".join(f"{s} {r / 1e9:.0f}" for s, r in cpu_rate.items()))
    print(f"\nprojection: {args.docs} documents x {args.tokens} tokens, k {args.k}, the default recipe's 5 arms x 3 "
          f"seeds, one H200 (bf16)")
    shown = ("fit", "score", "edit", "retrain", "total")
    print(f"{'model':<26}{'params':>8}" + "".join(f"{s:>12}" for s in shown))
    for name, cfg in models.items():
        pt = flops_per_token(cfg, args.tokens)
        fl = {s: n * pt["forward"] for s, n in passes.items()}
        secs = {s: f / (H200_BF16_DENSE * UTILISATION[BATCHED.get(s, "batched")]) for s, f in fl.items()}
        secs["total"] = sum(secs.values())
        out["models"][name] = {"params": pt["params"], "flops_per_token": pt, "stage_flops": fl, "seconds": secs}
        print(f"{name:<26}{pt['params'] / 1e9:>7.2f}B" + "".join(f"{secs[s]:>11.0f}s" for s in shown))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
