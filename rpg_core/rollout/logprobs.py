"""The training side of a rollout: pack prompts and responses into a ``RolloutBatch`` and recompute per-token
log-probs in a forward pass (spec §2.8). Log-probs used by the loss are always recomputed here on the training
model; the code never uses an engine's own log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import autocast as autocast_ctx
from .base import kv_cache, kv_cache_arg

__all__ = ["RolloutBatch", "batched_logprobs", "build_batch", "token_logprobs"]


@dataclass
class RolloutBatch:
    """A batch of prompt+response sequences. Prompts are left-padded to ``prompt_len``, responses right-padded.

    input_ids / attention_mask  [B, P+T]
    response_mask               [B, T] 1 on response tokens (EOS included)
    group_ids                   [B] index of the prompt each response answers (for group-relative advantages)
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    group_ids: Tensor
    prompt_len: int

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: Tensor) -> RolloutBatch:
        """The rows ``idx``, with the response columns cut to the longest selected response (padding that every
        selected row has is never computed)."""
        rmask = self.response_mask[idx]
        t = max(1, int(rmask.sum(-1).max())) if len(idx) else 1
        width = self.prompt_len + t
        return RolloutBatch(
            self.input_ids[idx, :width], self.attention_mask[idx, :width], rmask[:, :t], self.group_ids[idx],
            self.prompt_len,
        )  # fmt: skip


def build_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], group_ids: Sequence[int], pad: int
) -> RolloutBatch:
    """Pack ``prompts[i] + responses[i]`` rows (one row per response) into a padded ``RolloutBatch``."""
    p_len = max(len(p) for p in prompts)
    t_len = max(1, max(len(r) for r in responses))
    b = len(responses)
    ids = torch.full((b, p_len + t_len), pad, dtype=torch.long)
    attn = torch.zeros((b, p_len + t_len), dtype=torch.long)
    rmask = torch.zeros((b, t_len), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len + len(r)] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[i, : len(r)] = True
    return RolloutBatch(ids, attn, rmask, torch.tensor(list(group_ids), dtype=torch.long), p_len)


def token_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    *,
    autocast: torch.dtype | None = None,
    with_entropy: bool = False,
    shared_prefix: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log pi(y_t | h_t) of the response tokens, ``[B, T]`` float32 (0 on padding), and optionally the entropy of
    pi(. | h_t). Differentiable when called with grad enabled. Only the response positions' logits are computed,
    and the log-softmax is gathered rather than materialised.

    ``shared_prefix``: responses to the same prompt (same ``group_ids``) share one forward pass over the prompt,
    whose key/value cache is then indexed out to every response. The result and its gradient are those of the
    plain pass (the gradient of the shared prompt activations sums over the group), at 1/n of the prompt compute.
    """
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    attn = batch.attention_mask.to(device)
    t = batch.response_mask.shape[1]
    groups = batch.group_ids.to(device)
    share = shared_prefix and len(torch.unique(groups)) < len(groups) and not _checkpointing(model)
    with autocast_ctx(device, autocast):
        logits = _prefix_logits(model, ids, attn, batch.prompt_len, groups) if share else _plain_logits(model, ids, attn, t)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast -> fp32
    targets = ids[:, batch.prompt_len :]
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    mask = batch.response_mask.to(device)
    logp = torch.where(mask, logp, 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            entropy = torch.where(mask, lse.detach() - (probs * logits.detach()).sum(-1), 0.0)
    return logp, entropy


def _checkpointing(model: torch.nn.Module) -> bool:
    """Activation checkpointing disables the KV cache the shared-prefix pass relies on."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _plain_logits(model: torch.nn.Module, ids: Tensor, attn: Tensor, t: int) -> Tensor:
    # Position ids from the mask, as generate() computes them for left-padded prompts.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=t + 1, use_cache=False)
    return out.logits[:, :-1]  # position P-1+t predicts response token t


def _prefix_logits(model: torch.nn.Module, ids: Tensor, attn: Tensor, p: int, groups: Tensor) -> Tensor:
    uniq, inverse = torch.unique(groups, return_inverse=True)
    first = torch.empty(len(uniq), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse.flip(0), torch.arange(len(groups) - 1, -1, -1, device=ids.device))
    p_attn = attn[first, :p]
    p_pos = (p_attn.cumsum(-1) - 1).clamp(min=0)
    head = model(input_ids=ids[first, :p], attention_mask=p_attn, position_ids=p_pos, use_cache=True, logits_to_keep=1)
    cache = kv_cache(head)
    cache.batch_select_indices(inverse)  # every response attends to its own prompt's keys/values
    t = ids.shape[1] - p
    r_pos = p_attn.sum(-1)[inverse, None] + torch.arange(t, device=ids.device)
    tail = model(input_ids=ids[:, p:], attention_mask=attn, position_ids=r_pos, use_cache=True,
                 **kv_cache_arg(cache))
    return torch.cat([head.logits[inverse], tail.logits[:, :-1]], dim=1)


def batched_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, micro_batch_size: int, *, autocast: torch.dtype | None = None
) -> Tensor:
    """``token_logprobs`` of the whole batch without gradient, ``micro_batch_size`` rows per forward pass, padded
    back to the batch's response width: log pi_old and log pi_ref (spec §2.8)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(batch), micro_batch_size):
            idx = torch.arange(i, min(i + micro_batch_size, len(batch)))
            lp = token_logprobs(model, batch.select(idx), autocast=autocast)[0]
            out.append(torch.nn.functional.pad(lp, (0, batch.response_mask.shape[1] - lp.shape[1])))
    return torch.cat(out)
