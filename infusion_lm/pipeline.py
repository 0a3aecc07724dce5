"""The staged pipeline. Each stage caches its outputs in the run folder with a fingerprint of the configuration it
depends on, so a finished stage is never recomputed and changing an upstream setting invalidates everything below it.

    synthesize (corpus: synthetic) ─► fit ─► measure ─► score ─► select ─► edit ─► retrain ─► evaluate

What each stage needs, the settings it depends on and the files it writes are in the stage table
(infusion_lm/stages.py); the run folder's layout (every path it holds) is in infusion_lm/run_folder.py.
"""

from __future__ import annotations

import dataclasses
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
from .distributed import barrier, is_main, runs_here
from .errors import ConfigError, RunFolderError
from .fingerprints import fingerprint
from .run_folder import RunFolder
from .stages import STAGES, reaches

logger = logging.getLogger(__name__)

# the method's steps live in engine.py (shared with infuse()); these names stay importable from here
from .engine import SIGN_CONVENTION, check_k, documents_to_try, select_documents  # noqa: F401


class Pipeline:
    """Runs the stages of one recipe in its run folder. Everything the CLI does is a method here.

    What depends on the kind of data (models, documents, measurements, editors, observation, the report) comes from
    ``self.modality``, the :class:`~infusion_lm.modality.Modality` that ``run.modality`` names."""

    def __init__(self, recipe: Recipe, progress: bool = True, force: bool = False):
        from .modalities import modality_class

        self.recipe = recipe
        self.modality = modality_class(recipe.run.modality)(self)
        self.dir = Path(recipe.run.output_dir)
        self.folder = RunFolder(self.dir)
        self.progress = progress
        self.force = force
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

    def check_run_folder(self, keys=("model", "corpus")) -> None:
        """output_dir must be a folder, and one that no other recipe (another model or corpus) has written to."""
        r = self.recipe.run
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"output_dir {self.dir} is a file; point output_dir at a folder.")
        cfg_path = self.folder.config
        if cfg_path.is_file() and not self.force:
            import yaml

            try:
                old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                old = {}
            for key in keys:
                if key in old and old[key] != getattr(r, key):
                    raise RunFolderError(f"Run folder {self.dir} belongs to a different recipe ({key}: {old[key]!r}, "
                                         f"not {getattr(r, key)!r}); choose another output_dir or pass --force.")

    def validate(self, upto: str = "evaluate") -> None:
        """Checks everything that can be checked before writing: run folder identity, the modality's data, model and
        measurement, tracked modules, factors already on disk, and k against the corpus size."""
        self.check_run_folder(("model", "corpus") + (("modality",) if self.modality.name != "text" else ()))
        self.modality.validate(upto)
        if reaches(upto, "fit"):
            _ = self.tracked
            self._check_factor_fingerprint()
        if reaches(upto, "measure"):
            _ = self.measurement
            if not self.force and self.is_current("fit") and not (self.is_current("measure") and self.is_current("score")):
                inf.load_factors(self.factors_dir)  # corrupted files: say so now
        if reaches(upto, "select"):
            check_k(self.recipe.select.k, self.modality.corpus_size())  # now, before anything is written

    def _check_factor_fingerprint(self) -> None:
        """Factors already in the run folder must come from this very model (weights included)."""
        fp_path = self.factors_dir / "infusion_fingerprint.json"
        if self.force or not fp_path.is_file() or self.at_checkpoint:  # checkpoint factors: keyed by its fingerprint
            return
        recorded = read_json(fp_path)
        if recorded.get("tracked_modules") != self.tracked:
            return  # a different tracking choice is a legitimate config change: the fit stage refits
        current = inf.model_fingerprint(self.model, self.tracked)
        if recorded.get("model") != current:
            raise RunFolderError(f"Factors in {fp_path.parent} were fitted on a different model (fingerprint "
                                 f"{recorded.get('model')} != {current}); use a new output_dir, or pass --force to refit.")

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
        from . import engine

        i = self.recipe.influence
        fdir = self.fit()

        def run():
            pad = self.tokenizer.pad_token_id if not self.uses_factors else None
            v, extra = engine.influence_vector(
                self.model, self.measurement, self.tracked, i, factors=fdir,
                rows=None if self.uses_factors else self.arm_rows({}), retrain=self.recipe.retrain, pad_token_id=pad,
                start_step=0 if self.uses_factors else self.checkpoint_step(), progress=self.progress)
            if not self.uses_factors:
                sq, clip, tokens = extra.pop("stats")  # kept for a second measurement (the defender's view)
                write_tensors(self.folder.optimizer_stats, sq,
                              metadata={"clip": repr(clip), "tokens": repr(tokens)})
            # the factors' settings describe v only when v comes from them (the stage table declares them so)
            factors = {"strategy": i.strategy, "damping": i.damping if i.damping is not None else
                       "kronfluence per-module heuristic (0.1 x mean eigenvalue)",
                       "damping_scale": i.damping_scale} if self.uses_factors else {}
            write_tensors(self.folder.ihvp, v, metadata={"preconditioner": i.preconditioner,
                                                         **{k: str(x) for k, x in factors.items()}})
            write_json(self.folder.measure, {
                "f": self.measurement.value(self.model),
                "description": self.measurement.description,
                "ihvp_norm": inf.ihvp_norm(v),
                "tracked_norm": inf.tracked_norm(self.model, self.tracked),
                "preconditioner": i.preconditioner,
                **factors,
                "tracked_modules": self.tracked,
                "prediction_divisor": self.prediction_divisor,
                **({"optimizer": extra} if extra else {}),
            })

        self._stage("measure", run)
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
            kw = self.influence_kwargs(self.measurement)
            pad = kw.pop("pad_token_id", None)
            if pad is None and self.tokenizer is not None:
                pad = self.tokenizer.pad_token_id
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

        self._stage("edit", lambda: self._edit_into(self.dir, self.recipe.edit, selection["indices"]))
        return [json.loads(line) for line in self.folder.edits.read_text(encoding="utf-8").splitlines()]

    def _edit_into(self, out_dir: Path, args, indices: List[int], targets: Optional[List[int]] = None) -> None:
        """Edits the selected documents with ``args.editor`` into an edit folder (the modality's editors and files).
        ``targets``: changes per document, for a baseline matched to the infused edit."""
        self.modality.edit_into(out_dir, args, indices, targets)

    def _replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        """Which documents an arm replaces, and with what rows."""
        return self.modality.replacements(arm, indices)

    def baseline_edits(self, arm: str, indices: List[int], editor: Optional[str] = None, matched: bool = False,
                       **overrides) -> Path:
        """baselines/<arm>/: the selected documents edited by the arm's editor (``editor``, default the arm's name),
        cached by the edit stage's fingerprint. The modality says how the arm differs from the infused edit:
        ``matched`` gives each document as many changes as its infused edit made; ``overrides`` are edit settings of
        the arm's own (text's ``random_unmatched``: no perplexity limit)."""
        out_dir = self.folder.baseline(arm).root
        revision = self.modality.editor_revision(editor or arm)  # an editor's own fix redoes its cached edits
        fp = fingerprint({"edit": self.stage_fingerprint("edit"), "arm": arm, "version": 2, **({"revision": revision} if revision else {})})
        marker = self.folder.baseline(arm).fingerprint
        if is_main() and not (marker.is_file() and read_json(marker).get("fingerprint") == fp):
            args = dataclasses.replace(self.recipe.edit, editor=editor or arm, **overrides)
            targets = None
            if matched:
                counts = {r["doc_index"]: r["n_changed"] for r in self.edit()}
                targets = [counts[i] for i in indices]
            self._edit_into(out_dir, args, indices, targets)
            write_json(marker, {"fingerprint": fp})
        barrier()
        return out_dir

    @property
    def seeds(self) -> List[int]:
        """The retraining seeds: every arm, control included, is retrained once per seed."""
        return list(self.recipe.retrain.seeds) or [self.recipe.run.seed]

    def retrain(self) -> Dict[str, dict]:
        from .retrain import save_weights, train_arm, weights_fingerprint

        t = self.recipe.retrain
        # The infused edit runs only when an arm needs it: infused itself, or random (matched to its token counts).
        # A baselines-only run (control, insertion, simplex_pgd) needs just the selection.
        if {"infused", "random"} & set(t.arms):
            self.edit()
        else:
            self.select()
        out = self.folder

        def run():
            indices = read_json(self.folder.selection)["indices"]
            device = str(next(self.model.parameters()).device)
            sets = self.observed_sets()
            theta = {name: self.observe(self.model, name) for name in sets}
            summary = {"theta_hat": {name: o["f_mean"] for name, o in theta.items()},
                       **self.modality.theta_hat_summary(theta)}
            ckpt = self.arm_checkpoint()
            fp = self.stage_fingerprint("retrain")
            per_arm: Dict[str, Dict[str, dict]] = {arm: {} for arm in t.arms}
            # Seeds in the outer loop: an interrupted run has whole seeds (every arm) to compare.
            for seed in self.seeds:
                for arm in t.arms:
                    path = out.arm_seed(arm, seed)
                    if not self.force and path.is_file() and read_json(path).get("fingerprint") == fp:
                        per_arm[arm][str(seed)] = read_json(path)
                        continue  # this arm and seed finished before the run was interrupted
                    replacements = self._replacements(arm, indices)
                    shared = (out.shared_control(self.stage_fingerprint('control'), seed)
                              if arm == "control" and t.share_control and not t.lora else None)
                    if shared is not None and not self.force and (shared / "fingerprint.json").is_file():
                        from .retrain import load_checkpoint_model

                        model, trainer = load_checkpoint_model(self.arm_model(), shared), None
                    else:
                        rows = self.arm_rows(replacements)
                        model, trainer = train_arm(self.arm_model, self.trainer_collator, rows, t,
                                                   out.arm(arm) / "trainer", seed, device, self.progress, ckpt)
                        if shared is not None and is_main():
                            save_weights(model, shared)
                            write_json(shared / "fingerprint.json", {"fingerprint": self.stage_fingerprint("control"), "seed": seed})
                    record = {"fingerprint": fp, "arm": arm, "seed": seed,
                              "replaced": sorted(int(i) for i in replacements),
                              "weights": weights_fingerprint(model), "checkpoint": str(ckpt) if ckpt else None,
                              **{name: self.observe(model, name) for name in sets}}
                    if t.save_models:
                        save_weights(model, out.arm(arm) / f"model-seed{seed}")
                    if is_main():
                        write_json(path, record)
                    per_arm[arm][str(seed)] = record
                    del model, trainer
            for arm, by_seed in per_arm.items():
                first = by_seed[str(self.seeds[0])]
                # The first seed's observations stay at the top level (what a single-seed reader expects); every
                # seed's are under per_seed.
                record = {"fingerprint": fp, "arm": arm, "replaced": first["replaced"], "seeds": self.seeds,
                          "weights": first["weights"], "checkpoint": first["checkpoint"],
                          "summary": {name: sum(by_seed[str(s)][name]["f_mean"] for s in self.seeds) / len(self.seeds)
                                      for name in sets},
                          **{name: first[name] for name in sets},
                          "per_seed": {str(s): {k: by_seed[str(s)][k] for k in ("weights", *sets)} for s in self.seeds}}
                if is_main():
                    write_json(out.observations(arm), record)
                summary[arm] = record["summary"]
            if is_main():
                write_json(out.retrain_summary, summary)

        self._stage("retrain", run)
        return read_json(out.retrain_summary)

    def evaluate(self) -> dict:
        self.retrain()
        self._stage("evaluate", self.modality.evaluate)
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
