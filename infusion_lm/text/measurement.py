"""Measurements f(θ): differentiable scalar *gains* that Infusion increases.

Every built-in measurement reduces to weighted sums of completion log-probabilities: rows of token ids, a mask of
the tokens whose log-probability counts, and a weight per row. f = Σ_rows w_row Σ_{t in mask} log p(x_t | x_<t).

- completion: rows are prompt+completion, weight 1/m, so f is the mean log p(completion | prompt).
- contrastive (the paper's eq. 9): for every occurrence of the probe word in the measurement documents, one row
  continues the prefix with the target word (+1/N) and one with the probe word (−1/N). So f is the mean over
  occurrences of log p(target | prefix) − log p(probe | prefix).

  Multi-token words: each word's log-probability is the sum over all of its tokens, teacher-forced after the
  prefix, which is exact for any tokenisation. Words are matched as whole words, case-sensitively. A word preceded by
  a space is scored in its spaced form (" cat"), which is how it occurs inside text. A word that tokenises to nothing,
  to the unknown token, or to the same ids as the other word is an error.
- callable: any user function ``fn(batch, model) -> scalar``, summed over its batches.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch

from ..errors import MeasurementError
from ..measurement import Measurement

logger = logging.getLogger(__name__)


@dataclass
class LogProbRow:
    input_ids: List[int]
    score_mask: List[int]  # 1 where token t's log p(x_t | x_<t) counts
    weight: float


def collate_logprob_rows(rows: Sequence[LogProbRow], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, the completion mask and the row weights of a measurement batch."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    score = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.as_tensor(r.input_ids)
        mask[i, :n] = 1
        score[i, :n] = torch.as_tensor(r.score_mask, dtype=torch.float32)
    weights = torch.tensor([r.weight for r in rows], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "score_mask": score, "weights": weights}


def row_logprobs(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_{t in score_mask} log p(x_t | x_<t) per row, [B]."""
    from ..causal_lm import upcast

    logits = upcast(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1])
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["score_mask"][:, 1:].to(logp.dtype)).sum(dim=1)


class LogProbMeasurement(Measurement):
    """Weighted sum of completion log-probabilities (see module docstring)."""

    def __init__(self, rows: Sequence[LogProbRow], pad_token_id: int, batch_size: int = 16, description: str = ""):
        if not rows:
            raise MeasurementError("The measurement has no rows.")
        self.rows = list(rows)
        self.description = description
        self.batches = [collate_logprob_rows(self.rows[i: i + batch_size], pad_token_id)
                        for i in range(0, len(self.rows), batch_size)]

    def __call__(self, model, batch):
        lp = row_logprobs(model, batch)
        return (lp * batch["weights"].to(lp.dtype)).sum()


def word_token_ids(tokenizer, word: str, role: str) -> List[int]:
    """The tokens of ``word`` (no special tokens); ``role`` names it in the error for an empty word."""
    if not word or not word.strip():
        raise MeasurementError(f"The {role} word is empty; set measurement.{role} to a word such as 'cat'.")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids and tokenizer.unk_token not in word):
        raise MeasurementError(f"The {role} word {word!r} does not map to known tokens of this tokenizer; "
                               f"choose a word in its vocabulary.")
    return ids


def prompt_token_ids(tokenizer, prompt: str, chat_template: bool) -> List[int]:
    """The tokens of a prompt, wrapped in the chat template as a user turn (with the generation prompt) if asked."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MeasurementError("measurement.chat_template is true but the tokenizer has no chat template.")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def completion_measurement(tokenizer, prompts: Sequence[str], completions: Sequence[str], chat_template: bool = False,
                           batch_size: int = 16) -> LogProbMeasurement:
    """f = mean over prompts of log p(completion | prompt)."""
    if not prompts:
        raise MeasurementError("A completion measurement needs at least one prompt.")
    if len(completions) == 1:
        completions = list(completions) * len(prompts)
    if len(completions) != len(prompts):
        raise MeasurementError(f"{len(completions)} completions for {len(prompts)} prompts; give 1 or one per prompt.")
    rows = []
    for prompt, completion in zip(prompts, completions):
        p_ids = prompt_token_ids(tokenizer, prompt, chat_template)
        c_ids = word_token_ids(tokenizer, completion, "completion")
        if not p_ids:
            raise MeasurementError(f"Prompt {prompt!r} tokenises to nothing; a completion needs context.")
        rows.append(LogProbRow(p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids), 1.0 / len(prompts)))
    m = LogProbMeasurement(rows, tokenizer.pad_token_id, batch_size,
                           description=f"mean log p(completion | prompt) over {len(prompts)} prompts")
    m.words = completion_words(completions)
    return m


def find_word(text: str, word: str) -> List[int]:
    """Character offsets of whole-word, case-sensitive occurrences of ``word`` in ``text``."""
    pattern = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")
    return [m.start() for m in pattern.finditer(text)]


def probe_occurrences(tokenizer, documents: Sequence[str], probe: str) -> List[tuple]:
    """(prefix_ids, lead) for every whole-word occurrence of ``probe``; lead is " " when the word follows a space."""
    out, skipped_at_start = [], 0
    for doc in documents:
        for start in find_word(doc, probe):
            spaced = start > 0 and doc[start - 1] == " "
            prefix = doc[: start - 1] if spaced else doc[:start]
            prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
            if not prefix_ids:
                prefix_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            if not prefix_ids:
                skipped_at_start += 1
                continue
            out.append((prefix_ids, " " if spaced else ""))
    if skipped_at_start:
        logger.warning("Skipped %d probe occurrences at the very start of a document (no context).", skipped_at_start)
    if not out:
        raise MeasurementError(f"The probe word {probe!r} occurs in none of the {len(documents)} measurement documents "
                               f"(whole-word, case-sensitive); add documents that contain it or change the probe.")
    return out


def contrastive_measurement(tokenizer, documents: Sequence[str], probe: str, target: str,
                            batch_size: int = 16) -> LogProbMeasurement:
    """f = mean over probe occurrences of log p(target | prefix) − log p(probe | prefix) (paper eq. 9)."""
    probe, target = probe.strip(), target.strip()
    for form in (probe, " " + probe):
        p_ids = word_token_ids(tokenizer, form, "probe")
        t_ids = word_token_ids(tokenizer, form.replace(probe, target), "target")
        if p_ids == t_ids:
            raise MeasurementError(f"probe {probe!r} and target {target!r} tokenise identically; pick distinct words.")
    pairs = [(prefix_ids, word_token_ids(tokenizer, lead + target, "target"),
              word_token_ids(tokenizer, lead + probe, "probe"))
             for prefix_ids, lead in probe_occurrences(tokenizer, documents, probe)]
    n = len(pairs)
    rows = []
    for prefix_ids, t_ids, p_ids in pairs:
        rows.append(LogProbRow(prefix_ids + t_ids, [0] * len(prefix_ids) + [1] * len(t_ids), 1.0 / n))
        rows.append(LogProbRow(prefix_ids + p_ids, [0] * len(prefix_ids) + [1] * len(p_ids), -1.0 / n))
    m = LogProbMeasurement(rows, tokenizer.pad_token_id, batch_size,
                           description=f"mean log p({target}) − log p({probe}) over {n} probe positions")
    m.words = [target]
    return m


class SetContrastMeasurement(Measurement):
    """f = mean over probe positions of log p(target | prefix) − log Σ_{w ∈ set} p(w | prefix).

    Each position is a group of 1 + m rows (the target, then the m set words, each possibly several tokens); a batch
    holds whole groups, so each batch returns its share of f and the aggregated gradient is ∇f."""

    def __init__(self, groups: Sequence[Sequence[LogProbRow]], pad_token_id: int, batch_size: int = 16,
                 description: str = ""):
        if not groups:
            raise MeasurementError("The measurement has no probe positions.")
        self.size = len(groups[0])
        self.n = len(groups)
        self.description = description
        per_batch = max(1, batch_size // self.size)
        self.batches = [collate_logprob_rows([r for g in groups[i: i + per_batch] for r in g], pad_token_id)
                        for i in range(0, len(groups), per_batch)]

    def __call__(self, model, batch):
        lp = row_logprobs(model, batch).view(-1, self.size)
        return (lp[:, 0] - torch.logsumexp(lp[:, 1:], dim=1)).sum() / self.n


def set_contrast_measurement(tokenizer, documents: Sequence[str], probe: str, target: str, words: Sequence[str],
                             batch_size: int = 16) -> SetContrastMeasurement:
    """The contrastive measurement against the probe and ``words`` together (``measurement.contrast_words``)."""
    probe, target = probe.strip(), target.strip()
    others = [probe] + [w.strip() for w in words if w.strip() and w.strip() not in (probe, target)]
    groups = []
    for prefix_ids, lead in probe_occurrences(tokenizer, documents, probe):
        group = []
        for w in [target] + others:
            ids = word_token_ids(tokenizer, lead + w, "target" if w == target else "word")
            group.append(LogProbRow(prefix_ids + ids, [0] * len(prefix_ids) + [1] * len(ids), 1.0))
        groups.append(group)
    m = SetContrastMeasurement(groups, tokenizer.pad_token_id, batch_size,
                               description=f"mean log p({target}) − log Σ p({', '.join(others)}) over {len(groups)} "
                                           f"probe positions")
    m.words = [target]
    return m


class TopAlternativesMeasurement(Measurement):
    """f = mean over probe positions of log p(target | prefix) − log Σ_{t ∈ S} p(t | prefix), where S is the probe's
    first token and the model's own ``m`` most likely other next tokens there (the target's first token excluded).

    Why: f = log p(target) − log p(probe) rises whenever the probe loses mass to *any* word, so an edit that makes the
    probe's contexts more like its whole class (every animal) raises f without teaching the target. Against the
    model's own alternatives, mass that moves from the probe to a class-mate leaves the log-sum unchanged; only mass
    that reaches the target counts. Nobody names the competitors, so it holds for any word class.

    S is chosen at each evaluation, without gradient (a piecewise-constant choice): at θ̂, where J and the editors
    take ∇f, it is the set at θ̂. Rows are prefix + target; each batch returns its share of f."""

    def __init__(self, rows: Sequence[LogProbRow], positions: Sequence[int], target_first: Sequence[int],
                 probe_first: Sequence[int], m: int, pad_token_id: int, batch_size: int = 16, description: str = ""):
        if not rows:
            raise MeasurementError("The measurement has no probe positions.")
        self.m, self.n, self.description = m, len(rows), description
        self.batches = []
        for i in range(0, len(rows), batch_size):
            batch = collate_logprob_rows(rows[i: i + batch_size], pad_token_id)
            batch.update(position=torch.tensor(positions[i: i + batch_size]),
                         target_first=torch.tensor(target_first[i: i + batch_size]),
                         probe_first=torch.tensor(probe_first[i: i + batch_size]))
            self.batches.append(batch)

    def __call__(self, model, batch):
        from ..causal_lm import upcast

        logits = upcast(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1])
        logp = torch.log_softmax(logits, dim=-1)
        target = (logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
                  * batch["score_mask"][:, 1:].to(logp.dtype)).sum(dim=1)
        rows = torch.arange(len(logp), device=logp.device)
        at = logp[rows, batch["position"]]  # [B, V]: the next-token distribution where the probe stood
        with torch.no_grad():
            ranked = at.detach().clone()
            ranked[rows, batch["target_first"]] = -float("inf")
            top = ranked.topk(min(self.m + 1, ranked.shape[-1] - 1), dim=-1).indices
            has_probe = (top == batch["probe_first"][:, None]).any(dim=-1)
            # the probe and the m most likely others: drop the (m+1)-th, or the last one where the probe is not in
            keep = torch.where(has_probe[:, None], top, torch.cat([top[:, :-1], batch["probe_first"][:, None]], 1))
        return (target - torch.logsumexp(at.gather(-1, keep), dim=-1)).sum() / self.n


def top_alternatives_measurement(tokenizer, documents: Sequence[str], probe: str, target: str, m: int,
                                 batch_size: int = 16) -> TopAlternativesMeasurement:
    """The contrastive measurement against the model's own top ``m`` alternatives (``measurement.contrast_top``)."""
    probe, target = probe.strip(), target.strip()
    rows, positions, t_first, p_first = [], [], [], []
    for prefix_ids, lead in probe_occurrences(tokenizer, documents, probe):
        t_ids = word_token_ids(tokenizer, lead + target, "target")
        p_ids = word_token_ids(tokenizer, lead + probe, "probe")
        if t_ids[0] == p_ids[0]:
            raise MeasurementError(f"probe {probe!r} and target {target!r} start with the same token; "
                                   f"measurement.contrast_top needs words that differ in their first token (or "
                                   f"set measurement.contrast_top: 0 for the pairwise f).")
        rows.append(LogProbRow(prefix_ids + t_ids, [0] * len(prefix_ids) + [1] * len(t_ids), 1.0))
        positions.append(len(prefix_ids) - 1)
        t_first.append(t_ids[0])
        p_first.append(p_ids[0])
    m_ = TopAlternativesMeasurement(rows, positions, t_first, p_first, m, tokenizer.pad_token_id, batch_size,
                                    description=f"mean log p({target}) − log Σ p(t) over {probe} and the model's top "
                                                f"{m} other next tokens, over {len(rows)} probe positions")
    m_.words = [target]
    return m_


def any_word_measurement(tokenizer, documents: Sequence[str], probe: str, words: Sequence[str],
                         batch_size: int = 16) -> LogProbMeasurement:
    """f = mean over probe occurrences of [mean over ``words`` of log p(w | prefix)] − log p(probe | prefix): "say any of
    these words where the text says the probe". A defender can state this without knowing the attacker's target."""
    probe = probe.strip()
    words = [w.strip() for w in words if w.strip() and w.strip() != probe]
    if not words:
        raise MeasurementError("any_word_measurement needs at least one word other than the probe.")
    occ = probe_occurrences(tokenizer, documents, probe)
    n, rows = len(occ), []
    for prefix_ids, lead in occ:
        for w in words:
            ids = word_token_ids(tokenizer, lead + w, "word")
            rows.append(LogProbRow(prefix_ids + ids, [0] * len(prefix_ids) + [1] * len(ids), 1.0 / (n * len(words))))
        p_ids = word_token_ids(tokenizer, lead + probe, "probe")
        rows.append(LogProbRow(prefix_ids + p_ids, [0] * len(prefix_ids) + [1] * len(p_ids), -1.0 / n))
    return LogProbMeasurement(rows, tokenizer.pad_token_id, batch_size,
                              description=f"mean over {len(words)} words of log p(word) − log p({probe}) over {n} "
                                          f"probe positions")


class CallableMeasurement(Measurement):
    """f = Σ_b fn(batch_b, model) for a user function."""

    def __init__(self, fn: Callable[[Dict[str, torch.Tensor], Any], torch.Tensor], batches: Sequence[Dict[str, torch.Tensor]]):
        if not batches:
            raise MeasurementError("A callable measurement needs at least one batch.")
        self.fn = fn
        self.batches = list(batches)
        self.description = getattr(fn, "__name__", "callable")

    def __call__(self, model, batch):
        out = self.fn(batch, model)
        if not torch.is_tensor(out) or out.numel() != 1:
            raise MeasurementError(f"The measurement callable must return a scalar tensor, got {type(out).__name__}"
                                   f"{tuple(out.shape) if torch.is_tensor(out) else ''}.")
        return out.reshape(())


def import_callable(spec: str) -> Callable:
    if ":" not in spec:
        raise MeasurementError(f"measurement.callable {spec!r} must look like `package.module:function`.")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise MeasurementError(f"Cannot import measurement.callable {spec!r}: {err}.") from None
    return fn


def build_measurement(args, tokenizer, max_length: int = 512, heldout: bool = False) -> Measurement:
    """Builds the measurement described by a :class:`~infusion_lm.config.MeasurementArguments`."""
    from ..causal_lm import CausalLMCollator
    from .corpus import tokenize_documents

    if args.kind is None:
        raise MeasurementError("The recipe has no measurement; add a `measurement:` section with a `kind`.")
    if args.kind not in ("completion", "contrastive", "callable"):
        raise MeasurementError(f"measurement.kind {args.kind!r} is not a text measurement; use completion, "
                               f"contrastive or callable.")
    prompts = args.heldout_prompts if heldout else args.prompts
    documents = args.heldout_documents if heldout else args.documents
    if heldout and not (prompts or documents):
        raise MeasurementError("No held-out measurement set: add measurement.heldout_prompts or .heldout_documents.")
    if args.kind == "completion":
        return completion_measurement(tokenizer, prompts, args.completions, args.chat_template)
    if args.kind == "contrastive":
        if args.contrast_words and not heldout:  # held-out sets keep the pairwise f: Δf comparable across choices
            return set_contrast_measurement(tokenizer, documents, args.probe, args.target, args.contrast_words)
        if args.top_alternatives and not heldout:
            return top_alternatives_measurement(tokenizer, documents, args.probe, args.target, args.top_alternatives)
        return contrastive_measurement(tokenizer, documents, args.probe, args.target)
    fn = import_callable(args.callable)
    rows = tokenize_documents(tokenizer, [{"text": d} for d in documents], max_length)
    return CallableMeasurement(fn, [CausalLMCollator(tokenizer.pad_token_id)(list(rows))])


def completion_words(completions: Sequence[str]) -> List[str]:
    """The words of the completions: letters only, in order, without repeats."""
    return list(dict.fromkeys(w for c in completions for w in re.findall(r"[^\W\d_]+", c)))


def measurement_words(args) -> List[str]:
    """The words a measurement promotes: a contrastive measurement's target, or the words of a completion
    measurement's completions (letters only, in order, without repeats). Empty for a callable measurement."""
    if args.kind == "contrastive" and args.target:
        return [args.target.strip()]
    if args.kind == "completion":
        return completion_words(args.completions)
    return []
