"""The discrete token editor: embedding-gradient-guided swaps that lower J(z) = ⟨∇θ L(z), v⟩ (DESIGN.md §1).

Lowering J(z) raises f after training, since replacing z by z' changes f by about −(J(z') − J(z)) / n.

Objective: the forward-only finite difference J(x) = [L(x; θ̂+εv) − L(x; θ̂−εv)] / 2ε.

Proposals, a first-order prediction of ΔJ for putting token w at position t:
- input path: g_t · (E_eff[w] − E_eff[x_t]), with g_t = ∂J/∂e_t from two backward passes through the input embeddings
  and E_eff the embedding of every token through the model's own embedding module (so any scale it applies counts);
- label path: x_t is also the label at position t−1, so ΔJ gains
  [−(log p⁺_{t−1}(w) − log p⁻_{t−1}(w)) + (log p⁺_{t−1}(x_t) − log p⁻_{t−1}(x_t))] / 2ε, read off the same two passes.

Search: at each editable position keep the top-k tokens by predicted decrease; sample a batch of candidates with one
or a few swaps each; score them exactly with the forward-only J; keep the best if it lowers J; repeat.

Constraints that keep edits real text: a budget of changed tokens, new tokens only from the base model's own top-k
prediction at that position (fluency), never special tokens, optionally ASCII only, only trained (unmasked) positions,
and retokenisation stability (decode then encode gives the same ids).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from .corpus import IGNORE_INDEX
from .influence import FiniteDifferenceJ
from .losses import per_document_loss_from_logits, upcast

logger = logging.getLogger(__name__)


@dataclass
class SwapConfig:
    budget_fraction: float = 0.08  # of a document's editable tokens
    max_changed: Optional[int] = None  # absolute cap on changed tokens per document
    topk: int = 16  # proposals kept per position
    n_candidates: int = 32  # candidates scored exactly per step
    swaps_per_candidate: int = 1
    steps: int = 20
    patience: int = 4  # stop after this many steps without improvement
    fluency_topk: int = 64  # new tokens must be in the base model's top-k at that position; 0 disables
    ascii_only: bool = False
    use_label_path: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")
        if self.max_changed is not None and self.max_changed < 0:
            raise ValueError("max_changed must be >= 0")
        for name in ("topk", "n_candidates", "swaps_per_candidate", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class EditResult:
    original_ids: List[int]
    input_ids: List[int]
    labels: List[int]
    J_before: float
    J_after: float
    changed_positions: List[int]
    J_trace: List[float] = field(default_factory=list)

    @property
    def n_changed(self) -> int:
        return len(self.changed_positions)


def effective_embeddings(model) -> torch.Tensor:
    """E_eff: every token through the model's own embedding module, [V, d]."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        ids = torch.arange(emb.num_embeddings, device=emb.weight.device)
        return emb(ids).float()


def allowed_vocabulary(tokenizer, vocab_size: int, ascii_only: bool = False) -> torch.Tensor:
    """Boolean [V]: tokens an edit may introduce. Never special tokens; optionally ASCII-only tokens."""
    ok = torch.ones(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    for i in special:
        if 0 <= i < vocab_size:
            ok[i] = False
    if len(tokenizer) < vocab_size:
        ok[len(tokenizer):] = False  # padded embedding rows are not real tokens
    if ascii_only:
        for i in range(min(vocab_size, len(tokenizer))):
            if ok[i] and not tokenizer.decode([i]).isascii():
                ok[i] = False
    return ok


def retokenises(tokenizer, ids: Sequence[int], add_special: bool) -> bool:
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"] == list(ids)


class SwapEditor:
    """Edits documents to lower J(z) with the forward-only objective and gradient-guided proposals."""

    def __init__(self, model, tokenizer, v: Mapping[str, torch.Tensor], config: SwapConfig = SwapConfig(),
                 eps: Optional[float] = None, eps_rel: float = 1e-4):
        self.model = model
        self.tok = tokenizer
        self.cfg = config
        self.J = FiniteDifferenceJ(model, v, eps=eps, eps_rel=eps_rel)
        self.device = next(model.parameters()).device
        self.E = effective_embeddings(model)
        self.allowed = allowed_vocabulary(tokenizer, self.E.shape[0], config.ascii_only).to(self.device)
        self.gen = torch.Generator().manual_seed(config.seed)

    # ---------------------------------------------------------------- exact objective
    @torch.no_grad()
    def exact_J(self, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Forward-only J for a batch of same-length rows, chunked, halving the chunk on out-of-memory."""
        out, i = [], 0
        while i < ids.shape[0]:
            chunk = slice(i, i + batch_size)
            batch = {"input_ids": ids[chunk], "attention_mask": torch.ones_like(ids[chunk]), "labels": labels[chunk]}
            try:
                out.append(self.J(batch).double())
                i += batch_size
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return torch.cat(out)

    # ---------------------------------------------------------------- first-order proposals
    def predicted_delta(self, ids: torch.Tensor, labels: torch.Tensor, use_label_path: Optional[bool] = None) -> torch.Tensor:
        """Predicted ΔJ for every (position, token), [T, V], for one document (ids: [T])."""
        use_label_path = self.cfg.use_label_path if use_label_path is None else use_label_path
        emb_mod = self.model.get_input_embeddings()
        x = ids[None]
        mask = torch.ones_like(x)
        grads, logps = [], []
        for params in (self.J.plus, self.J.minus):
            e = emb_mod(x).detach().requires_grad_(True)
            logits = functional_call(self.model, params, args=(), kwargs={"inputs_embeds": e, "attention_mask": mask}).logits
            loss = per_document_loss_from_logits(logits, labels[None]).sum()
            (g,) = torch.autograd.grad(loss, [e])
            grads.append(g[0].float())
            logps.append(torch.log_softmax(upcast(logits[0]).detach().float(), dim=-1))
        two_eps = 2 * self.J.eps
        g = (grads[0] - grads[1]) / two_eps  # ∂J/∂e_t, [T, d]
        delta = g @ self.E.T - (g * self.E[ids]).sum(-1, keepdim=True)  # input path, [T, V]
        if use_label_path:
            dlog = (logps[0] - logps[1]) / two_eps  # [T, V]: (log p⁺ − log p⁻)/2ε at each position's prediction
            label_term = torch.zeros_like(delta)
            cur = dlog[:-1].gather(-1, ids[1:, None])  # for the current token at t (predicted at t−1)
            label_term[1:] = -dlog[:-1] + cur
            trained = (labels[1:] != IGNORE_INDEX).float()[:, None]
            delta[1:] = delta[1:] + label_term[1:] * trained
        return delta

    @torch.no_grad()
    def fluent_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, V] tokens the base model itself ranks in its top-k at each position (position 0: none)."""
        T = ids.shape[0]
        ok = torch.zeros(T, self.E.shape[0], dtype=torch.bool, device=self.device)
        if self.cfg.fluency_topk <= 0:
            ok[1:] = True
            return ok
        logits = self.model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits[0, :-1]
        top = logits.topk(min(self.cfg.fluency_topk, logits.shape[-1]), dim=-1).indices
        ok[1:].scatter_(1, top, True)
        return ok

    def editable_positions(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        special = ~self.allowed[ids]  # never rewrite a special token (eos, chat markers)
        pos = (labels != IGNORE_INDEX) & ~special
        pos[0] = False  # the first token has no prediction to constrain it
        return pos

    # ---------------------------------------------------------------- search
    def edit(self, input_ids: Sequence[int], labels: Sequence[int]) -> EditResult:
        cfg = self.cfg
        ids0 = torch.as_tensor(list(input_ids), device=self.device)
        lab0 = torch.as_tensor(list(labels), device=self.device)
        label_tied = lab0 == ids0  # labels that are the tokens themselves follow the edit; masked ones stay masked
        editable = self.editable_positions(ids0, lab0)
        n_edit = int(editable.sum())
        budget = int(math.floor(cfg.budget_fraction * n_edit))
        if cfg.max_changed is not None:
            budget = min(budget, cfg.max_changed)
        add_special = self.tok(self.tok.decode(list(input_ids)), add_special_tokens=True)["input_ids"] == list(input_ids)
        cur_ids, cur_lab = ids0.clone(), lab0.clone()
        j0 = float(self.exact_J(cur_ids[None], cur_lab[None])[0])
        cur_j, trace, stale = j0, [j0], 0
        fluent = self.fluent_mask(ids0)  # the base model's plausible tokens, at the original context
        if budget == 0 or n_edit == 0:
            return EditResult(list(input_ids), list(input_ids), list(labels), j0, j0, [], trace)
        for _ in range(cfg.steps):
            delta = self.predicted_delta(cur_ids, cur_lab)
            ok = fluent & self.allowed[None, :] & editable[:, None]
            ok[torch.arange(len(cur_ids)), cur_ids] = False
            changed = cur_ids != ids0
            if int(changed.sum()) >= budget:
                ok &= changed[:, None]  # at the budget, only already-changed positions move
                ok[changed, ids0[changed]] = True  # ... including back to the original token
            scores = torch.where(ok, delta, torch.full_like(delta, float("inf")))
            k = min(cfg.topk, scores.shape[1])
            top_val, top_tok = scores.topk(k, dim=1, largest=False)
            valid = torch.isfinite(top_val)
            positions = valid.any(dim=1).nonzero().flatten()
            if len(positions) == 0:
                break
            cands = []
            for _c in range(cfg.n_candidates):
                cand = cur_ids.clone()
                picks = positions[torch.randperm(len(positions), generator=self.gen)[: cfg.swaps_per_candidate].to(positions.device)]
                for p in picks.tolist():
                    n_valid = int(valid[p].sum())
                    cand[p] = top_tok[p, int(torch.randint(n_valid, (1,), generator=self.gen))]
                if int((cand != ids0).sum()) > budget:
                    continue
                if not retokenises(self.tok, cand.tolist(), add_special):
                    continue
                cands.append(cand)
            if not cands:
                stale += 1
                if stale >= cfg.patience:
                    break
                continue
            cand_ids = torch.stack(cands)
            cand_lab = torch.where(label_tied[None], cand_ids, cur_lab[None].expand_as(cand_ids))
            js = self.exact_J(cand_ids, cand_lab)
            best = int(js.argmin())
            if float(js[best]) < cur_j:
                cur_ids, cur_lab, cur_j = cand_ids[best], cand_lab[best], float(js[best])
                stale = 0
            else:
                stale += 1
            trace.append(cur_j)
            if stale >= cfg.patience:
                break
        changed_pos = (cur_ids != ids0).nonzero().flatten().tolist()
        return EditResult(list(input_ids), cur_ids.tolist(), cur_lab.tolist(), j0, cur_j, changed_pos, trace)
