"""Hand-derived tests for dashboards.stats (IQM, bootstrap intervals, probability of improvement, profiles, paired).

Torchtune style: every expected number is worked out by hand in a comment next to it. Bootstrap bounds are checked
on tiny samples whose bootstrap distribution has few atoms: with 2000 replicates the percentile bounds land on a
known atom with a wide margin (e.g. an atom of probability 1/4 holds ~500 replicates, while the 2.5% quantile sits at
replicate ~50), so the seeded result is the hand value, not a number copied from a run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dashboards import stats
from dashboards.stats import (
    Estimate,
    PairedDifference,
    benchmark_ci,
    bootstrap_ci,
    iqm,
    paired_difference,
    performance_profile,
    performance_profile_band,
    probability_of_improvement,
    probability_of_improvement_ci,
)

pytestmark = pytest.mark.unit


# -- iqm ----------------------------------------------------------------------------------------------------------


def test_iqm_n_divisible_by_4():
    # n=8: int(0.25*8)=2 cut each end -> [3,4,5,6] -> (3+4+5+6)/4 = 18/4 = 4.5
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == 4.5


def test_iqm_n_not_divisible_by_4_cuts_int_of_a_quarter():
    # n=5: int(0.25*5)=int(1.25)=1 cut each end -> [2,3,4] -> 9/3 = 3 (the outlier 100 is cut)
    assert iqm([1, 2, 3, 4, 100]) == 3.0
    # n=6: int(1.5)=1 cut each end -> [2,3,4,5] -> 14/4 = 3.5 (only 1/6 cut each side, not 1/4)
    assert iqm([1, 2, 3, 4, 5, 100]) == 3.5
    # n=3: int(0.75)=0 cut -> plain mean (1+2+6)/3 = 3
    assert iqm([1, 2, 6]) == 3.0


def test_iqm_cuts_a_quarter_not_less():
    # n=8, skewed: sorted [0,0,1,2,3,4,10,100]; cut 2 each end -> [1,2,3,4] -> 10/4 = 2.5
    # (cutting only 1 each end would give (0+1+2+3+4+10)/6 = 20/6 = 3.33)
    assert iqm([100, 0, 10, 1, 4, 2, 0, 3]) == 2.5


def test_iqm_flattens_a_matrix():
    # runs x tasks [[1,2,3,4],[5,6,7,8]] -> same 8 values as above -> 4.5
    assert iqm([[1, 2, 3, 4], [5, 6, 7, 8]]) == 4.5


# -- Estimate -----------------------------------------------------------------------------------------------------


def test_estimate_str_format():
    # 3 decimals, interval written out: 0.5123 -> 0.512, 0.4311 -> 0.431, 0.5899 -> 0.590
    assert str(Estimate(0.5123, 0.4311, 0.5899, 3)) == "0.512 [0.431, 0.590] (n=3)"


def test_estimate_is_frozen():
    with pytest.raises(AttributeError):
        Estimate(1.0, 0.0, 2.0, 1).value = 3.0


# -- bootstrap_ci -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["mean", "iqm", "median"])
def test_bootstrap_constant_sample_has_zero_width(statistic):
    # every resample of [2,2,2,2] is [2,2,2,2] -> every statistic is 2 -> value = low = high = 2
    assert bootstrap_ci([2.0, 2.0, 2.0, 2.0], statistic) == Estimate(2.0, 2.0, 2.0, 4)


def test_bootstrap_single_element_collapses_to_the_value():
    # n=1: the only resample is [0.7] -> low = high = value = 0.7; n=1 tells the reader there is no spread
    assert bootstrap_ci([0.7]) == Estimate(0.7, 0.7, 0.7, 1)


def test_bootstrap_two_point_mean():
    # [0,1], resample of size 2: (0,0) p=1/4 -> 0; (0,1),(1,0) p=1/2 -> 0.5; (1,1) p=1/4 -> 1
    # 95%: 2.5% quantile inside the 1/4 atom at 0, 97.5% quantile inside the 1/4 atom at 1 -> [0, 1]; value 0.5
    assert bootstrap_ci([0.0, 1.0]) == Estimate(0.5, 0.0, 1.0, 2)
    # 40%: quantiles 0.30 and 0.70; P(<=0)=0.25 < 0.30 and P(<=0.5)=0.75 > 0.70 -> both are 0.5 -> [0.5, 0.5]
    assert bootstrap_ci([0.0, 1.0], level=0.4) == Estimate(0.5, 0.5, 0.5, 2)
    # 60%: quantiles 0.20 < 0.25 (-> 0) and 0.80 > 0.75 (-> 1) -> [0, 1]
    assert bootstrap_ci([0.0, 1.0], level=0.6) == Estimate(0.5, 0.0, 1.0, 2)


def test_bootstrap_median_of_two_equals_mean_of_two():
    # with n=2 the median of a resample (u, v) is (u+v)/2, its mean; same seed -> same indices -> same Estimate
    assert bootstrap_ci([0.3, 0.9], "median") == bootstrap_ci([0.3, 0.9], "mean")


def test_bootstrap_iqm_of_four_equals_median_of_four():
    # n=4: the IQM cuts int(0.25*4)=1 each end and averages the middle 2 = the median of 4 values.
    # Same seed -> same resamples -> identical Estimates; value: sorted [0.1,0.2,0.6,5] -> (0.2+0.6)/2 = 0.4
    x = [0.6, 5.0, 0.1, 0.2]
    e = bootstrap_ci(x, "iqm")
    assert e == bootstrap_ci(x, "median")
    assert e.value == pytest.approx(0.4)
    # and a callable computing the same statistic gives the same interval as the named one
    assert bootstrap_ci(x, np.mean) == pytest.approx(bootstrap_ci(x, "mean"))


def test_bootstrap_callable_statistic():
    # max of a resample of [0,1]: 0 only for (0,0), p=1/4; else 1, p=3/4. value = max(0,1) = 1
    # 95%: 2.5% quantile in the 1/4 atom at 0 -> low 0; high 1
    assert bootstrap_ci([0.0, 1.0], np.max) == Estimate(1.0, 0.0, 1.0, 2)
    # 40%: quantile 0.30 > P(0)=0.25 -> low = 1 -> [1, 1]
    assert bootstrap_ci([0.0, 1.0], np.max, level=0.4) == Estimate(1.0, 1.0, 1.0, 2)


def test_bootstrap_stratified_constant_strata_have_zero_width():
    # strata a: [0,0], b: [1,1]. Within a stratum every resample is the stratum itself, so the pooled resample is
    # always [0,0,1,1] -> mean 0.5 in every replicate -> [0.5, 0.5], although the pooled sample is not constant.
    x, strata = [0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]
    assert bootstrap_ci(x, strata=strata) == Estimate(0.5, 0.5, 0.5, 4)
    # unstratified: mean of 4 draws = Binomial(4, 1/2)/4; P(0) = P(1) = 1/16 = 0.0625 > 0.025 -> [0, 1]
    assert bootstrap_ci(x) == Estimate(0.5, 0.0, 1.0, 4)


def test_bootstrap_stratified_keeps_stratum_sizes():
    # stratum a = [0] (size 1, always 0), stratum b = [0, 1]: pooled resample [0, u, v], mean (u+v)/3 with
    # (u+v) in {0: 1/4, 1: 1/2, 2: 1/4} -> 95% interval [0, 2/3]; value (0+0+1)/3 = 1/3
    e = bootstrap_ci([0.0, 0.0, 1.0], strata=[0, 1, 1])
    assert (e.value, e.low, e.high, e.n) == (pytest.approx(1 / 3), 0.0, pytest.approx(2 / 3), 3)


def test_bootstrap_is_reproducible_and_seeded():
    x = np.linspace(0, 1, 50) ** 2
    assert bootstrap_ci(x, "iqm", seed=3) == bootstrap_ci(x, "iqm", seed=3)
    assert bootstrap_ci(x, "iqm", seed=3) != bootstrap_ci(x, "iqm", seed=4)


# -- benchmark_ci -------------------------------------------------------------------------------------------------


def test_benchmark_one_seed_two_problems_resamples_problems():
    # [[0,1]]: one seed (rows fixed), problems resampled: score 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4
    # -> 95% [0, 1]; 40% [0.5, 0.5] (as for bootstrap_ci([0,1])); value (0+1)/2 = 0.5; n counts seeds = 1
    assert benchmark_ci([[0.0, 1.0]]) == Estimate(0.5, 0.0, 1.0, 1)
    assert benchmark_ci([[0.0, 1.0]], level=0.4) == Estimate(0.5, 0.5, 0.5, 1)


def test_benchmark_two_seeds_one_problem_resamples_seeds():
    # [[0],[1]]: one problem, seeds resampled: same three-atom distribution -> 95% [0, 1], 40% [0.5, 0.5]; n = 2
    assert benchmark_ci([[0.0], [1.0]]) == Estimate(0.5, 0.0, 1.0, 2)
    assert benchmark_ci([[0.0], [1.0]], level=0.4) == Estimate(0.5, 0.5, 0.5, 2)


def test_benchmark_value_is_the_plain_mean():
    # [[1,0,1],[0,0,1]]: per-problem seed means 0.5, 0, 1 -> mean over problems 1.5/3 = 0.5 (= mean of all 6 cells)
    assert benchmark_ci([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).value == 0.5


def test_benchmark_interval_covers_problems_not_just_seeds():
    # 3 seeds x 30 problems with per-problem difficulty: problem spread dominates seed spread, so the two-way
    # interval must be wider than the seeds-only interval of the 3 per-seed means
    rng = np.random.default_rng(0)
    correct = (rng.random((3, 30)) < rng.random(30)).astype(float)
    both = benchmark_ci(correct)
    seeds_only = bootstrap_ci(correct.mean(axis=1))
    assert both.value == pytest.approx(correct.mean())
    assert both.low <= both.value <= both.high
    assert both.high - both.low > seeds_only.high - seeds_only.low


# -- probability of improvement -----------------------------------------------------------------------------------


def test_probability_of_improvement_by_hand():
    # x=[1,2,3], y=[2,2,0]: 9 pairs (x_i, y_j), win 1, tie 1/2, loss 0
    #   x=1: vs 2 loss, vs 2 loss, vs 0 win        -> 1
    #   x=2: vs 2 tie,  vs 2 tie,  vs 0 win        -> 0.5 + 0.5 + 1 = 2
    #   x=3: vs 2 win,  vs 2 win,  vs 0 win        -> 3
    # total 6 / 9 = 2/3 (scipy's U for x is 6: wins plus half ties)
    assert probability_of_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(2 / 3)
    # swapped, per y: y=2 vs [1,2,3]: win, tie, loss -> 1.5, twice -> 3; y=0: three losses -> 0
    # total 3 / 9 = 1/3 = 1 - 2/3
    assert probability_of_improvement([2, 2, 0], [1, 2, 3]) == pytest.approx(1 / 3)


def test_probability_of_improvement_all_ties_is_one_half():
    # 4 pairs, all ties -> 4 * 0.5 / 4 = 0.5
    assert probability_of_improvement([1, 1], [1, 1]) == 0.5


def test_probability_of_improvement_ci():
    # x all above y: every resample of x beats every resample of y -> 1 in every replicate -> [1, 1]; n = min(2, 3)
    assert probability_of_improvement_ci([5, 6], [1, 2, 3]) == Estimate(1.0, 1.0, 1.0, 2)
    # x=[0,1], y=[0.5]: PI of a resample = fraction of 1s in it: {0: 1/4, 0.5: 1/2, 1: 1/4} -> 95% [0, 1]; value 0.5
    assert probability_of_improvement_ci([0, 1], [0.5]) == Estimate(0.5, 0.0, 1.0, 1)
    # x=[1,1], y=[1]: every pair of every replicate ties -> 0.5 in every replicate -> [0.5, 0.5]
    assert probability_of_improvement_ci([1, 1], [1]) == Estimate(0.5, 0.5, 0.5, 1)


# -- performance profiles -----------------------------------------------------------------------------------------


def test_performance_profile_strictly_greater():
    # scores [0.1,0.5,0.5,0.9]: tau 0 -> 4/4 = 1; tau 0.5 -> only 0.9 (0.5 is not > 0.5) -> 1/4; tau 0.95 -> 0
    np.testing.assert_array_equal(performance_profile([0.1, 0.5, 0.5, 0.9], [0, 0.5, 0.95]), [1.0, 0.25, 0.0])


def test_performance_profile_keeps_the_shape_of_taus():
    # scores [1,2,3,4]: tau 0 -> 1, 1.5 -> 3/4, 2.5 -> 2/4, 3.5 -> 1/4
    out = performance_profile([1, 2, 3, 4], [[0, 1.5], [2.5, 3.5]])
    np.testing.assert_array_equal(out, [[1.0, 0.75], [0.5, 0.25]])


def test_performance_profile_band():
    # scores [0,1], tau 0.5: fraction of 1s in a resample: {0: 1/4, 0.5: 1/2, 1: 1/4} -> 95% band [0, 1]
    # tau -1: every score is above -> 1 in every replicate -> [1, 1]; tau 2 -> [0, 0]
    low, high = performance_profile_band([0.0, 1.0], [-1.0, 0.5, 2.0])
    np.testing.assert_array_equal(low, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(high, [1.0, 1.0, 0.0])
    # 40%: the middle atom 0.5 for both bounds (as in the two-point bootstrap above)
    low, high = performance_profile_band([0.0, 1.0], [0.5], level=0.4)
    np.testing.assert_array_equal((low, high), ([0.5], [0.5]))


# -- paired_difference --------------------------------------------------------------------------------------------


def test_paired_difference_by_hand():
    # a=[1,1,0,1,0], b=[0,1,0,0,0] -> d=[1,0,0,1,0]: mean 2/5 = 0.4; wins 2 (problems 0, 3), losses 0, ties 3
    # sign test over the 2 non-tied problems, two-sided: P(2 wins) + P(0 wins) = (1/2)^2 + (1/2)^2 = 0.5
    # CI: a resample's mean is Binomial(5, 0.4)/5. P(0) = 0.6^5 = 0.078 > 0.025 -> low 0;
    #     P(1) = 0.4^5 = 0.010 < 0.025 but P(>=0.8) = 5*0.4^4*0.6 + 0.4^5 = 0.0768 + 0.0102 = 0.087 > 0.025 -> high 0.8
    r = paired_difference([1, 1, 0, 1, 0], [0, 1, 0, 0, 0])
    assert r == PairedDifference(
        mean=pytest.approx(0.4), low=0.0, high=pytest.approx(0.8), n=5, wins=2, losses=0, ties=3, p_value=0.5
    )


def test_paired_difference_sign_test_five_wins():
    # 5 wins, 0 losses: two-sided p = 2 * (1/2)^5 = 1/16 = 0.0625
    r = paired_difference([1, 1, 1, 1, 1], [0, 0, 0, 0, 0])
    assert (r.wins, r.losses, r.ties, r.p_value) == (5, 0, 0, 0.0625)
    # every d = 1 -> every resample mean 1 -> [1, 1]
    assert (r.mean, r.low, r.high) == (1.0, 1.0, 1.0)


def test_paired_difference_all_ties():
    # d = [0,0,0] -> mean 0, CI [0, 0], no non-tied problem -> p = 1.0 by definition
    r = paired_difference([0.5, 0.2, 1.0], [0.5, 0.2, 1.0])
    assert r == PairedDifference(0.0, 0.0, 0.0, 3, 0, 0, 3, 1.0)


def test_paired_difference_is_paired():
    # b = a + 0.1 problem by problem (large spread across problems): d = -0.1 everywhere -> CI [-0.1, -0.1].
    # An unpaired comparison would see the 0..0.9 spread between problems.
    a = np.linspace(0.0, 0.8, 9)
    r = paired_difference(a, a + 0.1)
    assert (r.mean, r.low, r.high) == pytest.approx((-0.1, -0.1, -0.1))
    assert (r.wins, r.losses, r.ties) == (0, 9, 0)


# -- validation ---------------------------------------------------------------------------------------------------


BAD_CALLS = {
    "iqm empty": (lambda: iqm([]), "x"),
    "iqm nan": (lambda: iqm([1.0, float("nan")]), "x"),
    "bootstrap empty": (lambda: bootstrap_ci([]), "x"),
    "bootstrap nan": (lambda: bootstrap_ci([0.0, math.nan]), "x"),
    "bootstrap inf": (lambda: bootstrap_ci([0.0, math.inf]), "x"),
    "bootstrap 2-D": (lambda: bootstrap_ci([[0.0, 1.0]]), "x"),
    "bootstrap level 0": (lambda: bootstrap_ci([0.0, 1.0], level=0.0), "level"),
    "bootstrap level 1": (lambda: bootstrap_ci([0.0, 1.0], level=1.0), "level"),
    "bootstrap level 95": (lambda: bootstrap_ci([0.0, 1.0], level=95), "level"),
    "bootstrap reps 0": (lambda: bootstrap_ci([0.0, 1.0], reps=0), "reps"),
    "bootstrap reps float": (lambda: bootstrap_ci([0.0, 1.0], reps=2.5), "reps"),
    "bootstrap statistic": (lambda: bootstrap_ci([0.0, 1.0], "mode"), "statistic"),
    "bootstrap strata length": (lambda: bootstrap_ci([0.0, 1.0, 2.0], strata=[0, 1]), "strata"),
    "benchmark 1-D": (lambda: benchmark_ci([0.0, 1.0]), "correct"),
    "benchmark empty": (lambda: benchmark_ci(np.zeros((3, 0))), "correct"),
    "benchmark nan": (lambda: benchmark_ci([[0.0, math.nan]]), "correct"),
    "benchmark reps": (lambda: benchmark_ci([[0.0, 1.0]], reps=-1), "reps"),
    "pi empty x": (lambda: probability_of_improvement([], [1.0]), "x"),
    "pi nan y": (lambda: probability_of_improvement([1.0], [math.nan]), "y"),
    "pi ci level": (lambda: probability_of_improvement_ci([1.0], [0.0], level=-0.5), "level"),
    "profile empty scores": (lambda: performance_profile([], [0.5]), "scores"),
    "profile nan taus": (lambda: performance_profile([0.5], [math.nan]), "taus"),
    "band reps": (lambda: performance_profile_band([0.5], [0.5], reps=0), "reps"),
    "paired length": (lambda: paired_difference([1.0, 0.0], [1.0]), "b"),
    "paired nan a": (lambda: paired_difference([math.nan], [1.0]), "a"),
    "paired empty": (lambda: paired_difference([], []), "a"),
}


@pytest.mark.parametrize("call, argument", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call()


def test_unknown_statistic_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="mean, iqm, median"):
        bootstrap_ci([0.0, 1.0], "mode")


# -- bootstrap_band -----------------------------------------------------------------------------------------------


def test_bootstrap_band_per_column_with_missing_points():
    # runs x steps; NaN = the run did not log that step.
    #   column 0: [0, 1]  -> mean 0.5; resampling two runs gives {0: 1/4, 0.5: 1/2, 1: 1/4} -> 95% interval [0, 1]
    #   column 1: [1, 1]  -> constant: 1 [1, 1]
    #   column 2: [nan, 2] -> one run: 2 [2, 2], n = 1
    #   column 3: [nan, nan] -> nothing: NaN, n = 0
    m = [[0.0, 1.0, np.nan, np.nan], [1.0, 1.0, 2.0, np.nan]]
    value, low, high, n = stats.bootstrap_band(m, "mean", reps=2000, seed=0)
    assert value[:3].tolist() == [0.5, 1.0, 2.0] and np.isnan(value[3])
    assert low[:3].tolist() == [0.0, 1.0, 2.0] and high[:3].tolist() == [1.0, 1.0, 2.0]
    assert n.tolist() == [2, 2, 1, 0]


def test_bootstrap_band_matches_bootstrap_ci_of_each_column():
    # a column's band is bootstrap_ci of that column: same statistic value; with the same seed and a single column
    # the same draws, so the same interval
    x = np.array([[0.2], [0.5], [0.9], [0.4]])
    v, lo, hi, n = stats.bootstrap_band(x, "iqm", reps=500, seed=3)
    e = stats.bootstrap_ci(x[:, 0], "iqm", reps=500, seed=3)
    assert (v[0], lo[0], hi[0], n[0]) == pytest.approx((e.value, e.low, e.high, e.n))


@pytest.mark.parametrize("bad, name", [([[np.inf]], "matrix"), ([1.0, 2.0], "matrix"), ([[]], "matrix")])
def test_bootstrap_band_refuses_bad_input(bad, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        stats.bootstrap_band(bad)
