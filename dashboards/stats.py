"""Small-sample statistics for comparing runs: point estimates with bootstrap confidence intervals.

RL and LLM-reasoning results rest on few seeds and, for benchmarks like AIME, few problems. Following Agarwal et al.,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice" (NeurIPS 2021; the rliable library), we report
interval estimates instead of bare means, robust aggregates (IQM) and distributions instead of single numbers.
rliable itself is archived; this module reimplements the parts we use with numpy and scipy only.

- ``iqm``: interquartile mean, the mean of the middle 50% (rliable's aggregate; robust to outlier runs).
- ``Estimate``: a point estimate, its interval and the number of samples it rests on.
- ``bootstrap_ci``: percentile bootstrap CI of a statistic of a 1-D sample, optionally stratified (rliable's
  ``StratifiedBootstrap``).
- ``benchmark_ci``: CI of a benchmark score (seeds x problems) resampling both problems and seeds, so the interval
  covers the finite problem set as well as seed noise.
- ``probability_of_improvement`` / ``_ci``: P(X > Y) + 1/2 P(X = Y) between two methods' scores (rliable's
  probability of improvement, Mann-Whitney U / (n_x n_y)).
- ``performance_profile`` / ``_band``: fraction of runs scoring above each threshold (rliable's
  ``run_score_distribution``) and a bootstrap band around it.
- ``paired_difference``: two methods on the same problems: mean difference with a paired bootstrap CI, wins / losses /
  ties and an exact sign-test p-value.

Every random function takes ``seed`` and draws from ``np.random.default_rng(seed)``, so a report is reproducible.
Intervals are percentile intervals: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the bootstrap
distribution (``np.quantile``, linear interpolation).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as _st

STATISTICS = ("mean", "iqm", "median")


# -- validation ---------------------------------------------------------------------------------------------------


def _array(x, name: str, ndim: int | None = 1) -> np.ndarray:
    """``np.asarray(x, dtype=float)``, refused (ValueError naming ``name``) if empty, non-finite or not ``ndim``-D."""
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not numeric ({e})") from None
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _check(level, reps) -> None:
    """Refuse ``level`` outside the open interval (0, 1) and ``reps`` that is not an integer >= 1."""
    if not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level!r}")
    if not isinstance(reps, numbers.Integral) or reps < 1:
        raise ValueError(f"reps: must be an integer >= 1, got {reps!r}")


def _interval(boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0: the (1 - level)/2 and (1 + level)/2 quantiles of the replicates."""
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


def _indices(rng: np.random.Generator, n: int, reps: int) -> np.ndarray:
    """A (reps, n) matrix of indices drawn uniformly with replacement from 0..n-1: one bootstrap resample per row."""
    return rng.integers(0, n, size=(reps, n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(reps, n) index matrix -> (reps, n) counts: how often each element 0..n-1 was drawn in each replicate."""
    reps = idx.shape[0]
    flat = (idx + n * np.arange(reps)[:, None]).ravel()
    return np.bincount(flat, minlength=reps * n).reshape(reps, n)


# -- point estimates ----------------------------------------------------------------------------------------------


def iqm(x) -> float:
    """Interquartile mean (Agarwal et al. 2021): the mean of the middle 50% of the flattened ``x``.

    Exactly ``scipy.stats.trim_mean(x.ravel(), 0.25)``: sort the n values, cut ``int(0.25 * n)`` from each end and
    average the rest. When n is not divisible by 4 fewer than 25% are cut (n=5 cuts 1 each end, leaving 3).
    Input: any array of finite numbers (e.g. runs x tasks). Output: a float.
    """
    a = _array(x, "x", ndim=None)
    return float(_st.trim_mean(a.ravel(), 0.25))


@dataclass(frozen=True)
class Estimate:
    """A point estimate ``value``, its confidence interval ``[low, high]`` and the number of samples ``n`` it rests
    on (what ``n`` counts is stated by the function that returns it).

    ``str`` gives ``value [low, high] (n=N)`` with 3 decimals, e.g. ``0.512 [0.431, 0.590] (n=3)``: the interval is
    written out rather than as ``value ± half-width`` because bootstrap intervals are not symmetric.
    """

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def _statistic(statistic) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic as a function of a (reps, n) matrix of resamples -> (reps,) values, one per row."""
    if isinstance(statistic, str):
        if statistic == "mean":
            return lambda m: m.mean(axis=1)
        if statistic == "median":
            return lambda m: np.median(m, axis=1)
        if statistic == "iqm":
            return lambda m: _st.trim_mean(m, 0.25, axis=1)
        raise ValueError(f"statistic: unknown {statistic!r}; allowed: {', '.join(STATISTICS)} or a callable")
    if callable(statistic):
        return lambda m: np.array([float(statistic(row)) for row in m])
    raise ValueError(f"statistic: must be one of {', '.join(STATISTICS)} or a callable, got {statistic!r}")


# -- bootstrap intervals ------------------------------------------------------------------------------------------


def bootstrap_ci(x, statistic="mean", *, strata=None, level=0.95, reps=2000, seed=0) -> Estimate:
    """Percentile bootstrap confidence interval of a statistic of a 1-D sample (e.g. one score per seed).

    Inputs: ``x`` 1-D finite sample of size n; ``statistic`` "mean", "iqm", "median" or a callable mapping a 1-D
    array to a number; ``strata`` optional labels, one per element of ``x``.
    Output: ``Estimate(value=statistic(x), low, high, n=len(x))``.
    Definition: draw ``reps`` resamples of size n with replacement from ``x`` and apply the statistic to each; the
    interval is the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of those values. With ``strata`` the resampling is
    stratified (rliable's ``StratifiedBootstrap``): each stratum is resampled with replacement within itself, keeping
    its size, and the statistic is applied to the pooled resample. With n = 1 every resample is the single value, so
    the interval collapses to it (low = high = value): one seed gives no spread, which is why the caller shows n.
    """
    a = _array(x, "x")
    _check(level, reps)
    stat = _statistic(statistic)
    rng = np.random.default_rng(seed)
    if strata is None:
        resamples = a[_indices(rng, a.size, reps)]
    else:
        labels = np.asarray(strata)
        if labels.ndim != 1 or labels.size != a.size:
            raise ValueError(f"strata: expected one label per element of x ({a.size}), got shape {labels.shape}")
        parts = []
        for label in np.unique(labels):  # sorted labels: a fixed order of draws
            members = np.flatnonzero(labels == label)
            parts.append(a[members[_indices(rng, members.size, reps)]])
        resamples = np.concatenate(parts, axis=1)
    value = float(stat(a[None, :])[0])
    low, high = _interval(stat(resamples), level)
    return Estimate(value, float(low), float(high), a.size)


def bootstrap_band(matrix, statistic="mean", *, level=0.95, reps=1000, seed=0):
    """Per column of a runs x steps ``matrix`` (NaN: the run did not log that step), the statistic over the runs that
    did and its percentile bootstrap interval: a curve's band over seeds.

    Output: arrays ``(value, low, high, n)``, one entry per column; ``n`` counts the column's finite entries (a column
    with none gives NaN and n = 0). Definition: each column is ``bootstrap_ci`` of its finite entries; columns with the
    same set of runs share their resample indices (one vectorised draw per set, in order of first appearance), so a
    band is smooth across steps rather than noisy from step to step.
    """
    try:
        m = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"matrix: not numeric ({e})") from None
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix: expected a non-empty 2-D array (runs x steps), got shape {m.shape}")
    if np.isinf(m).any():
        raise ValueError("matrix: contains infinite values (NaN marks a missing point)")
    _check(level, reps)
    if isinstance(statistic, str) and statistic not in STATISTICS:
        raise ValueError(f"statistic: unknown {statistic!r}; allowed: {', '.join(STATISTICS)}")
    stat = {"mean": lambda a: a.mean(axis=1), "median": lambda a: np.median(a, axis=1),
            "iqm": lambda a: _st.trim_mean(a, 0.25, axis=1)}.get(statistic) if isinstance(statistic, str) else (
        lambda a: np.apply_along_axis(lambda r: float(statistic(r)), 1, a))  # fmt: skip
    cols = m.shape[1]
    value, low, high = (np.full(cols, np.nan) for _ in range(3))
    present = np.isfinite(m)
    n = present.sum(axis=0)
    rng = np.random.default_rng(seed)
    patterns: dict[bytes, list[int]] = {}
    for j in range(cols):
        if n[j]:
            patterns.setdefault(present[:, j].tobytes(), []).append(j)
    for key, js in patterns.items():
        rows = np.flatnonzero(np.frombuffer(key, dtype=bool))
        sub = m[np.ix_(rows, js)]  # (runs, columns)
        value[js] = stat(sub[None, :, :])[0]
        boot = stat(sub[_indices(rng, rows.size, reps)])  # (reps, runs, columns) -> (reps, columns)
        low[js], high[js] = _interval(boot, level)
    return value, low, high, n


def benchmark_ci(correct, *, level=0.95, reps=2000, seed=0) -> Estimate:
    """Confidence interval of a benchmark score from a seeds x problems matrix, resampling problems and seeds.

    Input: ``correct`` 2-D (S seeds x P problems), entry [i, j] the score of problem j in run i (e.g. its Mean@k,
    in [0, 1]). Output: ``Estimate(value, low, high, n=S)``; ``n`` counts seeds (the problem count is the benchmark's).
    Definition: score = mean over problems of the mean over seeds = ``correct.mean()``. Each bootstrap replicate draws
    S rows (seeds) and, independently, P columns (problems) with replacement and recomputes the score on that
    sub-matrix. The interval therefore covers both the finite problem set (AIME has 30 problems: one problem is 3.3
    points) and seed noise; a seeds-only interval would claim more precision than a 30-problem benchmark has.
    Computed as sum_ij r_i c_j correct[i, j] / (S P) with r, c the draw counts per seed and per problem, so memory
    stays O(reps (S + P)).
    """
    m = _array(correct, "correct", ndim=2)
    _check(level, reps)
    s, p = m.shape
    rng = np.random.default_rng(seed)
    rows = _counts(_indices(rng, s, reps), s)  # (reps, S), seeds first
    cols = _counts(_indices(rng, p, reps), p)  # (reps, P)
    boot = ((rows @ m) * cols).sum(axis=1) / (s * p)
    low, high = _interval(boot, level)
    return Estimate(float(m.mean()), float(low), float(high), s)


# -- probability of improvement -----------------------------------------------------------------------------------


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + 1/2 P(X = Y) for independent 1-D samples ``x`` (method A, e.g. one score per seed) and ``y``
    (baseline): the fraction of the len(x) * len(y) pairs where x wins, ties counting half (Agarwal et al. 2021).

    Computed as the Mann-Whitney U statistic of x vs y divided by len(x) * len(y); in scipy >= 1.7
    ``mannwhitneyu(x, y).statistic`` is U for x (pairs x > y plus half the ties), not min(U_x, U_y) as before.
    """
    a, b = _array(x, "x"), _array(y, "y")
    return float(_st.mannwhitneyu(a, b).statistic / (a.size * b.size))


def probability_of_improvement_ci(x, y, *, level=0.95, reps=2000, seed=0) -> Estimate:
    """Bootstrap CI of ``probability_of_improvement(x, y)``, resampling ``x`` and ``y`` independently.

    Output: ``Estimate(value, low, high, n=min(len(x), len(y)))``: the smaller sample bounds the precision.
    Each replicate resamples x (drawn first) and y with replacement and counts wins + ties/2 over all pairs;
    memory is O(reps len(x) len(y)), fine for per-seed samples.
    """
    a, b = _array(x, "x"), _array(y, "y")
    _check(level, reps)
    rng = np.random.default_rng(seed)
    xa = a[_indices(rng, a.size, reps)][:, :, None]
    yb = b[_indices(rng, b.size, reps)][:, None, :]
    boot = ((xa > yb) + 0.5 * (xa == yb)).mean(axis=(1, 2))
    low, high = _interval(boot, level)
    return Estimate(probability_of_improvement(a, b), float(low), float(high), min(a.size, b.size))


# -- performance profiles -----------------------------------------------------------------------------------------


def performance_profile(scores, taus) -> np.ndarray:
    """Run-score distribution (rliable's ``run_score_distribution``): for each threshold tau, the fraction of
    ``scores`` strictly greater than tau.

    Inputs: ``scores`` 1-D finite; ``taus`` finite thresholds of any shape. Output: float array shaped like ``taus``.
    """
    s = _array(scores, "scores")
    t = _array(taus, "taus", ndim=None)
    return (s[None, :] > t.reshape(-1, 1)).mean(axis=1).reshape(t.shape)


def performance_profile_band(scores, taus, *, level=0.95, reps=2000, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise bootstrap band around ``performance_profile(scores, taus)``.

    Output: ``(low, high)``, arrays shaped like ``taus``: per tau, the percentile interval of the profile over
    ``reps`` resamples of ``scores`` with replacement. Computed as counts @ (scores > tau) / n, with counts how often
    each score was drawn, so memory stays O(reps (n + len(taus))).
    """
    s = _array(scores, "scores")
    t = _array(taus, "taus", ndim=None)
    _check(level, reps)
    rng = np.random.default_rng(seed)
    above = (s[:, None] > t.reshape(1, -1)).astype(float)  # (n, T)
    boot = _counts(_indices(rng, s.size, reps), s.size) @ above / s.size  # (reps, T)
    low, high = _interval(boot, level)
    return low.reshape(t.shape), high.reshape(t.shape)


# -- paired comparison --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """Method a vs method b on the same n problems: ``mean`` of a - b with its paired bootstrap CI ``[low, high]``,
    problem counts ``wins`` (a > b), ``losses`` (a < b) and ``ties`` (a == b), and the two-sided exact sign-test
    ``p_value`` over the non-tied problems."""

    mean: float
    low: float
    high: float
    n: int
    wins: int
    losses: int
    ties: int
    p_value: float


def paired_difference(a, b, *, level=0.95, reps=2000, seed=0) -> PairedDifference:
    """Compare two methods problem by problem.

    Inputs: ``a``, ``b`` 1-D, equal length n: per-problem scores of two methods on the SAME problems in the same order
    (each already averaged over that method's seeds). Output: ``PairedDifference``.
    Definitions: d = a - b; mean = mean(d); the CI resamples problem indices with replacement (the same index for a and
    b, i.e. resamples d) and takes percentile bounds of mean(d); wins = #(d > 0), losses = #(d < 0), ties = #(d == 0);
    p_value = ``scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue`` (two-sided), 1.0 when every problem ties.
    """
    x, y = _array(a, "a"), _array(b, "b")
    if x.size != y.size:
        raise ValueError(f"b: length {y.size} differs from a's {x.size}; both must score the same problems")
    _check(level, reps)
    d = x - y
    rng = np.random.default_rng(seed)
    low, high = _interval(d[_indices(rng, d.size, reps)].mean(axis=1), level)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = float(_st.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return PairedDifference(float(d.mean()), float(low), float(high), d.size, wins, losses, d.size - wins - losses, p)
