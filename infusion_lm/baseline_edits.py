"""Baseline edits (random, random_target, simplex_pgd ...): the selected documents edited by another editor, cached
under baselines/<arm>/ by the edit stage's fingerprint, so a rerun or a resumed run reuses them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from .atomic_io import read_json, write_json
from .distributed import barrier, is_main
from .fingerprints import fingerprint


def baseline_edits(pipe, arm: str, indices: List[int], editor: Optional[str] = None, matched: bool = False,
                   counts_from: Optional[List[int]] = None, **overrides) -> Path:
    """baselines/<arm>/: the documents ``indices`` edited by the arm's editor (``editor``, default the arm's name),
    cached by the edit stage's fingerprint. The modality says how the arm differs from the infused edit: ``matched``
    gives each document as many changes as its infused edit made (``counts_from``: as the infused edit of these
    documents made, in order, for an arm that edits other documents); ``overrides`` are edit settings of the arm's
    own (text's ``random_unmatched``: no perplexity limit)."""
    out_dir = pipe.folder.baseline(arm).root
    revision = pipe.modality.editor_revision(editor or arm)  # an editor's own fix redoes its cached edits
    fp = fingerprint({"edit": pipe.stage_fingerprint("edit"), "arm": arm, "version": 2,
                      **({"revision": revision} if revision else {}),
                      **({"documents": list(indices), "counts_from": list(counts_from)} if counts_from else {})})
    marker = pipe.folder.baseline(arm).fingerprint
    if is_main() and not (marker.is_file() and read_json(marker).get("fingerprint") == fp):
        args = dataclasses.replace(pipe.recipe.edit, editor=editor or arm, **overrides)
        targets = None
        if matched:
            counts = {r["doc_index"]: r["n_changed"] for r in pipe.edit()}
            targets = [counts[i] for i in (counts_from or indices)]
        pipe.modality.edit_into(out_dir, args, indices, targets)
        write_json(marker, {"fingerprint": fp})
    barrier()
    return out_dir

