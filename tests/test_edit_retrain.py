"""The editors' sign, checked by retraining: a corpus with the swap-edited documents in place raises f over the clean
corpus, and over random edits of the same documents with the same budget."""

import pytest
import tempfile


from infusion_lm import influence as inf
from infusion_lm.text.config import EditArguments
from infusion_lm.text.corpus import tokenize_documents
from infusion_lm.text.editors import build_editor
from infusion_lm.text.measurement import contrastive_measurement
from infusion_lm.pipeline import select_documents
from infusion_lm.tracked_modules import resolve_tracked_modules
from test_sign import _train_on
from tiny import tiny_model, toy_corpus, train_briefly


@pytest.mark.slow
def test_swap_edits_raise_f_after_retraining(tok):
    # θ̂ must be near a minimum for influence to predict retraining: at 60 Adam steps the swap arm beat control in
    # only 2 of 4 seeds; at 300 steps it won 4 of 4 (Δf +0.22..+0.64) while random edits scattered around 0.
    deltas = {"swap": [], "random": []}
    for seed in (0, 1, 2):
        ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(32, seed=seed)], 64)
        model = train_briefly(tiny_model(len(tok), seed=seed), ds, tok.pad_token_id, steps=300, seed=seed)
        m = contrastive_measurement(tok, ["The dog ran to the park.", "The dog sat in the house."], "dog", "cat")
        tracked = resolve_tracked_modules(model)
        fdir = inf.fit_factors(model, ds, tracked, tempfile.mkdtemp(), pad_token_id=tok.pad_token_id,
                               strategy="ekfac", batch_size=8, seed=seed)
        v = inf.compute_ihvp(model, m, tracked, fdir, damping=None)
        selected = select_documents(inf.autograd_scores(model, ds, v, pad_token_id=tok.pad_token_id), 4)["indices"]

        every = list(range(len(ds)))
        f_control = m.value(_train_on(model, ds, every, tok.pad_token_id))
        for name in deltas:
            # The random tiny model's perplexities say nothing about fluency; the limit is tested in test_editor.py.
            args = EditArguments(editor=name, budget_fraction=0.15, steps=10, n_candidates=16, seed=seed,
                                 max_perplexity_ratio=None)
            results = build_editor(model, tok, v, args, eps_rel=1e-3).edit_many([ds[i] for i in selected])
            edited = {i: {"input_ids": r.input_ids, "labels": r.labels} for i, r in zip(selected, results)}
            assert all(r.n_changed > 0 for r in results)
            corpus = [edited.get(i, ds[i]) for i in every]
            deltas[name].append(m.value(_train_on(model, corpus, every, tok.pad_token_id)) - f_control)
    assert all(d > 0 for d in deltas["swap"]), deltas
    assert sum(deltas["swap"]) > sum(deltas["random"]) + 0.3, deltas
