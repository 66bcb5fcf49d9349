"""Hand-derived value tests for the KL estimators, loss aggregation and advantage estimators.

Torchtune style: every expected number is worked out by hand in a comment next to it, from the formulas in
``rpg-spec.md`` (§3.1 estimators, §2.8 aggregation, §4.5 RPG baseline, §6.1 GRPO, §6.3 REINFORCE++). No expected
value is produced by calling the library. Inputs are tiny and chosen so the arithmetic is easy: log-ratios
ln 2, -ln 2, 0; rewards +1/-1; ragged masks.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpg_core.objectives import (
    Aggregation,
    AdvantageEstimator,
    Direction,
    Estimator,
    aggregate,
    compute_advantages,
    k1,
    k2,
    k3,
    kl_estimator,
    masked_whiten,
)

pytestmark = pytest.mark.unit

LN2 = math.log(2.0)  # 0.6931471805599453
GRPO_EPS = 1e-6  # spec §6.1: (R - mean) / (std + 1e-6)
WHITEN_EPS = 1e-8  # spec §6.3: (x - mean) / sqrt(var_unbiased + 1e-8)

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def close(actual: torch.Tensor, expected, *, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# =====================================================================================================================
# 1. Schulman's estimators k1, k2, k3 (spec §3.1), all functions of log r
# =====================================================================================================================


def test_k1_hand_values():
    # k1 = -log r
    # log r =  ln 2 (r = 2)  : k1 = -ln 2 = -0.6931471805599453   (negative for r > 1)
    # log r = -ln 2 (r = 1/2): k1 =  ln 2 =  0.6931471805599453
    # log r =  0    (r = 1)  : k1 =  0
    # log r =  ln 4 (r = 4)  : k1 = -2 ln 2 = -1.3862943611198906
    out = k1(t([LN2, -LN2, 0.0, 2 * LN2]))
    close(out, [-0.6931471805599453, 0.6931471805599453, 0.0, -1.3862943611198906])
    assert out[0] < 0 and out[3] < 0  # k1 can be negative (r > 1)


def test_k2_hand_values():
    # k2 = (log r)^2 / 2
    # log r =  ln 2: (ln 2)^2 / 2 = 0.4804530139182014 / 2 = 0.2402265069591007
    # log r = -ln 2: same, the square removes the sign        = 0.2402265069591007
    # log r =  0   : 0
    # log r =  ln 4: (2 ln 2)^2 / 2 = 2 (ln 2)^2 = 0.9609060278364028
    out = k2(t([LN2, -LN2, 0.0, 2 * LN2]))
    close(out, [0.2402265069591007, 0.2402265069591007, 0.0, 0.9609060278364028])


def test_k3_hand_values():
    # k3 = (r - 1) - log r
    # log r =  ln 2 (r = 2)  : (2 - 1) - ln 2   = 1 - 0.6931471805599453 = 0.3068528194400547
    # log r = -ln 2 (r = 1/2): (1/2 - 1) + ln 2 = -0.5 + 0.6931471805599453 = 0.1931471805599453
    # log r =  0    (r = 1)  : (1 - 1) - 0 = 0
    # log r =  ln 4 (r = 4)  : (4 - 1) - 2 ln 2 = 3 - 1.3862943611198906 = 1.6137056388801094
    out = k3(t([LN2, -LN2, 0.0, 2 * LN2]))
    close(out, [0.3068528194400547, 0.1931471805599453, 0.0, 1.6137056388801094])


def test_k3_zero_at_zero_and_nonnegative():
    # log r <= r - 1 for all r > 0 with equality only at r = 1, so k3 >= 0 and k3(0) == 0 exactly.
    log_r = torch.linspace(-20.0, 20.0, 4001, dtype=F64)
    out = k3(log_r)
    assert bool((out >= 0).all())
    assert k3(t([0.0])).item() == 0.0
    # strictly positive away from 0: k3(+-0.01) ~ 0.01^2 / 2 = 5e-5 > 0
    assert bool((k3(t([0.01, -0.01])) > 0).all())


def test_k3_small_log_ratio_is_accurate():
    # Taylor: k3(x) = e^x - 1 - x = x^2/2 + x^3/6 + x^4/24 + ...
    # x = 1e-4: 1e-8/2 + 1e-12/6 + 1e-16/24 = 5e-9 + 1.6666667e-13 + 4.2e-18 = 5.0001666708333e-09
    # (a naive exp(x) - 1 - x loses ~7 of its 16 digits here; the expected value needs rel. accuracy 1e-9)
    out = k3(t([1e-4]))
    close(out, [5.000166670833333e-09], rtol=1e-9, atol=0.0)


def test_k2_matches_k3_to_second_order():
    # k3(x) - k2(x) = x^3/6 + O(x^4); at x = 1e-3: 1e-9/6 = 1.6667e-10, tiny next to k2 = 5e-7
    x = t([1e-3])
    close(k3(x) - k2(x), [1e-9 / 6], rtol=1e-3, atol=0.0)


# kl_estimator: three tokens with logp = [ln 1/4, ln 1/2, ln 1/2], ref_logp = [ln 1/2, ln 1/4, ln 1/2]
#   reverse: log r = ref_logp - logp = [ln 2, -ln 2, 0]   (r = pi_ref / pi_theta)
#   forward: log r = logp - ref_logp = [-ln 2, ln 2, 0]   (r = pi_theta / pi_ref)
LOGP = [math.log(0.25), math.log(0.5), math.log(0.5)]
REF_LOGP = [math.log(0.5), math.log(0.25), math.log(0.5)]


@pytest.mark.parametrize(
    ("estimator", "direction", "expected"),
    [
        # reverse, log r = [ln 2, -ln 2, 0]
        # k1 = -log r = [-ln 2, ln 2, 0]                         (verl `kl`: logp - ref_logp)
        (Estimator.K1, Direction.REVERSE, [-0.6931471805599453, 0.6931471805599453, 0.0]),
        # k2 = (log r)^2 / 2 = [(ln 2)^2/2, (ln 2)^2/2, 0]       (verl `mse`)
        (Estimator.K2, Direction.REVERSE, [0.2402265069591007, 0.2402265069591007, 0.0]),
        # k3 = GRPO low_var_kl = exp(ref - logp) - (ref - logp) - 1
        #    = [2 - ln 2 - 1, 1/2 + ln 2 - 1, 1 - 0 - 1] = [0.3068528194400547, 0.1931471805599453, 0]
        (Estimator.K3, Direction.REVERSE, [0.3068528194400547, 0.1931471805599453, 0.0]),
        # forward, log r = [-ln 2, ln 2, 0]
        # k1 = -log r = [ln 2, -ln 2, 0]                         (rpg_fkl: ref_logp - logp)
        (Estimator.K1, Direction.FORWARD, [0.6931471805599453, -0.6931471805599453, 0.0]),
        # k2 = [(ln 2)^2/2, (ln 2)^2/2, 0] (symmetric in the sign of log r)
        (Estimator.K2, Direction.FORWARD, [0.2402265069591007, 0.2402265069591007, 0.0]),
        # k3 = exp(logp - ref) - (logp - ref) - 1 = [1/2 + ln 2 - 1, 2 - ln 2 - 1, 0]   (rpg_ufkl)
        (Estimator.K3, Direction.FORWARD, [0.1931471805599453, 0.3068528194400547, 0.0]),
    ],
)
def test_kl_estimator_directions(estimator, direction, expected):
    out = kl_estimator(estimator, direction, t(LOGP), t(REF_LOGP))
    close(out, expected)


def test_kl_estimator_reverse_k3_is_grpo_low_var_kl():
    # GRPO (spec §3.2): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 at pi_theta = 0.25, pi_ref = 0.5:
    # 0.5/0.25 - ln(0.5/0.25) - 1 = 2 - ln 2 - 1 = 0.3068528194400547
    out = kl_estimator(Estimator.K3, Direction.REVERSE, t([math.log(0.25)]), t([math.log(0.5)]))
    close(out, [0.3068528194400547])


# =====================================================================================================================
# 2. aggregate (spec §2.8) on a 2x3 per-token matrix with ragged mask (row lengths 3 and 1)
# =====================================================================================================================
#   per_token = [[1, 2, 3],      mask = [[1, 1, 1],
#                [4, 0, 0]]              [1, 0, 0]]
#   row sums: 6 and 4; row lengths: 3 and 1; valid tokens: 4; total sum 10; T = 3

PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
AGG_MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("agg", "norm_len", "expected"),
    [
        # token-mean: (1 + 2 + 3 + 4) / 4 = 10 / 4 = 2.5
        (Aggregation.TOKEN_MEAN, None, 2.5),
        # seq-mean-token-sum: (6 + 4) / 2 = 5
        (Aggregation.SEQ_MEAN_TOKEN_SUM, None, 5.0),
        # seq-mean-token-mean: (6/3 + 4/1) / 2 = (2 + 4) / 2 = 3
        (Aggregation.SEQ_MEAN_TOKEN_MEAN, None, 3.0),
        # seq-mean-token-sum-norm, norm_len=None -> T = 3: 10 / 3 = 3.3333333333333335
        (Aggregation.SEQ_MEAN_TOKEN_SUM_NORM, None, 10.0 / 3.0),
        # seq-mean-token-sum-norm, norm_len=10: 10 / 10 = 1
        (Aggregation.SEQ_MEAN_TOKEN_SUM_NORM, 10, 1.0),
    ],
)
def test_aggregate_modes(agg, norm_len, expected):
    out = aggregate(t(PER_TOKEN), t(AGG_MASK), agg, norm_len=norm_len)
    assert out.dim() == 0
    close(out, t(expected))


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        # An extra row with no valid token ([0, 0, 0], mask [0, 0, 0]):
        # token-mean: still 10 / 4 = 2.5 (the empty row adds no token)
        (Aggregation.TOKEN_MEAN, 2.5),
        # seq-mean-token-sum: the empty row is skipped -> (6 + 4) / 2 = 5   (not 10 / 3)
        (Aggregation.SEQ_MEAN_TOKEN_SUM, 5.0),
        # seq-mean-token-mean: skipped -> (2 + 4) / 2 = 3   (not NaN from 0/0)
        (Aggregation.SEQ_MEAN_TOKEN_MEAN, 3.0),
        # seq-mean-token-sum-norm: constant horizon T = 3, unaffected: 10 / 3
        (Aggregation.SEQ_MEAN_TOKEN_SUM_NORM, 10.0 / 3.0),
    ],
)
def test_aggregate_skips_empty_row_in_seq_mean_modes(agg, expected):
    per_token = t(PER_TOKEN + [[0.0, 0.0, 0.0]])
    mask = t(AGG_MASK + [[0.0, 0.0, 0.0]])
    out = aggregate(per_token, mask, agg)
    assert torch.isfinite(out)
    close(out, t(expected))


def test_aggregate_accepts_bool_mask():
    # same numbers as above with a bool mask: token-mean 10/4 = 2.5, seq-mean-token-mean (2 + 4)/2 = 3
    mask = t(AGG_MASK).bool()
    close(aggregate(t(PER_TOKEN), mask, Aggregation.TOKEN_MEAN), t(2.5))
    close(aggregate(t(PER_TOKEN), mask, Aggregation.SEQ_MEAN_TOKEN_MEAN), t(3.0))


def test_aggregate_with_negative_values():
    #   per_token = [[-1, 0.5], [2, 0]], mask = [[1, 1], [1, 0]]
    #   token-mean: (-1 + 0.5 + 2) / 3 = 1.5 / 3 = 0.5
    #   seq-mean-token-sum: (-0.5 + 2) / 2 = 0.75
    #   seq-mean-token-mean: (-0.5/2 + 2/1) / 2 = (-0.25 + 2) / 2 = 0.875
    #   seq-mean-token-sum-norm (T = 2): 1.5 / 2 = 0.75
    per_token, mask = t([[-1.0, 0.5], [2.0, 0.0]]), t([[1.0, 1.0], [1.0, 0.0]])
    close(aggregate(per_token, mask, Aggregation.TOKEN_MEAN), t(0.5))
    close(aggregate(per_token, mask, Aggregation.SEQ_MEAN_TOKEN_SUM), t(0.75))
    close(aggregate(per_token, mask, Aggregation.SEQ_MEAN_TOKEN_MEAN), t(0.875))
    close(aggregate(per_token, mask, Aggregation.SEQ_MEAN_TOKEN_SUM_NORM), t(0.75))


# =====================================================================================================================
# 3. compute_advantages (spec §4.5, §6.1, §6.3)
# =====================================================================================================================
# Main batch: two prompts x three responses, outcome rewards, ragged response mask (lengths 3,2,1 | 3,1,2).
#   group_ids = [0, 0, 0, 1, 1, 1]
#   rewards   = [1, -1, -1, 1, 1, -1]
GIDS = [0, 0, 0, 1, 1, 1]
REWARDS = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
MASK = [
    [1.0, 1.0, 1.0],
    [1.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
    [1.0, 1.0, 1.0],
    [1.0, 0.0, 0.0],
    [1.0, 1.0, 0.0],
]


def broadcast(per_seq, mask) -> torch.Tensor:
    """Expected [B, T]: one scalar per response on its valid tokens, 0 on padding."""
    return t(per_seq).unsqueeze(-1) * t(mask)


def adv(estimator, rewards=REWARDS, gids=GIDS, mask=MASK) -> torch.Tensor:
    r = rewards if isinstance(rewards, torch.Tensor) else t(rewards)
    g = gids if not isinstance(gids, list) or isinstance(gids[0], str) else torch.tensor(gids)
    return compute_advantages(estimator, r, g, t(mask))


def test_rpg_group_mean_baseline():
    # group 0: rewards [1, -1, -1], mean = -1/3 -> A = [1 + 1/3, -1 + 1/3, -1 + 1/3] = [4/3, -2/3, -2/3]
    # group 1: rewards [1, 1, -1],  mean = +1/3 -> A = [1 - 1/3, 1 - 1/3, -1 - 1/3] = [2/3, 2/3, -4/3]
    # no std division (spec §4.5)
    out = adv(AdvantageEstimator.RPG)
    close(out, broadcast([4 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -4 / 3], MASK))


def test_grpo_unbiased_std():
    # group 0: [1, -1, -1], mean -1/3, deviations [4/3, -2/3, -2/3]
    #   unbiased var = ((4/3)^2 + 2 (2/3)^2) / (3 - 1) = (16/9 + 8/9) / 2 = (24/9) / 2 = 4/3
    #   std = sqrt(4/3) = 2/sqrt(3) = 1.1547005383792517
    #   A = (4/3) / (2/sqrt(3) + 1e-6) = 1.1546995383801175  (~ 2/sqrt(3) - 1e-6)
    #       (-2/3) / (2/sqrt(3) + 1e-6) = -0.5773497691900588 (~ -1/sqrt(3) + 0.5e-6)
    # group 1: [1, 1, -1], mean 1/3, deviations [2/3, 2/3, -4/3]: same var 4/3 (mirror image)
    #   A = [0.5773497691900588, 0.5773497691900588, -1.1546995383801175]
    # (the biased std sqrt(8/9) = 0.9428 would give 4/3 / 0.9428 = 1.4142 instead: must not happen)
    s = 2 / math.sqrt(3) + GRPO_EPS
    out = adv(AdvantageEstimator.GRPO)
    close(out, broadcast([(4 / 3) / s, (-2 / 3) / s, (-2 / 3) / s, (2 / 3) / s, (2 / 3) / s, (-4 / 3) / s], MASK))
    close(out[0, 0], t(1.1546995383801175))
    close(out[1, 0], t(-0.5773497691900588))


def test_rloo_leave_one_out():
    # A_i = R_i - mean of the other responses of the same prompt
    # group 0: [1, -1, -1]: 1 - (-1 - 1)/2 = 1 + 1 = 2;  -1 - (1 - 1)/2 = -1;  -1 - (1 - 1)/2 = -1
    # group 1: [1, 1, -1]:  1 - (1 - 1)/2 = 1;  1 - (1 - 1)/2 = 1;  -1 - (1 + 1)/2 = -2
    out = adv(AdvantageEstimator.RLOO)
    close(out, broadcast([2.0, -1.0, -1.0, 1.0, 1.0, -2.0], MASK))


def test_batch_mean_on_main_batch():
    # batch mean = (1 - 1 - 1 + 1 + 1 - 1) / 6 = 0 -> A = R (groups are ignored)
    out = adv(AdvantageEstimator.BATCH_MEAN)
    close(out, broadcast(REWARDS, MASK))


def test_batch_mean_ignores_groups():
    # rewards [3, 1, 0, 0], groups [0, 0, 1, 1], all masks full (T = 2)
    # batch mean = (3 + 1 + 0 + 0) / 4 = 1 -> A = [2, 0, -1, -1]
    # (the group-mean baseline would give [1, -1, 0, 0] instead)
    mask = [[1.0, 1.0]] * 4
    out = adv(AdvantageEstimator.BATCH_MEAN, rewards=[3.0, 1.0, 0.0, 0.0], gids=[0, 0, 1, 1], mask=mask)
    close(out, broadcast([2.0, 0.0, -1.0, -1.0], mask))


def test_reinforce_pp_outcome_whitened_over_batch_tokens():
    # Outcome reward, gamma = 1: the return-to-go is R on every valid token.
    # valid tokens: row lengths [3, 2, 1, 3, 1, 2] -> n = 12
    #   +1 tokens: rows 0, 3, 4 -> 3 + 3 + 1 = 7;   -1 tokens: rows 1, 2, 5 -> 2 + 1 + 2 = 5
    #   mean = (7 - 5) / 12 = 1/6
    #   deviations: +1 -> 5/6, -1 -> -7/6
    #   sum sq = 7 (25/36) + 5 (49/36) = (175 + 245)/36 = 420/36 = 35/3
    #   unbiased var = (35/3) / 11 = 35/33 = 1.0606060606...
    #   denominator = sqrt(35/33 + 1e-8) = 1.029857305943916
    #   A(+1) = (5/6) / 1.029857305943916 = 0.8091735898980116
    #   A(-1) = (-7/6) / 1.029857305943916 = -1.1328430258572162
    d = math.sqrt(35 / 33 + WHITEN_EPS)
    out = adv(AdvantageEstimator.REINFORCE_PP)
    pos, neg = (5 / 6) / d, (-7 / 6) / d
    close(out, broadcast([pos, neg, neg, pos, pos, neg], MASK))
    close(out[0, 0], t(0.8091735898980116))
    close(out[1, 0], t(-1.1328430258572162))


def test_reinforce_pp_baseline_group_mean_then_whiten():
    # Step 1: R - group mean (= the RPG advantages): [4/3, -2/3, -2/3, 2/3, 2/3, -4/3], broadcast to tokens.
    # Step 2: whiten over the 12 valid tokens (row lengths [3, 2, 1, 3, 1, 2]):
    #   sum = 3(4/3) + 2(-2/3) + 1(-2/3) + 3(2/3) + 1(2/3) + 2(-4/3) = (12 - 4 - 2 + 6 + 2 - 8)/3 = 6/3 = 2
    #   mean = 2 / 12 = 1/6
    #   deviations: 4/3 - 1/6 = 7/6 (x3), -2/3 - 1/6 = -5/6 (x2 + x1), 2/3 - 1/6 = 1/2 (x3 + x1), -4/3 - 1/6 = -3/2 (x2)
    #   sum sq = 3 (49/36) + 3 (25/36) + 4 (1/4) + 2 (9/4) = 147/36 + 75/36 + 1 + 9/2 = 37/6 + 11/2 = 35/3
    #   unbiased var = (35/3) / 11 = 35/33;  denominator sqrt(35/33 + 1e-8) = 1.029857305943916
    #   A = [7/6, -5/6, -5/6, 1/2, 1/2, -3/2] / 1.029857305943916
    #     = [1.1328430258572162, -0.8091735898980116, -0.8091735898980116, 0.485504153938807, 0.485504153938807,
    #        -1.456512461816421]
    d = math.sqrt(35 / 33 + WHITEN_EPS)
    out = adv(AdvantageEstimator.REINFORCE_PP_BASELINE)
    close(out, broadcast([(7 / 6) / d, (-5 / 6) / d, (-5 / 6) / d, 0.5 / d, 0.5 / d, (-1.5) / d], MASK))
    close(out[3, 0], t(0.48550415393880697))
    close(out[5, 0], t(-1.456512461816421))


# -- size-1 groups -----------------------------------------------------------------------------------------------------
# group_ids [0, 0, 1], rewards [1, -1, 3], full masks of length 2: prompt 1 has a single response.
SINGLE_GIDS = [0, 0, 1]
SINGLE_REWARDS = [1.0, -1.0, 3.0]
SINGLE_MASK = [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]


def test_rpg_singleton_group_gets_zero_baseline():
    # group 0: mean 0 -> [1, -1];  group 1 (size 1): b = 0 (spec §4.5) -> 3
    out = adv(AdvantageEstimator.RPG, SINGLE_REWARDS, SINGLE_GIDS, SINGLE_MASK)
    close(out, broadcast([1.0, -1.0, 3.0], SINGLE_MASK))


def test_grpo_singleton_group_mean0_std1():
    # group 0: [1, -1], mean 0, unbiased var = (1 + 1)/(2 - 1) = 2, std sqrt(2) = 1.4142135623730951
    #   A = +-1 / (sqrt(2) + 1e-6) = +-0.7071062811869011
    # group 1 (size 1): mean 0, std 1 (spec §6.1) -> A = (3 - 0) / (1 + 1e-6) = 2.9999970000030003
    out = adv(AdvantageEstimator.GRPO, SINGLE_REWARDS, SINGLE_GIDS, SINGLE_MASK)
    s = math.sqrt(2) + GRPO_EPS
    close(out, broadcast([1 / s, -1 / s, 3 / (1 + GRPO_EPS)], SINGLE_MASK))
    close(out[0, 0], t(0.7071062811869011))
    close(out[2, 0], t(2.9999970000030003))
    assert torch.isfinite(out).all()


def test_rloo_singleton_group_keeps_reward():
    # group 0: 1 - (-1) = 2;  -1 - 1 = -2;  group 1 (size 1): keeps R = 3
    out = adv(AdvantageEstimator.RLOO, SINGLE_REWARDS, SINGLE_GIDS, SINGLE_MASK)
    close(out, broadcast([2.0, -2.0, 3.0], SINGLE_MASK))


# -- token-level rewards [B, T] -----------------------------------------------------------------------------------------
# group_ids [0, 0, 1, 1], T = 3
#   mask               rewards               per-seq sum     return-to-go (gamma = 1, valid tokens)
#   [1, 1, 1]          [ 0,   -0.5, 1]        0.5            [0.5, 0.5, 1]
#   [1, 1, 0]          [-0.5, -1,   0]       -1.5            [-1.5, -1]
#   [1, 0, 0]          [ 2,    0,   0]        2              [2]
#   [1, 1, 1]          [ 0,    0,   1]        1              [1, 1, 1]
TOK_GIDS = [0, 0, 1, 1]
TOK_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
TOK_REWARDS = [[0.0, -0.5, 1.0], [-0.5, -1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_token_rewards_rpg_uses_sequence_sum():
    # sums [0.5, -1.5 | 2, 1]; group means: (0.5 - 1.5)/2 = -0.5, (2 + 1)/2 = 1.5
    # A = [0.5 + 0.5, -1.5 + 0.5, 2 - 1.5, 1 - 1.5] = [1, -1, 0.5, -0.5]
    out = adv(AdvantageEstimator.RPG, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, broadcast([1.0, -1.0, 0.5, -0.5], TOK_MASK))


def test_token_rewards_grpo_uses_sequence_sum():
    # group 0: deviations [1, -1], unbiased var = 2/1 = 2, std sqrt 2 -> A = +-1/(sqrt(2) + 1e-6)
    # group 1: deviations [0.5, -0.5], unbiased var = 0.5/1 = 0.5, std 1/sqrt(2) -> A = +-0.5/(1/sqrt(2) + 1e-6)
    #          = +-0.7071057811879617
    s0, s1 = math.sqrt(2) + GRPO_EPS, 1 / math.sqrt(2) + GRPO_EPS
    out = adv(AdvantageEstimator.GRPO, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, broadcast([1 / s0, -1 / s0, 0.5 / s1, -0.5 / s1], TOK_MASK))
    close(out[2, 0], t(0.7071057811879617))


def test_token_rewards_rloo_uses_sequence_sum():
    # group 0: 0.5 - (-1.5) = 2, -1.5 - 0.5 = -2;  group 1: 2 - 1 = 1, 1 - 2 = -1
    out = adv(AdvantageEstimator.RLOO, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, broadcast([2.0, -2.0, 1.0, -1.0], TOK_MASK))


def test_token_rewards_batch_mean_uses_sequence_sum():
    # batch mean of sums = (0.5 - 1.5 + 2 + 1) / 4 = 2/4 = 0.5 -> A = [0, -2, 1.5, 0.5]
    out = adv(AdvantageEstimator.BATCH_MEAN, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, broadcast([0.0, -2.0, 1.5, 0.5], TOK_MASK))


def test_token_rewards_reinforce_pp_return_to_go():
    # return-to-go (reverse cumulative sum, gamma = 1) on valid tokens:
    #   row 0: [0 - 0.5 + 1, -0.5 + 1, 1] = [0.5, 0.5, 1]
    #   row 1: [-0.5 - 1, -1]             = [-1.5, -1]
    #   row 2: [2]
    #   row 3: [0 + 0 + 1, 0 + 1, 1]      = [1, 1, 1]
    # n = 9 valid tokens, sum = 2 - 2.5 + 2 + 3 = 4.5, mean = 0.5
    # deviations: [0, 0, 0.5], [-2, -1.5], [1.5], [0.5, 0.5, 0.5]
    # sum sq = 0.25 + 4 + 2.25 + 2.25 + 3 (0.25) = 9.5;  unbiased var = 9.5 / 8 = 19/16 = 1.1875
    # denominator sqrt(19/16 + 1e-8) = 1.0897247404734831
    #   0.5 / 1.0897247404734831 = 0.45883146580920153;  2 / ... = 1.8353258632368061;  1.5 / ... = 1.3764943974276047
    d = math.sqrt(19 / 16 + WHITEN_EPS)
    expected = t([[0.0, 0.0, 0.5], [-2.0, -1.5, 0.0], [1.5, 0.0, 0.0], [0.5, 0.5, 0.5]]) / d
    out = adv(AdvantageEstimator.REINFORCE_PP, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, expected)
    close(out[0, 2], t(0.45883146580920153))
    close(out[1, 0], t(-1.8353258632368061))
    close(out[2, 0], t(1.3764943974276047))
    # not the outcome broadcast: row 0's tokens differ (rtg 0.5, 0.5, 1 -> whitened 0, 0, 0.4588)
    assert out[0, 0] != out[0, 2]


def test_token_rewards_reinforce_pp_baseline_uses_sequence_sum():
    # R - group mean on sums = [1, -1, 0.5, -0.5] (as in the RPG test), broadcast to the 9 valid tokens:
    #   row 0: 1 x3, row 1: -1 x2, row 2: 0.5 x1, row 3: -0.5 x3
    # sum = 3 - 2 + 0.5 - 1.5 = 0 -> mean 0
    # sum sq = 3 + 2 + 0.25 + 0.75 = 6;  unbiased var = 6 / 8 = 0.75
    # denominator sqrt(0.75 + 1e-8) = 0.8660254095579414 -> 1/d = 1.154700530681248, 0.5/d = 0.577350265340624
    d = math.sqrt(0.75 + WHITEN_EPS)
    out = adv(AdvantageEstimator.REINFORCE_PP_BASELINE, TOK_REWARDS, TOK_GIDS, TOK_MASK)
    close(out, broadcast([1 / d, -1 / d, 0.5 / d, -0.5 / d], TOK_MASK))
    close(out[0, 0], t(1.154700530681248))


def test_token_rewards_with_zero_padding_match_outcome_rewards():
    # An outcome reward placed on the last valid token (zeros elsewhere) is the same as the [B] reward for the
    # outcome estimators: sum = R. Row lengths [3, 2, 1, 3, 1, 2] of the main batch.
    tok = torch.zeros(6, 3, dtype=F64)
    for i, (r, n) in enumerate(zip(REWARDS, [3, 2, 1, 3, 1, 2])):
        tok[i, n - 1] = r
    # RPG: [4/3, -2/3, -2/3, 2/3, 2/3, -4/3] as in test_rpg_group_mean_baseline
    close(adv(AdvantageEstimator.RPG, tok), broadcast([4 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -4 / 3], MASK))
    # REINFORCE++: return-to-go of R on the last token is R on every valid token -> same as the outcome case
    d = math.sqrt(35 / 33 + WHITEN_EPS)
    pos, neg = (5 / 6) / d, (-7 / 6) / d
    close(adv(AdvantageEstimator.REINFORCE_PP, tok), broadcast([pos, neg, neg, pos, pos, neg], MASK))


# -- general properties --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", list(AdvantageEstimator))
def test_zero_where_mask_is_zero(estimator):
    out = adv(estimator)
    assert out.shape == (6, 3)
    assert out.dtype == F64
    assert bool((out[t(MASK) == 0] == 0).all())
    # and every valid token is non-zero for this batch (no estimator gives 0 here)
    assert bool((out[t(MASK) == 1] != 0).all())


@pytest.mark.parametrize("estimator", list(AdvantageEstimator))
def test_string_group_ids_and_string_estimator_name(estimator):
    # uid strings, interleaved order: "q-b", "q-a", ... -> group "q-a" = rows 1, 3, 5 = rewards [-1, 1, -1]
    #                                                     group "q-b" = rows 0, 2, 4 = rewards [ 1, -1, 1]
    # Equivalent int ids: [1, 0, 1, 0, 1, 0]; spot-check RPG by hand below, and every estimator agrees with int ids.
    uids = ["q-b", "q-a", "q-b", "q-a", "q-b", "q-a"]
    rewards = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    by_str = compute_advantages(estimator.value, t(rewards), uids, t(MASK))
    by_int = compute_advantages(estimator, t(rewards), torch.tensor([1, 0, 1, 0, 1, 0]), t(MASK))
    close(by_str, by_int)
    if estimator is AdvantageEstimator.RPG:
        # "q-b": [1, -1, 1], mean 1/3 -> [2/3, -4/3, 2/3];  "q-a": [-1, 1, -1], mean -1/3 -> [-2/3, 4/3, -2/3]
        # rows in order: [2/3, -2/3, -4/3, 4/3, 2/3, -2/3]
        close(by_str, broadcast([2 / 3, -2 / 3, -4 / 3, 4 / 3, 2 / 3, -2 / 3], MASK))


def test_non_contiguous_int_group_ids():
    # ids [7, 3, 7, 3]: groups {7: rows 0, 2}, {3: rows 1, 3}; rewards [1, 2, -1, 4]
    # RPG: group 7 mean 0 -> [1, -1]; group 3 mean 3 -> [-1, 1]; rows: [1, -1, -1, 1]
    mask = [[1.0]] * 4
    out = compute_advantages("rpg", t([1.0, 2.0, -1.0, 4.0]), torch.tensor([7, 3, 7, 3]), t(mask))
    close(out, broadcast([1.0, -1.0, -1.0, 1.0], mask))


def test_integer_rewards_promote_to_float32():
    # int rewards -> float32 output (docstring: float32 or wider); RPG on [1, 0]: mean 1/2 -> [0.5, -0.5]
    out = compute_advantages("rpg", torch.tensor([1, 0]), [0, 0], torch.ones(2, 1))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.5], [-0.5]]))


def test_masked_whiten_hand_values():
    # values [1, 2, 3, 100] with mask [1, 1, 1, 0]: the 100 is ignored
    # mean = (1 + 2 + 3) / 3 = 2; unbiased var = (1 + 0 + 1) / 2 = 1; denominator sqrt(1 + 1e-8)
    # -> [-1, 0, 1] / sqrt(1 + 1e-8) = [-0.999999995, 0, 0.999999995]
    out = masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0]))
    d = math.sqrt(1 + WHITEN_EPS)
    close(out[:3], t([-1 / d, 0.0, 1 / d]))


# =====================================================================================================================
# 4. Error cases
# =====================================================================================================================


def test_unknown_estimator_lists_allowed_values():
    with pytest.raises(ValueError, match="bogus") as err:
        compute_advantages("bogus", t(REWARDS), GIDS, t(MASK))
    msg = str(err.value)
    for name in ["rpg", "batch_mean", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]:
        assert repr(name) in msg


@pytest.mark.parametrize(
    "gids",
    [
        [0, 0, 0, 1, 1],  # 5 ids for 6 responses
        ["a"] * 7,  # 7 string ids
        torch.tensor([0, 0, 0, 1, 1]),  # tensor of the wrong length
        torch.tensor([[0, 0, 0], [1, 1, 1]]),  # 6 ids, but shaped [2, 3]
    ],
)
def test_group_ids_wrong_length(gids):
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("rpg", t(REWARDS), gids, t(MASK))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rewards_not_finite(bad):
    rewards = t(REWARDS)
    rewards[2] = bad
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("grpo", rewards, GIDS, t(MASK))


def test_token_rewards_nan_on_valid_token():
    rewards = torch.zeros(6, 3, dtype=F64)
    rewards[0, 1] = float("nan")  # row 0 has 3 valid tokens
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("reinforce_pp", rewards, GIDS, t(MASK))


@pytest.mark.parametrize(
    "shape",
    [
        (5,),  # [B - 1]
        (7,),  # [B + 1]
        (6, 4),  # [B, T + 1]
        (6, 3, 1),  # [B, T, 1]
        (1, 6),  # [1, B]
    ],
)
def test_rewards_wrong_shape(shape):
    with pytest.raises(ValueError, match="rewards has shape"):
        compute_advantages("rpg", torch.zeros(shape, dtype=F64), GIDS, t(MASK))


def test_reinforce_pp_needs_two_valid_tokens():
    # unbiased variance over a single valid token is 0/0: refused rather than returning NaN
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        compute_advantages("reinforce_pp", t([1.0, -1.0]), [0, 0], t([[1.0, 0.0], [0.0, 0.0]]))


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="allowed"):
        aggregate(t(PER_TOKEN), t(AGG_MASK), "bogus")  # type: ignore[arg-type]
