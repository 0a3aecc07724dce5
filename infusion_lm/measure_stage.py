"""The measure stage's work: v (the IHVP of f) from the factors or from the optimizer's state, written with what
describes it (f at θ̂, the norms, the preconditioner and its settings)."""

from __future__ import annotations

from . import engine
from . import influence as inf
from .atomic_io import write_json, write_tensors


def measure_into_run(pipe, factors_dir) -> None:
    """Computes v at θ̂ and writes ihvp.safetensors and measure.json (and the optimizer's statistics, which a second
    measurement such as the defender's reuses)."""
    i = pipe.recipe.influence
    pad = pipe.influence_kwargs().get("pad_token_id") if not pipe.uses_factors else None  # the modality's, if any
    v, extra = engine.influence_vector(
        pipe.model, pipe.measurement, pipe.tracked, i, factors=factors_dir,
        rows=None if pipe.uses_factors else pipe.arm_rows({}), retrain=pipe.recipe.retrain, pad_token_id=pad,
        start_step=0 if pipe.uses_factors else pipe.checkpoint_step(), progress=pipe.progress)
    if not pipe.uses_factors:
        sq, clip, tokens = extra.pop("stats")  # kept for a second measurement (the defender's view)
        write_tensors(pipe.folder.optimizer_stats, sq,
                      metadata={"clip": repr(clip), "tokens": repr(tokens)})
    # the factors' settings describe v only when v comes from them (the stage table declares them so)
    factors = {"strategy": i.strategy, "damping": i.damping if i.damping is not None else
               "kronfluence per-module heuristic (0.1 x mean eigenvalue)",
               "damping_scale": i.damping_scale} if pipe.uses_factors else {}
    write_tensors(pipe.folder.ihvp, v, metadata={"preconditioner": i.preconditioner,
                                                 **{k: str(x) for k, x in factors.items()}})
    write_json(pipe.folder.measure, {
        "f": pipe.measurement.value(pipe.model),
        "description": pipe.measurement.description,
        "ihvp_norm": inf.ihvp_norm(v),
        "tracked_norm": inf.tracked_norm(pipe.model, pipe.tracked),
        "preconditioner": i.preconditioner,
        **factors,
        "tracked_modules": pipe.tracked,
        "prediction_divisor": pipe.prediction_divisor,
        **({"optimizer": extra} if extra else {}),
    })

