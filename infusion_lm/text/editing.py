"""The text edit step, shared by the pipeline's edit stage (and its edited baselines) and :func:`~infusion_lm.infuse`:
the editor on the selected rows, then one record per edit (text before and after, J, perplexity, predicted Δf)."""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple


def edit_documents(model, tokenizer, v, args, rows: Sequence[Mapping], indices: Sequence[int], *, fd_eps_rel: float,
                   words: Sequence[str], divisor: int, predict: Optional[Callable] = None,
                   targets: Optional[List[int]] = None, starts: Optional[List[Optional[list]]] = None,
                   progress: bool = True) -> Tuple[list, List[dict], List[dict]]:
    """Edits ``rows`` (the training rows at ``indices``) with ``args.editor`` against v.

    ``words``: the words the measurement promotes (the editors may write them); ``divisor``: predicted Δf = −ΔJ/divisor
    where ``predict(indices, before, after)`` gives none; ``targets``: changes per row (a baseline matched to the
    infused edit); ``starts``: tokens to continue from (the selection's first step).
    Returns (the editor's results, the edited rows, the records)."""
    from ..causal_lm import perplexities
    from .edit_outputs import edit_records
    from .editors import build_editor

    editor = build_editor(model, tokenizer, v, args, fd_eps_rel, target_words=list(words))
    results = editor.edit_many(list(rows), progress=progress, targets=targets, starts=starts)
    pad = tokenizer.pad_token_id
    after = [{"input_ids": list(r.input_ids), "labels": list(r.labels)} for r in results]
    ppl_before, ppl_after = perplexities(model, list(rows), pad), perplexities(model, after, pad)
    predicted = predict(list(indices), list(rows), after) if predict is not None else None
    records = edit_records(tokenizer, list(indices), results, divisor, args.editor, ppl_before, ppl_after, predicted)
    return results, after, records


def first_step_drops(model, tokenizer, v, args, rows: Sequence[Mapping], *, fd_eps_rel: float, words: Sequence[str],
                     progress: bool = True) -> List[tuple]:
    """(drop in J, tokens reached) of one swap-editor step on each row: what ``select.rank_by: first_step`` ranks by."""
    from .editors import first_step

    results = first_step(model, tokenizer, v, args, list(rows), fd_eps_rel, list(words), progress)
    return [(r.J_before - r.J_after, r.input_ids) for r in results]
