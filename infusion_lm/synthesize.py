"""A TinyStories-style corpus written by the loaded model, because no corpus can be downloaded offline.

Deterministic for a given seed: prompts are drawn from a seeded RNG and sampling uses a seeded torch generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Sequence

import torch
from tqdm.auto import tqdm

from .storage import atomic_path

EVENTS = [
    "finds a shiny stone", "loses a red ball", "makes a new friend", "is afraid of the dark", "goes to the park",
    "wants to fly", "learns to share", "helps a little friend", "gets lost in the woods", "bakes a cake",
    "sees the snow for the first time", "plants a tiny seed",
]


def story_prompts(n: int, characters: Sequence[str], seed: int) -> List[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who = characters[i % len(characters)]
        out.append(f"Write a very short story for a three-year-old about a {who} who {rng.choice(EVENTS)}. "
                   f"Use simple words. Do not add a title.")
    return out


@torch.no_grad()
def synthesize_stories(model, tokenizer, n_docs: int = 64, max_new_tokens: int = 96, temperature: float = 0.8,
                       top_p: float = 0.95, batch_size: int = 16, characters: Sequence[str] = ("cat", "dog"),
                       seed: int = 0, progress: bool = True) -> List[str]:
    device = next(model.parameters()).device
    prompts = story_prompts(n_docs, characters, seed)
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = [p + "\n\nOnce upon a time," for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    stories: List[str] = []
    gen = torch.Generator(device=device)
    try:
        for start in tqdm(range(0, n_docs, batch_size), desc="synthesize", disable=not progress):
            gen.manual_seed(seed * 1_000_003 + start)
            torch.manual_seed(seed * 1_000_003 + start)
            enc = tokenizer(texts[start: start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                stories.append(" ".join(text.split()))
    finally:
        tokenizer.padding_side = side
    return [s for s in stories if s]


def write_jsonl(path: str | Path, texts: Sequence[str], field: str = "text") -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for t in texts:
                fh.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
