"""The staged pipeline. Each stage caches its outputs in the run folder with a fingerprint of the configuration it
depends on, so a finished stage is never recomputed and changing an upstream setting invalidates everything below it.

    synthesize (corpus: synthetic) ─► fit ─► measure ─► score ─► select ─► edit ─► retrain ─► evaluate

The run folder's layout (every path it holds) is in infusion_lm/run_folder.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import influence as inf
from .config import Recipe
from .corpus import load_documents, tokenize_documents
from .distributed import barrier, is_main, runs_here
from .errors import ConfigError, RunFolderError
from .edit_outputs import edit_records, write_edit_outputs
from .losses import perplexities
from .measurement import build_measurement, measurement_words
from .models import load_model, resolve_device
from .run_folder import RunFolder
from .atomic_io import read_json, read_tensors, write_json, write_tensors, write_yaml
from .fingerprints import fingerprint
from .tracked_modules import resolve_tracked_modules

logger = logging.getLogger(__name__)

SIGN_CONVENTION = ("score(z) = J(z) = <grad_theta L(z), v> with v = (G + lambda I)^-1 grad_theta f; upweighting z "
                   "changes f by about -J(z), so the selected documents are those with the most negative J.")

# evaluate.* settings that change what retraining observes (the rest only change the statistics)
OBSERVATION_KEYS = ("candidates", "n_samples", "max_new_tokens", "temperature")

STAGES = ["synthesize", "fit", "measure", "score", "select", "edit", "retrain", "evaluate"]


class Pipeline:
    """Runs the stages of one recipe in its run folder. Everything the CLI does is a method here."""

    def __init__(self, recipe: Recipe, progress: bool = True, force: bool = False):
        self.recipe = recipe
        self.dir = Path(recipe.run.output_dir)
        self.folder = RunFolder(self.dir)
        self.progress = progress
        self.force = force
        self.timings: Dict[str, float] = {}
        self.skipped: List[str] = []

    # ------------------------------------------------------------------ lazily loaded inputs

    @cached_property
    def _model_and_tokenizer(self):
        r = self.recipe.run
        torch.manual_seed(r.seed)
        return load_model(r.model, dtype=r.dtype, device=resolve_device(r.device), trust_remote_code=r.trust_remote_code)

    def fresh_model(self):
        """A new copy of the recipe's model (retraining starts every arm from one)."""
        r = self.recipe.run
        device = str(next(self.base_model.parameters()).device)
        return load_model(r.model, dtype=r.dtype, device=device, trust_remote_code=r.trust_remote_code)[0]

    @property
    def base_model(self):
        """The recipe's model: it writes the synthetic corpus and starts the clean fine-tune."""
        return self._model_and_tokenizer[0]

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
        """A fresh model of the architecture the arms retrain (the image adapter can retrain another: transfer)."""
        return self.fresh_model()

    def arm_checkpoint(self):
        """The clean checkpoint the arms resume from."""
        return self.clean_checkpoint()

    def _checkpoint_step(self) -> int:
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
                                self.folder.clean_checkpoint(self._fp('checkpoint')), r.seed, device, self.progress)

    @property
    def tokenizer(self):
        return self._model_and_tokenizer[1]

    # ------------------------------------------------------------------ modality hooks (the image adapter overrides)

    @property
    def trainer_collator(self):
        """What the HF Trainer collates rows with: a tokenizer stands for the causal-LM collator."""
        return self.tokenizer

    def influence_kwargs(self, measurement=None) -> dict:
        """Extra arguments for kronfluence (task, collate_fn); empty means the causal-LM defaults."""
        return {"pad_token_id": self.tokenizer.pad_token_id}

    def observe(self, model, name: str) -> dict:
        """What one model does on one evaluation set (measurement, heldout or heldout_corpus), item by item."""
        from .observations import observe

        r = self.recipe.run
        return observe(model, self.tokenizer, self.recipe.measurement, self.recipe.evaluate, name,
                       max_length=r.max_length, seed=r.seed, heldout_corpus_documents=self.heldout_corpus_documents)

    def observed_sets(self) -> List[str]:
        return ["measurement", "heldout"] + (["heldout_corpus"] if self.recipe.measurement.heldout_corpus else [])

    @cached_property
    def heldout_corpus_documents(self) -> List[str]:
        """measurement.heldout_corpus's documents, less any that are also training or measurement documents."""
        m = self.recipe.measurement
        if not m.heldout_corpus:
            return []
        train = {str(d.get("text", "")).strip() for d in self.documents if isinstance(d, dict)}
        train |= {t.strip() for t in m.documents}  # v was built from these: never held out
        docs = [d["text"] for d in load_documents(m.heldout_corpus, "text") if "text" in d]
        return [d for d in docs if d.strip() not in train]

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        """The training rows of one arm: the clean corpus with some documents replaced."""
        from .retrain import arm_rows

        return arm_rows(self.dataset, replacements)

    @property
    def synthetic(self) -> bool:
        return self.recipe.run.corpus == "synthetic"

    @property
    def corpus_path(self) -> Path:
        return self.folder.corpus if self.synthetic else Path(self.recipe.run.corpus)

    @cached_property
    def documents(self):
        r = self.recipe.run
        if self.synthetic:
            self.synthesize()
            return load_documents(str(self.corpus_path), "text")
        docs = load_documents(r.corpus, r.text_field, r.messages_field, r.separator)
        return docs[: r.max_documents] if r.max_documents else docs

    @cached_property
    def dataset(self):
        r = self.recipe.run
        return tokenize_documents(self.tokenizer, self.documents, r.max_length, r.add_eos, r.long_documents)

    @cached_property
    def tracked(self) -> List[str]:
        i = self.recipe.influence
        model = self.base_model
        if self.lora_influence:  # θ̂ is a peft model: names from the same adapter layout, without training θ̂ first
            from .retrain import trainable

            model = trainable(self.fresh_model(), self.recipe.retrain)
        return resolve_tracked_modules(model, i.tracked_modules, i.layers, i.module_types)

    @cached_property
    def measurement(self):
        return build_measurement(self.recipe.measurement, self.tokenizer, self.recipe.run.max_length)

    # ------------------------------------------------------------------ fingerprints

    def _fp(self, stage: str) -> str:
        r, i = self.recipe.run, self.recipe.influence
        if stage == "checkpoint":
            t = asdict(self.recipe.retrain)
            # none of these change θ̂'s clean run (retrain.model is the *arms'* architecture, with its own checkpoint;
            # batch_size is the global batch, so the world size does not change the run either)
            for key in ("arms", "insertion_documents", "save_models", "influence_at", "share_control", "model", "seeds"):
                t.pop(key)
            return fingerprint({"fit_inputs": self._fp("corpus"), "retrain": t, "weights": self.weights_fp,
                                "user_checkpoint": self.user_checkpoint_fp})
        if stage == "control":  # the control arm depends on its checkpoint and training settings only
            return fingerprint({"checkpoint": self._fp("checkpoint"), "arm_model": self.recipe.retrain.model})
        if stage == "corpus":
            corpus = {"corpus": r.corpus, "text_field": r.text_field, "messages_field": r.messages_field,
                      "separator": r.separator, "max_length": r.max_length, "add_eos": r.add_eos}
            if r.max_documents:
                corpus["max_documents"] = r.max_documents
            if self.synthetic:
                corpus["synthesize"] = self._fp("synthesize")
            else:
                corpus["content"] = self.corpus_content_fp
            return fingerprint({"model": r.model, "dtype": r.dtype, "seed": r.seed, "corpus": corpus})
        if stage == "synthesize":
            return fingerprint({"model": r.model, "seed": r.seed, "dtype": r.dtype, **asdict(self.recipe.synthesize)})
        if stage == "fit":
            theta = self._fp("checkpoint") if self.at_checkpoint else "model"
            return fingerprint({"corpus": self._fp("corpus"), "theta": theta,
                                "strategy": i.strategy, "tracked": self.tracked,
                                "use_empirical_fisher": i.use_empirical_fisher,
                                "covariance_max_examples": i.covariance_max_examples})
        if stage == "measure":
            m = asdict(self.recipe.measurement)
            m.pop("heldout_prompts"); m.pop("heldout_documents")
            m.pop("heldout_corpus"); m.pop("heldout_corpus_max_positions")
            key = {"fit": self._fp("fit"), "measurement": m, "damping": i.damping}
            if i.damping_scale != 1.0:
                key["damping_scale"] = i.damping_scale
            if not self.uses_factors:  # v models the retraining itself
                key = {"corpus": self._fp("corpus"), "measurement": m, "preconditioner": i.preconditioner,
                       "tracked": self.tracked, "theta": self._fp("checkpoint") if self.at_checkpoint else "model",
                       "retrain": {k: getattr(self.recipe.retrain, k) for k in (
                           "learning_rate", "optim", "lr_scheduler_type", "batch_size", "epochs", "from_scratch",
                           "max_grad_norm")}}
            return fingerprint(key)
        if stage == "score":
            if self.uses_factors and i.damping_scale == 1.0:  # kronfluence's own scores
                return fingerprint({"measure": self._fp("measure")})
            return fingerprint({"measure": self._fp("measure"), "j_method": i.j_method,
                                **({"fd_eps_rel": i.fd_eps_rel} if i.j_method == "finite_difference" else {})})
        if stage == "select":
            return fingerprint({"score": self._fp("score"), "k": self.recipe.select.k})
        if stage == "edit":
            key = {"select": self._fp("select"), "edit": asdict(self.recipe.edit), "fd_eps_rel": i.fd_eps_rel,
                   "prediction": i.prediction}
            if i.prediction == "optimizer":  # predicted Δf models the retraining: its settings and starting step
                key["retraining"] = self._fp("checkpoint")
            return fingerprint(key)
        if stage == "retrain":
            return fingerprint({"edit": self._fp("edit"), "retrain": asdict(self.recipe.retrain),
                                "measurement": asdict(self.recipe.measurement),
                                "observed": {k: getattr(self.recipe.evaluate, k) for k in OBSERVATION_KEYS}})
        if stage == "evaluate":
            return fingerprint({"retrain": self._fp("retrain"), "evaluate": asdict(self.recipe.evaluate)})
        raise KeyError(stage)

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
            return read_json(p).get("fingerprint") == self._fp(stage) and all(o.exists() for o in self.outputs(stage))
        except (ValueError, OSError):
            return False

    def outputs(self, stage: str) -> List[Path]:
        f = self.folder
        return {
            "synthesize": [f.corpus],
            "fit": [self.factors_dir / "infusion_fingerprint.json"],
            "measure": [f.ihvp, f.measure] + ([] if self.uses_factors else [f.optimizer_stats]),
            "score": [f.scores],
            "select": [f.selection],
            "edit": [f.infused, f.edits, f.infused_corpus],
            "retrain": [f.retrain_summary],
            "evaluate": [f.results, f.report_md, f.report_html],
        }[stage]

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
            write_json(self._record_path(stage), {"fingerprint": self._fp(stage),
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
        """Checks everything that can be checked before writing: run folder identity, corpus, k, measurement."""
        self.check_run_folder()
        if not self.synthetic:
            _ = self.documents
        _ = self.base_model
        if not self.synthetic:
            _ = self.dataset  # tokenisation errors (long documents, nothing trained) before anything is written
        if STAGES.index(upto) >= STAGES.index("fit"):
            _ = self.tracked
            self._check_factor_fingerprint()
        if STAGES.index(upto) >= STAGES.index("measure"):
            _ = self.measurement
            if not self.force and self.is_current("fit") and not (self.is_current("measure") and self.is_current("score")):
                inf.load_factors(self.factors_dir)  # corrupted files: say so now
        if STAGES.index(upto) >= STAGES.index("retrain"):
            self._check_heldout()
        if STAGES.index(upto) >= STAGES.index("select"):
            n = self.recipe.synthesize.n_docs if self.synthetic else len(self.documents)
            if self.recipe.select.k > n:
                raise ConfigError(f"select.k={self.recipe.select.k} exceeds the corpus size ({n} documents); "
                                  f"set select.k <= {n}.")

    def _check_heldout(self) -> None:
        """Evaluation needs a held-out measurement set that shares nothing with the one v was built from."""
        from .errors import MeasurementError

        m = self.recipe.measurement
        if m.kind == "callable":
            used, held = m.documents, m.heldout_documents
        else:
            used, held = (m.documents, m.heldout_documents) if m.kind == "contrastive" else (m.prompts, m.heldout_prompts)
        if not held:
            field_name = "heldout_prompts" if m.kind == "completion" else "heldout_documents"
            raise MeasurementError(f"Evaluation needs a held-out measurement set: add measurement.{field_name} "
                                   f"(prompts or documents not used to build v).")
        overlap = sorted(set(s.strip() for s in used) & set(s.strip() for s in held))
        if overlap:
            raise ConfigError(f"{len(overlap)} held-out measurement item(s) also appear in the measurement set "
                              f"(e.g. {overlap[0][:60]!r}); held-out items must be new.")
        _ = build_measurement(m, self.tokenizer, self.recipe.run.max_length, heldout=True)
        if m.heldout_corpus:
            from .measurement import probe_occurrences

            if m.kind != "contrastive":
                raise ConfigError("measurement.heldout_corpus collects probe positions, so it needs kind: contrastive.")
            docs = self.heldout_corpus_documents
            if not docs:
                raise MeasurementError(f"Every document of measurement.heldout_corpus {m.heldout_corpus} is also in the "
                                       f"training corpus; point it at documents outside it.")
            probe_occurrences(self.tokenizer, docs, m.probe)  # no probe occurrence: a clear error now

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

        def run():
            from .synthesize import synthesize_chats, synthesize_stories, write_jsonl

            s = self.recipe.synthesize
            if s.mode == "chat":
                docs = synthesize_chats(self.base_model, self.tokenizer, s.n_docs, s.max_new_tokens, s.temperature,
                                        s.top_p, s.batch_size, self.recipe.run.seed, self.progress)
            else:
                docs = synthesize_stories(self.base_model, self.tokenizer, s.n_docs, s.max_new_tokens, s.temperature,
                                          s.top_p, s.batch_size, s.characters, self.recipe.run.seed, self.progress)
            write_jsonl(self.folder.corpus, docs)

        self._stage("synthesize", run)
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
        """predicted Δf = −ΔJ / divisor: n for the factors' v (one document of n), 1 for the optimizer's (the batch
        weighting is inside v)."""
        return len(self.dataset) if self.uses_factors else 1

    def fit(self) -> Optional[Path]:
        i = self.recipe.influence
        if self.synthetic:
            self.synthesize()
        if not self.uses_factors:
            return None

        def run():
            inf.fit_factors(self.model, self.dataset, self.tracked, self.dir, **self.influence_kwargs(),
                            strategy=i.strategy, use_empirical_fisher=i.use_empirical_fisher, batch_size=i.batch_size,
                            covariance_max_examples=i.covariance_max_examples, seed=self.recipe.run.seed)

        self._stage("fit", run)
        return self.factors_dir

    def measure(self) -> Dict[str, torch.Tensor]:
        i = self.recipe.influence
        fdir = self.fit()

        def run():
            extra = {}
            if self.uses_factors:
                v = inf.compute_ihvp(self.model, self.measurement, self.tracked, fdir, i.damping, i.damping_scale)
            else:
                from .optimizer_influence import optimizer_ihvp

                start = self._checkpoint_step()
                v, extra = optimizer_ihvp(self.model, self.measurement, self.tracked, self.arm_rows({}),
                                          self.recipe.retrain, self.tokenizer.pad_token_id, start, self.progress)
                sq, clip, tokens = extra.pop("stats")  # kept for a second measurement (the defender's view)
                write_tensors(self.folder.optimizer_stats, sq,
                              metadata={"clip": repr(clip), "tokens": repr(tokens)})
            write_tensors(self.folder.ihvp, v, metadata={
                "preconditioner": i.preconditioner, "strategy": i.strategy,
                "damping": "heuristic" if i.damping is None else repr(i.damping)})
            write_json(self.folder.measure, {
                "f": self.measurement.value(self.model),
                "description": self.measurement.description,
                "ihvp_norm": inf.ihvp_norm(v),
                "tracked_norm": inf.tracked_norm(self.model, self.tracked),
                "preconditioner": i.preconditioner,
                "damping": i.damping if i.damping is not None else "kronfluence per-module heuristic (0.1 x mean eigenvalue)",
                "damping_scale": i.damping_scale,
                "strategy": i.strategy,
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
        i = self.recipe.influence
        self.measure()

        def run():
            if self.uses_factors and i.damping_scale == 1.0:
                scores = inf.kronfluence_scores(self.model, self.dataset, self.measurement, self.tracked, self.dir,
                                                **self.influence_kwargs(self.measurement), strategy=i.strategy,
                                                damping=i.damping, batch_size=i.batch_size)
            else:  # kronfluence cannot express this v (a per-module scaled λ, or the optimizer's): J from ihvp.safetensors
                from .forward_mode_j import document_j

                # fd_eps_rel only matters to (and is only fingerprinted for) the finite difference
                eps = {"eps_rel": i.fd_eps_rel} if i.j_method == "finite_difference" else {}
                J = document_j(self.model, self.load_ihvp(), i.j_method, **eps)
                scores = J.dataset(self.dataset, self.tokenizer.pad_token_id, batch_size=i.batch_size,
                                   progress=self.progress).float()
            if is_main():
                write_tensors(self.folder.scores, {"scores": scores})

        self._stage("score", run)
        return read_tensors(self.folder.scores)["scores"]

    def select(self) -> dict:
        scores = self.score()
        k = self.recipe.select.k
        if k > len(scores):
            raise ConfigError(f"select.k={k} exceeds the corpus size ({len(scores)} documents); set select.k <= {len(scores)}.")

        def run():
            write_json(self.folder.selection, select_documents(scores, k))

        self._stage("select", run)
        return read_json(self.folder.selection)

    def edit(self) -> List[dict]:
        selection = self.select()

        self._stage("edit", lambda: self._edit_into(self.dir, self.recipe.edit, selection["indices"]))
        return [json.loads(line) for line in self.folder.edits.read_text(encoding="utf-8").splitlines()]

    def _edit_into(self, out_dir: Path, args, indices: List[int], targets: Optional[List[int]] = None) -> None:
        """Edits the selected documents with ``args.editor`` and writes infused/, edits.jsonl, infused_corpus/.
        ``targets``: changed tokens per document, for a baseline matched to the infused edit."""
        from .editors import build_editor

        editor = build_editor(self.model, self.tokenizer, self.load_ihvp(), args, self.recipe.influence.fd_eps_rel,
                              target_words=measurement_words(self.recipe.measurement))
        rows = [self.dataset[i] for i in indices]
        results = editor.edit_many(rows, progress=self.progress, targets=targets)
        pad = self.tokenizer.pad_token_id
        after = [{"input_ids": r.input_ids, "labels": r.labels} for r in results]
        records = edit_records(self.tokenizer, indices, results, self.prediction_divisor, args.editor,
                               perplexities(self.model, rows, pad), perplexities(self.model, after, pad),
                               self._predicted_response(rows, after))
        write_edit_outputs(out_dir, self.tokenizer, self.dataset, records, self.documents)

    def _predicted_response(self, before: List[dict], after: List[dict]) -> Optional[List[float]]:
        """Predicted Δf of each edit (``influence.prediction: optimizer``): the first-order response of the retraining
        that runs (``optimizer_influence.response_j``). None (the editing v's own −ΔJ/n is used) for `same_v` or
        another optimizer. The response's J is built once per pipeline: one gradient pass over the corpus."""
        from .optimizer_influence import predicted_response, response_j

        i, t = self.recipe.influence, self.recipe.retrain
        if i.prediction != "optimizer":
            return None
        if not (t.optim.startswith("adam") or t.optim.startswith("sgd")):
            logger.warning("influence.prediction=optimizer models AdamW and SGD, not retrain.optim=%r: predicted Δf "
                           "uses the editing v instead (influence.prediction: same_v).", t.optim)
            return None
        pad = self.tokenizer.pad_token_id
        if "_prediction_J" not in self.__dict__:
            self.__dict__["_prediction_J"] = response_j(self.model, self.measurement, self.arm_rows({}), t, pad,
                                                        self._checkpoint_step(), progress=self.progress)
        return predicted_response(self.__dict__["_prediction_J"], before, after, pad)

    def _replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        """Which documents an arm replaces, and with what (input_ids/labels rows)."""
        from .edit_outputs import load_infused
        from .retrain import insertion_rows, insertion_texts

        if arm == "control":
            return {}
        if arm == "infused":
            return {r["doc_index"]: r for r in load_infused(self.dir)}
        if arm == "insertion":
            r = self.recipe.run
            return insertion_rows(self.tokenizer, insertion_texts(self.recipe, self.recipe.retrain), indices,
                                  r.max_length, r.add_eos)
        if arm == "regeneration":
            return self._regenerated(indices)
        out_dir = self._baseline_edits(arm, indices)
        return {r["doc_index"]: r for r in load_infused(out_dir)}

    def _regenerated(self, indices: List[int]) -> Dict[int, dict]:
        """The regeneration arm: the selected conversations re-answered by the model at θ̂ (seeded, so every seed and
        a resumed run get the same rows); written to baselines/regeneration/documents.jsonl for inspection."""
        from .corpus import tokenize_document
        from .synthesize import regenerate_answers, write_jsonl

        docs = [self.documents[i] for i in indices]
        if not all(isinstance(d, dict) and d.get("messages") for d in docs):
            raise ConfigError("retrain.arms has 'regeneration', which re-answers chat conversations; the corpus has "
                              "plain-text documents. Remove the arm or use a chat corpus (messages_field).")
        if "_regeneration" not in self.__dict__:
            r, s = self.recipe.run, self.recipe.synthesize
            new = regenerate_answers(self.model, self.tokenizer, [d["messages"] for d in docs], s.max_new_tokens,
                                     s.temperature, s.top_p, seed=r.seed)
            rows = {}
            for i, doc in zip(indices, new):
                if doc is None:  # an empty answer would leave nothing to train on: the original stays
                    continue
                row = tokenize_document(self.tokenizer, doc, r.max_length, r.add_eos)
                row.pop("truncated")
                rows[i] = {"doc_index": i, **row}
            if is_main():
                out = self.folder.baseline("regeneration").root / "documents.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(out, [{"doc_index": i, **doc} for i, doc in zip(indices, new) if doc is not None])
            self.__dict__["_regeneration"] = rows
        return self.__dict__["_regeneration"]

    def _baseline_edits(self, arm: str, indices: List[int], editor: Optional[str] = None) -> Path:
        """baselines/<arm>/: the selected documents edited by the arm's editor, cached by the edit stage's
        fingerprint. ``random`` is matched to the infused edit (its token count per document, under the same
        constraints); ``random_unmatched`` spends the whole budget with no perplexity limit."""
        out_dir = self.folder.baseline(arm).root
        from .editors import EDITORS

        revision = getattr(EDITORS.get(editor or arm), "revision", 0)  # an editor's own fix redoes its cached edits
        fp = fingerprint({"edit": self._fp("edit"), "arm": arm, "version": 2, **({"revision": revision} if revision else {})})
        marker = self.folder.baseline(arm).fingerprint
        if is_main() and not (marker.is_file() and read_json(marker).get("fingerprint") == fp):
            args, targets = dataclasses.replace(self.recipe.edit, editor=editor or arm), None
            if editor is None and arm == "random":  # a modality may name its own baseline editor (images: noise)
                counts = {r["doc_index"]: r["n_changed"] for r in self.edit()}
                targets = [counts[i] for i in indices]
            elif editor is None and arm == "random_unmatched":
                args = dataclasses.replace(self.recipe.edit, editor="random", max_perplexity_ratio=None)
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
            summary = {"theta_hat": {name: o["f_mean"] for name, o in theta.items()}}
            from .observations import target_rates

            rates = {name: r for name, r in ((n, target_rates(o)) for n, o in theta.items()) if r}
            if rates:
                summary["theta_hat_target_rate"] = rates
                if not any(v for r in rates.values() for v in r.values()):
                    logger.warning("No answer at θ̂ names %r (greedy or sampled): the rate starts at 0. Infusion "
                                   "amplifies a behaviour the model already shows, so expect little change; pick a "
                                   "target the model sometimes names.", self.recipe.measurement.completions[0])
            ckpt = self.arm_checkpoint()
            fp = self._fp("retrain")
            per_arm: Dict[str, Dict[str, dict]] = {arm: {} for arm in t.arms}
            # Seeds in the outer loop: an interrupted run has whole seeds (every arm) to compare.
            for seed in self.seeds:
                for arm in t.arms:
                    path = out.arm_seed(arm, seed)
                    if not self.force and path.is_file() and read_json(path).get("fingerprint") == fp:
                        per_arm[arm][str(seed)] = read_json(path)
                        continue  # this arm and seed finished before the run was interrupted
                    replacements = self._replacements(arm, indices)
                    shared = (out.shared_control(self._fp('control'), seed)
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
                            write_json(shared / "fingerprint.json", {"fingerprint": self._fp("control"), "seed": seed})
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
        from .evaluation import evaluate_run

        self.retrain()

        def run():
            evaluate_run(self)

        self._stage("evaluate", run)
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


def select_documents(scores: torch.Tensor, k: int) -> dict:
    """The k documents with the most negative J(z): upweighting them already raises f."""
    if k > scores.numel():
        raise ConfigError(f"select.k={k} exceeds the number of scored documents ({scores.numel()}).")
    order = torch.argsort(scores.double(), stable=True)[:k]
    return {"indices": [int(i) for i in order], "scores": [float(scores[i]) for i in order], "k": k,
            "sign_convention": SIGN_CONVENTION}
