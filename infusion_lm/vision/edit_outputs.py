"""The edit stage's outputs for images, with the same names as for text:

    infused/           datasets.Dataset, one row per edited image: doc_index, label, pixel_values, original_pixel_values
                       (float32 [C, H, W] in [0, 1]), J_before, J_after, predicted_delta_f, linf, l2, mean_abs,
                       at_budget_fraction, clamped_fraction, budget_linf, editor
    edits.jsonl        the same records without the pixels, plus J_trace (J after every step)
    infused_corpus/    perturbations.safetensors (indices [k], delta [k, C, H, W]) and source.json: the training
                       split is rebuilt from the recipe's corpus and the deltas added (``apply_infused``). Only the
                       perturbation and its indices are stored, as in Witches' Brew: the corpus itself is never copied
                       or touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..run_folder import EditFolder
from ..atomic_io import atomic_dir, atomic_path, read_json, read_tensors, write_json, write_tensors


def image_edit_records(indices: Sequence[int], results, n_docs: int, editor: str, linf: float) -> List[Dict]:
    records = []
    for i, r in zip(indices, results):
        records.append({"doc_index": int(i), "label": r.label, "J_before": r.J_before, "J_after": r.J_after,
                        "predicted_delta_f": -(r.J_after - r.J_before) / n_docs, **r.stats(linf),
                        "budget_linf": float(linf), "editor": editor, "J_trace": list(r.J_trace)})
    return records


def write_image_edit_outputs(out_dir: Path, indices: Sequence[int], results, records: List[Dict], source: Dict) -> None:
    import datasets

    out = EditFolder(out_dir)
    with atomic_path(out.edits) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rows = [{**{k: v for k, v in rec.items() if k != "J_trace"}, "pixel_values": r.pixel_values.float().numpy(),
             "original_pixel_values": r.original.float().numpy()} for rec, r in zip(records, results)]
    with atomic_dir(out.infused) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    with atomic_dir(out.infused_corpus) as tmp:
        delta = torch.stack([r.delta.float() for r in results]) if results else torch.zeros(0)
        write_tensors(tmp / "perturbations.safetensors",
                      {"indices": torch.as_tensor(list(indices), dtype=torch.long), "delta": delta.contiguous()})
        write_json(tmp / "source.json", source)


def load_image_edits(out_dir: Path) -> Dict[int, Dict[str, torch.Tensor]]:
    """{doc_index: {"pixel_values", "labels"}} of an edit folder (the run folder or baselines/<arm>)."""
    import datasets

    ds = datasets.load_from_disk(str(EditFolder(out_dir).infused)).with_format("torch")
    return {int(r["doc_index"]): {"pixel_values": r["pixel_values"].float(), "labels": r["label"].long()} for r in ds}


def apply_infused(images: torch.Tensor, out_dir: Path) -> torch.Tensor:
    """The training images with the stored perturbations added: the infused corpus, rebuilt."""
    folder = EditFolder(out_dir).infused_corpus
    t = read_tensors(folder / "perturbations.safetensors")
    out = images.clone()
    if len(t["indices"]):
        edited = out[t["indices"]] + t["delta"]
        # an edit made with `edit.pixel_clamp: false` is rebuilt as it was made, outside [0, 1] where it went there
        out[t["indices"]] = edited.clamp(0, 1) if read_json(folder / "source.json").get("pixel_clamp", True) else edited
    return out
