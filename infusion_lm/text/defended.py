"""The defender's side of a run: ONION on the clean corpus (cached, shared by the detectors and the defended retrain)
and the corpus a defender keeps after filtering what it received (the ``<arm>+onion`` arms).

Both read only what a defender has: the base model, the tokenizer and the corpus. ``run`` is the pipeline or a
modality's RunContext (recipe, dir, base_model, tokenizer, dataset, stage_fingerprint).
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

from ..atomic_io import read_json, write_json
from ..fingerprints import fingerprint
from .onion import defended_row, onion_report, onion_scores, threshold


def clean_onion(run, indices: Sequence[int]) -> Dict[int, Dict]:
    """ONION on the clean documents ``indices``, by index. One forward pass per word, so the scores are cached in
    ``defences/`` per corpus and base model (the checkpoint key covers both), and only documents not scored yet run."""
    key = fingerprint({"checkpoint": run.stage_fingerprint("checkpoint"), "defence": "onion"})
    path = run.dir / "defences" / f"onion-clean-{key}.json"
    done = {int(k): v for k, v in read_json(path)["documents"].items()} if path.is_file() else {}
    todo = sorted(set(int(i) for i in indices) - set(done))
    if todo:
        rows = run.dataset
        docs = onion_scores(run.base_model, run.tokenizer, [rows[i] for i in todo], run.tokenizer.pad_token_id,
                            desc=f"ONION, {len(todo)} clean documents")
        done.update(zip(todo, docs))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"fingerprint": key, "documents": {str(i): d for i, d in sorted(done.items())}})
    return {int(i): done[int(i)] for i in indices}


def detector_sample(run, edited: Sequence[int]) -> List[int]:
    """The clean documents the ONION detector scores: the edited documents' originals, and the rest of the corpus or
    ``evaluate.onion_clean_documents`` of it drawn with the run's seed."""
    n, ev, edited = len(run.dataset), run.recipe.evaluate, set(edited)
    rest = [i for i in range(n) if i not in edited]
    if ev.onion_clean_documents is not None and ev.onion_clean_documents < len(rest):
        rest = random.Random(run.recipe.run.seed).sample(rest, ev.onion_clean_documents)
    return sorted(set(edited) | set(rest))


def defended_corpus(run, rows: List[Dict], label: Optional[str] = None) -> Tuple[List[Dict], Dict]:
    """What a defender trains on after ONION: every document of the received corpus ``rows`` with its words above
    the cut removed. The cut removes ``evaluate.onion_removal_rate`` of the words of the clean corpus, whole (set on
    clean text alone). Documents identical to the clean ones reuse the cached scores; the others (the arm's edits) are
    scored here. Returns the rows and a summary: words removed, in edited and in clean documents."""
    clean_rows = run.dataset
    clean = clean_onion(run, range(len(clean_rows)))
    cut = threshold(clean, run.recipe.evaluate.onion_removal_rate)
    changed = [i for i, r in enumerate(rows) if list(r["input_ids"]) != list(clean_rows[i]["input_ids"])]
    scored = dict(clean)
    if changed:
        docs = onion_scores(run.base_model, run.tokenizer, [rows[i] for i in changed], run.tokenizer.pad_token_id,
                            desc=f"ONION, {label or 'received'} documents")
        scored.update(zip(changed, docs))
    out = [{**r, **defended_row(r, scored[i], cut)} for i, r in enumerate(rows)]
    removed = [sum(v > cut for v in scored[i]["scores"]) for i in range(len(rows))]
    words = [len(scored[i]["scores"]) for i in range(len(rows))]
    mine = set(changed)
    return out, {"defence": "onion", "threshold": cut, "documents_changed_by_the_arm": changed,
                 "words_removed_in_those": int(sum(removed[i] for i in mine)),
                 "words_in_those": sum(words[i] for i in mine),
                 "words_removed_elsewhere": int(sum(removed[i] for i in range(len(rows)) if i not in mine)),
                 "words_elsewhere": sum(words[i] for i in range(len(rows)) if i not in mine)}


def arm_onion(base_model, tokenizer, records: List[Dict], clean: Dict[int, Dict], cut: float,
              label: Optional[str] = None) -> Dict:
    """ONION on one arm's edited documents (its edit records), reported against the clean documents' scores and the
    defender's cut (:func:`infusion_lm.text.onion.onion_report`)."""
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
    edited = onion_scores(base_model, tokenizer, rows, tokenizer.pad_token_id, desc=f"ONION, {label or 'edits'}")
    return onion_report(records, edited, clean, cut)
