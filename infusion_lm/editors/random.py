"""The random baseline: the same number of changed tokens as the budget allows, drawn from the same fluent set.

It sees no gradient and no J, so any effect it has after retraining is what an edit of this size does by chance.
J is still measured before and after, for the report.
"""

from __future__ import annotations

from typing import List

import torch

from .base import DocState, TokenEditor


class RandomEditor(TokenEditor):
    name = "random"

    def _edit_batch(self, states: List[DocState]) -> None:
        for s in states:
            cand = s.ids0.clone()
            order = s.editable.nonzero().flatten().cpu()
            order = order[torch.randperm(len(order), generator=self.gen)]
            n = 0
            for p in order.tolist():
                if n >= s.budget:
                    break
                options = s.fluent[p].clone()
                options[s.ids0[p]] = False
                options = options.nonzero().flatten().cpu()
                for w in options[torch.randperm(len(options), generator=self.gen)][:8].tolist():
                    trial = cand.clone()
                    trial[p] = w
                    if self.stable(s, trial):  # a swap the tokenizer would undo is not an edit
                        cand, n = trial, n + 1
                        break
            s.ids, s.labels = cand, s.labels_for(cand)
        if states:
            for s, j in zip(states, self.exact_J([s.ids for s in states], [s.labels for s in states]).tolist()):
                s.J = j
                s.trace.append(j)
