"""The sampler-trainer mismatch: importance weights between the trainer's old policy and the sampling engine.

An inference engine (vLLM) samples the rollouts with log-probs that differ slightly from the trainer's own for the
same weights (kernels, precision, batching). The trainer's objective assumes samples from pi_old (the trainer at
rollout time); they come from pi_sampler. The peers correct this with a detached importance weight on the
policy-gradient term, built from the per-token ratio rho = pi_old / pi_sampler:

    TIS (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
         verl ``rollout_is_mode=truncate``, TRL ``vllm_importance_sampling_correction``):
         w = min(rho, C)                                  token level: rho = rho_t
                                                          sequence level: rho = prod_t rho_t (the response's ratio)
    MIS (Liu et al. 2025, "When Speed Kills Stability"; verl ``rollout_is_mode=mask``):
         w = rho if lower <= rho <= upper, else 0         token level: rho = rho_t
                                                          sequence level: rho = (prod_t rho_t)^(1/|y|), the
                                                          geometric mean (verl ``rollout_is_level=geometric``)

How the trainer uses it: once per rollout, after recomputing the old log-probs with its own forward pass, call
``correction_weights(cfg, trainer_old_logp, sampler_logp, mask)`` and multiply ``.weights`` [B, T] into each
token's policy-gradient term only, never into the KL term (the KL is between the trainer and its reference; the
sampler plays no part in it). With ``policy_loss`` that is ``advantages * weights`` as a [B, T] advantage: A enters
every form only through the policy-gradient term (in the reward form the KL is inside A, so it is weighted too;
with RPG-Style Clip the branch then follows the sign of the weighted A' = w A - beta f'(r)). A weight of 0 (MIS)
removes the token's policy gradient and leaves its KL term.
``mismatch_metrics`` gives the step's three mismatch numbers from the same two log-prob tensors.

Conventions: all ratios are handled as log-ratios, and every ``exp`` is of a log-ratio already clamped to the
cap or band (or to +-20 for a metric), so no value overflows. Padded positions (mask 0) are set to log-ratio 0
before anything is summed, so NaN/inf or garbage there never reaches a sequence ratio, a weight or a metric; the
weight there is 0. The weights never carry a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .config import CorrectionConfig, CorrectionLevel, RolloutCorrection
from .estimators import k3

__all__ = [
    "MISMATCH_BAND",
    "CorrectionWeights",
    "MismatchMetrics",
    "correction_weights",
    "log_ratio",
    "mis_weights",
    "mismatch_metrics",
    "sequence_log_ratio",
    "tis_weights",
]

MISMATCH_BAND = (0.5, 2.0)  # the metric's band: the share of tokens whose ratio pi_trainer/pi_sampler is outside it
_LOG_SAFETY = 20.0  # the metric's clamp on |log rho| before exp (verl's SAFETY_BOUND, e^20 ~ 4.9e8)


class CorrectionWeights(NamedTuple):
    weights: Tensor  # [B, T], detached: the factor on each token's policy-gradient term; 0 where mask is 0
    corrected: Tensor  # [B, T] bool: valid tokens whose weight was truncated to C (TIS) or masked to 0 (MIS)
    n_corrected: int  # corrected.sum()
    share_corrected: float  # n_corrected / valid tokens (0.0 when there are none)


@dataclass(frozen=True)
class MismatchMetrics:
    """The sampler-trainer mismatch of one step, over its valid response tokens (0.0 each when there are none)."""

    mean_abs_logp_diff: float  # mean |log pi_trainer - log pi_sampler|
    kl_k3: float  # k3 estimate of KL(pi_sampler || pi_trainer): mean (rho - 1) - log rho, samples from the sampler
    share_outside: float  # share of tokens with rho outside MISMATCH_BAND = [0.5, 2]
    n_tokens: int  # the valid tokens these are means over (to combine steps or processes)


# -- the pieces --------------------------------------------------------------------------------------------------


def _check_inputs(trainer_old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> None:
    if trainer_old_logp.dim() != 2:
        raise ValueError(f"trainer_old_logp must be [B, T], got shape {tuple(trainer_old_logp.shape)}")
    for name, t in (("sampler_logp", sampler_logp), ("mask", mask)):
        if t.shape != trainer_old_logp.shape:
            raise ValueError(f"{name} must have trainer_old_logp's shape {tuple(trainer_old_logp.shape)}, "
                             f"got {tuple(t.shape)}")  # fmt: skip


def log_ratio(trainer_old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = log pi_old - log pi_sampler per token, detached, in at least float32; exactly 0 where mask is 0."""
    _check_inputs(trainer_old_logp, sampler_logp, mask)
    dtype = torch.promote_types(torch.promote_types(trainer_old_logp.dtype, sampler_logp.dtype), torch.float32)
    diff = trainer_old_logp.detach().to(dtype) - sampler_logp.detach().to(dtype)
    return torch.where(mask.bool(), diff, torch.zeros((), dtype=dtype, device=diff.device))


def sequence_log_ratio(log_rho: Tensor, mask: Tensor, *, geometric: bool) -> Tensor:
    """[B, 1]: the response's log-ratio sum_t log rho_t (its probability ratio), or its mean (the geometric mean).

    ``log_rho`` must be 0 where mask is 0 (``log_ratio`` makes it so); a response with no valid token gets 0.
    """
    total = log_rho.sum(-1, keepdim=True)
    if not geometric:
        return total
    return total / mask.to(log_rho.dtype).sum(-1, keepdim=True).clamp(min=1)


def tis_weights(log_rho: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated IS (Yao et al. 2025): w = min(rho, C), as exp(min(log rho, log C)); and where rho > C."""
    log_cap = math.log(cap)
    return torch.exp(log_rho.clamp(max=log_cap)), log_rho > log_cap


def mis_weights(log_rho: Tensor, lower: float, upper: float) -> tuple[Tensor, Tensor]:
    """Masked IS (Liu et al. 2025): w = rho inside [lower, upper], 0 outside; and where it is outside.

    Inside the band the weight is the ratio itself, not 1: verl's mask mode keeps the IS weight as the true ratio
    and only rejects the outliers (its weights times its rejection mask), i.e. rho * 1{lower <= rho <= upper}.
    verl also drops the rejected tokens from the loss's token count; a trainer that wants that too aggregates over
    ``mask & ~corrected`` (``CorrectionWeights.corrected``).
    """
    log_lo, log_hi = math.log(lower), math.log(upper)
    outside = (log_rho < log_lo) | (log_rho > log_hi)
    inside = torch.exp(log_rho.clamp(min=log_lo, max=log_hi))  # the clamp only bounds exp; outside is zeroed
    return torch.where(outside, torch.zeros((), dtype=inside.dtype, device=inside.device), inside), outside


# -- the public entry points -------------------------------------------------------------------------------------


def correction_weights(
    cfg: CorrectionConfig, trainer_old_logp: Tensor, sampler_logp: Tensor, mask: Tensor
) -> CorrectionWeights:
    """The detached weights [B, T] of ``cfg`` (see the module docstring) and the tokens they truncated or masked.

    trainer_old_logp: the trainer's log pi_old of the sampled tokens [B, T] (its recomputation at rollout time).
    sampler_logp: the engine's log-probs of the same tokens [B, T]. mask: 0/1 (bool, int or float), 1 on response
    tokens. Weights are in at least float32, 0 where mask is 0; at the sequence level every valid token of a
    response has the response's weight.
    """
    valid = mask.bool()
    log_rho = log_ratio(trainer_old_logp, sampler_logp, valid)
    zero = torch.zeros((), dtype=log_rho.dtype, device=log_rho.device)
    if cfg.mode is RolloutCorrection.NONE:
        weights, corrected = valid.to(log_rho.dtype), torch.zeros_like(valid)
    else:
        if cfg.level is CorrectionLevel.SEQUENCE:
            # TIS weights the response by its probability ratio; MIS bands its geometric mean (the product of a
            # long response's ratios leaves any fixed band almost surely, Liu et al. 2025)
            log_rho = sequence_log_ratio(log_rho, valid, geometric=cfg.mode is RolloutCorrection.MIS)
        if cfg.mode is RolloutCorrection.TIS:
            weights, corrected = tis_weights(log_rho, cfg.cap)
        else:
            weights, corrected = mis_weights(log_rho, cfg.lower, cfg.upper)
        weights = torch.where(valid, weights, zero)  # also broadcasts [B, 1] to [B, T]
        corrected = corrected & valid
    n_valid = int(valid.sum())
    n_corrected = int(corrected.sum())
    return CorrectionWeights(weights, corrected, n_corrected, n_corrected / n_valid if n_valid else 0.0)


def mismatch_metrics(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> MismatchMetrics:
    """The step's mismatch over its valid tokens, rho = pi_trainer / pi_sampler per token, samples from the sampler.

    k3 = (rho - 1) - log rho (Schulman's estimator, estimators.k3) estimates KL(pi_sampler || pi_trainer); log rho
    is clamped to +-20 before exp (verl's safety bound), so one wild token cannot make it inf. Computed in float64.
    """
    valid = mask.bool()
    log_rho = log_ratio(trainer_logp, sampler_logp, valid).double()  # 0 where mask is 0: adds 0 to every sum
    n = int(valid.sum())
    if n == 0:
        return MismatchMetrics(0.0, 0.0, 0.0, 0)
    safe = log_rho.clamp(min=-_LOG_SAFETY, max=_LOG_SAFETY)
    lo, hi = math.log(MISMATCH_BAND[0]), math.log(MISMATCH_BAND[1])
    outside = ((log_rho < lo) | (log_rho > hi)) & valid
    return MismatchMetrics(
        mean_abs_logp_diff=float(log_rho.abs().sum()) / n,
        kl_k3=float(k3(safe).sum()) / n,  # k3(0) = 0 at padding
        share_outside=int(outside.sum()) / n,
        n_tokens=n,
    )
