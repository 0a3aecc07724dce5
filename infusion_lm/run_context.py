"""What a modality is given of the run it serves: :class:`RunContext`.

A modality (text, images, a user's own) is built with a context, never with the pipeline: the recipe, the run folder,
the shared handles (the models, the corpus, f), loaded once on first use, and the few run services its own work calls
(the clean checkpoint, v, the cached synthesize stage, the baseline editors). The pipeline fills it in; a modality
cannot reach anything else of the pipeline, so what flows between them is exactly what is listed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

from .config import Recipe
from .run_folder import RunFolder

HANDLES = {
    "base_model": "the recipe's model (writes the synthetic corpus, starts the clean fine-tune)",
    "tokenizer": "the model's tokenizer, or None for a modality without one",
    "model": "θ̂, where influence is computed and documents are edited (the recipe's model or the clean checkpoint)",
    "documents": "the corpus as loaded",
    "dataset": "the training rows kronfluence and the editors read",
    "measurement": "f, a Measurement",
    "tracked": "the module names kronfluence tracks",
    "lora_influence": "whether influence is over LoRA adapters (the arms train LoRA from a checkpoint with them)",
    "prediction_divisor": "predicted Δf = −ΔJ / divisor",
}

SERVICES = {
    "clean_checkpoint": "() -> the clean Trainer checkpoint every arm resumes from (trained once, cached)",
    "checkpoint_step": "() -> the optimizer step of that checkpoint (0 when the arms start from the model)",
    "synthesize": "() -> runs the cached synthesize stage; returns the corpus path",
    "load_ihvp": "() -> v = H⁻¹∇f per tracked module, as the measure stage saved it",
    "baseline_edits": "(arm, indices, editor=None, matched=False, counts_from=None, **overrides) -> the folder of a "
                      "baseline's edits",
    "stage_fingerprint": "(stage) -> the cache fingerprint of a stage or cache key",
}


class RunContext:
    """The recipe, the run folder and the handles and services named in ``HANDLES`` and ``SERVICES``.

    ``handles`` maps each handle's name to a function that returns it (called on every access: the pipeline caches);
    ``services`` maps each service's name to the function itself."""

    def __init__(self, recipe: Recipe, folder: RunFolder, progress: bool,
                 handles: Dict[str, Callable[[], Any]], services: Dict[str, Callable]):
        missing = (set(HANDLES) - set(handles)) | (set(SERVICES) - set(services))
        extra = (set(handles) - set(HANDLES)) | (set(services) - set(SERVICES))
        if missing or extra:
            raise TypeError(f"RunContext: missing {sorted(missing)}, unknown {sorted(extra)}")
        self.recipe = recipe
        self.folder = folder
        self.progress = progress
        self._handles = dict(handles)
        self._services = dict(services)

    @property
    def dir(self) -> Path:
        """The run folder's root."""
        return self.folder.root

    def __getattr__(self, name: str):
        # only reached for names that are not plain attributes: the handles and services
        handles, services = self.__dict__.get("_handles", {}), self.__dict__.get("_services", {})
        if name in handles:
            return handles[name]()
        if name in services:
            return services[name]
        raise AttributeError(f"a modality's RunContext has no {name!r}; it holds recipe, folder, dir, progress, "
                             f"{', '.join(list(HANDLES) + list(SERVICES))}")

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(HANDLES) | set(SERVICES))


def pipeline_context(pipe) -> RunContext:
    """The context a pipeline gives its modality: its own cached handles and its services, nothing else."""
    handles = {name: (lambda n=name: getattr(pipe, n)) for name in HANDLES}
    services = {name: getattr(pipe, name) for name in SERVICES}
    return RunContext(pipe.recipe, pipe.folder, pipe.progress, handles, services)

