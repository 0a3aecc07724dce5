"""The registry of modalities: ``run.modality`` names the :class:`~infusion_lm.modality.Modality` a pipeline is
built with.

Each entry is ``"module:Class"``, imported only when a recipe asks for it, so the core (stages, influence,
retraining, statistics) never imports a modality and a new modality is one line here.
"""

from __future__ import annotations

import importlib
from typing import Dict, Union

from .errors import ConfigError

MODALITIES: Dict[str, Union[str, type]] = {
    "text": "infusion_lm.text.modality:TextModality",
    "image": "infusion_lm.vision.modality:ImageModality",
}


def register_modality(name: str, modality: Union[str, type]) -> None:
    """Adds a modality: a class implementing :class:`~infusion_lm.modality.Modality`, or its
    ``"package.module:Class"``. Recipes with ``modality: <name>`` then run with it; no library file changes."""
    if isinstance(modality, str) and ":" not in modality:
        raise ConfigError(f"register_modality({name!r}, {modality!r}): give the class, or 'package.module:Class'.")
    MODALITIES[name] = modality


def modality_class(modality: str):
    """The Modality class registered for ``modality``."""
    if modality not in MODALITIES:
        raise ConfigError(f"run.modality {modality!r} is not one of {', '.join(sorted(MODALITIES))}.")
    if isinstance(MODALITIES[modality], type):
        return MODALITIES[modality]
    module, name = MODALITIES[modality].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"modality {modality!r} names {MODALITIES[modality]!r}, which cannot be imported: {err}.") from None
