"""The image adapter: data loaders, the pixel editors' maths and constraints, and the effect after retraining,
on scikit-learn's 8×8 digits (and Fashion-MNIST's idx files when the Debian package is installed)."""

import gzip
import io
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
import torch

from infusion_lm.config import load_recipe
from infusion_lm.errors import ConfigError, MeasurementError
from infusion_lm.pipeline import build_pipeline


def digits_recipe(tmp_path, **over):
    raw = {
        "modality": "image", "model": "cnn", "corpus": "digits", "validation_size": 150,
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "measurement": {"kind": "class_logp", "probe_indices": [0], "heldout_probe_indices": [1, 2, 3],
                        "target_class": "3"},
        "influence": {"batch_size": 64},
        "select": {"k": 20},
        "edit": {"editor": "sign_pgd", "linf": 0.1, "steps": 10},
        "retrain": {"arms": ["control", "infused", "random", "insertion", "insertion_single"], "epochs": 4,
                    "influence_at": "checkpoint", "optim": "sgd", "learning_rate": 0.05, "batch_size": 16,
                    "max_grad_norm": 0},
        "evaluate": {"bootstrap_samples": 200},
    }
    for key, value in over.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section] = {**raw[section], sub: value}
        else:
            raw[section] = value
    return load_recipe(raw=raw)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    pipe = build_pipeline(digits_recipe(tmp), progress=False)
    results = pipe.run("evaluate")
    return pipe, results


# ---------------------------------------------------------------------------------------------------- maths


@pytest.fixture(scope="module")
def trained_cnn(digits_run):
    pipe, _ = digits_run
    return pipe.model, pipe.load_ihvp(), pipe.modality.splits.train


def _reference_pixel_gradients(model, v, x, y):
    """Per image, one at a time: J = ⟨∇θ L(x), v⟩ by autograd and ∇x J by double backprop (the independent reference)."""
    from infusion_lm.influence import from_layout, module_params

    params = [p for n in v for p in module_params(model, n) if p is not None]
    js, gs = [], []
    for i in range(len(x)):
        xi = x[i: i + 1].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=xi).logits, y[i: i + 1], reduction="sum")
        grads = iter(torch.autograd.grad(loss, params, create_graph=True))
        j = 0
        for n in v:
            w, b = module_params(model, n)
            dw, db = from_layout(v[n], w, b)
            j = j + (next(grads) * dw).sum() + ((next(grads) * db).sum() if b is not None else 0)
        (g,) = torch.autograd.grad(j, xi)
        js.append(float(j.detach()))
        gs.append(g[0])
    return torch.tensor(js, dtype=torch.float64), torch.stack(gs)


@pytest.fixture(scope="module")
def fp64_theta_hat(digits_run):
    from infusion_lm.retrain import load_checkpoint_model

    pipe, _ = digits_run
    model = load_checkpoint_model(pipe.fresh_model().double(), pipe.clean_checkpoint()).double().eval()
    v = {k: t.double() for k, t in pipe.load_ihvp().items()}
    return model, v, pipe.modality.splits.train.images[:4].double(), pipe.modality.splits.train.labels[:4]


@pytest.mark.slow
def test_exact_pixel_gradient_matches_per_image_double_backprop(fp64_theta_hat):
    """The batched JVP + double-backprop J and ∇x J against a per-image reference, on the trained CNN at θ̂."""
    from infusion_lm.vision.editors import ExactPixelJ

    model, v, x, y = fp64_theta_hat
    ref_j, ref_g = _reference_pixel_gradients(model, v, x, y)
    j, g = ExactPixelJ(model, v).value_and_grad(x, y)
    assert torch.allclose(j, ref_j, rtol=1e-10, atol=1e-12)
    assert float((g - ref_g).norm() / ref_g.norm()) < 1e-10


def test_finite_difference_pixel_gradient_matches_autograd(fp64_theta_hat):
    """∇x J from the ±εv central difference converges to the exact gradient (fp64, small ε)."""
    from infusion_lm.vision.editors import PixelJ

    model, v, x, y = fp64_theta_hat
    ref_j, ref_g = _reference_pixel_gradients(model, v, x, y)
    j_fd, g_fd = PixelJ(model, v, eps_rel=1e-6).value_and_grad(x, y)
    assert torch.allclose(j_fd, ref_j, rtol=1e-5, atol=1e-8 * float(ref_j.abs().max()))
    assert float((g_fd - ref_g).norm() / ref_g.norm()) < 1e-4


def test_sign_pgd_respects_the_linf_bound_and_the_clamp_and_lowers_J(trained_cnn):
    from infusion_lm.vision.config import ImageEditArguments
    from infusion_lm.vision.editors import SignPGDEditor

    model, v, train = trained_cnn
    args = ImageEditArguments(editor="sign_pgd", linf=0.05, steps=8)
    x0, y = train.images[:12], train.labels[:12]
    results = SignPGDEditor(model, v, args).edit_many(x0, y)
    for r, orig in zip(results, x0):
        assert torch.equal(r.original, orig)
        d = r.delta
        assert float(d.abs().max()) <= 0.05 + 1e-6  # the bound holds
        assert float(r.pixel_values.min()) >= 0 and float(r.pixel_values.max()) <= 1  # the clamp holds
        assert r.J_after < r.J_before
        assert r.J_trace[0] == pytest.approx(r.J_before) and r.J_trace[-1] == pytest.approx(r.J_after)
    # the bound binds: most changed pixels sit at ±linf (or at the clamp), as sign steps drive them there
    at_bound = np.mean([r.stats(0.05)["at_budget_fraction"] for r in results])
    assert at_bound > 0.3
    # digits have many pixels at exactly 0: the clamp, not the L∞ ball, must stop those going negative
    assert any(r.stats(0.05)["clamped_fraction"] > 0 for r in results)


def test_noise_editor_spends_the_same_linf_and_is_seeded(trained_cnn):
    from infusion_lm.vision.config import ImageEditArguments
    from infusion_lm.vision.editors import NoiseEditor, SignPGDEditor

    model, v, train = trained_cnn
    args = ImageEditArguments(editor="noise", linf=0.05, seed=3)
    a = NoiseEditor(model, v, args).edit_many(train.images[:5], train.labels[:5])
    b = NoiseEditor(model, v, args).edit_many(train.images[:5], train.labels[:5])
    for ra, rb in zip(a, b):
        assert torch.equal(ra.pixel_values, rb.pixel_values)
        assert float(ra.delta.abs().max()) == pytest.approx(0.05, abs=1e-6)
        assert 0 <= float(ra.pixel_values.min()) and float(ra.pixel_values.max()) <= 1
    # The paper's protocol: a budget of 1 that never binds (α 0.001 × 50 steps, no clamp). Sign-PGD and the noise
    # both reach 0.05, not 1, and neither is clamped to [0, 1].
    paper = ImageEditArguments(editor="sign_pgd", linf=1.0, steps=50, pixel_step=0.001, pixel_clamp=False)
    x = train.images[:3]
    pgd = SignPGDEditor(model, v, paper).edit_many(x, train.labels[:3])
    noise = NoiseEditor(model, v, ImageEditArguments(**{**paper.__dict__, "editor": "noise"})).edit_many(
        x, train.labels[:3])
    assert max(float(r.delta.abs().max()) for r in pgd) <= 0.05 + 1e-6
    for r in noise:
        assert float(r.delta.abs().max()) == pytest.approx(0.05, abs=1e-6)
    assert any(float(r.pixel_values.max()) > 1 or float(r.pixel_values.min()) < 0 for r in noise + pgd)


# ---------------------------------------------------------------------------------------------------- the effect


def test_infused_retrain_raises_p_target_over_control_and_beats_noise(digits_run):
    _, results = digits_run
    arms = results["arms"]
    infused, noise = arms["infused"]["measurement"], arms["random"]["measurement"]
    assert infused["delta_f"]["mean"] > 0.3  # log p(target | probe) rose against the clean retrain
    assert infused["delta_p_target"]["mean"] > 0
    assert infused["delta_f"]["mean"] > noise["delta_f"]["mean"] + 0.3
    assert not arms["infused"]["weights_equal_control"]
    # all k probe copies labelled as the target are the strongest (and most visible) baseline
    assert arms["insertion"]["measurement"]["delta_f"]["mean"] > arms["insertion_single"]["measurement"]["delta_f"]["mean"]


def test_outputs_have_the_text_pipelines_names_and_the_corpus_is_rebuilt_exactly(digits_run):
    import datasets

    from infusion_lm.vision.edit_outputs import apply_infused, load_image_edits

    pipe, results = digits_run
    for name in ("infused", "edits.jsonl", "infused_corpus", "results.json", "report.md", "report.html",
                 "scores.safetensors", "ihvp.safetensors", "selection.json"):
        assert (pipe.dir / name).exists(), name
    ds = datasets.load_from_disk(str(pipe.dir / "infused"))
    assert {"doc_index", "label", "pixel_values", "original_pixel_values", "linf", "J_before", "J_after"} <= set(ds.column_names)
    rebuilt = apply_infused(pipe.modality.splits.train.images, pipe.dir)
    edits = load_image_edits(pipe.dir)
    assert set(edits) == set(pipe.select()["indices"])
    for i, row in edits.items():
        assert torch.allclose(rebuilt[i], row["pixel_values"], atol=1e-6)
    untouched = [i for i in range(len(rebuilt)) if i not in edits]
    assert torch.equal(rebuilt[untouched], pipe.modality.splits.train.images[untouched])  # the original is never modified
    md = (pipe.dir / "report.md").read_text()
    assert "| infused |" in md and "edited_images.png" in md
    assert "data:image/png;base64" in (pipe.dir / "report.html").read_text()
    assert results["arms"]["infused"]["edits"]["linf_max"] <= 0.1 + 1e-6


@pytest.mark.slow
def test_cross_architecture_transfer_path(tmp_path, digits_run):
    """Edits built with the CNN, arms retrained with the tiny ResNet from its own clean checkpoint."""
    pipe0, _ = digits_run
    recipe = digits_recipe(tmp_path, retrain__model="resnet_tiny", retrain__arms=["control", "infused"])
    pipe = build_pipeline(recipe, progress=False)
    # θ̂ (and so everything up to the edits) does not depend on the retraining architecture
    assert pipe.stage_fingerprint("edit") == pipe0.stage_fingerprint("edit")
    results = pipe.run("evaluate")
    assert results["architecture"] == "cnn" and results["retrain_architecture"] == "resnet_tiny"
    assert pipe.arm_checkpoint() != pipe.clean_checkpoint()
    assert "infused" in results["arms"] and results["arms"]["infused"]["measurement"]["delta_f"]["n_items"] == 1


# ---------------------------------------------------------------------------------------------------- data


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_loader_and_seeded_split(tmp_path):
    from infusion_lm.vision.data import load_image_splits

    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    a = load_image_splits(f"fashion_mnist:{tmp_path}", 10, seed=1)
    b = load_image_splits(f"fashion_mnist:{tmp_path}", 10, seed=1)
    c = load_image_splits(f"fashion_mnist:{tmp_path}", 10, seed=2)
    assert a.train.images.shape == (40, 1, 28, 28) and a.validation.images.shape == (10, 1, 28, 28)
    assert float(a.train.images.max()) <= 1 and a.test.images.shape[0] == 10
    assert torch.equal(a.validation.images, b.validation.images)
    assert not torch.equal(a.validation.images, c.validation.images)


def test_fashion_mnist_debian_package_when_installed():
    from pathlib import Path

    from infusion_lm.vision.data import FASHION_MNIST_DIR, load_image_splits

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    s = load_image_splits("fashion_mnist", 5000, seed=0)
    assert s.train.images.shape == (55000, 1, 28, 28) and s.test.images.shape == (10000, 1, 28, 28)


def test_cifar10_python_batches_and_image_folder_zip_agree(tmp_path, monkeypatch):
    from PIL import Image

    from infusion_lm.vision.data import CIFAR10_CLASSES, load_image_splits

    monkeypatch.setenv("INFUSION_LM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = rng.integers(0, 256, (6, 4, 3 * 32 * 32)).astype(np.uint8)
    labels = rng.integers(0, 10, (6, 4))
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        (batches / name).write_bytes(pickle.dumps({b"data": data[i], b"labels": labels[i].tolist()}))
    py = load_image_splits(f"cifar10:{batches}", 5, seed=0)
    assert py.train.images.shape == (15, 3, 32, 32) and py.test.images.shape == (4, 3, 32, 32)

    zpath = tmp_path / "cifar.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, rows in (("train", range(5)), ("test", [5])):
            for b in rows:
                for k in range(4):
                    img = data[b, k].reshape(3, 32, 32).transpose(1, 2, 0)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")  # lossless, so both sources must agree exactly
                    zf.writestr(f"{split}/{CIFAR10_CLASSES[labels[b, k]]}/{b:02d}{k}.png", buf.getvalue())
    folder = load_image_splits(f"cifar10:{zpath}", 5, seed=0)
    assert folder.train.classes == CIFAR10_CLASSES
    # the same images, labelled the same, whatever the order the folder listed them in
    key = lambda d: sorted(zip(d.images.flatten(1).sum(1).tolist(), d.labels.tolist()))  # noqa: E731
    full = lambda s: type(s.train)(torch.cat([s.train.images, s.validation.images]),  # noqa: E731
                                   torch.cat([s.train.labels, s.validation.labels]), s.train.classes)
    assert key(full(py)) == key(full(folder))
    assert (tmp_path / "cache" / "datasets").is_dir()  # decoded once, then cached


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("over, message", [
    ({"edit__editor": "swap"}, "image recipes use sign_pgd or noise"),
    ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "needs an image model"),
    ({"measurement": {"kind": "contrastive", "documents": ["A dog."], "probe": "dog", "target": "cat"}},
     "is a setting of text recipes"),
    ({"measurement": {"kind": "contrastive", "probe_indices": [0], "target_class": "3"}}, "is for text"),
    ({"retrain__influence_at": "model"}, "influence_at: checkpoint"),
    ({"edit__linf": -0.1}, "edit.linf must be in (0, 1]"),
    ({"measurement__heldout_probe_indices": [0]}, "held-out images must be new"),
])
def test_bad_image_recipes_fail_with_the_fix(tmp_path, over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        digits_recipe(tmp_path, **over)


def test_unknown_target_class_and_out_of_range_probe(tmp_path):
    pipe = build_pipeline(digits_recipe(tmp_path, measurement__target_class="seven"), progress=False)
    with pytest.raises(MeasurementError, match="not a class of this data set"):
        pipe.validate("measure")
    pipe = build_pipeline(digits_recipe(tmp_path, measurement__probe_indices=[999]), progress=False)
    with pytest.raises(MeasurementError, match="outside the validation split"):
        pipe.validate("measure")


def test_cli_dry_run_of_an_image_recipe_counts_image_passes_and_writes_nothing(tmp_path, capsys):
    import yaml

    from infusion_lm.cli import main

    recipe = digits_recipe(tmp_path)
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "image-passes" in out and "edit k=20 with sign_pgd" in out and "\nretrain" in out
    assert not (tmp_path / "run").exists()
    # a run folder written by this image recipe refuses a recipe of another modality or model
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": "resnet_tiny", "corpus": "digits"}))
    assert main(["fit", str(path), "--quiet"]) == 2
    assert "belongs to a different recipe" in capsys.readouterr().err


def test_models_normalise_inside_and_torchvision_models_load_by_name():
    from infusion_lm.vision.models import build_image_model, tracked_image_modules

    x = torch.rand(2, 1, 8, 8)
    a = build_image_model("cnn", 10, 1, [0.3], [0.2], seed=1)
    b = build_image_model("cnn", 10, 1, [0.3], [0.2], seed=1)
    assert torch.equal(a(pixel_values=x).logits, b(pixel_values=x).logits)  # the seed fixes the initial weights
    # normalisation is part of the model: the backbone sees (x − mean) / std
    assert torch.allclose(a(pixel_values=x).logits, a.backbone((x - 0.3) / 0.2))
    out = a(pixel_values=x, labels=torch.tensor([1, 2]))
    assert out.loss is not None and out.logits.shape == (2, 10)
    tv = build_image_model("torchvision:resnet18", 10, 1, [0.3], [0.2])
    assert tv(pixel_values=x).logits.shape == (2, 10)
    assert any(n.endswith("fc") for n in tracked_image_modules(tv))
    with pytest.raises(ConfigError, match="no classification model"):
        build_image_model("torchvision:not_a_model", 10, 1, [0.3], [0.2])
    with pytest.raises(ConfigError, match="Unknown image model"):
        build_image_model("vgg_tiny", 10, 1, [0.3], [0.2])
