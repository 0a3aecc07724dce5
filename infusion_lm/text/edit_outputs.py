"""The edit stage's outputs: the infused documents, their edit records, and the whole corpus with them in place.

    infused/           datasets.Dataset (save_to_disk), one row per edited document:
                       doc_index, text, original_text, input_ids, original_input_ids, labels, n_changed,
                       changed_positions, budget, J_before, J_after, predicted_delta_f, perplexity_before,
                       perplexity_after, editor
    edits.jsonl        the same records plus J_trace, each document's J after every step
    infused_corpus/    datasets.Dataset with every document: doc_index, text, input_ids, labels, edited

``text`` is the decoded token ids (special tokens kept for chat documents, dropped for plain text). A plain-text
document truncated to max_length is edited, and stored, as its first max_length tokens; unedited plain-text documents
keep their original text. Retraining uses
``input_ids``/``labels`` directly, so the model sees exactly the optimised tokens; the retokenisation filter
guarantees ``text`` encodes back to them. ``predicted_delta_f = −(J_after − J_before) / n`` with n the corpus size
for the factors' v, and n = 1 for the optimizer's (its batch weighting is inside v). The original corpus is never
touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..causal_lm import IGNORE_INDEX
from ..run_folder import EditFolder
from ..atomic_io import atomic_dir, atomic_path


def _is_chat(labels: Sequence[int]) -> bool:
    return bool(labels) and labels[0] == IGNORE_INDEX


def _decode(tokenizer, ids: Sequence[int], labels: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=not _is_chat(labels))


def edit_records(tokenizer, indices: Sequence[int], results, n_docs: int, editor: str,
                 ppl_before: Sequence[float], ppl_after: Sequence[float],
                 predicted: Optional[Sequence[float]] = None) -> List[Dict]:
    """One record per edited document. predicted_delta_f is ``predicted`` (a calibrated model of the retraining) where
    given, else −ΔJ / n_docs with the editing v (kept as predicted_delta_f_same_v either way)."""
    records = []
    for j, (i, r, pb, pa) in enumerate(zip(indices, results, ppl_before, ppl_after)):
        same_v = -(float(r.J_after) - float(r.J_before)) / n_docs
        records.append({
            "doc_index": int(i),
            "text": _decode(tokenizer, r.input_ids, r.labels),
            "original_text": _decode(tokenizer, r.original_ids, r.labels),
            "input_ids": list(r.input_ids),
            "original_input_ids": list(r.original_ids),
            "labels": list(r.labels),
            "n_changed": r.n_changed,
            "changed_positions": list(r.changed_positions),
            "budget": r.budget,
            "J_before": float(r.J_before),
            "J_after": float(r.J_after),
            "predicted_delta_f": float(predicted[j]) if predicted is not None else same_v,
            "predicted_delta_f_same_v": same_v,
            "perplexity_before": float(pb),
            "perplexity_after": float(pa),
            "editor": editor,
            "J_trace": [float(j) for j in r.J_trace],
        })
    return records


def write_edit_outputs(out_dir: Path, tokenizer, dataset, records: List[Dict], documents: Sequence[Dict] = ()) -> None:
    """Writes infused/, edits.jsonl and infused_corpus/ atomically into ``out_dir``.

    Unedited plain-text documents keep their original text (untruncated) when ``documents`` is given.
    """
    import datasets

    out = EditFolder(out_dir)
    with atomic_path(out.edits) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rows = [{k: v for k, v in r.items() if k != "J_trace"} for r in records]
    with atomic_dir(out.infused) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    by_index = {r["doc_index"]: r for r in records}
    corpus = []
    for i in range(len(dataset)):
        row = dataset[i]
        if i in by_index:
            r = by_index[i]
            corpus.append({"doc_index": i, "text": r["text"], "input_ids": r["input_ids"], "labels": r["labels"], "edited": True})
        else:
            doc = documents[i] if i < len(documents) else {}
            text = doc["text"] if "text" in doc else _decode(tokenizer, row["input_ids"], row["labels"])
            corpus.append({"doc_index": i, "text": text,
                           "input_ids": list(row["input_ids"]), "labels": list(row["labels"]), "edited": False})
    with atomic_dir(out.infused_corpus) as tmp:
        datasets.Dataset.from_list(corpus).save_to_disk(str(tmp))


def load_infused(out_dir: Path):
    import datasets

    return datasets.load_from_disk(str(EditFolder(out_dir).infused))


def load_infused_corpus(out_dir: Path):
    import datasets

    return datasets.load_from_disk(str(EditFolder(out_dir).infused_corpus))
