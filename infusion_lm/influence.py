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
from torch import nn

from .causal_lm import CausalLMCollator, per_document_loss
from .distributed import is_main
from .errors import RunFolderError
from .measurement import Measurement, to_device
from .param_layout import accumulation_dtype, from_layout, module_params, to_layout  # noqa: F401
from .task import CausalLMTask

logger = logging.getLogger(__name__)

FACTORS_ANALYSIS = "factors"


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


# J without a backward pass lives in finite_difference_j.py; these names stay importable from here
from .finite_difference_j import (FiniteDifferenceJ, evaluating, fd_epsilon, fp32_view, ihvp_norm,  # noqa: E402,F401
                                  perturbed_params, tracked_norm)
