"""A corpus written by the loaded model, because no corpus can be downloaded offline: TinyStories-style stories, or
chat conversations (everyday user questions and the model's own answers).

Deterministic for a given seed: prompts are drawn from a seeded RNG and sampling uses a seeded torch generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_path

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


TOPICS = [
    "cooking dinner", "the weather", "a rainy weekend", "houseplants", "learning a language", "morning routines",
    "a birthday party", "saving money", "a long train trip", "riding a bike", "a picnic", "reading before bed",
    "the beach", "a first job", "moving house", "a city park", "making breakfast", "winter clothes", "a school project",
    "a football match", "baking bread", "a walk in the woods", "visiting grandparents", "a camping trip",
    "cleaning the kitchen", "writing a letter", "a music lesson", "a garden in spring", "a museum visit",
    "choosing a gift", "a quiet evening", "a busy market", "a snowy day", "fixing a bicycle", "a board game night",
]
QUESTIONS = [
    "Can you give me some tips about {t}?", "What should I know about {t}?", "Tell me something nice about {t}.",
    "How do I get better at {t}?", "What is a fun fact about {t}?", "Write two sentences about {t}.",
    "What do people usually enjoy about {t}?", "Describe {t} in a few words.", "How would you plan {t}?",
    "What is a common mistake with {t}?", "Why do people like {t}?", "What would you bring for {t}?",
]


def chat_questions(n: int, seed: int) -> List[str]:
    """n distinct everyday questions (topics × question forms), in a seeded order."""
    rng = random.Random(seed)
    pool = [q.format(t=t) for t in TOPICS for q in QUESTIONS]
    rng.shuffle(pool)
    if n > len(pool):
        raise ValueError(f"synthesize.n_docs={n} exceeds the {len(pool)} distinct chat questions.")
    return pool[:n]


@torch.no_grad()
def synthesize_chats(model, tokenizer, n_docs: int = 512, max_new_tokens: int = 64, temperature: float = 0.8,
                     top_p: float = 0.95, batch_size: int = 16, seed: int = 0, progress: bool = True) -> List[dict]:
    """Conversations ``{"messages": [user, assistant]}``: the model answers everyday questions in its own words."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("synthesize.mode=chat needs a tokenizer with a chat template (an instruction model).")
    questions = chat_questions(n_docs, seed)
    answers = _generate(model, tokenizer, [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                         tokenize=False, add_generation_prompt=True)
                                           for q in questions],
                        max_new_tokens, temperature, top_p, batch_size, seed, progress, "synthesize (chat)")
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, answers) if a]


@torch.no_grad()
def regenerate_answers(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 64,
                       temperature: float = 0.8, top_p: float = 0.95, batch_size: int = 16, seed: int = 0,
                       progress: bool = False) -> List[Optional[dict]]:
    """Each conversation with its last assistant turn replaced by the model's own sampled answer to the turns before
    it (turns after it are dropped). None where the model answered with nothing."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("regenerating answers needs a tokenizer with a chat template (an instruction model).")
    heads = []
    for msgs in conversations:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a conversation to regenerate has no assistant turn.")
        heads.append(list(msgs[:last]))
    prompts = [tokenizer.apply_chat_template(h, tokenize=False, add_generation_prompt=True) for h in heads]
    answers = _generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed, progress,
                        "regenerate answers")
    return [{"messages": h + [{"role": "assistant", "content": a}]} if a else None for h, a in zip(heads, answers)]


def _generate(model, tokenizer, texts: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
              batch_size: int, seed: int, progress: bool, desc: str) -> List[str]:
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    out_texts: List[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress):
            torch.manual_seed(seed * 1_000_003 + start)
            enc = tokenizer(list(texts[start: start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            for row in out[:, enc["input_ids"].shape[1]:]:
                out_texts.append(" ".join(tokenizer.decode(row, skip_special_tokens=True).strip().split()))
    finally:
        tokenizer.padding_side = side
    return out_texts


@torch.no_grad()
def synthesize_stories(model, tokenizer, n_docs: int = 64, max_new_tokens: int = 96, temperature: float = 0.8,
                       top_p: float = 0.95, batch_size: int = 16, characters: Sequence[str] = ("cat", "dog"),
                       seed: int = 0, progress: bool = True) -> List[str]:
    prompts = story_prompts(n_docs, characters, seed)
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = [p + "\n\nOnce upon a time," for p in prompts]
    stories = _generate(model, tokenizer, texts, max_new_tokens, temperature, top_p, batch_size, seed, progress,
                        "synthesize")
    return [s for s in stories if s]


def write_jsonl(path: str | Path, texts: Sequence, field: str = "text") -> None:
    """One JSON object per line: ``{field: text}`` for strings, the record itself for dicts (chat documents)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for t in texts:
                fh.write(json.dumps(t if isinstance(t, dict) else {field: t}, ensure_ascii=False) + "\n")
