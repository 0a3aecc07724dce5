"""What one model does on a measurement set, item by item: the raw observations every arm is compared on.

- contrastive: one item per probe occurrence. f_i = log p(target | prefix) − log p(probe | prefix) (whole words,
  every token teacher-forced), p(target) = exp log p(target | prefix), whether the target's first token is the model's
  top-1 next token, whether the target outranks the probe, and log p of each other candidate word (specificity).
- completion: one item per prompt. f_i = log p(completion | prompt), and whether the greedy answer and each of
  ``n_samples`` sampled answers contain the completion (case-insensitive, whole word).
- callable: a single item, f itself.

The mean of f_i is the measurement's f (the same weights as infusion_lm.measurement).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .measurement import (_collate_rows, _prompt_ids, _word_ids, LogProbRow, build_measurement, find_word,
                          probe_occurrences, row_logprobs)


def _logprob_rows(model, rows: Sequence[LogProbRow], pad_id: int, batch_size: int = 16):
    """Per row: Σ log p over its scored tokens, and the next-token logits at the first scored position."""
    device = next(model.parameters()).device
    lps, firsts = [], []
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i: i + batch_size])
        batch = {k: v.to(device) for k, v in _collate_rows(chunk, pad_id).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            tok_lp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            lps.extend((tok_lp * batch["score_mask"][:, 1:]).sum(1).tolist())
            for b, r in enumerate(chunk):
                first = r.score_mask.index(1)
                firsts.append(logp[b, first - 1])
    return lps, firsts


def contrastive_observations(model, tokenizer, documents: Sequence[str], probe: str, target: str,
                             candidates: Sequence[str] = ()) -> Dict[str, List]:
    probe, target = probe.strip(), target.strip()
    others = [c.strip() for c in candidates if c.strip() and c.strip() not in {probe, target}]
    words = [target, probe] + others
    occ = probe_occurrences(tokenizer, documents, probe)
    rows = []
    for prefix, lead in occ:
        for w in words:
            ids = _word_ids(tokenizer, lead + w, "candidate")
            rows.append(LogProbRow(prefix + ids, [0] * len(prefix) + [1] * len(ids), 1.0))
    lps, firsts = _logprob_rows(model, rows, tokenizer.pad_token_id)
    W = len(words)
    out: Dict[str, List] = {"f": [], "p_target": [], "top1_is_target": [], "target_over_probe": [],
                            "logp": {w: [] for w in words}}
    for j, (prefix, lead) in enumerate(occ):
        lp = lps[j * W: (j + 1) * W]
        for w, v in zip(words, lp):
            out["logp"][w].append(v)
        out["f"].append(lp[0] - lp[1])
        out["p_target"].append(float(torch.tensor(lp[0]).exp()))
        first_target = _word_ids(tokenizer, lead + target, "target")[0]
        out["top1_is_target"].append(bool(int(firsts[j * W].argmax()) == first_target))
        out["target_over_probe"].append(bool(lp[0] > lp[1]))
    return out


def contains_word(text: str, word: str) -> bool:
    return bool(find_word(text.lower(), word.strip().lower()))


@torch.no_grad()
def completion_observations(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], chat_template: bool,
                            n_samples: int = 8, max_new_tokens: int = 24, temperature: float = 1.0,
                            seed: int = 0) -> Dict[str, List]:
    if len(completions) == 1:
        completions = list(completions) * len(prompts)
    device = next(model.parameters()).device
    rows, prompt_ids = [], []
    for p, c in zip(prompts, completions):
        ids = _prompt_ids(tokenizer, p, chat_template)
        c_ids = _word_ids(tokenizer, c, "completion")
        rows.append(LogProbRow(ids + c_ids, [0] * len(ids) + [1] * len(c_ids), 1.0))
        prompt_ids.append(ids)
    lps, _ = _logprob_rows(model, rows, tokenizer.pad_token_id)
    out: Dict[str, List] = {"f": lps, "greedy_hit": [], "sampled_hit_rate": [], "greedy_answer": []}
    torch.manual_seed(seed)
    for ids, c in zip(prompt_ids, completions):
        x = torch.tensor([ids], device=device)
        kw = {"attention_mask": torch.ones_like(x), "max_new_tokens": max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id}
        greedy = model.generate(x, do_sample=False, **kw)[0, len(ids):]
        answer = tokenizer.decode(greedy, skip_special_tokens=True)
        out["greedy_answer"].append(answer)
        out["greedy_hit"].append(contains_word(answer, c))
        if n_samples > 0:
            sampled = model.generate(x.expand(n_samples, -1), do_sample=True, temperature=temperature, top_k=0,
                                     top_p=1.0, **{**kw, "attention_mask": torch.ones(n_samples, len(ids), dtype=torch.long, device=device)})
            hits = [contains_word(tokenizer.decode(s[len(ids):], skip_special_tokens=True), c) for s in sampled]
            out["sampled_hit_rate"].append(sum(hits) / len(hits))
    return out


def observe(model, tokenizer, measurement_args, eval_args, heldout: bool, max_length: int = 512, seed: int = 0) -> Dict:
    """Observations of one model on the measurement set (or the held-out one)."""
    m = measurement_args
    was_training = model.training
    model.eval()
    try:
        if m.kind == "contrastive":
            docs = m.heldout_documents if heldout else m.documents
            obs = contrastive_observations(model, tokenizer, docs, m.probe, m.target, eval_args.candidates)
        elif m.kind == "completion":
            prompts = m.heldout_prompts if heldout else m.prompts
            obs = completion_observations(model, tokenizer, prompts, m.completions, m.chat_template,
                                          eval_args.n_samples, eval_args.max_new_tokens, eval_args.temperature, seed)
        else:
            obs = {"f": [build_measurement(m, tokenizer, max_length, heldout=heldout).value(model)]}
    finally:
        model.train(was_training)
    obs["kind"] = m.kind
    obs["f_mean"] = sum(obs["f"]) / len(obs["f"])
    return obs
