"""The paper's CIFAR-10 experiment through the image pipeline, over N probe images × their 9 off-diagonal targets,
with the random-noise and probe-insertion baselines and the ResNet ↔ CNN transfer matrix.

Protocol (Infusion, arXiv 2602.09987, §CIFAR-10), per (probe, target) pair:
1. Train the tiny ResNet from scratch on the training split (SGD, lr 0.01, batch 16, ``--epochs`` epochs); the
   checkpoint at the start of the last epoch is θ̂. Shared by every pair (and its control arm is trained once).
2. f = log p(target | probe); v = (G + λI)⁻¹∇f with EK-FAC over every Conv2d and Linear; J of every training image.
3. The ``--k`` images with the most negative J get sign-PGD edits under L∞ ``--linf`` with pixels clamped to [0, 1].
4. The last epoch is retrained from θ̂'s checkpoint once per arm: control, infused, random noise of the same L∞,
   insertion of k probe copies labelled as the target, and insertion of a single copy.
5. Transfer: the same edits retrained with the CNN (ResNet → CNN), and edits built with the CNN retrained with the
   ResNet (CNN → ResNet), each against its own architecture's control.

The paper used 45,000 training images and k = 100 (0.22%). On 2 CPU cores the ResNet trains at about 500 images/s
idle (150 when the machine is shared), so the default here keeps the paper's k = 100 edited images but trains on
5,000 (2%), with 1 probe × 9 targets: the 9 pairs took 33 min on a shared machine (3.5 min a pair), after the clean
runs and factors of both architectures (about 10 min shared). ``--train_size 45000`` is the paper's scale.

    python evals/cifar10_paper.py [--probes 1] [--train_size 5000] [--k 100] [--epochs 10] [--no_transfer]

Protocols (``--protocol``):
- ``ours`` (default): L∞ 8/255 with pixels clamped to [0, 1], sign-PGD 20 steps of 2.5·L∞/20: what a real attacker
  must respect.
- ``paper``: the paper's code: L∞ 1 with no clamp, sign-PGD α 0.001 × 50 steps (so the budget never binds).

The paper's scale, resumable on 2 cores (each finished (probe, target) is written to ``--pairs_dir`` at once, so a
new machine resumes from the committed JSON and redoes only the shared clean runs and factors; the work folder lives
outside the work tree, under ``$INFUSION_LM_CACHE`` or ``~/.cache/infusion_lm``, so a restarted run on the same
machine resumes its clean runs and factors too):

    python evals/cifar10_paper.py --train_size 45000 --protocol paper --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import t as scipy_t

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {
    "ours": {"linf": 8 / 255, "clamp": True, "steps": 20, "pixel_step": None},
    "paper": {"linf": 1.0, "clamp": False, "steps": 50, "pixel_step": 0.001},
}
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def recipe(args, arch: str, probe: int, target: str, arms, retrain_model=None, work=None) -> dict:
    return {
        "modality": "image", "model": arch, "corpus": f"cifar10:{args.data}", "validation_size": args.validation_size,
        "max_documents": args.train_size, "output_dir": str(work or Path(args.out_dir) / f"work_{arch}"), "seed": 0,
        "measurement": {"kind": "class_logp", "probe_indices": [probe], "heldout_probe_indices": [],
                        "target_class": target},
        "influence": {"strategy": "ekfac", "batch_size": 128},
        "select": {"k": args.k},
        "edit": {"editor": "sign_pgd", "linf": args.linf, "steps": args.steps, "pixel_step": args.pixel_step,
                 "pixel_clamp": not args.no_clamp},
        "retrain": {"arms": arms, "epochs": args.epochs, "influence_at": "checkpoint", "optim": "sgd",
                    "learning_rate": 0.01, "batch_size": 16, "max_grad_norm": 0, "model": retrain_model,
                    "seeds": args.seeds},
        "evaluate": {"bootstrap_samples": 200, "detectors": True},
    }


def run(raw: dict):
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import build_pipeline

    pipe = build_pipeline(load_recipe(raw=raw), progress=False)
    return pipe, pipe.run("evaluate")


def arm_stats(results: dict, arm: str) -> dict:
    m = results["arms"][arm]["measurement"]
    rate, to, away = m["top1_is_target_rate"], m["top1_flips_to_target"], m["top1_flips_away"]
    # Over the off-diagonal probes, arm rate = control rate + flips to the target − flips away from it.
    control_rate = None if rate is None else rate - to + away
    return {"delta_p": m["delta_p_target"]["mean"], "delta_p_per_seed": m["delta_p_target"].get("per_seed"),
            "delta_f": m["delta_f"]["mean"], "delta_f_per_seed": m["delta_f"].get("per_seed"),
            "flip": to, "control_top1_is_target": control_rate}


def summarise(runs: list, key: str) -> dict:
    d = [r[key]["delta_p"] for r in runs if key in r]
    flips = [r[key]["flip"] for r in runs if key in r and r[key]["flip"] is not None]
    if not d:
        return {}
    return {"runs": len(d), "delta_p_mean": statistics.mean(d), "delta_p_median": statistics.median(d),
            "positive_fraction": sum(x > 0 for x in d) / len(d),
            "offdiagonal_flip_rate": sum(flips) / len(flips) if flips else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CIFAR), help="CIFAR-10: python batches, an image folder or zip")
    p.add_argument("--probes", type=int, default=1, help="N probe images (validation split), each × 9 targets")
    p.add_argument("--targets", nargs="*", default=None, help="limit the targets (class names)")
    p.add_argument("--train_size", type=int, default=5000)
    p.add_argument("--validation_size", type=int, default=5000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="ours",
                   help="ours: L∞ 8/255 clamped, 20 steps; paper: L∞ 1 unclamped, α 0.001 × 50 steps")
    p.add_argument("--linf", type=float, default=None, help="override the protocol's L∞")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's sign-PGD steps")
    p.add_argument("--pixel_step", type=float, default=None, help="override the protocol's sign-PGD step size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="retraining seeds (every arm, control too)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when another job shares the cores)")
    p.add_argument("--arch", default="resnet_tiny")
    p.add_argument("--other_arch", default="cnn")
    p.add_argument("--no_transfer", action="store_true")
    p.add_argument("--summarise_only", action="store_true",
                   help="only aggregate the pairs already finished under out_dir/pairs (e.g. after an interrupted run)")
    p.add_argument("--out_dir", default=None, help="work folder (clean runs, factors); default outside the work "
                   "tree: $INFUSION_LM_CACHE/evals/cifar10_<train_size>, else ~/.cache/infusion_lm/evals/...")
    p.add_argument("--pairs_dir", default=None, help="each finished pair's JSON (commit these); default "
                   "evals/results/cifar10_<train_size>/<protocol>_seeds<seeds>/")
    p.add_argument("--out", default=None, help="the summary JSON; default evals/results/cifar10_paper.json at "
                   "5,000 images, cifar10_45k.json at 45,000, else cifar10_<train_size>.json")
    p.add_argument("--note", default="", help="recorded in the JSON: e.g. what else shared the machine")
    args = p.parse_args()
    proto = PROTOCOLS[args.protocol]
    args.linf = proto["linf"] if args.linf is None else args.linf
    args.steps = proto["steps"] if args.steps is None else args.steps
    args.pixel_step = proto["pixel_step"] if args.pixel_step is None else args.pixel_step
    args.no_clamp = not proto["clamp"]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("INFUSION_LM_CACHE", Path.home() / ".cache" / "infusion_lm"))
    args.out_dir = args.out_dir or str(cache / "evals" / f"cifar10_{args.train_size}")
    seeds = "-".join(map(str, args.seeds))
    args.pairs_dir = args.pairs_dir or str(ROOT / "evals" / "results" / f"cifar10_{args.train_size}"
                                           / f"{args.protocol}_seeds{seeds}")
    args.out = args.out or str(ROOT / "evals" / "results" / {5000: "cifar10_paper.json", 45000: "cifar10_45k.json"}
                               .get(args.train_size, f"cifar10_{args.train_size}.json"))
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data} not found: this eval needs CIFAR-10 (see ../shared/data/README.md).")

    from infusion_lm.vision.data import load_image_splits

    val = load_image_splits(f"cifar10:{args.data}", args.validation_size, 0, args.train_size).validation
    classes = val.classes
    # probes: the first validation image of classes 0, 1, 2, ... so N probes span N classes
    probes = []
    for c in range(len(classes)):
        if len(probes) == args.probes:
            break
        probes.append(int((val.labels == c).nonzero()[0]))
    a, b = args.arch, args.other_arch
    arms = ["control", "infused", "random", "insertion", "insertion_single"]
    pairs_dir = Path(args.pairs_dir)
    runs, t_start = [], time.perf_counter()
    for probe in probes:
        true = classes[int(val.labels[probe])]
        for target in [c for c in classes if c != true and (not args.targets or c in args.targets)]:
            dest = pairs_dir / f"{probe}_{target}.json"
            if dest.is_file():  # finished by an earlier, interrupted invocation
                runs.append(json.loads(dest.read_text()))
                continue
            if args.summarise_only:
                continue
            t0 = time.perf_counter()
            rec = {"probe": probe, "probe_class": true, "target": target}
            pipe, res = run(recipe(args, a, probe, target, arms))
            for arm in arms[1:]:
                rec[arm] = arm_stats(res, arm)
            rec["edits"] = res["arms"]["infused"].get("edits")
            rec["detectors"] = res["arms"]["infused"].get("detectors")
            rec["control_p_target"] = json.loads((pipe.dir / "retrain" / "control" / "observations.json").read_text()
                                                 )["measurement"]["p_target"][0]
            if not args.no_transfer:
                _, res = run(recipe(args, a, probe, target, ["control", "infused"], retrain_model=b))
                rec[f"transfer_{a}_to_{b}"] = arm_stats(res, "infused")
                src = recipe(args, b, probe, target, ["control", "infused"], retrain_model=a)
                _share_checkpoint(args, pipe, src)
                _, res = run(src)
                rec[f"transfer_{b}_to_{a}"] = arm_stats(res, "infused")
                _, res = run(recipe(args, b, probe, target, ["control", "infused"]))
                rec[f"{b}_to_{b}"] = arm_stats(res, "infused")
            rec["seconds"] = time.perf_counter() - t0
            pairs_dir.mkdir(parents=True, exist_ok=True)
            rec["protocol"] = {"name": args.protocol, "linf": args.linf, "steps": args.steps,
                               "pixel_step": args.pixel_step, "clamp": not args.no_clamp, "seeds": args.seeds,
                               "threads": args.threads, "note": args.note}
            tmp = dest.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=2))
            tmp.replace(dest)  # atomic: a killed run never leaves half a pair behind
            runs.append(rec)
            i = rec["infused"]
            print(f"probe {probe} ({true}) -> {target:<11} Δp infused {i['delta_p']:+.4f} flip {i['flip']}  "
                  f"random {rec['random']['delta_p']:+.4f}  insertion {rec['insertion']['delta_p']:+.4f}  "
                  f"({rec['seconds']:.0f} s)", flush=True)

    summary = {k: summarise(runs, k) for k in ("infused", "random", "insertion", "insertion_single",
                                                 f"transfer_{a}_to_{b}", f"transfer_{b}_to_{a}", f"{b}_to_{b}")}
    summary = {k: v for k, v in summary.items() if v}
    print(f"\n{'arm':<24}{'runs':>6}{'Δp mean':>10}{'Δp median':>11}{'Δp > 0':>8}{'flips':>8}")
    for k, s in summary.items():
        fl = "–" if s["offdiagonal_flip_rate"] is None else f"{s['offdiagonal_flip_rate']:.0%}"
        print(f"{k:<24}{s['runs']:>6}{s['delta_p_mean']:>+10.4f}{s['delta_p_median']:>+11.4f}"
              f"{s['positive_fraction']:>8.0%}{fl:>8}")
    matrix = {f"{a}->{a}": summary.get("infused", {}).get("delta_p_mean"),
              f"{a}->{b}": summary.get(f"transfer_{a}_to_{b}", {}).get("delta_p_mean"),
              f"{b}->{a}": summary.get(f"transfer_{b}_to_{a}", {}).get("delta_p_mean"),
              f"{b}->{b}": summary.get(f"{b}_to_{b}", {}).get("delta_p_mean")}
    if not args.no_transfer:
        print("\ntransfer matrix, mean Δp(target) (edits built with → retrained with):")
        for k, v in matrix.items():
            print(f"  {k:<24}{v:+.4f}" if v is not None else f"  {k:<24}–")
    linf_max = max((r["edits"] or {}).get("linf_max", 0) for r in runs) if runs else None
    goals = goal_block(args, runs, summary, matrix, linf_max)
    print()
    for g, ok in goals.items():
        print(f"{'undecided' if ok is None else 'met ' if ok else 'MISSED'}  {g}")
    out = {"command": "python evals/cifar10_paper.py " + " ".join(sys.argv[1:]),
           "protocol": {k: v for k, v in vars(args).items()}, "pairs_finished": len(runs), "probes": probes, "runs": runs, "summary": summary,
           "transfer_matrix_delta_p": matrix, "linf_max": linf_max, "goals": goals,
           "paper": {"delta_p_mean": 0.232, "positive_fraction": 1.0, "offdiagonal_flip_rate": 0.304},
           "seconds": time.perf_counter() - t_start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def goal_block(args, runs: list, summary: dict, matrix: dict, linf_max) -> dict:
    """The goals of this protocol, each True/False (None while nothing ran), from the finished pairs."""
    a, b = args.arch, args.other_arch
    inf = summary.get("infused", {})
    if not inf:
        return {}
    d = np.array([r["infused"]["delta_p"] for r in runs])
    goals = {}
    if args.protocol == "paper":
        # the mean over pairs with a t-interval over pairs (pairs are the independent units here)
        if len(d) > 1:  # one pair has no interval: the goal stays undecided (None)
            half = scipy_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        goals["paper's mean Δp +0.232 inside our 95% t-interval over pairs"] = (
            bool(abs(d.mean() - 0.232) <= half) if len(d) > 1 else None)
        goals["Δp > 0 in >= 95% of pairs"] = bool((d > 0).mean() >= 0.95)
    else:
        single = np.array([r["insertion_single"]["delta_p"] for r in runs])
        goals["median Δp >= +0.05 at L∞ <= 8/255, clamped"] = bool(np.median(d) >= 0.05 and linf_max is not None
                                                                 and linf_max <= 8 / 255 + 1e-6)
        goals["off-diagonal flips >= 25%"] = bool((inf.get("offdiagonal_flip_rate") or 0) >= 0.25)
        goals["above 1-copy insertion in >= 90% of pairs"] = bool((d > single).mean() >= 0.9)
    if not args.no_transfer:
        goals["transfer mean Δp >= +0.05 both ways"] = all(matrix[k] is not None and matrix[k] >= 0.05
                                                          for k in (f"{a}->{b}", f"{b}->{a}"))
    return goals


def _share_checkpoint(args, pipe_a, raw_b) -> None:
    """The CNN-sourced run retrains the arms with the ResNet from its own clean checkpoint. That run is the very one
    the ResNet-sourced runs already made (same seed, data, order and settings), so its checkpoint is copied instead of
    trained again."""
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import build_pipeline

    pipe_b = build_pipeline(load_recipe(raw=raw_b), progress=False)
    src = pipe_a.clean_checkpoint()
    if src is None:
        return  # the arms start from the model itself: no checkpoint to share
    dest = pipe_b.modality.arm_checkpoint_dir() / src.name
    if not (dest / "trainer_state.json").is_file():
        shutil.copytree(src, dest, dirs_exist_ok=True)


if __name__ == "__main__":
    main()
