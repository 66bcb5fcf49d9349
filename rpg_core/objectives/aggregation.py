"""Loss aggregation modes (verl's ``agg_loss``; spec §2.8)."""

from __future__ import annotations

from torch import Tensor

from .config import Aggregation

__all__ = ["aggregate"]


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
