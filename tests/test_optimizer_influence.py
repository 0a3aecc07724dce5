"""The optimizer's v (influence.preconditioner: optimizer) against the exact first-order answer: the metagradient
d f(θ_T) / d w_z through the very retraining steps, on a tiny model."""

import copy

import pytest
import torch
from scipy.stats import spearmanr

from infusion_lm import influence as inf
from infusion_lm.text.config import RetrainArguments
from infusion_lm.causal_lm import CausalLMCollator, per_document_loss
from infusion_lm.text.corpus import tokenize_documents
from infusion_lm.text.measurement import contrastive_measurement
from infusion_lm.optimizer_influence import optimizer_ihvp, response_weights, unrolled_document_effects
from infusion_lm.tracked_modules import resolve_tracked_modules
from tiny import adam_epoch, tiny_model, toy_corpus, train_briefly


def test_response_weights_by_hand():
    # SGD, constant lr: a gradient is spent once, in its own step.
    assert response_weights(4, 0, 1, 0.1, "sgd", "constant", 4) == pytest.approx(0.1)
    # Two retrained epochs: twice.
    assert response_weights(4, 0, 2, 0.1, "sgd", "constant", 8) == pytest.approx(0.2)
    # Adam without momentum (β1 = 0): the same, step by step.
    assert response_weights(4, 4, 1, 0.1, "adamw_torch", "constant", 8, beta1=0.0) == pytest.approx(0.1)
    # Adam with β1 = 0.5 over the last 2 of 4 steps, no bias correction left to speak of at steps 3 and 4:
    # seen at step 3: 0.5/(1-0.5^3) + 0.25/(1-0.5^4); seen at step 4: 0.5/(1-0.5^4). Mean over the two.
    expect = (0.5 / (1 - 0.5 ** 3) + 0.25 / (1 - 0.5 ** 4) + 0.5 / (1 - 0.5 ** 4)) / 2
    assert response_weights(2, 2, 1, 1.0, "adamw_torch", "constant", 4, beta1=0.5) == pytest.approx(expect)
    # Linear decay to 0 over 4 steps (lr 1, 0.75, 0.5, 0.25), SGD, the last epoch of 2: mean(0.5, 0.25).
    assert response_weights(2, 2, 1, 1.0, "sgd", "linear", 4) == pytest.approx(0.375)


@pytest.fixture(scope="module")
def second_epoch(tok, tmp_path_factory):
    """A tiny model after one epoch of Adam (its optimizer state kept), and the second epoch's batch order."""
    torch.manual_seed(0)
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(16)], 48)
    rows = [ds[i] for i in range(16)]
    model = train_briefly(tiny_model(len(tok)), ds, tok.pad_token_id, steps=60)
    g = torch.Generator().manual_seed(0)
    order1 = torch.randperm(16, generator=g).view(4, 4).tolist()
    order2 = torch.randperm(16, generator=g).view(4, 4).tolist()
    lr = 1e-3
    state = adam_epoch(model, rows, order1, lr, tok.pad_token_id)
    measurement = contrastive_measurement(tok, ["The dog ran to the park. The dog was happy.",
                                                "The dog sat in the garden."], "dog", "cat")
    return {"model": model, "rows": rows, "ds": ds, "order": order2, "state": state, "lr": lr,
            "measurement": measurement, "tracked": resolve_tracked_modules(model),
            "root": tmp_path_factory.mktemp("opt_factors")}


@pytest.mark.slow
def test_optimizer_v_matches_the_unrolled_metagradient(second_epoch, tok):
    s = second_epoch
    exact = unrolled_document_effects(s["model"], s["rows"], s["measurement"], s["order"], s["lr"], "adamw",
                                      state=s["state"], pad_token_id=tok.pad_token_id)
    args = RetrainArguments(epochs=2, batch_size=4, learning_rate=s["lr"], max_grad_norm=0.0,
                            influence_at="checkpoint", arms=["control"])
    v, _ = optimizer_ihvp(s["model"], s["measurement"], s["tracked"], s["rows"], args, tok.pad_token_id, start_step=4)
    predicted = -inf.autograd_scores(s["model"], s["rows"], v, pad_token_id=tok.pad_token_id)
    rho = spearmanr(predicted, exact).statistic
    ratio = float((exact / predicted).median())
    # Measured: Spearman 0.83, median exact/predicted 0.83 (the embeddings and norms also train but are not tracked).
    assert rho > 0.6, rho
    assert 0.6 < ratio < 1.4, ratio  # measured 0.83; a factor-of-3 window could not catch a missing term
    # EK-FAC's v (training to convergence) ranks these documents about as well (measured 0.90), but its size,
    # −J/n, is not what these steps do: measured 150x too large here (median exact/predicted 0.0066).
    fdir = inf.fit_factors(s["model"], s["ds"], s["tracked"], s["root"], pad_token_id=tok.pad_token_id, batch_size=8)
    v_ek = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], fdir, damping=None)
    pred_ek = -inf.autograd_scores(s["model"], s["rows"], v_ek, pad_token_id=tok.pad_token_id) / len(s["rows"])
    ratio_ek = float((exact / pred_ek).median())
    print(f"optimizer: Spearman {rho:.3f}, median exact/predicted {ratio:.3g}; EK-FAC: Spearman "
          f"{spearmanr(pred_ek, exact).statistic:.3f}, median {ratio_ek:.3g}")
    assert abs(torch.log(torch.tensor(ratio))) < abs(torch.log(torch.tensor(ratio_ek))), (ratio, ratio_ek)


def test_unrolled_effects_match_a_finite_difference_of_retraining(second_epoch, tok):
    """The metagradient itself: upweighting one document by ±δ and retraining the same steps moves f by ±δ·effect."""
    s = second_epoch
    exact = unrolled_document_effects(s["model"], s["rows"], s["measurement"], s["order"], s["lr"], "adamw",
                                      state=s["state"], pad_token_id=tok.pad_token_id)
    z = int(exact.abs().argmax())
    delta = 1e-2

    def f_with_weight(wz):
        model = copy.deepcopy(s["model"])
        params = dict(model.named_parameters())
        opt = torch.optim.Adam(model.parameters(), lr=s["lr"], eps=1e-8)
        opt.load_state_dict({"state": {i: {"step": torch.tensor(4.0), "exp_avg": s["state"]["m"][n].clone(),
                                           "exp_avg_sq": s["state"]["v"][n].clone()}
                                       for i, n in enumerate(params)},
                             "param_groups": opt.state_dict()["param_groups"]})
        collate = CausalLMCollator(tok.pad_token_id)
        model.eval()
        for b in s["order"]:
            batch = collate([s["rows"][i] for i in b])
            weights = torch.tensor([1.0 + (wz if i == z else 0.0) for i in b])
            loss = (weights * per_document_loss(model, batch)).sum() / int((batch["labels"][:, 1:] != -100).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return s["measurement"].value(model)

    fd = (f_with_weight(delta) - f_with_weight(-delta)) / (2 * delta)
    assert fd == pytest.approx(float(exact[z]), rel=0.1)
