"""The image modality: an image classifier, image splits as pixel rows, probe-image measurements, pixel edits and
per-probe observations. The stages, fingerprints, Trainer, CLI and output files are the pipeline's, as for text."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError
from ..fingerprints import fingerprint
from ..run_context import RunContext
from ..stages import reaches
from .config import ImageEditArguments, ImageMeasurementArguments, ImageRetrainArguments, ImageRunArguments


class ImageModality:
    """Images and a classifier (see :class:`~infusion_lm.modality.Modality` for what each method owes)."""

    name = "image"
    # the training split depends on these (the data set's own files are fixed by its name)
    corpus_settings = ("run.modality", "run.corpus", "run.validation_size", "run.max_documents", "run.model",
                       "run.dtype", "run.seed")

    measurement_kinds = ("class_logp", "class_contrastive")
    select_rankings = ("j",)
    editors = ("sign_pgd", "noise")
    arms = ("control", "infused", "random", "insertion", "insertion_single")

    # the class each recipe section is read into (infusion_lm/vision/config.py); evaluate is the core's
    sections = {"run": ImageRunArguments, "measurement": ImageMeasurementArguments, "edit": ImageEditArguments,
                "retrain": ImageRetrainArguments}

    def __init__(self, ctx: RunContext):
        self.ctx = ctx  # what it may read of the run (infusion_lm/run_context.py); never the pipeline itself
        self.recipe = ctx.recipe

    @staticmethod
    def check_recipe(recipe) -> None:
        """Image recipes use an image model, class measurements, pixel editors, and influence at the checkpoint."""
        from .models import ARCHITECTURES

        if recipe.run.model not in ARCHITECTURES and not recipe.run.model.startswith("torchvision:"):
            raise ConfigError(f"modality: image needs an image model (model: resnet_tiny, cnn or "
                              f"torchvision:<name>), not {recipe.run.model!r}.")
        if recipe.retrain.lora:
            raise ConfigError("retrain.lora is for text; remove it from this image recipe.")
        i = recipe.influence
        if i.preconditioner != "factors" or i.damping_scale != 1.0:
            raise ConfigError("image recipes score with kronfluence's own factors: remove influence.preconditioner "
                              "and influence.damping_scale (the optimizer's v and a scaled damping are for text).")
        if recipe.retrain.influence_at != "checkpoint":
            raise ConfigError("An image recipe trains its model from scratch, so influence must be computed on "
                              "the trained checkpoint: set retrain.influence_at: checkpoint (and epochs >= 2).")

    # ---------------------------------------------------------------- models and data

    @cached_property
    def splits(self):
        from .data import load_image_splits

        r = self.recipe.run
        return load_image_splits(r.corpus, r.validation_size, r.seed, r.max_documents)

    def build_model(self, architecture: str):
        """A classifier for this data set; the same architecture and seed always start from the same weights."""
        from ..devices import resolve_device
        from .models import build_image_model

        r, train = self.recipe.run, self.splits.train
        mean, std = train.channel_stats
        model = build_image_model(architecture, len(train.classes), train.images.shape[1], mean, std, seed=r.seed)
        dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[r.dtype]
        return model.to(device=resolve_device(r.device), dtype=dtype)

    def load_model(self):
        return self.build_model(self.recipe.run.model), None

    def fresh_model(self):
        return self.build_model(self.recipe.run.model)

    def arm_model(self):
        return self.build_model(self.recipe.retrain.model or self.recipe.run.model)

    def arm_checkpoint(self):
        """The arms resume from a clean checkpoint of their own architecture (transfer: not the one edits used)."""
        from ..retrain import clean_checkpoint

        p, t = self.ctx, self.recipe.retrain
        if t.model is None or t.model == self.recipe.run.model:
            return p.clean_checkpoint()
        device = str(next(p.base_model.parameters()).device)
        return clean_checkpoint(self.arm_model, self.trainer_collator(), self.arm_rows({}), t,
                                self.arm_checkpoint_dir(), self.recipe.run.seed, device, p.progress)

    def arm_checkpoint_dir(self) -> Path:
        """Where the transfer architecture's clean run keeps its checkpoint."""
        fp = fingerprint({"checkpoint": self.ctx.stage_fingerprint("checkpoint"), "architecture": self.recipe.retrain.model})
        return self.ctx.folder.clean_checkpoint(fp)

    def synthetic(self) -> bool:
        return False

    def synthesize(self) -> None:  # pragma: no cover - never called: no synthetic image corpus
        raise ConfigError("image recipes have no synthetic corpus.")

    def documents(self):
        return self.splits.train

    def dataset(self):
        from .data import ImageRows

        return ImageRows(self.splits.train.images, self.splits.train.labels)

    def corpus_size(self) -> int:
        return len(self.ctx.dataset)

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        train = self.splits.train
        return [replacements.get(i) or {"pixel_values": train.images[i], "labels": train.labels[i]}
                for i in range(len(train))]

    def trainer_collator(self):
        from .data import ImageCollator

        return ImageCollator()

    # ---------------------------------------------------------------- influence

    def tracked(self) -> List[str]:
        from .models import tracked_image_modules

        return tracked_image_modules(self.ctx.base_model, self.recipe.influence.tracked_modules)

    def measurement(self):
        from .measurement import build_probe_measurement

        return build_probe_measurement(self.recipe.measurement, self.splits.validation)

    @cached_property
    def heldout_measurement(self):
        from .measurement import build_probe_measurement

        return build_probe_measurement(self.recipe.measurement, self.splits.validation, heldout=True)

    def influence_kwargs(self, measurement=None) -> dict:
        from .data import ImageCollator
        from .measurement import ImageClassificationTask

        return {"task": ImageClassificationTask(self.ctx.tracked, measurement, seed=self.recipe.run.seed),
                "collate_fn": ImageCollator()}

    # ---------------------------------------------------------------- edits and arms

    def edit_into(self, out_dir: Path, args, indices: List[int], targets: Optional[List[int]] = None) -> None:
        from .edit_outputs import image_edit_records, write_image_edit_outputs
        from .editors import build_pixel_editor

        p = self.ctx
        editor = build_pixel_editor(p.model, p.load_ihvp(), args, self.recipe.influence.fd_eps_rel)
        idx = torch.as_tensor(indices, dtype=torch.long)
        results = editor.edit_many(self.splits.train.images[idx], self.splits.train.labels[idx], progress=p.progress)
        records = image_edit_records(indices, results, len(p.dataset), args.editor, args.linf)
        r = self.recipe.run
        source = {"corpus": r.corpus, "validation_size": r.validation_size, "seed": r.seed,
                  "max_documents": r.max_documents, "n_documents": len(p.dataset),
                  "pixel_clamp": args.pixel_clamp}
        write_image_edit_outputs(out_dir, indices, results, records, source)

    def editor_revision(self, editor: str) -> int:
        return 0

    def replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        from .edit_outputs import load_image_edits

        if arm == "control":
            return {}
        if arm == "infused":
            return load_image_edits(self.ctx.dir)
        if arm in ("insertion", "insertion_single"):
            m = self.ctx.measurement
            slots = indices if arm == "insertion" else indices[:1]
            return {i: {"pixel_values": m.probes[j % len(m.probes)].clone(), "labels": torch.tensor(m.target)}
                    for j, i in enumerate(slots)}
        if arm == "random":
            return load_image_edits(self.ctx.baseline_edits(arm, indices, editor="noise"))
        raise ConfigError(f"retrain arm {arm!r} has no image version.")

    # ---------------------------------------------------------------- observation and evaluation

    @staticmethod
    def dry_run_costs(pipe) -> Dict:
        """The dry run's cost estimate: a function of the pipeline, like the core's stages."""
        from .dry_run import image_costs

        return image_costs(pipe)

    def theta_hat_summary(self, theta: Dict[str, dict]) -> Dict:
        return {}  # Δf and the top-1 flips say it all for a classifier

    def observed_sets(self) -> List[str]:
        return ["measurement"] + (["heldout"] if self.recipe.measurement.heldout_probe_indices else [])

    def observe(self, model, name: str) -> dict:
        return (self.heldout_measurement if name == "heldout" else self.ctx.measurement).observations(model)

    def validate(self, upto: str) -> None:
        _ = self.splits, self.ctx.base_model
        if reaches(upto, "retrain") and self.recipe.measurement.heldout_probe_indices:
            _ = self.heldout_measurement

    @staticmethod
    def evaluate(pipe) -> None:
        """The evaluate stage: a function of the pipeline (it reads every arm's observations), like the core's."""
        from .evaluation import evaluate_image_run

        evaluate_image_run(pipe)
