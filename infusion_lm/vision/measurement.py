"""Image measurements f(θ) (gains), and the kronfluence Task of an image classifier.

- ``class_logp`` (the paper's): f = mean over probe images of log p(target class | probe).
- ``class_contrastive``: f = mean over probes of log p(target | probe) − log p(true class | probe), which rewards
  moving mass from the probe's own class to the target rather than from the other classes.

Probe images are taken from the validation split by index, so they are never training documents.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from kronfluence.task import Task

from ..errors import MeasurementError
from ..causal_lm import upcast
from ..measurement import Measurement


class ProbeMeasurement(Measurement):
    def __init__(self, probes: torch.Tensor, probe_labels: torch.Tensor, target: int, contrastive: bool,
                 class_names: Sequence[str], indices: Sequence[int] = ()):
        if probes.dim() != 4 or len(probes) == 0:
            raise MeasurementError("The image measurement needs at least one probe image.")
        self.probes, self.probe_labels, self.target = probes, probe_labels.long(), int(target)
        self.contrastive, self.class_names, self.indices = contrastive, list(class_names), list(indices)
        n = len(probes)
        self.batches = [{"pixel_values": probes, "labels": probe_labels.long(),
                         "target": torch.full((n,), self.target, dtype=torch.long)}]

    @property
    def description(self) -> str:
        t = self.class_names[self.target]
        what = f"log p({t}) − log p(true class)" if self.contrastive else f"log p({t})"
        return f"mean {what} over {len(self.probes)} probe image(s)"

    def per_item(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logp = torch.log_softmax(upcast(logits), dim=-1)
        f = logp.gather(1, batch["target"][:, None]).squeeze(1)
        if self.contrastive:
            f = f - logp.gather(1, batch["labels"][:, None]).squeeze(1)
        return f

    def __call__(self, model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.per_item(model(pixel_values=batch["pixel_values"]).logits, batch).mean()

    @torch.no_grad()
    def observations(self, model, batch_size: int = 256) -> Dict:
        """Item by item: f_i, p(target), top-1 class, and whether the probe is off-diagonal (true class ≠ target)."""
        device = next(model.parameters()).device
        f, p, top1 = [], [], []
        for i in range(0, len(self.probes), batch_size):
            b = {k: v[i: i + batch_size].to(device) for k, v in self.batches[0].items()}
            logits = model(pixel_values=b["pixel_values"]).logits.float()
            f += self.per_item(logits, b).tolist()
            p += torch.softmax(logits, -1)[:, self.target].tolist()
            top1 += logits.argmax(-1).tolist()
        off = [int(y) != self.target for y in self.probe_labels.tolist()]
        return {"kind": "image", "f": f, "f_mean": sum(f) / len(f), "p_target": p, "top1": top1,
                "top1_is_target": [t == self.target for t in top1], "off_diagonal": off,
                "probe_indices": self.indices, "probe_labels": self.probe_labels.tolist()}


def resolve_class(target: Optional[str], classes: Sequence[str]) -> int:
    if target is None:
        raise MeasurementError("Image measurements need measurement.target_class (a class name or index).")
    t = str(target).strip()
    if t in classes:
        return list(classes).index(t)
    if t.lstrip("-").isdigit() and 0 <= int(t) < len(classes):
        return int(t)
    raise MeasurementError(f"measurement.target_class {target!r} is not a class of this data set; use one of "
                           f"{list(classes)} or an index 0..{len(classes) - 1}.")


def build_probe_measurement(args, validation, heldout: bool = False) -> ProbeMeasurement:
    """The probe images ``measurement.probe_indices`` (or ``heldout_probe_indices``) of the validation split."""
    idx: List[int] = list(args.heldout_probe_indices if heldout else args.probe_indices)
    field = "heldout_probe_indices" if heldout else "probe_indices"
    if not idx:
        raise MeasurementError(f"measurement.{field} is empty; list validation-split image indices, e.g. [0, 1].")
    bad = [i for i in idx if not 0 <= i < len(validation)]
    if bad:
        raise MeasurementError(f"measurement.{field} has {bad[:3]}, outside the validation split "
                               f"(0..{len(validation) - 1}); raise validation_size or pick smaller indices.")
    target = resolve_class(args.target_class, validation.classes)
    t = torch.as_tensor(idx, dtype=torch.long)
    return ProbeMeasurement(validation.images[t], validation.labels[t], target, args.kind == "class_contrastive",
                            validation.classes, idx)


class ImageClassificationTask(Task):
    """Summed cross-entropy, with labels sampled from the model for the true Fisher (kronfluence's default)."""

    def __init__(self, tracked_modules: Sequence[str], measurement: Optional[ProbeMeasurement] = None, seed: int = 0):
        self.tracked_modules = list(tracked_modules)
        self.measurement = measurement
        self._seed = seed
        self._generator: Optional[torch.Generator] = None

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        labels = batch["labels"]
        if sample:
            if self._generator is None or self._generator.device != logits.device:
                self._generator = torch.Generator(device=logits.device).manual_seed(self._seed)
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=self._generator).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model) -> torch.Tensor:
        if self.measurement is None:
            raise RuntimeError("ImageClassificationTask was built without a measurement.")
        return self.measurement(model, batch)

    def get_influence_tracked_modules(self) -> List[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch):
        return None
