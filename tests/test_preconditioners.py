"""The pipeline with influence.preconditioner=optimizer and with a scaled damping: one v (ihvp.safetensors) feeds the
scores, the edits and the prediction, and each is checked against autograd on that v."""

import json

import pytest
import torch

from infusion_lm import influence as inf
from infusion_lm.cli import main
from infusion_lm.atomic_io import read_json, read_tensors
from tiny import write_corpus as _write_corpus, write_recipe as _recipe
from tiny import toy_corpus

HELDOUT = ["The dog looked at the lake. The dog was happy."]


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.slow
@pytest.mark.parametrize("over", [{"preconditioner": "optimizer"}, {"damping_scale": 100.0}])
def test_scores_edits_and_prediction_come_from_the_saved_v(tmp_path, tiny_model_dir, tok, over):
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, influence=over, measurement={"heldout_documents": HELDOUT},
                     edit={"budget_fraction": 0.15, "steps": 4, "n_candidates": 8},
                     retrain={"arms": ["control", "infused", "random"], "batch_size": 4, "learning_rate": 1e-3},
                     evaluate={"bootstrap_samples": 200, "candidates": ["bird", "fish"]})
    assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
    run = tmp_path / "run"
    measure = read_json(run / "measure.json")
    optimizer = over.get("preconditioner") == "optimizer"
    assert (run / "factors").exists() != optimizer  # the optimizer's v needs no kronfluence factors
    assert measure["prediction_divisor"] == (1 if optimizer else 12)
    v = read_tensors(run / "ihvp.safetensors")
    model = _model(tiny_model_dir)
    from infusion_lm.text.corpus import tokenize_documents

    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(12)], 48)
    ref = inf.autograd_scores(model, ds, v, pad_token_id=tok.pad_token_id)
    scores = read_tensors(run / "scores.safetensors")["scores"].double()
    assert torch.allclose(scores, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())), (scores, ref)
    records = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    # The editing v's own prediction, −ΔJ/divisor, with J of the original and the edited documents recomputed by
    # autograd on the saved v (not read back from the records it is checked against).
    rows = []
    for r in records:  # plain text: every token of the original is trained, so its labels are its ids
        rows += [{"input_ids": r["original_input_ids"], "labels": r["original_input_ids"]},
                 {"input_ids": r["input_ids"], "labels": r["labels"]}]
    J = inf.autograd_scores(model, rows, v, pad_token_id=tok.pad_token_id)
    for i, r in enumerate(records):
        expect = -(float(J[2 * i + 1]) - float(J[2 * i])) / measure["prediction_divisor"]
        assert r["predicted_delta_f_same_v"] == pytest.approx(expect, rel=2e-2, abs=2e-2 * float(J.abs().max())
                                                              / measure["prediction_divisor"])
    res = read_json(run / "results.json")
    assert "defender_influence_auroc" in res["arms"]["infused"]["detectors"]


def test_damping_scale_moves_v_toward_the_gradient(tiny_setup, tiny_factors):
    """λ → ∞ makes (G + λI)⁻¹∇f point along ∇f, module by module (λ is per module): the smallest per-module cosine to
    ∇f rises with the damping scale."""
    s = tiny_setup
    grads = inf.measurement_gradients(s["model"], s["measurement"], s["tracked"])
    fa, factors = inf.load_factors(tiny_factors[1]["ekfac"], s["model"], s["tracked"])

    def cos(v):
        return min(float(torch.nn.functional.cosine_similarity(v[n].flatten(), grads[n].float().flatten(), dim=0))
                   for n in grads)

    c = [cos(inf.precondition(grads, fa, factors, None, damping_scale=k)) for k in (1.0, 100.0, 1e6)]
    assert c[0] < c[1] < c[2] and c[2] > 0.999, c
    # Scale 1 is kronfluence's own heuristic: the same v as passing no scale at all.
    plain = inf.precondition(grads, fa, factors, None)
    same = inf.precondition(grads, fa, factors, None, damping_scale=1.0)
    assert all(torch.equal(plain[n], same[n]) for n in plain)
