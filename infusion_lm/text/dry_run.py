"""The text modality's ``--dry-run`` costs, in token-passes (one token through one forward pass; a backward counts
as two), per stage, from the corpus's real token counts (or the synthesis settings), without loading the model's
weights. Time is estimated from the rate measured for SmolLM2-135M on 2 CPU cores, scaled by the model's size."""

from __future__ import annotations

from typing import Dict

RATE_135M = 500.0  # token-passes per second, SmolLM2-135M, fp32, 2 CPU cores (forward 32 × 64 tokens ≈ 4 s)


def approx_params(config) -> float:
    d = getattr(config, "hidden_size", 576)
    layers = getattr(config, "num_hidden_layers", 30)
    inter = getattr(config, "intermediate_size", 4 * d)
    vocab = getattr(config, "vocab_size", 49152)
    return layers * (4 * d * d + 3 * d * inter) + vocab * d


def text_costs(pipe) -> Dict:
    from transformers import AutoConfig, AutoTokenizer

    from .corpus import tokenize_document
    from .models import resolve_model_source

    r, rec = pipe.recipe.run, pipe.recipe
    source, _ = resolve_model_source(r.model)
    config = AutoConfig.from_pretrained(source, trust_remote_code=r.trust_remote_code)
    if pipe.synthetic:
        n = rec.synthesize.n_docs
        tokens = [min(r.max_length, rec.synthesize.max_new_tokens + 32)] * n
    else:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=r.trust_remote_code)
        tokens = [len(tokenize_document(tok, d, r.max_length, r.add_eos)["input_ids"]) for d in pipe.documents]
        n = len(tokens)
    N = sum(tokens)
    T = N / max(n, 1)
    k, e, t = rec.select.k, rec.edit, rec.retrain
    per_doc_edit = {
        "swap": e.steps * (e.n_candidates * 2 * T * (0.6 if e.prefix_cache else 1.0) + 6 * T),
        "simplex_pgd": e.steps * 6 * T + (e.steps // e.eval_every + 1) * 2 * T,
        "random": 2 * T,
    }
    swap_step = e.n_candidates * 2 * T * (0.6 if e.prefix_cache else 1.0) + 6 * T
    tried = min(rec.select.pool or n, n) if rec.select.rank_by == "first_step" else 0  # one swap step per document
    edits = k * per_doc_edit[e.editor] + sum(k * per_doc_edit[a] for a in t.arms if a in ("random", "simplex_pgd"))
    epochs_per_arm = t.epochs if (t.from_scratch or t.epochs == 1) else 1
    clean = 0 if (t.from_scratch or t.epochs == 1 or t.checkpoint) else (t.epochs - 1) * 3 * N
    cost = {
        "synthesize": n * (rec.synthesize.max_new_tokens + 32) if pipe.synthetic else 0,
        "fit": 6 * N, "measure": 100, "score": 3 * N, "select": tried * swap_step, "edit": edits,
        # every arm, control included, is retrained once per seed
        "retrain": clean + len(t.arms) * max(len(t.seeds), 1) * epochs_per_arm * 3 * N, "evaluate": N,
    }
    if "tracked" not in pipe.__dict__:  # stage fingerprints need module names only: a weightless model on `meta`
        import torch
        from transformers import AutoModelForCausalLM

        from ..tracked_modules import resolve_tracked_modules

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=r.trust_remote_code)
        i = rec.influence
        pipe.__dict__["tracked"] = resolve_tracked_modules(skeleton, i.tracked_modules, i.layers, i.module_types)
    return {"source": source, "documents": n, "tokens": N, "unit": "token-passes", "cost": cost,
            "seconds_per_pass": approx_params(config) / 135e6 / RATE_135M}
