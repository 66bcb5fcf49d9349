"""The policy update of one training step (Algorithms 1/2): K epochs over ``mini_batches`` optimizer steps, each
the gradient of ``objectives.policy_loss`` over the mini-batch, accumulated over micro-batches (and processes) so
it is exactly that of the mini-batch's aggregated loss.

The trainer owns the loop, the optimizer and the distributed runtime; this module owns how one rollout batch
becomes optimizer steps. The loss's normaliser comes from ``objectives.aggregation``; only the sum over processes
(``all_reduce_sum``) is passed in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rpg_core import metrics as metrics_mod
from rpg_core.config import RunConfig
from rpg_core.objectives import Normaliser, normaliser_count, policy_loss
from rpg_core.rollout import RolloutBatch, mix_seed, token_logprobs

__all__ = ["Backend", "NonFiniteError", "UpdateBatch", "update"]


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stops and the last good checkpoint is kept."""


class Backend(Protocol):
    """What the update needs from the distributed runtime (``accelerate.Accelerator`` has exactly this)."""

    def backward(self, loss: Tensor) -> None: ...

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager: ...

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Tensor: ...


@dataclass
class UpdateBatch:
    """One process's share of a step's rollout, ready for the loss: rows, response mask, advantages A [B] or
    [B, T] (with ``rollout.correction``, A times the correction's weights per token: ``trainer.corrected_advantages``;
    ``policy_loss`` takes A in the policy-gradient term only), log pi_old (None: a single optimizer step, where pi_old is the update's own detached log-prob, w = 1
    exactly, spec §5) and log pi_ref (None: iterative reference, pi_ref = pi_old)."""

    batch: RolloutBatch
    mask: Tensor
    advantages: Tensor
    old_logp: Tensor | None
    ref_logp: Tensor | None


def update(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    cfg: RunConfig,
    data: UpdateBatch,
    *,
    step: int,
    backend: Backend,
    world: int = 1,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Run the step's optimizer steps on ``model`` (DDP-wrapped under several processes) and return the
    ``actor/*`` metrics: token-weighted means of ``policy_loss``'s metrics, extremes by their declared reduction,
    the mean gradient norm (before clipping), the first epoch's entropy and the number of optimizer steps."""
    a, obj = cfg.algorithm, cfg.objective
    batch, mask, adv, old_logp, ref_logp = data.batch, data.mask, data.advantages, data.old_logp, data.ref_logp
    b = len(batch)
    mb_size = b // a.mini_batches if b >= a.mini_batches else b
    # Dr. GRPO's constant horizon defaults to the rollout batch's padded T, not a trimmed micro-batch's.
    norm_len = obj.agg_norm_len or batch.response_mask.shape[1]
    sums: dict[str, float] = {}
    extremes: dict[str, float] = {}
    weight_total, grad_norms, ent_sum, ent_n = 0.0, [], 0.0, 0.0
    model.train()
    for epoch in range(a.epochs):
        order = _epoch_order(batch.group_ids, mix_seed(cfg.train.seed, step, epoch + 1), a.epochs * a.mini_batches > 1)
        for start in range(0, b, mb_size):
            mb = order[start : start + mb_size]
            count = normaliser_count(mask[mb], obj.agg)
            if world > 1 and all_reduce_sum is not None:
                count = all_reduce_sum(count)
            norm = Normaliser(float(count), world, norm_len)
            micro = [mb[i : i + a.micro_batch_size] for i in range(0, len(mb), a.micro_batch_size)]
            for j, idx in enumerate(micro):
                sync = contextlib.nullcontext() if j == len(micro) - 1 else backend.no_sync(model)
                with sync:
                    sub = batch.select(idx)  # response columns cut to this micro-batch's longest response
                    logp, ent = token_logprobs(model, sub, autocast=autocast, with_entropy=epoch == 0)
                    t = logp.shape[1]
                    sub_mask = mask[idx, :t]
                    old = old_logp[idx, :t] if old_logp is not None else logp.detach()
                    ref = ref_logp[idx, :t] if ref_logp is not None else None
                    out = policy_loss(obj, logp, old, ref, adv[idx, :t], sub_mask, normaliser=norm)
                    if not torch.isfinite(out.loss):
                        raise NonFiniteError(f"step {step}: the loss is {float(out.loss.detach())} (epoch {epoch})")
                    backend.backward(out.loss)
                w = float(sub_mask.sum())
                weight_total += w
                _accumulate(out.metrics, w, sums, extremes)
                if ent is not None:
                    ent_sum += float(ent.sum())
                    ent_n += w
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
            gn = float(backend.clip_grad_norm_(model.parameters(), clip))
            if not math.isfinite(gn):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"step {step}: the gradient norm is {gn} (epoch {epoch})")
            grad_norms.append(gn)
            opt.step()
            opt.zero_grad(set_to_none=True)
    out_m = {k: v / max(weight_total, 1.0) for k, v in sums.items()}
    out_m.update(extremes)
    out_m["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
    out_m["actor/entropy"] = ent_sum / max(ent_n, 1.0)
    out_m["actor/updates"] = float(len(grad_norms))
    return out_m


def _epoch_order(group_ids: Tensor, seed: int, shuffle: bool) -> Tensor:
    """The rows in this epoch's order: whole groups shuffled (so micro-batches keep sharing prompt passes), or
    as sampled when there is a single optimizer step."""
    if not shuffle:
        return torch.arange(len(group_ids))
    g = torch.Generator().manual_seed(seed)
    uniq = torch.unique(group_ids)
    perm = uniq[torch.randperm(len(uniq), generator=g)]
    return torch.cat([torch.nonzero(group_ids == x).flatten() for x in perm])


def _accumulate(m: dict[str, float], w: float, sums: dict[str, float], extremes: dict[str, float]) -> None:
    """Fold one micro-batch's ``policy_loss`` metrics in: by their declared reduction (rpg_core.metrics), a
    token-weighted mean otherwise. ``n_tokens`` is the weight itself, not a metric."""
    for k, v in m.items():
        if k == "n_tokens":
            continue
        name = "actor/" + k
        match metrics_mod.reduction(name):
            case metrics_mod.Reduce.MAX:
                extremes[name] = max(extremes.get(name, -math.inf), v)
            case metrics_mod.Reduce.MIN:
                extremes[name] = min(extremes.get(name, math.inf), v)
            case _:
                sums[name] = sums.get(name, 0.0) + v * w
