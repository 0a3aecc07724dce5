"""What the influence engine computes on a causal LM: token rows collated with the training mask, and each
document's training loss (the sum of its token cross-entropies, labels −100 left out).

Every consumer (factor fitting, scoring, the editors, the Trainer) collates rows with :class:`CausalLMCollator` and
scores them with :func:`per_document_loss`, so the loss that influence is computed for is exactly the loss that
training minimises. Documents become rows in the text modality (``infusion_lm/text/corpus.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` and ``labels``; padding is masked in attention and ignored in the loss."""

    pad_token_id: int

    def __call__(self, rows: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def forward_logits(model, batch: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def per_document_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy per row, [B]. Computed in fp32 whatever the model dtype."""
    shift_logits = upcast(logits[:, :-1])
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return nll.sum(dim=1)


def per_document_loss(model, batch: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return per_document_loss_from_logits(forward_logits(model, batch, **kwargs), batch["labels"])


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution at the trained positions (true Fisher)."""
    with torch.no_grad():
        probs = torch.softmax(upcast(logits[:, :-1]), dim=-1)
        draws = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:2])
        out = labels.clone()
        trained = labels[:, 1:] != IGNORE_INDEX
        out[:, 1:] = torch.where(trained, draws, labels[:, 1:])
    return out


@torch.no_grad()
def perplexities(model, rows, pad_token_id: int, batch_size: int = 8) -> list:
    """exp(mean next-token NLL over each row's trained tokens) under ``model``; rows carry input_ids and labels."""
    collate = CausalLMCollator(pad_token_id)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(rows[i: i + batch_size])).items()}
        nll = per_document_loss(model, batch).double()
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).clamp(min=1)
        out.extend(torch.exp(nll / n).tolist())
    return out
