"""Typed results of :func:`~infusion_lm.compare`: every arm against control, set by set.

``compare(observed)["infused"]["heldout"]`` is a :class:`SetComparison`; its ``delta_f`` is a :class:`Delta` (the
mean difference, its interval, each seed's mean). The pipeline's ``results.json`` holds the same figures as plain
JSON; :meth:`SetComparison.to_dict` gives that form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Delta:
    """arm − control, paired by seed and item.

    Attributes:
        mean: the mean difference over seeds and items.
        ci: the interval (``ci_method``, at the confidence asked for), or None where there is one seed and one item.
        per_seed: each retraining seed's mean difference.
        n_seeds, n_items: the seeds and the items (probe positions or prompts) it averages.
        ci_method: how ``ci`` was computed (``infusion_lm.stats.seed_item_interval``).
        per_seed_item: every difference, [seeds][items], so any other summary can be recomputed.
        p_greater: the one-sided p-value of "the mean is above 0" from the same t as ``ci``.
    """

    mean: float
    ci: Optional[Tuple[float, float]]
    per_seed: List[float]
    n_seeds: int
    n_items: int
    ci_method: str = ""
    per_seed_item: List[List[float]] = field(default_factory=list, repr=False)
    p_greater: Optional[float] = None

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely above or below 0. With one seed it covers the items only: see
        ``seed_noise_measured``."""
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    @property
    def seed_noise_measured(self) -> bool:
        """Two or more retraining seeds: only then does the interval say anything about another retraining."""
        return self.n_seeds >= 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Delta":
        return cls(mean=d["mean"], ci=tuple(d["ci"]) if d.get("ci") is not None else None,
                   per_seed=list(d.get("per_seed", [])), n_seeds=d.get("n_seeds", 1), n_items=d.get("n_items", 0),
                   ci_method=d.get("ci_method", ""), per_seed_item=list(d.get("per_seed_item", [])),
                   p_greater=d.get("p_greater"))

    def __str__(self) -> str:
        ci = f" [{self.ci[0]:+.3f}, {self.ci[1]:+.3f}]" if self.ci is not None else ""
        caveat = " (one seed: seed noise not measured)" if not self.seed_noise_measured else ""
        return f"{self.mean:+.3f}{ci}{caveat}"


@dataclass(frozen=True)
class SetComparison:
    """One arm against control on one evaluation set.

    Attributes:
        delta_f: Δf, the measurement's change.
        f_arm, f_control: the mean f of each (over seeds and items).
        n_seeds: retraining seeds.
        delta_p_target: the target's probability (contrastive measurements).
        target_specific_gain: the target's Δ log p minus the mean Δ log p of the other candidate words (contrastive
            measurements with candidates): what a rise of the whole word class does not give.
        delta_logp_target, delta_logp_others: the two parts of that gain.
        top1_flips_to_target: the share of positions whose top-1 next token became the target.
        sampled_rate_delta: the change in the share of sampled answers naming the target (completion measurements).
        details: every field of the comparison as plain JSON (what ``results.json`` holds).
    """

    delta_f: Delta
    f_arm: float
    f_control: float
    n_seeds: int
    delta_p_target: Optional[Delta] = None
    target_specific_gain: Optional[Delta] = None
    delta_logp_target: Optional[float] = None
    delta_logp_others: Optional[float] = None
    top1_flips_to_target: Optional[float] = None
    sampled_rate_delta: Optional[Delta] = None
    details: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SetComparison":
        spec = d.get("specificity") or {}
        sampled = (d.get("sampled_rate") or {}).get("delta")
        return cls(delta_f=Delta.from_dict(d["delta_f"]), f_arm=d["f_arm"], f_control=d["f_control"],
                   n_seeds=d["n_seeds"],
                   delta_p_target=Delta.from_dict(d["delta_p_target"]) if "delta_p_target" in d else None,
                   target_specific_gain=(Delta.from_dict(spec["target_specific_gain"]) if spec else None),
                   delta_logp_target=spec.get("delta_logp_target"), delta_logp_others=spec.get("delta_logp_others"),
                   top1_flips_to_target=d.get("top1_flips_to_target"),
                   sampled_rate_delta=Delta.from_dict(sampled) if sampled else None, details=dict(d))

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.details)
