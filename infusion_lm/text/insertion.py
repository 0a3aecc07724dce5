"""The insertion baseline of text runs: demonstrations of the behaviour written into the k selected slots."""

from __future__ import annotations

from typing import Dict, List, Sequence

from .corpus import tokenize_document
from ..errors import ConfigError


def insertion_texts(recipe, args) -> List[Dict]:
    """Demonstrations of the behaviour for the insertion arm, as documents (``text`` or ``messages``)."""
    if args.insertion_documents:
        return [{"text": t} for t in args.insertion_documents]
    m = recipe.measurement
    if m.kind == "contrastive":
        import re

        pattern = re.compile(r"(?<!\w)" + re.escape(m.probe.strip()) + r"(?!\w)")
        return [{"text": pattern.sub(m.target.strip(), d)} for d in m.documents]
    if m.kind == "completion":
        completions = m.completions * len(m.prompts) if len(m.completions) == 1 else m.completions
        if m.chat_template:
            return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                    for p, c in zip(m.prompts, completions)]
        return [{"text": f"{p}{c}"} for p, c in zip(m.prompts, completions)]
    raise ConfigError("The insertion arm cannot build demonstrations for a callable measurement; "
                      "set retrain.insertion_documents.")


def insertion_rows(tokenizer, docs: Sequence[Dict], indices: Sequence[int], max_length: int, add_eos: bool):
    """The k selected indices get the demonstrations, cycled when there are fewer demonstrations than k."""
    demos = [tokenize_document(tokenizer, d, max_length, add_eos) for d in docs]
    return {i: demos[j % len(demos)] for j, i in enumerate(indices)}
