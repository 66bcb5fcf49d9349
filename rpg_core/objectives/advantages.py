"""Advantage estimators (spec §4.5, §6.1, §6.3), chosen from a registry like verl's.

Every estimator has the signature ``(rewards, group_ids, mask) -> advantages [B, T]`` (zero where mask is 0):
  rewards    [B] outcome rewards, or [B, T] token-level rewards (outcome on the last token minus an in-reward KL);
             outcome estimators use the per-sequence sum, REINFORCE++ the return-to-go (gamma = 1).
  group_ids  [B] ids of the prompt each response answers (ints, a tensor, or any hashables such as uid strings).
  mask       [B, T] 0/1 response mask.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from .config import AdvantageEstimator

__all__ = [
    "ADVANTAGE_REGISTRY",
    "AdvantageEstimator",
    "compute_advantages",
    "masked_whiten",
    "register_advantage",
]

GRPO_EPS = 1e-6  # verl: (R - mean) / (std + 1e-6)
WHITEN_EPS = 1e-8  # verl masked_whiten: (x - mean) * rsqrt(var + 1e-8)


AdvantageFn = Callable[[Tensor, Tensor, Tensor], Tensor]
ADVANTAGE_REGISTRY: dict[AdvantageEstimator, AdvantageFn] = {}


def register_advantage(name: AdvantageEstimator) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_REGISTRY[name] = fn
        return fn

    return deco


def compute_advantages(
    estimator: AdvantageEstimator | str,
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    mask: Tensor,
) -> Tensor:
    """Advantages ``[B, T]`` (float32 or wider) for ``rewards`` grouped by prompt, zero where ``mask`` is 0."""
    try:
        est = AdvantageEstimator(estimator)
    except ValueError:
        allowed = [e.value for e in AdvantageEstimator]
        raise ValueError(f"advantage estimator {estimator!r} is unknown; allowed: {allowed}") from None
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {tuple(mask.shape)}")
    if rewards.shape not in (mask.shape[:1], mask.shape):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected [B]={tuple(mask.shape[:1])} or [B, T]")
    m = mask.to(torch.promote_types(rewards.dtype, torch.float32))
    rewards = rewards.to(m.dtype)
    if rewards.dim() == 2:
        rewards = torch.where(m.bool(), rewards, 0.0)  # padded token rewards never count
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN/inf at valid positions")
    gid = _group_index(group_ids, mask.shape[0], mask.device)
    return ADVANTAGE_REGISTRY[est](rewards, gid, m) * m


def _group_index(group_ids: Tensor | Sequence[Hashable], n: int, device: torch.device) -> Tensor:
    if isinstance(group_ids, Tensor):
        ids = group_ids.to(device)
    else:
        table: dict[Hashable, int] = {}
        ids = torch.tensor([table.setdefault(g, len(table)) for g in group_ids], device=device)
    if ids.shape != (n,):
        raise ValueError(f"group_ids must have one id per response ({n}), got shape {tuple(ids.shape)}")
    return torch.unique(ids, return_inverse=True)[1]


def _outcome(rewards: Tensor, m: Tensor) -> Tensor:
    """Per-sequence score: the reward itself, or the sum of token-level rewards over valid tokens."""
    return rewards if rewards.dim() == 1 else (rewards * m).sum(-1)


def _group_stats(score: Tensor, gid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response (group size, group mean, unbiased group std); std is NaN for groups of one."""
    size = torch.bincount(gid).to(score.dtype)
    mean = torch.zeros_like(size).index_add_(0, gid, score) / size
    sq = torch.zeros_like(size).index_add_(0, gid, (score - mean[gid]).square())
    std = (sq / (size - 1)).sqrt()
    return size[gid], mean[gid], std[gid]


def _broadcast(a: Tensor, m: Tensor) -> Tensor:
    return a.unsqueeze(-1).expand_as(m)


@register_advantage(AdvantageEstimator.RPG)
def rpg_group_mean(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    score = _outcome(rewards, m)
    size, mean, _ = _group_stats(score, gid)
    return _broadcast(score - torch.where(size > 1, mean, 0.0), m)  # a group of one gets b = 0


@register_advantage(AdvantageEstimator.BATCH_MEAN)
def batch_mean(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    score = _outcome(rewards, m)
    return _broadcast(score - score.mean(), m)


@register_advantage(AdvantageEstimator.GRPO)
def grpo(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    score = _outcome(rewards, m)
    size, mean, std = _group_stats(score, gid)
    single = size == 1  # verl: a group of one gets mean 0 and std 1
    return _broadcast((score - torch.where(single, 0.0, mean)) / (torch.where(single, 1.0, std) + GRPO_EPS), m)


@register_advantage(AdvantageEstimator.RLOO)
def rloo(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    score = _outcome(rewards, m)
    size, mean, _ = _group_stats(score, gid)
    # R - mean of the others = G/(G-1) (R - group mean); a group of one keeps R (verl).
    return _broadcast(torch.where(size > 1, size / (size - 1).clamp(min=1) * (score - mean), score), m)


def masked_whiten(values: Tensor, m: Tensor) -> Tensor:
    """(x - mean) / sqrt(unbiased var + 1e-8) over the valid entries of the whole batch (verl ``masked_whiten``)."""
    n = m.sum()
    if n < 2:
        raise ValueError("whitening needs at least 2 valid tokens in the batch")
    mean = (values * m).sum() / n
    var = ((values - mean).square() * m).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS)


def _return_to_go(rewards: Tensor, m: Tensor) -> Tensor:
    if rewards.dim() == 1:  # an outcome reward on the last token: the return-to-go is R on every token
        return _broadcast(rewards, m)
    r = rewards * m
    return r.flip(-1).cumsum(-1).flip(-1)


@register_advantage(AdvantageEstimator.REINFORCE_PP)
def reinforce_pp(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    return masked_whiten(_return_to_go(rewards, m), m)


@register_advantage(AdvantageEstimator.REINFORCE_PP_BASELINE)
def reinforce_pp_baseline(rewards: Tensor, gid: Tensor, m: Tensor) -> Tensor:
    return masked_whiten(rpg_group_mean(rewards, gid, m), m)
