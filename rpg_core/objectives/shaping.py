"""Reward shaping (spec §6.2, §6.4): from the answer rule's sequence scores to the advantage estimator's input.

    DAPO overlong shaping   score + overlong_penalty(|o_i|)  per sequence (rpg_core.rewards.overlong_penalty)
    KL in the reward        token rewards r_{i,t} = -beta * k(pi_old, pi_ref)_{i,t}, the sequence reward added
                            on the last response token (form='reward' with beta > 0)

One function, ``shape_rewards``, called once per step by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_core.rewards import overlong_penalty

from .config import Form, ObjectiveConfig
from .losses import reward_kl_penalty

__all__ = ["Overlong", "ShapedRewards", "kl_in_reward", "shape_rewards"]


@dataclass(frozen=True)
class Overlong:
    """DAPO's overlong shaping: no penalty up to ``max_len - buffer_len`` tokens, then down to ``-factor``."""

    max_len: int
    buffer_len: int
    factor: float


@dataclass(frozen=True)
class ShapedRewards:
    sequence: Tensor  # [B] float32: the score plus the overlong penalty (logged as reward/*)
    advantage_input: Tensor  # [B] sequence rewards, or [B, T] token rewards with the KL in the reward


def kl_in_reward(cfg: ObjectiveConfig) -> bool:
    """Whether the KL is subtracted from the rewards (spec §6.4), so ``shape_rewards`` needs log pi_old."""
    return cfg.form is Form.REWARD and cfg.beta > 0


def shape_rewards(
    cfg: ObjectiveConfig,
    scores: Tensor,
    mask: Tensor,
    *,
    overlong: Overlong | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> ShapedRewards:
    """``scores`` [B] (the answer rule's +-1), ``mask`` [B, T] the response tokens. ``overlong``: DAPO shaping,
    or None for none. With the KL in the reward, ``old_logp`` (log pi_old [B, T]) is required and ``ref_logp``
    defaults to it (an iterative reference at rollout time: pi_ref = pi_old, a zero penalty)."""
    reward = scores.float()
    if overlong is not None:
        lengths = mask.long().sum(-1).tolist()
        pen = [overlong_penalty(n, max_len=overlong.max_len, buffer_len=overlong.buffer_len, factor=overlong.factor)
               for n in lengths]  # fmt: skip
        reward = reward + torch.tensor(pen, dtype=torch.float32)
    if not kl_in_reward(cfg):
        return ShapedRewards(reward, reward.to(mask.device))
    if old_logp is None:
        raise ValueError("shape_rewards: the KL in the reward (form='reward', beta > 0) needs old_logp")
    kl_pen = reward_kl_penalty(cfg, old_logp, ref_logp if ref_logp is not None else old_logp, mask)
    tok_reward = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    last = mask.long().sum(-1).clamp(min=1) - 1
    tok_reward[torch.arange(len(reward), device=mask.device), last] = reward.to(mask.device)
    return ShapedRewards(reward, tok_reward - kl_pen.float())
