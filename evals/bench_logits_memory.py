"""What the editor's exact scoring holds in logits, with the output layer applied a few rows at a time
(``finite_difference_j.HeadCapture``) against the whole [B, T, V] logits, side by side in one run.

SmolLM2-135M-Instruct (V = 49,152), a random v over layers 12 and 24 (MLP and attention; memory and time do not
depend on v's values), TinyStories documents of ``--tokens`` tokens. Each mode and part runs in its own process
(memory a part freed stays resident and would hide the next part's peak), with the peak RSS (VmHWM) reset after the
model is loaded, on:

1. ``full batch``: J and the loss of ``--rows`` documents in one batch (the editor's ``exact``, as in ``prepare``);
2. ``prefix cache``: J of ``--rows`` variants of one document that first differ at position 8 (the swap editor's
   candidate scoring: the suffix rerun on the document's KV cache);
3. ``swap editor``: the swap editor on 4 documents for ``--steps`` steps.

Prints a table and writes JSON (default evals/results/bench_logits_memory.json) with the largest J difference
between the two modes.

    python evals/bench_logits_memory.py [--tokens 128] [--rows 32] [--steps 2] [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_sample.jsonl"
PARTS = ("full batch", "prefix cache", "swap editor")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def child(a) -> dict:
    """One mode's measurements, in this process."""
    import torch

    from infusion_lm import finite_difference_j as fdj
    from infusion_lm.param_layout import module_params, to_layout
    from infusion_lm.text.config import EditArguments
    from infusion_lm.text.corpus import tokenize_documents
    from infusion_lm.text.editors import SwapEditor
    from infusion_lm.text.models import load_model
    from infusion_lm.tracked_modules import resolve_tracked_modules

    torch.set_num_threads(a.threads)
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    model.eval()
    texts = [json.loads(x)["text"] for x in TINYSTORIES.read_text().splitlines()[:64]]
    ds = tokenize_documents(tok, [{"text": t} for t in texts], a.tokens)
    rows = [ds[i] for i in range(len(ds)) if len(ds[i]["input_ids"]) == a.tokens][: max(a.rows, 4)]
    tracked = resolve_tracked_modules(model, None, [12, 24], ["mlp", "attn"])
    g = torch.Generator().manual_seed(0)
    v = {}
    for name in tracked:
        w, b = module_params(model, name)
        v[name] = to_layout(torch.randn(w.shape, generator=g) * 1e-3, None if b is None else torch.zeros_like(b))
    J = fdj.FiniteDifferenceJ(model, v)
    J._head.usable = J._head.usable and a.mode == "chunked"
    out = {"mode": a.mode, "head_capture": J._head.usable, "rss_after_loading_mb": _rss_mb("VmRSS")}
    from infusion_lm.causal_lm import CausalLMCollator

    def measure(name, fn):
        _reset_peak()
        before = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        value = fn()
        out[name] = {"seconds": time.perf_counter() - t0, "peak_above_before_mb": _rss_mb("VmHWM") - before}
        return value

    if a.part == "full batch":
        batch = CausalLMCollator(tok.pad_token_id)(rows[: a.rows])
        out["J"] = measure(a.part, lambda: J.with_loss(batch))[0].tolist()
    elif a.part == "prefix cache":
        ids = torch.tensor(rows[0]["input_ids"])
        variants = ids.repeat(a.rows, 1)
        variants[:, 8] = torch.randint(1000, 2000, (a.rows,), generator=g)
        out["J"] = measure(a.part, lambda: J.variants_with_loss(ids, ids.clone(), variants, variants.clone()))[0].tolist()
    else:
        args = EditArguments(steps=a.steps, seed=0, max_perplexity_ratio=None)

        def edit():
            ed = SwapEditor(model, tok, v, args)
            ed.J._head.usable = ed.J._head.usable and a.mode == "chunked"
            return ed.edit_many(rows[:4])

        out["J"] = [r.J_after for r in measure(a.part, edit)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["chunked", "whole"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_logits_memory.json"))
    p.add_argument("--note", default="")
    a = p.parse_args()
    if a.mode:  # a child: one mode, its figures as the last line
        print(json.dumps(child(a)))
        return
    results = {"whole": {}, "chunked": {}}
    for part in PARTS:
        for mode in ("whole", "chunked"):
            cmd = [sys.executable, __file__, "--mode", mode, "--part", part, "--tokens", str(a.tokens), "--rows",
                   str(a.rows), "--steps", str(a.steps), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            one = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode][part] = {**one[part], "J": one["J"], "rss_after_loading_mb": one["rss_after_loading_mb"],
                                   "head_capture": one["head_capture"]}
    w, c = results["whole"], results["chunked"]
    rel = lambda x, y: max(abs(p - q) / max(abs(q), 1e-12) for p, q in zip(x, y))
    out = {"command": "python evals/bench_logits_memory.py " + " ".join(sys.argv[1:]), "tokens": a.tokens,
           "rows": a.rows, "steps": a.steps, "threads": a.threads, "note": a.note, "modes": results,
           "J_max_relative_difference": {part: rel(c[part]["J"], w[part]["J"]) for part in PARTS},
           "ratios_whole_over_chunked": {part: {"peak": w[part]["peak_above_before_mb"] / max(c[part]["peak_above_before_mb"], 1e-9),
                                                "seconds": w[part]["seconds"] / c[part]["seconds"]} for part in PARTS}}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{'part':<14}{'whole: peak MB':>15}{'s':>7}{'chunked: peak MB':>18}{'s':>7}{'J rel. diff':>13}")
    for part in PARTS:
        print(f"{part:<14}{w[part]['peak_above_before_mb']:>15.0f}{w[part]['seconds']:>7.1f}"
              f"{c[part]['peak_above_before_mb']:>18.0f}{c[part]['seconds']:>7.1f}"
              f"{out['J_max_relative_difference'][part]:>13.1e}")


if __name__ == "__main__":
    main()
