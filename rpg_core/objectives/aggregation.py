"""Loss aggregation modes (verl's ``agg_loss``; spec §2.8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Aggregation

__all__ = ["Normaliser", "aggregate", "normaliser_count", "share_of_loss"]


def aggregate(
    per_token: Tensor, mask: Tensor, agg: Aggregation, norm_len: int | None = None, n_tokens: Tensor | None = None
) -> Tensor:
    """Reduce ``per_token`` [B, T] (already zero where ``mask`` is 0) to a scalar.

    token-mean               sum_{i,t} l / #valid tokens                      (DAPO token-level loss)
    seq-mean-token-sum       mean_i sum_t l                                    over sequences with a valid token
    seq-mean-token-mean      mean_i (sum_t l / |o_i|)                          (GRPO, over sequences with a valid token)
    seq-mean-token-sum-norm  sum_{i,t} l / norm_len   (norm_len defaults to T) (Dr. GRPO: a constant horizon)

    verl averages the seq-mean modes over all B rows (NaN for an empty row in seq-mean-token-mean); rows with no
    valid token are skipped here, which is identical whenever every row has a response token. ``n_tokens`` (the
    number of valid tokens) may be passed when the caller already has it.
    """
    if agg not in Aggregation.__members__.values():  # a plain string value is accepted too
        raise ValueError(f"agg: unknown aggregation {agg!r}; allowed: {[a.value for a in Aggregation]}")
    agg = Aggregation(agg)
    if agg is Aggregation.TOKEN_MEAN:
        return per_token.sum() / (mask.sum() if n_tokens is None else n_tokens)
    if agg is Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
        return per_token.sum() / (norm_len if norm_len is not None else per_token.shape[-1])
    seq_len = mask.to(per_token.dtype).sum(-1)
    rows = seq_len > 0
    seq_sum = per_token.sum(-1)
    if agg is Aggregation.SEQ_MEAN_TOKEN_SUM:
        return seq_sum[rows].mean()
    if agg is Aggregation.SEQ_MEAN_TOKEN_MEAN:
        return (seq_sum[rows] / seq_len[rows]).mean()
    raise AssertionError(agg)  # unreachable: every Aggregation member is handled above


# -- one loss computed in pieces (micro-batches x processes) -----------------------------------------------------


@dataclass(frozen=True)
class Normaliser:
    """What a piece of a mini-batch needs to contribute its exact share of the mini-batch's aggregated loss.

    count     the mini-batch's ``normaliser_count`` summed over every process (unused by seq-mean-token-sum-norm)
    world     the number of processes (DDP averages their gradients, so each piece is scaled up by ``world``)
    norm_len  seq-mean-token-sum-norm's constant horizon (``agg_norm_len``, else the rollout batch's padded T)
    """

    count: float
    world: int
    norm_len: int


def normaliser_count(mask: Tensor, agg: Aggregation) -> Tensor:
    """This piece's contribution to the global normaliser: valid tokens (token-mean) or sequences with a valid
    token (the seq-mean modes); 1 for seq-mean-token-sum-norm, whose horizon is a constant."""
    if agg is Aggregation.TOKEN_MEAN:
        return mask.sum().float()
    if agg is Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
        return mask.new_ones((), dtype=torch.float32)
    return (mask.sum(-1) > 0).sum().float()


def share_of_loss(per_token: Tensor, mask: Tensor, agg: Aggregation, norm: Normaliser) -> Tensor:
    """This piece's share of the global loss: ``aggregate`` over the piece, weighted by its share of the global
    normaliser, times ``world``. Summed over the pieces of every process and averaged over processes (DDP), the
    gradient is exactly that of ``aggregate`` over the whole mini-batch (not a mean of micro-batch means)."""
    loss = aggregate(per_token, mask, agg, norm.norm_len)
    if agg is Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
        share = 1.0
    elif agg is Aggregation.TOKEN_MEAN:
        share = float(mask.sum()) / norm.count
    else:
        share = float((mask.sum(-1) > 0).sum()) / norm.count
    return loss * share * norm.world
