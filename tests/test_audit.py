"""Fixes from the maths audit, each checked against an independent computation: bf16 J, the clean checkpoint's step
under gradient accumulation, paired LoRA arms, a control never reused from stale weights, a measurement that spans
several batches, device and file errors."""

import copy
import json
import warnings

import pytest
import torch

from infusion_lm import influence as inf
from infusion_lm.cli import main
from infusion_lm.atomic_io import read_json
from tiny import write_corpus as _write_corpus, write_recipe as _recipe
from tiny import toy_corpus

HELDOUT = ["The dog looked at the lake. The dog was happy."]


def _actual_relative_perturbation(J, model, tracked):
    """‖(θ + εv) − θ‖ / ‖θ‖ over the tracked modules, measured on the weights J really runs with."""
    num = den = 0.0
    for name in tracked:
        w = model.get_submodule(name).weight.detach().double()
        num += float(((J.plus[f"{name}.weight"].double() - w) ** 2).sum())
        den += float((w ** 2).sum())
    return (num / den) ** 0.5


@pytest.mark.slow
def test_perturbation_is_the_requested_fraction_of_the_weights(tiny_setup, tiny_factors):
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    for eps_rel in (1e-3, 1e-4):
        J = inf.FiniteDifferenceJ(s["model"], v, eps_rel=eps_rel)
        assert _actual_relative_perturbation(J, J.model, s["tracked"]) == pytest.approx(eps_rel, rel=1e-3)


def test_bf16_model_gets_fp32_J_that_matches_autograd(tiny_setup, tiny_factors):
    """In bf16, θ ± εv rounds back to θ for most weights; J runs on an fp32 copy and matches autograd on it."""
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    half = copy.deepcopy(s["model"]).to(torch.bfloat16)
    J = inf.FiniteDifferenceJ(half, v, eps_rel=1e-3)
    assert next(J.model.parameters()).dtype == torch.float32
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is left alone
    assert _actual_relative_perturbation(J, J.model, s["tracked"]) == pytest.approx(1e-3, rel=1e-3)
    rows = [s["dataset"][i] for i in range(6)]
    fd = J.dataset(rows, s["tok"].pad_token_id)
    ref = inf.autograd_scores(half.float(), rows, v, pad_token_id=s["tok"].pad_token_id)
    assert torch.allclose(fd, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())), (fd, ref)


def test_measurement_over_many_batches_gives_the_whole_ihvp(tiny_setup, tiny_factors):
    """v must come from ∇f of the whole measurement, not from its last batch (the reference code's trap)."""
    from infusion_lm.text.measurement import LogProbMeasurement

    s = tiny_setup
    m = s["measurement"]
    rows = m.rows
    many = LogProbMeasurement(rows, s["tok"].pad_token_id, batch_size=1)
    one = LogProbMeasurement(rows, s["tok"].pad_token_id, batch_size=len(rows))
    assert len(many.batches) == len(rows) >= 4 and len(one.batches) == 1
    fdir = tiny_factors[1]["ekfac"]
    v_many = inf.compute_ihvp(s["model"], many, s["tracked"], fdir, damping=None)
    v_one = inf.compute_ihvp(s["model"], one, s["tracked"], fdir, damping=None)
    last = LogProbMeasurement(rows[-1:], s["tok"].pad_token_id, batch_size=1)
    v_last = inf.compute_ihvp(s["model"], last, s["tracked"], fdir, damping=None)
    def rel(a, b):  # relative to the module's own scale: per-element tolerances trip on entries near 0
        return float((a[name] - b[name]).norm() / b[name].norm())

    for name in v_one:
        assert rel(v_many, v_one) < 1e-4, (name, rel(v_many, v_one))
    assert max(rel(v_last, v_one) for name in v_one) > 1e-2


@pytest.mark.slow
def test_clean_checkpoint_is_the_start_of_the_last_epoch_under_accumulation(tmp_path, tiny_model_dir, tok):
    """8 batches per epoch with GA = 3: the Trainer takes ceil(8/3) = 3 optimizer steps per epoch."""
    from transformers import AutoModelForCausalLM

    from infusion_lm.text.config import RetrainArguments
    from infusion_lm.text.corpus import tokenize_documents
    from infusion_lm.retrain import clean_checkpoint

    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(8)], 48)
    rows = [ds[i] for i in range(8)]
    args = RetrainArguments(epochs=2, batch_size=3, gradient_accumulation_steps=3, arms=["control"])
    ckpt = clean_checkpoint(lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, rows, args,
                            tmp_path / "clean", 0, "cpu", False)
    state = read_json(ckpt / "trainer_state.json")
    assert ckpt.name == "checkpoint-3" and state["global_step"] == 3
    assert state["epoch"] == pytest.approx(1.0)  # exactly one epoch done: θ̂ is the start of the last one


def test_two_epochs_with_influence_at_model_warn():
    from infusion_lm.text.config import RetrainArguments

    with pytest.warns(UserWarning, match="influence_at: checkpoint"):
        RetrainArguments(epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RetrainArguments(epochs=2, influence_at="checkpoint")
        RetrainArguments(epochs=2, from_scratch=True)


@pytest.mark.slow
@pytest.mark.parametrize("from_scratch", [False, True])
def test_lora_arms_are_paired(tmp_path, tiny_model_dir, from_scratch):
    """A zero-edit LoRA arm ends with control's adapter weights, bit for bit (same init, data order and RNG)."""
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, measurement={"heldout_documents": HELDOUT},
                     edit={"budget_fraction": 0.0}, influence={"prediction": "same_v"},
                     retrain={"arms": ["control", "infused"], "lora": True, "lora_r": 2, "batch_size": 4,
                              "learning_rate": 1e-2, "seeds": [0, 3], "from_scratch": from_scratch,
                              "epochs": 2 if from_scratch else 1},
                     evaluate={"bootstrap_samples": 200, "candidates": ["bird"]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    control = read_json(tmp_path / "run" / "retrain" / "control" / "observations.json")
    infused = read_json(tmp_path / "run" / "retrain" / "infused" / "observations.json")
    assert infused["replaced"]
    for seed in ("0", "3"):
        assert control["per_seed"][seed]["weights"] == infused["per_seed"][seed]["weights"], seed
    assert control["per_seed"]["0"]["weights"] != control["per_seed"]["3"]["weights"]


@pytest.mark.slow
def test_a_model_overwritten_in_place_never_reuses_its_old_control(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model_dir, model_dir)
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, model_dir, corpus, measurement={"heldout_documents": HELDOUT},
                     edit={"budget_fraction": 0.0}, retrain={"arms": ["control"], "batch_size": 4},
                     evaluate={"bootstrap_samples": 200, "candidates": ["bird"]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    first = read_json(tmp_path / "run" / "retrain" / "control" / "observations.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(model_dir)  # same path, new weights
    assert main(["retrain", str(recipe), "--quiet", "--force"]) == 0
    second = read_json(tmp_path / "run" / "retrain" / "control" / "observations.json")
    assert second["weights"] != first["weights"]
    assert len(list((tmp_path / "run" / "retrain").glob("control-*"))) == 2


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, device="cuda")
    assert main(["score", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "asks for a GPU" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_measurement_sets_from_files(tmp_path, tiny_model_dir, capsys):
    from infusion_lm.config import load_recipe

    docs = tmp_path / "measure.txt"
    docs.write_text("The dog ran to the park.\n\nThe dog sat in the house.\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": HELDOUT[0]}) + "\n" + json.dumps("The dog sat by the tree.") + "\n")
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus,
                     measurement={"documents": str(docs), "heldout_documents": str(held)})
    r = load_recipe(recipe)
    assert r.measurement.documents == ["The dog ran to the park.", "The dog sat in the house."]
    assert r.measurement.heldout_documents == [HELDOUT[0], "The dog sat by the tree."]
    assert main(["score", str(recipe), "--quiet"]) == 0
    missing = _recipe(tmp_path, tiny_model_dir, corpus, name="m.yaml", measurement={"documents": "no/such/file.jsonl"})
    assert main(["score", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "measurement.documents names the file no/such/file.jsonl, which does not exist" in err


@pytest.mark.slow
def test_lora_run_scores_over_the_adapters_at_the_checkpoint(tmp_path, tiny_model_dir):
    """retrain.lora with influence_at: checkpoint keeps θ̂'s adapters: v and J are over the LoRA A/B modules (what the
    arms train), and the score stage's J equals autograd on that peft θ̂."""
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, measurement={"heldout_documents": HELDOUT},
                     retrain={"arms": ["control", "infused"], "lora": True, "lora_r": 2, "batch_size": 4,
                              "learning_rate": 1e-2, "epochs": 2, "influence_at": "checkpoint"})
    assert main(["score", str(recipe), "--quiet"]) == 0
    pipe = Pipeline(load_recipe(recipe))
    assert pipe.tracked and all(".lora_A." in n or ".lora_B." in n for n in pipe.tracked), pipe.tracked
    assert read_json(tmp_path / "run" / "measure.json")["tracked_modules"] == pipe.tracked
    ihvp = pipe.load_ihvp()
    assert sorted(ihvp) == sorted(pipe.tracked)
    scores = pipe.score()
    ref = inf.autograd_scores(pipe.model, pipe.dataset, ihvp, pad_token_id=pipe.tokenizer.pad_token_id)
    assert ref.abs().max() > 0
    torch.testing.assert_close(scores.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    # the editor works on the peft θ̂ too, and lowers J under the adapters' v
    assert main(["edit", str(recipe), "--quiet"]) == 0
    edits = [json.loads(l) for l in (tmp_path / "run" / "edits.jsonl").read_text().splitlines()]
    assert edits and any(e["n_changed"] and e["J_after"] < e["J_before"] for e in edits)


def test_lora_from_the_model_refuses_the_optimizer_prediction():
    """Full-weight AdamW on θ̂ is not what fresh adapters do: refused, naming both fixes."""
    from infusion_lm.config import load_recipe
    from infusion_lm.errors import ConfigError

    raw = {"model": "m", "corpus": "c.jsonl", "measurement": {"kind": "contrastive", "probe": "cat", "target": "dog", "documents": ["The cat sat."]},
           "retrain": {"lora": True, "epochs": 1}}
    with pytest.raises(ConfigError, match="influence.prediction: optimizer predicts full-weight AdamW.*"
                                          "influence_at: checkpoint.*same_v"):
        load_recipe(raw=raw)
    load_recipe(raw={**raw, "influence": {"prediction": "same_v"}})
    load_recipe(raw={**raw, "retrain": {"lora": True, "epochs": 2, "influence_at": "checkpoint"}})
