"""Recipe configuration: dataclasses filled straight from YAML plus overrides.

A recipe is a YAML mapping. Top-level scalar keys (``model``, ``corpus``, ...) fill the ``run`` section; the sections
``measurement``, ``influence``, ``select``, ``edit``, ``retrain`` and ``evaluate`` (and, for text, ``synthesize``) fill
their own dataclasses. Overrides on the command line use dotted keys, ``section.key=value`` (or ``key=value`` for
top-level keys), with the value read as YAML, so ``select.k=4``, ``influence.layers=[0,3]`` and
``measurement.probe=dog`` all work.

**Each modality has its own sections.** This module holds what every modality shares: the influence and selection
sections whole, and the base of each other section (``BaseRunArguments``, ``BaseMeasurementArguments``, ...). A
modality's ``sections`` maps a section name to its own subclass, which adds that modality's keys
(``infusion_lm/text/config.py``, ``infusion_lm/vision/config.py``); the recipe's ``modality`` key picks which classes
its sections are read into, so a text recipe has no image keys and the reverse. A key that belongs to another
modality gets an error that says so.

Each section's mapping is converted field by field to the types the dataclass declares (with a one-line error for a
value that does not fit), and each dataclass then validates itself in ``__post_init__``: every bound is checked there,
once. Field metadata tells the stage table (``infusion_lm/stages.py``) what a setting affects beyond its section's
stage: ``clean_run=False`` (a retrain setting that does not change the clean run θ̂), ``evaluation_only=True`` (a
measurement setting that only picks evaluation sets, not v), ``observed=True`` (an evaluate setting that changes what
retraining observes), ``arms_model=True`` (a retrain setting that picks the arms' own model).
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

# the section classes live in config_sections.py; they stay importable from here
from .config_sections import (FIELD_FLAGS, NOT_CLEAN_RUN, BaseEditArguments, BaseEvaluateArguments,  # noqa: F401
                              BaseMeasurementArguments, BaseRetrainArguments, BaseRunArguments, InfluenceArguments,
                              SelectArguments, described)
from .errors import ConfigError

CORE_SECTIONS: Dict[str, type] = {
    "run": BaseRunArguments,
    "measurement": BaseMeasurementArguments,
    "influence": InfluenceArguments,
    "select": SelectArguments,
    "edit": BaseEditArguments,
    "retrain": BaseRetrainArguments,
    "evaluate": BaseEvaluateArguments,
}
# Every section a recipe can have, in the order a recipe's dict lists them; `synthesize` is text's own.
SECTION_ORDER = ("measurement", "influence", "select", "synthesize", "edit", "retrain", "evaluate")


def recipe_sections(modality: str) -> Dict[str, type]:
    """The class each section of a ``modality`` recipe is read into: the core's, or the modality's own subclass
    (``Modality.sections``), plus any section only that modality has."""
    from .modalities import modality_class

    own = dict(getattr(modality_class(modality), "sections", {}))
    for name, cls in own.items():
        if name in CORE_SECTIONS and not issubclass(cls, CORE_SECTIONS[name]):
            raise TypeError(f"modality {modality!r}: its `{name}` section ({cls.__name__}) must subclass "
                            f"{CORE_SECTIONS[name].__name__}.")
    return {**CORE_SECTIONS, **own}


def _other_modalities(modality: str) -> Dict[str, Dict[str, type]]:
    """The sections of every other registered modality that can be imported (for errors that name the owner)."""
    from .modalities import other_modalities

    out = {}
    for name, _ in other_modalities(modality):
        try:
            out[name] = recipe_sections(name)
        except TypeError:  # a modality whose sections are malformed says nothing about this recipe
            pass
    return out


@dataclass
class Recipe:
    """A validated recipe: one dataclass per section, of the classes its modality reads them into."""

    run: BaseRunArguments
    measurement: BaseMeasurementArguments
    influence: InfluenceArguments
    select: SelectArguments
    edit: BaseEditArguments
    retrain: BaseRetrainArguments
    evaluate: BaseEvaluateArguments
    synthesize: Optional[Any] = None  # text only: how the synthetic corpus is written

    def __post_init__(self):
        """Checks that need more than one section: the measurement kind, the editor and the arms must be ones the
        modality declares, then the modality's own ``check_recipe`` runs."""
        from .modalities import check_options, modality_class

        check_options(self)
        r, i = self.retrain, self.influence
        if r.lora and r.influence_at == "model" and "optimizer" in (i.prediction, i.preconditioner):
            # The optimizer's response models AdamW on θ̂'s own weights; these arms train fresh adapters with B = 0
            # on top of them, a different update. Refused rather than predicted wrongly.
            key = "influence.preconditioner" if i.preconditioner == "optimizer" else "influence.prediction"
            raise ConfigError(f"{key}: optimizer predicts full-weight AdamW on the model, but retrain.lora trains "
                              "fresh adapters; set retrain.influence_at: checkpoint (influence over the adapters "
                              "the arms train, needs retrain.epochs >= 2) or influence.prediction: same_v.")
        modality_class(self.run.modality).check_recipe(self)

    def sections(self) -> Dict[str, Any]:
        """The recipe's sections by name ("run" for the top-level keys), those its modality has only."""
        out = {"run": self.run}
        out.update({name: getattr(self, name) for name in SECTION_ORDER if getattr(self, name) is not None})
        return out

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(asdict(self.run))
        for name, section in self.sections().items():
            if name != "run":
                out[name] = asdict(section)
        return out


_TRUE, _FALSE = {"true", "yes", "y", "t", "on", "1"}, {"false", "no", "n", "f", "off", "0"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """A YAML value as the field's type (``hint``): numbers written as strings (YAML reads ``1e-3`` as one) become
    numbers, a scalar given for a list becomes a one-item list; anything else that does not fit is a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if value is None:
        raise ConfigError(f"`{key}` cannot be null; give it a value or remove the key for its default.")
    if origin in (list, List):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(items)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
    elif hint in (int, float):  # an int field takes no fractional number; neither takes a bool
        if not isinstance(value, bool) and (isinstance(value, int) or (hint is float and isinstance(value, float))):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    else:
        return value
    raise ConfigError(f"`{key}` must be {_TYPE_WORDS[hint]}, not {value!r}.")


def _parse_section(section: str, cls: type, values: Dict[str, Any], modality: str):
    """One recipe section, straight from its YAML mapping into its dataclass (which then validates itself)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    kwargs: Dict[str, Any] = {}
    where = "" if section == "run" else f"{section}."
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown_key(section, key, names, modality))
        if isinstance(value, dict):
            raise ConfigError(f"Recipe key `{where}{key}` must not be a mapping.")
        if isinstance(value, (list, tuple)) and not value:
            continue  # an empty list keeps the field's default
        kwargs[key] = _coerce(value, hints[key], where + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"In recipe section `{'top level' if section == 'run' else section}`: {err}") from None


def _unknown_key(section: str, key: str, names: set, modality: str) -> str:
    """The error for a key its section does not have: whose key it is, if another modality's, or the closest one."""
    where = "" if section == "run" else f"{section}."
    owners = [name for name, secs in _other_modalities(modality).items()
              if section in secs and key in {f.name for f in fields(secs[section])}]
    if owners:
        return (f"`{where}{key}` is a setting of {' and '.join(owners)} recipes; this recipe has modality: {modality}. "
                f"Remove the key, or set modality: {owners[0]}.")
    suggestions = sorted(names | (set(SECTION_ORDER) if section == "run" else set()))
    close = difflib.get_close_matches(key, suggestions, n=1)
    hint = f" Did you mean `{where}{close[0]}`?" if close else f" Valid keys: {', '.join(sorted(names))}."
    return f"Unknown recipe key `{where}{key}`.{hint}"


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies `section.key=value` overrides (value read as YAML) to a raw recipe mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. select.k=4).")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTION_ORDER:
                close = difflib.get_close_matches(section, SECTION_ORDER, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise ConfigError(f"Unknown recipe section `{section}` in override {item!r}.{hint}")
            out.setdefault(section, {})
            out[section][sub] = parsed
        else:
            out[key] = parsed
    return out


def load_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), raw: Dict[str, Any] | None = None) -> Recipe:
    """Reads a YAML recipe (or a mapping), applies overrides and returns validated dataclasses, each section read into
    the class its modality (the top-level ``modality`` key, text by default) declares."""
    if raw is None:
        if path is None:
            raw = {}
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"Recipe {p} does not exist; pass the path of a YAML recipe (see recipes/).")
            try:
                raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"Recipe {p} is not valid YAML{where}: {getattr(err, 'problem', err)}. "
                                  f"Fix the syntax there.") from None
            except UnicodeDecodeError:
                raise ConfigError(f"Recipe {p} is not UTF-8 text; save it as UTF-8.") from None
    if not isinstance(raw, dict):
        raise ConfigError("A recipe must be a YAML mapping of keys to values (e.g. `model: ...`).")
    raw = apply_overrides(raw, overrides)
    modality = raw.get("modality", BaseRunArguments.modality)
    if not isinstance(modality, str):
        raise ConfigError(f"`modality` must be a string such as text or image, not {modality!r}.")
    classes = recipe_sections(modality)
    for name in SECTION_ORDER:
        if name not in classes and raw.get(name):
            owners = [m for m, secs in _other_modalities(modality).items() if name in secs]
            owner = f" is for {' and '.join(owners)} recipes" if owners else " is not one this modality has"
            raise ConfigError(f"Recipe section `{name}`{owner}; this recipe has modality: {modality}. Remove the "
                              f"section{', or set modality: ' + owners[0] if owners else ''}.")
    top = {k: v for k, v in raw.items() if k not in SECTION_ORDER}
    parsed = {"run": _parse_section("run", classes["run"], top, modality)}
    for section in SECTION_ORDER:
        if section not in classes:
            continue
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"Recipe section `{section}` must be a mapping of keys to values.")
        parsed[section] = _parse_section(section, classes[section], values, modality)
    return Recipe(**parsed)
