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
They stream forward in float32, as the Trainer keeps them (:class:`TrajectoryResponse`): memory is bounded per group
of tracked modules, not by the corpus or the steps; time is one pass over the batches per group.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .influence import grads_by_module, measurement_gradients
from .param_layout import module_params
from .optimizer_influence import batch_gradients, learning_rates


# Bytes per tracked parameter while its group streams: ∇f, m, v and per-module temporaries (float32); and per needed
# step, its w_s so far and its clipped gradient (float32).
_BYTES_PER_PARAM, _BYTES_PER_PARAM_PER_STEP = 24, 8
PREDICTION_MEMORY_BYTES = 2 << 30  # the state one group of modules may hold; more modules -> more passes over the data


def second_moment_term(m, sq, D, lr: float, bc1: float, bc2: float) -> torch.Tensor:
    """b_u = lr_u m̂_u / ((1 − β2^t) √v̂_u D_u²): step u's share of B_s (zero where v̂ is zero)."""
    return torch.where(sq > 0, lr * (m / bc1) / (bc2 * sq.clamp_min(1e-300) * D * D), torch.zeros_like(sq))


class TrajectoryResponse:
    """The retraining's first-order response (:func:`trajectory_response`), computed for the rows asked for.

    Nothing of size steps × parameters is held. v_s enters J only through ⟨∇L(z), v_s⟩ for the steps s that draw an
    asked-for document, so one pass over the steps in their order (each batch's gradient recomputed, Adam's moments
    rolled forward) accumulates the unprojected v_s of those steps alone as each later step u passes (A_s and B_s are
    sums over u ≥ s), and forward-mode J reads each at the end. The clip's projection needs ⟨g_s, v_s⟩, ‖g_s‖² and
    ⟨∇L(z), g_s⟩. Modules go in groups whose state fits ``memory_bytes``, one pass over the data per group; every
    quantity adds over groups."""

    def __init__(self, model: nn.Module, measurement, rows: Sequence[Mapping], order: Sequence[Sequence[int]], retrain,
                 tracked: Sequence[str], pad_token_id: int, start_step: int, state: Optional[Mapping], betas, eps: float,
                 progress: bool, memory_bytes: int):
        optim = retrain.optim
        if not (optim.startswith("adam") or optim.startswith("sgd")):
            raise ConfigError(f"influence.prediction=optimizer models AdamW and SGD, not retrain.optim={optim!r}; "
                              f"use influence.prediction: same_v.")
        self.model, self.measurement, self.rows, self.retrain = model, measurement, rows, retrain
        self.tracked, self.pad, self.start_step, self.state = list(tracked), pad_token_id, start_step, state
        self.betas, self.eps, self.progress, self.memory_bytes = betas, eps, progress, memory_bytes
        self.adam = optim.startswith("adam")
        self.order = [list(b) for b in order]
        total = max(start_step + len(order), math.ceil(len(rows) / retrain.batch_size) * retrain.epochs)
        self.lrs = learning_rates(retrain.learning_rate, retrain.lr_scheduler_type, total)
        self.doc_steps: Dict[int, List[int]] = {}
        for s, batch in enumerate(self.order):
            for i in batch:
                self.doc_steps.setdefault(int(i), []).append(s)
        self._steps: Optional[dict] = None  # per-step clip factors, gradient norms and tokens, once a pass has run
        self.passes = 0
        self._done: Dict[int, dict] = {}  # steps whose w_s is written: the clip's ⟨g_s, w_s⟩ and ‖g_s‖²
        self._dir = tempfile.TemporaryDirectory(prefix="infusion_trajectory_")  # removed with this object

    @property
    def info(self) -> dict:
        if self._steps is None:  # one pass over the batches for their norms alone
            norms, tokens = [], []
            for _, norm, n_tok in batch_gradients(self.model, self.rows, self.order, self.tracked[:1], self.pad,
                                                  "optimizer trajectory (norms)", self.progress):
                norms.append(norm)
                tokens.append(n_tok)
            self._steps = {"clip_factors": [self._clip(x) for x in norms], "gradient_norms": norms,
                           "tokens_per_batch": tokens}
        return {"steps": len(self.order), "start_step": self.start_step,
                "optimizer_state": "checkpoint" if self.state is not None else "fresh",
                "optim": self.retrain.optim, "passes_over_the_data": self.passes, **self._steps}

    def _clip(self, norm: float) -> float:
        c = self.retrain.max_grad_norm
        return min(1.0, c / (norm + 1e-6)) if c > 0 else 1.0

    def _groups(self, n_needed_steps: int) -> List[List[str]]:
        """The tracked modules in order, cut into groups whose streaming state fits ``memory_bytes``."""
        per = _BYTES_PER_PARAM + _BYTES_PER_PARAM_PER_STEP * n_needed_steps
        groups, size = [[]], 0
        for name in self.tracked:
            n = sum(p.numel() for p in module_params(self.model, name) if p is not None)
            if groups[-1] and (size + n) * per > self.memory_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
        return groups

    def j(self, indices: Sequence[int], rows: Sequence[Mapping], pad_token_id: int) -> torch.Tensor:
        """J(z) = Σ over the steps that draw document indices[i] of ⟨∇L(rows[i]), v_s⟩ (rows may be edited texts).

        Steps not asked about before are streamed (one pass per group of modules) and their w_s written to a
        temporary folder, so a later call on documents of the same steps (a matched baseline's edits) only reads
        them back; each step's J is one JVP over its rows with the whole w_s (and one with g_s where clipped)."""
        from safetensors.torch import load_file

        from .forward_mode_j import ForwardModeJ

        pairs = [(pos, s) for pos, i in enumerate(indices) for s in self.doc_steps.get(int(i), [])]
        out = torch.zeros(len(rows), dtype=torch.float64)
        if not pairs:
            return out
        needed = sorted({s for _, s in pairs})
        missing = [s for s in needed if s not in self._done]
        for g_index, group in enumerate(self._groups(len(missing)) if missing else []):
            self._stream_group(group, g_index, missing)
        clips, tokens = self._steps["clip_factors"], self._steps["tokens_per_batch"]
        strip = lambda r: {"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
        for s in needed:
            positions = sorted({pos for pos, t in pairs if t == s})
            batch = [strip(rows[p]) for p in positions]
            tensors = {}
            for f in sorted(Path(self._dir.name).glob(f"step{s}_group*.safetensors")):
                tensors.update(load_file(str(f)))
            part = lambda prefix: {k[2:]: t for k, t in tensors.items() if k.startswith(prefix)}
            js = ForwardModeJ(self.model, part("w.")).dataset(batch, pad_token_id).double()
            if clips[s] < 1.0 and self._done[s]["gn2"] > 0:  # the clip's projection: w − g ⟨g, w⟩ / ‖g‖²
                jg = ForwardModeJ(self.model, part("g.")).dataset(batch, pad_token_id).double()
                js = js - jg * self._done[s]["dot"] / self._done[s]["gn2"]
            tensors = None
            for p, jp in zip(positions, js.tolist()):
                out[p] += clips[s] / tokens[s] * jp
        return out

    def _stream_group(self, group: List[str], g_index: int, needed: List[int]) -> None:
        """One pass over the steps for one group of modules: Adam's moments forward (float32, as the Trainer keeps
        them) and, for each needed step s, w_s = ∇f ⊙ Σ_{u ≥ s} [(1 − β1) β1^(u−s) a_u − (1 − β2) β2^(u−s) g̃_s b_u]
        accumulated as u passes, written for :meth:`j` with the clip's pieces ⟨g_s, w_s⟩ and ‖g_s‖² (they add over
        groups)."""
        from safetensors.torch import save_file

        b1, b2 = self.betas
        params = {n: module_params(self.model, n) for n in group}
        names = {id(p): n for n, p in self.model.named_parameters()}
        grad_f = {k: g.float() for k, g in measurement_gradients(self.model, self.measurement, group).items()}
        moments = {k: tuple(x.float() for x in _initial_moments(k, params[k], names, self.state)) if self.adam
                   else None for k in group}
        t0 = int(self.state["step"]) if self.state is not None else 0  # a fresh optimizer counts from 0
        saved: Dict[int, Dict[str, torch.Tensor]] = {}  # needed step -> its clipped gradient g̃
        w: Dict[int, Dict[str, torch.Tensor]] = {}  # needed step -> its w_s, so far
        clip_of: Dict[int, float] = {}
        self.passes += 1
        norms, tokens, at_step = [], [], set(needed)
        for u, (grads, norm, n_tok) in enumerate(batch_gradients(
                self.model, self.rows, self.order, group, self.pad, "optimizer trajectory", self.progress)):
            c = self._clip(norm)
            norms.append(norm)
            tokens.append(n_tok)
            g_t = {k: (c * x.double()).float() for k, x in grads_by_module(params, grads).items()}
            del grads
            if u in at_step:
                saved[u], clip_of[u] = g_t, c
                if not self.adam:  # SGD: v_s = lr_s ∇f, nothing accumulates over later steps
                    w[u] = {k: self.lrs[self.start_step + u] * grad_f[k] for k in group}
                    continue
                w[u] = {k: torch.zeros_like(grad_f[k]) for k in group}
            if not self.adam:
                continue
            t, lr = t0 + u + 1, self.lrs[self.start_step + u]
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            for k in group:
                m, v = moments[k]
                m.mul_(b1).add_(g_t[k], alpha=1 - b1)
                v.mul_(b2).addcmul_(g_t[k], g_t[k], value=1 - b2)
                if not w:
                    continue  # before the first needed step only the moments matter
                sq = (v.clamp_min(0) / bc2).sqrt()
                D = sq + self.eps
                fa, fb = grad_f[k] * (lr / (bc1 * D)), grad_f[k] * second_moment_term(m, sq, D, lr, bc1, bc2)
                for s in w:
                    w[s][k].add_(fa, alpha=(1 - b1) * b1 ** (u - s)).sub_(saved[s][k] * fb, alpha=(1 - b2) * b2 ** (u - s))
        if self._steps is None:
            self._steps = {"clip_factors": [self._clip(x) for x in norms], "gradient_norms": norms,
                           "tokens_per_batch": tokens}
        for s in w:
            c, done = clip_of[s], self._done.setdefault(s, {"dot": 0.0, "gn2": 0.0})
            tensors = {f"w.{k}": x.contiguous() for k, x in w[s].items()}
            if c < 1.0:  # the projection's pieces (g the unclipped batch gradient)
                g = {k: x / c for k, x in saved[s].items()}
                done["dot"] += sum(float((g[k].double() * w[s][k].double()).sum()) for k in group)
                done["gn2"] += sum(float(g[k].double().pow(2).sum()) for k in group)
                tensors.update({f"g.{k}": x.contiguous() for k, x in g.items()})
            save_file(tensors, str(Path(self._dir.name) / f"step{s}_group{g_index}.safetensors"))
            w[s] = saved[s] = tensors = None  # free as we go

    def effects(self, rows: Sequence[Mapping], pad_token_id: int) -> torch.Tensor:
        """d f(θ_T) / d w_z for every document of the corpus (rows in corpus order): −J(z)."""
        return -self.j(range(len(rows)), rows, pad_token_id)

    def predicted(self, indices: Sequence[int], before: Sequence[Mapping], after: Sequence[Mapping],
                  pad_token_id: int) -> List[float]:
        """Predicted Δf of replacing document indices[i] (before[i]) by after[i]: −(J(after) − J(before)), one pass."""
        n = len(indices)
        js = self.j(list(indices) + list(indices), list(before) + list(after), pad_token_id)
        return (-(js[n:] - js[:n])).tolist()


def trajectory_response(model: nn.Module, measurement, rows: Sequence[Mapping], order: Sequence[Sequence[int]],
                        retrain, tracked: Sequence[str], pad_token_id: int, start_step: int = 0,
                        state: Optional[Mapping] = None, betas=(0.9, 0.999), eps: float = 1e-8,
                        progress: bool = False, memory_bytes: int = PREDICTION_MEMORY_BYTES) -> TrajectoryResponse:
    """The first-order response of the retraining ``retrain`` (a RetrainArguments) that runs the global batches
    ``order`` (row indices of each optimizer step, after ``start_step`` steps already taken), from θ̂ = ``model``:
    per step s, v_s as in the module docstring, evaluated for the rows :meth:`TrajectoryResponse.j` is asked about.

    ``state``: Adam's moments at the start, ``{"m": {name: tensor}, "v": {...}, "step": int}`` with parameter names
    as in ``model.named_parameters()`` (:func:`checkpoint_moments` reads them from a Trainer checkpoint); None starts
    a fresh optimizer (m = v = 0, its step counter at 0, while the learning-rate schedule continues from
    ``start_step``). Weight decay is left out (first order it only shrinks later changes by (1 − lr·wd) per step).
    ``memory_bytes`` bounds the streaming state of one group of modules (see :class:`TrajectoryResponse`)."""
    return TrajectoryResponse(model, measurement, rows, order, retrain, tracked, pad_token_id, start_step, state,
                              betas, eps, progress, memory_bytes)


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
    checkpoint), with Adam's moments from the checkpoint's ``optimizer.pt`` when there is one. Each seed streams its
    own batches; memory is bounded per group of modules (:class:`TrajectoryResponse`), whatever the number of steps."""
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
