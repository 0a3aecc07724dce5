"""The image modality's ``--dry-run`` costs, in image-passes (one image through one forward pass), per stage."""

from __future__ import annotations

from typing import Dict

# HF Trainer throughput at batch 16 measured on 2 idle CPU cores at 32×32 (evals/bench_vision.py; forward + backward
# = 3 passes per image).
IMAGE_RATE = {"resnet_tiny": 3 * 495.0, "cnn": 3 * 1540.0}  # image-passes per second


def image_costs(pipe) -> Dict:
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
    return {"documents": n, "tokens": n * c * h * w, "unit": "image-passes", "cost": cost, "seconds_per_pass": 1.0 / rate}
