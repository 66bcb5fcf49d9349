"""Rollout: sample n responses per prompt, then recompute per-token log-probs in a forward pass (spec §2.8).

The loop only sees the ``Generator`` protocol, so a faster engine (vLLM on GPU) can replace ``HFGenerator``
without touching the trainer: it must return token ids and accept fresh weights after each optimizer step.
Log-probs used by the loss are always recomputed by ``token_logprobs`` on the training model (the code never
uses the sampler's own log-probs, spec §2.8).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Generator",
    "HFGenerator",
    "PrefixSharingGenerator",
    "RolloutBatch",
    "SamplingParams",
    "build_batch",
    "mix_seed",
    "token_logprobs",
]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64


@runtime_checkable
class Generator(Protocol):
    """Samples responses. ``generate`` returns, per prompt, ``n`` lists of response token ids (EOS included when
    the response finished). ``load_weights`` is called after every optimizer step (a no-op for HF generate, which
    samples from the training model itself)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[list[int]]]: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...


class _GroupGenerator:
    """Shared by the generators: ``batch_size`` sequences per call (``batch_size // n`` prompts), eval mode while
    sampling, no gradients. Subclasses sample one chunk: ``n`` consecutive rows per prompt."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64, autocast: torch.dtype | None = None):
        self.model, self.tok, self.batch_size, self.autocast = model, tokenizer, batch_size, autocast

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[list[int]]]:
        was_training = self.model.training
        self.model.eval()
        per_call = max(1, self.batch_size // params.n)
        out: list[list[list[int]]] = []
        device = next(self.model.parameters()).device
        # One autocast context around every step: autocast caches its casts of the weights until the outermost
        # context exits, so a context per decode step would cast every weight to bf16 again at every token.
        try:
            with _autocast(device, self.autocast):
                for i in range(0, len(prompts), per_call):
                    chunk = prompts[i : i + per_call]
                    rows = self._sample_chunk(chunk, params)
                    out += [rows[j * params.n : (j + 1) * params.n] for j in range(len(chunk))]
        finally:
            self.model.train(was_training)
        return out

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        raise NotImplementedError


class HFGenerator(_GroupGenerator):
    """transformers ``generate`` on the training model, left padding."""

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        device = next(self.model.parameters()).device
        ids, attn = _left_pad([p for p in chunk for _ in range(params.n)], pad, device)  # n rows a prompt
        greedy = params.temperature == 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy, pad_token_id=pad, eos_token_id=eos)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        with _autocast(device, self.autocast):
            seqs = self.model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        return [_strip(r, eos, pad) for r in seqs[:, ids.shape[1] :].tolist()]


class PrefixSharingGenerator(_GroupGenerator):
    """A sampler for groups: each prompt is prefilled once and its key/value cache indexed out to its ``n``
    samples, and rows leave the batch as soon as they emit EOS (HF generate keeps computing finished rows until
    the longest one ends). Samples exactly softmax(logits / T) after top-k then top-p filtering, as HF's warpers
    do, from the global torch RNG (so it is seeded like everything else)."""

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        model, eos = self.model, self.tok.eos_token_id
        device = next(model.parameters()).device
        ids, attn = _left_pad(chunk, self.tok.pad_token_id, device)
        with _autocast(device, self.autocast):
            head = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        rows = torch.arange(len(chunk), device=device).repeat_interleave(params.n)
        cache = head.cache
        cache.batch_select_indices(rows)
        logits = head.logits[rows, -1].float()
        attn = attn[rows]
        pos = attn.sum(-1)
        alive = torch.arange(len(rows), device=device)
        results: list[list[int]] = [[] for _ in range(len(rows))]
        for step in range(params.max_new_tokens):
            tok = sample_next(logits, params)
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
            with _autocast(device, self.autocast):
                nxt = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], cache=cache,
                            use_cache=True)  # fmt: skip
            logits = nxt.logits[:, -1].float()
            pos = pos + 1
        return results


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (every sampling seed of a run is derived with it)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


def sample_next(logits: Tensor, params: SamplingParams) -> Tensor:
    """One token per row from ``logits`` [B, V]: greedy at temperature 0, else temperature, top-k, top-p (HF order)."""
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
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    """Cut a generated row after its first EOS (kept: the model is trained to stop) and drop right padding."""
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r) :] = 1
    return ids.to(device), attn.to(device)


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            yield


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
    with _autocast(device, autocast):
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
    cache = head.cache
    cache.batch_select_indices(inverse)  # every response attends to its own prompt's keys/values
    t = ids.shape[1] - p
    r_pos = p_attn.sum(-1)[inverse, None] + torch.arange(t, device=ids.device)
    tail = model(input_ids=ids[:, p:], attention_mask=attn, position_ids=r_pos, cache=cache, use_cache=True)
    return torch.cat([head.logits[inverse], tail.logits[:, :-1]], dim=1)
