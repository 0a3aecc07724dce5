"""The natural editor: the swap editor's search (exact J, the same proposals and budget), restricted to edits a reader
and a word-level defence would not notice.

A swap is kept only if it is
- **a whole word for a whole word**: the replaced token is a word of its own (a leading space, letters only, and the
  next token starts a new word or is punctuation), and so is the new one, with the same capitalisation. No "Thefish",
  no "mouthball", no "fish" where a sentence starts with "The".
- **natural from the left**: among the model's own top-k / top-p at that position (the swap editor's fluency mask),
  and its surprisal there at most the ``natural_surprisal_quantile`` of the surprisals of the original tokens of the
  documents being edited (a word no more unexpected than the text's own unusual words).
- **natural from the right**: the words after it must still follow. The summed log-likelihood of every later token
  may drop by at most ``natural_right_nats``; left-context proposals alone give "Once and a time".

Each step ranks the fluent candidates as the swap editor does and keeps the best one that passes both checks (checked
in that order, one forward pass each, so a step pays for checks only until one passes). The whole-document perplexity
limit still holds.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ...causal_lm import IGNORE_INDEX, upcast
from .base import DocState
from .random import FluentTargetEditor
from .swap import SwapEditor


def word_vocabulary(tokenizer, vocab_size: int):
    """Per token: is it a whole word with a leading space (letters only), is it capitalised, and does it glue onto
    the token before it (starts with a letter: a word's continuation)."""
    word = torch.zeros(vocab_size, dtype=torch.bool)
    upper = torch.zeros(vocab_size, dtype=torch.bool)
    glues = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        word[i] = len(text) > 1 and text[0] == " " and text[1:].isalpha()
        upper[i] = text.strip()[:1].isupper()
        glues[i] = text[:1].isalpha()
    return word, upper, glues


class NaturalConstraints:
    """The natural checks, for any editor (a mixin before the editor class): whole-word positions and tokens of the
    same case in ``prepare``; the surprisal cap and the right-context bound in ``accept``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        word, upper, glues = word_vocabulary(self.tok, self.vocab_size)
        self.word, self.upper, self.glues = word.to(self.device), upper.to(self.device), glues.to(self.device)
        # the right-context check is per swap: candidates carry one swap each (renaming would change several words)
        self.args = dataclasses.replace(self.args, swaps_per_candidate=1, rename=False)

    def word_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] bool: positions holding a whole one-token word (the next token does not continue it)."""
        nxt = torch.cat([ids[1:], ids[-1:]])
        follows = ~self.glues[nxt]
        follows[-1] = True
        return self.word[ids] & follows

    @torch.no_grad()
    def token_nll(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[T]: −log p(token t | tokens < t) under θ̂ at trained positions, 0 elsewhere (and at t = 0)."""
        logits = upcast(self.model(input_ids=ids[None]).logits[0, :-1])
        nll = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
        return torch.cat([nll.new_zeros(1), nll])

    def prepare(self, rows):
        states = super().prepare(rows)
        if not states:
            return states
        # the surprisal cap: a quantile of the original tokens' own surprisals, over the documents being edited
        own = []
        for st in states:
            st.nll = self.token_nll(st.ids, st.labels)
            own.append(st.nll[1:][st.labels[1:] != IGNORE_INDEX])
        q = self.args.natural_surprisal_quantile
        self.cap = float(torch.quantile(torch.cat(own).double(), q)) if q < 1 else float("inf")
        for st in states:
            positions = self.word_positions(st.ids0) & st.editable
            same_case = self.upper[None, :] == self.upper[st.ids0][:, None]
            st.fluent &= positions[:, None] & self.word[None, :] & same_case
        return states

    def accept(self, st: DocState, cand: torch.Tensor, labels: torch.Tensor) -> bool:
        """The left cap on each new word's surprisal and the right-context bound, against the document as it is."""
        if st.nll is None:
            return True
        nll = self.token_nll(cand, labels)
        changed = (cand != st.ids).nonzero().flatten()
        if len(changed) == 0:
            return False
        if bool((nll[changed] > self.cap).any()):
            return False
        after = torch.zeros(len(cand), dtype=torch.bool, device=cand.device)
        after[int(changed.min()) + 1:] = True
        after[changed] = False
        return float((nll - st.nll)[after].sum()) <= self.args.natural_right_nats

    def accepted(self, st: DocState, cand: torch.Tensor, labels: torch.Tensor) -> None:
        st.nll = self.token_nll(cand, labels)


class NaturalEditor(NaturalConstraints, SwapEditor):
    """The swap editor's search under the natural checks (``edit.editor: natural``)."""

    name = "natural"
    revision = 1


class NaturalTargetEditor(NaturalConstraints, FluentTargetEditor):
    """The natural free attack (arm ``natural_target``): the target word where it fits both sides, cheapest first,
    under the same natural checks as the natural editor and matched in count to the infused edit. No influence: it
    isolates what influence adds once both edits are natural."""

    name = "natural_target"
