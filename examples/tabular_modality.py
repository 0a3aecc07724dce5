"""A third modality, added without touching the library: tabular classification on scikit-learn's bundled data sets.

    python examples/tabular_modality.py          # breast cancer, an MLP, feature edits; about 1 min on 2 CPU cores

A modality is a class with the methods of ``infusion_lm.modality.Modality``; ``register_modality`` makes recipes with
``modality: tabular`` run with it, through the same stages, caching, retraining and report as text and images. This
one reuses the image modality's classification machinery: each row of features, min-max scaled to [0, 1], is a
1 × 1 × d "image"; the model is a small MLP; the editor perturbs features within an L∞ budget (sign PGD).
"""

from __future__ import annotations

import os
import sys
from functools import cached_property

import torch
from torch import nn

from infusion_lm.errors import ConfigError
from infusion_lm.vision.data import ImageData, ImageSplits
from infusion_lm.vision.modality import ImageModality
from infusion_lm.vision.models import ImageClassifier

DATASETS = ("breast_cancer", "wine", "iris")


class TabularModality(ImageModality):
    """Feature vectors and an MLP classifier, as 1 × 1 × d images (see the module docstring)."""

    name = "tabular"

    @staticmethod
    def check_recipe(recipe) -> None:
        if recipe.run.corpus not in DATASETS:
            raise ConfigError(f"modality: tabular reads scikit-learn's {', '.join(DATASETS)}, not "
                              f"{recipe.run.corpus!r}.")
        if recipe.run.model != "mlp":
            raise ConfigError(f"modality: tabular trains model: mlp, not {recipe.run.model!r}.")
        if recipe.retrain.influence_at != "checkpoint":
            raise ConfigError("modality: tabular trains from scratch: set retrain.influence_at: checkpoint.")

    @cached_property
    def splits(self) -> ImageSplits:
        import sklearn.datasets

        r = self.recipe.run
        d = getattr(sklearn.datasets, f"load_{r.corpus}")()
        x = torch.tensor(d.data, dtype=torch.float32)
        x = (x - x.min(0).values) / (x.max(0).values - x.min(0).values).clamp_min(1e-12)
        data = ImageData(x[:, None, None, :], torch.tensor(d.target, dtype=torch.long), [str(c) for c in d.target_names])
        n_val = r.validation_size if r.validation_size is not None else len(data) // 5
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(r.seed))
        return ImageSplits(data.subset(perm[n_val:].sort().values), data.subset(perm[:n_val].sort().values), None,
                           r.corpus)

    def build_model(self, architecture: str):
        train = self.splits.train
        mean, std = train.channel_stats
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.run.seed)
            mlp = nn.Sequential(nn.Flatten(), nn.Linear(train.images.shape[-1], 32), nn.ReLU(),
                                nn.Linear(32, len(train.classes)))
        return ImageClassifier(mlp, mean, std, "mlp")


RECIPE = {
    "modality": "tabular", "model": "mlp", "corpus": "breast_cancer", "validation_size": 100, "seed": 0,
    "output_dir": "runs/tabular_breast_cancer",
    "measurement": {"kind": "class_logp", "probe_indices": [0, 1, 2], "heldout_probe_indices": [3, 4, 5, 6, 7],
                    "target_class": "benign"},
    "influence": {"batch_size": 64},
    "select": {"k": 10},
    "edit": {"editor": "sign_pgd", "linf": 0.1, "steps": 10},
    "retrain": {"arms": ["control", "infused", "random"], "epochs": 6, "influence_at": "checkpoint", "optim": "sgd",
                "learning_rate": 0.1, "batch_size": 16, "max_grad_norm": 0, "seeds": [0, 1, 2]},
    "evaluate": {"bootstrap_samples": 500},
}


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from infusion_lm import build_pipeline, load_recipe
    from infusion_lm.evaluation import headline
    from infusion_lm.modalities import register_modality

    register_modality("tabular", TabularModality)
    raw = {**RECIPE, **({"output_dir": sys.argv[1]} if len(sys.argv) > 1 else {})}
    pipe = build_pipeline(load_recipe(raw=raw), progress=False)
    print(headline(pipe.run("evaluate")))


if __name__ == "__main__":
    main()
