"""The statistics against hand-computed answers. Each case is asymmetric, so swapping arm and control (or positives
and negatives, or the test's side) gives a different answer and fails the test."""

import numpy as np
import pytest

from infusion_lm.stats import auroc, flip_counts, paired_delta, two_level_bootstrap, wilcoxon_greater


def test_paired_bootstrap_matches_the_exact_resampling_distribution():
    # d = arm − control = [0, 0, 0, 1]: a resampled mean is Binomial(4, 1/4) / 4, whose 2.5% and 97.5% quantiles
    # are 0 (P(X=0) = 0.316) and 0.75 (P(X<=2) = 0.949 < 0.975 <= P(X<=3) = 0.996).
    control = [1.0, 2.0, 3.0, 4.0]
    arm = [1.0, 2.0, 3.0, 5.0]
    d = paired_delta(arm, control, samples=20000, confidence=0.95, seed=0)
    assert d["mean"] == pytest.approx(0.25)
    assert d["ci"] == pytest.approx([0.0, 0.75])


def test_paired_bootstrap_has_no_ci_below_two_items():
    d = paired_delta([2.0], [1.0], samples=1000, confidence=0.95, seed=0)
    assert d["mean"] == 1.0 and d["n"] == 1 and d["ci"] is None


def test_two_level_bootstrap_resamples_seeds_then_items():
    # Two seeds whose items agree within the seed: per-seed means 1 and 3. Resampling 2 seeds gives a mean of
    # 1 (p 1/4), 2 (p 1/2) or 3 (p 1/4): the 95% CI is [1, 3], wider than any item-level CI (which is [2, 2]).
    d = np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    out = two_level_bootstrap(d, samples=20000, confidence=0.95, seed=0)
    assert out["mean"] == pytest.approx(2.0) and out["per_seed"] == [1.0, 3.0]
    assert out["ci"] == pytest.approx([1.0, 3.0])
    # Within one seed, items are resampled: seed means [0, 0, 0, 1] as in the paired case.
    one = two_level_bootstrap(np.array([[0.0, 0.0, 0.0, 1.0]]), samples=20000, confidence=0.95, seed=0)
    assert one["ci"] == pytest.approx([0.0, 0.75])
    assert two_level_bootstrap(np.array([[5.0]]), 1000, 0.95, 0)["ci"] is None


def test_two_level_bootstrap_ci_excludes_zero_only_when_every_seed_agrees():
    agree = two_level_bootstrap(np.array([[0.2, 0.3, 0.25], [0.1, 0.2, 0.15]]), 5000, 0.95, 0)
    assert agree["ci"][0] > 0
    split = two_level_bootstrap(np.array([[0.2, 0.3, 0.25], [-0.3, -0.2, -0.25]]), 5000, 0.95, 0)
    assert split["ci"][0] < 0 < split["ci"][1]


def test_wilcoxon_is_one_sided_for_a_rise():
    # All five differences positive: the exact one-sided p is 1/2^5 = 0.03125 (two-sided would be 0.0625).
    assert wilcoxon_greater([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1 / 32)
    # The same values falling: the target did not rise more than the others, p = 1.
    assert wilcoxon_greater([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(1.0)
    assert wilcoxon_greater([0.0, 0.0, 1.0]) is None


def test_auroc_orientation_with_ties():
    # Pairs (positive, negative): (3,2) 1, (3,1) 1, (2,2) ½, (2,1) 1 → 3.5 / 4.
    assert auroc([3.0, 2.0], [2.0, 1.0]) == pytest.approx(0.875)
    assert auroc([2.0, 1.0], [3.0, 2.0]) == pytest.approx(0.125)
    assert auroc([1.0], [1.0]) == pytest.approx(0.5)
    assert auroc([], [1.0]) is None


def test_flip_counts_count_each_direction():
    arm = [True, True, False, True]
    control = [False, True, True, False]
    assert flip_counts(arm, control) == {"to_target": 2, "away": 1, "n": 4}
    assert flip_counts(control, arm) == {"to_target": 1, "away": 2, "n": 4}
