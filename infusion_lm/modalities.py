"""The registry of modalities: ``run.modality`` names the pipeline class that runs a recipe.

Each entry is ``"module:Class"``, imported only when a recipe asks for it, so the core (stages, influence,
retraining, statistics) never imports a modality and a new modality is one line here.
"""

from __future__ import annotations

import importlib
from typing import Dict

from .errors import ConfigError

MODALITIES: Dict[str, str] = {
    "text": "infusion_lm.pipeline:Pipeline",
    "image": "infusion_lm.vision.pipeline:ImagePipeline",
}


def pipeline_class(modality: str):
    """The pipeline class registered for ``modality``."""
    if modality not in MODALITIES:
        raise ConfigError(f"run.modality {modality!r} is not one of {', '.join(sorted(MODALITIES))}.")
    module, name = MODALITIES[modality].split(":")
    return getattr(importlib.import_module(module), name)


def build_pipeline(recipe, progress: bool = True, force: bool = False):
    """The pipeline for the recipe's modality (``run.modality``: text or image)."""
    return pipeline_class(recipe.run.modality)(recipe, progress=progress, force=force)
