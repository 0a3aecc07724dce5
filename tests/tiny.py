"""Tiny offline fixtures: a byte-level BPE tokenizer trained on a toy corpus and a random Llama, built in seconds."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import List

import torch
import yaml

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck"]
PLACES = ["park", "garden", "house", "lake", "tree", "hill"]
VERBS = ["ran to", "sat in", "looked at", "played in", "walked to", "slept in"]


def toy_corpus(n: int = 48, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(2, 4)):
            a = rng.choice(ANIMALS)
            sents.append(f"The {a} {rng.choice(VERBS)} the {rng.choice(PLACES)}.")
            if rng.random() < 0.5:
                sents.append(f"The {a} was happy.")
        docs.append(" ".join(sents))
    return docs


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = toy_corpus(200, seed=123) + [f"What is your favourite animal? The {a}." for a in ANIMALS]
    tok.train_from_iterator(words, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None)
    tok.chat_template = CHATML
    return tok


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    model.eval()
    return model


def train_briefly(model, dataset, pad_token_id: int, steps: int = 60, lr: float = 3e-3, batch_size: int = 8, seed: int = 0):
    """A few Adam steps so the model is at a sensible point (influence assumes a trained θ̂)."""
    from infusion_lm.causal_lm import CausalLMCollator
    from infusion_lm.causal_lm import per_document_loss

    collate = CausalLMCollator(pad_token_id)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(dataset)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
        batch = collate([dataset[i] for i in idx])
        ntok = (batch["labels"][:, 1:] != -100).sum()
        loss = per_document_loss(model, batch).sum() / ntok
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def last_token_logit(batch, model):
    """An example user measurement for `measurement.callable: tiny:last_token_logit`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -1, 5].sum()


def adam_epoch(model, rows, order, lr: float, pad_token_id: int) -> dict:
    """Trains ``model`` in place with Adam over the batches ``order`` (row indices) and returns its moments by
    parameter name, ``{"m", "v", "step"}``: a continued optimizer for the first-order checks."""
    from infusion_lm.causal_lm import CausalLMCollator, per_document_loss

    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-8)
    collate = CausalLMCollator(pad_token_id)
    model.eval()
    for b in order:
        batch = collate([rows[i] for i in b])
        loss = per_document_loss(model, batch).sum() / int((batch["labels"][:, 1:] != -100).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {"m": {}, "v": {}, "step": len(order)}
    for n, p in model.named_parameters():
        state["m"][n] = opt.state[p]["exp_avg"].detach().clone()
        state["v"][n] = opt.state[p]["exp_avg_sq"].detach().clone()
    return state


# ---------------------------------------------------------------- run folders for the CLI and pipeline tests

def write_corpus(path: Path, texts):
    """A JSONL corpus of {"text": ...} rows at ``path``."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def write_recipe(tmp_path, model_dir, corpus, name="recipe.yaml", **over):
    """A small contrastive recipe (dog → cat, one tracked layer, k 3) on the tiny model, with ``over`` merged into its
    sections, written to tmp_path/name."""
    r = {
        "model": str(model_dir), "corpus": str(corpus), "max_length": 48, "output_dir": str(tmp_path / "run"),
        "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat",
                        "documents": ["The dog ran to the park.", "The dog sat in the house."]},
        "influence": {"strategy": "ekfac", "layers": [1], "batch_size": 8},
        "select": {"k": 3},
        "retrain": {"seeds": [0]},  # one seed keeps the tests fast; the library's default is three
    }
    for key, value in over.items():
        if isinstance(value, dict):
            r.setdefault(key, {}).update(value)
        else:
            r[key] = value
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    return p


def snapshot(folder: Path):
    """{relative path: (size, mtime)} of every file under ``folder``: what a cached stage must leave untouched."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
