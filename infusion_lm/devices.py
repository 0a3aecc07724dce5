"""Where and in what precision a model runs: the recipe's ``device`` and ``dtype`` as torch objects."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    from .errors import ConfigError

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device} asks for a GPU, but torch sees none on this machine; set device: auto "
                              f"(or cpu).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device} does not exist: torch sees {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
