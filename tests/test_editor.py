"""The swap editor on a tiny model: J goes down, constraints hold, proposals predict exact changes."""

import pytest
import torch
from scipy.stats import spearmanr

from infusion_lm import influence as inf
from infusion_lm.editor import SwapConfig, SwapEditor, retokenises


@pytest.fixture(scope="module")
def editor_setup(tiny_setup, tiny_factors):
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    scores = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    return s, v, torch.argsort(scores)[:6].tolist()


def _editor(s, v, **kw):
    cfg = SwapConfig(**{"budget_fraction": 0.15, "steps": 8, "n_candidates": 16, "seed": 0, **kw})
    return SwapEditor(s["model"], s["tok"], v, cfg, eps_rel=1e-3)


def test_edits_lower_J_within_budget_and_constraints(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v)
    tok = s["tok"]
    for i in docs:
        row = s["dataset"][i]
        res = ed.edit(row["input_ids"], row["labels"])
        assert res.J_after < res.J_before, (i, res.J_trace)
        n_editable = int(ed.editable_positions(torch.tensor(row["input_ids"]), torch.tensor(row["labels"])).sum())
        assert 0 < res.n_changed <= int(0.15 * n_editable)
        new = [res.input_ids[p] for p in res.changed_positions]
        assert not set(new) & set(tok.all_special_ids)
        assert retokenises(tok, res.input_ids, add_special=True)
        fluent = ed.fluent_mask(torch.tensor(row["input_ids"]))
        assert all(fluent[p, res.input_ids[p]] for p in res.changed_positions)
        # Re-scored alone (fp32 rounding differs from the batched pass by ~1e-3), the edit still lowers J.
        exact = float(ed.exact_J(torch.tensor([res.input_ids]), torch.tensor([res.labels]))[0])
        assert exact == pytest.approx(res.J_after, rel=1e-2)
        assert exact < res.J_before


def test_same_seed_same_edits(editor_setup):
    s, v, docs = editor_setup
    row = s["dataset"][docs[0]]
    a = _editor(s, v).edit(row["input_ids"], row["labels"])
    b = _editor(s, v).edit(row["input_ids"], row["labels"])
    assert a.input_ids == b.input_ids and a.J_trace == b.J_trace


def test_zero_budget_changes_nothing(editor_setup):
    s, v, docs = editor_setup
    row = s["dataset"][docs[0]]
    res = _editor(s, v, budget_fraction=0.0).edit(row["input_ids"], row["labels"])
    assert res.input_ids == row["input_ids"] and res.n_changed == 0


def _prediction_quality(ed, s, row, use_label_path, n=64):
    ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
    delta = ed.predicted_delta(ids, labels, use_label_path=use_label_path)
    g = torch.Generator().manual_seed(1)
    editable = ed.editable_positions(ids, labels).nonzero().flatten()
    allowed = ed.fluent_mask(ids) & ed.allowed[None, :]  # the candidates the editor draws from
    cands, preds = [], []
    for _ in range(n):
        p = int(editable[torch.randint(len(editable), (1,), generator=g)])
        options = allowed[p].nonzero().flatten()
        w = int(options[torch.randint(len(options), (1,), generator=g)])
        c = ids.clone(); c[p] = w
        cands.append(c); preds.append(float(delta[p, w]))
    cand = torch.stack(cands)
    exact = ed.exact_J(cand, cand.clone()) - ed.exact_J(ids[None], labels[None])[0]
    return spearmanr(preds, exact.tolist()).statistic


def test_proposals_predict_exact_change_and_label_path_helps(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v)
    with_label = [_prediction_quality(ed, s, s["dataset"][i], True) for i in docs]
    without = [_prediction_quality(ed, s, s["dataset"][i], False) for i in docs]
    # Measured here: mean Spearman ≈ 0.33 with both paths and ≈ −0.27 with the input path alone. Among fluent
    # candidates the exact label-path term dominates ΔJ, and the embedding linearisation alone mis-ranks them.
    assert sum(with_label) / len(with_label) > 0.3, with_label
    assert sum(with_label) > sum(without), (with_label, without)
