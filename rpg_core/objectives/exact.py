"""Exact gradient checks on an enumerable categorical policy (spec §2.5): the demo's ground truth.

K outcomes, each a length-1 sequence, all in one batch. The surrogate L = sum_x pi_old(x) * per_token[x] integrates
against the sampler measure exactly, so a correct objective satisfies dL = -dJ with J computed by enumeration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .config import Direction, Form, ObjectiveConfig
from .losses import policy_loss

__all__ = [
    "GradientCheck",
    "Identification",
    "exact_divergence",
    "gradient_check",
    "identify_objective",
    "kl_gradient_at_reference",
    "onpolicy_kl_gradient",
]

Param = Literal["softmax", "exp"]


def exact_divergence(direction: Direction, normalized: bool, p_theta: Tensor, p_ref: Tensor) -> Tensor:
    """FKL/RKL/UFKL/URKL by enumeration (spec §1, §2.1); forward means D(pi_ref || pi_theta)."""
    if direction is Direction.FORWARD:
        d = (p_ref * (p_ref.log() - p_theta.log())).sum()
        return d if normalized else d + (p_theta - p_ref).sum()
    d = (p_theta * (p_theta.log() - p_ref.log())).sum()
    return d if normalized else d + (p_ref - p_theta).sum()


@dataclass(frozen=True)
class GradientCheck:
    error: float  # max |dL + dJ| / max(1, max |dJ|)
    grad_scale: float  # max |dJ|
    clipfrac: float


def _setup(param: Param, fixed_ref: bool, k: int, seed: int, near: bool):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    old = torch.rand(k, generator=g, dtype=dt) + 0.2
    old = old / old.sum() * (1.0 if param == "softmax" else 2.7)  # Z_old != 1 for the unnormalized measure
    noise = (0.04 if near else 0.6) * torch.randn(k, generator=g, dtype=dt)
    theta = (old.log() + noise).requires_grad_(True)  # softmax(theta) is pi_old perturbed; exp(theta) likewise
    ref = None
    if fixed_ref:
        ref = (old.log() + (0.03 if near else 0.4) * torch.randn(k, generator=g, dtype=dt)).exp()
    adv = torch.randn(k, generator=g, dtype=dt) - 0.3  # A = R - b with a constant baseline
    return theta, old, ref, adv


def _logp(param: Param, theta: Tensor) -> Tensor:
    return torch.log_softmax(theta, 0) if param == "softmax" else theta


DIVERGENCES: dict[str, tuple[Direction, bool]] = {
    "FKL": (Direction.FORWARD, True),
    "RKL": (Direction.REVERSE, True),
    "UFKL": (Direction.FORWARD, False),
    "URKL": (Direction.REVERSE, False),
}


def gradient_check(
    cfg: ObjectiveConfig,
    param: Param = "softmax",
    fixed_ref: bool = False,
    k: int = 6,
    seed: int = 0,
    divergence: str | None = None,
) -> GradientCheck:
    """dL vs -dJ with J = sum_x pi_theta(x) A(x) - beta * D exact by enumeration (spec §2.1, §2.5, §2.7).

    ``divergence`` (FKL/RKL/UFKL/URKL) defaults to the config's own (RPG forms). With a clip, pi_theta is kept close
    to pi_old so every ratio lies inside the unclipped region.
    """
    if divergence is None:
        if not cfg.form.is_rpg:
            raise ValueError(f"name the divergence to check a {cfg.form.value!r} config against")
        direction, normalized = cfg.direction, cfg.normalized
    else:
        direction, normalized = DIVERGENCES[divergence]
    theta, old, ref, adv = _setup(param, fixed_ref, k, seed, near=cfg.clip.value != "none")
    logp = _logp(param, theta)
    ref_p = old if ref is None else ref
    out = policy_loss(
        cfg,
        logp[:, None],
        old.log()[:, None],
        None if ref is None else ref.log()[:, None],
        adv,
        torch.ones(k, 1, dtype=torch.bool),
    )
    surrogate = (old * out.per_token[:, 0]).sum()
    p = logp.exp()
    objective = (p * adv).sum() - cfg.beta * exact_divergence(direction, normalized, p, ref_p)
    (g_l,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    (g_j,) = torch.autograd.grad(objective, theta)
    scale = float(g_j.abs().max())
    return GradientCheck(float((g_l + g_j).abs().max()) / max(1.0, scale), scale, out.metrics.get("clipfrac", 0.0))


@dataclass(frozen=True)
class Identification:
    objective: str  # e.g. "URKL", "FKL", or "" when the gradient is no exact KL-regularised objective's
    iterative_only: bool  # exact only when pi_ref = pi_old (the iterative reference of spec §5)
    error: float  # worst relative gradient error over the settings where it is claimed exact


SETTINGS: tuple[tuple[Param, bool], ...] = (("softmax", False), ("exp", False), ("softmax", True), ("exp", True))


def identify_objective(cfg: ObjectiveConfig, tol: float = 1e-9) -> Identification:
    """Which exact objective E_theta[A] - beta * D(ref, theta) a config's loss is a correct surrogate for.

    Tried for D in FKL/RKL/UFKL/URKL under softmax and unnormalized exp(theta) policies, with the iterative and a
    fixed reference. Needs beta > 0; the reward form's KL acts on the advantage, outside ``policy_loss``.
    """
    cfg = cfg.model_copy(update={"beta": 0.7}) if cfg.beta == 0 else cfg
    if cfg.form is Form.REWARD:
        return Identification("", False, float("nan"))
    candidates = [cfg.divergence_name] if cfg.form.is_rpg else list(DIVERGENCES)
    for name in candidates:
        errs = [gradient_check(cfg, param, fixed, divergence=name).error for param, fixed in SETTINGS]
        if max(errs[:2]) < tol:
            iterative_only = max(errs[2:]) >= tol
            return Identification(name, iterative_only, max(errs[:2] if iterative_only else errs))
    return Identification("", False, float("nan"))


def onpolicy_kl_gradient(cfg: ObjectiveConfig, k: int = 6, seed: int = 0, tol: float = 1e-9) -> str:
    """Which gradient the KL part of a config gives on-policy (pi_old = pi_theta, fixed pi_ref; spec §3.3).

    Returns 'forward' (dKL(ref||theta)), 'reverse' (dKL(theta||ref)), 'zero', 'none' (no KL in the loss) or
    'other' (matches no KL gradient).
    """
    if cfg.beta == 0 or cfg.form is Form.REWARD:
        return "none"
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    old_logp = logp.detach()
    out = policy_loss(
        cfg, logp[:, None], old_logp[:, None], ref.log()[:, None], torch.zeros(k, dtype=torch.float64),
        torch.ones(k, 1, dtype=torch.bool),
    )
    (g_l,) = torch.autograd.grad((old_logp.exp() * out.per_token[:, 0]).sum() / cfg.beta, theta, retain_graph=True)
    p = logp.exp()
    candidates = {
        "forward": exact_divergence(Direction.FORWARD, True, p, ref),
        "reverse": exact_divergence(Direction.REVERSE, True, p, ref),
    }
    for name, d in candidates.items():
        (g_d,) = torch.autograd.grad(d, theta, retain_graph=True)
        if float((g_l - g_d).abs().max()) < tol:
            return name
    return "zero" if float(g_l.abs().max()) < tol else "other"


def kl_gradient_at_reference(cfg: ObjectiveConfig) -> float:
    """The per-token gradient of the loss's KL term where pi_theta = pi_ref = pi_old (one optimizer update per
    rollout, reference refreshed every step, spec §5), in units of beta * dlog pi_theta: f'(1) of the RPG forms, the
    estimator's slope at ratio 1 for the penalty form (the weight w = 1 adds nothing), 0 for the reward form (its KL
    is not in the loss). 0 for UFKL/URKL, k2 and k3; -1 for FKL and forward k1, +1 for RKL and reverse k1: a score
    term whose expectation E_pi[dlog pi] is 0 (spec §2.6). Read off ``policy_loss`` itself at advantage 0."""
    if cfg.beta == 0 or cfg.form is Form.REWARD:
        return 0.0
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    out = policy_loss(cfg, logp, logp.detach(), None, zero, one)
    (g,) = torch.autograd.grad(out.loss, logp)
    return float(g) / cfg.beta + 0.0  # + 0.0: -0.0 reads as 0.0
