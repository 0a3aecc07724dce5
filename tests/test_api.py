"""infuse(): the functional entry point. Its scores against kronfluence's own, its selection, its edits against an
autograd J, the texts-in path, the callback sharing it, and one-line errors for bad input."""

import datasets
import pytest
import torch

import infusion_lm
from infusion_lm import EditArguments, InfluenceArguments, MeasurementArguments, RetrainArguments, infuse
from infusion_lm.errors import ConfigError
from infusion_lm.influence import autograd_scores, kronfluence_scores
from infusion_lm.text.measurement import contrastive_measurement
from infusion_lm.tracked_modules import resolve_tracked_modules
from tiny import toy_corpus

# contrast_top 0: the pairwise f, the one conftest's reference measurement (and kronfluence's check) use
MEASURE = MeasurementArguments(kind="contrastive", probe="dog", target="cat", contrast_top=0,
                               documents=["The dog ran to the park. The dog was happy.", "The dog sat in the garden."])
EDIT = EditArguments(budget_fraction=0.15, steps=4, n_candidates=8)


@pytest.fixture(scope="module")
def result(tiny_setup, tmp_path_factory):
    s = tiny_setup
    work = tmp_path_factory.mktemp("api")
    r = infuse(s["model"], s["tok"], s["dataset"], MEASURE, k=3, edit=EDIT, work_dir=str(work), progress=False,
               influence=InfluenceArguments(batch_size=8))
    return r, work


@pytest.mark.slow
def test_scores_match_kronfluence_and_selection_is_most_negative(tiny_setup, result):
    s, (r, work) = tiny_setup, result
    # kronfluence's own pairwise scores, on the factors infuse() fitted: an independent preconditioning and J.
    theirs = kronfluence_scores(s["model"], s["dataset"], s["measurement"], s["tracked"], work,
                                pad_token_id=s["tok"].pad_token_id, strategy="ekfac", damping=None,
                                scores_name="api_check").double()
    assert r.scores.shape == (len(s["dataset"]),) and float(theirs.abs().max()) > 0
    torch.testing.assert_close(r.scores.double(), theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()))
    assert r.indices == torch.argsort(theirs)[:3].tolist()


def test_edits_lower_J_by_an_autograd_recomputation(tiny_setup, result):
    s, (r, _) = tiny_setup, result
    pad = s["tok"].pad_token_id
    before = autograd_scores(s["model"], datasets.Dataset.from_list([r.rows[i] for i in r.indices]), r.ihvp,
                             pad_token_id=pad)
    after = autograd_scores(s["model"], datasets.Dataset.from_list(r.edited_rows), r.ihvp, pad_token_id=pad)
    assert (after < before).all()
    # the editor scores with the central difference (fd_eps_rel 1e-4): about 5e-3 relative error per document
    torch.testing.assert_close(after, torch.tensor([rec["J_after"] for rec in r.records], dtype=after.dtype),
                               rtol=2e-2, atol=1e-2 * float(before.abs().max()))
    assert r.J_after == pytest.approx(float(after.sum()), rel=2e-2)
    # Without a retraining to model, the prediction is the influence function's −ΔJ / n (up to the same error).
    assert r.predicted_delta_f == pytest.approx(-float((after - before).sum()) / len(r.rows),
                                                abs=1e-2 * float(before.abs().sum()) / len(r.rows))


def test_apply_replaces_only_the_selected_rows(tiny_setup, result):
    s, (r, _) = tiny_setup, result
    rows = [dict(s["dataset"][i]) for i in range(len(s["dataset"]))]
    new = r.apply(rows)
    assert r.apply() == new  # by default, the rows the result was computed on
    changed = [i for i in range(len(rows)) if new[i]["input_ids"] != rows[i]["input_ids"]]
    assert changed and set(changed) <= set(r.indices)
    assert all(new[i]["input_ids"] == rows[i]["input_ids"] for i in range(len(rows)) if i not in r.indices)
    assert rows[r.indices[0]]["input_ids"] == list(s["dataset"][r.indices[0]]["input_ids"])  # input untouched
    with pytest.raises(ConfigError, match="training set of"):
        r.apply(rows[:-1])


@pytest.mark.slow
def test_texts_in_and_the_optimizer_prediction(tiny_setup, tmp_path):
    """Plain texts are tokenized; with retrain given, predicted Δf comes from the optimizer's response, which is far
    smaller than the converged-training −ΔJ/n (the calibration the README describes)."""
    s = tiny_setup
    texts = toy_corpus(16)
    # one seed's data order, as the test was measured (averaged over seeds 0-2 this tiny case's prediction is -0.0006)
    retrain = RetrainArguments(learning_rate=1e-3, batch_size=4, epochs=1, seeds=[0])
    r = infuse(s["model"], s["tok"], texts, MEASURE, k=2, edit=EDIT, retrain=retrain, max_length=64,
               work_dir=str(tmp_path), progress=False)
    assert len(r.rows) == 16 and len(r.edited_rows) == 2
    same_v = sum(rec["predicted_delta_f_same_v"] for rec in r.records)
    assert r.predicted_delta_f != pytest.approx(same_v)
    assert r.predicted_delta_f > 0 and same_v > 0


@pytest.mark.slow
def test_callback_and_infuse_share_one_path(tiny_setup, tmp_path):
    from infusion_lm.callbacks import InfusionCallback, SwappableDataset

    s = tiny_setup
    m = contrastive_measurement(s["tok"], MEASURE.documents, "dog", "cat")
    direct = infuse(s["model"], s["tok"], s["dataset"], m, k=2, edit=EDIT, work_dir=str(tmp_path / "a"),
                    progress=False)
    data = SwappableDataset(s["dataset"])
    cb = InfusionCallback(s["tok"], data, m, k=2, at_step=1, edit=EDIT, work_dir=str(tmp_path / "b"))
    records = cb.infuse(s["model"])
    assert [r["doc_index"] for r in records] == direct.indices
    assert [data[i]["input_ids"] for i in direct.indices] == [r["input_ids"] for r in direct.edited_rows]


@pytest.mark.slow
def test_first_step_ranking_picks_the_largest_one_step_drops(tiny_setup, result, tmp_path):
    """rank_by="first_step": of the pool (the most negative J), the k rows whose drop in J after one swap step, run
    here by hand on the same v, is largest; the edits start from those rows."""
    from infusion_lm.text.editors import SwapEditor

    s, _ = tiny_setup, result
    fs = infuse(s["model"], s["tok"], s["dataset"], MEASURE, k=2, rank_by="first_step", pool=6, edit=EDIT,
                work_dir=str(tmp_path), progress=False, influence=InfluenceArguments(batch_size=8))
    pool = torch.argsort(fs.scores.double(), stable=True)[:6].tolist()
    ed = SwapEditor(s["model"], s["tok"], fs.ihvp, EditArguments(budget_fraction=0.15, steps=1, n_candidates=8),
                    target_words=["cat"])
    drops = {i: res.J_before - res.J_after for i, res in zip(pool, ed.edit_many([s["dataset"][i] for i in pool]))}
    assert fs.indices == sorted(pool, key=lambda i: -drops[i])[:2]
    assert [rec["original_input_ids"] for rec in fs.records] == [list(s["dataset"][i]["input_ids"]) for i in fs.indices]


@pytest.mark.parametrize("kwargs, match", [
    ({"rank_by": "drop"}, "select.rank_by must be j or first_step"),
    ({"rank_by": "first_step", "pool": 1}, "select.pool \\(1\\) must be at least select.k \\(2\\)"),
    ({"k": 0}, "select.k must be >= 1"),
    ({"k": 10**6}, "select.k=1000000 exceeds the corpus size"),
    ({"measurement": "dog -> cat"}, "measurement must be a MeasurementArguments"),
    ({"train": []}, "got no training rows"),
    ({"train": [{"body": "x"}]}, "training rows need"),
    ({"influence": InfluenceArguments(preconditioner="optimizer")}, "pass retrain=RetrainArguments"),
])
def test_bad_input_is_one_line(tiny_setup, kwargs, match):
    s = tiny_setup
    call = {"train": s["dataset"], "measurement": MEASURE, "k": 2, **kwargs}
    with pytest.raises(ConfigError, match=match) as err:
        infuse(s["model"], s["tok"], call.pop("train"), call.pop("measurement"), progress=False, **call)
    assert "\n" not in str(err.value)


def test_exported_at_the_top_level():
    assert infusion_lm.infuse is infuse and "infuse" in infusion_lm.__all__ and "InfusionResult" in infusion_lm.__all__
    assert resolve_tracked_modules is infusion_lm.resolve_tracked_modules


@pytest.mark.slow
def test_retrain_arms_pairs_arms_and_compare_reads_them(tiny_setup, result, tmp_path):
    """Arms differ only in their rows: an arm with control's rows retrains to the very same behaviour (Δf exactly 0,
    every seed), the infused rows do not, and another seed is another run."""
    from infusion_lm import compare, retrain_arms

    s, (r, _) = tiny_setup, result
    rows = [dict(s["dataset"][i]) for i in range(len(s["dataset"]))]
    measure = MeasurementArguments(kind="contrastive", probe="dog", target="cat", documents=MEASURE.documents,
                                   heldout_documents=["The dog looked at the lake. The dog swam."])
    retrain = RetrainArguments(learning_rate=1e-3, batch_size=8, epochs=1)
    obs = retrain_arms(s["model"], s["tok"], {"control": rows, "same": rows, "infused": r.apply(rows)}, measure,
                       retrain=retrain, seeds=(0, 1), work_dir=str(tmp_path), progress=False)
    assert set(obs) == {"control", "same", "infused"} and set(obs["control"]) == {0, 1}
    assert set(obs["control"][0]) == {"measurement", "heldout"}
    assert obs["control"][0]["measurement"]["f"] != obs["control"][1]["measurement"]["f"]
    cmp = compare(obs, samples=200)
    assert set(cmp) == {"same", "infused"}
    same = cmp["same"]["measurement"].delta_f  # typed: a Delta (mean, ci, per_seed)
    assert same.mean == 0 and same.ci == (0, 0) and same.per_seed == [0, 0] and not same.excludes_zero
    infused = cmp["infused"]["measurement"]
    assert infused.delta_f.mean != 0 and infused.n_seeds == 2 and infused.delta_f.n_seeds == 2
    assert len(infused.delta_f.per_seed_item) == 2  # every per-seed, per-item difference is kept
    spec = infused.target_specific_gain  # the default candidate words: the target's rise beyond theirs
    assert spec.mean == pytest.approx(infused.delta_logp_target - infused.delta_logp_others, abs=1e-9)
    assert infused.to_dict()["delta_f"]["mean"] == infused.delta_f.mean
    with pytest.raises(ConfigError, match="needs a 'control' arm"):
        retrain_arms(s["model"], s["tok"], {"infused": rows}, measure, retrain=retrain)
    with pytest.raises(ConfigError, match="as many rows as control"):
        retrain_arms(s["model"], s["tok"], {"control": rows, "short": rows[:-1]}, measure, retrain=retrain)


@pytest.mark.slow
def test_no_temporary_folder_is_left_behind(tiny_setup, tmp_path, monkeypatch):
    """Without work_dir, infuse() fits its factors in a temporary folder and removes it once v is built."""
    import tempfile

    s = tiny_setup
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = infuse(s["model"], s["tok"], s["dataset"], MEASURE, k=2, edit=EditArguments(steps=1, n_candidates=4),
               progress=False, influence=InfluenceArguments(batch_size=8))
    assert len(r.indices) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("infusion_")], list(tmp_path.iterdir())


@pytest.mark.slow
def test_retrain_arms_observes_the_measurement_infuse_optimised(tiny_setup, result, tmp_path, monkeypatch):
    """retrain_arms takes the Measurement object itself: its per-batch f adds up to the mean of the log-probability
    differences the contrastive observation reads item by item (f is a mean over probe positions), Δf of an arm with control's rows is exactly 0, and the Trainer's
    temporary folder is removed."""
    import tempfile

    from infusion_lm import compare, retrain_arms
    from infusion_lm.errors import ConfigError

    s, (r, _) = tiny_setup, result
    assert r.measurement is not None and r.measurement.batches
    rows = [dict(s["dataset"][i]) for i in range(len(s["dataset"]))]
    retrain = RetrainArguments(learning_rate=1e-3, batch_size=8, epochs=1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    arms = {"control": rows, "same": rows, "infused": r.apply()}
    obs = retrain_arms(s["model"], s["tok"], arms, r.measurement, heldout_measurement=r.measurement,
                       retrain=retrain, seeds=(0,), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("infusion_")], list(tmp_path.iterdir())
    assert set(obs["control"][0]) == {"measurement", "heldout"}
    control = obs["control"][0]["measurement"]
    assert len(control["f"]) == len(r.measurement.batches)
    # the same behaviour read as a contrastive observation, item by item, on the same retrained arms
    by_args = retrain_arms(s["model"], s["tok"], {"control": rows}, MEASURE, retrain=retrain, seeds=(0,),
                           work_dir=str(tmp_path / "w"), progress=False)
    per_item = by_args["control"][0]["measurement"]["f"]
    assert sum(control["f"]) == pytest.approx(sum(per_item) / len(per_item), rel=1e-4, abs=1e-5)
    cmp = compare(obs, samples=100)
    assert cmp["same"]["measurement"].delta_f.mean == 0
    assert cmp["infused"]["measurement"].delta_f.mean != 0
    with pytest.raises(ConfigError, match="MeasurementArguments or a Measurement"):
        retrain_arms(s["model"], s["tok"], arms, "dog", retrain=retrain)
    with pytest.raises(ConfigError, match="heldout_measurement goes with a Measurement"):
        retrain_arms(s["model"], s["tok"], arms, MEASURE, heldout_measurement=r.measurement, retrain=retrain)
