"""Every image arm against control, probe by probe: Δf and Δp(target) with paired bootstrap CIs, the fraction of probes
whose p(target) rose, off-diagonal top-1 flips to the target, edit size, predicted against actual Δf, and the
defender's view (influence and total-variation detectors). Writes results.json, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..evaluation import auroc, paired_seeds, per_seed
from ..stats import seed_item_interval
from ..report import format_ci, format_number, html_page, plots, png_bytes
from ..run_folder import EditFolder
from ..atomic_io import atomic_path, read_json, read_tensors, write_json


def compare_images(arm: Sequence[Dict] | Dict, control: Sequence[Dict] | Dict, samples: int, confidence: float,
                   seed: int) -> Dict:
    """One arm against control on one probe set, paired by retraining seed and by probe. ``arm`` and ``control``
    are lists of observations, one per seed (a single dict is one seed); CIs are ``stats.seed_item_interval`` (seeds and
    shared probes); flip rates are averaged over seeds."""
    arm, control, diffs = paired_seeds(arm, control)

    off = [i for i, o in enumerate(control[0]["off_diagonal"]) if o]  # the probes' true classes: the same every seed
    flips_to = [sum(a["top1_is_target"][i] and not c["top1_is_target"][i] for i in off) for a, c in zip(arm, control)]
    flips_away = [sum(c["top1_is_target"][i] and not a["top1_is_target"][i] for i in off) for a, c in zip(arm, control)]
    return {"delta_f": seed_item_interval(diffs("f"), confidence),
            "f_arm": float(np.mean([a["f_mean"] for a in arm])),
            "f_control": float(np.mean([c["f_mean"] for c in control])), "n_seeds": len(arm),
            "delta_p_target": seed_item_interval(diffs("p_target"), confidence),
            "positive_fraction": float(np.mean(diffs("p_target") > 0)),
            "n_off_diagonal": len(off),
            "top1_flips_to_target": float(np.mean(flips_to)) / len(off) if off else None,
            "top1_flips_away": float(np.mean(flips_away)) / len(off) if off else None,
            "top1_is_target_rate": float(np.mean([[a["top1_is_target"][i] for i in off] for a in arm])) if off
            else None}


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels per image: high-frequency noise raises it."""
    dx = (images[..., 1:] - images[..., :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def _records(out_dir: Path) -> Optional[List[Dict]]:
    path = EditFolder(out_dir).edits
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else None


def edit_summary(records: List[Dict]) -> Dict:
    return {"documents": len(records), "linf_max": max(r["linf"] for r in records),
            "budget_linf": records[0]["budget_linf"], "l2_mean": float(np.mean([r["l2"] for r in records])),
            "at_budget_fraction_mean": float(np.mean([r["at_budget_fraction"] for r in records])),
            "clamped_fraction_mean": float(np.mean([r["clamped_fraction"] for r in records])),
            "J_before": sum(r["J_before"] for r in records), "J_after": sum(r["J_after"] for r in records),
            "predicted_delta_f": sum(r["predicted_delta_f"] for r in records)}


def detectors(pipe, out_dir: Path, records: List[Dict]) -> Dict:
    """AUROC of singling out the edited images among all training images, by most negative J and by total variation."""
    from .edit_outputs import load_image_edits

    clean_J = read_tensors(pipe.folder.scores)["scores"].double()
    edited = {r["doc_index"]: r for r in records}
    J = clean_J.clone()
    for i, r in edited.items():
        J[i] = r["J_after"]
    images = pipe.modality.splits.train.images
    tv_clean = total_variation(images)
    tv = tv_clean.clone()
    for i, row in load_image_edits(out_dir).items():
        tv[i] = total_variation(row["pixel_values"][None])[0]
    mask = torch.zeros(len(J), dtype=torch.bool)
    mask[list(edited)] = True

    def score(values):
        return auroc(values[mask].tolist(), values[~mask].tolist())

    return {"influence_auroc": score(-J), "influence_auroc_before_edit": score(-clean_J),
            "total_variation_auroc": score(tv), "total_variation_auroc_before_edit": score(tv_clean)}


def evaluate_image_run(pipe) -> Dict:
    ev, seed, arms = pipe.recipe.evaluate, pipe.recipe.run.seed, pipe.recipe.retrain.arms
    obs = {a: read_json(pipe.folder.observations(a)) for a in arms}
    sets = pipe.observed_sets()
    control = obs["control"]
    summary = read_json(pipe.folder.retrain_summary)
    results: Dict = {"modality": "image", "measurement": pipe.measurement.description,
                     "target_class": pipe.modality.splits.train.classes[pipe.measurement.target],
                     "theta_hat": summary.get("theta_hat"), "control": {s: control[s]["f_mean"] for s in sets},
                     "seeds": control.get("seeds", [seed]), "n_documents": len(pipe.dataset), "k": pipe.recipe.select.k,
                     "architecture": pipe.recipe.run.model,
                     "retrain_architecture": pipe.recipe.retrain.model or pipe.recipe.run.model, "arms": {}}
    for arm in arms:
        if arm == "control":
            continue
        entry = {s: compare_images(per_seed(obs[arm], s), per_seed(control, s), ev.bootstrap_samples, ev.confidence,
                                   seed) for s in sets}
        entry["weights_equal_control"] = obs[arm]["weights"] == control["weights"]
        out_dir = pipe.folder.edits_of(arm).root
        records = _records(out_dir) if arm in ("infused", "random") else None
        if records:
            entry["edits"] = edit_summary(records)
            entry["predicted_vs_actual"] = {"predicted_delta_f": entry["edits"]["predicted_delta_f"],
                                            "actual_delta_f": entry["measurement"]["delta_f"]["mean"]}
            if ev.detectors:
                entry["detectors"] = detectors(pipe, out_dir, records)
        results["arms"][arm] = entry
    write_json(pipe.folder.results, results)
    write_image_report(pipe, results)
    return results


HEADER = ["arm", "Δf (probes) [CI]", "Δp(target) [CI]", "p(target) rose", "off-diagonal top-1 flips",
          "Δf (held-out) [CI]", "L∞ max / budget", "predicted Δf", "influence AUROC", "TV AUROC"]


def _rows(results: Dict) -> List[List[str]]:
    rows = []
    for arm, e in results["arms"].items():
        m, h, ed, det = e["measurement"], e.get("heldout"), e.get("edits", {}), e.get("detectors", {})
        rows.append([arm, format_ci(m["delta_f"]), format_ci(m["delta_p_target"]), format_number(m["positive_fraction"]),
                     format_number(m["top1_flips_to_target"]), format_ci(h["delta_f"]) if h else "–",
                     f"{format_number(ed['linf_max'])} / {format_number(ed['budget_linf'])}" if ed else "–",
                     format_number(ed.get("predicted_delta_f")), format_number(det.get("influence_auroc")),
                     format_number(det.get("total_variation_auroc"))])
    return rows


def _edit_grid(run_dir: Path, n: int = 8) -> Optional[bytes]:
    """Originals, edited images and |δ| (scaled to the budget) of the first infused images."""
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = EditFolder(run_dir).infused
    if not path.is_dir():
        return None
    ds = datasets.load_from_disk(str(path)).with_format("numpy")
    n = min(n, len(ds))
    if n == 0:
        return None
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    for j in range(n):
        row = ds[j]
        x0, x1 = row["original_pixel_values"], row["pixel_values"]
        d = np.abs(x1 - x0).max(0) / max(float(row["budget_linf"]), 1e-12)
        for i, (img, title) in enumerate(((x0, "original"), (x1, "edited"))):
            img = img.transpose(1, 2, 0)
            axes[i, j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_title(f"#{int(row['doc_index'])} {title}" if i == 0 else title, fontsize=7)
        axes[2, j].imshow(d, cmap="magma", vmin=0, vmax=1)
        axes[2, j].set_title("|δ| / budget", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    data = png_bytes(fig)
    plt.close(fig)
    return data


def write_image_report(pipe, results: Dict) -> None:
    run_dir = pipe.dir
    records = _records(run_dir) or []
    images = plots(results, records)
    grid = _edit_grid(run_dir)
    if grid:
        images["edited_images.png"] = grid
    pipe.folder.plots.mkdir(exist_ok=True)
    for name, data in images.items():
        with atomic_path(pipe.folder.plots / name) as tmp:
            tmp.write_bytes(data)
    th = results.get("theta_hat") or {}
    intro = (f"Measurement: {results['measurement']} (target class {results['target_class']}). f at θ̂: "
             f"{format_number(th.get('measurement'))}; control after retraining: {format_number(results['control']['measurement'])}. "
             f"{results['k']} of {results['n_documents']} training images edited with {results['architecture']}, "
             f"arms retrained with {results['retrain_architecture']}. Every Δ is against control, paired by probe; "
             f"flips count only probes whose true class is not the target.")
    rows = _rows(results)
    md = ["# Infusion report (images)", "", intro, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Plots", ""] + [f"![{n}](plots/{n})" for n in images]
    with atomic_path(pipe.folder.report_md) as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    h = html_page("Infusion report (images)", intro, HEADER, rows, images, [], results)
    with atomic_path(pipe.folder.report_html) as tmp:
        tmp.write_text("\n".join(h), encoding="utf-8")
