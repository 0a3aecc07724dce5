"""The stages of a run, in order. ``synthesize`` runs only for a synthetic corpus; each later stage needs the one
before it (retrain also needs the clean checkpoint)."""

from __future__ import annotations

STAGES = ["synthesize", "fit", "measure", "score", "select", "edit", "retrain", "evaluate"]


def reaches(upto: str, stage: str) -> bool:
    """Whether running up to ``upto`` includes ``stage``."""
    return STAGES.index(upto) >= STAGES.index(stage)
