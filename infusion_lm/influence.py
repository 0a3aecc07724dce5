"""The influence engine: EK-FAC factors (kronfluence), the IHVP of the whole measurement, and document scores.

Conventions:
- v = (G + λI)⁻¹ ∇θ f(θ̂), per tracked module, in kronfluence's layout (out × in, bias gradient as last column).
- J(z) = ⟨∇θ L(z, θ̂), v⟩, which is kronfluence's pairwise score for the measurement f.
- Upweighting z changes f by about −J(z); the documents to edit have the most negative J.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from .causal_lm import IGNORE_INDEX, CausalLMCollator, per_document_loss, per_document_loss_from_logits, upcast
from .distributed import is_main
from .errors import RunFolderError
from .measurement import Measurement, to_device
from .task import CausalLMTask

logger = logging.getLogger(__name__)

FACTORS_ANALYSIS = "factors"


# ----------------------------------------------------------------------------------------------------------------
# Layout helpers: a tracked module's parameters <-> one matrix in kronfluence's layout.


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32, fp64 kept."""
    return torch.promote_types(dtype, torch.float32)


def module_params(model: nn.Module, name: str) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    mod = model.get_submodule(name)
    return mod.weight, getattr(mod, "bias", None)


def to_layout(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    mat = weight.reshape(weight.shape[0], -1)
    return torch.cat([mat, bias.reshape(-1, 1)], dim=1) if bias is not None else mat


def from_layout(mat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    w_cols = weight[0].numel()
    dw = mat[:, :w_cols].reshape(weight.shape)
    db = mat[:, w_cols] if bias is not None else None
    return dw, db


def model_fingerprint(model: nn.Module, tracked: Sequence[str]) -> str:
    """Hash of the config, the tracked module names and shapes, and the tracked weights themselves."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name in tracked:
        for p in module_params(model, name):
            if p is None:
                continue
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Factors.


class _Collate:
    """One collate for kronfluence's train and query loaders: training rows are collated, measurement batches
    (already collated, one per item) pass through."""

    def __init__(self, pad_token_id: int):
        self.collator = CausalLMCollator(pad_token_id)

    def __call__(self, items):
        if len(items) == 1 and torch.is_tensor(items[0].get("input_ids")):
            return items[0]
        return self.collator(items)


@contextmanager
def kronfluence_view(model: nn.Module, task):
    """kronfluence's `prepare_model` freezes and wraps modules in place; this undoes it afterwards, so the caller's
    model comes back unchanged without paying for a deep copy (a full second model in memory)."""
    from kronfluence.analyzer import prepare_model
    from kronfluence.module.tracked_module import TrackedModule

    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    try:
        yield prepare_model(model, task)
    finally:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, TrackedModule):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.original_module)
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(training)


def _analyzer(wrapped: nn.Module, task, root: Path, pad_token_id: Optional[int], disable_tqdm: bool = False,
              collate_fn=None):
    from kronfluence.analyzer import Analyzer
    from kronfluence.utils.dataset import DataLoaderKwargs

    import os

    disable_tqdm = disable_tqdm or os.environ.get("TQDM_DISABLE", "") not in ("", "0")  # `--quiet` reaches kronfluence
    analyzer = Analyzer(analysis_name=FACTORS_ANALYSIS, model=wrapped, task=task, output_dir=str(root),
                        cpu=next(wrapped.parameters()).device.type == "cpu", disable_tqdm=disable_tqdm,
                        log_level=logging.WARNING)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn or _Collate(pad_token_id)))
    return analyzer


def factors_name(strategy: str) -> str:
    return strategy


def factors_dir(root: str | Path, strategy: str) -> Path:
    return Path(root) / FACTORS_ANALYSIS / f"factors_{factors_name(strategy)}"


def fit_factors(
    model: nn.Module,
    dataset,
    tracked: Sequence[str],
    root: str | Path,
    *,
    pad_token_id: Optional[int] = None,
    strategy: str = "ekfac",
    use_empirical_fisher: bool = False,
    batch_size: int = 8,
    covariance_max_examples: Optional[int] = None,
    seed: int = 0,
    overwrite: bool = True,
    task=None,
    collate_fn=None,
) -> Path:
    """Fits kronfluence factors under ``root/factors/`` and records the model fingerprint beside them.

    ``task`` and ``collate_fn`` default to the causal-LM ones; the image adapter passes its own."""
    from kronfluence.arguments import FactorArguments

    from .atomic_io import write_json

    task = task or CausalLMTask(tracked, seed=seed)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=use_empirical_fisher,
                                  covariance_max_examples=covariance_max_examples)
    with kronfluence_view(model, task) as wrapped:
        analyzer = _analyzer(wrapped, task, Path(root), pad_token_id, collate_fn=collate_fn)
        analyzer.fit_all_factors(factors_name=factors_name(strategy), dataset=dataset, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=overwrite)
    out = factors_dir(root, strategy)
    fp = {"model": model_fingerprint(model, tracked), "tracked_modules": list(tracked)}
    if is_main():  # on CUDA every rank fits (kronfluence distributes); the pipeline waits for all at the stage's end
        write_json(out / "infusion_fingerprint.json", fp)
    return out


def load_factors(directory: str | Path, model: Optional[nn.Module] = None, tracked: Optional[Sequence[str]] = None):
    """Loads (FactorArguments, {factor_name: {module_name: tensor}}) and checks that they belong to ``model``."""
    from kronfluence.arguments import FactorArguments
    from kronfluence.factor.config import FactorConfig
    from kronfluence.factor.covariance import covariance_matrices_exist, load_covariance_matrices
    from kronfluence.factor.eigen import (eigendecomposition_exist, lambda_matrices_exist, load_eigendecomposition,
                                          load_lambda_matrices)
    from kronfluence.utils.save import load_json

    from .atomic_io import read_json

    directory = Path(directory)
    args_path = directory / "factor_arguments.json"
    fp_path = directory / "infusion_fingerprint.json"
    if not args_path.is_file() or not fp_path.is_file():
        raise RunFolderError(f"No complete factors in {directory}; run `infusion-lm fit` first.")
    if model is not None:
        recorded = read_json(fp_path)
        tracked = list(tracked if tracked is not None else recorded["tracked_modules"])
        if list(recorded["tracked_modules"]) != tracked:
            raise RunFolderError(f"Factors in {directory} track {recorded['tracked_modules'][:3]}..., not "
                                 f"{tracked[:3]}...; refit with `infusion-lm fit` or use another output_dir.")
        current = model_fingerprint(model, tracked)
        if recorded["model"] != current:
            raise RunFolderError(f"Factors in {directory} were fitted on a different model (fingerprint "
                                 f"{recorded['model']} != {current}); use a new output_dir or refit them.")
    factor_args = FactorArguments(**load_json(args_path))
    config = FactorConfig.CONFIGS[factor_args.strategy]
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    try:
        if config.requires_covariance_matrices_for_precondition:
            if not covariance_matrices_exist(directory):
                raise FileNotFoundError("covariance matrices")
            factors.update(load_covariance_matrices(directory))
        if config.requires_eigendecomposition_for_precondition:
            if not eigendecomposition_exist(directory):
                raise FileNotFoundError("eigendecomposition")
            factors.update(load_eigendecomposition(directory))
        if config.requires_lambda_matrices_for_precondition:
            if not lambda_matrices_exist(directory):
                raise FileNotFoundError("lambda matrices")
            factors.update(load_lambda_matrices(directory))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a truncated file
        raise RunFolderError(f"Factors in {directory} are missing or corrupted ({err}); delete that folder and "
                             f"rerun `infusion-lm fit`.") from None
    return factor_args, factors


# ----------------------------------------------------------------------------------------------------------------
# IHVP of the whole measurement.


def measurement_gradients(model: nn.Module, measurement: Measurement, tracked: Sequence[str]) -> Dict[str, torch.Tensor]:
    """∇θ f for each tracked module, in kronfluence's layout, accumulated over all measurement batches."""
    params = {n: module_params(model, n) for n in tracked}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = [p for pair in params.values() for p in pair if p is not None]
    for p in leaves:
        p.requires_grad_(True)
    try:
        device = leaves[0].device
        grads = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in leaves]
        for batch in measurement.batches:
            value = measurement(model, to_device(batch, device))
            for g, d in zip(grads, torch.autograd.grad(value, leaves)):
                g.add_(d.to(g.dtype))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return grads_by_module(params, grads)


def grads_by_module(params: Mapping[str, tuple], grads: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Regroups a flat list of (weight[, bias]) gradients into one kronfluence-layout matrix per module."""
    out, it = {}, iter(grads)
    for name, (_, b) in params.items():
        gw = next(it)
        out[name] = to_layout(gw, next(it) if b is not None else None)
    return out


def precondition(gradients: Mapping[str, torch.Tensor], factor_args, factors, damping: Optional[float],
                 device: torch.device | str = "cpu", damping_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """v = (G + λI)⁻¹ g per module, with kronfluence's own preconditioner and the same per-module λ as its scores.

    ``damping_scale`` multiplies λ: the fixed ``damping``, or kronfluence's per-module heuristic
    0.1 × mean(eigenvalues), recomputed here module by module (a damping sweep)."""
    from kronfluence.arguments import ScoreArguments
    from kronfluence.factor.config import FactorConfig
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED

    config = FactorConfig.CONFIGS[factor_args.strategy]

    def storage_for(name):
        # `prepare` rewrites storage in place; work on clones so the loaded factors stay reusable.
        st: Dict[str, Any] = {k: (v[name].clone() if name in v else None) for k, v in factors.items()}
        st.setdefault(LAMBDA_MATRIX_NAME, None)
        st.setdefault(NUM_LAMBDA_PROCESSED, None)
        return st

    out = {}
    for name, grad in gradients.items():
        lam = damping
        if damping_scale != 1.0:
            if lam is None:  # the heuristic for this module: 0.1 × the mean of its (processed) eigenvalues
                probe = storage_for(name)
                config.prepare(probe, ScoreArguments(damping_factor=0.0), torch.device(device))
                inv = probe[LAMBDA_MATRIX_NAME]
                lam = HEURISTIC_DAMPING_SCALE * float(inv.double().reciprocal().mean()) if inv is not None else 0.0
            lam = lam * damping_scale
        storage = storage_for(name)
        config.prepare(storage, ScoreArguments(damping_factor=lam), torch.device(device))
        out[name] = config.precondition_gradient(grad.to(device=device, dtype=torch.float32)[None], storage)[0].cpu()
    return out


def compute_ihvp(model: nn.Module, measurement: Measurement, tracked: Sequence[str], factors_directory: str | Path,
                 damping: Optional[float], damping_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    factor_args, factors = load_factors(factors_directory, model, tracked)
    grads = measurement_gradients(model, measurement, tracked)
    return precondition(grads, factor_args, factors, damping, device=next(model.parameters()).device,
                        damping_scale=damping_scale)


# ----------------------------------------------------------------------------------------------------------------
# Scores.


def kronfluence_scores(model: nn.Module, dataset, measurement: Measurement, tracked: Sequence[str], root: str | Path,
                       *, pad_token_id: Optional[int] = None, strategy: str = "ekfac",
                       damping: Optional[float] = None, batch_size: int = 8, scores_name: str = "infusion",
                       task=None, collate_fn=None) -> torch.Tensor:
    """kronfluence's pairwise scores of every training document against the whole (aggregated) measurement, [n]."""
    from kronfluence.arguments import ScoreArguments

    task = task or CausalLMTask(tracked, measurement)
    score_args = ScoreArguments(damping_factor=damping, aggregate_query_gradients=True)
    with kronfluence_view(model, task) as wrapped:
        analyzer = _analyzer(wrapped, task, Path(root), pad_token_id, collate_fn=collate_fn)
        analyzer.compute_pairwise_scores(scores_name=scores_name, factors_name=factors_name(strategy),
                                         query_dataset=list(measurement.batches), train_dataset=dataset,
                                         per_device_query_batch_size=1, per_device_train_batch_size=batch_size,
                                         score_args=score_args, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name)["all_modules"]
    return scores.sum(dim=0).float().cpu()


def autograd_scores(model: nn.Module, dataset, v: Mapping[str, torch.Tensor], *, pad_token_id: int) -> torch.Tensor:
    """J(z) = ⟨∇θ L(z), v⟩ by one backward pass per document: the slow, exact reference."""
    collate = CausalLMCollator(pad_token_id)
    device = next(model.parameters()).device
    names = list(v)
    params = {n: module_params(model, n) for n in names}
    leaves = [p for pair in params.values() for p in pair if p is not None]
    flags = [p.requires_grad for p in leaves]
    for p in leaves:
        p.requires_grad_(True)
    out = []
    try:
        for i in range(len(dataset)):
            batch = to_device(collate([dataset[i]]), device)
            loss = per_document_loss(model, batch).sum()
            grads = grads_by_module(params, torch.autograd.grad(loss, leaves))
            out.append(sum(float((g.double() * v[n].to(device).double()).sum()) for n, g in grads.items()))
    finally:
        for p, f in zip(leaves, flags):
            p.requires_grad_(f)
    return torch.tensor(out, dtype=torch.float64)


def tracked_norm(model: nn.Module, names: Sequence[str]) -> float:
    return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for n in names for p in module_params(model, n) if p is not None)))


def ihvp_norm(v: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in v.values())))


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

    def losses(self, batch: Dict[str, torch.Tensor], sign: int, **kw) -> torch.Tensor:
        params = self.plus if sign > 0 else self.minus
        logits = functional_call(self.model, params, args=(), kwargs={
            "input_ids": batch.get("input_ids"), "attention_mask": batch["attention_mask"], **kw}).logits
        return per_document_loss_from_logits(logits, batch["labels"])

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
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            both = per_document_loss_from_logits(logits, torch.cat([batch["labels"], batch["labels"]]))
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
                    tail = functional_call(self.model, params, args=(), kwargs={
                        "input_ids": ids[chunk, p:], "attention_mask": torch.ones(n, T, dtype=torch.long, device=ids.device),
                        "cache": cache, "use_cache": True}).logits
                    at_p = F.cross_entropy(logits0[p - 1].expand(n, -1), labels[chunk, p], ignore_index=IGNORE_INDEX,
                                           reduction="none").double()
                    rest = per_document_loss_from_logits(tail, labels[chunk, p:]).double()
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
