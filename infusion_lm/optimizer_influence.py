"""v for the retraining that actually runs: the optimizer's own first-order response (``influence.preconditioner:
optimizer``).

(G + λI)⁻¹∇f answers "what if training ran to convergence on a damped objective". What runs is a few optimizer steps
from a checkpoint. To first order, replacing document z by z' changes the batch gradient at the step where z is seen
by Δg = (∇L(z') − ∇L(z)) / N, with L the summed token loss and N the tokens in the global batch (the Trainer's
loss is the mean over the batch's tokens). The optimizer turns that into a parameter change:

- AdamW: the change enters the first moment and is spent over the remaining steps, each scaled by the step's
  learning rate and bias correction and divided by √v̂ + ε. Clipping scales the gradient and √v̂ alike, so it cancels
  (up to ε). The second moment's own change is second order and ignored.
- SGD: −lr · c · Δg, with c the clip factor min(1, max_norm / ‖g‖).

So Δθ ≈ −P ⊙ Δg with P per parameter, and Δf ≈ ∇f · Δθ = −(J(z') − J(z)) for v = P ⊙ ∇f / N and J(z) = ⟨∇L(z), v⟩
(no 1/n: the batch weighting is inside v). P is averaged over the step at which z is seen (the data order is random).

v̂ is estimated at θ̂ as the mean squared mini-batch gradient over the corpus, the quantity Adam's second moment
tracks; the clip factor is averaged over the same batches.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from .causal_lm import CausalLMCollator, per_document_loss, per_document_loss_from_logits
from .errors import ConfigError
from .influence import grads_by_module, measurement_gradients, module_params


def response_weights(steps_per_epoch: int, start_step: int, retrained_epochs: int, lr: float, optim: str,
                     scheduler: str, total_steps: int, beta1: float = 0.9) -> float:
    """The mean over the step s at which a document is seen of Σ_{u ≥ s} lr_u · w(u, s): how much a unit change of
    the gradient at step s moves θ by the end of the run, before the per-parameter division by √v̂ + ε.

    AdamW: w(u, s) = (1 − β1) β1^(u−s) / (1 − β1^u) (momentum with bias correction). SGD: w(s, s) = 1.
    """
    lrs = learning_rates(lr, scheduler, total_steps)
    first = start_step + 1
    last = start_step + steps_per_epoch * retrained_epochs
    adam = optim.startswith("adam")
    total = 0.0
    for epoch in range(retrained_epochs):
        per_epoch = 0.0
        for s in range(first + epoch * steps_per_epoch, first + (epoch + 1) * steps_per_epoch):
            if adam:
                per_epoch += sum(lrs[u - 1] * (1 - beta1) * beta1 ** (u - s) / (1 - beta1 ** u)
                                 for u in range(s, last + 1))
            else:
                per_epoch += lrs[s - 1]
        total += per_epoch / steps_per_epoch
    return total


def learning_rates(lr: float, name: str, total_steps: int) -> list:
    """The learning rate of each optimizer step 1..total_steps, from transformers' own scheduler."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=0, num_training_steps=total_steps)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def batch_gradients(model: nn.Module, rows: Sequence[Mapping], batches: Sequence[Sequence[int]], tracked: Sequence[str],
                    pad_token_id: int, desc: str, progress: bool = False):
    """For each global batch (row indices) at θ̂, in eval mode: (the gradient of every tracked weight and bias, in
    ``module_params`` order, zeros where unused; the gradient norm over every trainable parameter, which the
    Trainer's clip spans; the batch's trained tokens). The loss is the Trainer's: summed token loss / tokens."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    collate = CausalLMCollator(pad_token_id)
    params = {n: module_params(model, n) for n in tracked}
    leaves = [p for pair in params.values() for p in pair if p is not None]
    trainable = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    trainable += [p for p in leaves if not any(p is q for q in trainable)]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the gradients of θ̂ itself
    try:
        for batch_idx in tqdm(batches, desc=desc, disable=not progress):
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in batch_idx]).items()}
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            loss = per_document_loss(model, batch).sum() / max(n_tok, 1)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
            by_param = {id(p): g for p, g in zip(trainable, grads)}
            yield ([by_param[id(p)] if by_param[id(p)] is not None else torch.zeros_like(p) for p in leaves], norm,
                   max(n_tok, 1))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def gradient_statistics(model: nn.Module, rows: Sequence[Mapping], tracked: Sequence[str], batch_size: int,
                        pad_token_id: int, max_grad_norm: float, progress: bool = False
                        ) -> Tuple[Dict[str, torch.Tensor], float, float]:
    """Over the corpus in global batches: mean squared gradient per tracked parameter (kronfluence layout), the mean
    clip factor, and the mean number of trained tokens per batch (:func:`batch_gradients`)."""
    params = {n: module_params(model, n) for n in tracked}
    batches = [range(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    sq, clips, tokens = None, 0.0, 0.0
    for grads, norm, n_tok in batch_gradients(model, rows, batches, tracked, pad_token_id, "optimizer statistics",
                                              progress):
        sq = [g.float() ** 2 for g in grads] if sq is None else [a.add_(g.float() ** 2) for a, g in zip(sq, grads)]
        clips += min(1.0, max_grad_norm / norm) if max_grad_norm > 0 and norm > 0 else 1.0
        tokens += n_tok
    n_batches = len(batches)
    return grads_by_module(params, [a / n_batches for a in sq]), clips / n_batches, tokens / n_batches


def optimizer_ihvp(model: nn.Module, measurement, tracked: Sequence[str], rows: Sequence[Mapping], retrain,
                   pad_token_id: int, start_step: int = 0, progress: bool = False,
                   stats: Tuple[Dict[str, torch.Tensor], float, float] | None = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """v = P ⊙ ∇f / N for the retraining described by ``retrain`` (a RetrainArguments), and what went into it.

    ``stats``: (mean squared gradients, clip factor, tokens per batch) from an earlier call's ``info["stats"]``, so a
    second measurement (the defender's) costs no pass over the corpus."""
    optim = retrain.optim
    if not (optim.startswith("adam") or optim.startswith("sgd")):
        raise ConfigError(f"influence.preconditioner=optimizer models AdamW and SGD, not retrain.optim={optim!r}; "
                          f"use influence.preconditioner: factors.")
    n = len(rows)
    steps_per_epoch = math.ceil(n / retrain.batch_size)
    retrained_epochs = retrain.epochs if (retrain.from_scratch or start_step == 0) else 1
    total_steps = steps_per_epoch * retrain.epochs
    weight = response_weights(steps_per_epoch, start_step, retrained_epochs, retrain.learning_rate, optim,
                              retrain.lr_scheduler_type, total_steps)
    sq, clip, tokens = stats if stats is not None else gradient_statistics(
        model, rows, tracked, retrain.batch_size, pad_token_id, retrain.max_grad_norm, progress)
    grads = measurement_gradients(model, measurement, tracked)
    eps = 1e-8  # TrainingArguments.adam_epsilon's default
    v = {}
    for name, g in grads.items():
        if optim.startswith("adam"):
            scale = weight / (sq[name].sqrt() + eps / clip)
        else:
            scale = torch.full_like(g, weight * clip)
        v[name] = (scale * g.float() / tokens).cpu()
    info = {"response_weight": weight, "mean_clip_factor": clip, "tokens_per_batch": tokens,
            "steps_per_epoch": steps_per_epoch, "retrained_epochs": retrained_epochs, "start_step": start_step,
            "optim": optim, "stats": (sq, clip, tokens)}
    return v, info


def response_j(model: nn.Module, measurement, rows: Sequence[Mapping], retrain, pad_token_id: int,
               start_step: int = 0, progress: bool = False):
    """J(z) along the first-order response of the retraining ``retrain`` describes, over every decoder layer's
    projections (retraining moves all of them, whatever subset influence tracks): −(J(z') − J(z)) predicts the Δf of
    training on z' instead of z. One gradient pass over ``rows``."""
    from .forward_mode_j import ForwardModeJ
    from .tracked_modules import resolve_tracked_modules

    v, _ = optimizer_ihvp(model, measurement, resolve_tracked_modules(model), rows, retrain, pad_token_id, start_step,
                          progress=progress)
    return ForwardModeJ(model, v)


def predicted_response(J, before: Sequence[Mapping], after: Sequence[Mapping], pad_token_id: int) -> list:
    """Predicted Δf of each edit before[i] → after[i] under :func:`response_j`'s J: −(J(after) − J(before))."""
    strip = lambda rows: [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    return (-(J.dataset(strip(after), pad_token_id) - J.dataset(strip(before), pad_token_id))).tolist()


def unrolled_document_effects(model: nn.Module, rows: Sequence[Mapping], measurement, order: Sequence[Sequence[int]],
                              lr, optim: str = "adamw", state: Dict | None = None, betas=(0.9, 0.999),
                              eps: float = 1e-8, pad_token_id: int = 0, max_grad_norm: float = 0.0) -> torch.Tensor:
    """The exact first-order answer on a small model: d f(θ_T) / d w_z for every document z, by differentiating
    through the retraining steps themselves (a metagradient, as MAGIC does). Upweighting z by dw changes f by
    dw · effect[z]; so the factors' and the optimizer's predictions are compared with it (−J/n and −J).

    ``order`` lists the row indices of each optimizer step's batch; the loss of a step is Σ_z (1 + w_z) L(z) / tokens,
    as the Trainer's. ``state`` (Adam: ``{"m", "v", "step"}`` dicts of tensors by parameter name) continues an
    optimizer run instead of starting a fresh one. ``lr`` is one rate or one per step; ``max_grad_norm`` > 0 clips
    each step's gradient as the Trainer does (``clip_grad_norm_``), differentiably. Every parameter trains. The whole unrolled graph is kept in
    memory: meant for tiny models and a few steps (tests and calibration), not for SmolLM2.
    """
    from torch.func import functional_call

    collate = CausalLMCollator(pad_token_id)
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    theta = dict(params)
    w = torch.zeros(len(rows), dtype=torch.float64, requires_grad=True)
    adam = optim.startswith("adam")
    m = {n: (state["m"][n].clone() if state else torch.zeros_like(params[n])) for n in names}
    v = {n: (state["v"][n].clone() if state else torch.zeros_like(params[n])) for n in names}
    step = int(state["step"]) if state else 0
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(order)
    was_training = model.training
    model.eval()
    # Fused attention kernels have no double backward: differentiate through the eager implementation.
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        for batch_idx in order:
            batch = collate([rows[i] for i in batch_idx])
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            logits = functional_call(model, theta, args=(), kwargs={
                "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits
            per_doc = per_document_loss_from_logits(logits, batch["labels"])
            loss = ((1 + w[list(batch_idx)]).to(per_doc.dtype) * per_doc).sum() / max(n_tok, 1)
            grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=True)
            if max_grad_norm > 0:
                norm = torch.sqrt(sum((g * g).sum() for g in grads))
                coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
                grads = [g * coef for g in grads]
            lr_step = lrs[step - (int(state["step"]) if state else 0)]
            step += 1
            new = {}
            for n, g in zip(names, grads):
                if adam:
                    m[n] = betas[0] * m[n] + (1 - betas[0]) * g
                    v[n] = betas[1] * v[n] + (1 - betas[1]) * g * g
                    m_hat = m[n] / (1 - betas[0] ** step)
                    v_hat = v[n] / (1 - betas[1] ** step)
                    new[n] = theta[n] - lr_step * m_hat / ((v_hat + 1e-30).sqrt() + eps)  # +1e-30: no inf gradient at v = 0
                else:
                    new[n] = theta[n] - lr_step * g
            theta = new

        class _View(nn.Module):  # the measurement calls model(...); route it through the unrolled parameters
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, **kw):
                return functional_call(model, theta, args=(), kwargs=kw)

        view = _View()
        f = sum(measurement(view, b) for b in measurement.batches)
        (effect,) = torch.autograd.grad(f, [w])
    finally:
        model.train(was_training)
        if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
    return effect.detach()
