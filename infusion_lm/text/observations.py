"""What one model does on a measurement set, item by item: the raw observations every arm is compared on.

- contrastive: one item per probe occurrence. f_i is the f of the measurement the set is observed for: on the
  measurement set, the one v and the predicted Δf were built from (against the model's own top m alternatives, or
  the contrast_words set, at each position); on held-out sets, and always as ``f_pairwise``, log p(target | prefix)
  − log p(probe | prefix) (whole words, every token teacher-forced). Also p(target) = exp log p(target | prefix),
  whether the target's first token is the model's top-1 next token, whether the target outranks the probe, and
  log p of each other candidate word (specificity).
- completion: one item per prompt. f_i = log p(completion | prompt), and whether the greedy answer and each of
  ``n_samples`` sampled answers contain the completion (case-insensitive, whole word).
- callable: a single item, f itself.

The mean of f_i is the measurement's f (the same weights as infusion_lm.measurement).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..errors import MeasurementError
from .measurement import (LogProbRow, build_measurement, collate_logprob_rows, find_word, probe_occurrences,
                          prompt_token_ids, word_token_ids)


def _logprob_rows(model, rows: Sequence[LogProbRow], pad_id: int, batch_size: int = 16):
    """Per row: Σ log p over its scored tokens, and the next-token logits at the first scored position."""
    device = next(model.parameters()).device
    lps, firsts = [], []
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i: i + batch_size])
        batch = {k: v.to(device) for k, v in collate_logprob_rows(chunk, pad_id).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            tok_lp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            lps.extend((tok_lp * batch["score_mask"][:, 1:]).sum(1).tolist())
            for b, r in enumerate(chunk):
                first = r.score_mask.index(1)
                firsts.append(logp[b, first - 1])
    return lps, firsts


def _prefix_logprobs(model, prefixes: Sequence[List[int]], pad_id: int, batch_size: int = 16) -> List[torch.Tensor]:
    """log p(next token | prefix) for each prefix, [V] each, right-padded batches.

    A prefix whose tokens begin a longer one (the earlier occurrences of the probe in one document) is read off the
    longer row at its own last position: under causal attention that is the same distribution, so each document runs
    once however often the probe occurs in it (what MeasurementCallback pays at every log)."""
    device = next(model.parameters()).device
    carriers: List[List[int]] = []
    where = {}  # prefix index -> (carrier, position of its last token)
    for i in sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i])):
        p = list(prefixes[i])
        c = next((c for c, q in enumerate(carriers) if q[: len(p)] == p), None)
        if c is None:
            c = len(carriers)
            carriers.append(p)
        where[i] = (c, len(p) - 1)
    wanted: Dict[int, set] = {}
    for c, pos in where.values():
        wanted.setdefault(c, set()).add(pos)
    rows: Dict[tuple, torch.Tensor] = {}
    for i in range(0, len(carriers), batch_size):
        chunk = carriers[i: i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, p in enumerate(chunk):
            ids[b, : len(p)] = torch.as_tensor(p)
            mask[b, : len(p)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for b in range(len(chunk)):
            for pos in wanted[i + b]:  # fp32 for the rows read, not the whole [B, T, V] batch
                rows[(i + b, pos)] = torch.log_softmax(logits[b, pos].float(), -1).cpu()
    return [rows[where[i]] for i in range(len(prefixes))]


def contrastive_observations(model, tokenizer, documents: Sequence[str], probe: str, target: str,
                             candidates: Sequence[str] = (), max_positions: Optional[int] = None,
                             max_prefix_tokens: Optional[int] = None, contrast_top: int = 0,
                             contrast_words: Sequence[str] = ()) -> Dict[str, List]:
    """Per probe occurrence: f, f_pairwise, p(target), top-1, target over probe, and log p of every candidate word.

    f is the pairwise f unless ``contrast_top`` (m > 0: log p(target) − log Σ p(t) over the probe's first token and
    the model's own m likeliest other next tokens, the target's first token excluded, chosen on this model as
    ``TopAlternativesMeasurement`` chooses them) or ``contrast_words`` (log p(target) − log Σ p(w) over the probe and
    those words) names the measurement's own f.

    Each prefix runs once: a single-token word's log p is read off the prefix's next-token distribution, and only
    multi-token words need their own teacher-forced rows. ``max_positions`` keeps the first occurrences;
    ``max_prefix_tokens`` keeps the last tokens of long prefixes (real documents)."""
    probe, target = probe.strip(), target.strip()
    others = [c.strip() for c in candidates if c.strip() and c.strip() not in {probe, target}]
    set_words = [w.strip() for w in contrast_words if w.strip() and w.strip() not in {probe, target}]
    words = [target, probe] + others
    scored = words + [w for w in set_words if w not in words]
    occ = probe_occurrences(tokenizer, documents, probe)
    if max_positions is not None:
        occ = occ[:max_positions]
    if max_prefix_tokens is not None:
        occ = [(prefix[-max_prefix_tokens:], lead) for prefix, lead in occ]
    next_logp = _prefix_logprobs(model, [prefix for prefix, _ in occ], tokenizer.pad_token_id)
    leads = {l for _, l in occ}
    word_ids = {(w, lead): word_token_ids(tokenizer, lead + w, "candidate") for w in scored for lead in leads}
    multi, where = [], {}
    for j, (prefix, lead) in enumerate(occ):
        for w in scored:
            ids = word_ids[(w, lead)]
            if len(ids) > 1:
                where[(j, w)] = len(multi)
                multi.append(LogProbRow(prefix + ids, [0] * len(prefix) + [1] * len(ids), 1.0))
    multi_lp = _logprob_rows(model, multi, tokenizer.pad_token_id)[0] if multi else []
    out: Dict[str, List] = {"f": [], "f_pairwise": [], "p_target": [], "top1_is_target": [], "target_over_probe": [],
                            "target_rank": [], "logp": {w: [] for w in words}}
    for j, (prefix, lead) in enumerate(occ):
        first = word_ids[(target, lead)][0]
        out["target_rank"].append(int((next_logp[j] > next_logp[j][first]).sum()))  # 0: the target's first token is top-1
        lp = [multi_lp[where[(j, w)]] if (j, w) in where else float(next_logp[j][word_ids[(w, lead)][0]])
              for w in scored]
        for w, v in zip(words, lp):
            out["logp"][w].append(v)
        out["f_pairwise"].append(lp[0] - lp[1])
        if contrast_top:
            out["f"].append(lp[0] - _top_alternatives_logsumexp(next_logp[j], first, word_ids[(probe, lead)][0],
                                                                  contrast_top))
        elif set_words:
            rest = [lp[1]] + [lp[scored.index(w)] for w in set_words]
            out["f"].append(lp[0] - float(torch.logsumexp(torch.tensor(rest), 0)))
        else:
            out["f"].append(lp[0] - lp[1])
        out["p_target"].append(float(torch.tensor(lp[0]).exp()))
        out["top1_is_target"].append(bool(int(next_logp[j].argmax()) == word_ids[(target, lead)][0]))
        out["target_over_probe"].append(bool(lp[0] > lp[1]))
    return out


def _top_alternatives_logsumexp(logp: torch.Tensor, target_first: int, probe_first: int, m: int) -> float:
    """log Σ p(t) over the probe's first token and the m likeliest other next tokens, the target's excluded: the set
    ``TopAlternativesMeasurement`` sums over (the same rule, one position)."""
    ranked = logp.clone()
    ranked[target_first] = -float("inf")
    top = ranked.topk(min(m + 1, ranked.numel() - 1)).indices
    keep = top if bool((top == probe_first).any()) else torch.cat([top[:-1], torch.tensor([probe_first])])
    return float(torch.logsumexp(logp[keep], 0))


def target_rates(obs: dict) -> Dict[str, float]:
    """The share of answers naming the target in one completion observation: ``greedy`` and, when answers were
    sampled, ``sampled``. Empty for other kinds."""
    rates = {}
    if obs.get("greedy_hit"):
        rates["greedy"] = sum(obs["greedy_hit"]) / len(obs["greedy_hit"])
    if obs.get("sampled_hit_rate"):
        rates["sampled"] = sum(obs["sampled_hit_rate"]) / len(obs["sampled_hit_rate"])
    return rates


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
        ids = prompt_token_ids(tokenizer, p, chat_template)
        c_ids = word_token_ids(tokenizer, c, "completion")
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


def observe(model, tokenizer, measurement_args, eval_args, which: str | bool = "measurement", max_length: int = 512,
            seed: int = 0, heldout_corpus_documents: Sequence[str] = ()) -> Dict:
    """Observations of one model on one evaluation set: ``measurement`` (the items v was built from), ``heldout``
    (templated items v never saw) or ``heldout_corpus`` (probe positions in real documents outside the training
    corpus). ``which`` may also be a bool, True meaning ``heldout``."""
    if isinstance(which, bool):
        which = "heldout" if which else "measurement"
    heldout = which != "measurement"
    m = measurement_args
    was_training = model.training
    model.eval()
    try:
        if which == "heldout_corpus":
            if m.kind != "contrastive":
                raise MeasurementError("measurement.heldout_corpus is for contrastive measurements.")
            obs = contrastive_observations(model, tokenizer, heldout_corpus_documents, m.probe, m.target,
                                           eval_args.candidates, max_positions=m.heldout_corpus_max_positions,
                                           max_prefix_tokens=max_length)
        elif m.kind == "contrastive":
            docs = m.heldout_documents if heldout else m.documents
            # the measurement set is observed with the f v was built from (so predicted and actual Δf are one f);
            # held-out sets keep the pairwise f, comparable whatever the measurement
            own = {} if heldout else {"contrast_top": m.top_alternatives, "contrast_words": m.contrast_words}
            obs = contrastive_observations(model, tokenizer, docs, m.probe, m.target, eval_args.candidates, **own)
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
