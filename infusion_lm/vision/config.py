"""The image modality's recipe sections: the keys an image recipe has beyond the core's (``infusion_lm/config.py``).

An image recipe's top-level keys, ``measurement``, ``edit`` and ``retrain`` sections are read into these classes
(``ImageModality.sections``); its ``evaluate`` section is the core's. Image recipes have no ``synthesize`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import (BaseEditArguments, BaseMeasurementArguments, BaseRetrainArguments, BaseRunArguments,
                      NOT_CLEAN_RUN, described)
from ..errors import ConfigError


@dataclass
class ImageRunArguments(BaseRunArguments):
    """An image recipe's top-level keys: the core's, and the validation split probes come from."""

    validation_size: Optional[int] = field(default=None, metadata=described(
        "Images split off the training set (seeded) to draw probes from; unset: 10% (the paper: 5k of 50k)."))

    def __post_init__(self):
        super().__post_init__()
        if self.validation_size is not None and self.validation_size < 1:
            raise ConfigError(f"validation_size must be >= 1 (got {self.validation_size}).")


@dataclass
class ImageMeasurementArguments(BaseMeasurementArguments):
    """A classifier's behaviour: the log-probability of a target class on a few probe images."""

    probe_indices: List[int] = field(default_factory=list, metadata=described(
        "Validation-split indices of the probe images."))
    heldout_probe_indices: List[int] = field(default_factory=list, metadata=described(
        "Other validation images to evaluate on (optional; e.g. more images of the probes' class).",
        evaluation_only=True))
    target_class: Optional[str] = field(default=None, metadata=described("The class to promote (name or index)."))

    def __post_init__(self):
        if self.kind is None:
            return  # no measurement yet: stages that need one say so
        if not self.probe_indices or self.target_class is None:
            raise ConfigError(f"measurement.kind={self.kind} needs measurement.probe_indices and .target_class.")
        overlap = sorted(set(self.probe_indices) & set(self.heldout_probe_indices))
        if overlap:
            raise ConfigError(f"measurement.heldout_probe_indices repeats probe_indices {overlap[:3]}; held-out "
                              f"images must be new.")


@dataclass
class ImageEditArguments(BaseEditArguments):
    """Pixel edits (section `edit`): an L∞ budget and how the pixel gradient is computed."""

    editor: Optional[str] = field(default="sign_pgd", metadata=described("sign_pgd (default) | noise."))
    linf: float = field(default=8 / 255, metadata=described(
        "L∞ budget of the pixel change, in [0, 1] pixel units (8/255 ≈ 0.031)."))
    pixel_clamp: bool = field(default=True, metadata=described(
        "Clamp edited pixels to [0, 1], as a real image must be. false reproduces the paper's code, which did not "
        "(its budget, 1, never bound either)."))
    pixel_step: Optional[float] = field(default=None, metadata=described(
        "sign_pgd: step size per iteration. Unset: 2.5 · linf / steps (Madry et al.)."))
    pixel_gradient: str = field(default="exact", metadata=described(
        "How J and ∇x J are computed: `exact` (JVP along v, double backprop for ∇x) or `finite_difference` "
        "(±εv; fragile on ReLU networks, see infusion_lm/vision/editors.py)."))

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.linf <= 1:
            raise ConfigError(f"edit.linf must be in (0, 1] (got {self.linf}); pixels live in [0, 1], e.g. 0.0314.")
        if self.pixel_gradient not in {"exact", "finite_difference"}:
            raise ConfigError(f"edit.pixel_gradient {self.pixel_gradient!r} is not one of exact, finite_difference.")
        if self.pixel_step is not None and self.pixel_step <= 0:
            raise ConfigError(f"edit.pixel_step must be > 0 (got {self.pixel_step}); unset it for 2.5·linf/steps.")


@dataclass
class ImageRetrainArguments(BaseRetrainArguments):
    """Retraining an image classifier (section `retrain`): the core's keys, and another architecture to retrain."""

    model: Optional[str] = field(default=None, metadata=described(
        "Retrain the arms with this architecture instead of run.model (cross-architecture transfer: the infused "
        "data was built with run.model). It gets its own clean checkpoint.", arms_model=True, **NOT_CLEAN_RUN))
