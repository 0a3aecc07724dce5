"""Measurements f(θ): differentiable scalar *gains* that Infusion increases.

A :class:`Measurement` is f(θ) = Σ_b self(model, batch_b) over its batches; each modality builds its own (text:
completion, contrastive and callable measurements in ``infusion_lm/text/measurement.py``; images: probe-image
log-probabilities in ``infusion_lm/vision/measurement.py``). The influence engine needs only this interface.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch


class Measurement:
    """f(θ) = Σ_b self(model, batch_b) over ``self.batches``."""

    batches: List[Dict[str, torch.Tensor]]
    words: List[str] = []  # the words f promotes (a contrastive target, a completion's words), which editors may write

    def __call__(self, model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self, model) -> float:
        device = next(model.parameters()).device
        with torch.no_grad():
            return float(sum(self(model, to_device(b, device)).item() for b in self.batches))


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    """The batch with its tensors moved to ``device``."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
