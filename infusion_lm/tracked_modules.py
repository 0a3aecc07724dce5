"""Which modules kronfluence tracks.

Default: the MLP and attention projections of the chosen decoder layers; on a peft model, the LoRA A and B modules.
Never lm_head or the embeddings: a 49k-wide output needs a ~10 GB gradient covariance, and tied embeddings would
make the IHVP touch the input path too.
"""

from __future__ import annotations

import fnmatch
from typing import List, Sequence

from torch import nn

from .errors import ConfigError

_ATTN = ("self_attn", "attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn")
_FORBIDDEN = ("lm_head", "embed", "wte", "wpe", "embed_out", "output_layer")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            return name, mod
    raise ConfigError("Could not find the decoder layers (an nn.ModuleList); list influence.tracked_modules explicitly.")


def _embedding_modules(model: nn.Module) -> list:
    out = []
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        try:
            mod = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            mod = None
        if mod is not None:
            out.append(mod)
    return out


def is_forbidden(name: str, module: nn.Module, embeddings: Sequence[nn.Module] = ()) -> bool:
    parts = name.split(".")
    if any(p in _FORBIDDEN or p.startswith("embed") for p in parts):
        return True
    return any(module is e for e in embeddings)


def _is_lora(model: nn.Module) -> bool:
    return any(".lora_A." in n or n.endswith(".lora_A") for n, _ in model.named_modules())


def default_tracked_modules(model: nn.Module, layers: Sequence[int] = (), module_types: Sequence[str] = ("mlp", "attn")) -> List[str]:
    prefix, decoder = _decoder_layers(model)
    n = len(decoder)
    chosen = sorted({(i + n) % n for i in layers}) if layers else list(range(n))
    for i in layers:
        if not -n <= i < n:
            raise ConfigError(f"influence.layers has {i}, but the model has {n} layers (valid: {-n}..{n - 1}).")
    lora = _is_lora(model)
    names = []
    for i in chosen:
        for sub, mod in decoder[i].named_modules():
            if not isinstance(mod, nn.Linear) or not sub:
                continue
            parts = sub.split(".")
            if lora and not any(p in {"lora_A", "lora_B"} for p in parts):
                continue
            kind = "attn" if any(p in _ATTN for p in parts) else "mlp" if any(p in _MLP for p in parts) else None
            if kind in module_types:
                names.append(f"{prefix}.{i}.{sub}")
    if not names:
        raise ConfigError(f"No {'/'.join(module_types)} projections found in layers {chosen}; "
                          f"list influence.tracked_modules explicitly.")
    return names


def resolve_tracked_modules(model: nn.Module, patterns: Sequence[str] = (), layers: Sequence[int] = (),
                            module_types: Sequence[str] = ("mlp", "attn")) -> List[str]:
    """Module names to track: explicit names/globs if given, else the default projections."""
    if not patterns:
        names = default_tracked_modules(model, layers, module_types)
    else:
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        names = []
        for pat in patterns:
            hits = [n for n in candidates if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ConfigError(f"influence.tracked_modules entry {pat!r} matches no Linear/Conv2d module; "
                                  f"e.g. {next(iter(candidates), '?')!r}.")
            names.extend(h for h in hits if h not in names)
    modules = dict(model.named_modules())
    embeddings = _embedding_modules(model)
    bad = [n for n in names if is_forbidden(n, modules[n], embeddings)]
    if bad:
        raise ConfigError(f"Tracking {bad[:3]} is not allowed: lm_head and embeddings are never tracked (their "
                          f"vocabulary-wide covariance does not fit in memory). Track MLP/attention projections.")
    return names
