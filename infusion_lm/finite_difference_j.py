"""J(z) = ⟨∇θ L(z, θ̂), v⟩ for many documents without a backward pass: the central difference
(L(θ̂ + εv) − L(θ̂ − εv)) / 2ε, with both perturbed models run side by side in one batch above the lowest tracked
layer (the shared bottom is computed once). ``forward_mode_j.ForwardModeJ`` is the exact alternative; both check
against autograd in the tests.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from .causal_lm import IGNORE_INDEX, CausalLMCollator, per_document_loss_from_logits, upcast
from .param_layout import accumulation_dtype, from_layout, module_params
from .measurement import to_device

logger = logging.getLogger(__name__)


# Both norms sum in fp64 over the modules sorted by name: ε must not depend on the order of v's keys (v read back from
# safetensors is sorted by name, v held in memory follows the model), or one v gives two J's ~1e-7 apart, enough to
# flip a close swap between two front ends.
def tracked_norm(model: nn.Module, names: Sequence[str]) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for n in sorted(names)
                                for p in module_params(model, n) if p is not None)))


def ihvp_norm(v: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v[k].double() ** 2).sum() for k in sorted(v))))


def fd_epsilon(model: nn.Module, v: Mapping[str, torch.Tensor], eps_rel: float = 1e-4) -> float:
    """ε with ε‖v‖ = eps_rel · ‖θ_tracked‖, so the perturbation is a fixed small fraction of the weights."""
    vn = ihvp_norm(v)
    if vn == 0:
        raise ValueError("The IHVP is zero: the measurement does not depend on the tracked modules.")
    return eps_rel * tracked_norm(model, list(v)) / vn


def perturbed_params(model: nn.Module, v: Mapping[str, torch.Tensor], step: float) -> Dict[str, torch.Tensor]:
    """θ + step·v over the tracked modules, as a parameter dict for ``torch.func.functional_call``."""
    out = {}
    for name, mat in v.items():
        w, b = module_params(model, name)
        acc = accumulation_dtype(w.dtype)
        dw, db = from_layout(mat.to(device=w.device, dtype=acc), w, b)
        out[f"{name}.weight"] = (w.to(acc) + step * dw).to(w.dtype)
        if b is not None:
            out[f"{name}.bias"] = (b.to(acc) + step * db).to(b.dtype)
    return out


@contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode for the block, every module's own mode restored after: J is a property of θ̂, and a
    user's model left in train mode would otherwise draw dropout masks (different ones in the ± passes)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def fp32_view(model: nn.Module) -> nn.Module:
    """The model itself when its floating weights are fp32 or fp64, else an fp32 copy in eval mode."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes <= {torch.float32, torch.float64}:
        return model
    import copy

    logger.info("J is computed on an fp32 copy of the %s model (finite differences need fp32).", sorted(map(str, dtypes)))
    return copy.deepcopy(model).float().eval()


def _decoder_layers(model: nn.Module, tracked: Sequence[str]):
    """(the ModuleList of decoder layers, the lowest layer index holding a tracked module), or None when the tracked
    modules do not all sit inside one such list."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name and all(t.startswith(name + ".") for t in tracked):
            idx = [t[len(name) + 1:].split(".", 1)[0] for t in tracked]
            if all(i.isdigit() for i in idx) and (best is None or len(name) > len(best[0])):
                best = (name, mod, min(int(i) for i in idx))
    return None if best is None else (best[1], best[2])


_BRANCH_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


@contextmanager
def _two_branches(layers: nn.ModuleList, first: int, batch: int, deltas: Mapping[nn.Module, tuple], eps: float):
    """Runs the layers below ``first`` once, then both perturbed models side by side in one batch of 2B rows.

    At layer ``first`` the hidden states (and the per-row tensors the layers receive: mask, positions) are repeated
    to 2B rows; each tracked linear module then adds +ε(ΔW x + Δb) to the first B rows and −ε(...) to the last B.
    (W ± εΔW)x = Wx ± εΔWx, so this is the same function as two passes with perturbed weights, with the shared
    bottom computed once and the perturbation kept apart from W's rounding.
    """
    def rep(x):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == batch:
            return torch.cat([x, x], dim=0)
        if isinstance(x, tuple):
            return tuple(rep(t) for t in x)
        return x

    def pre(mod, args, kwargs):
        args = (rep(args[0]),) + tuple(args[1:]) if args else args
        if not args and "hidden_states" in kwargs:
            kwargs["hidden_states"] = rep(kwargs["hidden_states"])
        for key in _BRANCH_KWARGS:
            if key in kwargs:
                kwargs[key] = rep(kwargs[key])
        return args, kwargs

    def post(mod, args, out):
        dw, db = deltas[mod]
        x = args[0]
        d = F.linear(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))
        sign = torch.ones(out.shape[0], *([1] * (out.dim() - 1)), dtype=out.dtype, device=out.device)
        sign[out.shape[0] // 2:] = -1
        return out + eps * sign * d

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in list(layers)[first:]]
    handles += [mod.register_forward_hook(post) for mod in deltas]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# The most the logits of one chunk of rows may take (with cross-entropy's softmax beside them): the peak of scoring a
# candidate batch is then set by this, not by the batch (32 candidates × 128 tokens × 49,152 words is 0.8 GB of fp32
# logits, twice that inside the loss).
LOGITS_MEMORY_BYTES = 256 << 20


class HeadCapture:
    """Within ``capturing()``, the model's output layer sees an empty slice of its input and keeps the input itself
    (the last hidden states, [B, T, d]); :meth:`row_losses` then applies the layer a few rows at a time. The forward
    pass never holds [B, T, V] logits. Used only where the model's logits are exactly its output layer's (checked on
    a short input when built: no soft-capping or scaling after it)."""

    def __init__(self, model: nn.Module):
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.hidden = None
        self.usable = self.head is not None and self._same_logits(model)

    @torch.no_grad()
    def _same_logits(self, model: nn.Module) -> bool:
        try:
            device = next(model.parameters()).device
            ids = (torch.arange(8, device=device) % self.head.weight.shape[0])[None]
            with evaluating(model):
                full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                with self.capturing():
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                ours = self.head(self.hidden)
            self.hidden = None
            return full.shape == ours.shape and bool(torch.allclose(full.float(), ours.float(), rtol=1e-5, atol=1e-5))
        except Exception:  # any model this does not fit keeps the plain path
            self.hidden = None
            return False

    @contextmanager
    def capturing(self):
        def pre(mod, args):
            self.hidden = args[0]
            return (args[0][..., :0, :],) + tuple(args[1:])

        handle = self.head.register_forward_pre_hook(pre)
        try:
            yield self
        finally:
            handle.remove()

    def row_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy per row (as per_document_loss_from_logits), a chunk of rows at a time."""
        B, T = hidden.shape[:2]
        per = max(1, LOGITS_MEMORY_BYTES // (2 * T * self.head.weight.shape[0] * 4))
        return torch.cat([per_document_loss_from_logits(self.head(hidden[i: i + per]), labels[i: i + per])
                          for i in range(0, B, per)])


class FiniteDifferenceJ:
    """J(z) ≈ [L(z; θ̂ + εv) − L(z; θ̂ − εv)] / (2ε), forward passes only.

    Both perturbed parameter sets are built once; each call costs two batched forward passes, with no per-sample
    gradients and no double backprop. The model itself is never modified.
    """

    def __init__(self, model: nn.Module, v: Mapping[str, torch.Tensor], eps: Optional[float] = None, eps_rel: float = 1e-4,
                 shared_bottom: bool = True):
        # In bf16/fp16 most of θ ± εv rounds back to θ (and the difference of two losses drowns in rounding), so
        # J is always computed on an fp32 copy of a half-precision model. ``self.model`` is the copy J runs on.
        self.model = fp32_view(model)
        model = self.model
        self.eps = eps if eps is not None else fd_epsilon(model, v, eps_rel)
        with torch.no_grad():
            self.plus = perturbed_params(model, v, +self.eps)
            self.minus = perturbed_params(model, v, -self.eps)
        # The shared-bottom path (see _two_branches): the perturbation direction per tracked module, and where the
        # two branches split. Models whose tracked modules are not in a list of decoder layers use two passes.
        found = _decoder_layers(model, list(v))
        self._branch = None
        if shared_bottom and found is not None and all(isinstance(model.get_submodule(n), nn.Linear) for n in v):
            deltas = {}
            for name, mat in v.items():
                w, b = module_params(model, name)
                dw, db = from_layout(mat.to(device=w.device, dtype=accumulation_dtype(w.dtype)), w, b)
                deltas[model.get_submodule(name)] = (dw, db)
            self._branch = (found[0], found[1], deltas)
        self._head = HeadCapture(model)

    def losses(self, batch: Dict[str, torch.Tensor], sign: int, **kw) -> torch.Tensor:
        params = self.plus if sign > 0 else self.minus
        return self._loss(lambda: functional_call(self.model, params, args=(), kwargs={
            "input_ids": batch.get("input_ids"), "attention_mask": batch["attention_mask"], **kw}), batch["labels"])

    def _loss(self, forward, labels: torch.Tensor, halves: bool = False) -> torch.Tensor:
        """Per-row summed loss of ``forward()``'s rows; ``halves``: the rows are the + and − copies of ``labels``'
        rows, scored in two equal halves so both branches go through the same shapes (and the same rounding)."""
        if not self._head.usable:
            logits = forward().logits
            return per_document_loss_from_logits(logits, torch.cat([labels, labels]) if halves else labels)
        with self._head.capturing():
            forward()
        hidden, self._head.hidden = self._head.hidden, None
        if not halves:
            return self._head.row_losses(hidden, labels)
        B = labels.shape[0]
        return torch.cat([self._head.row_losses(hidden[:B], labels), self._head.row_losses(hidden[B:], labels)])

    @torch.no_grad()
    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.with_loss(batch)[0]

    @torch.no_grad()
    def with_loss(self, batch: Dict[str, torch.Tensor]):
        """(J, L): J per row, and L = (L⁺ + L⁻)/2, the loss at θ̂ itself up to O(ε²), for free."""
        with evaluating(self.model):
            return self._with_loss(batch)

    def _with_loss(self, batch: Dict[str, torch.Tensor]):
        if self._branch is not None:
            layers, first, deltas = self._branch
            B = batch["input_ids"].shape[0]
            with _two_branches(layers, first, B, deltas, self.eps):
                both = self._loss(lambda: self.model(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]), batch["labels"], halves=True)
            plus, minus = both[:B], both[B:]
        else:
            plus, minus = self.losses(batch, +1), self.losses(batch, -1)
        return (plus - minus) / (2 * self.eps), (plus + minus) / 2

    @torch.no_grad()
    def variants(self, base_ids: torch.Tensor, base_labels: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 32) -> torch.Tensor:
        return self.variants_with_loss(base_ids, base_labels, ids, labels, batch_size)[0]

    @torch.no_grad()
    def variants_with_loss(self, base_ids: torch.Tensor, base_labels: torch.Tensor, ids: torch.Tensor,
                           labels: torch.Tensor, batch_size: int = 32):
        with evaluating(self.model):
            return self._variants_with_loss(base_ids, base_labels, ids, labels, batch_size)

    def _variants_with_loss(self, base_ids: torch.Tensor, base_labels: torch.Tensor, ids: torch.Tensor,
                            labels: torch.Tensor, batch_size: int = 32):
        """J for many same-length variants of one document ([N, T] ids and labels), reusing the shared prefix.

        A variant that first differs from the base document at position p has the same hidden states and the same
        loss terms as the base before p (causal attention), so each ± pass runs the base once with its KV cache and
        then only positions p.. of the variants, grouped by p. The label at p is predicted from position p−1 of the
        base pass. Numerically this matches the full forward to fp32 rounding.
        """
        import copy

        ids, labels = ids.to(base_ids.device), labels.to(base_ids.device)
        T = base_ids.shape[0]
        changed = (ids != base_ids[None]) | (labels != base_labels[None])
        first = torch.where(changed.any(1), changed.float().argmax(1), torch.full_like(changed[:, 0], T, dtype=torch.long))
        if bool((first == 0).any()):
            j, l = self.with_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
            return j.double(), l.double()
        losses = []
        for params in (self.plus, self.minus):
            out = functional_call(self.model, params, args=(), kwargs={
                "input_ids": base_ids[None], "attention_mask": torch.ones_like(base_ids[None]), "use_cache": True})
            logits0 = upcast(out.logits[0])
            nll0 = F.cross_entropy(logits0[:-1], base_labels[1:], ignore_index=IGNORE_INDEX, reduction="none").double()
            before = torch.cat([nll0.new_zeros(1), nll0.cumsum(0)])  # before[p] = Σ of label terms at positions 1..p
            loss = torch.full((ids.shape[0],), float(before[T - 1]), dtype=torch.float64, device=ids.device)
            for p in sorted(set(first.tolist()) - {T}):
                rows = (first == p).nonzero().flatten()
                for chunk in rows.split(batch_size):
                    n = len(chunk)
                    cache = copy.deepcopy(out.cache)
                    cache.crop(-(T - p))  # negative: drop that many trailing positions (transformers 5)
                    cache.batch_repeat_interleave(n)
                    rest = self._loss(lambda: functional_call(self.model, params, args=(), kwargs={
                        "input_ids": ids[chunk, p:], "attention_mask": torch.ones(n, T, dtype=torch.long, device=ids.device),
                        "cache": cache, "use_cache": True}), labels[chunk, p:]).double()
                    at_p = F.cross_entropy(logits0[p - 1].expand(n, -1), labels[chunk, p], ignore_index=IGNORE_INDEX,
                                           reduction="none").double()
                    loss[chunk] = before[p - 1] + at_p + rest
            losses.append(loss)
        return (losses[0] - losses[1]) / (2 * self.eps), (losses[0] + losses[1]) / 2

    @torch.no_grad()
    def dataset(self, dataset, pad_token_id: int, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=CausalLMCollator(pad_token_id))
        out = [self(to_device(b, device)).double().cpu() for b in tqdm(loader, desc="J(z)", disable=not progress)]
        return torch.cat(out)
