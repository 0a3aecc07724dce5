"""The staged pipeline. Each stage caches its outputs in the run folder with a fingerprint of the configuration it
depends on, so a finished stage is never recomputed and changing an upstream setting invalidates everything below it.

    synthesize (corpus: synthetic) ─► fit ─► measure ─► score ─► select ─► edit ─► retrain ─► evaluate

What each stage needs, the settings it depends on and the files it writes are in the stage table
(infusion_lm/stages.py); the run folder's layout (every path it holds) is in infusion_lm/run_folder.py.
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import influence as inf
from .atomic_io import read_json, read_tensors, write_json, write_tensors, write_yaml
from .config import Recipe
from .config_sections import arm_parts
from .distributed import barrier, is_main, runs_here
from .fingerprints import fingerprint
from .run_folder import RunFolder
from .stages import STAGES

logger = logging.getLogger(__name__)

# the method's steps live in engine.py (shared with infuse()); these names stay importable from here
from .engine import SIGN_CONVENTION, check_k, documents_to_try, select_documents  # noqa: F401


class Pipeline:
    """Runs the stages of one recipe in its run folder. Everything the CLI does is a method here.

    What depends on the kind of data (models, documents, measurements, editors, observation, the report) comes from
    ``self.modality``, the :class:`~infusion_lm.modality.Modality` that ``run.modality`` names."""

    def __init__(self, recipe: Recipe, progress: bool = True, force: bool = False):
        from .modalities import modality_class
        from .run_context import pipeline_context

        self.recipe = recipe
        self.dir = Path(recipe.run.output_dir)
        self.folder = RunFolder(self.dir)
        self.progress = progress
        self.force = force
        self.modality = modality_class(recipe.run.modality)(pipeline_context(self))
        self.timings: Dict[str, float] = {}
        self.skipped: List[str] = []

    # ------------------------------------------------------------------ models (the modality loads them)

    @cached_property
    def _model_and_tokenizer(self):
        return self.modality.load_model()

    def fresh_model(self):
        """A new copy of the recipe's model (retraining starts every arm from one)."""
        return self.modality.fresh_model()

    @property
    def base_model(self):
        """The recipe's model: it writes the synthetic corpus and starts the clean fine-tune."""
        return self._model_and_tokenizer[0]

    @property
    def tokenizer(self):
        """The model's tokenizer (text), or None for a modality without one."""
        return self._model_and_tokenizer[1]

    @property
    def at_checkpoint(self) -> bool:
        return self.recipe.retrain.influence_at == "checkpoint"

    @cached_property
    def _checkpoint_model(self):
        from .retrain import load_checkpoint_model

        # LoRA: θ̂ keeps its adapters, so influence is over the LoRA A/B modules (the parameters the arms train)
        return load_checkpoint_model(self.fresh_model(), self.clean_checkpoint(), merge_lora=not self.lora_influence)

    @property
    def lora_influence(self) -> bool:
        """Influence over LoRA adapters: the arms train LoRA from a checkpoint that already has them."""
        return self.recipe.retrain.lora and self.at_checkpoint

    @property
    def model(self):
        """θ̂, where influence is computed and documents are edited: the recipe's model or the clean checkpoint."""
        return self._checkpoint_model if self.at_checkpoint else self.base_model

    def arm_model(self):
        """A fresh model of the architecture the arms retrain (a modality may retrain another one: transfer)."""
        return self.modality.arm_model()

    def arm_checkpoint(self):
        """The clean checkpoint the arms resume from."""
        return self.modality.arm_checkpoint()

    def checkpoint_step(self) -> int:
        """The optimizer step of the clean checkpoint the arms resume from (0 when they start from the model)."""
        ckpt = self.clean_checkpoint()
        if ckpt is None:
            return 0
        return int(read_json(Path(ckpt) / "trainer_state.json")["global_step"])

    def clean_checkpoint(self):
        """The clean Trainer checkpoint every arm resumes from (None: the arms start from the recipe's model)."""
        from .retrain import clean_checkpoint

        r, t = self.recipe.run, self.recipe.retrain
        device = str(next(self.base_model.parameters()).device)
        return clean_checkpoint(self.fresh_model, self.trainer_collator, self.arm_rows({}), t,
                                self.folder.clean_checkpoint(self.stage_fingerprint('checkpoint')), r.seed, device, self.progress)

    # ------------------------------------------------------------------ data and influence inputs (the modality's)

    @property
    def synthetic(self) -> bool:
        return self.modality.synthetic()

    @cached_property
    def documents(self):
        return self.modality.documents()

    @cached_property
    def dataset(self):
        return self.modality.dataset()

    @cached_property
    def tracked(self) -> List[str]:
        return self.modality.tracked()

    @cached_property
    def measurement(self):
        return self.modality.measurement()

    @property
    def trainer_collator(self):
        """What the HF Trainer collates rows with."""
        return self.modality.trainer_collator()

    def influence_kwargs(self, measurement=None) -> dict:
        """Extra arguments for kronfluence (task, collate_fn, pad_token_id)."""
        return self.modality.influence_kwargs(measurement)

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        """The training rows of one arm: the clean corpus with some documents replaced."""
        return self.modality.arm_rows(replacements)

    def observe(self, model, name: str) -> dict:
        """What one model does on one evaluation set, item by item."""
        return self.modality.observe(model, name)

    def observed_sets(self) -> List[str]:
        return self.modality.observed_sets()

    # ------------------------------------------------------------------ fingerprints

    def stage_fingerprint(self, stage: str) -> str:
        """The cache fingerprint of a stage (or of the corpus, checkpoint or control cache key), derived from its row
        of the stage table: the fingerprints of what it needs, the values of the settings it declares and its
        pipeline-computed inputs."""
        from .stages import fingerprint_key

        return fingerprint(fingerprint_key(self, stage))

    def stage_input(self, name: str):
        """A fingerprint input the recipe alone does not pin down (see stages.INPUT_SETTINGS)."""
        return {"weights": lambda: self.weights_fp, "user_checkpoint": lambda: self.user_checkpoint_fp,
                "corpus_content": lambda: self.corpus_content_fp, "tracked": lambda: self.tracked}[name]()

    @cached_property
    def corpus_content_fp(self) -> Optional[str]:
        """A hash of the corpus file's (or folder's) bytes: a copy, a move or a fresh download of the same data reuses
        the run folder, and an edited file never does. None for a hub dataset name."""
        from .fingerprints import files_fingerprint

        p = Path(self.recipe.run.corpus)
        return files_fingerprint(p) if p.exists() else None

    @cached_property
    def weights_fp(self) -> str:
        """A hash of the recipe model's weights, so a model folder overwritten in place never reuses a stale
        clean checkpoint or control."""
        from .fingerprints import state_fingerprint

        return state_fingerprint(self.base_model)

    @cached_property
    def user_checkpoint_fp(self) -> Optional[str]:
        """A hash of the files of the user's own checkpoint (retrain.checkpoint), if any."""
        from .fingerprints import files_fingerprint

        c = self.recipe.retrain.checkpoint
        return files_fingerprint(Path(c)) if c else None

    def _record_path(self, stage: str) -> Path:
        return self.folder.stage_record(stage)

    def is_current(self, stage: str) -> bool:
        p = self._record_path(stage)
        if not p.is_file():
            return False
        try:
            return read_json(p).get("fingerprint") == self.stage_fingerprint(stage) and all(o.exists() for o in self.outputs(stage))
        except (ValueError, OSError):
            return False

    def outputs(self, stage: str) -> List[Path]:
        """The files whose presence (beside a matching record) makes a stage current."""
        from .stages import BY_NAME

        return BY_NAME[stage].outputs(self)

    def _stage(self, stage: str, fn: Callable[[], None]) -> None:
        if self.is_current(stage) and not self.force:
            self.skipped.append(stage)
            logger.info("stage %s: cached, skipped", stage)
            return
        t0 = time.perf_counter()
        if runs_here(stage):
            fn()
        barrier()  # the other ranks read what rank 0 wrote
        self.timings[stage] = time.perf_counter() - t0
        if is_main():
            write_json(self._record_path(stage), {"fingerprint": self.stage_fingerprint(stage),
                                                  "seconds": round(self.timings[stage], 3),
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        barrier()

    # ------------------------------------------------------------------ validation before anything is written

    def validate(self, upto: str = "evaluate") -> None:
        """Checks everything that can be checked before writing (run_checks.validate)."""
        from .run_checks import validate

        validate(self, upto)

    def sweep_temporaries(self) -> None:
        """Removes the temporary files a killed run left behind (they never took a real output's name)."""
        import shutil

        for tmp in list(self.dir.rglob(".*.tmp")) if self.dir.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def write_config(self) -> None:
        if is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            self.sweep_temporaries()
            write_yaml(self.folder.config, self.recipe.to_dict())
        barrier()

    # ------------------------------------------------------------------ stages

    def synthesize(self) -> Optional[Path]:
        if not self.synthetic:
            return None
        self._stage("synthesize", self.modality.synthesize)
        return self.folder.corpus

    @property
    def uses_factors(self) -> bool:
        """False with influence.preconditioner=optimizer: v needs no kronfluence factors."""
        return self.recipe.influence.preconditioner == "factors"

    @property
    def factors_dir(self) -> Path:
        return inf.factors_dir(self.dir, self.recipe.influence.strategy)

    @property
    def damping(self) -> Optional[float]:
        """The damping handed to kronfluence (None: its per-module heuristic); influence.damping_scale applies on top."""
        return self.recipe.influence.damping

    @property
    def prediction_divisor(self) -> int:
        """predicted Δf = −ΔJ / divisor (engine.prediction_divisor)."""
        from .engine import prediction_divisor

        return prediction_divisor(self.recipe.influence, len(self.dataset))

    def fit(self) -> Optional[Path]:
        from . import engine

        if self.synthetic:
            self.synthesize()
        if not self.uses_factors:
            return None
        self._stage("fit", lambda: engine.fit_factors(self.model, self.dataset, self.tracked, self.dir,
                                                      self.recipe.influence, seed=self.recipe.run.seed,
                                                      **self.influence_kwargs()))
        return self.factors_dir

    def measure(self) -> Dict[str, torch.Tensor]:
        from .measure_stage import measure_into_run

        fdir = self.fit()

        self._stage("measure", lambda: measure_into_run(self, fdir))
        return self.load_ihvp()

    def optimizer_stats(self):
        """(mean squared gradients per tracked module, clip factor, tokens per batch) saved by the measure stage."""
        from safetensors import safe_open

        path = self.folder.optimizer_stats
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        return read_tensors(path), float(meta["clip"]), float(meta["tokens"])

    def load_ihvp(self) -> Dict[str, torch.Tensor]:
        return read_tensors(self.folder.ihvp)

    def score(self) -> torch.Tensor:
        from . import engine

        self.measure()

        def run():
            kw = self.influence_kwargs(self.measurement)  # the modality's task, collator or pad id
            pad = kw.pop("pad_token_id", None)
            scores = engine.document_scores(self.model, self.dataset, self.measurement, self.load_ihvp(), self.tracked,
                                            self.recipe.influence, root=self.dir, pad_token_id=pad,
                                            progress=self.progress, **kw)
            if is_main():
                write_tensors(self.folder.scores, {"scores": scores})

        self._stage("score", run)
        return read_tensors(self.folder.scores)["scores"]

    def select(self) -> dict:
        from . import engine

        scores = self.score()
        self._stage("select", lambda: write_json(self.folder.selection, engine.choose_documents(
            scores, self.recipe.select, getattr(self.modality, "first_step", None))))
        return read_json(self.folder.selection)

    def edit(self) -> List[dict]:
        selection = self.select()

        self._stage("edit", lambda: self.modality.edit_into(self.dir, self.recipe.edit, selection["indices"]))
        return [json.loads(line) for line in self.folder.edits.read_text(encoding="utf-8").splitlines()]

    def baseline_edits(self, arm: str, indices: List[int], editor: Optional[str] = None, matched: bool = False,
                       counts_from: Optional[List[int]] = None, **overrides) -> Path:
        """baselines/<arm>/: the selected documents edited by the arm's editor (baseline_edits.baseline_edits)."""
        from .baseline_edits import baseline_edits

        return baseline_edits(self, arm, indices, editor, matched, counts_from, **overrides)

    @property
    def seeds(self) -> List[int]:
        """The retraining seeds: every arm, control included, is retrained once per seed."""
        return list(self.recipe.retrain.seeds) or [self.recipe.run.seed]

    def retrain(self) -> Dict[str, dict]:
        from .retrain_stage import retrain_every_arm

        t = self.recipe.retrain
        # The infused edit runs only when an arm needs it: infused itself, or random (matched to its token counts).
        # A baselines-only run (control, insertion, simplex_pgd) needs just the selection.
        if {"infused", "random"} & {arm_parts(a)[0] for a in t.arms}:  # `infused+onion` needs it too
            self.edit()
        else:
            self.select()
        self._stage("retrain", lambda: retrain_every_arm(self))
        return read_json(self.folder.retrain_summary)

    def evaluate(self) -> dict:
        self.retrain()
        self._stage("evaluate", lambda: self.modality.evaluate(self))
        return read_json(self.folder.results)

    def run(self, upto: str = "evaluate"):
        self.validate(upto)
        self.write_config()
        return getattr(self, upto)()

    def timing_summary(self) -> str:
        lines = [f"{'stage':<12}{'seconds':>10}"]
        for s in STAGES:
            if s in self.timings:
                lines.append(f"{s:<12}{self.timings[s]:>10.1f}")
            elif s in self.skipped:
                lines.append(f"{s:<12}{'cached':>10}")
        return "\n".join(lines)


def build_pipeline(recipe: Recipe, progress: bool = True, force: bool = False) -> Pipeline:
    """The pipeline of a recipe (its modality, ``run.modality``, comes from the registry in modalities.py)."""
    return Pipeline(recipe, progress=progress, force=force)
