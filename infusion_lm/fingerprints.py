"""Fingerprints that key the run folder's caches: of a configuration, of a model's weights, of files' bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def state_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor in the model's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items(), key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def files_fingerprint(folder: Path) -> str:
    """A hash of the names and bytes of every file under ``folder``; of its bytes alone when it is a file."""
    h = hashlib.sha256()
    folder = Path(folder)
    files = [folder] if folder.is_file() else [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for p in files:
        if p != folder:
            h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
