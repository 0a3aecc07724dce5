"""A third modality added from outside the library (examples/tabular_modality.py, registered at run time) runs
every stage, and the image-style comparison uses every retraining seed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture
def tabular():
    from infusion_lm.modalities import MODALITIES, register_modality
    from tabular_modality import RECIPE, TabularModality

    register_modality("tabular", TabularModality)
    yield RECIPE
    MODALITIES.pop("tabular")


@pytest.mark.slow
def test_tabular_modality_runs_every_stage_with_no_library_change(tabular, tmp_path):
    from infusion_lm import build_pipeline, load_recipe

    raw = {**tabular, "output_dir": str(tmp_path / "run"),
           "retrain": {**tabular["retrain"], "epochs": 4, "seeds": [0, 1]}, "evaluate": {"bootstrap_samples": 100}}
    pipe = build_pipeline(load_recipe(raw=raw), progress=False)
    results = pipe.run("evaluate")
    assert pipe.modality.name == "tabular" and len(pipe.dataset) == 569 - 100
    infused = results["arms"]["infused"]["heldout"]["delta_f"]
    assert infused["n_seeds"] == 2 and len(infused["per_seed"]) == 2 and results["seeds"] == [0, 1]
    assert (tmp_path / "run" / "report.html").is_file()
    # the edits stay inside the L∞ budget, in the features' [0, 1] range
    assert results["arms"]["infused"]["edits"]["linf_max"] <= 0.1 + 1e-6


def test_unregistered_and_bad_modalities_are_one_line_errors(tabular):
    from infusion_lm import load_recipe
    from infusion_lm.errors import ConfigError

    with pytest.raises(ConfigError, match="reads scikit-learn's"):
        load_recipe(raw={**tabular, "corpus": "mnist"})
    with pytest.raises(ConfigError, match="not one of image, tabular, text"):
        load_recipe(raw={**tabular, "modality": "tabulr"})


def test_image_comparison_pairs_every_seed():
    """Two seeds, two probes: Δf per seed is that seed's mean difference, and the mean is their mean."""
    from infusion_lm.vision.evaluation import compare_images

    def obs(f, p, top1):
        return {"f": f, "f_mean": sum(f) / len(f), "p_target": p, "top1_is_target": top1, "off_diagonal": [True, True]}

    arm = [obs([1.0, 3.0], [0.5, 0.6], [True, False]), obs([2.0, 2.0], [0.2, 0.1], [True, True])]
    control = [obs([0.0, 1.0], [0.4, 0.4], [False, False]), obs([1.0, 1.0], [0.3, 0.3], [False, True])]
    out = compare_images(arm, control, samples=200, confidence=0.95, seed=0)
    assert out["n_seeds"] == 2
    assert out["delta_f"]["per_seed"] == [1.5, 1.0] and out["delta_f"]["mean"] == 1.25
    assert out["top1_flips_to_target"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert out["positive_fraction"] == 0.5  # p rose for both probes in seed 0, for neither in seed 1
