"""What a pipeline needs from a data modality (text, images, ...): the :class:`Modality` protocol.

The :class:`~infusion_lm.pipeline.Pipeline` owns the stages, their caching and fingerprints, the run folder, the
selection and the retraining loop; everything that depends on what a document *is* comes from its modality object,
built by composition (``run.modality`` names it in :mod:`infusion_lm.modalities`). A modality is constructed with a
:class:`~infusion_lm.run_context.RunContext`: the recipe, the run folder, the shared handles (``ctx.model``,
``ctx.dataset``...) and a few run services (``ctx.clean_checkpoint()``, ``ctx.load_ihvp()``...); it never holds the
pipeline. Two stage functions, ``evaluate`` and ``dry_run_costs``, are static: like the core's stages, they are
functions of the pipeline. A new modality implements these methods and adds one line to the registry; no core file
changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple


class Modality(Protocol):
    name: str
    measurement_kinds: Tuple[str, ...]  # measurement.kind values it builds
    editors: Tuple[str, ...]  # edit.editor values it runs
    arms: Tuple[str, ...]  # retrain.arms it can assemble
    select_rankings: Tuple[str, ...]  # select.rank_by values it supports ("j" always; first_step needs first_step)
    # optional: defences D for `<arm>+D` arms (text: onion), each served by defended_rows; absent: none
    sections: Dict[str, type]
    """The class each recipe section is read into (``"run"`` for the top-level keys): a subclass of the core's
    (``infusion_lm.config.CORE_SECTIONS``) that adds this modality's keys, or a section only it has. Sections it does
    not name are read into the core's classes."""

    def __init__(self, ctx) -> None:
        """``ctx``: the :class:`~infusion_lm.run_context.RunContext` of the run it serves."""

    @staticmethod
    def check_recipe(recipe) -> None:
        """Raises ConfigError for settings this modality cannot run (called when a recipe is loaded)."""

    # ---------------------------------------------------------------- models and data
    def load_model(self) -> tuple:
        """(model, processor) of the recipe: the processor is a tokenizer for text, None where there is none."""

    def fresh_model(self) -> Any:
        """A new copy of the recipe's model (every arm and the clean run start from one)."""

    def arm_model(self) -> Any:
        """A fresh model of the architecture the arms retrain (another one: transfer)."""

    def arm_checkpoint(self) -> Optional[Path]:
        """The clean checkpoint the arms resume from."""

    def synthetic(self) -> bool:
        """Whether the corpus is written by the synthesize stage."""

    def synthesize(self) -> None:
        """Writes the synthetic corpus (the synthesize stage's work)."""

    def documents(self) -> Sequence:
        """The corpus as loaded (documents, or the image split)."""

    def dataset(self) -> Sequence:
        """The training rows kronfluence and the editors read (tokenized documents, image tensors)."""

    def corpus_size(self) -> int:
        """Documents in the corpus, known before anything is written (for bounds such as select.k)."""

    corpus_settings: Tuple[str, ...]
    """The recipe settings ("run.field") the training rows come from: the corpus cache key declares them (the
    corpus file's bytes are hashed beside them)."""

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        """The training rows of one arm: the clean corpus with some documents replaced."""

    # optional, with ``defences``:
    # def defended_rows(self, rows, defence, arm) -> (rows, summary): what a defender keeps of an arm's corpus

    def trainer_collator(self) -> Any:
        """What the HF Trainer collates rows with."""

    # ---------------------------------------------------------------- influence
    def tracked(self) -> List[str]:
        """The modules kronfluence tracks."""

    def measurement(self) -> Any:
        """f, as a :class:`~infusion_lm.measurement.Measurement`."""

    def influence_kwargs(self, measurement=None) -> dict:
        """Extra arguments for kronfluence (task, collate_fn, pad_token_id)."""

    # ---------------------------------------------------------------- edits and arms
    def edit_into(self, out_dir: Path, args, indices: List[int], targets: Optional[List[int]] = None) -> None:
        """Edits the selected documents with ``args.editor`` and writes an edit folder into ``out_dir``."""

    def editor_revision(self, editor: str) -> int:
        """A revision number of the editor's algorithm: a fix redoes its cached baseline edits."""

    def first_step(self, indices: List[int]) -> List[tuple]:
        """(J(z) − J(z'), z') after one editor step on each listed document (select.rank_by: first_step); the edit
        stage continues from z'."""

    def replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        """Which documents an arm replaces, and with what rows."""

    # ---------------------------------------------------------------- observation and evaluation
    @staticmethod
    def dry_run_costs(pipe) -> Dict:
        """``--dry-run`` estimates without loading weights: {"cost": {stage: passes}, "seconds_per_pass", "documents",
        "tokens", "unit" (what one pass is), "source" (where the model comes from)}."""

    def theta_hat_summary(self, theta: Dict[str, dict]) -> Dict:
        """Extra entries for the retrain summary from θ̂'s observations (text: how often θ̂ names the target)."""

    def observed_sets(self) -> List[str]:
        """The evaluation sets every arm is observed on (the first is the measurement set)."""

    def observe(self, model, name: str) -> dict:
        """What one model does on one evaluation set, item by item."""

    def validate(self, upto: str) -> None:
        """Checks what can be checked before anything is written, up to stage ``upto``."""

    @staticmethod
    def evaluate(pipe) -> None:
        """Compares every arm with control and writes results.json and the report."""
