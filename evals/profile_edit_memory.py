"""Where the edit stage's memory goes: peak RSS of each of its parts, one at a time, on a finished run folder.

    python evals/profile_edit_memory.py [--recipe recipes/smollm2_default.yaml] [--out evals/results/edit_memory.json]

The edit stage does three things: the editor's search over the selected documents (candidate batches scored with the
forward-only J), the perplexities of the documents before and after, and the predicted Δf of each edit
(``influence.prediction: optimizer``: the retraining's response along its own steps, over every weight the arms
train). Each part runs here on its own, after the model and the run's v are loaded, with the process's peak RSS
(VmHWM) reset before it, so each figure is that part's peak above what was already resident.

Needs the recipe's run folder through ``select`` (``make run`` leaves one). Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals"))

from bench_scale import peak_rss_mb, reset_peak, rss_mb  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_default.yaml"))
    ap.add_argument("--out", default=str(ROOT / "evals" / "results" / "edit_memory.json"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    import torch

    from infusion_lm.atomic_io import read_json, write_json
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.text.editing import edit_documents
    from infusion_lm.text.measurement import measurement_words

    pipe = Pipeline(load_recipe(args.recipe), progress=False)
    if not pipe.folder.selection.is_file():
        raise SystemExit(f"{pipe.folder.selection} is missing: run the recipe through select first (make run).")
    indices = read_json(pipe.folder.selection)["indices"]
    model, tok, v = pipe.model, pipe.tokenizer, pipe.load_ihvp()
    rows = [pipe.dataset[i] for i in indices]
    _ = pipe.measurement, pipe.dataset
    loaded = rss_mb()
    parts = {}

    def part(name, fn):
        reset_peak()
        before = rss_mb()
        t0 = time.perf_counter()
        out = fn()
        parts[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                       "rss_before_mb": round(before, 1), "peak_above_before_mb": round(peak_rss_mb() - before, 1)}
        print(f"{name:<34}{parts[name]['seconds']:>8.1f} s{parts[name]['peak_rss_mb']:>10.0f} MB peak"
              f"{parts[name]['peak_above_before_mb']:>10.0f} MB above", flush=True)
        return out

    i = pipe.recipe.influence
    words = measurement_words(pipe.recipe.measurement)
    results, after, _ = part("editor search (no prediction)", lambda: edit_documents(
        model, tok, v, pipe.recipe.edit, rows, indices, fd_eps_rel=i.fd_eps_rel, words=words,
        divisor=pipe.prediction_divisor, predict=None, progress=False))
    predictor = pipe.modality._predictor
    if predictor is not None:
        part("predicted Δf (optimizer trajectory)", lambda: predictor(list(indices), rows, after))
        # a matched baseline edits the same documents: their steps' response is read back, not streamed again
        part("predicted Δf again (a baseline's edits)", lambda: predictor(list(indices), rows, list(reversed(after))))
    out = {"command": "python evals/profile_edit_memory.py " + " ".join(sys.argv[1:]), "recipe": args.recipe,
           "k": len(indices), "documents": len(pipe.dataset), "max_length": pipe.recipe.run.max_length,
           "tracked_parameters_for_prediction": None, "model_parameters": sum(p.numel() for p in model.parameters()),
           "rss_after_loading_mb": round(loaded, 1), "threads": torch.get_num_threads(), "note": args.note,
           "parts": parts}
    if predictor is not None:
        from infusion_lm.tracked_modules import resolve_tracked_modules
        from infusion_lm.param_layout import module_params

        tracked = resolve_tracked_modules(model)
        out["tracked_parameters_for_prediction"] = sum(p.numel() for n in tracked for p in module_params(model, n)
                                                       if p is not None)
        per_epoch = -(-len(pipe.dataset) // pipe.recipe.retrain.batch_size)
        out["prediction_steps"] = per_epoch * (pipe.recipe.retrain.epochs - pipe.checkpoint_step() // per_epoch)
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
