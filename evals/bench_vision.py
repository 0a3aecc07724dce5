"""Image-side speeds, measured side by side in one run (this machine is noisy, so read the ratios):

1. Training throughput of the paper's tiny ResNet and simple CNN through the HF Trainer (batch 16, SGD), the figure
   behind ``--dry-run``'s time estimate for image recipes.
2. ∇x J for pixel edits, three ways on the same images: the exact default (JVP along v for J, one batched double
   backprop for ∇x J), the ±εv finite difference, and a per-image double backprop as the reference, with each one's
   relative error against the reference.

    python evals/bench_vision.py [--images 800] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]


def trainer_throughput(arch: str, n: int) -> float:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from infusion_lm.vision.data import ImageCollator, ImageRows
    from infusion_lm.vision.models import build_image_model

    g = torch.Generator().manual_seed(0)
    rows = ImageRows(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    model = build_image_model(arch, 10, 3, [0.5] * 3, [0.25] * 3)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, num_train_epochs=1,
                             learning_rate=0.01, optim="sgd", save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False, max_grad_norm=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=ImageCollator())
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    return n / (time.perf_counter() - t0)


def pixel_gradients(n: int, repeats: int) -> dict:
    """J and ∇x J for n images, three ways, on the tiny ResNet with a random v of the IHVP's layout."""
    from infusion_lm.influence import from_layout, module_params
    from infusion_lm.vision.editors import ExactPixelJ, PixelJ
    from infusion_lm.vision.models import build_image_model, tracked_image_modules

    torch.manual_seed(0)
    model = build_image_model("resnet_tiny", 10, 3, [0.5] * 3, [0.25] * 3).eval()
    v = {}
    for name in tracked_image_modules(model):
        w, b = module_params(model, name)
        v[name] = torch.randn(w.shape[0], w[0].numel() + (1 if b is not None else 0)) * 1e-2
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
    params = [p for name in v for p in module_params(model, name) if p is not None]

    def per_image():  # the reference: one double backprop per image
        out = []
        for i in range(n):
            xi = x[i: i + 1].clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=xi).logits, y[i: i + 1], reduction="sum")
            grads = iter(torch.autograd.grad(loss, params, create_graph=True))
            j = 0
            for name in v:
                w, b = module_params(model, name)
                dw, db = from_layout(v[name], w, b)
                j = j + (next(grads) * dw).sum() + ((next(grads) * db).sum() if b is not None else 0)
            out.append(torch.autograd.grad(j, xi)[0][0])
        return torch.stack(out)

    methods = {"exact (JVP + batched double backprop)": lambda: ExactPixelJ(model, v).value_and_grad(x, y)[1],
               "finite difference, eps_rel 1e-4": lambda: PixelJ(model, v, eps_rel=1e-4).value_and_grad(x, y)[1],
               "per-image double backprop (reference)": per_image}
    times, grads = {k: [] for k in methods}, {}
    for _ in range(repeats):  # interleaved, so every method sees the same machine load
        for k, fn in methods.items():
            t0 = time.perf_counter()
            grads[k] = fn()
            times[k].append(time.perf_counter() - t0)
    ref = grads["per-image double backprop (reference)"]
    return {"images": n, "seconds": {k: min(t) for k, t in times.items()},
            "relative_error": {k: float((g - ref).norm() / ref.norm()) for k, g in grads.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_vision.json"))
    args = p.parse_args()
    out = {"trainer_images_per_second": {}, "threads": torch.get_num_threads()}
    for arch in ("cnn", "resnet_tiny"):
        out["trainer_images_per_second"][arch] = max(trainer_throughput(arch, args.images) for _ in range(2))
    out["pixel_gradient"] = pixel_gradients(16, args.repeats)
    print(f"{'Trainer, batch 16, 32×32×3':<34}{'images/s':>10}")
    for arch, r in out["trainer_images_per_second"].items():
        print(f"  {arch:<32}{r:>10.1f}")
    pg = out["pixel_gradient"]
    ref = pg["seconds"]["per-image double backprop (reference)"]
    print(f"\n∇x J of {pg['images']} images{'seconds':>30}{'vs reference':>14}{'rel. error':>12}")
    for k, sec in pg["seconds"].items():
        print(f"  {k:<40}{sec:>8.2f}{ref / sec:>13.1f}×{pg['relative_error'][k]:>12.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
