"""The swap editor (the default): embedding-gradient-guided token swaps, scored exactly with the forward-only J.

Proposals, a first-order prediction of ΔJ for putting token w at position t:
- input path: g_t · (E_eff[w] − E_eff[x_t]), with g_t = ∂J/∂e_t from two backward passes through the input embeddings
  and E_eff the embedding of every token through the model's own embedding module (so any scale it applies counts);
- label path: x_t is also the label at position t−1, so ΔJ gains
  [−(log p⁺_{t−1}(w) − log p⁻_{t−1}(w)) + (log p⁺_{t−1}(x_t) − log p⁻_{t−1}(x_t))] / 2ε, read off the same two passes.

Search, per step and for a batch of documents at once: at each editable position keep the top-k tokens by predicted
decrease; draw candidates with one or a few swaps each; score them exactly (by default rerunning only the positions
after a candidate's first change, on the document's KV cache; or all documents' candidates in one padded batch);
each document keeps its best candidate if it lowers J. A document stops after ``patience`` steps without improvement.
Once a document has spent its budget, only its already-changed positions may move (including back to the original).
With ``rename``, a swap a→b also comes as a candidate that changes every later occurrence of a to b, so a renamed
entity stays consistent (one swap alone leaves the document contradicting itself, which costs perplexity).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.func import functional_call

from ...causal_lm import IGNORE_INDEX, per_document_loss_from_logits, upcast
from .base import DocState, TokenEditor, effective_embeddings, pad_rows


class SwapEditor(TokenEditor):
    name = "swap"

    group_size = 4  # candidates per shared swap position

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.E = effective_embeddings(self.model)

    # ---------------------------------------------------------------- first-order proposals
    def predicted_delta_batch(self, ids: List[torch.Tensor], labels: List[torch.Tensor],
                              use_label_path: Optional[bool] = None) -> List[torch.Tensor]:
        """Predicted ΔJ for every (position, token), one [T, V] tensor per document."""
        use_label_path = self.args.use_label_path if use_label_path is None else use_label_path
        batch = pad_rows(ids, labels, self.pad_id)
        emb_mod = self.model.get_input_embeddings()
        grads, logps = [], []
        for params in (self.J.plus, self.J.minus):
            e = emb_mod(batch["input_ids"]).detach().requires_grad_(True)
            logits = functional_call(self.model, params, args=(), kwargs={
                "inputs_embeds": e, "attention_mask": batch["attention_mask"]}).logits
            loss = per_document_loss_from_logits(logits, batch["labels"]).sum()
            (g,) = torch.autograd.grad(loss, [e])
            grads.append(g.float())
            if use_label_path:
                logps.append(torch.log_softmax(upcast(logits.detach()).float(), dim=-1))
            del logits, loss
        two_eps = 2 * self.J.eps
        g = (grads[0] - grads[1]) / two_eps  # ∂J/∂e_t, [B, T, d]
        out = []
        for b, x in enumerate(ids):
            T = len(x)
            gb = g[b, :T]
            delta = gb @ self.E.T - (gb * self.E[x]).sum(-1, keepdim=True)  # input path, [T, V]
            if use_label_path:
                dlog = (logps[0][b, : T - 1] - logps[1][b, : T - 1]) / two_eps  # (log p⁺ − log p⁻)/2ε, [T−1, V]
                cur = dlog.gather(-1, x[1:, None])
                trained = (labels[b][1:] != IGNORE_INDEX).float()[:, None]
                delta[1:] += (cur - dlog) * trained
            out.append(delta)
        return out

    def predicted_delta(self, ids: torch.Tensor, labels: torch.Tensor, use_label_path: Optional[bool] = None) -> torch.Tensor:
        """Predicted ΔJ for every (position, token), [T, V], for one document."""
        return self.predicted_delta_batch([ids.to(self.device)], [labels.to(self.device)], use_label_path)[0]

    # ---------------------------------------------------------------- search
    def _candidates(self, st: DocState, delta: torch.Tensor) -> List[torch.Tensor]:
        a = self.args
        ok = st.fluent.clone()
        ok[torch.arange(len(st.ids)), st.ids] = False
        changed = st.ids != st.ids0
        if int(changed.sum()) >= st.budget:
            ok &= changed[:, None]  # at the budget, only already-changed positions move
            ok[changed, st.ids0[changed]] = True  # ... including back to the original token
        scores = torch.where(ok, delta, torch.full_like(delta, float("inf")))
        top_val, top_tok = scores.topk(min(a.topk, scores.shape[1]), dim=1, largest=False)
        valid = torch.isfinite(top_val)
        positions = valid.any(dim=1).nonzero().flatten().cpu()
        if len(positions) == 0:
            return []
        n_valid = valid.sum(dim=1).cpu()
        # Candidates come in groups that share their first swap position (GCG-style: a few positions, several tokens
        # each), so the prefix cache reruns each group's suffix once per group instead of once per candidate.
        per_position = min(a.topk, self.group_size)
        pool = a.n_candidates * a.candidate_pool
        n_positions = min(len(positions), -(-pool // per_position))
        chosen = positions[torch.randperm(len(positions), generator=self.gen)[:n_positions]].tolist()
        cands, seen = [], set()
        for p in chosen:
            order = torch.randperm(int(n_valid[p]), generator=self.gen)[:per_position].tolist()
            later = [q for q in positions.tolist() if q > p]
            for j in order:
                cand = st.ids.clone()
                cand[p] = top_tok[p, j]
                for q in (torch.tensor(later)[torch.randperm(len(later), generator=self.gen)[: a.swaps_per_candidate - 1]].tolist()
                          if later and a.swaps_per_candidate > 1 else []):
                    cand[q] = top_tok[q, int(torch.randint(int(n_valid[q]), (1,), generator=self.gen))]
                variants = [cand]
                if a.rename:  # the same swap at every later occurrence of the replaced token, where allowed there
                    same = (st.ids == st.ids[p]) & st.fluent[:, top_tok[p, j]]
                    same[: p + 1] = False
                    if same.any():
                        renamed = cand.clone()
                        renamed[same] = top_tok[p, j]
                        variants.append(renamed)
                for c in variants:
                    key = tuple(c.tolist())
                    if key in seen or int((c != st.ids0).sum()) > st.budget or not self.stable(st, c):
                        continue
                    seen.add(key)
                    cands.append(c)
        if a.candidate_pool > 1 and len(cands) > a.n_candidates:
            # Probe sampling (as nanoGCG does): rank the pool by the first-order ΔJ of its swaps and score only the
            # most promising exactly.
            pred = torch.stack([delta[(c != st.ids).nonzero().flatten(), c[c != st.ids]].sum() for c in cands])
            cands = [cands[i] for i in torch.argsort(pred.cpu(), stable=True)[: a.n_candidates].tolist()]
        return cands

    def _choice_key(self, s: DocState, j: float, loss: float) -> float:
        """How a step ranks a document's fluent candidates (lower first). ``lowest_j``: J itself. ``j_per_nat``: the
        drop in J per nat of loss the swap adds (at least ``NAT_FLOOR``), so a step prefers swaps that leave room
        under the perplexity limit for further swaps over one swap that spends it all; candidates that do not lower
        J rank last."""
        if self.args.choose == "lowest_j":
            return j
        gain = s.J - j
        if gain <= 0:
            return float("inf")
        return -gain / max(loss - (s.L0 if s.L is None else s.L), self.NAT_FLOOR)

    NAT_FLOOR = 1.0  # a swap that adds under one nat (or lowers the loss) is ranked by its drop in J alone

    def _edit_batch(self, states: List[DocState]) -> None:
        for _ in range(self.args.steps):
            active = [s for s in states if not s.done]
            if not active:
                break
            deltas = self.predicted_delta_batch([s.ids for s in active], [s.labels for s in active])
            owners, rows, labs = [], [], []
            for s, delta in zip(active, deltas):
                cands = self._candidates(s, delta)
                if not cands:
                    s.stale += 1
                for c in cands:
                    owners.append(s); rows.append(c); labs.append(s.labels_for(c))
            js, losses = self.score_candidates(owners, rows, labs)
            ranked = {}  # per document: its fluent candidates as (key, candidate, labels, J, loss)
            for s, c, l, j, loss in zip(owners, rows, labs, js, losses):
                if s.fluent_enough(loss):
                    ranked.setdefault(id(s), []).append((self._choice_key(s, j, loss), c, l, j, loss))
            for s in active:
                options = sorted(ranked.get(id(s), []), key=lambda o: o[0])  # the lowest key first (stable)
                pick = next((o for o in options if o[3] < s.J and self.accept(s, o[1], o[2])), None)
                if pick is not None:
                    _, c, l, j, loss = pick
                    s.ids, s.labels, s.J, s.L, s.stale = c, l, j, loss, 0
                    self.accepted(s, c, l)
                elif options:
                    s.stale += 1
                s.trace.append(s.J)
                if s.stale >= self.args.patience:
                    s.done = True
