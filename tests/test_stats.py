"""The statistics against hand-computed answers. Each case is asymmetric, so swapping arm and control (or positives
and negatives, or the test's side) gives a different answer and fails the test."""

import numpy as np
import pytest

from infusion_lm import stats
from infusion_lm.stats import auroc, flip_counts, paired_delta, seed_item_interval


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


def test_seed_item_interval_against_scipy_t_intervals():
    from scipy.stats import t

    # Seeds only (items agree within a seed): seed means 1 and 3, a t-interval with 1 degree of freedom,
    # 2 ± 12.706 · 1. The old percentile bootstrap gave [1, 3].
    out = seed_item_interval(np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]), 0.95)
    assert out["mean"] == pytest.approx(2.0) and out["per_seed"] == [1.0, 3.0]
    assert out["ci"] == pytest.approx(list(t.interval(0.95, 1, loc=2.0, scale=1.0)))
    # One seed: the item t-interval, mean 0.25, se 0.25, 3 degrees of freedom.
    one = seed_item_interval(np.array([[0.0, 0.0, 0.0, 1.0]]), 0.95)
    assert one["ci"] == pytest.approx(list(t.interval(0.95, 3, loc=0.25, scale=0.25)))
    assert "not measured" in one["seed_noise"]
    assert seed_item_interval(np.array([[5.0]]), 0.95)["ci"] is None
    # every per-seed, per-item difference is kept
    assert seed_item_interval(np.array([[1.0, 2.0], [3.0, 4.0]]), 0.95)["per_seed_item"] == [[1.0, 2.0], [3.0, 4.0]]


def test_seed_item_interval_excludes_zero_only_when_seeds_agree():
    agree = seed_item_interval(np.array([[0.2, 0.3, 0.25], [0.21, 0.31, 0.26], [0.19, 0.29, 0.24]]), 0.95)
    assert agree["ci"][0] > 0
    split = seed_item_interval(np.array([[0.2, 0.3, 0.25], [-0.3, -0.2, -0.25]]), 0.95)
    assert split["ci"][0] < 0 < split["ci"][1]


def _old_two_level_bootstrap(d, samples, confidence, seed):
    """The interval this module used before: items drawn independently within each resampled seed."""
    S, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(samples, S))
    items = rng.integers(0, n, size=(samples, S, n))
    means = d[seeds[:, :, None], items].mean(axis=(1, 2))
    return np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])


def _null_trials(S, n, seed_sd, item_sd, trials, rng, noise_sd=0.3):
    """[trials, S, n] differences with true mean 0: a seed effect, an item effect shared by the seeds, noise."""
    return (rng.normal(0, seed_sd, (trials, S, 1)) + rng.normal(0, item_sd, (trials, 1, n))
            + rng.normal(0, noise_sd, (trials, S, n)))


def _false_positives(trials):
    return np.mean([not (c[0] <= 0 <= c[1]) for c in (seed_item_interval(d, 0.95)["ci"] for d in trials)])


# (seed sd, item sd, noise sd): items dominating; the "equal raw variance"; the seed share of the grand mean's
# variance near 0.8–0.9, where plain Satterthwaite leaked most (12.9% at S = 2); seeds alone dominating.
REGIMES = {"item-dominated": (0.1, 1.0, 0.3), "equal-raw-variance": (1.0, 1.0, 1.0),
           "seed-share-0.85": (None, 1.0, 1.0), "seed-dominated": (1.0, 0.1, 0.3)}


def _seed_sd(S, n, regime):
    seed_sd, item_sd, noise_sd = REGIMES[regime]
    if seed_sd is None:  # Var(a)/S = 0.85 / 0.15 × (Var(b)/n + Var(e)/(S·n))
        seed_sd = np.sqrt(S * 0.85 / 0.15 * (item_sd ** 2 / n + noise_sd ** 2 / (S * n)))
    return seed_sd, item_sd, noise_sd


@pytest.mark.parametrize("S", [2, 3])
@pytest.mark.parametrize("n", [6, 60])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_seed_item_interval_holds_its_level_under_the_null(S, n, regime):
    """False positives at nominal 95% over 2,000 null trials: at most 6% in every cell, S = 2 included. The full grid
    (S ∈ {2, 3, 5}, seed shares 0 to 0.99, 20,000 trials a cell) is evals/interval_coverage.py."""
    seed_sd, item_sd, noise_sd = _seed_sd(S, n, regime)
    rng = np.random.default_rng(1000 * S + n + 7 * list(REGIMES).index(regime))
    fp = _false_positives(_null_trials(S, n, seed_sd, item_sd, 2000, rng, noise_sd))
    assert fp <= 0.06, fp


def test_plain_satterthwaite_fails_the_null_simulation(monkeypatch):
    """The check above has teeth: with plain Welch–Satterthwaite degrees of freedom (the interval before the guard)
    two seeds whose means happen to agree get ~n − 1 degrees of freedom, and the 95% CI excludes 0 about twice too
    often where the seed share is high."""
    monkeypatch.setattr(stats, "guarded_df", stats._satterthwaite)
    seed_sd, item_sd, noise_sd = _seed_sd(2, 60, "seed-share-0.85")
    fp = _false_positives(_null_trials(2, 60, seed_sd, item_sd, 2000, np.random.default_rng(5), noise_sd))
    assert fp > 0.09, fp


def test_guarded_df_is_never_above_satterthwaite_and_falls_to_the_seeds_when_they_agree_by_chance():
    parts = [(0.01, 1), (0.05, 59)]  # two seeds that happened to agree, 60 items
    plain = stats._satterthwaite(parts)
    assert plain > 20  # what made t fall to ~2
    guarded = stats.guarded_df(parts)
    assert 1 <= guarded < 3
    assert stats.guarded_df([(0.2, 4)]) == 4
    # a seed piece negligible even at its upper bound leaves the items' degrees of freedom nearly intact
    tiny = [(1e-6, 2), (0.05, 59)]
    assert 55 < stats.guarded_df(tiny) <= stats._satterthwaite(tiny)


def test_p_greater_is_the_one_sided_test_the_interval_inverts():
    from scipy.stats import t, ttest_1samp

    # one seed, or one item: scipy's one-sample t-test, one-sided
    items = np.array([0.3, -0.1, 0.2, 0.5, 0.05])
    assert seed_item_interval(items[None, :], 0.95)["p_greater"] == pytest.approx(
        ttest_1samp(items, 0.0, alternative="greater").pvalue)
    assert seed_item_interval(items[:, None], 0.95)["p_greater"] == pytest.approx(
        ttest_1samp(items, 0.0, alternative="greater").pvalue)

    d = np.array([[0.3, 0.1, 0.2, 0.5], [0.2, 0.0, 0.3, 0.4], [0.4, 0.2, 0.1, 0.6]])
    out = seed_item_interval(d, 0.95)
    se = (out["ci"][1] - out["mean"]) / t.ppf(0.975, out["df"])
    assert out["p_greater"] == pytest.approx(t.sf(out["mean"] / se, out["df"]))
    # the two-sided 95% CI excludes 0 exactly when the one-sided p is below 0.025
    assert (out["ci"][0] > 0) == (out["p_greater"] < 0.025)
    flipped = seed_item_interval(-d, 0.95)
    assert flipped["p_greater"] == pytest.approx(1 - out["p_greater"])


def test_the_old_bootstrap_fails_the_null_simulation():
    """The check above has teeth: the interval it replaced excludes 0 far more often than 5%."""
    rng = np.random.default_rng(0)
    trials = _null_trials(3, 6, 1.0, 0.1, 300, rng)
    fp = np.mean([not (c[0] <= 0 <= c[1]) for c in (_old_two_level_bootstrap(d, 400, 0.95, 0) for d in trials)])
    assert fp > 0.15, fp


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
