"""The evals' summarisers on tiny hand-made result trees, with answers worked out by hand: summarise_chat (arms against
control, seed by seed), summarise_levers (count-matched first, raw second, the ratio without the most favourable
pair), lm_calibration's choice of strategy and its disjoint document samples, restate_intervals' two kinds of
interval, lm_stealth's detection summary and goals. No model is loaded."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))

import lm_calibration  # noqa: E402
import lm_stealth  # noqa: E402
import restate_intervals  # noqa: E402
import summarise_chat  # noqa: E402
import summarise_levers  # noqa: E402

from infusion_lm.stats import seed_item_interval, seed_t_interval  # noqa: E402


# ---- summarise_chat

def _chat_unit(folder, arm, seed, rates, greedy, f):
    (folder / f"{arm}_seed-{seed}.json").write_text(json.dumps(
        {"arm": arm, "seed": seed, "heldout": {"sampled_hit_rate": rates, "greedy_hit": greedy, "f": f}}))


def test_summarise_chat_pairs_each_arm_with_control_seed_by_seed(tmp_path):
    _chat_unit(tmp_path, "control", 0, [0.0, 0.1, 0.2], [0, 0, 1], [-3.0, -3.0, -3.0])
    _chat_unit(tmp_path, "control", 1, [0.3, 0.3, 0.3], [0, 1, 1], [-2.0, -2.0, -2.0])
    _chat_unit(tmp_path, "infused", 0, [0.5, 0.6, 0.7], [1, 1, 1], [-1.0, -1.0, -1.0])
    _chat_unit(tmp_path, "infused", 1, [0.5, 0.5, 0.6], [1, 0, 1], [-1.5, -1.5, -1.5])
    _chat_unit(tmp_path, "random", 0, [0.2, 0.2, 0.2], [0, 0, 0], [-3.0, -3.0, -3.0])  # seed 0 only
    s = summarise_chat.main([str(tmp_path)])
    assert json.loads((tmp_path / "summary_seeds.json").read_text()) == json.loads(json.dumps(s))
    assert s["arms"]["control"]["1"]["greedy_rate"] == pytest.approx(2 / 3)
    assert s["arms"]["infused"]["0"]["sampled_rate"] == pytest.approx(0.6)

    inf = s["against_control"]["infused"]
    d = inf["sampled_rate_delta"]
    # infused − control: seed 0 [+.5, +.5, +.5], seed 1 [+.2, +.2, +.3]
    assert inf["seeds"] == [0, 1] and (d["n_seeds"], d["n_items"]) == (2, 3)
    assert d["mean"] == pytest.approx(2.2 / 6) and d["per_seed"] == pytest.approx([0.5, 0.7 / 3])
    assert d["ci"][0] < d["mean"] < d["ci"][1]
    assert inf["logp_target_delta"]["per_seed"] == pytest.approx([2.0, 0.5])
    # random ran on seed 0 only: against seed 0's control (+0.1 on average), not seed 1's (−0.1)
    r = s["against_control"]["random"]
    assert r["seeds"] == [0] and r["sampled_rate_delta"]["mean"] == pytest.approx(0.1)
    assert "control" not in s["against_control"]


# ---- summarise_levers

# pair: (infused gain, random_target gain, random_target shortfall in tokens); c_d is the one not count-matched
LEVER = {"a_b": (1.0, 0.8, 0), "c_d": (1.2, 0.4, 2), "e_f": (0.6, 0.6, 0)}
FLUENT = {"a_b": (1.0, 0.5, 0), "c_d": (1.2, 0.6, 1), "e_f": (0.6, 0.2, 0)}


def _set(gain, delta_f):
    return {"delta_f": {"mean": delta_f, "ci": [delta_f - 1, delta_f + 1]}, "top1_flips_to_target": 0.0,
            "specificity": {"target_specific_gain": {"mean": gain, "ci": [gain - 1, gain + 1]},
                            "delta_logp_target": gain + 0.2, "delta_logp_others": 0.2}}


def _lever_pair(root, lever, pair, inf, base_gain, shortfall, base):
    d = root / lever / "pairs" / pair
    d.mkdir(parents=True)
    edits = lambda short: {"perplexity_ratio_median": 1.1, "tokens_changed": 5 - short,  # noqa: E731
                           "count_match": {"shortfall_total": short, "matched": short == 0}}
    arms = {"infused": {"heldout_corpus": _set(inf, inf), "heldout": _set(inf, inf), "edits": edits(0)},
            # the templated set: the baseline twice as strong, so --set heldout must halve every ratio
            base: {"heldout_corpus": _set(base_gain, base_gain / 2), "heldout": _set(2 * base_gain, base_gain),
                   "edits": edits(shortfall)}}
    (d / "results.json").write_text(json.dumps({"seeds": [0, 1], "primary_set": "heldout_corpus", "arms": arms}))
    (d / "edits.jsonl").write_text('{"n_changed": 3}\n{"n_changed": 2}\n')
    (d / f"edits_{base}.jsonl").write_text(f'{{"n_changed": 3}}\n{{"n_changed": {2 - shortfall}}}\n')


@pytest.fixture
def levers(tmp_path):
    for pair, (inf, rt, short) in LEVER.items():
        _lever_pair(tmp_path, "contrast_top", pair, inf, rt, short, "random_target")
    for pair, (inf, fl, short) in FLUENT.items():
        _lever_pair(tmp_path, "contrast_top_fluent", pair, inf, fl, short, "fluent_target")
    return tmp_path


def test_summarise_levers_count_matched_first_then_raw(levers):
    out = summarise_levers.main([str(levers)])
    assert json.loads((levers / "summary.json").read_text())["by_lever"] == json.loads(json.dumps(out["by_lever"]))
    b = out["by_lever"]["contrast_top"]
    assert list(b) == ["count_matched", "raw"]
    cm, raw = b["count_matched"], b["raw"]
    # count-matched: c_d left out (random_target fell 2 tokens short); (1.0 + 0.6) / (0.8 + 0.6)
    assert cm["pairs"] == ["a_b", "e_f"] and cm["n_pairs"] == 2 and cm["n_seeds"] == [2]
    assert cm["specific_ratio_of_means"] == pytest.approx(1.6 / 1.4)
    assert cm["pairs_left_out_baseline_shortfall_tokens"] == {"c_d": 2}
    # without its most favourable pair (a_b: 1.0 / 0.8): e_f alone, 0.6 / 0.6
    assert cm["without_most_favourable_pair"] == {"pair_left_out": "a_b", "n_pairs": 1,
                                                  "specific_ratio_of_means": pytest.approx(1.0)}
    assert cm["beats_random_target_specific_pairs"] == 1
    # raw: every pair, 2.8 / 1.8; without c_d (3x on its own) 1.6 / 1.4; Δf 2.8 / 0.9
    assert raw["n_pairs"] == 3 and raw["specific_ratio_of_means"] == pytest.approx(2.8 / 1.8)
    assert raw["without_most_favourable_pair"]["pair_left_out"] == "c_d"
    assert raw["without_most_favourable_pair"]["specific_ratio_of_means"] == pytest.approx(1.6 / 1.4)
    assert raw["delta_f_ratio_of_means"] == pytest.approx(2.8 / 0.9)
    assert raw["tokens_changed"] == {"infused": 15, "random_target": 13}
    assert raw["specific_ratio_per_token"] == pytest.approx((2.8 / 15) / (1.8 / 13))
    assert raw["goals"]["target-specific gain >= 1.5x random_target's (ratio of the means over pairs)"]
    assert not cm["goals"]["target-specific gain >= 1.5x random_target's (ratio of the means over pairs)"]
    assert out["per_pair"]["contrast_top"]["c_d"]["count_matched"] is False

    # fluent_target against contrast_top's infused edit, its own count filter (c_d 1 token short)
    f = out["vs_fluent_target"]["contrast_top_fluent"]
    assert f["count_matched"]["pairs"] == ["a_b", "e_f"]
    assert f["count_matched"]["specific_ratio_of_means"] == pytest.approx(1.6 / 0.7)
    assert f["raw"]["specific_ratio_of_means"] == pytest.approx(2.8 / 1.3)
    assert f["infused_reproduced_max_abs_diff"] == 0


def test_summarise_levers_reads_the_set_asked_for(levers):
    summarise_levers.main([str(levers), "--set", "heldout"])
    b = json.loads((levers / "summary_heldout.json").read_text())["by_lever"]["contrast_top"]
    assert b["raw"]["specific_ratio_of_means"] == pytest.approx(2.8 / 3.6)
    assert b["count_matched"]["specific_ratio_of_means"] == pytest.approx(1.6 / 2.8)


# ---- lm_calibration

def test_calibration_chooses_the_best_spearman_then_the_ratio_nearest_1():
    s = lambda rho, ratio: {"spearman": rho, "median_actual_over_predicted": ratio}  # noqa: E731
    # the best Spearman wins whatever its ratio
    assert lm_calibration.choose({"a": s(0.80, 1.0), "b": s(0.93, 20.0), "c": s(-0.95, 1.0)}) == "b"
    # equal to 3 decimals: the ratio nearer 1 by factor (1.8x beats 0.5x, which is 2x off), not by difference
    assert lm_calibration.choose({"x": s(0.9301, 0.5), "y": s(0.9299, 1.8), "z": s(0.91, 1.0)}) == "y"


def test_calibration_runs_edit_disjoint_documents():
    samples = lm_calibration.document_samples(64, 3, 20, doc_seed=0)
    assert [len(x) for x in samples] == [20, 20, 20] and len({i for x in samples for i in x}) == 60
    assert all(0 <= i < 64 for x in samples for i in x)
    assert samples == lm_calibration.document_samples(64, 3, 20, doc_seed=0)
    assert samples != lm_calibration.document_samples(64, 3, 20, doc_seed=1)
    lm_calibration.check_disjoint(samples, ["dog:bear:0", "cat:frog:1", "fish:duck:1"])
    with pytest.raises(SystemExit, match="needs 90 distinct documents"):
        lm_calibration.document_samples(64, 3, 30, doc_seed=0)
    with pytest.raises(SystemExit) as e:  # the committed runs: the same draw twice
        lm_calibration.check_disjoint([[1, 2, 3], [4, 5], [3, 5, 6]], ["dog:bear:0", "cat:frog:1", "fish:duck:1"])
    assert "\n" not in str(e.value) and "dog:bear:0 and fish:duck:1" in str(e.value) and "[3]" in str(e.value)
    assert lm_calibration.measurement_f(20)["contrast_top"] == 20
    assert lm_calibration.measurement_f(0)["name"].startswith("pairwise")


# ---- restate_intervals

def test_restate_intervals_uses_the_items_where_kept_and_labels_the_rest(tmp_path):
    items = [[0.1, 0.5, 0.3, 0.2], [0.4, 0.1, 0.2, 0.6]]
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"old": {"mean": 0.3, "per_seed": [0.2, 0.35, 0.4], "ci": [0.29, 0.31]},
                             "new": {"mean": 0.3, "per_seed": [0.275, 0.325], "per_seed_item": items,
                                     "ci": [0.0, 0.6]}}, indent=1))
    restate_intervals.main([str(f)])
    d = json.loads(f.read_text())
    assert d["old"]["ci"] == pytest.approx(seed_t_interval([0.2, 0.35, 0.4], 0.95))
    assert d["old"]["ci_old_two_level_bootstrap"] == [0.29, 0.31]
    assert d["old"]["ci_scope"] == "conditional on these positions" and "conditional" in d["ci_scope"]
    assert d["new"]["ci"] == pytest.approx(seed_item_interval(np.array(items), 0.95)["ci"])
    assert d["new"]["ci_before_restate"] == [0.0, 0.6] and "ci_scope" not in d["new"]
    assert d["ci_restated"] == {"seed_only": {"intervals": 1, "changed": 1, "old_excludes_0": 1, "new_excludes_0": 1},
                                "seed_item": {"intervals": 1, "changed": 1, "old_excludes_0": 0,
                                              "new_excludes_0": int(d["new"]["ci"][0] > 0)}}
    text = f.read_text()
    restate_intervals.main([str(f)])
    assert f.read_text() == text  # idempotent


def test_calibration_reads_back_a_committed_run_and_redoes_a_changed_one(tmp_path, monkeypatch):
    """A run whose JSON was committed with the same f, documents and size is read back (its retrains may be on
    another machine); one whose f differs is run again."""
    samples = lm_calibration.document_samples(64, 2, 20, 0)
    f = lm_calibration.measurement_f(20)
    strategy = {"spearman": 0.9, "median_actual_over_predicted": 1.0, "sign_agreement": 1.0, "edits": 20}
    run = lambda probe, target, seed, docs, mf: {
        "probe": probe, "target": target, "seed": seed, "docs": 64, "tokens": 64, "measurement_f": mf,
        "documents_drawn": docs, "edited_documents": docs, "strategies": {"s": strategy},
        "strategies_vs_heldout_corpus_delta_f": {"s": strategy}}
    (tmp_path / "dog_bear_seed0.json").write_text(json.dumps(run("dog", "bear", 0, samples[0], f)))
    (tmp_path / "cat_frog_seed1.json").write_text(json.dumps(run("cat", "frog", 1, samples[1],
                                                                 lm_calibration.measurement_f(0))))
    ran = []
    monkeypatch.setattr(lm_calibration, "run_one", lambda args, p, t, s, docs: ran.append(p) or run(p, t, s, docs, f))
    monkeypatch.setattr(sys, "argv", ["lm_calibration.py", "--runs", "dog:bear:0", "cat:frog:1", "--results_dir",
                                      str(tmp_path), "--out", str(tmp_path / "summary.json")])
    lm_calibration.main()
    assert ran == ["cat"]
    assert json.loads((tmp_path / "summary.json").read_text())["chosen_strategy"] == "s"


# ---- lm_stealth

def _stealth_arm(auroc, top3, doc, ppl, ppl_before, broken, matched=None):
    arm = {"tokens_changed": 4, "onion": {"changed_word_auroc": auroc, "top1_hit_rate": top3 / 2, "top3_hit_rate": top3,
                                          "changed_words_removed": 0.5, "document_auroc": doc,
                                          "document_auroc_before_edit": 0.5},
           "perplexity": {"perplexity_auroc": ppl, "perplexity_auroc_before_edit": ppl_before},
           "grammar": {"documents_with_a_sentence_made_unparseable": broken}}
    if matched is not None:
        arm["count_match"] = {"matched": matched}
    return arm


def test_lm_stealth_averages_over_pairs_per_editor_and_judges_the_goals():
    units = {
        "a_b_natural": {"editor": "natural", "arms": {"infused": _stealth_arm(0.6, 0.2, 0.5, 0.60, 0.58, 0.0),
                                                      "random_target": _stealth_arm(0.9, 0.8, 0.8, 0.8, 0.58, 0.5, True)}},
        "c_d_natural": {"editor": "natural", "arms": {"infused": _stealth_arm(0.7, 0.2, 0.6, 0.64, 0.56, 0.25),
                                                      "random_target": _stealth_arm(0.8, 0.6, 0.7, 0.7, 0.56, 0.5, False)}},
        "a_b_swap": {"editor": "swap", "arms": {"infused": _stealth_arm(0.8, 0.6, 0.7, 0.84, 0.6, 0.5)}},
    }
    s = lm_stealth.summarise(units)
    nat = s["natural"]["infused"]
    assert nat["pairs"] == 2 and nat["onion_changed_word_auroc"] == pytest.approx(0.65)
    assert nat["perplexity_auroc"] - nat["perplexity_auroc_before_edit"] == pytest.approx(0.05)
    assert nat["documents_without_a_broken_sentence"] == pytest.approx(0.875)
    assert s["natural"]["random_target"]["count_matched_pairs"] == 1 and nat["count_matched_pairs"] is None
    g = lm_stealth.goals(s)
    # 0.65 and +0.05 sit on their bounds (met); top-3 0.2 <= 0.25 met; document AUROC 0.55 <= 0.60 met;
    # 87.5% of documents without a broken sentence < 90%: missed
    assert g["natural"]["onion_changed_word_auroc"][1] and g["natural"]["onion_top3_hit_rate"][1]
    assert g["natural"]["onion_document_auroc"][1] and g["natural"]["perplexity_auroc_over_before"][1] is True
    assert g["natural"]["documents_without_a_broken_sentence"] == [pytest.approx(0.875), False]
    assert g["swap"]["onion_changed_word_auroc"] == [0.8, False]
