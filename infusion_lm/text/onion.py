"""ONION (Qi et al., EMNLP 2021), the standard word-level defence against text poisoning, run the way a defender runs
it: with the public base model and nothing from the attacker.

Each word w_i of a document s gets a suspicion score ``ppl(s) − ppl(s without w_i)``: a word whose removal makes the
document much more likely is one the text did not want. The defender removes every word whose score passes a
threshold set on the clean corpus alone (the score that ``removal_rate`` of clean words pass).

A word is a run of tokens that starts at a token whose text begins with whitespace (or at the first token the
document trains on) and ends before the next such token, so "Thefish" is one word and "sad." another. Only the
tokens a document trains on are words (a chat prompt is never scored), and perplexity is over those tokens, as in
:func:`infusion_lm.causal_lm.perplexities`. Deleting a word deletes its tokens: no retokenisation, so the defended
document is exactly the tokens that remain.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..causal_lm import IGNORE_INDEX
from ..stats import auroc

Span = Tuple[int, int]


def word_spans(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> List[Span]:
    """Token spans [a, b) of a document's words (see the module docstring); special tokens are never words."""
    special = set(tokenizer.all_special_ids)
    spans: List[Span] = []
    start = None
    for t, (tok, lab) in enumerate(zip(input_ids, labels)):
        scored = lab != IGNORE_INDEX and tok not in special
        if not scored:
            if start is not None:
                spans.append((start, t))
                start = None
            continue
        text = tokenizer.decode([tok])
        if start is None:
            start = t
        elif text[:1].isspace():
            spans.append((start, t))
            start = t
    if start is not None:
        spans.append((start, len(input_ids)))
    return spans


def without(row: Dict, spans: Sequence[Span]) -> Dict:
    """The row with the tokens of ``spans`` deleted (input_ids and labels together)."""
    drop = {t for a, b in spans for t in range(a, b)}
    keep = [t for t in range(len(row["input_ids"])) if t not in drop]
    return {"input_ids": [row["input_ids"][t] for t in keep], "labels": [row["labels"][t] for t in keep]}


def onion_scores(model, tokenizer, rows: Sequence[Dict], pad_token_id: int, batch_size: int = 8,
                 desc: Optional[str] = None) -> List[Dict]:
    """Per document, ``{"spans": [[a, b], ...], "scores": [...], "perplexity": ppl(s)}``: each word's ONION score.

    Exact: each deletion is scored as its own document. But a deletion of [a, b) leaves the first a tokens as they
    were, so their keys and values come from the original's cache and only the tokens after the word are run again
    (about half the work of running every variant whole). Small batches of neighbouring words keep the suffixes of
    one batch about the same length, so little of it is padding."""
    from tqdm.auto import tqdm

    spans = [word_spans(tokenizer, r["input_ids"], r["labels"]) for r in rows]
    out = []
    quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")  # passing disable= overrides tqdm's own env
    bar = tqdm(total=sum(len(sp) for sp in spans), desc=desc or "ONION word scores", leave=False,
               disable=quiet or (desc is None and len(rows) < 4))
    for r, sp in zip(rows, spans):
        base, deleted = _deletion_perplexities(model, r, sp, batch_size, bar)
        out.append({"spans": [list(x) for x in sp], "scores": [base - p for p in deleted], "perplexity": base})
    bar.close()
    return out


def _perplexity(logits, ids, labels) -> float:
    """exp(mean NLL) of the trained tokens, the way :func:`infusion_lm.causal_lm.perplexities` computes it."""
    from ..causal_lm import per_document_loss_from_logits

    nll = per_document_loss_from_logits(logits[None], labels[None]).double()[0]
    n = max(int((labels[1:] != IGNORE_INDEX).sum()), 1)
    return math.exp(float(nll) / n)


@torch.no_grad()
def _deletion_perplexities(model, row: Dict, spans: Sequence[Span], batch_size: int, bar) -> Tuple[float, List[float]]:
    """ppl of the document and of the document without each span, the tokens before each span read from a cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.as_tensor(row["input_ids"], device=device)
    labels = torch.as_tensor(row["labels"], device=device)
    L = len(ids)
    full = model(input_ids=ids[None], use_cache=True)
    logits0, cache0 = full.logits[0], full.cache
    base = _perplexity(logits0, ids, labels)
    result: List[float] = []
    for c in range(0, len(spans), batch_size):
        chunk = spans[c: c + batch_size]
        width = max(L - b for a, b in chunk)
        if width == 0:  # every span runs to the end: nothing after it to rerun
            result.extend(_perplexity(logits0[:a], ids[:a], labels[:a]) for a, b in chunk)
            bar.update(len(chunk))
            continue
        B = len(chunk)
        suffix = torch.full((B, width), int(ids[-1]), dtype=torch.long, device=device)
        mask = torch.zeros((B, L + width), dtype=torch.long, device=device)
        positions = torch.zeros((B, width), dtype=torch.long, device=device)
        for i, (a, b) in enumerate(chunk):
            suffix[i, : L - b] = ids[b:]
            mask[i, :a] = 1  # the cached prefix before the word; the word and what followed it are masked
            mask[i, L: L + L - b] = 1
            positions[i] = a + torch.arange(width, device=device)
        cache = DynamicCache(config=model.config)
        for layer, src in zip(range(len(cache0.layers)), cache0.layers):
            cache.update(src.keys.expand(B, -1, -1, -1).contiguous(), src.values.expand(B, -1, -1, -1).contiguous(),
                         layer)
        logits = model(input_ids=suffix, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
        for i, (a, b) in enumerate(chunk):
            kept_ids = torch.cat([ids[:a], ids[b:]])
            kept_labels = torch.cat([labels[:a], labels[b:]])
            # positions before a: the original's logits (same prefix); from a on: the rerun suffix
            kept_logits = torch.cat([logits0[:a], logits[i, : L - b]])
            result.append(_perplexity(kept_logits, kept_ids, kept_labels))
        bar.update(B)
    return base, result


def threshold(clean: Mapping[int, Dict], removal_rate: float) -> float:
    """The score that a fraction ``removal_rate`` of the clean corpus's words pass: the defender's cut, set on clean
    text alone (``clean``: ONION of clean documents, by index)."""
    scores = np.concatenate([np.asarray(d["scores"], dtype=float) for d in clean.values() if d["scores"]])
    return float(np.quantile(scores, 1.0 - removal_rate))


def defended_row(row: Dict, doc: Dict, cut: float) -> Dict:
    """The document the defender keeps: every word scoring above ``cut`` removed."""
    return without(row, [tuple(s) for s, v in zip(doc["spans"], doc["scores"]) if v > cut])


def _changed_words(doc: Dict, changed_positions: Sequence[int]) -> List[bool]:
    changed = set(changed_positions)
    return [any(t in changed for t in range(a, b)) for a, b in doc["spans"]]


def _max_score(doc: Dict) -> float:
    return max(doc["scores"]) if doc["scores"] else -math.inf


def onion_report(records: Sequence[Dict], edited: Sequence[Dict], clean: Mapping[int, Dict], cut: float,
                 top: int = 3) -> Dict:
    """What ONION does to one arm's edits.

    ``records`` are the arm's edit records (doc_index, changed_positions), ``edited`` ONION on their edited
    documents (same order), ``clean`` ONION on clean documents by index (the edited documents' originals among them),
    ``cut`` the defender's threshold.

    - changed_word_auroc: changed words against the unchanged words of the same edited documents;
    - top1_hit_rate / top3_hit_rate: edited documents whose highest (3 highest) scores include a changed word;
    - changed_words_removed: changed words the defender's cut removes (beside clean_words_removed, its cost);
    - document_auroc: each document's highest word score, edited documents against the clean documents not edited
      (and ``document_auroc_before_edit``: the same documents before the edit).
    """
    pos, neg, hits1, hits3, removed, n_docs = [], [], 0, 0, 0, 0
    for r, d in zip(records, edited):
        flags = _changed_words(d, r["changed_positions"])
        if not any(flags):
            continue
        n_docs += 1
        for s, f in zip(d["scores"], flags):
            (pos if f else neg).append(s)
            removed += int(f and s > cut)
        ranked = np.argsort(-np.asarray(d["scores"]), kind="stable")
        hits1 += int(flags[ranked[0]])
        hits3 += int(any(flags[j] for j in ranked[:top]))
    idx = {int(r["doc_index"]) for r in records}
    others = [_max_score(c) for i, c in clean.items() if i not in idx]
    clean_scores = [s for c in clean.values() for s in c["scores"]]
    return {
        "documents": n_docs, "changed_words": len(pos), "threshold": cut,
        "changed_word_auroc": auroc(pos, neg) if pos and neg else None,
        "top1_hit_rate": hits1 / n_docs if n_docs else None,
        f"top{top}_hit_rate": hits3 / n_docs if n_docs else None,
        "changed_words_removed": removed / len(pos) if pos else None,
        "clean_words_removed": float(np.mean(np.asarray(clean_scores) > cut)) if clean_scores else None,
        "document_auroc": auroc([_max_score(d) for d in edited], others) if others else None,
        "document_auroc_before_edit": auroc([_max_score(clean[int(r["doc_index"])]) for r in records], others)
        if others else None,
    }
