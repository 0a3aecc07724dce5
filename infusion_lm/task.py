"""The kronfluence Task for causal LMs: summed token loss with the training mask, and the measurement."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from kronfluence.task import Task

from .causal_lm import per_document_loss_from_logits, sampled_labels
from .measurement import Measurement


class CausalLMTask(Task):
    def __init__(self, tracked_modules: List[str], measurement: Optional[Measurement] = None, seed: int = 0):
        self.tracked_modules = list(tracked_modules)
        self.measurement = measurement
        self._generator: Optional[torch.Generator] = None
        self._seed = seed

    def _gen(self, device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def compute_train_loss(self, batch: Dict[str, torch.Tensor], model, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if sample:
            labels = sampled_labels(logits, labels, self._gen(logits.device))
        return per_document_loss_from_logits(logits, labels).sum()

    def compute_measurement(self, batch: Dict[str, torch.Tensor], model) -> torch.Tensor:
        if self.measurement is None:
            raise RuntimeError("CausalLMTask was built without a measurement.")
        return self.measurement(model, batch)

    def get_influence_tracked_modules(self) -> List[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["attention_mask"]
