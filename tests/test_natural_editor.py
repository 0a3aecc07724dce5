"""The natural editor on a tiny model: whole words for whole words, the right-context bound and the surprisal cap
checked against the model's own per-token losses computed here, and J still goes down."""

import pytest
import torch
import torch.nn.functional as F

from infusion_lm import influence as inf
from infusion_lm.text.config import EditArguments
from infusion_lm.text.editors import NaturalEditor, SwapEditor


@pytest.fixture(scope="module")
def setup(tiny_setup, tiny_factors):
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    scores = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    rows = [s["dataset"][i] for i in torch.argsort(scores)[:6].tolist()]
    return s, v, rows


def _edit(s, v, rows, cls, **kw):
    args = EditArguments(**{"budget_fraction": 0.2, "steps": 8, "n_candidates": 16, "seed": 0,
                            "max_perplexity_ratio": None, **kw})
    ed = cls(s["model"], s["tok"], v, args, eps_rel=1e-3)
    return ed, ed.edit_many(rows)


@torch.no_grad()
def _nll(model, ids):
    """Per-token surprisal from the logits, by hand: [T] with 0 at t = 0."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return torch.cat([torch.zeros(1, dtype=torch.double),
                      F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")])


def test_natural_swaps_whole_words_for_whole_words_and_lowers_J(setup):
    s, v, rows = setup
    tok = s["tok"]
    _, res = _edit(s, v, rows, NaturalEditor, natural_right_nats=50.0, natural_surprisal_quantile=1.0)
    assert sum(r.n_changed for r in res) > 0
    for row, r in zip(rows, res):
        assert r.J_after <= r.J_before
        before, after = tok.decode(row["input_ids"]), tok.decode(r.input_ids)
        assert len(before.split()) == len(after.split())  # no word glued onto another, none split
        for p in r.changed_positions:
            old, new = tok.decode([row["input_ids"][p]]), tok.decode([r.input_ids[p]])
            assert old[0] == " " and old[1:].isalpha() and new[0] == " " and new[1:].isalpha()
            assert old[1].isupper() == new[1].isupper()
            nxt = tok.decode([r.input_ids[p + 1]]) if p + 1 < len(r.input_ids) else " "
            assert not nxt[:1].isalpha()  # the next token starts a word of its own (or is punctuation / the end)
    # the swap editor, unconstrained, does make swaps the natural editor refuses
    _, swap = _edit(s, v, rows, SwapEditor)
    words = [len(tok.decode(row["input_ids"]).split()) == len(tok.decode(r.input_ids).split()) and all(
        tok.decode([r.input_ids[p]])[:1] == " " and tok.decode([row["input_ids"][p]])[:1] == " "
        for p in r.changed_positions) for row, r in zip(rows, swap)]
    assert not all(words)


def test_right_context_bound_and_surprisal_cap_hold_under_the_model(setup):
    s, v, rows = setup
    ed, res = _edit(s, v, rows, NaturalEditor, natural_right_nats=0.0, natural_surprisal_quantile=0.9, max_changed=1)
    model = s["model"]
    own = torch.cat([_nll(model, list(r["input_ids"]))[1:] for r in rows])
    cap = torch.quantile(own, 0.9).item()
    assert ed.cap == pytest.approx(cap, rel=1e-4)
    moved = 0
    for row, r in zip(rows, res):
        if not r.changed_positions:
            continue
        moved += 1
        (p,) = r.changed_positions
        before, after = _nll(model, list(row["input_ids"])), _nll(model, r.input_ids)
        assert after[p] <= cap + 1e-4  # the new word is no more surprising than the text's own unusual words
        assert (after[p + 1:] - before[p + 1:]).sum() <= 1e-4  # zero nats of right context may be lost
    assert moved > 0
    # with no bound at all, some accepted swap costs the words after it: the check above had something to refuse
    _, free = _edit(s, v, rows, NaturalEditor, natural_right_nats=1e9, natural_surprisal_quantile=1.0, max_changed=1)
    costs = [(_nll(model, r.input_ids)[r.changed_positions[0] + 1:] - _nll(model, list(row["input_ids"]))[
        r.changed_positions[0] + 1:]).sum().item() for row, r in zip(rows, free) if r.changed_positions]
    assert max(costs) > 0


def test_bad_natural_settings_are_refused():
    from infusion_lm.errors import ConfigError

    with pytest.raises(ConfigError, match="natural_right_nats"):
        EditArguments(natural_right_nats=-1)
    with pytest.raises(ConfigError, match="natural_surprisal_quantile"):
        EditArguments(natural_surprisal_quantile=0)


def test_natural_target_writes_the_target_word_where_it_fits_both_sides(setup):
    from infusion_lm.text.editors import FluentTargetEditor, NaturalTargetEditor
    from infusion_lm.text.editors.base import single_token_forms

    s, v, rows = setup
    tok, model = s["tok"], s["model"]
    args = EditArguments(budget_fraction=0.3, seed=0, max_perplexity_ratio=None, natural_right_nats=0.5,
                         natural_surprisal_quantile=1.0)
    forms = set(single_token_forms(tok, ["cat"]))
    ed = NaturalTargetEditor(model, tok, v, args, eps_rel=1e-3, target_words=["cat"])
    res = ed.edit_many(rows, targets=[1] * len(rows))  # one change each: the bound is exact on the result
    assert sum(r.n_changed for r in res) > 0
    for row, r in zip(rows, res):
        assert r.n_changed <= 1
        ids = list(row["input_ids"])
        for p in r.changed_positions:
            assert r.input_ids[p] in forms and tok.decode([r.input_ids[p]]) == " cat"  # a whole lower-case word
            assert tok.decode([ids[p]])[:1] == " " and tok.decode([ids[p]])[1:].isalpha()
        # the change cost the words after it at most 0.5 nats
        before, after = _nll(model, ids), _nll(model, r.input_ids)
        if r.changed_positions:
            p = r.changed_positions[0]
            assert (after[p + 1:] - before[p + 1:]).sum() <= 0.5 + 1e-4
    # the fluent placement without the checks writes the word where the natural one may not: over a word of
    # another case, a word's fragment, or punctuation
    more = FluentTargetEditor(model, tok, v, args, eps_rel=1e-3, target_words=["cat"]).edit_many(
        rows, targets=[3] * len(rows))
    replaced = [tok.decode([row["input_ids"][p]]) for row, f in zip(rows, more) for p in f.changed_positions]
    assert any(not (w[:1] == " " and w[1:].isalpha() and w[1:].islower()) for w in replaced)
