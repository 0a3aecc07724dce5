"""How the default text recipe's stages grow with the corpus: wall time and peak RSS of fit, measure, score, select
and edit against the number of documents n and their length.

For each size, a child process (so that each size's peak RSS is its own) builds a corpus of n documents of ``--tokens``
tokens each (real TinyStories from ../shared/data/tinystories, topped up with templated stories once the 787 real
ones run out; written to the size's run folder as corpus.jsonl), runs recipes/smollm2_default.yaml on it through
fit → measure → score → select (rank_by: j) → edit, then selects and edits again with ``select.rank_by: first_step``,
with ``select.pool = 3k`` and over every document. Per stage: the pipeline's own timings (``pipe.timings``) and the
stage's peak RSS (VmHWM, reset before each stage through /proc/self/clear_refs where the kernel allows it).

Then the exponent b of seconds ≈ a·n^b per stage (least squares on log-log), the same against the document length
(``--lengths`` at ``--length_docs`` documents), and the goals: every stage linear or better in n (b <= 1.1), the
working memory (peak RSS above the loaded model) growing no faster than the corpus, and first_step with a pool at the
largest n within 2x the select + edit time of the j ranking.

Prints a table, writes JSON (default evals/results/bench_scale.json) and a log-log plot beside it (.png).
Resumable: a finished size is read back from its point.json under --work_dir and not rerun. With a single size the
stages are timed and no exponent is fitted (evals/device_check.sh runs it so).

    python evals/bench_scale.py [--sizes 48 192 768 1536] [--tokens 64] [--lengths 64 128 256] [--length_docs 48]
        [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--layers 12 24] [--k 4] [--device auto] [--work_dir DIR]
        [--out evals/results/bench_scale.json] [--first_step both|pool|none]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_default.yaml"
TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_sample.jsonl"
VERSION = 1  # bump when what a point measures changes: older point.json files are then rerun

STAGES = ["fit", "measure", "score", "select", "edit"]
# select + edit under each ranking: the j ranking's come from the stages above
RANKINGS = {"j": "select+edit (j)", "first_step_pool": "select+edit (first_step, pool 3k)",
            "first_step_all": "select+edit (first_step, every document)"}
LINEAR = 1.1            # an exponent at or below this is "linear or better"
TIMER_FLOOR_S = 0.05    # a stage whose every time is below this is fixed overhead: its exponent is noise
MEMORY_FLOOR_MB = 16.0  # working memory below this (on every size) is allocator noise


# ---------------------------------------------------------------------------------------------------------- memory

def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak (VmHWM), or of the whole process (getrusage) where /proc is absent."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb / 1024


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# ---------------------------------------------------------------------------------------------------------- corpus

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Sue", "Tim", "Zoe"]
ANIMALS = ["dog", "cat", "bird", "fish", "frog", "duck", "bear", "rabbit"]
PLACES = ["park", "garden", "lake", "forest", "beach", "yard", "hill", "house"]
THINGS = ["ball", "box", "kite", "hat", "cake", "toy", "book", "boat"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud"]
SENTENCES = [
    "One day, {name} went to the {place} with a little {animal}.",
    "The {animal} saw a big red {thing} and ran to get it.",
    "{name} was very {feeling} and hugged the {animal}.",
    "They played with the {thing} until the sun went down.",
    "The {animal} jumped over the {thing} and barked at the birds.",
    "\"Look at the {thing}!\" said {name}. \"It is so pretty.\"",
    "After a while, the {animal} felt {feeling} and lay down near the {place}.",
    "{name} shared a snack with the {animal}, and they were friends.",
]


def templated_story(index: int, n_tokens: int, tok) -> str:
    """A TinyStories-like story from templates, seeded by its index, at least n_tokens tokens long."""
    rng = random.Random(index)
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    parts = ["Once upon a time, there was a child named " + name + "."]
    while len(tok(" ".join(parts))["input_ids"]) <= n_tokens:
        parts.append(rng.choice(SENTENCES).format(name=name, animal=animal, place=place, thing=rng.choice(THINGS),
                                                  feeling=rng.choice(FEELINGS)))
    return " ".join(parts)


def build_corpus(tok, n_docs: int, n_tokens: int) -> tuple:
    """n_docs stories that each reach n_tokens tokens (so each is truncated to exactly that length): the real TinyStories
    that are long enough, in file order, then templated ones. The corpus of a smaller n is a prefix of a larger's."""
    real = []
    if TINYSTORIES.is_file():
        for line in TINYSTORIES.read_text(encoding="utf-8").splitlines():
            if len(real) == n_docs:
                break
            if line.strip():
                text = json.loads(line)["text"]
                if len(tok(text)["input_ids"]) > n_tokens:
                    real.append(text)
    synthetic = [templated_story(i, n_tokens, tok) for i in range(n_docs - len(real))]
    return real + synthetic, len(real)


# ---------------------------------------------------------------------------------------------------------- one size

def point_recipe(spec: dict, run_dir: Path) -> dict:
    """The default recipe on this size's corpus: its model, max_length, layers, k and device from the bench's options."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    raw.pop("synthesize", None)
    raw.update(model=spec["model"], corpus=str(run_dir / "corpus.jsonl"), max_length=spec["tokens"],
               output_dir=str(run_dir), device=spec["device"])
    if spec["layers"]:
        raw["influence"]["layers"] = spec["layers"]
    if spec["k"]:
        raw["select"]["k"] = spec["k"]
    return raw


def run_point(spec: dict) -> dict:
    """One size, in this (child) process: the corpus, the stages, and each stage's seconds and peak RSS."""
    import dataclasses
    import logging
    import warnings

    import torch

    sys.path.insert(0, str(ROOT))
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("infusion_lm").setLevel(logging.ERROR)  # "Truncated N documents": every one is, by design
    folder = Path(spec["folder"])
    run_dir = folder / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a killed child's stages would be cached, and untimed
    run_dir.mkdir(parents=True)
    rss_start = rss_mb()
    t0 = time.perf_counter()
    pipe = Pipeline(load_recipe(raw=point_recipe(spec, run_dir)), progress=False)
    tok = pipe.tokenizer  # loads the model too
    load_s = time.perf_counter() - t0
    rss_model = rss_mb()
    t0 = time.perf_counter()
    texts, n_real = build_corpus(tok, spec["n_docs"], spec["tokens"])
    (run_dir / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    corpus_s = time.perf_counter() - t0
    resettable = reset_peak()
    stages, peaks = {}, {}
    for stage in STAGES:
        reset_peak()
        pipe.run(stage)
        stages[stage] = pipe.timings[stage]
        peaks[stage] = peak_rss_mb()
    rankings = {"j": {"select": stages["select"], "edit": stages["edit"], "documents_tried": None}}
    k = pipe.recipe.select.k
    variants = {"pool": [("first_step_pool", 3 * k)], "all": [("first_step_all", None)],
                "both": [("first_step_pool", 3 * k), ("first_step_all", None)], "none": []}[spec["first_step"]]
    for name, pool in variants:
        pipe.recipe.select = dataclasses.replace(pipe.recipe.select, rank_by="first_step",
                                                 pool=min(pool, spec["n_docs"]) if pool else None)
        pipe.modality.__dict__.pop("_predictor", None)  # each ranking's edit builds its own, as a fresh run would
        for s in ("select", "edit"):
            pipe.timings.pop(s, None)
        reset_peak()
        pipe.run("edit")
        sel = json.loads(pipe.folder.selection.read_text(encoding="utf-8"))
        rankings[name] = {"select": pipe.timings["select"], "edit": pipe.timings["edit"], "pool": pool,
                          "documents_tried": sel.get("documents_tried"), "peak_rss_mb": peak_rss_mb()}
    device = str(next(pipe.model.parameters()).device)
    return {
        "version": VERSION, "config": spec["config"], "n_docs": spec["n_docs"], "tokens": spec["tokens"], "k": k,
        "layers": pipe.recipe.influence.layers, "device": device,
        "corpus": {"path": str(run_dir / "corpus.jsonl"), "real_tinystories": n_real, "templated": len(texts) - n_real,
                   "tokens_total": spec["n_docs"] * spec["tokens"],
                   "bytes": (run_dir / "corpus.jsonl").stat().st_size, "build_seconds": corpus_s},
        "seconds": stages, "rankings": rankings,
        "peak_rss_mb": peaks, "peak_rss_is_per_stage": resettable,
        "rss_start_mb": rss_start, "rss_after_model_mb": rss_model, "model_load_seconds": load_s,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    point = run_point(spec)
    out = Path(spec["folder"]) / "point.json"
    tmp = out.with_name(".point.json.tmp")
    tmp.write_text(json.dumps(point, indent=2) + "\n")
    tmp.replace(out)


# ---------------------------------------------------------------------------------------------------------- parent

def point_config(args, n_docs: int, tokens: int) -> dict:
    """What a point's result depends on: a stored point.json with the same config is read back, not rerun."""
    return {"version": VERSION, "model": args.model, "layers": args.layers, "k": args.k, "device": args.device,
            "recipe_sha": hashlib.sha256(RECIPE.read_bytes()).hexdigest()[:16], "first_step": args.first_step,
            "n_docs": n_docs, "tokens": tokens}


def measure_point(args, n_docs: int, tokens: int) -> tuple:
    """(the point's record, whether it was read back), running it in a child process when not already finished."""
    config = point_config(args, n_docs, tokens)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(args.work_dir) / f"n{n_docs}_t{tokens}_{h}"
    done = folder / "point.json"
    if done.is_file():
        try:
            point = json.loads(done.read_text())
            if point.get("config") == config:
                return point, True
        except ValueError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"folder": str(folder), "config": config, "model": args.model, "layers": args.layers, "k": args.k,
            "device": args.device, "first_step": args.first_step, "n_docs": n_docs, "tokens": tokens}
    log = folder / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_point", json.dumps(spec)],
                              cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not done.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"n={n_docs} tokens={tokens}: the child failed (exit {proc.returncode}); log {log}:\n{tail}")
    return json.loads(done.read_text()), False


def exponent(xs, ys) -> float | None:
    """b of y ≈ a·x^b, least squares on log-log; None for fewer than two distinct x."""
    import numpy as np

    if len(set(xs)) < 2:
        return None
    b, _ = np.polyfit(np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-6)), 1)
    return float(b)


def series(points, x_key: str) -> dict:
    """Per stage (and per ranking's select + edit): seconds and peak RSS per x, their exponents and the verdict."""
    pts = sorted(points, key=lambda p: p[x_key])
    xs = [p[x_key] for p in pts]
    rows = {}

    def row(name, secs, peaks=None):
        r = {"seconds": {str(x): round(s, 4) for x, s in zip(xs, secs)}, "exponent": exponent(xs, secs)}
        negligible = max(secs) < TIMER_FLOOR_S
        r["below_timer_floor"] = negligible  # every time is fixed overhead: the exponent says nothing
        # None: a single x, nothing to fit
        r["linear_or_better"] = True if negligible else None if r["exponent"] is None else r["exponent"] <= LINEAR
        if peaks is not None:
            r["peak_rss_mb"] = {str(x): round(m, 1) for x, m in zip(xs, peaks)}
            r["rss_exponent"] = exponent(xs, peaks)
            work = [max(m - p["rss_after_model_mb"], 0.0) for m, p in zip(peaks, pts)]
            r["working_rss_mb"] = {str(x): round(w, 1) for x, w in zip(xs, work)}
            r["working_rss_exponent"] = exponent(xs, [max(w, 1.0) for w in work])
            r["working_rss_below_floor"] = max(work) < MEMORY_FLOOR_MB
        rows[name] = r

    for stage in STAGES:
        row(stage, [p["seconds"][stage] for p in pts], [p["peak_rss_mb"][stage] for p in pts])
    for key, label in RANKINGS.items():
        if all(key in p["rankings"] for p in pts):
            rk = [p["rankings"][key] for p in pts]
            row(label, [r["select"] + r["edit"] for r in rk])
    process = [p["process_peak_rss_mb"] for p in pts]
    return {"x": x_key, "values": xs, "stages": rows,
            "process_peak_rss_mb": {str(x): round(m, 1) for x, m in zip(xs, process)},
            "process_rss_exponent": exponent(xs, process),
            "corpus_tokens": {str(x): p["corpus"]["tokens_total"] for x, p in zip(xs, pts)}}


def every(flags) -> bool | None:
    """True when every flag is; None when one cannot be told (a single size) and none is False."""
    flags = list(flags)
    return False if False in flags else None if None in flags else True


def goals(docs: dict) -> dict:
    st = docs["stages"]
    rss_ok = [True if st[s]["working_rss_below_floor"] else None if st[s]["working_rss_exponent"] is None
              else st[s]["working_rss_exponent"] <= LINEAR for s in STAGES]
    out = {"every stage linear or better in n (time exponent <= 1.1)": every(st[s]["linear_or_better"] for s in STAGES),
           "working memory (peak RSS above the loaded model) grows no faster than the corpus (exponent <= 1.1)":
               every(rss_ok)}
    pool, j = st.get(RANKINGS["first_step_pool"]), st.get(RANKINGS["j"])
    if pool and j:
        n = str(docs["values"][-1])
        ratio = pool["seconds"][n] / max(j["seconds"][n], 1e-9)
        out[f"first_step with pool 3k at n={n} <= 2x the j ranking's select+edit (ratio {ratio:.2f})"] = ratio <= 2
    else:
        out["first_step with pool 3k <= 2x the j ranking's select+edit"] = None
    return out


def table(title: str, sweep: dict) -> str:
    xs = sweep["values"]
    lines = [title, f"{'stage':<42}" + "".join(f"{x:>9}" for x in xs) + f"{'exp':>7}{'linear':>8}   peak RSS MB (above the loaded model)"]
    for name, r in sweep["stages"].items():
        e = "-" if r["exponent"] is None else f"{r['exponent']:.2f}"
        verdict = {True: "yes", False: "NO", None: "-"}[r["linear_or_better"]]
        if r["below_timer_floor"]:
            verdict += "*"
        rss = "  ".join(f"{r['peak_rss_mb'][str(x)]:.0f} (+{r['working_rss_mb'][str(x)]:.0f})" for x in xs
                        ) if "peak_rss_mb" in r else ""
        lines.append(f"{name:<42}" + "".join(f"{r['seconds'][str(x)]:>9.2f}" for x in xs) + f"{e:>7}{verdict:>8}   {rss}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [(result["documents"], "documents n (at %d tokens)" % result["settings"]["tokens"])]
    if result.get("lengths") and len(result["lengths"]["values"]) > 1:
        sweeps.append((result["lengths"], "tokens per document (at %d documents)" % result["settings"]["length_docs"]))
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(sweeps) + 1, figsize=(6 * (len(sweeps) + 1), 4.5))

    def ticks(ax, xs):
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())

    for ax, (sweep, xlabel) in zip(axes, sweeps):
        xs = sweep["values"]
        for name, r in sweep["stages"].items():
            ys = [max(r["seconds"][str(x)], 1e-4) for x in xs]
            e = "" if r["exponent"] is None else f" (b={r['exponent']:.2f})"
            ax.loglog(xs, ys, "o-" if name in STAGES else "s--", label=name + e)
        top = max(max(r["seconds"][str(xs[0])], 1e-4) for r in sweep["stages"].values())
        ax.loglog(xs, [top * x / xs[0] for x in xs], "k:", lw=1, label="linear")
        ticks(ax, xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[-1]
    docs = result["documents"]
    xs = docs["values"]
    for stage in STAGES:
        ax.loglog(xs, [max(docs["stages"][stage]["working_rss_mb"][str(x)], 1.0) for x in xs], "o-", label=stage)
    work = [max(docs["stages"][s]["working_rss_mb"][str(xs[0])] for s in STAGES) for _ in xs]
    ax.loglog(xs, [max(work[0], 1.0) * x / xs[0] for x in xs], "k:", lw=1, label="linear")
    ticks(ax, xs)
    ax.set_xlabel("documents n")
    ax.set_ylabel("peak RSS above the loaded model (MB)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"bench_scale: {result['model']} on {result['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_work_dir() -> str:
    base = os.environ.get("INFUSION_LM_CACHE")
    return str(Path(base) / "bench_scale" if base else Path.home() / ".cache" / "infusion_lm" / "bench_scale")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 192, 768, 1536], help="documents n, at --tokens")
    p.add_argument("--tokens", type=int, default=64, help="tokens per document in the --sizes sweep")
    p.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256], help="tokens per document, at --length_docs")
    p.add_argument("--length_docs", type=int, default=48, help="documents in the --lengths sweep")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the recipe's model, or a model folder")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="influence.layers (default: the recipe's)")
    p.add_argument("--k", type=int, default=None, help="select.k (default: the recipe's); pool = 3k")
    p.add_argument("--device", default="auto", help="run.device: auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--first_step", choices=["both", "pool", "all", "none"], default="both",
                   help="which select.rank_by: first_step runs to time: with pool 3k, over every document, both, none")
    p.add_argument("--work_dir", default=None, help="run folders, one per size (default $INFUSION_LM_CACHE/bench_scale "
                                                    "or ~/.cache/infusion_lm/bench_scale); finished sizes are reused")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_scale.json"))
    p.add_argument("--plot", default=None, help="the plot (default: --out with .png)")
    p.add_argument("--note", default="", help="recorded in the JSON: what else shared the machine")
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._point:
        return child_main(args._point)
    args.work_dir = args.work_dir or default_work_dir()

    plan = [(n, args.tokens) for n in args.sizes] + [(args.length_docs, t) for t in args.lengths]
    plan = list(dict.fromkeys(plan))  # the sweeps share the point (length_docs, tokens)
    points, wall = {}, time.perf_counter()
    for n, t in plan:
        t0 = time.perf_counter()
        point, cached = measure_point(args, n, t)
        points[(n, t)] = point
        s = point["seconds"]
        print(f"n={n:<5} tokens={t:<4} " + "  ".join(f"{k} {s[k]:.2f}" for k in STAGES)
              + "".join(f"  {k} {r['select'] + r['edit']:.2f}" for k, r in point["rankings"].items() if k != "j")
              + f"  peak {point['process_peak_rss_mb']:.0f} MB"
              + ("  (read back)" if cached else f"  ({time.perf_counter() - t0:.0f} s)"), flush=True)

    docs = series([points[(n, args.tokens)] for n in dict.fromkeys(args.sizes)], "n_docs")
    lengths = (series([points[(args.length_docs, t)] for t in dict.fromkeys(args.lengths)], "tokens")
               if args.lengths else None)
    first = next(iter(points.values()))
    result = {
        "command": "python evals/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "device": first["device"], "gpu": first.get("gpu"), "torch": first["torch"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "note": args.note,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "settings": {"sizes": args.sizes, "tokens": args.tokens, "lengths": args.lengths,
                     "length_docs": args.length_docs, "k": first["k"], "pool": 3 * first["k"],
                     "layers": first["layers"], "first_step": args.first_step, "work_dir": args.work_dir},
        "criteria": {"linear_or_better": f"time exponent <= {LINEAR}",
                     "below_timer_floor": f"every time < {TIMER_FLOOR_S} s: fixed overhead, counted as met",
                     "working_rss": "peak RSS of the stage minus RSS once the model is loaded; below "
                                    f"{MEMORY_FLOOR_MB} MB on every size counts as met",
                     "peak_rss_per_stage": all(p["peak_rss_is_per_stage"] for p in points.values())},
        "documents": docs, "lengths": lengths, "goals": goals(docs),
        "points": {f"n{n}_t{t}": p for (n, t), p in points.items()},
        "seconds": time.perf_counter() - wall,
    }
    print()
    print(table(f"seconds against documents n (at {args.tokens} tokens per document)", docs))
    if lengths and len(lengths["values"]) > 1:
        print()
        print(table(f"seconds against tokens per document (at {args.length_docs} documents)", lengths))
    print("  * every time below the timer floor: fixed overhead, its exponent is noise\n")
    for g, ok in result["goals"].items():
        print(f"{'not run' if ok is None else 'met    ' if ok else 'MISSED '}  {g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(result, png)
    print(f"\nwrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
