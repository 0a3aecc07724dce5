"""The registry of modalities: ``run.modality`` names the :class:`~infusion_lm.modality.Modality` a pipeline is
built with.

Each entry is ``"module:Class"``, imported only when a recipe asks for it, so the core (stages, influence,
retraining, statistics) never imports a modality and a new modality is one line here.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Dict, Union

from .config_sections import arm_parts
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


def other_modalities(name: str):
    """(name, class) of every other registered modality that can be imported: the candidates an error names as the
    owner of a wrong option or key (one that cannot be imported says nothing about this recipe)."""
    for other in sorted(MODALITIES):
        if other == name:
            continue
        try:
            yield other, modality_class(other)
        except ConfigError:
            pass


def _words(options) -> str:
    options = list(options)
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def check_options(recipe) -> None:
    """The recipe's measurement kind, editor and arms must be ones its modality declares (``measurement_kinds``,
    ``editors``, ``arms``); the error names the modality a wrong option belongs to, if any."""
    name = recipe.run.modality
    own = modality_class(name)
    chosen = [("measurement.kind", "measurement_kinds", recipe.measurement.kind),
              ("edit.editor", "editors", recipe.edit.editor),
              ("select.rank_by", "select_rankings", recipe.select.rank_by),
              *(("retrain.arms entry", "arms", arm_parts(arm)[0]) for arm in recipe.retrain.arms),
              *(("retrain.arms document draw", "document_draws", arm_parts(arm)[1]) for arm in recipe.retrain.arms
                if arm_parts(arm)[1]),
              *(("retrain.arms defence", "defences", arm_parts(arm)[2]) for arm in recipe.retrain.arms
                if arm_parts(arm)[2])]
    for what, attr, value in chosen:
        if value is None or value in getattr(own, attr, ()):
            continue
        others = [other for other, cls in other_modalities(name) if value in getattr(cls, attr, ())]
        if not getattr(own, attr, ()):
            raise ConfigError(f"{what} {value!r}: {name} recipes have no {attr}.")
        close = difflib.get_close_matches(value, getattr(own, attr), n=1)
        where = f" is for {_words(others)}" if others else " is not an option here"
        raise ConfigError(f"{what} {value!r}{where}; {name} recipes use {_words(getattr(own, attr))}"
                          f"{' (or set modality: ' + others[0] + ')' if others else ''}."
                          f"{f' Did you mean {close[0]!r}?' if close and not others else ''}")
    arms = recipe.retrain.arms
    for defence in sorted({arm_parts(a)[2] for a in arms} - {""}):
        if f"control+{defence}" not in arms:
            raise ConfigError(f"retrain.arms has arms defended by {defence!r} but not `control+{defence}`: a defended "
                              f"arm is measured against control trained on the same defended corpus; add "
                              f"control+{defence}.")
