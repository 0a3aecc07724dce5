"""J(z) by forward-mode differentiation: the exact directional derivative of each document's loss along v.

J(z) = ⟨∇θ L(z, θ̂), v⟩ = d/dt L(z; θ̂ + t·v) at t = 0. A Jacobian-vector product carries the tangent v through one
forward pass, so every document of a batch gets its own J with no per-sample gradients, no backward pass and no
finite-difference step to choose: the result equals per-document autograd to floating-point rounding, where the
central difference of ``FiniteDifferenceJ`` carries an O(ε²) truncation error plus the rounding of L(θ̂ ± εv).

Layers below the lowest tracked module have a zero tangent, which forward-mode AD skips, so they cost one plain
forward pass. The attention kernels of PyTorch's SDPA have no forward-mode derivative, so the model runs with the
eager attention implementation for the duration of the call (restored afterwards).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp

from .finite_difference_j import FiniteDifferenceJ, evaluating, fp32_view
from .param_layout import accumulation_dtype, from_layout, module_params
from .causal_lm import per_document_loss_from_logits


@contextmanager
def eager_attention(model: nn.Module):
    """The model's attention set to the eager implementation (the only one with forward-mode derivatives)."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl


class ForwardModeJ:
    """J(z) = ⟨∇θ L(z, θ̂), v⟩ for every row of a batch from one forward pass with tangents (torch.func.jvp).

    The same interface as ``FiniteDifferenceJ`` (``__call__``, ``with_loss``, ``variants``, ``dataset``); L is the
    summed token loss under the training mask, as everywhere else. A half-precision model is evaluated on an fp32
    copy, as the finite difference is. The model itself is never modified.
    """

    def __init__(self, model: nn.Module, v: Mapping[str, torch.Tensor]):
        self.model = fp32_view(model)
        self.primals: Dict[str, torch.Tensor] = {}
        self.tangents: Dict[str, torch.Tensor] = {}
        for name, mat in v.items():
            w, b = module_params(self.model, name)
            dw, db = from_layout(mat.to(device=w.device, dtype=accumulation_dtype(w.dtype)), w, b)
            self.primals[f"{name}.weight"], self.tangents[f"{name}.weight"] = w.detach(), dw.to(w.dtype)
            if b is not None:
                self.primals[f"{name}.bias"], self.tangents[f"{name}.bias"] = b.detach(), db.to(b.dtype)

    @torch.no_grad()
    def with_loss(self, batch: Dict[str, torch.Tensor]):
        """(J, L) per row: the directional derivative and the loss at θ̂ itself, both exact."""
        labels = batch["labels"]

        def losses(params):
            logits = functional_call(self.model, params, args=(), kwargs={
                "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits
            return per_document_loss_from_logits(logits, labels)

        with eager_attention(self.model), evaluating(self.model):
            loss, j = jvp(losses, (self.primals,), (self.tangents,))
        return j, loss

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.with_loss(batch)[0]

    def variants_with_loss(self, base_ids: torch.Tensor, base_labels: torch.Tensor, ids: torch.Tensor,
                           labels: torch.Tensor, batch_size: int = 32):
        """(J, L) for [N, T] variants of one document, in batches of full forward passes."""
        ids, labels = ids.to(base_ids.device), labels.to(base_ids.device)
        js, ls = [], []
        for rows in torch.arange(ids.shape[0]).split(batch_size):
            j, l = self.with_loss({"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]),
                                   "labels": labels[rows]})
            js.append(j.double())
            ls.append(l.double())
        return torch.cat(js), torch.cat(ls)

    # The same batching over a dataset, and the same J-only view of the variants, as the finite difference.
    variants = FiniteDifferenceJ.variants
    dataset = FiniteDifferenceJ.dataset


def document_j(model: nn.Module, v: Mapping[str, torch.Tensor], method: str = "forward_mode", eps_rel: float = 1e-4):
    """The J(z) evaluator ``influence.j_method`` names: ``ForwardModeJ`` or ``FiniteDifferenceJ``."""
    if method == "forward_mode":
        return ForwardModeJ(model, v)
    return FiniteDifferenceJ(model, v, eps_rel=eps_rel)
