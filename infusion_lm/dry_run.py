"""``--dry-run``: the resolved plan of a recipe and an estimate of its cost, without loading the model's weights.

Cost is counted in token-passes (one token through one forward pass; a backward counts as two), per stage, from the
corpus's real token counts (or the synthesis settings). Time is estimated from the rate measured here for
SmolLM2-135M on 2 CPU cores, about 500 token-passes per second, scaled by the model's size; a GPU is far faster.
"""

from __future__ import annotations

from typing import Dict, List

RATE_135M = 500.0  # token-passes per second, SmolLM2-135M, fp32, 2 CPU cores (forward 32 × 64 tokens ≈ 4 s)


def approx_params(config) -> float:
    d = getattr(config, "hidden_size", 576)
    layers = getattr(config, "num_hidden_layers", 30)
    inter = getattr(config, "intermediate_size", 4 * d)
    vocab = getattr(config, "vocab_size", 49152)
    return layers * (4 * d * d + 3 * d * inter) + vocab * d


# Images: HF Trainer throughput at batch 16 measured here on 2 idle CPU cores at 32×32 (evals/bench_vision.py;
# forward + backward = 3 passes per image).
IMAGE_RATE = {"resnet_tiny": 3 * 495.0, "cnn": 3 * 1540.0}  # image-passes per second


def stage_costs(pipe, cost: Dict[str, float], seconds_per_pass: float) -> List[Dict]:
    """One row per stage of the stage table that runs for this recipe, in order: cached or not, and its cost."""
    from .stages import TABLE

    rows = []
    for st in TABLE:
        if not st.step or not st.runs_when(pipe):
            continue
        cached = pipe.dir.is_dir() and pipe.is_current(st.name) and not pipe.force
        rows.append({"stage": st.name, "cached": cached, "token_passes": 0 if cached else int(cost[st.name]),
                     "est_seconds": 0.0 if cached else cost[st.name] * seconds_per_pass})
    return rows


def image_plan(pipe) -> Dict:
    """The same plan for an image recipe, counted in image-passes (one image through one forward pass)."""
    rec = pipe.recipe
    n, (c, h, w) = len(pipe.dataset), tuple(pipe.modality.splits.train.images.shape[1:])
    k, e, t = rec.select.k, rec.edit, rec.retrain
    per_edit = {"sign_pgd": e.steps * 8 + 4, "noise": 4}  # per step: a JVP and a double backprop
    epochs_per_arm = t.epochs if (t.from_scratch or t.epochs == 1) else 1
    clean = 0 if (t.from_scratch or t.epochs == 1 or t.checkpoint) else (t.epochs - 1) * 3 * n
    cost = {"fit": 6 * n, "measure": 10, "score": 3 * n, "select": 0,
            "edit": k * per_edit[e.editor] + (k * per_edit["noise"] if "random" in t.arms else 0),
            "retrain": clean * (2 if t.model and t.model != rec.run.model else 1) + len(t.arms) * epochs_per_arm * 3 * n,
            "evaluate": n}
    rate = IMAGE_RATE.get(rec.run.model, IMAGE_RATE["resnet_tiny"]) * (32 * 32) / (h * w)
    stages = stage_costs(pipe, cost, 1.0 / rate)
    return {"model": rec.run.model, "source": rec.run.corpus, "documents": n, "tokens": n * c * h * w, "k": k,
            "editor": e.editor, "arms": list(t.arms), "output_dir": str(pipe.dir), "stages": stages,
            "unit": "image-passes", "total_token_passes": sum(s["token_passes"] for s in stages),
            "total_est_seconds": sum(s["est_seconds"] for s in stages)}


def plan(pipe) -> Dict:
    from transformers import AutoConfig, AutoTokenizer

    if pipe.modality.name != "text":  # classifiers over tensors (images, or a modality built on the image one)
        return image_plan(pipe)

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
    edits = k * per_doc_edit[e.editor] + sum(k * per_doc_edit[a] for a in t.arms if a in ("random", "simplex_pgd"))
    epochs_per_arm = t.epochs if (t.from_scratch or t.epochs == 1) else 1
    clean = 0 if (t.from_scratch or t.epochs == 1 or t.checkpoint) else (t.epochs - 1) * 3 * N
    cost = {
        "synthesize": n * (rec.synthesize.max_new_tokens + 32) if pipe.synthetic else 0,
        "fit": 6 * N, "measure": 100, "score": 3 * N, "select": 0, "edit": edits,
        "retrain": clean + len(t.arms) * epochs_per_arm * 3 * N, "evaluate": N,
    }
    scale = approx_params(config) / 135e6
    if "tracked" not in pipe.__dict__:  # stage fingerprints need module names only: a weightless model on `meta`
        import torch
        from transformers import AutoModelForCausalLM

        from .tracked_modules import resolve_tracked_modules

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=r.trust_remote_code)
        i = rec.influence
        pipe.__dict__["tracked"] = resolve_tracked_modules(skeleton, i.tracked_modules, i.layers, i.module_types)
    stages = stage_costs(pipe, cost, scale / RATE_135M)
    return {"model": r.model, "source": source, "documents": n, "tokens": N, "k": k, "editor": e.editor,
            "arms": list(t.arms), "output_dir": str(pipe.dir), "stages": stages,
            "total_token_passes": sum(s["token_passes"] for s in stages),
            "total_est_seconds": sum(s["est_seconds"] for s in stages)}


def format_plan(p: Dict) -> str:
    unit = p.get("unit", "token-passes")
    what = "pixel values" if unit == "image-passes" else "tokens"
    lines = [f"model {p['model']} ({p['source']})",
             f"corpus {p['documents']} documents, {p['tokens']} {what}; edit k={p['k']} with {p['editor']}; "
             f"arms {', '.join(p['arms'])}; output {p['output_dir']}", "",
             f"{'stage':<12}{'status':>10}{unit:>16}{'est. time (2 CPU cores)':>26}"]
    for s in p["stages"]:
        status = "cached" if s["cached"] else "to run"
        lines.append(f"{s['stage']:<12}{status:>10}{s['token_passes']:>16,}{s['est_seconds'] / 60:>22.1f} min")
    lines.append(f"{'total':<12}{'':>10}{p['total_token_passes']:>16,}{p['total_est_seconds'] / 60:>22.1f} min")
    return "\n".join(lines)
