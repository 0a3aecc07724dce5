"""The paper's text editor, kept as a baseline: projected gradient descent on relaxed one-hot documents.

Each editable position holds a distribution p_t over its allowed tokens (the same fluent set the swap editor uses).
The relaxed document feeds the model p_t · E_eff as its input embedding and uses p_t as a soft label for position
t−1, so both paths of the swap editor are present. Each step lowers the relaxed J by a gradient step, then projects:

1. onto the probability simplex restricted to the allowed tokens (sort-based, vectorised over positions);
2. onto an *upper* bound on the Gini entropy 1 − Σ p², pushing p away from the uniform distribution over its support
   until the bound holds. (The reference code enforced the opposite inequality; here a test checks the bound after
   projection.)

Every ``eval_every`` steps the relaxation is discretised (argmax per position, the most confident changes first: one
candidate with the first 1, 2, … budget of them, each kept if the text retokenises) and the candidates are scored with
the exact forward-only J; each document keeps the best discrete edit seen within the perplexity limit, so J never rises
above the original's.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.func import functional_call

from ...causal_lm import IGNORE_INDEX, upcast
from .base import DocState, TokenEditor, effective_embeddings, pad_rows


def project_simplex(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euclidean projection of each row of x ([..., V]) onto {p ≥ 0, Σp = 1, p = 0 outside mask}."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if not bool(mask.any(-1).all()):
        raise ValueError("project_simplex: a row has no allowed entry.")
    u = torch.where(mask, x, torch.full_like(x, float("-inf"))).sort(dim=-1, descending=True).values
    finite = torch.isfinite(u)
    css = torch.where(finite, u, torch.zeros_like(u)).cumsum(-1)
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cond = finite & (u - (css - 1) / k > 0)  # true on a prefix of the sorted row
    rho = cond.sum(-1, keepdim=True).clamp(min=1)
    theta = (css.gather(-1, rho - 1) - 1) / rho.to(x.dtype)
    return torch.where(mask, (x - theta).clamp(min=0), torch.zeros_like(x))


def gini_entropy(p: torch.Tensor) -> torch.Tensor:
    return 1 - (p * p).sum(-1)


def project_entropy(p: torch.Tensor, bound: float, mask: Optional[torch.Tensor] = None, iters: int = 40) -> torch.Tensor:
    """Rows of p (on the simplex) with Gini entropy above ``bound`` are moved to Gini entropy ≤ bound.

    Along the ray c + s(p − c) from the uniform distribution c over p's support, re-projected onto the simplex, the
    entropy falls as s grows; bisection finds the smallest s ≥ 1 that meets the bound, keeping the upper end so the
    bound holds exactly. Rows with nowhere to go (p uniform on its support) become one-hot at their first argmax.
    """
    if mask is None:
        mask = torch.ones_like(p, dtype=torch.bool)
    out = p.clone()
    over = gini_entropy(p) > bound
    if not bool(over.any()):
        return out
    q, m = p[over], mask[over]
    support = q > 0
    c = support.to(q.dtype) / support.sum(-1, keepdim=True).to(q.dtype)
    d = q - c

    def at(s):
        return project_simplex(c + s[:, None] * d, m)

    lo = torch.ones(q.shape[0], dtype=q.dtype, device=q.device)
    hi = lo.clone()
    for _ in range(60):  # grow hi until the bound holds (or give up: d ≈ 0)
        bad = gini_entropy(at(hi)) > bound
        if not bool(bad.any()):
            break
        hi = torch.where(bad, hi * 2, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = gini_entropy(at(mid)) <= bound
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    res = at(hi)
    stuck = gini_entropy(res) > bound
    if bool(stuck.any()):
        res[stuck] = torch.nn.functional.one_hot(q[stuck].argmax(-1), q.shape[-1]).to(q.dtype)
    out[over] = res
    return out


class SimplexPGDEditor(TokenEditor):
    revision = 1  # 1: nested discretisation (a cached baseline edit from revision 0 is redone)
    name = "simplex_pgd"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.E = effective_embeddings(self.model)

    def _relaxed_grad(self, P: torch.Tensor, batch, tied: torch.Tensor) -> torch.Tensor:
        """∂J_relaxed/∂P, [B, T, V], from one backward pass per perturbed parameter set."""
        dtype = next(self.model.parameters()).dtype
        grad = torch.zeros_like(P)
        trained = (batch["labels"][:, 1:] != IGNORE_INDEX)
        hard = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), P.shape[-1]).to(P.dtype)
        for sign, params in ((+1, self.J.plus), (-1, self.J.minus)):
            Pg = P.detach().requires_grad_(True)
            embeds = (Pg @ self.E).to(dtype)
            logits = functional_call(self.model, params, args=(), kwargs={
                "inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}).logits
            logp = torch.log_softmax(upcast(logits[:, :-1]).float(), dim=-1)
            target = torch.where(tied[:, 1:, None], Pg[:, 1:], hard[:, 1:])  # soft labels follow the relaxed tokens
            loss = -((target * logp).sum(-1) * trained).sum()
            (g,) = torch.autograd.grad(loss, [Pg])
            grad += sign * g / (2 * self.J.eps)
            del logits, logp, loss
        return grad

    def _discretise(self, s: DocState, Pb: torch.Tensor) -> List[torch.Tensor]:
        """Discrete documents from the relaxation: the argmax change at the 1, 2, … budget most confident positions
        (each a candidate that retokenises). Scoring them all lets the perplexity limit keep the largest edit that
        passes, instead of rejecting the whole budget when its last changes are the costly ones."""
        T = len(s.ids0)
        conf, arg = Pb[:T].max(-1)
        changed = ((arg != s.ids0) & s.editable).nonzero().flatten()
        changed = changed[conf[changed].argsort(descending=True)][: s.budget].tolist()
        out = []
        for n in range(len(changed), 0, -1):
            cand = s.ids0.clone()
            cand[changed[:n]] = arg[changed[:n]]
            if self.stable(s, cand):
                out.append(cand)
        return out

    def _edit_batch(self, states: List[DocState]) -> None:
        if not states:
            return
        a = self.args
        V = self.vocab_size
        batch = pad_rows([s.ids0 for s in states], [s.lab0 for s in states], self.pad_id)
        B, T = batch["input_ids"].shape
        tied = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        free = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        support = torch.zeros(B, T, V, dtype=torch.bool, device=self.device)
        for b, s in enumerate(states):
            n = len(s.ids0)
            tied[b, :n] = s.label_tied
            free[b, :n] = s.editable
            support[b, :n] = s.fluent
        support[torch.arange(B)[:, None], torch.arange(T)[None], batch["input_ids"]] = True  # the original stays allowed
        P = torch.nn.functional.one_hot(batch["input_ids"], V).float()
        for step in range(1, a.steps + 1):
            g = self._relaxed_grad(P, batch, tied)
            g = torch.where(support & free[..., None], g, torch.zeros_like(g))
            scale = g.abs().flatten(1).amax(-1).clamp(min=1e-30)[:, None, None]
            stepped = P - a.pgd_lr * g / scale
            proj = project_simplex(stepped[free], support[free])
            P[free] = project_entropy(proj, a.entropy_bound, support[free])
            if step % a.eval_every == 0 or step == a.steps:
                owners, cands = [], []
                for b, s in enumerate(states):
                    for c in self._discretise(s, P[b]):
                        owners.append(s)
                        cands.append(c)
                if cands:
                    js, losses = self.exact(cands, [o.labels_for(c) for o, c in zip(owners, cands)])
                    for s, c, j, loss in zip(owners, cands, js.tolist(), losses.tolist()):
                        if j < s.J and s.fluent_enough(loss):
                            s.ids, s.labels, s.J = c, s.labels_for(c), j
                for s in states:
                    s.trace.append(s.J)
