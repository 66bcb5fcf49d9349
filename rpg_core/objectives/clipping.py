"""RPG-Style Clip: the dual-clip rule of spec §4.1 / Algorithm 2 (§4.4), written once for every form.

The rule never changes a value where the gradient flows; it only decides, per token, whether the importance
weight w is used as is (gradient branch) or replaced by a constant bound (no gradient):

    A >= 0:  w <  1+eps_high  -> w          |  w >= 1+eps_high  -> 1+eps_high   (constant)
    A <  0:  w <= 1-eps_low   -> 1-eps_low  |  1-eps_low < w < c -> w  |  w >= c -> c   (dual clip; constant)

Boundaries follow Algorithm 2 (the paper); the released code uses `<` at 1-eps_low (spec §4.6), a measure-zero
difference. With clip='ppo' the c branch is absent; with clip='none' w is always used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import Clip, ObjectiveConfig

__all__ = ["ClipResult", "clip_ratio"]


class ClipResult(NamedTuple):
    ratio: Tensor  # w where the gradient flows, the (constant) bound where clipped
    clipped: Tensor | None  # bool [B, T]: True where a bound replaced w (None when clip='none')
    negative: Tensor | None  # bool, broadcastable: the branch variable is < 0
    below: Tensor | None  # bool: w <= 1 - eps_low
    above_c: Tensor | None  # bool: w >= c (None unless clip='dual')

    def counts(self) -> tuple[Tensor, Tensor, Tensor]:
        """Numbers of tokens clipped high (A >= 0, w >= 1+eps_high), low (A < 0, w <= 1-eps_low) and at c."""
        assert self.clipped is not None and self.negative is not None and self.below is not None
        low = (self.below & self.negative).sum()
        dual = (self.above_c & self.negative).sum() if self.above_c is not None else torch.zeros_like(low)
        return self.clipped.sum() - low - dual, low, dual


def clip_ratio(cfg: ObjectiveConfig, w: Tensor, branch: Tensor) -> ClipResult:
    """Apply the clip rule to the ratio ``w``; ``branch`` is the advantage whose sign picks the row (A' or A)."""
    if cfg.clip is Clip.NONE:
        return ClipResult(w, None, None, None, None)
    wd = w.detach()
    negative = branch < 0

    def const(v: float) -> Tensor:  # the bound in w's dtype (a Python scalar in torch.where would be float32)
        return torch.tensor(v, dtype=w.dtype, device=w.device)

    above_hi = wd >= 1 + cfg.eps_high
    below = wd <= 1 - cfg.eps_low
    if cfg.clip is Clip.DUAL:
        above_c = wd >= cfg.clip_c
        clipped = torch.where(negative, below | above_c, above_hi)
        bound = torch.where(negative, torch.where(above_c, const(cfg.clip_c), const(1 - cfg.eps_low)),
                            const(1 + cfg.eps_high))  # fmt: skip
    else:
        above_c = None
        clipped = torch.where(negative, below, above_hi)
        bound = torch.where(negative, const(1 - cfg.eps_low), const(1 + cfg.eps_high))
    return ClipResult(torch.where(clipped, bound, w), clipped, negative, below, above_c)
