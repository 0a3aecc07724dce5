"""The per-document optimizer response along the retraining that runs (both Adam moments, each batch's clip factor,
each document's own step) against the exact metagradient d f(θ_T) / d w_z through the same steps, on a tiny model;
and the data order it reads against the one the Trainer draws."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from infusion_lm import influence as inf
from infusion_lm.optimizer_influence import optimizer_ihvp, unrolled_document_effects
from infusion_lm.optimizer_trajectory import checkpoint_moments, trajectory_response
from infusion_lm.retrain import batch_order, clean_checkpoint, train_arm
from infusion_lm.text.config import RetrainArguments
from infusion_lm.text.corpus import tokenize_documents
from infusion_lm.text.measurement import contrastive_measurement
from tiny import adam_epoch, tiny_model, toy_corpus, train_briefly

N, BATCH, LR = 16, 4, 1e-4  # the learning rate of the TinyStories evals
# The first-order model holds every later gradient at θ̂ (no curvature along the trajectory), so its error grows with
# the distance the run travels. Measured median relative error per document, fresh / continued Adam, 4 steps:
# lr 1e-5: 0.9% / 0.4%; lr 1e-4: 4.1% / 3.4%; lr 1e-3: 40% / 11% (a fresh Adam moves every weight by ~lr a step).


def every_weight(model):
    """Every module that owns a weight (embeddings and norms too): the unrolled reference trains them all."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and not (tied and m is model.get_output_embeddings())]


@pytest.fixture(scope="module")
def setup(tok):
    torch.manual_seed(0)
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(N)], 48)
    rows = [ds[i] for i in range(N)]
    model = train_briefly(tiny_model(len(tok)), ds, tok.pad_token_id, steps=60)
    g = torch.Generator().manual_seed(0)
    order1 = torch.randperm(N, generator=g).view(N // BATCH, BATCH).tolist()
    order2 = torch.randperm(N, generator=g).view(N // BATCH, BATCH).tolist()
    continued = copy.deepcopy(model)  # θ̂ after one epoch of Adam, its moments kept
    state = adam_epoch(continued, rows, order1, LR, tok.pad_token_id)
    measurement = contrastive_measurement(tok, ["The dog ran to the park. The dog was happy.",
                                                "The dog sat in the garden."], "dog", "cat")
    return {"fresh": model, "continued": continued, "state": state, "rows": rows, "order": order2,
            "measurement": measurement}


def median_relative_error(pred, exact):
    pred, exact = np.asarray(pred, float), np.asarray(exact, float)
    return float(np.median(np.abs(pred - exact) / np.abs(exact)))


@pytest.mark.slow
@pytest.mark.parametrize("start,clip", [("fresh", 0.0), ("continued", 0.0), ("fresh", 0.3), ("continued", 0.3)])
def test_per_document_response_matches_the_unrolled_metagradient(setup, tok, start, clip):
    s = setup
    model = s[start]
    state = s["state"] if start == "continued" else None
    pad = tok.pad_token_id
    exact = unrolled_document_effects(model, s["rows"], s["measurement"], s["order"], LR, "adamw", state=state,
                                      pad_token_id=pad, max_grad_norm=clip)
    args = RetrainArguments(epochs=1, batch_size=BATCH, learning_rate=LR, max_grad_norm=clip,
                            lr_scheduler_type="constant", influence_at="model", arms=["control"])
    tracked = every_weight(model)
    resp = trajectory_response(model, s["measurement"], s["rows"], s["order"], args, tracked, pad,
                               start_step=0, state=state)
    if clip:
        assert min(resp.info["clip_factors"]) < 0.9, resp.info["clip_factors"]  # the clip is active
    pred = resp.effects(s["rows"], pad)
    err = median_relative_error(pred, exact)
    # the stationary response (one v for every step, the second moment held fixed) on the same documents
    old_v, _ = optimizer_ihvp(model, s["measurement"], tracked, s["rows"], args, pad, start_step=0)
    old = -inf.autograd_scores(model, s["rows"], old_v, pad_token_id=pad)
    err_old = median_relative_error(old, exact)
    print(f"{start}, clip {clip}: median relative error {err:.3f} (stationary response {err_old:.3f})")
    assert err <= 0.20, (err, err_old)
    assert err < err_old, (err, err_old)


def test_response_without_the_second_moment_fails_on_a_fresh_optimizer(setup, tok, monkeypatch):
    """Mutation: with β2's term dropped (B = 0) the fresh optimizer's first step no longer cancels, and the error
    leaves the tolerance. β2 → 1 keeps v̂ = g̃² at step 1 but freezes it after; the check is on the same steps."""
    s = setup
    pad = tok.pad_token_id
    exact = unrolled_document_effects(s["fresh"], s["rows"], s["measurement"], s["order"], LR, "adamw",
                                      pad_token_id=pad)
    args = RetrainArguments(epochs=1, batch_size=BATCH, learning_rate=LR, max_grad_norm=0.0,
                            lr_scheduler_type="constant", influence_at="model", arms=["control"])
    import infusion_lm.optimizer_trajectory as ot

    calls = {"n": 0}

    def no_second_moment(m, sq, D, lr, bc1, bc2):  # B's term, per step
        calls["n"] += 1
        return torch.zeros_like(sq)

    monkeypatch.setattr(ot, "second_moment_term", no_second_moment)
    effects = trajectory_response(s["fresh"], s["measurement"], s["rows"], s["order"], args,
                                  every_weight(s["fresh"]), pad).effects(s["rows"], pad)
    assert calls["n"] > 0
    assert median_relative_error(effects, exact) > 0.20


@pytest.mark.parametrize("optim,clip", [("adamw_torch", 0.3), ("sgd", 0.3), ("adamw_torch", 0.0)])
def test_the_response_streamed_in_groups_of_modules_is_the_whole_one(setup, tok, optim, clip):
    """The response is never held as steps × parameters: it streams the batches once per group of modules whose
    state fits ``memory_bytes``. One module per group (memory_bytes=1, a pass per module) gives the same effects as
    one group, and predicting a few edits (their steps' segments only) gives what the corpus-wide effects give for
    the same rows."""
    s = setup
    pad = tok.pad_token_id
    args = RetrainArguments(epochs=1, batch_size=BATCH, learning_rate=LR, max_grad_norm=clip, optim=optim,
                            lr_scheduler_type="constant", influence_at="model", arms=["control"])
    tracked = every_weight(s["continued"])
    run = lambda **kw: trajectory_response(s["continued"], s["measurement"], s["rows"], s["order"], args, tracked,
                                           pad, state=s["state"], **kw)
    whole, grouped = run(), run(memory_bytes=1)
    one = whole.effects(s["rows"], pad)
    # the JVPs run in float32, module by module against all at once: rounding at ~1e-7 of the largest effect
    assert float((grouped.effects(s["rows"], pad) - one).abs().max()) <= 1e-5 * float(one.abs().max())
    assert whole.passes == 1 and grouped.passes == len(tracked)
    # the steps' w_s are kept (on disk): documents of steps already streamed cost no further pass over the data
    # two documents of the last batch replaced by two others: streamed for their step alone (every earlier step
    # still rolls Adam's moments forward), against the response that streamed every step
    late = s["order"][-1][:2]
    before, after = [s["rows"][i] for i in late], [s["rows"][i] for i in s["order"][0][:2]]
    pred = run().predicted(late, before, after, pad)
    expect = whole.predicted(late, before, after, pad)  # every step already streamed: read back
    assert whole.passes == 1
    assert pred == pytest.approx(expect, rel=1e-5)
    assert expect[0] == pytest.approx(float(-(whole.j(late[:1], after[:1], pad)[0] + one[late[0]])), rel=1e-5)


@pytest.mark.slow
def test_batch_order_is_the_one_the_trainer_draws(tok, tmp_path):
    """The batches a real Trainer run draws, from the model and resumed from the clean checkpoint, recorded by the
    dataset itself, against ``batch_order``."""
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(10)], 32)

    class Recording(list):
        seen: list = []

        def __getitem__(self, i):
            Recording.seen.append(int(i))
            return list.__getitem__(self, i)

    rows = Recording(ds[i] for i in range(len(ds)))
    args = RetrainArguments(epochs=2, batch_size=4, learning_rate=1e-3, influence_at="checkpoint", arms=["control"])
    load = lambda: tiny_model(len(tok))
    Recording.seen = []
    train_arm(load, tok, rows, args, tmp_path / "a", 3, "cpu", False, None)
    expect = batch_order(len(rows), args, 3, [0, 1])
    assert [len(b) for b in expect] == [4, 4, 2, 4, 4, 2]
    assert Recording.seen == sum(expect, [])
    assert sorted(sum(expect[:3], [])) == list(range(10)) and expect[:3] != expect[3:]
    # resumed from the checkpoint at the start of the last epoch, as the arms are
    ckpt = clean_checkpoint(load, tok, list(rows), args, tmp_path / "clean", 3, "cpu", False)
    Recording.seen = []
    train_arm(load, tok, rows, args, tmp_path / "b", 3, "cpu", False, ckpt)
    assert Recording.seen == sum(batch_order(len(rows), args, 3, [1]), [])
    # and the checkpoint's optimizer state reads back by parameter name
    state = checkpoint_moments(load(), ckpt, args)
    assert state["step"] == 3
    model = load()
    assert set(state["m"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(float(v.min()) >= 0 for v in state["v"].values()) and any(float(m.abs().max()) > 0
                                                                        for m in state["m"].values())
