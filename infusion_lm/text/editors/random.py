"""The random baselines: the same documents, random fluent swaps, no gradient and no J in the choice of tokens.

- matched (arm ``random``, the default): each document gets exactly as many changed tokens as the infused edit of
  that document, under the same constraints (fluency filter, special tokens, protected positions, retokenisation,
  perplexity limit). Only the choice of positions and tokens differs from the infused edit, so any gap between the
  two arms is what the choice buys.
- unmatched (arm ``random_unmatched``): the whole budget, no perplexity limit.
- target word (arm ``random_target``, :class:`RandomTargetEditor`): matched as ``random`` is, but every change writes
  one of the measurement's target words (a single-token form of it) at a random editable position. It is the cheap
  attack that needs no influence at all: sprinkle the target word into the k documents. An infused edit whose changes
  are mostly the target word must beat it to show that influence chose *where* to write it.
- target word where it fits (arm ``fluent_target``, :class:`FluentTargetEditor`): the same attack with the language
  model's help and still no influence: the target word at the positions where it costs the document the least loss
  (one forward pass), cheapest first. Under a perplexity limit the random placement spends the budget on costly
  positions and places fewer words than asked; this one places as many as the limit allows. Placing the word where
  the model already expects it also teaches the model less (the loss there is low), so measure both.
- the target word where it is natural (arm ``natural_target``, in ``natural.py``): fluent_target under the natural
  editor's checks (whole words, the surprisal cap, the right-context bound).

J is still measured before and after, for the report.
"""

from __future__ import annotations

from typing import List

import torch

from .base import DocState, TokenEditor


class RandomEditor(TokenEditor):
    name = "random"
    options_per_position = 8
    needs_cost = False  # the per-swap loss table is read only for the perplexity limit

    def options_at(self, s: DocState, p: int) -> torch.Tensor:
        """[V] bool: the tokens a random change may write at position ``p`` (a copy)."""
        return s.fluent[p].clone()

    def position_order(self, s: DocState, cost) -> List[int]:
        """The editable positions in the order they are tried: random."""
        order = s.editable.nonzero().flatten().cpu()
        return order[torch.randperm(len(order), generator=self.gen)].tolist()

    def option_order(self, options: torch.Tensor, cost_p) -> torch.Tensor:
        """The allowed tokens at one position (indices) in the order they are tried: random."""
        return options[torch.randperm(len(options), generator=self.gen)]

    def _edit_batch(self, states: List[DocState]) -> None:
        import math

        for s in states:
            target = s.budget if s.target is None else min(s.target, s.budget)
            cost = allowed_loss = None
            if s.max_ppl_ratio is not None or self.needs_cost:
                # The loss a swap adds at its own label position, read off one forward pass of the original: options
                # that alone would break the perplexity limit are skipped before the exact check.
                with torch.no_grad():
                    logp = torch.log_softmax(self.model(input_ids=s.ids0[None]).logits[0].float(), -1)
                cost = torch.zeros(len(s.ids0), logp.shape[-1], device=logp.device)
                cost[1:] = logp[:-1].gather(-1, s.ids0[1:, None]) - logp[:-1]
                if s.max_ppl_ratio is not None:
                    allowed_loss = s.L0 + s.n_trained * math.log(s.max_ppl_ratio)
            current = s.L0  # the document's loss at θ̂, updated with each accepted swap
            order = self.position_order(s, cost)
            n, used = 0, set()
            # A first pass tries a few random options per position; where that leaves the count short of the
            # target (the perplexity limit rejected them), a second pass tries every option at the positions left.
            passes = [(p, self.options_per_position) for p in order] + [(p, None) for p in order]
            for p, tries in passes:
                if n >= target:
                    break
                if p in used:
                    continue
                options = self.options_at(s, p)
                options[s.ids0[p]] = False
                if allowed_loss is not None:
                    options &= cost[p] <= allowed_loss - current
                options = options.nonzero().flatten().cpu()
                trials = []
                for w in self.option_order(options, None if cost is None else cost[p])[:tries].tolist():
                    trial = s.ids.clone()
                    trial[p] = w
                    if self.stable(s, trial):  # a swap the tokenizer would undo is not an edit
                        trials.append(trial)
                if not trials:
                    continue
                losses = [None] * len(trials)
                if s.max_ppl_ratio is not None:  # the options that stay within the limit
                    losses = self.losses_at_theta(trials, [s.labels_for(t) for t in trials]).tolist()
                    kept = [i for i, loss in enumerate(losses) if s.fluent_enough(loss)]
                    trials, losses = [trials[i] for i in kept], [losses[i] for i in kept]
                # the first (in this editor's order) that passes any further check
                pick = next((i for i, t in enumerate(trials) if self.accept(s, t, s.labels_for(t))), None)
                if pick is None:
                    continue
                if losses[pick] is not None:
                    current = losses[pick]
                s.ids, s.labels = trials[pick], s.labels_for(trials[pick])
                self.accepted(s, s.ids, s.labels)
                used.add(p)
                n += 1
        if states:
            for s, j in zip(states, self.exact_J([s.ids for s in states], [s.labels for s in states]).tolist()):
                s.J = j
                s.trace.append(j)


class RandomTargetEditor(RandomEditor):
    """Random positions, the target word: each change writes one of the measurement's target words (any of its
    single-token forms) where the perplexity limit allows, as many changes as the infused edit made."""

    name = "random_target"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not bool(self.always.any()):
            from ...errors import ConfigError

            raise ConfigError("retrain arm random_target writes the target words, but there are none: give "
                              "edit.target_words, or use a contrastive measurement (its target is the word).")

    def options_at(self, s: DocState, p: int) -> torch.Tensor:
        return s.fluent[p] & self.always


class FluentTargetEditor(RandomTargetEditor):
    """The target word where the model finds it least surprising: positions ordered by the loss that writing the
    cheapest single-token form of a target word there adds (one forward pass of the original document), the cheapest
    form first at each; as many changes as the infused edit made, under the same limits. No gradient and no J: the
    influence-free attack that also uses the language model."""

    name = "fluent_target"
    needs_cost = True

    def position_order(self, s: DocState, cost) -> List[int]:
        positions = s.editable.nonzero().flatten()
        allowed = s.fluent[positions] & self.always  # [P, V]: a target form the fluency filter keeps there
        allowed[torch.arange(len(positions)), s.ids0[positions]] = False  # writing the word already there is no change
        table = cost[positions].masked_fill(~allowed, float("inf"))
        cheapest = table.min(-1).values.cpu()
        # ties (and positions where no form is allowed, cost inf) keep the random order of a seeded shuffle
        shuffle = torch.randperm(len(positions), generator=self.gen)
        ranked = shuffle[torch.argsort(cheapest[shuffle], stable=True)]
        return positions.cpu()[ranked].tolist()

    def option_order(self, options: torch.Tensor, cost_p) -> torch.Tensor:
        return options[torch.argsort(cost_p[options.to(cost_p.device)].cpu(), stable=True)]  # cheapest form first
