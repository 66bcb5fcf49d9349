"""KL estimators and the RPG divergence generators, each formula in exactly one function.

All functions take log-ratios (never ratios) so that large or tiny probability ratios stay finite.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import Direction, Estimator

__all__ = ["Divergence", "k1", "k2", "k3", "kl_estimator", "kl_estimator_from_log_ratio", "rpg_divergence"]


# -- Schulman's estimators (spec §3.1) ------------------------------------------------------------------------
# With samples x ~ q and log_r = log p(x) - log q(x), each estimates KL(q || p).


def k1(log_r: Tensor) -> Tensor:
    """k1 = -log r: unbiased, can be negative, high variance."""
    return -log_r


def k2(log_r: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2: biased, non-negative, matches KL to second order."""
    return 0.5 * log_r.square()


def k3(log_r: Tensor) -> Tensor:
    """k3 = (r - 1) - log r: unbiased for normalized p, q; equals UKL exactly in expectation (Remark 3.5)."""
    return torch.expm1(log_r) - log_r


_ESTIMATORS = {Estimator.K1: k1, Estimator.K2: k2, Estimator.K3: k3}


def kl_estimator(estimator: Estimator, direction: Direction, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL estimate between pi_theta and pi_ref as the penalty/reward forms use it.

    reverse: KL(pi_theta || pi_ref), samples notionally from pi_theta, r = pi_ref/pi_theta
             (k1 = verl `kl`, k2 = `mse`, k3 = GRPO's `low_var_kl` without the clamp).
    forward: KL(pi_ref || pi_theta), samples notionally from pi_ref, r = pi_theta/pi_ref
             (k1 = `rpg_fkl`, k3 = `rpg_ufkl` when pi_ref = pi_old).
    """
    return kl_estimator_from_log_ratio(estimator, direction, logp - ref_logp)


def kl_estimator_from_log_ratio(estimator: Estimator, direction: Direction, log_theta_over_ref: Tensor) -> Tensor:
    """``kl_estimator`` given log(pi_theta/pi_ref) directly."""
    log_r = -log_theta_over_ref if direction is Direction.REVERSE else log_theta_over_ref
    return _ESTIMATORS[estimator](log_r)


# -- The RPG divergences as f-divergences (spec §2.2, §2.3, §2.7) ------------------------------------------------
# Each of FKL/RKL/UFKL/URKL equals D(pi_ref, pi_theta) = sum_x pi_ref(x) f(r(x)), r = pi_theta/pi_ref.
# Hence, with samples from pi_old, w = pi_theta/pi_old and s = pi_ref/pi_old (s = 1 in iterative mode):
#   value     D = E_old[ s * f(r) ]                       (Table 1/4 KL terms; exact, not just in expectation of grads)
#   gradient  dD = E_old[ w * f'(r) * dlog pi_theta ]       (since s * r = w)
# so the exact weight of J = E_theta[A] - beta * D is   Weight = w * (A - beta * f'(r))   (spec §2.2 / §2.7),
# and A' = A - beta * f'(r) is Algorithm 1/2's regularised advantage (spec §4.2, factorised form A_R + C/w).


class Divergence(NamedTuple):
    name: str
    f: object  # log_r -> f(r)
    f_prime: object  # log_r -> f'(r)


def _fkl_f(log_r: Tensor) -> Tensor:  # KL(ref || theta): f(r) = -log r
    return -log_r


def _fkl_fp(log_r: Tensor) -> Tensor:  # f'(r) = -1/r
    return -torch.exp(-log_r)


def _ufkl_f(log_r: Tensor) -> Tensor:  # UKL(ref || theta): f(r) = r - 1 - log r  (= k3, the rpg_ufkl term)
    return k3(log_r)


def _ufkl_fp(log_r: Tensor) -> Tensor:  # f'(r) = 1 - 1/r
    return -torch.expm1(-log_r)


def _rkl_f(log_r: Tensor) -> Tensor:  # KL(theta || ref): f(r) = r log r  (the rpg_rkl term)
    return torch.exp(log_r) * log_r


def _rkl_fp(log_r: Tensor) -> Tensor:  # f'(r) = log r + 1
    return log_r + 1


def _urkl_f(log_r: Tensor) -> Tensor:  # UKL(theta || ref): f(r) = r log r - r + 1  (the rpg_urkl term, = r * k3(1/r))
    return torch.exp(log_r) * log_r - torch.expm1(log_r)


def _urkl_fp(log_r: Tensor) -> Tensor:  # f'(r) = log r
    return log_r


_DIVERGENCES = {
    (Direction.FORWARD, True): Divergence("FKL", _fkl_f, _fkl_fp),
    (Direction.REVERSE, True): Divergence("RKL", _rkl_f, _rkl_fp),
    (Direction.FORWARD, False): Divergence("UFKL", _ufkl_f, _ufkl_fp),
    (Direction.REVERSE, False): Divergence("URKL", _urkl_f, _urkl_fp),
}


def rpg_divergence(direction: Direction, normalized: bool) -> Divergence:
    """The f-divergence generator of one of the paper's four objectives (spec §2.1)."""
    return _DIVERGENCES[(direction, normalized)]
