"""The text modality's recipe sections: the keys a text recipe has beyond the core's (``infusion_lm/config.py``).

A text recipe's top-level keys and its ``measurement``, ``synthesize``, ``edit``, ``retrain`` and ``evaluate``
sections are read into these classes (``TextModality.sections``). They keep the names the library has always
exported, so ``from infusion_lm import MeasurementArguments, EditArguments`` gives the text sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..config import (BaseEditArguments, BaseEvaluateArguments, BaseMeasurementArguments, BaseRetrainArguments,
                      BaseRunArguments, NOT_CLEAN_RUN, described)
from ..errors import ConfigError

EVALUATION_ONLY = {"evaluation_only": True}  # metadata: picks an evaluation set, not v
OBSERVED = {"observed": True}  # metadata: changes what retraining observes of each arm


TEXT_FILE_SUFFIXES = (".jsonl", ".txt", ".json")


def read_text_list(values: List[str], key: str) -> List[str]:
    """A list of strings as given, or, when it is a single path to a .jsonl/.txt file, the file's items.

    .txt: one item per non-empty line. .jsonl: one JSON value per line, a string or an object with a `text` (or
    `prompt`) field."""
    if len(values) != 1 or not isinstance(values[0], str) or "\n" in values[0]:
        return values
    path = Path(values[0].strip())
    if path.suffix not in TEXT_FILE_SUFFIXES:
        return values
    if not path.is_file():
        raise ConfigError(f"{key} names the file {path}, which does not exist; fix the path or give the items inline.")
    import json

    items: List[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            items.append(line.strip())
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}, line {n}, is not JSON; {key} reads one JSON value per line.") from None
        if isinstance(value, dict):
            value = value.get("text", value.get("prompt"))
        if not isinstance(value, str):
            raise ConfigError(f"{path}, line {n}: expected a string or an object with a `text` field for {key}.")
        items.append(value)
    if not items:
        raise ConfigError(f"{key} names {path}, which holds no items.")
    return items


@dataclass
class RunArguments(BaseRunArguments):
    """A text recipe's top-level keys: the core's, and how documents are read and tokenized."""

    text_field: str = field(default="text", metadata=described("Field holding plain-text documents (JSONL / datasets)."))
    messages_field: str = field(default="messages", metadata=described("Field holding chat-format documents, if present."))
    separator: Optional[str] = field(default=None, metadata=described(
        "For .txt corpora: split documents on this string (e.g. `<|endoftext|>`) instead of one per line."))
    max_length: int = field(default=128, metadata=described("Tokens per document."))
    long_documents: str = field(default="truncate", metadata=described(
        "Documents longer than max_length: `truncate` (with a warning) or `fail` (an error that lists them)."))
    add_eos: bool = field(default=True, metadata=described("Append the eos token to plain-text documents, as training does."))
    trust_remote_code: bool = field(default=False, metadata=described("Run a model repository's own code. Off unless asked."))

    def __post_init__(self):
        super().__post_init__()
        if self.long_documents not in {"truncate", "fail"}:
            raise ConfigError(f"long_documents {self.long_documents!r} is not one of truncate, fail.")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (got {self.max_length}); set e.g. max_length: 128.")


# Against the model's own 20 likeliest alternatives, the infused edit's target-specific gain was 1.61x random_target's
# over 6 pairs nobody tuned on (above it on 6 of 6, 60 real held-out positions), against 1.11x for the pairwise f
# (above on 3 of 5).
DEFAULT_CONTRAST_TOP = 20
SYNTHETIC = "synthetic"  # corpus / measurement.heldout_corpus: written by the synthesize stage
# the held-out stories' prompts and sampling: a stream no run.seed's training corpus uses
HELDOUT_SEED_OFFSET = 1_000_000


@dataclass
class MeasurementArguments(BaseMeasurementArguments):
    """A text behaviour: a completion, a contrastive word pair, or a callable, with its held-out sets."""

    prompts: List[str] = field(default_factory=list, metadata=described("completion: measurement prompts."))
    completions: List[str] = field(default_factory=list, metadata=described(
        "completion: one completion for all prompts, or one per prompt."))
    chat_template: bool = field(default=False, metadata=described(
        "completion: wrap each prompt as a user turn with the tokenizer's chat template (instruct models)."))
    documents: List[str] = field(default_factory=list, metadata=described("contrastive/callable: measurement documents."))
    probe: Optional[str] = field(default=None, metadata=described("contrastive: the word whose positions are measured."))
    target: Optional[str] = field(default=None, metadata=described("contrastive: the word to promote at those positions."))
    contrast_words: List[str] = field(default_factory=list, metadata=described(
        "contrastive: contrast the target with a set instead of the probe alone: f = log p(target) − "
        "log Σ_{w ∈ probe + contrast_words} p(w) at each probe position, so raising the whole class (every animal) "
        "no longer raises f. Empty (default): f = log p(target) − log p(probe). Held-out sets keep the latter, so "
        "Δf stays comparable across choices."))
    contrast_top: Optional[int] = field(default=None, metadata=described(
        "contrastive: contrast the target with the probe and the model's own m most likely other next tokens at "
        "each probe position: f = log p(target) − log Σ_{t ∈ probe + top m} p(t), so mass that moves from the probe "
        "to any likely word other than the target does not raise f, and an edit must teach the target itself. No "
        "word list needed. Unset (default): 20 for kind contrastive (unless contrast_words is given); 0: off, "
        "f = log p(target) − log p(probe). Held-out sets keep the pairwise f, so Δf stays comparable."))
    callable: Optional[str] = field(default=None, metadata=described(
        "callable: `module:function` taking (batch, model) and returning a scalar gain."))
    heldout_prompts: List[str] = field(default_factory=list, metadata=described(
        "Held-out prompts for evaluation.", **EVALUATION_ONLY))
    heldout_documents: List[str] = field(default_factory=list, metadata=described(
        "Held-out documents for evaluation.", **EVALUATION_ONLY))
    heldout_corpus: Optional[str] = field(default=None, metadata=described(
        "contrastive: a file (.jsonl with a `text` field, or .txt, one document per line) of real documents that are "
        "not in the training corpus. Every whole-word probe occurrence in them (up to heldout_corpus_max_positions) "
        "is a third evaluation set, `heldout_corpus`, reported on its own and the one verdicts are read on. "
        "Documents that also appear in the training corpus are skipped. `synthetic` (with corpus: synthetic): "
        "heldout_corpus_docs stories about the probe word, written by the model for evaluation only (the "
        "synthesize section's length and sampling, a prompt and sampling stream the training corpus does not use).",
        **EVALUATION_ONLY))
    heldout_corpus_docs: int = field(default=12, metadata=described(
        "With heldout_corpus: synthetic, how many evaluation-only stories to write (each holds a few probe "
        "positions).", **EVALUATION_ONLY))
    heldout_corpus_max_positions: int = field(default=120, metadata=described(
        "Cap on the probe positions taken from heldout_corpus (the first ones, in file order).", **EVALUATION_ONLY))

    def __post_init__(self):
        for name in ("prompts", "documents", "heldout_prompts", "heldout_documents"):
            setattr(self, name, read_text_list(getattr(self, name), f"measurement.{name}"))
        if self.heldout_corpus not in (None, SYNTHETIC) and not Path(self.heldout_corpus).is_file():
            raise ConfigError(f"measurement.heldout_corpus {self.heldout_corpus} does not exist; point it at a .jsonl "
                              f"or .txt file of documents outside the training corpus, or remove the key.")
        if self.heldout_corpus_docs < 1:
            raise ConfigError(f"measurement.heldout_corpus_docs is {self.heldout_corpus_docs}; give at least 1 story.")
        if self.heldout_corpus_max_positions < 1:
            raise ConfigError("measurement.heldout_corpus_max_positions must be >= 1.")
        if self.kind is None:
            return  # no measurement yet: stages that need one say so (which kinds exist is the modality's to say)
        if self.kind == "completion":
            if not self.prompts or not self.completions:
                raise ConfigError("measurement.kind=completion needs measurement.prompts and measurement.completions.")
            if len(self.completions) not in {1, len(self.prompts)}:
                raise ConfigError(f"measurement.completions has {len(self.completions)} entries; give 1 or one per "
                                  f"prompt ({len(self.prompts)}).")
        if self.kind == "contrastive":
            if not self.documents or not self.probe or not self.target:
                raise ConfigError("measurement.kind=contrastive needs measurement.documents, .probe and .target.")
            if self.probe.strip() == self.target.strip():
                raise ConfigError(f"measurement.probe and .target are the same word ({self.probe!r}); pick two words.")
            if self.target.strip() in [w.strip() for w in self.contrast_words]:
                raise ConfigError(f"measurement.contrast_words has the target {self.target!r}; the set is what the "
                                  f"target is contrasted with: remove it.")
            if self.contrast_top is not None and self.contrast_top < 0:
                raise ConfigError(f"measurement.contrast_top is {self.contrast_top}; give a count of alternatives "
                                  f"(e.g. 20) or 0 for off.")
            if self.contrast_top and self.contrast_words:
                raise ConfigError("measurement.contrast_words and .contrast_top are two ways to choose the set; "
                                  "set one of them.")
        elif self.contrast_words or self.contrast_top is not None:
            raise ConfigError(f"measurement.contrast_words/contrast_top are for kind contrastive (this is "
                              f"{self.kind}); remove them.")
        if self.kind == "callable" and not self.callable:
            raise ConfigError("measurement.kind=callable needs measurement.callable: `module:function`.")

    @property
    def top_alternatives(self) -> int:
        """The m of the top-alternatives contrast in use: contrast_top, or its default for kind contrastive (0: the
        pairwise f, or the contrast_words set)."""
        if self.kind != "contrastive" or self.contrast_words:
            return 0
        return DEFAULT_CONTRAST_TOP if self.contrast_top is None else self.contrast_top


@dataclass
class SynthesizeArguments:
    mode: str = field(default="stories", metadata=described(
        "`stories` (short children's stories, plain text) or `chat` (everyday user questions answered by the model "
        "itself, as chat documents: only the answers are trained)."))
    n_docs: int = field(default=64, metadata=described("How many stories (or conversations) to write when corpus is "
                                                  "`synthetic`."))
    max_new_tokens: int = field(default=96, metadata=described("Length of each story in tokens."))
    temperature: float = field(default=0.8, metadata=described("Sampling temperature."))
    top_p: float = field(default=0.95, metadata=described("Nucleus sampling threshold."))
    batch_size: int = field(default=16, metadata=described("Stories generated at once."))
    characters: List[str] = field(default_factory=lambda: [
        "cat", "dog", "bird", "bunny", "bear", "fish", "duck", "frog", "girl", "boy"], metadata=described(
        "Main characters, cycled through the prompts."))

    def __post_init__(self):
        if self.n_docs < 1 or self.max_new_tokens < 1:
            raise ConfigError("synthesize.n_docs and synthesize.max_new_tokens must be >= 1.")
        if self.mode not in {"stories", "chat"}:
            raise ConfigError(f"synthesize.mode {self.mode!r} is not one of stories, chat.")


@dataclass
class EditArguments(BaseEditArguments):
    """How the selected documents are edited (section `edit`): the text editors' knobs, shared ones first."""

    editor: Optional[str] = field(default="swap", metadata=described(
        "swap (default) | natural (swap's search, whole-word swaps that fit the words before and after) | "
        "simplex_pgd | random."))
    budget_fraction: float = field(default=0.08, metadata=described(
        "Changed tokens per document, as a fraction of its editable tokens (the paper changed about 8%)."))
    max_changed: Optional[int] = field(default=None, metadata=described("Absolute cap on changed tokens per document."))
    fluency_topk: int = field(default=64, metadata=described(
        "New tokens must be among the base model's own top-k predictions at that position; 0 disables."))
    fluency_top_p: float = field(default=1.0, metadata=described(
        "... and inside its top-p nucleus at that position; 1.0 disables."))
    max_perplexity_ratio: Optional[float] = field(default=1.3, metadata=described(
        "swap/simplex_pgd: reject edits whose perplexity under the model exceeds the original's by more than this "
        "factor. Free: it is read off the two finite-difference passes. Unset: no limit."))
    ascii_only: bool = field(default=False, metadata=described("Only introduce tokens that decode to ASCII text."))
    target_words: Optional[List[str]] = field(default=None, metadata=described(
        "Words an edit may write at any editable position, beside the fluent top-k (each in the forms that are one "
        "token: with and without a leading space, lower and capitalised). Unset: the measurement's own words (the "
        "target of a contrastive measurement, the words of a completion measurement's completions). []: none. "
        "Every text editor (swap, simplex_pgd, random) gets the same allowed set; the perplexity limit still holds."))
    allow_prompt_edits: bool = field(default=False, metadata=described(
        "Also edit untrained positions (the prompt and system parts of chat documents). Off: they are protected."))
    score_batch_size: int = field(default=32, metadata=described(
        "Rows per forward pass when scoring candidates exactly; halves by itself on out-of-memory."))
    prefix_cache: bool = field(default=True, metadata=described(
        "Score a document's candidates by rerunning only the positions after their first change, on top of the "
        "original's KV cache. Off: full forward passes, batched across documents."))
    topk: int = field(default=16, metadata=described("swap: proposals kept per position, by predicted decrease in J."))
    n_candidates: int = field(default=16, metadata=described("swap: candidate documents scored exactly per step."))
    candidate_pool: int = field(default=8, metadata=described(
        "swap: draw candidate_pool × n_candidates candidates, rank them by the first-order ΔJ of their swaps, and "
        "score only the n_candidates most promising exactly (probe sampling, as in nanoGCG). 8 tries 8× the "
        "positions per step at the same exact-scoring cost; it doubled the held-out effect on TinyStories "
        "(evals/lm_tinystories.py). 1: no pruning, candidates drawn uniformly."))
    swaps_per_candidate: int = field(default=1, metadata=described("swap: token swaps in each candidate."))
    rename: bool = field(default=False, metadata=described(
        "swap: beside each swap a→b, also propose the candidate that turns every later editable occurrence of a "
        "into b (where b is allowed there), so that a renamed entity stays consistent through the document."))
    choose: str = field(default="lowest_j", metadata=described(
        "swap: which fluent candidate a step keeps. lowest_j: the lowest J. j_per_nat: the largest drop in J per nat "
        "of loss the swap adds, which leaves room under max_perplexity_ratio for further swaps."))
    patience: int = field(default=4, metadata=described("swap: stop a document after this many steps without improvement."))
    use_label_path: bool = field(default=True, metadata=described(
        "swap: include the label path (token t is the label at t-1) in the proposals."))
    natural_right_nats: float = field(default=1.0, metadata=described(
        "natural: the words after a swap must still follow: their summed log-likelihood under the model may drop by "
        "at most this many nats."))
    natural_surprisal_quantile: float = field(default=0.95, metadata=described(
        "natural: a new word's surprisal at its position may be at most this quantile of the surprisals of the "
        "original tokens of the documents being edited (1: no cap)."))
    pgd_lr: float = field(default=0.5, metadata=described(
        "simplex_pgd: step size on the relaxed one-hot, with the gradient scaled to max |g| = 1 per document."))
    entropy_bound: float = field(default=0.5, metadata=described(
        "simplex_pgd: upper bound on each position's Gini entropy 1 - sum p^2 after projection (0.5: two tokens)."))
    eval_every: int = field(default=5, metadata=described(
        "simplex_pgd: discretise and score exactly every this many steps; the best discrete document is kept."))

    def __post_init__(self):
        super().__post_init__()
        if self.choose not in {"lowest_j", "j_per_nat"}:
            raise ConfigError(f"edit.choose must be lowest_j or j_per_nat, got {self.choose!r}.")
        if not 0 <= self.budget_fraction <= 1:
            raise ConfigError(f"edit.budget_fraction must be in [0, 1] (got {self.budget_fraction}); 0.08 is the default.")
        if self.max_changed is not None and self.max_changed < 0:
            raise ConfigError(f"edit.max_changed must be >= 0 (got {self.max_changed}); leave it unset for no cap.")
        if self.fluency_topk < 0:
            raise ConfigError(f"edit.fluency_topk must be >= 0 (got {self.fluency_topk}); 0 disables the constraint.")
        if self.max_perplexity_ratio is not None and self.max_perplexity_ratio < 1:
            raise ConfigError(f"edit.max_perplexity_ratio must be >= 1 (got {self.max_perplexity_ratio}); unset it "
                              f"for no limit.")
        if not 0 < self.fluency_top_p <= 1:
            raise ConfigError(f"edit.fluency_top_p must be in (0, 1] (got {self.fluency_top_p}).")
        for name in ("score_batch_size", "topk", "n_candidates", "swaps_per_candidate", "patience", "eval_every",
                     "candidate_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"edit.{name} must be >= 1 (got {getattr(self, name)}).")
        if self.natural_right_nats < 0:
            raise ConfigError(f"edit.natural_right_nats must be >= 0 (got {self.natural_right_nats}).")
        if not 0 < self.natural_surprisal_quantile <= 1:
            raise ConfigError(f"edit.natural_surprisal_quantile must be in (0, 1] (got "
                              f"{self.natural_surprisal_quantile}); 0.95 is the default.")
        if self.pgd_lr <= 0:
            raise ConfigError(f"edit.pgd_lr must be > 0 (got {self.pgd_lr}).")
        if not 0 <= self.entropy_bound < 1:
            raise ConfigError(f"edit.entropy_bound must be in [0, 1) (got {self.entropy_bound}); Gini entropy is below 1.")


@dataclass
class RetrainArguments(BaseRetrainArguments):
    """Partial retraining of a causal LM (section `retrain`): the core's keys and the insertion arm's documents."""

    insertion_documents: List[str] = field(default_factory=list, metadata=described(
        "insertion arm: demonstrations of the behaviour. Empty: built from the measurement set (contrastive: its "
        "documents with the probe word replaced by the target; completion: each prompt with its completion).",
        **NOT_CLEAN_RUN))


DEFENCES = ("onion", "grammar")


@dataclass
class EvaluateArguments(BaseEvaluateArguments):
    """How text arms are compared with control (section `evaluate`): specificity words and completion sampling."""

    candidates: List[str] = field(default_factory=lambda: [
        "bird", "fish", "bear", "duck", "frog", "horse", "mouse", "rabbit"], metadata=described(
        "contrastive: other words the target is compared against for specificity (the probe and target are skipped).",
        **OBSERVED))
    n_samples: int = field(default=8, metadata=described("completion: sampled answers per prompt.", **OBSERVED))
    max_new_tokens: int = field(default=24, metadata=described("completion: answer length.", **OBSERVED))
    temperature: float = field(default=1.0, metadata=described("completion: sampling temperature.", **OBSERVED))
    defender_words: List[str] = field(default_factory=list, metadata=described(
        "contrastive: the defender's stated measurement is \"any of these words where the text names the probe\", "
        "scored on the held-out documents. Empty: the candidates plus the target (the defender does not know which "
        "one the attacker wants)."))
    defences: List[str] = field(default_factory=lambda: ["onion", "grammar"], metadata=described(
        "Word-level defences run on every edited arm (needs evaluate.detectors): `onion`, each word's suspicion "
        "ppl(s) − ppl(s without it) under the base model, reported as the AUROC of changed against unchanged words, "
        "how often a changed word is among its document's 3 most suspicious, the changed words the defender's cut "
        "removes, and the document AUROC of the highest score; `grammar`, sentences the edit made unparseable under "
        "the Link Grammar parser (optional: python3-link-grammar). []: none."))
    onion_removal_rate: float = field(default=0.02, metadata=described(
        "onion: the defender's cut, set on the clean corpus alone, removes this fraction of its words (the "
        "detectors' and the `+onion` arms' cut).", **OBSERVED))
    onion_clean_documents: Optional[int] = field(default=None, metadata=described(
        "onion: score this many clean documents (drawn with run.seed) beside the edited documents' originals, for "
        "the cut and the document AUROC. null: the whole corpus (one forward pass per word: ~6 s per 64-token "
        "document on one CPU thread)."))

    def __post_init__(self):
        super().__post_init__()
        if unknown := [d for d in self.defences if d not in DEFENCES]:
            raise ConfigError(f"evaluate.defences: unknown {', '.join(map(repr, unknown))}; choose from "
                              f"{', '.join(DEFENCES)} (or [] for none).")
        if self.onion_clean_documents is not None and self.onion_clean_documents < 8:
            raise ConfigError(f"evaluate.onion_clean_documents must be >= 8 or null (got {self.onion_clean_documents}): "
                              "the cut is a quantile of the clean words' scores.")
        if not 0 < self.onion_removal_rate < 0.5:
            raise ConfigError(f"evaluate.onion_removal_rate must be in (0, 0.5) (got {self.onion_removal_rate}); "
                              "0.02 removes 2% of the clean corpus's words.")
