"""The image adapter of the pipeline: the same stages, fingerprints, Trainer, CLI and output files as text, with an
image classifier, pixel edits and per-probe observations. Only what differs is overridden here."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Dict, List

import torch

from ..errors import ConfigError
from ..pipeline import STAGES, Pipeline
from ..atomic_io import read_json
from ..fingerprints import fingerprint


class ImagePipeline(Pipeline):
    # ------------------------------------------------------------------ inputs

    @cached_property
    def splits(self):
        from .data import load_image_splits

        r = self.recipe.run
        return load_image_splits(r.corpus, r.validation_size, r.seed, r.max_documents)

    def build_model(self, architecture: str):
        """A classifier for this data set; the same architecture and seed always start from the same weights."""
        from ..models import resolve_device
        from .models import build_image_model

        r, train = self.recipe.run, self.splits.train
        mean, std = train.channel_stats
        model = build_image_model(architecture, len(train.classes), train.images.shape[1], mean, std, seed=r.seed)
        dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[r.dtype]
        return model.to(device=resolve_device(r.device), dtype=dtype)

    @cached_property
    def _model_and_tokenizer(self):
        return self.build_model(self.recipe.run.model), None

    def fresh_model(self):
        return self.build_model(self.recipe.run.model)

    @property
    def synthetic(self) -> bool:
        return False

    @cached_property
    def documents(self):
        return self.splits.train

    @cached_property
    def dataset(self):
        from .data import ImageRows

        return ImageRows(self.splits.train.images, self.splits.train.labels)

    @cached_property
    def tracked(self) -> List[str]:
        from .models import tracked_image_modules

        return tracked_image_modules(self.base_model, self.recipe.influence.tracked_modules)

    @cached_property
    def measurement(self):
        from .measurement import build_probe_measurement

        return build_probe_measurement(self.recipe.measurement, self.splits.validation)

    @cached_property
    def heldout_measurement(self):
        from .measurement import build_probe_measurement

        return build_probe_measurement(self.recipe.measurement, self.splits.validation, heldout=True)

    # ------------------------------------------------------------------ modality hooks

    @property
    def trainer_collator(self):
        from .data import ImageCollator

        return ImageCollator()

    def influence_kwargs(self, measurement=None) -> dict:
        from .data import ImageCollator
        from .measurement import ImageClassificationTask

        return {"task": ImageClassificationTask(self.tracked, measurement, seed=self.recipe.run.seed),
                "collate_fn": ImageCollator()}

    def observe(self, model, name: str) -> dict:
        return (self.heldout_measurement if name == "heldout" else self.measurement).observations(model)

    def observed_sets(self) -> List[str]:
        return ["measurement"] + (["heldout"] if self.recipe.measurement.heldout_probe_indices else [])

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        train = self.splits.train
        return [replacements.get(i) or {"pixel_values": train.images[i], "labels": train.labels[i]}
                for i in range(len(train))]

    def arm_model(self):
        return self.build_model(self.recipe.retrain.model or self.recipe.run.model)

    def arm_checkpoint(self):
        """The arms resume from a clean checkpoint of their own architecture (transfer: not the one edits used)."""
        from ..retrain import clean_checkpoint

        t = self.recipe.retrain
        if t.model is None or t.model == self.recipe.run.model:
            return self.clean_checkpoint()
        device = str(next(self.base_model.parameters()).device)
        return clean_checkpoint(self.arm_model, self.trainer_collator, self.arm_rows({}), t, self.arm_checkpoint_dir(),
                                self.recipe.run.seed, device, self.progress)

    def arm_checkpoint_dir(self) -> Path:
        """Where the transfer architecture's clean run keeps its checkpoint."""
        fp = fingerprint({"checkpoint": self._fp("checkpoint"), "architecture": self.recipe.retrain.model})
        return self.folder.clean_checkpoint(fp)

    def _fp(self, stage: str) -> str:
        if stage == "corpus":
            r = self.recipe.run
            return fingerprint({"modality": "image", "corpus": r.corpus, "validation_size": r.validation_size,
                                "max_documents": r.max_documents, "model": r.model, "dtype": r.dtype, "seed": r.seed})
        return super()._fp(stage)

    # ------------------------------------------------------------------ validation

    def validate(self, upto: str = "evaluate") -> None:
        self.check_run_folder(("model", "corpus", "modality"))
        _ = self.splits, self.base_model
        if STAGES.index(upto) >= STAGES.index("fit"):
            _ = self.tracked
        if STAGES.index(upto) >= STAGES.index("measure"):
            _ = self.measurement
        if STAGES.index(upto) >= STAGES.index("retrain") and self.recipe.measurement.heldout_probe_indices:
            _ = self.heldout_measurement
        if STAGES.index(upto) >= STAGES.index("select") and self.recipe.select.k > len(self.dataset):
            raise ConfigError(f"select.k={self.recipe.select.k} exceeds the training split ({len(self.dataset)} "
                              f"images); set select.k <= {len(self.dataset)}.")

    # ------------------------------------------------------------------ edits and arms

    def _edit_into(self, out_dir: Path, args, indices: List[int], targets=None) -> None:
        from .editors import build_pixel_editor
        from .edit_outputs import image_edit_records, write_image_edit_outputs

        editor = build_pixel_editor(self.model, self.load_ihvp(), args, self.recipe.influence.fd_eps_rel)
        idx = torch.as_tensor(indices, dtype=torch.long)
        results = editor.edit_many(self.splits.train.images[idx], self.splits.train.labels[idx], progress=self.progress)
        records = image_edit_records(indices, results, len(self.dataset), args.editor, args.linf)
        r = self.recipe.run
        source = {"corpus": r.corpus, "validation_size": r.validation_size, "seed": r.seed,
                  "max_documents": r.max_documents, "n_documents": len(self.dataset)}
        write_image_edit_outputs(out_dir, indices, results, records, source)

    def _replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        from .edit_outputs import load_image_edits

        if arm == "control":
            return {}
        if arm == "infused":
            return load_image_edits(self.dir)
        if arm in ("insertion", "insertion_single"):
            m = self.measurement
            slots = indices if arm == "insertion" else indices[:1]
            return {i: {"pixel_values": m.probes[j % len(m.probes)].clone(), "labels": torch.tensor(m.target)}
                    for j, i in enumerate(slots)}
        if arm == "random":
            return load_image_edits(self._baseline_edits(arm, indices, editor="noise"))
        raise ConfigError(f"retrain arm {arm!r} has no image version.")

    # ------------------------------------------------------------------ evaluate

    def evaluate(self) -> dict:
        from .evaluation import evaluate_image_run

        self.retrain()
        self._stage("evaluate", lambda: evaluate_image_run(self))
        return read_json(self.folder.results)
