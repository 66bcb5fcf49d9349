"""The built-in group sampler (``GeneratorKind.PREFIX``): one prompt prefill per group, finished rows dropped."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .base import DEFAULT_SEED, GroupGenerator, SamplingParams, autocast, kv_cache, kv_cache_arg, left_pad

__all__ = ["PrefixSharingGenerator", "sample_next"]


class PrefixSharingGenerator(GroupGenerator):
    """A sampler for groups: each prompt is prefilled once and its key/value cache indexed out to its ``n``
    samples, and rows leave the batch as soon as they emit EOS (HF generate keeps computing finished rows until
    the longest one ends). Samples exactly softmax(logits / T) after top-k then top-p filtering, as HF's warpers
    do, from the engine's own ``torch.Generator`` (seeded by ``SamplingParams.seed``)."""

    _rng: torch.Generator | None = None

    @contextlib.contextmanager
    def _stream(self, seed: int | None, device: torch.device) -> Iterator[None]:
        if seed is not None or self._rng is None or self._rng.device != torch.device(device):
            # the stream torch.manual_seed(seed) would give the global RNG
            self._rng = torch.Generator(device=device).manual_seed(seed if seed is not None else DEFAULT_SEED)
        yield

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        model, eos = self.model, self.tok.eos_token_id
        device = next(model.parameters()).device
        ids, attn = left_pad(chunk, self.tok.pad_token_id, device)
        with autocast(device, self.autocast):
            head = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        rows = torch.arange(len(chunk), device=device).repeat_interleave(params.n)
        cache = kv_cache(head)
        cache.batch_select_indices(rows)
        logits = head.logits[rows, -1].float()
        attn = attn[rows]
        pos = attn.sum(-1)
        alive = torch.arange(len(rows), device=device)
        results: list[list[int]] = [[] for _ in range(len(rows))]
        for step in range(params.max_new_tokens):
            tok = sample_next(logits, params, generator=self._rng)
            for r, t in zip(alive.tolist(), tok.tolist(), strict=True):
                results[r].append(t)
            if step == params.max_new_tokens - 1:
                break
            keep = tok != eos
            if not bool(keep.all()):
                idx = keep.nonzero().flatten()
                if len(idx) == 0:
                    break
                alive, tok, attn, pos = alive[idx], tok[idx], attn[idx], pos[idx]
                cache.batch_select_indices(idx)
            attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
            with autocast(device, self.autocast):
                nxt = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None],
                            use_cache=True, **kv_cache_arg(cache))  # fmt: skip
            logits = nxt.logits[:, -1].float()
            pos = pos + 1
        return results


def sample_next(logits: Tensor, params: SamplingParams, *, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``logits`` [B, V]: greedy at temperature 0, else temperature, top-k, top-p (HF order).
    Random draws come from ``generator`` (torch's global RNG when None)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
