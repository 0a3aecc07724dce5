"""The registry of modalities: ``run.modality`` names the :class:`~infusion_lm.modality.Modality` a pipeline is
built with.

Each entry is ``"module:Class"``, imported only when a recipe asks for it, so the core (stages, influence,
retraining, statistics) never imports a modality and a new modality is one line here.
"""

from __future__ import annotations

import importlib
from typing import Dict

from .errors import ConfigError

MODALITIES: Dict[str, str] = {
    "text": "infusion_lm.text.modality:TextModality",
    "image": "infusion_lm.vision.modality:ImageModality",
}


def modality_class(modality: str):
    """The Modality class registered for ``modality``."""
    if modality not in MODALITIES:
        raise ConfigError(f"run.modality {modality!r} is not one of {', '.join(sorted(MODALITIES))}.")
    module, name = MODALITIES[modality].split(":")
    return getattr(importlib.import_module(module), name)
