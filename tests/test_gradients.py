"""Gradient exactness of every RPG form against objectives computed by enumeration (spec §2.2-§2.5, §2.7, §3.3, §4).

The oracles here are typed in from the spec (J by enumeration, the Weight table of §2.2); they share no code with
rpg_core.objectives, so a wrong formula there fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpg_core.objectives import ObjectiveConfig, policy_loss

pytestmark = pytest.mark.unit

F64 = torch.float64
DIVERGENCES = ["FKL", "RKL", "UFKL", "URKL"]
_AXES = {"FKL": ("forward", True), "RKL": ("reverse", True), "UFKL": ("forward", False), "URKL": ("reverse", False)}


def rpg_cfg(form: str, div: str, **kw) -> ObjectiveConfig:
    direction, normalized = _AXES[div]
    return ObjectiveConfig(form=form, direction=direction, normalized=normalized, **kw)


def divergence(div: str, p: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Spec §1 / §2.1, by enumeration. Forward = D(ref || theta); U* adds the mass-correction term."""
    if div == "FKL":
        return (ref * (ref / p).log()).sum()
    if div == "RKL":
        return (p * (p / ref).log()).sum()
    if div == "UFKL":
        return (ref * (ref / p).log()).sum() + (p - ref).sum()
    return (p * (p / ref).log()).sum() + (ref - p).sum()  # URKL


def spec_weight(div: str, w: torch.Tensor, a: torch.Tensor, beta: float) -> torch.Tensor:
    """Spec §2.2, 'Weight with baseline' column (iterative mode: the reference is pi_old)."""
    return {
        "FKL": w * a + beta,
        "RKL": w * (a - beta * (w.log() + 1)),
        "UFKL": w * a - beta * (w - 1),
        "URKL": w * (a - beta * w.log()),
    }[div]


def enumerable_problem(param: str, fixed_ref: bool, near: bool, seed: int = 0, k: int = 7):
    """K outcomes (length-1 sequences). pi_old has mass 2.7 for the unnormalized measure (spec §2.5 step 2)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.rand(k, generator=g, dtype=F64) + 0.1
    old = old / old.sum() * (1.0 if param == "softmax" else 2.7)
    theta = (old.log() + (0.05 if near else 0.7) * torch.randn(k, generator=g, dtype=F64)).requires_grad_(True)
    ref = (old.log() + 0.5 * torch.randn(k, generator=g, dtype=F64)).exp() if fixed_ref else old
    rewards = torch.randn(k, generator=g, dtype=F64)
    return theta, old, ref, rewards


def log_pi(param: str, theta: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(theta, 0) if param == "softmax" else theta  # exp(theta): an unnormalized measure


def run_enumerated(cfg, param, theta, old, ref, adv, fixed_ref):
    logp = log_pi(param, theta)
    ones = torch.ones(len(old), 1, dtype=torch.bool)
    ref_logp = ref.log()[:, None] if fixed_ref else None
    out = policy_loss(cfg, logp[:, None], old.log()[:, None], ref_logp, adv, ones)
    return logp, out


@pytest.mark.parametrize("form", ["differentiable", "reinforce"])
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("param", ["softmax", "exp"])
@pytest.mark.parametrize("fixed_ref", [False, True], ids=["iterative", "fixed-ref"])
@pytest.mark.parametrize("clip", ["none", "dual"])
def test_surrogate_gradient_equals_minus_exact_objective_gradient(form, div, param, fixed_ref, clip):
    """Spec §2.5: d/dtheta sum_x pi_old(x) per_token[x] == -dJ/dtheta, J = E_theta[A] - beta D (float64).

    With a fixed reference the sampler is still pi_old (spec §2.7). With the dual clip, pi_theta stays close to
    pi_old so no ratio is clipped (asserted), and the clipped losses (Algorithms 1 and 2) must be exact too.
    """
    beta = 0.6
    cfg = rpg_cfg(form, div, beta=beta, clip=clip)
    theta, old, ref, rewards = enumerable_problem(param, fixed_ref, near=clip != "none")
    adv = rewards - 0.25  # a constant baseline b
    logp, out = run_enumerated(cfg, param, theta, old, ref, adv, fixed_ref)
    surrogate = (old * out.per_token[:, 0]).sum()
    p = logp.exp()
    objective = (p * adv).sum() - beta * divergence(div, p, ref)
    (g_surrogate,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    (g_objective,) = torch.autograd.grad(objective, theta)
    assert out.metrics.get("clipfrac", 0.0) == 0.0
    assert g_objective.abs().max() > 0.05  # a real gradient, not a trivially small one
    torch.testing.assert_close(g_surrogate, -g_objective, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["differentiable", "reinforce"])
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("param", ["softmax", "exp"])
def test_per_sample_gradient_is_minus_weight_times_score(form, div, param):
    """Spec §2.3 [D] / §2.5 step 5: for every x, d per_token[x] = -Weight(x) dlog pi_theta(x), Weight from §2.2."""
    beta = 0.4
    cfg = rpg_cfg(form, div, beta=beta, clip="none")
    theta, old, ref, rewards = enumerable_problem(param, False, near=False, seed=3)
    logp, out = run_enumerated(cfg, param, theta, old, ref, rewards, False)
    w = (logp - old.log()).exp().detach()
    weight = spec_weight(div, w, rewards, beta)
    for x in range(len(old)):
        (g_x,) = torch.autograd.grad(out.per_token[x, 0], theta, retain_graph=True)
        (score_x,) = torch.autograd.grad(logp[x], theta, retain_graph=True)
        torch.testing.assert_close(g_x, -weight[x] * score_x, rtol=1e-10, atol=1e-12)


def _token_batch(seed: int = 0, b: int = 6, t: int = 5):
    """A [B, T] batch with ratios spread across every clip region and both advantage signs."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 0.1
    log_w = torch.linspace(-1.2, 2.6, b * t, dtype=F64).reshape(b, t)  # w from 0.30 to 13.5
    logp = (old + log_w).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3, 2.0, -2.0], dtype=F64)[:b]
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -1] = mask[3, -2:] = False
    return logp, old, adv, mask


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("clip", ["none", "ppo", "dual"])
@pytest.mark.parametrize("fixed_ref", [False, True], ids=["iterative", "fixed-ref"])
def test_differentiable_and_reinforce_have_identical_per_token_gradients(div, clip, fixed_ref):
    """Prop. 4.1 / spec §2.4: only loss values differ between the two families; gradients agree token by token,
    including the clipped tokens (Algorithm 1 with SG(A') and Algorithm 2 share the clip rule)."""
    logp, old, adv, mask = _token_batch()
    ref = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads, clipfracs = [], []
    for form in ("differentiable", "reinforce"):
        out = policy_loss(rpg_cfg(form, div, beta=0.3, clip=clip), logp, old, ref if fixed_ref else None, adv, mask)
        (g,) = torch.autograd.grad(out.per_token.sum(), logp)
        grads.append(g)
        clipfracs.append(out.metrics.get("clipfrac", 0.0))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert clipfracs[0] == clipfracs[1]
    if clip != "none":
        assert 0.2 < clipfracs[0] < 0.9  # the batch really exercises the clipped branches


# -- RPG-Style Clip truth table (spec §4.1, §4.4, §4.6) --------------------------------------------------------
# eps_low = 0.2, eps_high = 0.28, c = 10: thresholds 0.8, 1.28 and 10. Per-token gradient w.r.t. logp is -W where
# the gradient flows and 0 where clipped; with beta = 0, W = A * w.
W_VALUES = [0.5, 0.8, 0.9, 1.0, 1.2, 1.28, 1.5, 5.0, 10.0, 12.0]
#                     w:   0.5  0.8  0.9  1.0  1.2  1.28 1.5  5.0  10   12
FLOWS_POSITIVE_ADV = [True, True, True, True, True, False, False, False, False, False]  # w < 1 + eps_high
FLOWS_NEGATIVE_ADV_DUAL = [False, False, True, True, True, True, True, True, False, False]  # 1 - eps_low < w < c
FLOWS_NEGATIVE_ADV_PPO = [False, False, True, True, True, True, True, True, True, True]  # no dual bound


def _truth_table_grad(form: str, clip: str, adv_sign: float, beta: float = 0.0, div: str = "URKL"):
    w = torch.tensor(W_VALUES, dtype=F64)
    old = torch.full((1, len(w)), -2.0, dtype=F64)
    logp = (old + w.log()).requires_grad_(True)
    adv = torch.tensor([adv_sign], dtype=F64)
    if form == "penalty":
        cfg = ObjectiveConfig(form="penalty", beta=beta, clip=clip)
    else:
        cfg = rpg_cfg(form, div, beta=beta, clip=clip)
    out = policy_loss(cfg, logp, old, None, adv, torch.ones_like(old, dtype=torch.bool))
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    return g[0], w, out.metrics


@pytest.mark.parametrize("form", ["differentiable", "reinforce", "penalty"])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0], ids=["A>=0", "A<0"])
@pytest.mark.parametrize("clip", ["dual", "ppo"])
def test_dual_clip_gradient_truth_table(form, adv_sign, clip):
    g, w, metrics = _truth_table_grad(form, clip, adv_sign)
    if adv_sign > 0:
        flows = FLOWS_POSITIVE_ADV
    else:
        flows = FLOWS_NEGATIVE_ADV_DUAL if clip == "dual" else FLOWS_NEGATIVE_ADV_PPO
    # e.g. A = -1, w = 0.9 -> dL/dlogp = -A * w = +0.9; A = +1, w = 1.5 -> clipped -> 0
    expected = torch.where(torch.tensor(flows), -adv_sign * w, torch.zeros_like(w))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    n_clipped = flows.count(False)
    assert metrics["clipfrac"] == pytest.approx(n_clipped / len(W_VALUES))
    if adv_sign > 0:
        assert metrics["clipfrac_high"] == pytest.approx(5 / 10) and metrics["clipfrac_low"] == 0.0
    else:
        assert metrics["clipfrac_low"] == pytest.approx(2 / 10)  # w = 0.5 and w = 0.8 (boundary: <= 1 - eps_low)
        assert metrics["clipfrac_dual"] == pytest.approx(2 / 10 if clip == "dual" else 0.0)


@pytest.mark.parametrize("form", ["differentiable", "reinforce"])
def test_clipped_gradient_includes_the_kl_component(form):
    """In the gradient branches the weight is W = A w + C with C = -beta w log w for URKL (Algorithm 2)."""
    beta = 0.1
    g, w, _ = _truth_table_grad(form, "dual", -1.0, beta=beta)
    # A' = -1 - 0.1 log w < 0 for every w here, so the negative-advantage row of the table applies.
    weight = w * (-1.0 - beta * w.log())  # e.g. w = 5: 5 * (-1 - 0.1 * 1.6094) = -5.8047
    expected = torch.where(torch.tensor(FLOWS_NEGATIVE_ADV_DUAL), -weight, torch.zeros_like(w))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_branch_follows_the_regularised_advantage_not_the_reward_advantage():
    """Algorithm 2 branches on psi = A' * l (sign of A'); the released code on A (spec §4.6). They differ when
    |C/w| > |A|: A = 0.01, beta = 1, URKL, w = 1.5 gives A' = 0.01 - ln 1.5 = -0.3955 < 0, so the negative-branch
    rule applies and 0.8 < 1.5 < 10 lets the gradient flow: dL/dlogp = -w A' = 1.5 * 0.3955 = 0.59320."""
    old = torch.tensor([[-2.0]], dtype=F64)
    logp = (old + math.log(1.5)).requires_grad_(True)
    cfg = rpg_cfg("reinforce", "URKL", beta=1.0, clip="dual")
    out = policy_loss(cfg, logp, old, None, torch.tensor([0.01], dtype=F64), torch.ones(1, 1))
    (g,) = torch.autograd.grad(out.loss, logp)
    assert g.item() == pytest.approx(-1.5 * (0.01 - math.log(1.5)), rel=1e-12)  # 0.593198...
    assert out.metrics["clipfrac"] == 0.0


# -- GRPO's KL term (spec §3.2, §3.3) ------------------------------------------------------------------------


@pytest.mark.parametrize("kl_is_weight", [False, True], ids=["GRPO-k3", "corrected-w*k3"])
def test_grpo_k3_penalty_gradient_direction_on_policy(kl_is_weight):
    """On-policy (pi_old = pi_theta) with a fixed reference: the uncorrected GRPO k3(ref/theta) penalty gives the
    FORWARD-KL gradient dKL(ref||theta); multiplied by w it gives the intended REVERSE gradient dKL(theta||ref)."""
    g = torch.Generator().manual_seed(7)
    k, beta = 6, 0.5
    theta = torch.randn(k, generator=g, dtype=F64).requires_grad_(True)
    ref = torch.softmax(torch.randn(k, generator=g, dtype=F64), 0)
    logp = torch.log_softmax(theta, 0)
    old_logp = logp.detach()
    cfg = ObjectiveConfig(form="penalty", estimator="k3", direction="reverse", kl_is_weight=kl_is_weight, beta=beta)
    out = policy_loss(
        cfg, logp[:, None], old_logp[:, None], ref.log()[:, None], torch.zeros(k, dtype=F64), torch.ones(k, 1)
    )
    (g_loss,) = torch.autograd.grad((old_logp.exp() * out.per_token[:, 0]).sum(), theta, retain_graph=True)
    p = logp.exp()
    forward = (ref * (ref / p).log()).sum()
    reverse = (p * (p / ref).log()).sum()
    (g_fwd,) = torch.autograd.grad(forward, theta, retain_graph=True)
    (g_rev,) = torch.autograd.grad(reverse, theta)
    expected, other = (g_rev, g_fwd) if kl_is_weight else (g_fwd, g_rev)
    torch.testing.assert_close(g_loss, beta * expected, rtol=1e-10, atol=1e-12)
    assert (g_loss - beta * other).abs().max() > 1e-3  # and it is not the other direction's gradient


def test_k1_penalty_has_zero_gradient_on_policy_and_k2_the_reverse_gradient():
    """Spec §3.3 rows 1 and 3: k1 on-policy regularises nothing in expectation; k2 gives dKL(theta||ref)."""
    g = torch.Generator().manual_seed(11)
    k = 5
    theta = torch.randn(k, generator=g, dtype=F64).requires_grad_(True)
    ref = torch.softmax(torch.randn(k, generator=g, dtype=F64), 0)
    logp = torch.log_softmax(theta, 0)
    old_logp = logp.detach()
    grads = {}
    for est in ("k1", "k2"):
        cfg = ObjectiveConfig(form="penalty", estimator=est, beta=1.0)
        out = policy_loss(
            cfg, logp[:, None], old_logp[:, None], ref.log()[:, None], torch.zeros(k, dtype=F64), torch.ones(k, 1)
        )
        (grads[est],) = torch.autograd.grad((old_logp.exp() * out.per_token[:, 0]).sum(), theta, retain_graph=True)
    p = logp.exp()
    (g_rev,) = torch.autograd.grad((p * (p / ref).log()).sum(), theta)
    torch.testing.assert_close(grads["k1"], torch.zeros_like(g_rev), atol=1e-12, rtol=0)
    torch.testing.assert_close(grads["k2"], g_rev, rtol=1e-10, atol=1e-12)
