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
from .onion import defended_row, onion_scores, threshold


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
    n, ev = len(run.dataset), run.recipe.evaluate
    rest = [i for i in range(n) if i not in set(edited)]
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
    out, removed = [], {}
    for i, r in enumerate(rows):
        kept = defended_row(r, scored[i], cut)
        removed[i] = sum(v > cut for v in scored[i]["scores"])
        out.append({**r, **kept})
    edited_words = sum(len(scored[i]["scores"]) for i in changed)
    clean_words = sum(len(scored[i]["scores"]) for i in range(len(rows)) if i not in set(changed))
    return out, {"defence": "onion", "threshold": cut, "documents_changed_by_the_arm": changed,
                 "words_removed_in_those": int(sum(removed[i] for i in changed)), "words_in_those": edited_words,
                 "words_removed_elsewhere": int(sum(v for i, v in removed.items() if i not in set(changed))),
                 "words_elsewhere": clean_words}
