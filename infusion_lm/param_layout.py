"""A tracked module's parameters as one matrix in kronfluence's layout (out × in, the bias as the last column), and
back; the influence engine, the J evaluators and the editors all read v in this layout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32, fp64 kept."""
    return torch.promote_types(dtype, torch.float32)


def module_params(model: nn.Module, name: str) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    mod = model.get_submodule(name)
    return mod.weight, getattr(mod, "bias", None)


def to_layout(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    mat = weight.reshape(weight.shape[0], -1)
    return torch.cat([mat, bias.reshape(-1, 1)], dim=1) if bias is not None else mat


def from_layout(mat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    w_cols = weight[0].numel()
    dw = mat[:, :w_cols].reshape(weight.shape)
    db = mat[:, w_cols] if bias is not None else None
    return dw, db
