"""What the default text recipe would cost on a real corpus and one GPU: a projection from counted FLOPs.

1. FLOPs per token of one forward and one forward + backward pass, counted by torch's FlopCounterMode on a weightless
   copy of each model (``meta`` device, so nothing is loaded): SmolLM2-135M (the recipe's model, its own config) and
   a 1B-class model of the same family's layout (Llama-3.2-1B's shape: hidden 2048, 16 layers, 8 KV heads, MLP 8192,
   vocabulary 128,256).
2. Passes per stage, from the recipe's settings at the target size (the ``--dry-run`` cost model: fit = 2 forward +
   backward passes over the corpus (kronfluence's covariance and eigenvalue-correction passes), score = 1, every arm
   and seed one epoch, the swap editor's candidates as forward passes over one document each).
3. Seconds = FLOPs / (peak × utilisation), with the H200's published dense bf16 peak (989 TFLOP/s) and a stated
   utilisation per kind of pass. Checked against this machine: the same FLOP count, divided by the seconds each stage
   of `make run` took on 2 idle CPU cores (the pairwise run, README's figures), gives the CPU's effective rate per
   stage, which should be about the same for the stages that are all matrix products.

    python evals/project_cost.py [--docs 10000] [--tokens 512] [--k 100] [--seeds 3] [--out evals/results/cost_projection.json]
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
# `make run` on 2 idle CPU cores (README): 48 stories of about 96 tokens; seconds per stage
CPU_RUN = {"docs": 48, "tokens": 96, "k": 4, "arms": 4, "seeds": 3, "steps": 6, "n_candidates": 12,
           "seconds": {"fit": 54, "score": 15, "edit": 102, "retrain": 469}}


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


def stage_flops(per_token: dict, docs: int, tokens: int, k: int, arms: int, seeds: int, steps: int,
                n_candidates: int) -> dict:
    """FLOPs per stage (the --dry-run pass model; the editor's candidates are forward passes of one document)."""
    n_tok = docs * tokens
    fb, fwd = per_token["forward_backward"], per_token["forward"]
    return {
        "fit": 2 * fb * n_tok,  # covariance pass + eigenvalue-correction pass
        "score": fb * n_tok,  # one per-document gradient each, dotted with v
        "edit": k * steps * (n_candidates * fwd + fb) * tokens,  # per step: the candidates' forwards, one gradient
        "retrain": arms * seeds * fb * n_tok,  # one epoch per arm and seed
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10000)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", type=int, default=100, help="documents edited (1%% of 10,000)")
    p.add_argument("--arms", type=int, default=5, help="control, infused, random, random_target, insertion")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--n_candidates", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "cost_projection.json"))
    args = p.parse_args()

    from transformers import AutoConfig, LlamaConfig

    from infusion_lm.text.models import resolve_model_source

    smol = AutoConfig.from_pretrained(resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")[0])
    models = {"SmolLM2-135M": smol, "1B (Llama-3.2-1B shape)": LlamaConfig(**LLAMA_1B)}

    # the check on this machine: FLOPs of make run's stages against the seconds they took on 2 CPU cores
    c = CPU_RUN
    cpu_pt = flops_per_token(smol, c["tokens"])
    cpu_flops = stage_flops(cpu_pt, c["docs"], c["tokens"], c["k"], c["arms"], c["seeds"], c["steps"],
                            c["n_candidates"])
    cpu_rate = {s: cpu_flops[s] / c["seconds"][s] for s in c["seconds"]}

    out = {"command": "python evals/project_cost.py", "size": {"docs": args.docs, "tokens": args.tokens, "k": args.k,
                                                               "arms": args.arms, "seeds": args.seeds},
           "gpu": {"name": "H200 SXM", "bf16_dense_peak_flops": H200_BF16_DENSE, "utilisation": UTILISATION},
           "cpu_check": {"run": c, "flops": cpu_flops, "effective_flops_per_s": cpu_rate},
           "assumptions": [
               "bf16 on the GPU; kronfluence's eigendecompositions (2 layers' MLP and attention projections) and the "
               "data loading are left out (seconds, against minutes of passes)",
               "utilisation 35% for the batched fit, score and retrain passes, 10% for the editor's small candidate "
               "batches (one document, 12 candidates)",
               "fit = 2 forward+backward passes over the corpus, score = 1, retrain = 1 epoch per arm and seed, "
               "edit = k documents x steps x (12 candidate forwards + 1 gradient); synthesis and evaluation excluded",
               "FLOPs counted by torch.utils.flop_counter on the meta device (matrix products and attention; "
               "elementwise work not counted)"],
           "models": {}}
    print(f"CPU check (make run, 48 stories x ~96 tokens, 2 cores): effective GFLOP/s per stage "
          + ", ".join(f"{s} {r / 1e9:.0f}" for s, r in cpu_rate.items()))
    print(f"\nprojection: {args.docs} documents x {args.tokens} tokens, k {args.k}, {args.arms} arms x {args.seeds} "
          f"seeds, one H200 (bf16)")
    print(f"{'model':<26}{'params':>8}" + "".join(f"{s:>12}" for s in ("fit", "score", "edit", "retrain", "total")))
    for name, cfg in models.items():
        pt = flops_per_token(cfg, args.tokens)
        fl = stage_flops(pt, args.docs, args.tokens, args.k, args.arms, args.seeds, args.steps, args.n_candidates)
        secs = {s: f / (H200_BF16_DENSE * UTILISATION["editor" if s == "edit" else "batched"]) for s, f in fl.items()}
        secs["total"] = sum(secs.values())
        out["models"][name] = {"params": pt["params"], "flops_per_token": pt, "stage_flops": fl, "seconds": secs}
        print(f"{name:<26}{pt['params'] / 1e9:>7.2f}B" + "".join(f"{secs[s]:>11.0f}s" for s in
                                                                ("fit", "score", "edit", "retrain", "total")))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
