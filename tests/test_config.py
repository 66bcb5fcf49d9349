"""ObjectiveConfig validation, canonical keys (the sweep de-duplication contract) and the paper's presets."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from rpg_core.objectives import (
    PRESETS,
    AdvantageEstimator,
    Clip,
    Form,
    ObjectiveConfig,
    ObjectiveConfigError,
    ReferenceMode,
    get_preset,
    policy_loss,
)

pytestmark = pytest.mark.unit

# -- construction and validation -----------------------------------------------------------------------------


def test_string_enums_are_accepted_and_the_config_is_frozen():
    cfg = ObjectiveConfig(form="penalty", direction="forward", estimator="k1", clip="ppo", agg="seq-mean-token-sum")
    assert cfg.form is Form.PENALTY and cfg.clip is Clip.PPO
    with pytest.raises(Exception):
        cfg.beta = 0.5  # frozen
    assert ObjectiveConfig.parse({"form": "reinforce", "beta": "0.001"}).beta == 1e-3
    assert cfg.model_copy(update={"clip": "dual"}).clip is Clip.DUAL
    with pytest.raises(ObjectiveConfigError, match="beta"):
        cfg.model_copy(update={"beta": -1.0})  # copies are validated too


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"direction": "fwd"}, ["direction", "'forward'", "'reverse'", "'fwd'"]),
        ({"form": "ppo"}, ["form", "'differentiable'", "'reinforce'", "'penalty'", "'reward'"]),
        ({"estimator": "k4"}, ["estimator", "'k1'", "'k2'", "'k3'"]),
        ({"clip": "hard"}, ["clip", "'none'", "'ppo'", "'dual'"]),
        ({"agg": "mean"}, ["agg", "'token-mean'", "'seq-mean-token-sum-norm'"]),
        ({"beta": -1e-4}, ["beta", ">= 0"]),
        ({"beta": float("nan")}, ["beta", "finite"]),
        ({"eps_low": 1.2}, ["eps_low", "(0, 1)"]),
        ({"eps_high": 0.0}, ["eps_high", "> 0"]),
        ({"clip_c": 1.0}, ["clip_c", "> 1"]),
        ({"agg_norm_len": 0}, ["agg_norm_len", "positive"]),
        ({"betta": 0.1}, ["betta", "unknown field", "beta"]),
        (
            {"form": "penalty", "direction": "forward", "kl_is_weight": True},
            ["kl_is_weight", "direction='reverse'"],
        ),
    ],
)
def test_bad_config_names_the_field_and_the_allowed_values(kwargs, needles):
    with pytest.raises(ObjectiveConfigError) as e:
        ObjectiveConfig(**kwargs)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    with pytest.raises(ObjectiveConfigError):
        ObjectiveConfig.parse(kwargs)


# -- keys ----------------------------------------------------------------------------------------------------

GRID = {
    "form": [f.value for f in Form],
    "direction": ["forward", "reverse"],
    "normalized": [True, False],
    "estimator": ["k1", "k2", "k3"],
    "kl_is_weight": [False, True],
    "clip": ["none", "ppo", "dual"],
}


def full_grid(**fixed):
    for values in itertools.product(*GRID.values()):
        kw = dict(zip(GRID, values, strict=True)) | fixed
        try:
            yield ObjectiveConfig(**kw)
        except ObjectiveConfigError:
            continue  # penalty + forward + kl_is_weight


@pytest.mark.integration
@pytest.mark.subprocess
def test_key_is_a_stable_content_hash():
    # Pinned: a change here silently breaks de-duplication against every run already in MLflow.
    assert ObjectiveConfig().key() == "661827973cd3"
    assert PRESETS["grpo"].objective.key() == "1b9491fe0edb"
    code = "from rpg_core.objectives import ObjectiveConfig as C; print(C(form='penalty', beta=1e-3).key())"
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {ObjectiveConfig(form="penalty", beta=1e-3).key()}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # RPG forms: the estimator and kl_is_weight are implied by (direction, normalized)
        ({"form": "reinforce", "estimator": "k1"}, {"form": "reinforce", "estimator": "k2", "kl_is_weight": True}),
        # penalty: `normalized` has no effect; k2 is symmetric in the direction
        ({"form": "penalty", "normalized": True}, {"form": "penalty", "normalized": False}),
        ({"form": "penalty", "estimator": "k2", "direction": "forward"}, {"form": "penalty", "estimator": "k2"}),
        # reward: w = 1 at rollout time, so kl_is_weight has no effect
        ({"form": "reward", "kl_is_weight": True}, {"form": "reward"}),
        # no KL: differentiable / penalty / reward all reduce to the clipped policy term
        ({"form": "differentiable", "beta": 0, "direction": "forward"}, {"form": "penalty", "beta": 0.0}),
        ({"form": "reward", "beta": 0, "estimator": "k1"}, {"form": "penalty", "beta": 0, "kl_is_weight": True}),
        # clip parameters that are not used
        ({"clip": "none", "eps_low": 0.1, "clip_c": 3}, {"clip": "none"}),
        ({"clip": "ppo", "clip_c": 3}, {"clip": "ppo"}),
        ({"agg": "token-mean", "agg_norm_len": 512}, {"agg": "token-mean"}),
        # unclipped, the w-corrected k1/k3 penalties are the Table 4 RKL / Table 1 URKL surrogates
        (
            {"form": "penalty", "estimator": "k1", "kl_is_weight": True, "clip": "none"},
            {"form": "differentiable", "normalized": True, "clip": "none"},
        ),
        (
            {"form": "penalty", "estimator": "k3", "kl_is_weight": True, "clip": "none"},
            {"form": "differentiable", "normalized": False, "clip": "none"},
        ),
        ({"beta": 1e-4}, {"beta": 0.0001}),
    ],
)
def test_configs_computing_the_same_loss_share_a_key(a, b):
    assert ObjectiveConfig(**a).key() == ObjectiveConfig(**b).key()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"form": "reinforce", "beta": 0}, {"form": "penalty", "beta": 0}),  # same gradient, different loss values
        ({"form": "penalty", "estimator": "k3", "direction": "forward"}, {"form": "penalty", "estimator": "k3"}),
        ({"clip": "dual", "clip_c": 3}, {"clip": "dual"}),
        ({"agg": "seq-mean-token-sum-norm", "agg_norm_len": 512}, {"agg": "seq-mean-token-sum-norm"}),
    ],
)
def test_configs_computing_different_losses_have_different_keys(a, b):
    assert ObjectiveConfig(**a).key() != ObjectiveConfig(**b).key()


def _batch():
    """Ratios from 0.22 to 16.4 (beyond c = 10) under advantages of both signs, a fixed reference, a ragged mask."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 0.1
    log_w = torch.linspace(-1.5, 2.8, 24, dtype=torch.float64).reshape(6, 4).T  # every row spans the range
    logp = (old + log_w).requires_grad_(True)
    ref = old + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.2, -1.5], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return logp, old, ref, adv, mask


def test_equal_keys_really_compute_equal_losses_and_gradients_over_the_whole_grid():
    """The de-duplication contract, checked numerically: every config of the design grid (beta > 0 and beta = 0)
    is evaluated and grouped by key. Equal keys must agree on per-token losses and gradients; distinct keys must
    differ in one of them (else the key misses a merge)."""
    logp, old, ref, adv, mask = _batch()
    groups: dict[str, list] = {}
    for beta in (0.3, 0.0):
        for cfg in full_grid(beta=beta):
            out = policy_loss(cfg, logp, old, ref, adv, mask)
            (g,) = torch.autograd.grad(out.loss, logp)
            groups.setdefault(cfg.key(), []).append((cfg, out.per_token.detach(), g))
    for members in groups.values():
        _, per_token0, g0 = members[0]
        for cfg, per_token, g in members[1:]:
            torch.testing.assert_close(per_token, per_token0, rtol=1e-12, atol=1e-12, msg=cfg.summary)
            torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12, msg=cfg.summary)
    reps = [members[0] for members in groups.values()]
    for (c1, t1, g1), (c2, t2, g2) in itertools.combinations(reps, 2):
        if Form.REWARD in (c1.form, c2.form):
            continue  # the reward form's KL acts upstream, on the advantages, not in policy_loss
        same = torch.allclose(t1, t2, rtol=1e-9, atol=1e-12) and torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)
        assert not same, (c1.summary(), c2.summary())
    # beta > 0: differentiable 4 x 3 clips + reinforce 4 x 3 + penalty 8 x 3 + reward 5 x 3 = 63 losses, less
    # the 2 unclipped corrected penalties that are Tables 4/1 (RKL, URKL); beta = 0: one clipped policy term per
    # clip (3) and one reinforce loss per clip (3).
    assert len(groups) == 63 - 2 + 6


# -- presets -------------------------------------------------------------------------------------------------

PAPER_METHODS = {
    "grpo", "dapo", "reinforce_pp", "reinforce_pp_baseline",
    "rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl",
    "rpg_reinforce_fkl", "rpg_reinforce_rkl", "rpg_reinforce_ufkl", "rpg_reinforce_urkl",
}  # fmt: skip


def test_the_twelve_paper_methods_are_presets_with_distinct_keys():
    assert set(PRESETS) == PAPER_METHODS
    keys = {p.objective.key() for p in PRESETS.values()}
    # REINFORCE++ and REINFORCE++-Baseline share the loss and differ only in the advantage estimator.
    assert len(keys) == 11
    assert PRESETS["reinforce_pp"].objective == PRESETS["reinforce_pp_baseline"].objective
    assert len({(p.objective.key(), p.advantage) for p in PRESETS.values()}) == 12
    with pytest.raises(ValueError, match="allowed"):
        get_preset("ppo")


@pytest.mark.parametrize("name", sorted(n for n in PAPER_METHODS if n.startswith("rpg")))
def test_rpg_presets_use_the_papers_hyperparameters(name):
    p = get_preset(name)
    o = p.objective
    assert o.form is (Form.REINFORCE if "reinforce" in name else Form.DIFFERENTIABLE)
    assert o.divergence_name == name.rsplit("_", 1)[1].upper()
    assert (o.beta, o.clip, o.eps_low, o.eps_high, o.clip_c) == (1e-4, Clip.DUAL, 0.2, 0.28, 10.0)
    assert o.agg.value == "token-mean"
    assert p.advantage is AdvantageEstimator.RPG and p.reference is ReferenceMode.ITERATIVE
    assert p.lr == 1e-6 and p.dynamic_sampling and p.overlong_shaping
    if "reinforce" in name:
        assert any("5e-7" in note for note in p.code_differences)  # the code's learning rate is recorded


def test_baseline_presets():
    grpo, dapo = get_preset("grpo"), get_preset("dapo")
    assert grpo.objective.divergence_name == "k3-reverse" and not grpo.objective.kl_is_weight
    assert (grpo.objective.clip, grpo.objective.eps_low, grpo.objective.eps_high) == (Clip.PPO, 0.2, 0.2)
    assert grpo.reference is ReferenceMode.FIXED and grpo.advantage is AdvantageEstimator.GRPO
    assert not grpo.dynamic_sampling and not grpo.overlong_shaping
    assert any("1e-3" in n for n in grpo.code_differences)
    assert dapo.objective.beta == 0 and dapo.objective.eps_high == 0.28 and dapo.dynamic_sampling
    for name, adv in (("reinforce_pp", "reinforce_pp"), ("reinforce_pp_baseline", "reinforce_pp_baseline")):
        p = get_preset(name)
        assert p.objective.estimator.value == "k2" and p.objective.beta == 1e-4 and p.advantage.value == adv
