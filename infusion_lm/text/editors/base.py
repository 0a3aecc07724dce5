"""What every token editor shares: the exact objective, the constraints that keep edits real text, and the result.

An editor lowers J(z) = ⟨∇θ L(z), v⟩ of each selected document; replacing z by the edited z' then changes f by about
−(J(z') − J(z)) / n. The exact objective is the forward-only finite difference
J(x) = [L(x; θ̂+εv) − L(x; θ̂−εv)] / 2ε, evaluated on padded batches of documents.

Constraints (shared by the swap, simplex PGD and random editors, so baselines are compared at equal footing):
- a budget of changed tokens per document, ``floor(budget_fraction × editable tokens)``, optionally capped;
- new tokens only from the base model's own top-k / top-p prediction at that position, in the original context;
- never special tokens (eos, chat markers, added tokens), optionally ASCII only;
- only trained positions (labels ≠ −100), so the prompt and system parts of chat documents are protected unless
  ``allow_prompt_edits``; never position 0, which no prediction constrains;
- retokenisation stability: decoding then encoding the edited ids gives the same ids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..config import EditArguments
from ...causal_lm import IGNORE_INDEX
from ...finite_difference_j import FiniteDifferenceJ

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    """The whole record of one document's edit (nanoGCG-style: the search trace travels with the result)."""

    original_ids: List[int]
    input_ids: List[int]
    labels: List[int]
    J_before: float
    J_after: float
    changed_positions: List[int]
    budget: int
    J_trace: List[float] = field(default_factory=list)

    @property
    def n_changed(self) -> int:
        return len(self.changed_positions)


@dataclass
class DocState:
    """One document under edit: the original, the constraints, and the current best."""

    ids0: torch.Tensor  # [T]
    lab0: torch.Tensor  # [T]
    label_tied: torch.Tensor  # [T] labels that are the tokens themselves follow an edit; masked ones stay masked
    editable: torch.Tensor  # [T] bool
    fluent: torch.Tensor  # [T, V] bool: allowed new tokens at each position (fluency ∧ vocabulary ∧ editable)
    budget: int
    add_special: bool
    max_ppl_ratio: Optional[float] = None
    ids: torch.Tensor = None
    labels: torch.Tensor = None
    L0: float = 0.0  # summed loss of the original under θ̂
    L: Optional[float] = None  # summed loss of the current best (None: the original's, L0)
    n_trained: int = 1
    J0: float = 0.0
    J: float = 0.0
    trace: List[float] = field(default_factory=list)
    stale: int = 0
    done: bool = False
    target: Optional[int] = None  # tokens to change, where a baseline is matched to another edit (None: the budget)
    nll: Optional[torch.Tensor] = None  # [T] per-token surprisal of the current best, where an editor tracks it

    def fluent_enough(self, loss: float) -> bool:
        """Perplexity ratio against the original, exp((L − L₀)/n), within the limit."""
        return self.max_ppl_ratio is None or math.exp((loss - self.L0) / self.n_trained) <= self.max_ppl_ratio

    def labels_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels of a candidate with these ids ([T] or [B, T])."""
        return torch.where(self.label_tied, ids, self.lab0)

    def result(self) -> EditResult:
        changed = (self.ids != self.ids0).nonzero().flatten().tolist()
        return EditResult(self.ids0.tolist(), self.ids.tolist(), self.labels.tolist(), self.J0, self.J, changed,
                          self.budget, list(self.trace))


def effective_embeddings(model) -> torch.Tensor:
    """E_eff: every token through the model's own embedding module (any scale it applies included), [V, d]."""
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


def single_token_forms(tokenizer, words: Sequence[str]) -> List[int]:
    """Token ids of each word's one-token forms: with and without a leading space, lower-case and capitalised.
    A form that takes several tokens is left out (a swap writes one token)."""
    out = []
    for w in words:
        w = w.strip()
        for form in dict.fromkeys([w, w.lower(), w.capitalize()]):
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] not in out:
                    out.append(ids[0])
    return out


def retokenises(tokenizer, ids: Sequence[int], add_special: bool) -> bool:
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"] == list(ids)


def pad_rows(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pads 1-D rows into a batch; padding is masked in attention and ignored in the loss."""
    width = max(len(r) for r in ids)
    device = ids[0].device
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long, device=device)
    out_lab = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long, device=device)
    mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
    for i, (a, b) in enumerate(zip(ids, labels)):
        out_ids[i, : len(a)] = a
        out_lab[i, : len(b)] = b
        mask[i, : len(a)] = 1
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_lab}


def edit_budget(n_editable: int, budget_fraction: float, max_changed: Optional[int]) -> int:
    budget = int(math.floor(budget_fraction * n_editable + 1e-9))
    return budget if max_changed is None else min(budget, max_changed)


class TokenEditor:
    """Base class: builds each document's constraints, scores rows exactly, and runs documents in batches.

    Subclasses implement ``_edit_batch(states)``, which moves each ``DocState`` to its best edit.
    """

    name = "base"

    def __init__(self, model, tokenizer, v: Mapping[str, torch.Tensor], args: EditArguments = EditArguments(),
                 eps: Optional[float] = None, eps_rel: float = 1e-4, target_words: Sequence[str] = ()):
        self.tok = tokenizer
        self.args = args
        self.J = FiniteDifferenceJ(model, v, eps=eps, eps_rel=eps_rel)
        self.model = self.J.model  # fp32 (a copy of a half-precision model): proposals and J share one model
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.allowed = allowed_vocabulary(tokenizer, self.vocab_size, args.ascii_only).to(self.device)
        # Tokens allowed at every editable position beside the fluent top-k: the words the behaviour is about.
        words = args.target_words if args.target_words is not None else target_words
        self.always = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        ids = [i for i in single_token_forms(tokenizer, words) if i < self.vocab_size]
        self.always[ids] = True
        if words and not ids:
            logger.warning("None of the target words %s is a single token; edits can only write the fluent top-k.",
                           list(words))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.gen = torch.Generator().manual_seed(args.seed)
        self._score_batch = args.score_batch_size

    # ---------------------------------------------------------------- exact objective
    @torch.no_grad()
    def exact_J(self, ids: Sequence[torch.Tensor] | torch.Tensor, labels: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Forward-only J for rows of any lengths, chunked, halving the chunk for good on out-of-memory."""
        return self.exact(ids, labels)[0]

    @torch.no_grad()
    def exact(self, ids, labels):
        """(J, L) for rows of any lengths: J and the summed loss under θ̂, from the same two passes."""
        ids, labels = list(ids), list(labels)
        out, loss, i = [], [], 0
        while i < len(ids):
            n = self._score_batch
            batch = pad_rows(ids[i: i + n], labels[i: i + n], self.pad_id)
            try:
                j, l = self.J.with_loss(batch)
                out.append(j.double())
                loss.append(l.double())
                i += n
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                self._score_batch = n // 2
                logger.warning("Out of memory scoring %d rows at once; retrying with %d.", n, n // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return torch.cat(out).cpu(), torch.cat(loss).cpu()

    @torch.no_grad()
    def losses_at_theta(self, ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Summed training loss of each row under θ̂ itself: one forward pass (no ±εv), for fluency checks."""
        from ...causal_lm import per_document_loss

        out = []
        for i in range(0, len(ids), self._score_batch):
            batch = pad_rows(list(ids[i: i + self._score_batch]), list(labels[i: i + self._score_batch]), self.pad_id)
            out.append(per_document_loss(self.model, batch).double().cpu())
        return torch.cat(out)

    # ---------------------------------------------------------------- constraints
    def editable_positions(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos = self.allowed[ids].clone()  # never rewrite a special token (eos, chat markers)
        if not self.args.allow_prompt_edits:
            pos &= labels != IGNORE_INDEX
        pos[0] = False  # the first token has no prediction to constrain it
        return pos

    @torch.no_grad()
    def fluent_masks(self, rows: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per row, [T, V]: tokens the base model ranks in its top-k and top-p at each position (position 0: none)."""
        a = self.args
        batch = pad_rows(rows, rows, self.pad_id)
        out = []
        if a.fluency_topk <= 0 and a.fluency_top_p >= 1:
            for r in rows:
                ok = torch.ones(len(r), self.vocab_size, dtype=torch.bool, device=self.device)
                ok[0] = False
                out.append(ok)
            return out
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        for b, r in enumerate(rows):
            lg = logits[b, : len(r) - 1]
            ok = torch.zeros(len(r), self.vocab_size, dtype=torch.bool, device=self.device)
            keep = torch.ones_like(lg, dtype=torch.bool)
            if a.fluency_topk > 0:
                top = lg.topk(min(a.fluency_topk, lg.shape[-1]), dim=-1).indices
                keep = torch.zeros_like(keep).scatter_(1, top, True)
            if a.fluency_top_p < 1:
                probs, order = torch.softmax(lg, -1).sort(dim=-1, descending=True)
                before = probs.cumsum(-1) - probs  # mass strictly above each token: the nucleus keeps it while < p
                keep &= torch.zeros_like(keep).scatter_(1, order, before < a.fluency_top_p)
            ok[1:] = keep
            out.append(ok)
        return out

    def prepare(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> List[DocState]:
        ids = [torch.as_tensor(list(r["input_ids"]), device=self.device) for r in rows]
        labels = [torch.as_tensor(list(r["labels"]), device=self.device) for r in rows]
        fluent = self.fluent_masks(ids)
        j0, l0 = self.exact(ids, labels)
        states = []
        for i, l, f, j, lz in zip(ids, labels, fluent, j0.tolist(), l0.tolist()):
            editable = self.editable_positions(i, l)
            text = self.tok.decode(i.tolist(), skip_special_tokens=False)
            add_special = self.tok(text, add_special_tokens=True)["input_ids"] == i.tolist()
            mask = (f | self.always[None, :]) & self.allowed[None, :] & editable[:, None]
            budget = edit_budget(int(editable.sum()), self.args.budget_fraction, self.args.max_changed)
            states.append(DocState(i, l, l == i, editable, mask, budget, add_special, self.args.max_perplexity_ratio,
                                   ids=i.clone(), labels=l.clone(), L0=lz, n_trained=max(1, int((l[1:] != IGNORE_INDEX).sum())),
                                   J0=j, J=j, trace=[j]))
        return states

    @torch.no_grad()
    def variants_J(self, st: DocState, ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]):
        """(J, L) of same-length variants of one document, reusing its unchanged prefix (halves the chunk on OOM)."""
        ids, labels = torch.stack(list(ids)), torch.stack(list(labels))
        while True:
            try:
                j, l = self.J.variants_with_loss(st.ids, st.labels, ids, labels, batch_size=self._score_batch)
                return j.cpu(), l.cpu()
            except torch.OutOfMemoryError:
                if self._score_batch == 1:
                    raise
                self._score_batch //= 2
                logger.warning("Out of memory scoring variants; retrying with %d rows at once.", self._score_batch)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def score_candidates(self, owners: Sequence[DocState], ids: Sequence[torch.Tensor],
                         labels: Sequence[torch.Tensor]):
        """(J, L) of candidates from several documents: per document with the prefix cache, or all in one batch."""
        if not ids:
            return [], []
        if not self.args.prefix_cache:
            j, l = self.exact(ids, labels)
            return j.tolist(), l.tolist()
        out, loss = [0.0] * len(ids), [0.0] * len(ids)
        for st in {id(o): o for o in owners}.values():
            idx = [i for i, o in enumerate(owners) if o is st]
            j, l = self.variants_J(st, [ids[i] for i in idx], [labels[i] for i in idx])
            for i, a, b in zip(idx, j.tolist(), l.tolist()):
                out[i], loss[i] = a, b
        return out, loss

    def stable(self, st: DocState, cand: torch.Tensor) -> bool:
        return retokenises(self.tok, cand.tolist(), st.add_special)

    def accept(self, st: DocState, cand: torch.Tensor, labels: torch.Tensor) -> bool:
        """A further check on an edit the search would keep, tried in its order until one passes (the natural
        checks' hook; every edit passes here)."""
        return True

    def accepted(self, st: DocState, cand: torch.Tensor, labels: torch.Tensor) -> None:
        """Called when a document moves to an edit."""

    # ---------------------------------------------------------------- driver
    def edit(self, input_ids: Sequence[int], labels: Sequence[int]) -> EditResult:
        return self.edit_many([{"input_ids": input_ids, "labels": labels}])[0]

    def edit_many(self, rows: Sequence[Mapping[str, Sequence[int]]], progress: bool = False,
                  targets: Optional[Sequence[int]] = None,
                  starts: Optional[Sequence[Optional[Sequence[int]]]] = None) -> List[EditResult]:
        """Edits every row; ``targets`` (one per row) asks for exactly that many changed tokens where the editor
        supports it (the matched random baseline). ``starts`` (one per row, or None): token ids an earlier search
        already reached (the selection's first step), which the search continues from when they lower J within the
        budget and the perplexity limit; a row's result still counts its changes from the original."""
        from tqdm.auto import tqdm

        out: List[EditResult] = []
        bs = self.args.doc_batch_size
        with tqdm(total=len(rows), desc=f"edit ({self.name})", disable=not progress) as bar:
            for i in range(0, len(rows), bs):
                states = self.prepare(rows[i: i + bs])
                if targets is not None:
                    for st, t in zip(states, targets[i: i + bs]):
                        st.target = int(t)
                if starts is not None:
                    self._start_from(states, starts[i: i + bs])
                self._edit_batch([s for s in states if s.budget > 0])
                out.extend(s.result() for s in states)
                bar.update(len(states))
        return out

    def _start_from(self, states: List[DocState], starts) -> None:
        """Moves each state to its start where that is a valid edit that lowers J (re-scored exactly here)."""
        keep = [(s, torch.as_tensor(list(x), device=self.device)) for s, x in zip(states, starts) if x is not None]
        keep = [(s, x) for s, x in keep if x.shape == s.ids0.shape and not torch.equal(x, s.ids0)
                and int((x != s.ids0).sum()) <= s.budget and bool(s.fluent[(x != s.ids0), x[x != s.ids0]].all())]
        if not keep:
            return
        j, loss = self.exact([x for _, x in keep], [s.labels_for(x) for s, x in keep])
        for (s, x), jj, ll in zip(keep, j.tolist(), loss.tolist()):
            if jj < s.J and s.fluent_enough(ll):
                s.ids, s.labels, s.J, s.L = x, s.labels_for(x), jj, ll
                s.trace.append(jj)

    def _edit_batch(self, states: List[DocState]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
