"""policy_loss values worked out by hand for every form, dtypes, masking, metrics and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rpg_core.objectives import (
    LossInputError,
    ObjectiveConfig,
    ObjectiveConfigError,
    policy_loss,
    reward_kl_penalty,
)

pytestmark = pytest.mark.unit

LN2 = math.log(2.0)
# One token throughout: logp = -1, old_logp = -1 - ln 2, so log w = ln 2 and w = 2; A = 1, beta = 0.5, and the
# reference is pi_old (iterative), so r = w.
LOGP, OLD = -1.0, -1.0 - LN2


def one_token(cfg: ObjectiveConfig, adv: float = 1.0, ref: float | None = None):
    logp = torch.tensor([[LOGP]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[OLD]], dtype=torch.float64)
    ref_t = None if ref is None else torch.tensor([[ref]], dtype=torch.float64)
    out = policy_loss(cfg, logp, old, ref_t, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1))
    (g,) = torch.autograd.grad(out.loss, logp)
    return out.per_token.item(), g.item(), out


@pytest.mark.parametrize(
    ("form", "direction", "normalized", "expected"),
    [
        # Table 1 URKL: -w A + beta (w log w - w + 1) = -2 + 0.5 (2 ln 2 - 1) = -2 + 0.5 * 0.386294 = -1.806853
        ("differentiable", "reverse", False, -2 + 0.5 * (2 * LN2 - 1)),
        # Table 1 UFKL: -w A + beta (w - log w - 1) = -2 + 0.5 (1 - ln 2) = -1.846574
        ("differentiable", "forward", False, -2 + 0.5 * (1 - LN2)),
        # Table 4 RKL: w (-A + beta log w) = 2 (-1 + 0.5 ln 2) = -1.306853
        ("differentiable", "reverse", True, 2 * (-1 + 0.5 * LN2)),
        # Table 4 FKL: -w A - beta log(pi_theta/pi_ref) = -2 - 0.5 ln 2 = -2.346574 (+ const vs -beta log pi_theta)
        ("differentiable", "forward", True, -2 - 0.5 * LN2),
        # Table 2 URKL: -SG(w (A - beta log w)) logp = -2 (1 - 0.5 ln 2) * (-1) = 1.306853
        ("reinforce", "reverse", False, 2 * (1 - 0.5 * LN2)),
        # Table 2 UFKL: -SG(w A - beta (w - 1)) logp = -(2 - 0.5) * (-1) = 1.5
        ("reinforce", "forward", False, 1.5),
        # Prop. F.4 RKL: -SG(w (A - beta log w - beta)) logp = 2 (1 - 0.5 (ln 2 + 1)) = 0.306853
        ("reinforce", "reverse", True, 2 * (1 - 0.5 * (LN2 + 1))),
        # Prop. F.1 FKL: -SG(w A + beta) logp = 2.5
        ("reinforce", "forward", True, 2.5),
    ],
)
def test_unclipped_rpg_loss_values(form, direction, normalized, expected):
    cfg = ObjectiveConfig(form=form, direction=direction, normalized=normalized, beta=0.5, clip="none")
    value, _, _ = one_token(cfg)
    assert value == pytest.approx(expected, rel=1e-12)


def test_clipped_values_follow_algorithms_1_and_2():
    # w = 2 > 1 + eps_high = 1.28 and A' = 1 - 0.5 ln 2 = 0.653426 >= 0: clipped, no gradient.
    a_reg = 1 - 0.5 * LN2
    value, grad, out = one_token(ObjectiveConfig(form="differentiable", beta=0.5, clip="dual"))
    assert value == pytest.approx(-1.28 * a_reg, rel=1e-12)  # Algorithm 1: -clip(w) A' = -0.836385
    assert grad == 0.0 and out.metrics["clipfrac_high"] == 1.0
    # Algorithm 2 constant branch: (A b + C) SG(l), C = -beta w log w = -ln 2, b = 1.28, l = -logp = 1
    value, grad, _ = one_token(ObjectiveConfig(form="reinforce", beta=0.5, clip="dual"))
    assert value == pytest.approx((1.28 - LN2) * 1.0, rel=1e-12)  # 0.586853
    assert grad == 0.0


def test_penalty_and_reward_forms():
    # GRPO k3(ref/theta) with ref = old: log r = old - logp = -ln 2, k3 = 1/2 - 1 + ln 2 = 0.193147
    k3 = 0.5 - 1 + LN2
    grpo = ObjectiveConfig(form="penalty", estimator="k3", direction="reverse", beta=0.5, clip="none")
    value, grad, out = one_token(grpo)
    assert value == pytest.approx(-2 + 0.5 * k3, rel=1e-12)  # -1.903426
    # d/dlogp [-w A + beta (e^{ref-logp} - 1 - ref + logp)] = -w A + beta (1 - e^{ref-logp}) = -2 + 0.5 * 0.5
    assert grad == pytest.approx(-2 + 0.25, rel=1e-12)
    assert out.metrics["pg_loss"] == pytest.approx(-2.0) and out.metrics["kl_loss"] == pytest.approx(0.5 * k3)
    # corrected: beta w k3 = 0.5 * 2 * 0.193147 -> the URKL value of Table 1 (+1 convention), -1.806853
    corrected = grpo.model_copy(update={"kl_is_weight": True})
    assert one_token(corrected)[0] == pytest.approx(-2 + 0.5 * (2 * LN2 - 1), rel=1e-12)
    # reward form: only the policy term -w A = -2; the KL acts upstream
    value, grad, _ = one_token(ObjectiveConfig(form="reward", beta=0.5, clip="none"))
    assert (value, grad) == (pytest.approx(-2.0), pytest.approx(-2.0))


def test_reward_kl_penalty_values():
    # k1 reverse at rollout time: log r = ref - old. ref - old = [ln 2, 0]; beta k1 = 0.5 * (-ln 2), 0.
    cfg = ObjectiveConfig(form="reward", estimator="k1", beta=0.5)
    old = torch.tensor([[-1.0 - LN2, -3.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -3.0, 5.0]], dtype=torch.float64)
    pen = reward_kl_penalty(cfg, old, ref, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pen, torch.tensor([[-0.5 * LN2, 0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ObjectiveConfigError, match="form='reward'"):
        reward_kl_penalty(ObjectiveConfig(form="penalty"), old, ref, torch.ones(1, 3))


def test_fixed_reference_value_is_the_divergence():
    """UFKL, unclipped: the KL term s f(r) with s = ref/old integrates to UKL(ref||theta) exactly (spec §2.3)."""
    g = torch.Generator().manual_seed(0)
    old = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    theta = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    cfg = ObjectiveConfig(form="differentiable", direction="forward", normalized=False, beta=1.0, clip="none")
    out = policy_loss(
        cfg, theta.log()[:, None], old.log()[:, None], ref.log()[:, None], torch.zeros(5, dtype=torch.float64),
        torch.ones(5, 1),
    )
    ukl = (ref * (ref / theta).log()).sum() + (theta - ref).sum()
    assert (old * out.per_token[:, 0]).sum().item() == pytest.approx(ukl.item(), rel=1e-12)


def test_iterative_reference_spellings_agree():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    logp = (old + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), torch.ones(3, 4)
    cfg = ObjectiveConfig(form="differentiable", direction="forward", normalized=False, beta=0.3)
    a = policy_loss(cfg, logp, old, None, adv, mask).per_token
    b = policy_loss(cfg, logp, old, old, adv, mask).per_token
    c = policy_loss(cfg, logp, old, old.clone(), adv, mask).per_token  # general path, s = 1 exactly
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_any_float_dtype_is_computed_in_at_least_float32(dtype):
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=dtype)
    logp = (old + 0.1).detach().requires_grad_(True)
    out = policy_loss(ObjectiveConfig(), logp, old, None, torch.tensor([1.0], dtype=dtype), torch.ones(1, 3))
    assert out.per_token.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out.loss.backward()
    assert logp.grad.dtype == dtype and torch.isfinite(logp.grad).all()


def test_mask_dtypes_agree_and_masked_positions_never_leak():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    logp = (old + torch.tensor([[0.1, -0.2, 0.0], [0.05, 0.0, 0.0]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    outs = []
    for mask in (
        torch.tensor([[1, 1, 0], [1, 0, 0]]),
        torch.tensor([[True, True, False], [True, False, False]]),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    ):
        outs.append(policy_loss(ObjectiveConfig(), logp, old, None, adv, mask))
    for o in outs[1:]:
        torch.testing.assert_close(o.per_token, outs[0].per_token)
    # garbage (NaN, -inf) at padded positions must not reach the loss or the gradient
    bad_logp = logp.detach().clone()
    bad_logp[0, 2], bad_logp[1, 1] = float("nan"), float("-inf")
    bad_logp.requires_grad_(True)
    bad_old = old.clone()
    bad_old[1, 2] = float("inf")
    out = policy_loss(ObjectiveConfig(), bad_logp, bad_old, None, adv, outs[1].per_token != 0)
    out.loss.backward()
    assert torch.isfinite(bad_logp.grad).all() and bad_logp.grad[0, 2] == 0 and bad_logp.grad[1, 1] == 0
    assert out.per_token[0, 2] == 0 and out.metrics["n_tokens"] == 3


def test_advantages_per_sequence_or_per_token_agree():
    old = -torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    logp = old + 0.1
    a = policy_loss(ObjectiveConfig(), logp, old, None, torch.tensor([1.0, -2.0]), torch.ones(2, 3))
    b = policy_loss(ObjectiveConfig(), logp, old, None, torch.tensor([[1.0] * 3, [-2.0] * 3]), torch.ones(2, 3))
    torch.testing.assert_close(a.per_token, b.per_token)


def test_metrics_by_hand():
    # Two tokens: log w = ln 2 (w = 2) and log w = -ln 2 (w = 0.5); reference = old, A = [1] broadcast.
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    logp = old + torch.tensor([[LN2, -LN2]], dtype=torch.float64)
    out = policy_loss(ObjectiveConfig(form="penalty", beta=0.0), logp, old, None, torch.tensor([1.0], dtype=torch.float64),
                      torch.ones(1, 2))  # fmt: skip
    m = out.metrics
    assert m["ratio_mean"] == pytest.approx(1.25) and m["ratio_max"] == 2.0 and m["ratio_min"] == pytest.approx(0.5)
    # KL(theta || ref) estimators with log(ref/theta) = [-ln 2, ln 2]: k1 mean = 0,
    # k2 = (ln 2)^2 / 2 = 0.240227, k3 mean = ((1/2 - 1 + ln 2) + (2 - 1 - ln 2)) / 2 = 0.25
    assert m["kl_k1"] == pytest.approx(0.0, abs=1e-15)
    assert m["kl_k2"] == pytest.approx(LN2**2 / 2)
    assert m["kl_k3"] == pytest.approx(0.25)
    # A = 1 >= 0: w = 2 >= 1.28 clipped high; w = 0.5 flows (no low clip for positive advantages)
    assert (m["clipfrac"], m["clipfrac_high"], m["clipfrac_low"], m["clipfrac_dual"]) == (0.5, 0.5, 0.0, 0.0)
    # token-mean of -clip(w) A = (-1.28 - 0.5) / 2 = -0.89
    assert m["n_tokens"] == 2 and m["loss"] == pytest.approx(-(1.28 + 0.5) / 2)


# -- bad input: a clear error naming the argument, before any compute ----------------------------------------


def _ok():
    return torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"logp": torch.zeros(2, 3, 1)}, "logp must have shape [B, T]"),
        ({"old_logp": torch.zeros(2, 4)}, "old_logp has shape (2, 4)"),
        ({"ref_logp": torch.zeros(3, 3)}, "ref_logp has shape (3, 3)"),
        ({"advantages": torch.zeros(3)}, "advantages has shape (3,)"),
        ({"mask": torch.ones(2, 2)}, "mask has shape (2, 2)"),
        ({"mask": torch.zeros(2, 3)}, "mask has no valid token"),
        ({"mask": torch.full((2, 3), 0.5)}, "mask must be 0/1"),
        ({"logp": torch.zeros(2, 3, dtype=torch.long)}, "logp must be a floating-point tensor"),
        ({"advantages": [0.0, 1.0]}, "advantages must be a torch.Tensor"),
        ({"old_logp": torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])}, "old_logp has 1 NaN/inf"),
        ({"advantages": torch.tensor([0.0, float("inf")])}, "advantages has 3 NaN/inf"),
        ({"logp": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("-inf")]])}, "first at [1, 2]"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(change, needle):
    args = dict(zip(("logp", "old_logp", "ref_logp", "advantages", "mask"), _ok(), strict=True)) | change
    with pytest.raises(LossInputError) as e:
        policy_loss(ObjectiveConfig(), **args)
    assert needle in str(e.value), str(e.value)


def test_a_config_that_is_not_an_objective_config_is_rejected():
    with pytest.raises(TypeError, match="ObjectiveConfig"):
        policy_loss({"form": "reinforce"}, *_ok())


def test_ratio_extremes_ignore_padding_even_when_every_valid_ratio_is_below_one():
    # Padding has w = 1 internally; with valid w = [0.5, 0.8] the max must be 0.8, not 1. Then [1.5, 2]: min 1.5.
    old = torch.zeros(1, 3, dtype=torch.float64)
    for ws, lo, hi in (([0.5, 0.8], 0.5, 0.8), ([1.5, 2.0], 1.5, 2.0)):
        logp = torch.tensor([[math.log(ws[0]), math.log(ws[1]), 7.0]], dtype=torch.float64)
        m = policy_loss(ObjectiveConfig(), logp, old, None, torch.ones(1), torch.tensor([[1, 1, 0]])).metrics
        assert (m["ratio_min"], m["ratio_max"]) == (pytest.approx(lo), pytest.approx(hi))
        assert m["ratio_mean"] == pytest.approx(sum(ws) / 2)


def test_kl_value_is_the_mean_kl_term_without_beta():
    # penalty k3-reverse, ref = old, log w = ln 2 on both tokens: k3(ref/theta) = 1/2 - 1 + ln 2 = 0.193147
    old = torch.full((1, 2), -1.0, dtype=torch.float64)
    out = policy_loss(ObjectiveConfig(form="penalty", estimator="k3", beta=0.3), old + LN2, old, None,
                      torch.zeros(1, dtype=torch.float64), torch.ones(1, 2))  # fmt: skip
    assert out.metrics["kl_value"] == pytest.approx(0.5 - 1 + LN2, rel=1e-12)
    assert out.metrics["kl_loss"] == pytest.approx(0.3 * (0.5 - 1 + LN2), rel=1e-12)


def test_a_nan_advantage_on_an_all_padding_row_is_ignored():
    old = torch.zeros(2, 2)
    out = policy_loss(ObjectiveConfig(), old + 0.1, old, None, torch.tensor([1.0, float("nan")]),
                      torch.tensor([[1, 1], [0, 0]]))  # fmt: skip
    assert torch.isfinite(out.loss) and out.per_token[1].abs().sum() == 0
