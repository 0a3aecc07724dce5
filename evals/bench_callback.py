"""What the Trainer callbacks cost: the same HF Trainer run (same data, same seed, same steps) without a callback, with
InfusionCallback at the example's defaults (examples/trainer_callbacks.py: k 3, EK-FAC over the MLPs of layers 12 and
24, 6 swap steps of 8 candidates, fired half way), and with MeasurementCallback logging f every ``--log_every`` steps.

InfusionCallback runs the whole method once (factors, v, J of every row, the edits) on purpose, and that work is timed
on its own (``infuse_seconds``); the goal is on what the callback adds beyond it (its hooks and the SwappableDataset
the rows go through): within 10% of the plain run. MeasurementCallback's goal is the same 10% on its whole cost.
Each variant starts from a freshly loaded model; loading is not timed, and an untimed warm-up run goes first. With
``--repeats`` the variants alternate and the median counts.

Prints a table and writes JSON (default evals/results/bench_callback.json).

    python evals/bench_callback.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--docs 24] [--steps 6]
        [--log_every 2] [--layers 12 24] [--repeats 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.10
VARIANTS = ["plain", "infusion", "measurement"]


def setup(args):
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "examples"))
    from trainer_callbacks import stories  # the example's corpus

    from infusion_lm import MeasurementArguments, contrastive_measurement, load_model, tokenize_documents

    model, tok = load_model(args.model, device=args.device)
    rows = tokenize_documents(tok, [{"text": s} for s in stories(args.docs)], max_length=64)
    measure = MeasurementArguments(kind="contrastive", probe="dog", target="cat",
                                   documents=["Tom had a little dog. Every morning the dog ran to the park."],
                                   heldout_documents=["Sam walked his dog to the lake. The dog jumped in."])
    f = contrastive_measurement(tok, measure.documents, measure.probe, measure.target)
    return tok, rows, measure, f


def train(args, variant: str, tok, rows, measure, f, work: Path) -> dict:
    """One Trainer run of ``variant``; seconds of trainer.train() alone (and of the infusion inside it)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from infusion_lm import CausalLMCollator, EditArguments, InfluenceArguments, load_model
    from infusion_lm.callbacks import InfusionCallback, MeasurementCallback, SwappableDataset

    model, _ = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    data, callbacks, infuse, watch = rows, [], None, None
    if variant == "infusion":
        data = SwappableDataset(rows)
        infuse = InfusionCallback(tok, data, f, k=args.k, at_step=max(args.steps // 2, 1),
                                  work_dir=str(work / f"infusion_{time.monotonic_ns()}"),
                                  influence=InfluenceArguments(layers=args.layers, module_types=["mlp"], batch_size=8),
                                  edit=EditArguments(steps=6, n_candidates=8))
        timed = {"seconds": 0.0}
        inner = infuse.infuse

        def infuse_timed(m):
            t0 = time.perf_counter()
            try:
                return inner(m)
            finally:
                timed["seconds"] += time.perf_counter() - t0

        infuse.infuse = infuse_timed  # _fire calls self.infuse: the method's own work, timed apart
        callbacks.append(infuse)
    elif variant == "measurement":
        watch = MeasurementCallback(tok, measure)
        callbacks.append(watch)
    targs = TrainingArguments(output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
                              learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=args.log_every,
                              save_strategy="no", report_to=[], remove_unused_columns=False, seed=0,
                              disable_tqdm=True, use_cpu=device.type == "cpu")
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=CausalLMCollator(tok.pad_token_id),
                      callbacks=callbacks)
    if watch is not None:
        watch.attach(trainer)
    # Time spent inside the callback's own hooks, read directly: on a shared machine the run-to-run spread of the
    # whole training (10-20%) hides a few percent, the time inside the hooks does not.
    hooks = {"seconds": 0.0}
    for cb in callbacks:
        for name in [n for n in dir(type(cb)) if n.startswith("on_")]:
            def timed_hook(*a, _f=getattr(cb, name), **kw):
                t0 = time.perf_counter()
                try:
                    return _f(*a, **kw)
                finally:
                    hooks["seconds"] += time.perf_counter() - t0
            setattr(cb, name, timed_hook)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rec = {"seconds": time.perf_counter() - t0, "train_loss": float(out.training_loss), "steps": trainer.state.global_step,
           "in_hooks_seconds": hooks["seconds"]}
    if infuse is not None:
        rec.update(infuse_seconds=timed["seconds"], fired_at=infuse.fired_at, edited=len(infuse.records))
    if watch is not None:
        rec.update(measurements=len(watch.history))
    del trainer, model
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or a model folder")
    p.add_argument("--docs", type=int, default=24, help="training documents (the example's stories)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: two epochs at batch 8, as in the example); infusion at half way")
    p.add_argument("--k", type=int, default=3, help="InfusionCallback's k (the example's 3)")
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24], help="influence.layers (the example's 12 24)")
    p.add_argument("--log_every", type=int, default=2, help="logging_steps: MeasurementCallback measures then")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating; the median counts")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the cores)")
    p.add_argument("--note", default="", help="recorded in the JSON: what else shared the machine")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_callback.json"))
    args = p.parse_args(argv)
    args.steps = args.steps or 2 * math.ceil(args.docs / 8)
    if args.k > args.docs:
        raise SystemExit(f"--k {args.k} exceeds --docs {args.docs}")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    tok, rows, measure, f = setup(args)
    runs = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_callback_") as tmp:
        work = Path(tmp)
        warm = argparse.Namespace(**{**vars(args), "steps": 1})
        train(warm, "plain", tok, rows, measure, f, work)  # imports, kernels, allocator: paid before any timing
        for r in range(args.repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                rec = train(args, v, tok, rows, measure, f, work)
                runs[v].append(rec)
                print(f"repeat {r}  {v:<12} {rec['seconds']:7.2f} s"
                      + (f"  (infuse {rec['infuse_seconds']:.2f} s)" if "infuse_seconds" in rec else ""), flush=True)

    med = {v: statistics.median(x["seconds"] for x in runs[v]) for v in VARIANTS}
    # the callbacks' own time (inside their hooks; InfusionCallback's without the infuse() it fires), per repeat,
    # against the plain run of the same repeat
    direct = {"infusion": [(x["in_hooks_seconds"] - x["infuse_seconds"]) / p["seconds"]
                           for x, p in zip(runs["infusion"], runs["plain"])],
              "measurement": [x["in_hooks_seconds"] / p["seconds"] for x, p in zip(runs["measurement"], runs["plain"])]}
    infuse_s = statistics.median(x["infuse_seconds"] for x in runs["infusion"])
    plain = med["plain"]
    summary = {
        "plain": {"seconds": plain, "ratio": 1.0},
        "infusion": {"seconds": med["infusion"], "ratio": med["infusion"] / plain, "infuse_seconds": infuse_s,
                     "infuse_ratio_to_plain": infuse_s / plain,
                     "beyond_infuse_seconds": med["infusion"] - infuse_s,
                     "overhead_beyond_infuse": (med["infusion"] - infuse_s) / plain - 1,
                     "in_hooks_beyond_infuse_overhead": statistics.median(direct["infusion"]),
                     "in_hooks_beyond_infuse_per_repeat": direct["infusion"]},
        "measurement": {"seconds": med["measurement"], "ratio": med["measurement"] / plain,
                        "overhead": med["measurement"] / plain - 1,
                        "in_hooks_overhead": statistics.median(direct["measurement"]),
                        "in_hooks_per_repeat": direct["measurement"],
                        "measurements": runs["measurement"][0]["measurements"]},
    }
    spread = statistics.pstdev([x["seconds"] for x in runs["plain"]]) / plain if len(runs["plain"]) > 1 else None
    summary["plain"]["run_to_run_spread"] = spread  # relative sd of the plain runs: what a total-time overhead can resolve
    goals = {
        "InfusionCallback: training beyond the infusion it runs within 10% of plain (time inside its hooks)":
            summary["infusion"]["in_hooks_beyond_infuse_overhead"] <= GOAL,
        f"MeasurementCallback every {args.log_every} steps: within 10% of plain (time inside its hooks)":
            summary["measurement"]["in_hooks_overhead"] <= GOAL,
        "the same two, from total training times (noisy on a shared machine)":
            summary["infusion"]["overhead_beyond_infuse"] <= GOAL and summary["measurement"]["overhead"] <= GOAL,
    }
    print(f"\n{'variant':<14}{'seconds':>9}{'ratio':>8}   notes")
    print(f"{'plain':<14}{plain:>9.2f}{1.0:>8.2f}   {args.steps} steps, {args.docs} documents"
          + (f"; run-to-run spread {spread:.1%}" if spread is not None else ""))
    s = summary["infusion"]
    print(f"{'infusion':<14}{s['seconds']:>9.2f}{s['ratio']:>8.2f}   infuse() {s['infuse_seconds']:.2f} s "
          f"({s['infuse_ratio_to_plain']:.2f}x plain); beyond it {s['overhead_beyond_infuse']:+.1%} in total time, "
          f"{s['in_hooks_beyond_infuse_overhead']:+.1%} inside its hooks")
    s = summary["measurement"]
    print(f"{'measurement':<14}{s['seconds']:>9.2f}{s['ratio']:>8.2f}   {s['measurements']} measurements, "
          f"{s['overhead']:+.1%} in total time, {s['in_hooks_overhead']:+.1%} inside its hooks")
    print()
    for g, ok in goals.items():
        print(f"{'met    ' if ok else 'MISSED '}  {g}")
    import torch

    result = {"command": "python evals/bench_callback.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": args.model, "device": "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "note": args.note,
              "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
              "settings": {"docs": args.docs, "steps": args.steps, "k": args.k, "layers": args.layers,
                           "module_types": ["mlp"], "edit": {"steps": 6, "n_candidates": 8}, "batch_size": 8,
                           "learning_rate": 1e-4, "log_every": args.log_every, "repeats": args.repeats,
                           "infuse_at_step": max(args.steps // 2, 1)},
              "summary": summary, "goals": goals, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
