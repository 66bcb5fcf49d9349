"""When the KL term cannot act (``RunConfig.kl_inert_reason``), checked numerically rather than argued.

With the reference refreshed every step (pi_ref = pi_old, spec §5) and one optimizer update per rollout, the update's
gradient is taken at pi_theta = pi_old = pi_ref. For every KL term of the design space (``rpg design``) x clip, at the
trainer's convention (pi_old = the update's own detached log-prob, pi_ref = None): the KL's value is 0, its gradient
is exactly 0 for UFKL/URKL, k2 and k3 and c * beta * dlog pi with c = +-1 for FKL/RKL and k1, whose expectation is 0
(by enumeration). With pi_theta != pi_old (a second mini-batch) every in-loss KL term acts. The KL in the reward is 0
with pi_ref = pi_old whatever the updates. On the trainer: beta 0.5 and 0.05 train bit-identical weights exactly
where the rule says the KL is inert, and different ones where it says it acts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import scoring_task
from rpg_core.cli import design_space
from rpg_core.config import load_run_config
from rpg_core.objectives import Form, aggregate, policy_loss, reward_kl_penalty, shape_rewards
from rpg_core.objectives.exact import kl_gradient_at_reference

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.5
TERMS = [c.model_copy(update={"clip": clip}) for c in design_space(BETA) for clip in ("none", "ppo", "dual")]
IDS = [f"{c.form.value}-{c.divergence_name}-{c.clip.value}" for c in TERMS]


def _setup(seed: int = 0):
    """Random per-token policies [B, T, V] (float64), sampled tokens, a padded mask and advantages."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    tokens = torch.randint(0, 7, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    return theta, tokens, mask, adv


def _logp(theta, tokens):
    return torch.log_softmax(theta, -1).gather(-1, tokens[..., None]).squeeze(-1)


def _loss_and_grad(cfg, theta, tokens, mask, adv, old=None):
    """policy_loss as the update calls it: pi_old the update's own detached log-prob (one update) unless given."""
    logp = _logp(theta, tokens)
    out = policy_loss(cfg, logp, logp.detach() if old is None else old, None, adv, mask)
    (grad,) = torch.autograd.grad(out.loss, theta)
    return out, grad


@pytest.mark.parametrize("cfg", TERMS, ids=IDS)
def test_one_update_with_pi_ref_eq_pi_old_the_kl_term_is_zero_or_zero_mean(cfg):
    theta, tokens, mask, adv = _setup()
    out, g_beta = _loss_and_grad(cfg, theta, tokens, mask, adv)
    _, g_none = _loss_and_grad(cfg.model_copy(update={"beta": 0.0}), theta, tokens, mask, adv)
    # The KL's value: every estimate of KL(pi_theta || pi_ref), and the form's own KL value where it has one.
    assert out.metrics["kl_k1"] == out.metrics["kl_k2"] == out.metrics["kl_k3"] == 0.0
    assert out.metrics.get("kl_value", 0.0) == 0.0
    c = kl_gradient_at_reference(cfg)
    if cfg.form is Form.REWARD or cfg.divergence_name in ("UFKL", "URKL") or cfg.divergence_name[:2] in ("k2", "k3"):
        assert c == 0.0 and torch.equal(g_beta, g_none)  # the gradient is bit for bit that of beta = 0
    else:
        # FKL/RKL and k1: the KL's gradient is c * beta * d aggregate(log pi_theta), c = -1 (FKL, forward k1), +1
        assert c == (-1.0 if cfg.divergence_name in ("FKL", "k1-forward") else 1.0)
        logp = _logp(theta, tokens)
        (score,) = torch.autograd.grad(aggregate(torch.where(mask, logp, 0.0), mask, cfg.agg), theta)
        assert float(score.abs().max()) > 1e-3
        assert torch.allclose(g_beta - g_none, c * BETA * score, rtol=1e-10, atol=1e-14)
        # ... whose expectation under the sampler is 0: one token, every outcome y weighted by pi(y) (spec §2.6)
        theta1 = theta[0, :1].detach().clone().requires_grad_(True)  # [1, V]
        ys = torch.arange(7)[:, None]
        logp1 = torch.log_softmax(theta1, -1)[0, ys]  # [V, 1]: row y is outcome y
        one = torch.ones(7, 1, dtype=torch.bool)
        kl = policy_loss(cfg, logp1, logp1.detach(), None, torch.zeros(7, dtype=torch.float64), one).per_token
        (expected,) = torch.autograd.grad((logp1.detach().exp() * kl).sum(), theta1)
        assert float(expected.abs().max()) < 1e-12


@pytest.mark.parametrize("cfg", [c for c in TERMS if c.form is not Form.REWARD],
                         ids=[i for c, i in zip(TERMS, IDS, strict=True) if c.form is not Form.REWARD])  # fmt: skip
def test_with_pi_theta_off_pi_old_every_in_loss_kl_term_acts(cfg):
    """A second mini-batch (or epoch) runs at pi_theta != pi_old = pi_ref: the KL has a value and a gradient."""
    theta, tokens, mask, adv = _setup()
    noise = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    old = (_logp(theta, tokens) + 0.1 * noise).detach()
    out, g_beta = _loss_and_grad(cfg, theta, tokens, mask, adv, old=old)
    _, g_none = _loss_and_grad(cfg.model_copy(update={"beta": 0.0}), theta, tokens, mask, adv, old=old)
    assert out.metrics["kl_k3"] > 1e-4 and float((g_beta - g_none).abs().max()) > 1e-4


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_kl_in_the_reward_is_zero_with_pi_ref_eq_pi_old(estimator, direction):
    """form=reward takes the KL at rollout time between pi_old and pi_ref: 0 when they are one policy (iterative
    reference refreshed every step), however many updates follow; non-zero against a fixed or lagged reference."""
    from rpg_core.objectives import ObjectiveConfig

    _, _, mask, _ = _setup()
    old = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scores = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cfg = ObjectiveConfig(form="reward", estimator=estimator, direction=direction, beta=BETA)
    assert torch.equal(reward_kl_penalty(cfg, old, old, mask), torch.zeros_like(old))
    shaped = [shape_rewards(cfg.model_copy(update={"beta": b}), scores, mask, old_logp=old).advantage_input
              for b in (BETA, BETA / 10)]  # fmt: skip
    assert torch.equal(shaped[0], shaped[1]) and torch.equal(shaped[0].sum(-1), scores)
    ref = old + 0.3 * torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert float(reward_kl_penalty(cfg, old, ref, mask).abs().max()) > 1e-3


def test_the_rule_names_the_fix_and_matches_the_gradients():
    demo = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")  # the README demo: kl 0.00e+00 every step
    reason = demo.kl_inert_reason()
    assert reason.startswith("the KL term is identically zero: one optimizer update per rollout")
    assert "set algorithm.mini_batches >= 2" in reason and "algorithm.reference=fixed" in reason
    for acts in ("algorithm.mini_batches=2", "algorithm.epochs=2", "algorithm.reference=fixed",
                 "algorithm.ref_refresh_every=3", "objective.beta=0"):  # fmt: skip
        assert demo.with_overrides([acts]).kl_inert_reason() is None, acts
    noisy = demo.with_overrides(["objective.normalized=true"]).kl_inert_reason()  # RKL
    assert "zero in value and in expected gradient" in noisy and "+beta * dlog pi" in noisy
    reward = demo.with_overrides(["objective.form=reward", "algorithm.mini_batches=2"]).kl_inert_reason()
    assert "objective.form=reward" in reward and "ref_refresh_every >= 2" in reward and "mini_batches" not in reward
    assert demo.with_overrides(["objective.form=reward", "algorithm.reference=fixed"]).kl_inert_reason() is None
    # "identically zero" exactly where the loss's KL gradient at pi_theta = pi_ref = pi_old is 0
    for cfg in TERMS:
        run = demo.with_overrides({"objective": cfg.model_dump(mode="json")})
        assert ("identically zero" in run.kl_inert_reason()) == (kl_gradient_at_reference(cfg) == 0.0), cfg.summary()


def _trained_weights(tmp_path: Path, *extra: str) -> dict[str, torch.Tensor]:
    from rpg_core.trainer import Trainer

    source = scoring_task.write_zero_task(tmp_path / "data")
    cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *scoring_task.overrides(source), "rollout.prompts_per_step=2", "rollout.n=8", "algorithm.micro_batch_size=8",
        "reward.dynamic_sampling=false", "optim.lr=1e-3", "optim.warmup_steps=0", "train.steps=2",
        "train.checkpoint_every=0", "tracking.enabled=false", f"train.output_dir={tmp_path / 'runs'}", *extra])  # fmt: skip
    tr = Trainer(cfg)
    hist = tr.fit().history
    assert any(m["adv/abs_mean"] > 0 for m in hist)  # the policy-gradient term moves the weights too
    return {"inert": cfg.kl_inert_reason() is not None,
            **{k: v.detach().clone() for k, v in tr.policy.state_dict().items()}}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("setting", [
    ("objective.form=reinforce",),                                      # the demo's URKL, one update: inert
    ("algorithm.mini_batches=2",),                                      # a second update: the KL acts
    ("objective.form=reward", "objective.estimator=k3", "algorithm.mini_batches=2"),  # KL in the reward: inert
])  # fmt: skip
def test_beta_changes_the_trained_weights_exactly_when_the_kl_acts(tmp_path, setting):
    runs = [_trained_weights(tmp_path / f"b{b}", f"objective.beta={b}", *setting) for b in (0.5, 0.05)]
    inert = runs[0].pop("inert")
    assert runs[1].pop("inert") == inert
    same = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert same == inert
