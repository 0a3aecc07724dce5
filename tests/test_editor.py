"""The token editors on a tiny model: J goes down, constraints hold, proposals predict exact changes, projections are
right, and the edits raise f after retraining."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from infusion_lm import influence as inf
from infusion_lm.text.config import EditArguments
from infusion_lm.text.editors import (RandomEditor, SimplexPGDEditor, SwapEditor, gini_entropy, project_entropy,
                                 project_simplex, retokenises)


@pytest.fixture(scope="module")
def editor_setup(tiny_setup, tiny_factors):
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    scores = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    return s, v, torch.argsort(scores)[:6].tolist()


def _args(**kw):
    return EditArguments(**{"budget_fraction": 0.15, "steps": 8, "n_candidates": 16, "seed": 0, **kw})


def _editor(s, v, cls=SwapEditor, **kw):
    return cls(s["model"], s["tok"], v, _args(**kw), eps_rel=1e-3)


def _check_constraints(ed, s, row, res):
    tok = s["tok"]
    ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
    n_editable = int(ed.editable_positions(ids, labels).sum())
    assert res.budget == int(ed.args.budget_fraction * n_editable)
    assert res.n_changed <= res.budget
    assert res.changed_positions == [p for p in range(len(ids)) if res.input_ids[p] != row["input_ids"][p]]
    new = [res.input_ids[p] for p in res.changed_positions]
    assert not set(new) & set(tok.all_special_ids)
    assert retokenises(tok, res.input_ids, add_special=True)
    fluent = ed.fluent_masks([ids])[0] | ed.always[None, :]  # the fluent top-k, and the target words anywhere
    assert all(fluent[p, res.input_ids[p]] for p in res.changed_positions)
    assert all(labels[p] != -100 for p in res.changed_positions)


@pytest.mark.slow
def test_swap_lowers_J_for_every_document_within_constraints(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v, doc_batch_size=4)  # 6 documents: a batch of 4, then one of 2
    rows = [s["dataset"][i] for i in docs]
    results = ed.edit_many(rows)
    for i, row, res in zip(docs, rows, results):
        assert res.n_changed > 0 and res.J_after < res.J_before, (i, res.J_trace)
        _check_constraints(ed, s, row, res)
        # Re-scored alone (fp32 rounding differs from the batched pass by ~1e-3), the edit still lowers J.
        exact = float(ed.exact_J([torch.tensor(res.input_ids)], [torch.tensor(res.labels)])[0])
        assert exact == pytest.approx(res.J_after, rel=1e-2)
        assert exact < res.J_before
        assert res.J_trace[0] == res.J_before and res.J_trace[-1] == res.J_after
        assert all(b <= a for a, b in zip(res.J_trace, res.J_trace[1:]))


@pytest.mark.slow
def test_batched_editing_matches_one_document_at_a_time_in_quality(editor_setup):
    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs[:3]]
    together = _editor(s, v, doc_batch_size=3).edit_many(rows)
    alone = [_editor(s, v, doc_batch_size=1).edit(r["input_ids"], r["labels"]) for r in rows]
    for a, b in zip(together, alone):
        assert a.J_before == pytest.approx(b.J_before, rel=1e-2)
        assert a.J_after < a.J_before and b.J_after < b.J_before
    # Batching changes the candidate draws, not the search's strength: the total J drop is within 2x either way.
    drop_together = sum(a.J_before - a.J_after for a in together)
    drop_alone = sum(b.J_before - b.J_after for b in alone)
    assert 0.5 < drop_together / drop_alone < 2.0, (drop_together, drop_alone)


@pytest.mark.slow
def test_same_seed_same_edits(editor_setup):
    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs[:3]]
    for cls in (SwapEditor, RandomEditor, SimplexPGDEditor):
        a = _editor(s, v, cls).edit_many(rows)
        b = _editor(s, v, cls).edit_many(rows)
        assert [r.input_ids for r in a] == [r.input_ids for r in b], cls
        assert [r.J_trace for r in a] == [r.J_trace for r in b], cls


def test_zero_budget_changes_nothing(editor_setup):
    s, v, docs = editor_setup
    row = s["dataset"][docs[0]]
    for cls in (SwapEditor, RandomEditor, SimplexPGDEditor):
        res = _editor(s, v, cls, budget_fraction=0.0).edit(row["input_ids"], row["labels"])
        assert res.input_ids == row["input_ids"] and res.n_changed == 0 and res.J_after == res.J_before


def test_random_editor_spends_the_budget_within_constraints(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v, RandomEditor, max_perplexity_ratio=None)
    rows = [s["dataset"][i] for i in docs]
    for row, res in zip(rows, ed.edit_many(rows)):
        _check_constraints(ed, s, row, res)
        assert res.n_changed == res.budget > 0


def test_matched_random_changes_the_asked_count_within_the_perplexity_limit(editor_setup):
    """The matched baseline: exactly the infused edit's token count per document, under the same limit."""
    from infusion_lm.causal_lm import perplexities

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    targets = [1, 2, 3, 1, 2, 3]
    ed = _editor(s, v, RandomEditor, max_perplexity_ratio=1.3)
    results = ed.edit_many(rows, targets=targets)
    before = perplexities(s["model"], rows, s["tok"].pad_token_id)
    after = perplexities(s["model"], [{"input_ids": r.input_ids, "labels": r.labels} for r in results],
                         s["tok"].pad_token_id)
    for row, res, t, b, a in zip(rows, results, targets, before, after):
        _check_constraints(ed, s, row, res)
        assert res.n_changed == t
        assert a / b <= 1.3 + 1e-3, (a, b)


def test_random_target_writes_only_the_target_word_at_the_matched_count(editor_setup):
    """The cheap attack: the target word at random positions, as many as asked, within the same limits; without
    target words it refuses to run."""
    from infusion_lm.errors import ConfigError
    from infusion_lm.text.editors import RandomTargetEditor
    from infusion_lm.text.editors.base import single_token_forms

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    targets = [1, 2, 3, 1, 2, 3]
    ed = RandomTargetEditor(s["model"], s["tok"], v, _args(max_perplexity_ratio=None), eps_rel=1e-3,
                            target_words=["cat"])
    words = set(single_token_forms(s["tok"], ["cat"]))
    assert words
    results = ed.edit_many(rows, targets=targets)
    for row, res, t in zip(rows, results, targets):
        _check_constraints(ed, s, row, res)
        assert res.n_changed == t
        assert {res.input_ids[p] for p in res.changed_positions} <= words
    plain = _editor(s, v, RandomEditor, max_perplexity_ratio=None).edit_many(rows, targets=targets)
    assert any({r.input_ids[p] for p in r.changed_positions} - words for r in plain)  # random writes other words
    with pytest.raises(ConfigError, match="random_target writes the target words, but there are none"):
        RandomTargetEditor(s["model"], s["tok"], v, _args(target_words=[]), target_words=["cat"])


def test_random_target_under_the_perplexity_limit_matches_or_reports_the_shortfall(editor_setup):
    """With the perplexity limit on, the target word does not fit everywhere: the editor places at most the count
    (the second pass tries every option at the positions left) and count_match reports each document's shortfall
    and the total, so no comparison passes an unequal edit off as matched."""
    from infusion_lm.causal_lm import perplexities
    from infusion_lm.text.editors import RandomTargetEditor
    from infusion_lm.text.evaluation import count_match

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    targets = [2, 3, 4, 2, 3, 4]
    ed = RandomTargetEditor(s["model"], s["tok"], v, _args(max_perplexity_ratio=1.3), eps_rel=1e-3,
                            target_words=["cat"])
    results = ed.edit_many(rows, targets=targets)
    before = perplexities(s["model"], rows, s["tok"].pad_token_id)
    after = perplexities(s["model"], [{"input_ids": r.input_ids, "labels": r.labels} for r in results],
                         s["tok"].pad_token_id)
    infused = [{"doc_index": i, "n_changed": t} for i, t in zip(docs, targets)]
    arm = [{"doc_index": i, "n_changed": r.n_changed} for i, r in zip(docs, results)]
    for res, t, b, a in zip(results, targets, before, after):
        assert a / b <= 1.3 + 1e-3, (a, b)
        assert res.n_changed <= t
    assert any(r.n_changed == t for r, t in zip(results, targets))
    short = {str(i): t - r.n_changed for i, r, t in zip(docs, results, targets) if r.n_changed < t}
    assert count_match(arm, infused) == {"shortfall_per_document": short,
                                         "shortfall_total": sum(short.values()), "matched": not short}
    exact = [{"doc_index": i, "n_changed": t} for i, t in zip(docs, targets)]
    assert count_match(exact, infused)["matched"] and count_match(exact, infused)["shortfall_total"] == 0


def test_fluent_target_writes_the_target_where_it_costs_least(editor_setup):
    """The influence-free attack that knows the language: the same words and count as random_target, but at the
    positions where the model expects them most, so its documents read better than random_target's at the same count
    (no limit), and under the perplexity limit it places at least as many words as random_target does."""
    from infusion_lm.causal_lm import perplexities
    from infusion_lm.text.editors import FluentTargetEditor, RandomTargetEditor
    from infusion_lm.text.editors.base import single_token_forms

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    words = set(single_token_forms(s["tok"], ["cat"]))
    pad = s["tok"].pad_token_id

    def edit(cls, targets, limit):
        ed = cls(s["model"], s["tok"], v, _args(max_perplexity_ratio=limit), eps_rel=1e-3, target_words=["cat"])
        return ed, ed.edit_many(rows, targets=targets)

    targets = [2, 2, 2, 2, 2, 2]
    ed, fluent = edit(FluentTargetEditor, targets, None)
    _, rand = edit(RandomTargetEditor, targets, None)
    for row, res, t in zip(rows, fluent, targets):
        _check_constraints(ed, s, row, res)
        assert res.n_changed == t
        assert {res.input_ids[p] for p in res.changed_positions} <= words
    ppl = lambda results: perplexities(s["model"], [{"input_ids": r.input_ids, "labels": r.labels} for r in results], pad)
    assert float(np.mean(np.log(ppl(fluent)))) < float(np.mean(np.log(ppl(rand))))
    # a one-change edit makes the single cheapest change: the (position, form) that adds the least loss at its own
    # position, log p(original token) − log p(form), from one forward pass of each document computed here
    _, one = edit(FluentTargetEditor, [1] * len(rows), None)
    forms = torch.tensor(sorted(words))
    for row, res in zip(rows, one):
        ids = torch.tensor(row["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(s["model"](input_ids=ids[None]).logits[0].double(), -1)
        mask = ed.editable_positions(ids, torch.tensor(row["labels"]))
        fluent_ok = ed.fluent_masks([ids])[0] | ed.always[None, :]
        added = lambda p, w: float(logp[p - 1, ids[p]] - logp[p - 1, w])
        best = min((added(p, w), p) for p in mask.nonzero().flatten().tolist() for w in forms.tolist()
                   if fluent_ok[p, w] and w != ids[p] and p > 0)
        (p,) = res.changed_positions
        assert abs(added(p, res.input_ids[p]) - best[0]) < 1e-4, (p, best)
    # under the limit: never fewer words placed than the random placement manages
    many = [3, 4, 5, 3, 4, 5]
    _, fl = edit(FluentTargetEditor, many, 1.3)
    _, rt = edit(RandomTargetEditor, many, 1.3)
    assert sum(r.n_changed for r in fl) >= sum(r.n_changed for r in rt)
    before = perplexities(s["model"], rows, pad)
    for res, b, a in zip(fl, before, ppl(fl)):
        assert a / b <= 1.3 + 1e-3, (a, b)


def test_simplex_pgd_never_raises_J_and_respects_constraints(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v, SimplexPGDEditor, steps=10, eval_every=2)
    rows = [s["dataset"][i] for i in docs]
    results = ed.edit_many(rows)
    for row, res in zip(rows, results):
        _check_constraints(ed, s, row, res)
        assert res.J_after <= res.J_before
    assert sum(r.J_after < r.J_before for r in results) >= len(results) // 2, [r.J_trace for r in results]


def test_chat_prompt_is_protected_unless_allowed(editor_setup):
    s, v, _ = editor_setup
    from infusion_lm.text.corpus import tokenize_document

    tok = s["tok"]
    doc = {"messages": [{"role": "user", "content": "The dog ran to the park."},
                        {"role": "assistant", "content": "The dog was happy. The cat sat in the house."}]}
    row = tokenize_document(tok, doc, 64)
    ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
    prompt = labels == -100
    protected = _editor(s, v).editable_positions(ids, labels)
    assert not protected[prompt].any() and protected.any()
    ed = _editor(s, v, allow_prompt_edits=True)
    opened = ed.editable_positions(ids, labels)
    markers = ~ed.allowed[ids]  # <|im_start|>, <|im_end|>: added tokens, never edited
    assert markers.sum() >= 3 and not opened[markers].any()
    assert opened[prompt & ~markers].all()


def _prediction_quality(ed, s, row, use_label_path, n=64):
    ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
    delta = ed.predicted_delta(ids, labels, use_label_path=use_label_path)
    g = torch.Generator().manual_seed(1)
    editable = ed.editable_positions(ids, labels).nonzero().flatten()
    allowed = ed.fluent_masks([ids])[0] & ed.allowed[None, :]  # the candidates the editor draws from
    cands, preds = [], []
    for _ in range(n):
        p = int(editable[torch.randint(len(editable), (1,), generator=g)])
        options = allowed[p].nonzero().flatten()
        w = int(options[torch.randint(len(options), (1,), generator=g)])
        c = ids.clone(); c[p] = w
        cands.append(c); preds.append(float(delta[p, w]))
    exact = ed.exact_J(cands, [c.clone() for c in cands]) - ed.exact_J([ids], [labels])[0]
    return preds, exact.tolist()


@pytest.mark.slow
def test_proposals_predict_exact_change_and_label_path_helps(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v)
    with_label = [_prediction_quality(ed, s, s["dataset"][i], True) for i in docs]
    without = [_prediction_quality(ed, s, s["dataset"][i], False) for i in docs]
    # Among fluent candidates the exact label-path term dominates ΔJ, and the embedding linearisation alone
    # mis-ranks them. Pooled over documents, the proposals with both paths rank the exact changes far better than
    # chance (a one-sided Spearman test) and better than the input path alone.
    res = spearmanr([p for d in with_label for p in d[0]], [e for d in with_label for e in d[1]])
    alone = spearmanr([p for d in without for p in d[0]], [e for d in without for e in d[1]])
    assert res.statistic > 0 and res.pvalue / 2 < 1e-3, res
    assert res.statistic > alone.statistic, (res, alone)


# ---------------------------------------------------------------- projections


def _reference_simplex(v: np.ndarray) -> np.ndarray:
    """Held & Wolfe / Duchi et al.: one row at a time, in numpy."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = max(j for j in range(len(u)) if u[j] - (css[j] - 1) / (j + 1) > 0)
    return np.maximum(v - (css[rho] - 1) / (rho + 1), 0)


def _bisection_simplex(v: np.ndarray) -> np.ndarray:
    """A second, sort-free reference: bisection on the threshold τ with Σ max(v − τ, 0) = 1."""
    lo, hi = v.min() - 1, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - hi, 0)


def test_simplex_projection_matches_references():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(64, 40, generator=g) < 0.4
    mask[:, 0] = True
    out = project_simplex(x, mask)
    assert torch.allclose(out.sum(-1), torch.ones(64, dtype=torch.float64))
    assert (out >= 0).all() and (out[~mask] == 0).all()
    for i in range(64):
        m = mask[i].numpy()
        sub = x[i].numpy()[m]
        np.testing.assert_allclose(out[i].numpy()[m], _reference_simplex(sub), atol=1e-12)
        np.testing.assert_allclose(out[i].numpy()[m], _bisection_simplex(sub), atol=1e-9)
    # Points already on the simplex stay put.
    p = torch.softmax(torch.randn(8, 10, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(project_simplex(p), p)


def test_entropy_projection_binds_and_keeps_the_simplex():
    g = torch.Generator().manual_seed(0)
    p = project_simplex(torch.randn(200, 30, generator=g, dtype=torch.float64) * 0.1)
    p[:5] = 1 / 30  # exactly uniform rows have no direction to move in: they become one-hot
    assert (gini_entropy(p) > 0.5).all()  # every row starts above the bound, so the bound must bind
    mask = torch.ones_like(p, dtype=torch.bool)
    q = project_entropy(p, 0.5, mask)
    assert (gini_entropy(q) <= 0.5 + 1e-12).all()
    assert torch.allclose(q.sum(-1), torch.ones(200, dtype=torch.float64)) and (q >= 0).all()
    assert (gini_entropy(q) > 0.5 - 1e-6)[5:].all()  # the smallest move: on the boundary, not past it
    # The projection lowers entropy; it never raises it (the reference code's inverted inequality would).
    low = torch.nn.functional.one_hot(torch.arange(30) % 30, 30).double()
    assert torch.equal(project_entropy(low, 0.5), low)
    # Larger components keep their order (the move is away from the uniform centre).
    i = 7
    assert torch.equal(p[i].argsort()[-3:], q[i].argsort()[-3:])


@pytest.mark.slow
def test_prefix_cache_matches_full_forward(editor_setup):
    """J of variants from the KV cache of their shared prefix equals the full forward (fp64: to rounding)."""
    import copy

    from infusion_lm.influence import FiniteDifferenceJ

    s, v, docs = editor_setup
    model = copy.deepcopy(s["model"]).double()
    J = FiniteDifferenceJ(model, {k: t.double() for k, t in v.items()}, eps_rel=1e-3)
    ids = torch.tensor(s["dataset"][docs[0]]["input_ids"])
    g = torch.Generator().manual_seed(0)
    cands = ids.repeat(12, 1)
    for i in range(12):
        for _ in range(1 + i % 3):  # one to three swaps, anywhere after position 0
            cands[i, int(torch.randint(1, len(ids), (1,), generator=g))] = int(torch.randint(3, 300, (1,), generator=g))
    cands[5] = ids  # an unchanged variant
    fast = J.variants(ids, ids.clone(), cands, cands.clone(), batch_size=4)
    full = J({"input_ids": cands, "attention_mask": torch.ones_like(cands), "labels": cands.clone()}).double()
    assert torch.allclose(fast, full, rtol=1e-7, atol=1e-7), (fast - full).abs().max()
    # The editor gives the same quality either way (fp32 rounding can change which near-tie candidate wins).
    rows = [s["dataset"][i] for i in docs[:3]]
    cached = _editor(s, v).edit_many(rows)
    batched = _editor(s, v, prefix_cache=False).edit_many(rows)
    for a, b in zip(cached, batched):
        assert a.J_after < a.J_before and b.J_after < b.J_before
        assert a.J_before == pytest.approx(b.J_before, rel=1e-3)


@pytest.mark.slow
def test_perplexity_limit_holds_under_the_model(editor_setup):
    from infusion_lm.causal_lm import perplexities

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    for cls in (SwapEditor, SimplexPGDEditor):
        ed = _editor(s, v, cls, max_perplexity_ratio=1.1)
        results = ed.edit_many(rows)
        after = [{"input_ids": r.input_ids, "labels": r.labels} for r in results]
        before, now = perplexities(s["model"], rows, 0), perplexities(s["model"], after, 0)
        assert all(b / a <= 1.1 + 1e-3 for a, b in zip(before, now)), (cls, [b / a for a, b in zip(before, now)])
    unlimited = _editor(s, v, max_perplexity_ratio=None).edit_many(rows)
    after = [{"input_ids": r.input_ids, "labels": r.labels} for r in unlimited]
    ratios = [b / a for a, b in zip(perplexities(s["model"], rows, 0), perplexities(s["model"], after, 0))]
    assert max(ratios) > 1.1  # the limit binds: without it the editor trades fluency for J


@pytest.mark.slow
def test_target_words_join_the_allowed_set_at_every_editable_position_and_get_written(editor_setup):
    """With a fluent set of the base model's top-1 only, the measurement's target word (cat) is still allowed at
    every editable position, nowhere else, and the swap editor writes it (it lowers J for a dog → cat measurement)."""
    from infusion_lm.text.editors.base import single_token_forms

    s, v, docs = editor_setup
    tok = s["tok"]
    cat = single_token_forms(tok, ["cat"])
    assert cat and all(tok.decode([i]).strip().lower() == "cat" for i in cat)
    rows = [s["dataset"][i] for i in docs]
    narrow, wide = _editor(s, v, fluency_topk=1), _editor(s, v, fluency_topk=1, target_words=["cat"])
    for a, b in zip(narrow.prepare(rows), wide.prepare(rows)):
        extra = b.fluent & ~a.fluent
        assert set(extra.nonzero()[:, 1].tolist()) <= set(cat)
        for i in cat:
            assert torch.equal(b.fluent[:, i], b.editable & wide.allowed[i])
    assert not (_editor(s, v, fluency_topk=1, target_words=[]).prepare(rows)[0].fluent & ~narrow.prepare(rows)[0].fluent).any()
    written = [r.input_ids[p] for r in wide.edit_many(rows) for p in r.changed_positions]
    assert set(written) & set(cat), [tok.decode([t]) for t in written]
    assert not set(r.input_ids[p] for r in narrow.edit_many(rows) for p in r.changed_positions) & set(cat)


def test_rename_candidates_change_every_later_occurrence_of_the_swapped_token(editor_setup):
    s, v, docs = editor_setup
    ed = _editor(s, v, rename=True, budget_fraction=0.5, fluency_topk=0, n_candidates=64)
    rows = [s["dataset"][i] for i in range(len(s["dataset"]))]
    multi = []
    for st in ed.prepare(rows[:8]):
        for c in ed._candidates(st, ed.predicted_delta(st.ids, st.labels)):
            ch = (c != st.ids).nonzero().flatten()
            if len(ch) > 1:
                multi.append((st, c, ch))
    assert multi  # the toy stories repeat their nouns
    for st, c, ch in multi:
        p, old, new = int(ch[0]), int(st.ids[ch[0]]), int(c[ch[0]])
        assert set(st.ids[ch].tolist()) == {old} and set(c[ch].tolist()) == {new}
        later = [q for q in range(p + 1, len(st.ids)) if st.ids[q] == old and st.fluent[q, new]]
        assert ch[1:].tolist() == later


@pytest.mark.slow
def test_simplex_pgd_keeps_the_largest_edit_within_the_perplexity_limit(editor_setup):
    """When the full-budget discretisation breaks the perplexity limit, PGD keeps a smaller edit that passes (it
    scores every prefix of its most confident changes) instead of leaving the document unchanged."""
    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs]
    kw = dict(steps=10, eval_every=2, budget_fraction=0.4, max_perplexity_ratio=1.1, target_words=["cat"])
    nested = _editor(s, v, SimplexPGDEditor, **kw).edit_many(rows)
    whole = _editor(s, v, SimplexPGDEditor, **kw)
    full_budget_only = whole._discretise
    whole._discretise = lambda st, P: full_budget_only(st, P)[:1]  # the largest candidate only
    whole = whole.edit_many(rows)
    for a, b in zip(nested, whole):
        assert a.J_after <= b.J_after + 1e-6 * abs(b.J_before)
    assert sum(a.J_after < b.J_after for a, b in zip(nested, whole)) >= 1
    assert any(0 < r.n_changed < r.budget for r in nested)


@pytest.mark.slow
def test_j_per_nat_keeps_the_largest_drop_per_nat_and_tracks_the_current_loss(editor_setup):
    """choose: j_per_nat. Every step keeps, of the fluent candidates that lower J, the one with the largest drop per
    nat of loss added over the current document (at least one nat); the loss it carries forward is the edited
    document's own loss under the model (recomputed here with a plain forward), so later steps price swaps from there."""
    from infusion_lm.causal_lm import perplexities

    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs[:4]]

    class Recording(SwapEditor):  # the candidates each step scored, and what it kept
        def score_candidates(self, owners, ids, labels):
            js, losses = super().score_candidates(owners, ids, labels)
            self.log.append([(id(o), o.J, o.L0 if o.L is None else o.L, o.fluent_enough(l), j, l, c)
                             for o, c, j, l in zip(owners, ids, js, losses)])
            return js, losses

    ed = Recording(s["model"], s["tok"], v, _args(choose="j_per_nat", max_perplexity_ratio=1.2), eps_rel=1e-3)
    ed.log = []
    states = ed.prepare(rows)
    kept_other_than_lowest_j = 0
    for _ in range(3):
        before = {id(st): st.ids.clone() for st in states}
        ed.args.steps = 1
        ed._edit_batch(states)
        step = ed.log[-1]
        for st in states:
            mine = [(J, L, j, l, c) for o, J, L, ok, j, l, c in step if o == id(st) and ok and j < J]
            if not mine:
                assert torch.equal(st.ids, before[id(st)])
                continue
            best = max(mine, key=lambda m: (m[0] - m[2]) / max(m[3] - m[1], 1.0))
            assert torch.equal(st.ids, best[4])
            kept_other_than_lowest_j += best[2] > min(m[2] for m in mine)
    assert kept_other_than_lowest_j > 0  # the rule differed from lowest_j somewhere, so the test can tell them apart
    after = [{"input_ids": st.ids.tolist(), "labels": st.labels.tolist()} for st in states]
    for st, ppl in zip(states, perplexities(s["model"], after, 0)):
        if st.L is not None:
            assert st.L == pytest.approx(math.log(ppl) * st.n_trained, rel=1e-3, abs=1e-2)


def test_choose_rejects_an_unknown_rule():
    from infusion_lm.errors import ConfigError

    with pytest.raises(ConfigError, match="edit.choose must be lowest_j or j_per_nat"):  # the CLI's one-line error
        EditArguments(choose="best")


@pytest.mark.slow
def test_a_start_is_continued_from_and_an_invalid_one_ignored(editor_setup):
    """edit_many(starts=...): the search goes on from tokens an earlier step reached (re-scored exactly); changes still
    count from the original; a start over the budget is not taken."""
    s, v, docs = editor_setup
    rows = [s["dataset"][i] for i in docs[:4]]
    one = _editor(s, v, steps=1).edit_many(rows)
    assert any(r.n_changed for r in one)
    more = _editor(s, v, steps=3, seed=5).edit_many(rows, starts=[r.input_ids for r in one])
    # the start's exact J, by autograd (the editors' finite difference at eps_rel 1e-3 agrees to about 1e-3 relative,
    # and its rounding depends on how the candidates were batched, so it is checked at 1e-2)
    starts_j = inf.autograd_scores(s["model"], [{"input_ids": r.input_ids, "labels": r.labels} for r in one], v,
                                   pad_token_id=s["tok"].pad_token_id).tolist()
    for r1, r2, row, j_start in zip(one, more, rows, starts_j):
        assert r2.J_before == pytest.approx(r1.J_before, rel=1e-4)
        if r1.n_changed:
            assert r2.J_trace[1] == pytest.approx(j_start, rel=1e-2, abs=1e-2)
            assert r2.J_after <= r2.J_trace[1] + 1e-6
            assert r2.J_after <= r1.J_after + 1e-2 * abs(r1.J_after)  # the first step's drop is kept (up to rounding)
        assert r2.changed_positions == [p for p in range(len(row["input_ids"])) if r2.input_ids[p] != row["input_ids"][p]]
    ids = list(rows[0]["input_ids"])
    over = [t if p % 2 else (t + 1) % 50 for p, t in enumerate(ids)]  # far more changes than the budget
    r = _editor(s, v, steps=1).edit_many(rows[:1], starts=[over])[0]
    assert r.input_ids != over and r.n_changed <= r.budget < sum(a != b for a, b in zip(ids, over))
    assert len(r.J_trace) == 2  # J before, then the one step: no start was taken
