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
    high: Tensor | None  # A >= 0 and w >= 1+eps_high
    low: Tensor | None  # A < 0 and w <= 1-eps_low
    dual: Tensor | None  # A < 0 and w >= c


def clip_ratio(cfg: ObjectiveConfig, w: Tensor, positive: Tensor) -> ClipResult:
    """Apply the clip rule to the ratio ``w`` given the branch variable ``positive`` (advantage >= 0)."""
    if cfg.clip is Clip.NONE:
        return ClipResult(w, None, None, None, None)
    wd = w.detach()
    negative = ~positive
    high = positive & (wd >= 1 + cfg.eps_high)
    low = negative & (wd <= 1 - cfg.eps_low)
    bound = torch.full_like(wd, 1 - cfg.eps_low).masked_fill_(high, 1 + cfg.eps_high)  # in w's dtype, not float32
    if cfg.clip is Clip.DUAL:
        dual = negative & (wd >= cfg.clip_c)
        bound.masked_fill_(dual, cfg.clip_c)
        clipped = high | low | dual
    else:
        dual = None
        clipped = high | low
    return ClipResult(torch.where(clipped, bound, w), clipped, high, low, dual)
