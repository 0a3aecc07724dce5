"""The retraining's first-order response per document, along the steps that actually run: both of Adam's moments,
each batch's clip factor, and the step at which each document is seen.

Upweighting document z (loss weight 1 + w_z) at the step s where it is drawn changes that step's gradient by
δg_s = w_z ∇L(z) / N_s (the Trainer's loss is the summed token loss over the N_s tokens of the global batch). To first
order, and holding every later gradient at its value (no curvature along the trajectory), the change reaches the
end of the run through

- the clip: g̃_s = c_s g_s with c_s = min(1, C / ‖g_s‖), so δg̃_s = c_s (δg_s − ĝ_s ⟨ĝ_s, δg_s⟩) when the batch is
  clipped (ĝ = g / ‖g‖; the inner product runs over the tracked parameters);
- Adam's moments at every later step u ≥ s: δm_u = (1 − β1) β1^(u−s) δg̃_s and δv_u = 2 (1 − β2) β2^(u−s) g̃_s δg̃_s;
- each update −lr_u m̂_u / (√v̂_u + ε), whose derivative is
  lr_u [ δm_u / ((1 − β1^t) D_u) − m̂_u δv_u / (2 (1 − β2^t) √v̂_u D_u²) ], D_u = √v̂_u + ε, t the optimizer's step.

So d f(θ_T) / d w_z = −⟨∇L(z), v_s⟩ with, per parameter,

    v_s = c_s/N_s · P_c[ ∇f ⊙ ((1 − β1) A_s − (1 − β2) g̃_s B_s) ],
    A_s = Σ_{u≥s} β1^(u−s) lr_u / ((1 − β1^t_u) D_u),   B_s = Σ_{u≥s} β2^(u−s) lr_u m̂_u / ((1 − β2^t_u) √v̂_u D_u²),

P_c the clip's projection. The second-moment term is first order, not a correction: at the first step of a fresh
optimizer (m̂ = g̃, v̂ = g̃²) the two terms cancel exactly, as they must, since that update is lr · sign(g̃).
SGD: v_s = lr_s c_s P_c[∇f] / N_s. A document drawn in several epochs sums its steps' v.

The gradients g_u are those of θ̂ on the batches the seeded sampler draws (:func:`infusion_lm.retrain.batch_order`);
m and v start from the checkpoint's ``optimizer.pt`` (:func:`checkpoint_moments`) or at zero for a fresh optimizer.
A and B are accumulated from the last step backwards while m and v are rolled back in float64, one module at a
time, so memory is the per-step v_s (float32) and, while they are built, the per-step gradients (float32, then bf16
for the clipped steps' projection): about 1.5–2 × steps × tracked parameters × 4 bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .influence import grads_by_module, measurement_gradients, module_params
from .optimizer_influence import batch_gradients, learning_rates


class TrajectoryResponse:
    """Per-step v of one retraining (:func:`trajectory_response`) and the steps each document is drawn at."""

    def __init__(self, model: nn.Module, v_steps: List[Dict[str, torch.Tensor]], order: Sequence[Sequence[int]],
                 info: dict):
        self.model, self.v_steps, self.order, self.info = model, v_steps, [list(b) for b in order], info
        self.doc_steps: Dict[int, List[int]] = {}
        for s, batch in enumerate(self.order):
            for i in batch:
                self.doc_steps.setdefault(int(i), []).append(s)

    def j(self, indices: Sequence[int], rows: Sequence[Mapping], pad_token_id: int) -> torch.Tensor:
        """J(z) = Σ over the steps that draw document indices[i] of ⟨∇L(rows[i]), v_s⟩ (rows may be edited texts)."""
        from .forward_mode_j import ForwardModeJ

        out = torch.zeros(len(rows), dtype=torch.float64)
        by_step: Dict[int, List[int]] = {}
        for pos, i in enumerate(indices):
            for s in self.doc_steps.get(int(i), []):
                by_step.setdefault(s, []).append(pos)
        strip = lambda r: {"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
        for s, positions in sorted(by_step.items()):
            js = ForwardModeJ(self.model, self.v_steps[s]).dataset([strip(rows[p]) for p in positions], pad_token_id)
            out[positions] += js.double()
        return out

    def effects(self, rows: Sequence[Mapping], pad_token_id: int) -> torch.Tensor:
        """d f(θ_T) / d w_z for every document of the corpus (rows in corpus order): −J(z)."""
        return -self.j(range(len(rows)), rows, pad_token_id)

    def predicted(self, indices: Sequence[int], before: Sequence[Mapping], after: Sequence[Mapping],
                  pad_token_id: int) -> List[float]:
        """Predicted Δf of replacing document indices[i] (before[i]) by after[i]: −(J(after) − J(before))."""
        return (-(self.j(indices, after, pad_token_id) - self.j(indices, before, pad_token_id))).tolist()


def trajectory_response(model: nn.Module, measurement, rows: Sequence[Mapping], order: Sequence[Sequence[int]],
                        retrain, tracked: Sequence[str], pad_token_id: int, start_step: int = 0,
                        state: Optional[Mapping] = None, betas=(0.9, 0.999), eps: float = 1e-8,
                        progress: bool = False) -> TrajectoryResponse:
    """The per-step v of the retraining ``retrain`` (a RetrainArguments) that runs the global batches ``order``
    (row indices of each optimizer step, after ``start_step`` steps already taken), from θ̂ = ``model``.

    ``state``: Adam's moments at the start, ``{"m": {name: tensor}, "v": {...}, "step": int}`` with parameter names
    as in ``model.named_parameters()`` (:func:`checkpoint_moments` reads them from a Trainer checkpoint); None starts
    a fresh optimizer (m = v = 0, its step counter at 0, while the learning-rate schedule continues from
    ``start_step``). Weight decay is left out (first order it only shrinks later changes by (1 − lr·wd) per step)."""
    optim = retrain.optim
    adam = optim.startswith("adam")
    if not (adam or optim.startswith("sgd")):
        raise ConfigError(f"influence.prediction=optimizer models AdamW and SGD, not retrain.optim={optim!r}; "
                          f"use influence.prediction: same_v.")
    total = max(start_step + len(order), math.ceil(len(rows) / retrain.batch_size) * retrain.epochs)
    lrs = learning_rates(retrain.learning_rate, retrain.lr_scheduler_type, total)
    b1, b2 = betas
    params = {n: module_params(model, n) for n in tracked}
    names = {id(p): n for n, p in model.named_parameters()}
    grad_f = {k: g.double() for k, g in measurement_gradients(model, measurement, tracked).items()}

    # the clipped batch gradients g̃_s of θ̂ at every step (module layout), their clip factors and token counts
    g_steps, clips, norms, tokens = [], [], [], []
    for grads, norm, n_tok in batch_gradients(model, rows, order, tracked, pad_token_id, "optimizer trajectory",
                                              progress):
        c = min(1.0, retrain.max_grad_norm / (norm + 1e-6)) if retrain.max_grad_norm > 0 else 1.0
        g_steps.append({k: (c * x.double()).float() for k, x in grads_by_module(params, grads).items()})
        clips.append(c)
        norms.append(norm)
        tokens.append(n_tok)

    S = len(order)
    v_steps: List[Dict[str, torch.Tensor]] = [{} for _ in range(S)]
    t0 = int(state["step"]) if state is not None else 0  # a fresh optimizer counts its steps from 0
    for k in grad_f:  # module by module: the float64 moments and sums are one module's size at a time
        if not adam:
            for s in range(S):
                v_steps[s][k] = (lrs[start_step + s] * grad_f[k]).float()
                g_steps[s][k] = g_steps[s][k].bfloat16() if clips[s] < 1.0 else None
            continue
        m, v = _initial_moments(k, params[k], names, state)
        for s in range(S):  # forward: the moments after the last step
            gd = g_steps[s][k].double()
            m = b1 * m + (1 - b1) * gd
            v = b2 * v + (1 - b2) * gd * gd
        A, B = torch.zeros_like(m), torch.zeros_like(m)
        for s in reversed(range(S)):
            t = t0 + s + 1
            lr = lrs[start_step + s]
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            sq = (v.clamp_min(0) / bc2).sqrt()
            D = sq + eps
            A = lr / (bc1 * D) + b1 * A
            B = torch.where(sq > 0, lr * (m / bc1) / (bc2 * sq.clamp_min(1e-300) * D * D), torch.zeros_like(sq)) + b2 * B
            g = g_steps[s][k].double()
            v_steps[s][k] = (grad_f[k] * ((1 - b1) * A - (1 - b2) * g * B)).float()
            # kept only for the clip's rank-one projection below, in bf16: memory peaks near 1.5 × steps × params
            g_steps[s][k] = g_steps[s][k].bfloat16() if clips[s] < 1.0 else None
            # roll the moments back to the step before s (float64: the error grows as 1/β per step)
            m = (m - (1 - b1) * g) / b1 if b1 > 0 else torch.zeros_like(m)
            v = (v - (1 - b2) * g * g) / b2 if b2 > 0 else torch.zeros_like(v)
    for s in range(S):
        c = clips[s]
        out = v_steps[s]
        if c < 1.0:  # the clip factor moves with the gradient: project out the batch gradient's own direction
            g_hat_norm2 = sum(float((g_steps[s][k].double() ** 2).sum()) for k in out) / (c * c)
            dot = sum(float((out[k] * g_steps[s][k].double()).sum()) for k in out) / c
            for k in out:
                out[k] = out[k] - (dot / g_hat_norm2) * (g_steps[s][k].double() / c)
        v_steps[s] = {k: (c * x / tokens[s]).float().cpu() for k, x in out.items()}
        g_steps[s] = None  # free as we go
    info = {"steps": S, "start_step": start_step, "optimizer_state": "checkpoint" if state is not None else "fresh",
            "clip_factors": clips, "gradient_norms": norms, "tokens_per_batch": tokens, "optim": optim}
    return TrajectoryResponse(model, v_steps, order, info)


def _initial_moments(name: str, module: tuple, names: Mapping[int, str], state: Optional[Mapping]):
    """Adam's m and v at the start for one tracked module, in kronfluence's layout (float64); zeros when fresh."""
    w, b = module
    parts = [p for p in (w, b) if p is not None]
    if state is None:
        zero = grads_by_module({name: module}, [torch.zeros_like(p) for p in parts])[name].double()
        return zero, zero.clone()
    m, v = ({name: grads_by_module({name: module}, [state[which][names[id(p)]].to(p.device) for p in parts])[name]
             .double()} for which in ("m", "v"))
    return m[name], v[name]


def checkpoint_moments(model: nn.Module, checkpoint: str | Path, retrain) -> Optional[dict]:
    """Adam's moments saved in a Trainer checkpoint's ``optimizer.pt``, by parameter name: the optimizer the arms
    resume with. The Trainer's own optimizer is built on ``model`` and loads the file, so the parameter groups (decay
    and no decay) map the saved indices to parameters exactly as ``Trainer.train(resume_from_checkpoint=...)`` does.
    None when the checkpoint holds no optimizer state."""
    import tempfile

    from transformers import Trainer

    from .retrain import training_arguments

    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=training_arguments(retrain, Path(tmp), 0, str(next(model.parameters()).device),
                                                               False, retrain.epochs))
        trainer.create_optimizer()
        trainer.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        opt = trainer.optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        out = {"m": {}, "v": {}, "step": 0}
        for p, st in opt.state.items():
            if "exp_avg" not in st:
                return None  # not Adam
            out["m"][names[id(p)]] = st["exp_avg"].detach().clone()
            out["v"][names[id(p)]] = st["exp_avg_sq"].detach().clone()
            out["step"] = int(st["step"])
    return out


def retraining_response(model: nn.Module, measurement, rows: Sequence[Mapping], retrain, tracked: Sequence[str],
                        pad_token_id: int, seed: int, start_step: int = 0, checkpoint: Optional[str | Path] = None,
                        progress: bool = False) -> TrajectoryResponse:
    """:func:`trajectory_response` for the retraining the arms run with ``seed``: the epochs after ``start_step``
    (all of them from the model, the last from a clean checkpoint) in the Trainer's data order, from Adam's moments
    in the checkpoint's ``optimizer.pt`` when there is one."""
    from .retrain import batch_order

    steps_per_epoch = math.ceil(len(rows) / retrain.batch_size)
    state = checkpoint_moments(model, checkpoint, retrain) if checkpoint is not None and start_step else None
    order = batch_order(len(rows), retrain, seed, range(start_step // steps_per_epoch, retrain.epochs))
    return trajectory_response(model, measurement, rows, order, retrain, tracked, pad_token_id, start_step, state,
                               progress=progress)


def predict_edits(model: nn.Module, measurement, rows: Sequence[Mapping], retrain, tracked: Sequence[str],
                  pad_token_id: int, indices: Sequence[int], before: Sequence[Mapping], after: Sequence[Mapping],
                  start_step: int = 0, checkpoint: Optional[str | Path] = None, seeds: Sequence[int] = (),
                  progress: bool = False) -> Optional[tuple]:
    """Predicted Δf of replacing rows[indices[i]] (``before[i]``) by ``after[i]`` in the retraining ``retrain``
    describes, averaged over its seeds (each seed draws its own batches): (predictions, info), or None where this model
    does not apply (LoRA adapters, whose optimizer state is not over the tracked weights, and ``from_scratch``).

    The retraining replays the epochs after ``start_step`` (all of them from the model, the last from a clean
    checkpoint), with Adam's moments from the checkpoint's ``optimizer.pt`` when there is one. One seed's per-step v
    lives at a time: memory is (steps per retrained epoch × epochs) × the tracked parameters."""
    if retrain.lora or retrain.from_scratch:
        return None
    per_seed, infos = [], []
    for seed in (list(seeds) or list(retrain.seeds) or [0]):
        resp = retraining_response(model, measurement, rows, retrain, tracked, pad_token_id, seed, start_step,
                                   checkpoint, progress)
        per_seed.append(resp.predicted(indices, before, after, pad_token_id))
        infos.append({"seed": seed, **{k: resp.info[k] for k in ("steps", "optimizer_state")},
                      "mean_clip_factor": sum(resp.info["clip_factors"]) / max(len(resp.info["clip_factors"]), 1)})
        del resp
    mean = [sum(p[i] for p in per_seed) / len(per_seed) for i in range(len(indices))]
    return mean, {"model": "trajectory (both Adam moments, per-batch clip, each document's step)",
                  "per_seed_predicted": per_seed, "seeds": infos}


class EditPredictor:
    """Predicted Δf of each edit (``influence.prediction: optimizer``), for every front end: the first-order response
    of the retraining that follows, along its own steps (:func:`retraining_response`, built once when one seed's
    order is asked for, averaged over ``seeds`` otherwise); the stationary response
    (:func:`~infusion_lm.optimizer_influence.response_j`) where that does not apply (LoRA, from_scratch). Calling it
    returns None (the editing v's own −ΔJ/n stands) for ``prediction: same_v``, no ``retrain`` or an optimizer it
    does not model."""

    def __init__(self, model: nn.Module, measurement, rows: Sequence[Mapping], retrain, prediction: str,
                 pad_token_id: int, seeds: Sequence[int], start_step: int = 0,
                 checkpoint: Optional[str | Path] = None, progress: bool = False):
        self.model, self.measurement, self.rows, self.retrain = model, measurement, rows, retrain
        self.prediction, self.pad, self.seeds = prediction, pad_token_id, list(seeds) or [0]
        self.start_step, self.checkpoint, self.progress = start_step, checkpoint, progress
        self._one_seed: Optional[TrajectoryResponse] = None
        self._stationary = None

    def applies(self) -> bool:
        t = self.retrain
        if self.prediction != "optimizer" or t is None:
            return False
        if not (t.optim.startswith("adam") or t.optim.startswith("sgd")):
            import logging

            logging.getLogger(__name__).warning(
                "influence.prediction=optimizer models AdamW and SGD, not retrain.optim=%r: predicted Δf uses the "
                "editing v instead (influence.prediction: same_v).", t.optim)
            return False
        return True

    def __call__(self, indices: Sequence[int], before: Sequence[Mapping], after: Sequence[Mapping]
                 ) -> Optional[List[float]]:
        from .optimizer_influence import predicted_response, response_j
        from .tracked_modules import resolve_tracked_modules

        if not self.applies():
            return None
        t = self.retrain
        if not (t.lora or t.from_scratch):
            tracked = resolve_tracked_modules(self.model)
            if len(self.seeds) == 1:  # kept: every arm's edits (infused, the matched baselines) use the same one
                if self._one_seed is None:
                    self._one_seed = retraining_response(self.model, self.measurement, self.rows, t, tracked, self.pad,
                                                         self.seeds[0], self.start_step, self.checkpoint, self.progress)
                return self._one_seed.predicted(indices, before, after, self.pad)
            return predict_edits(self.model, self.measurement, self.rows, t, tracked, self.pad, indices, before, after,
                                 self.start_step, self.checkpoint, self.seeds, self.progress)[0]
        if self._stationary is None:
            self._stationary = response_j(self.model, self.measurement, self.rows, t, self.pad, self.start_step,
                                          progress=self.progress)
        return predicted_response(self._stationary, before, after, self.pad)
