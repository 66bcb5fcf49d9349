"""Rollout (spec §2.8): sample ``n`` responses per prompt with an engine, then recompute per-token log-probs.

    base.py       SamplingParams (seeds included), the Generator protocol, what the built-in engines share
    prefix.py     GeneratorKind.PREFIX: the built-in group sampler (one prefill per prompt)
    hf.py         GeneratorKind.HF: transformers generate
    vllm.py       GeneratorKind.VLLM: a colocated vLLM engine, weights synced in memory (vLLM imported lazily)
    logprobs.py   RolloutBatch, build_batch, token_logprobs (the training side, never the engine's log-probs)
    types.py      the typed Rollout a training step passes downstream

``make_generator`` is the only door to an engine; its registry's keys are exactly ``config.GeneratorKind``.
An engine is a module here and one registry entry: it must return token ids, sample from its own seeded stream
(``SamplingParams.seed``), accept fresh weights in ``load_weights`` after each optimizer step and refuse what it
cannot run in ``preflight`` (called before the model loads). An engine with its own copy of the weights is a
``SyncedGenerator`` (its log-probs come with the tokens; ``check`` measures the sync).
"""

from __future__ import annotations

import torch

from rpg_core.config import GeneratorKind

from rpg_core.config import RolloutConfig

from .base import Generator, GroupGenerator, SamplingParams, SyncedGenerator, mix_seed
from .hf import HFGenerator
from .logprobs import RolloutBatch, batched_logprobs, build_batch, token_logprobs
from .prefix import PrefixSharingGenerator, sample_next
from .types import Prompt, Rollout, SamplingStats
from .vllm import VLLMGenerator, VLLMMissing

__all__ = [
    "ENGINES",
    "Generator",
    "HFGenerator",
    "PrefixSharingGenerator",
    "Prompt",
    "Rollout",
    "RolloutBatch",
    "SamplingParams",
    "SamplingStats",
    "SyncedGenerator",
    "VLLMGenerator",
    "VLLMMissing",
    "batched_logprobs",
    "build_batch",
    "make_generator",
    "mix_seed",
    "preflight",
    "sample_next",
    "token_logprobs",
]

ENGINES: dict[GeneratorKind, type[GroupGenerator] | type[VLLMGenerator]] = {
    GeneratorKind.PREFIX: PrefixSharingGenerator,
    GeneratorKind.HF: HFGenerator,
    GeneratorKind.VLLM: VLLMGenerator,
}
if set(ENGINES) != set(GeneratorKind):  # the closed enum is the registry's keys, not a second list
    raise ImportError(f"rollout.ENGINES {sorted(ENGINES)} must cover exactly GeneratorKind {sorted(GeneratorKind)}")


def make_generator(
    kind: GeneratorKind | str,
    model: torch.nn.Module,
    tokenizer,
    *,
    batch_size: int = 64,
    autocast: torch.dtype | None = None,
    rollout: RolloutConfig | None = None,
    max_len: int | None = None,
) -> Generator:
    """The engine ``kind`` sampling from ``model``: ``batch_size`` sequences per chunk, forward passes under
    ``autocast`` (a dtype, or None for none); ``rollout``: the run's settings, for an engine that has its own
    (vLLM's KV cache); ``max_len``: the longest prompt + response the caller will ask for (None: unknown), for an
    engine that reserves memory by it (vLLM). The trainer passes ``rollout.generator`` / ``rollout.batch_size`` and
    ``RunConfig.sequence_budget``; ``rpg eval`` its engine, ``evaluation.batch_size`` and its prompt + response
    budgets."""
    return ENGINES[GeneratorKind(kind)](model, tokenizer, batch_size=batch_size, autocast=autocast, rollout=rollout,
                                        max_len=max_len)  # fmt: skip


def preflight(settings: RolloutConfig, *, world: int = 1, fsdp: int | None = None) -> None:
    """Refuse, before any model loads, what the run's engine cannot do here (vLLM not installed: ``VLLMMissing``).
    ``world``: the number of processes; ``fsdp``: the FSDP version the model will be sharded with (None: none)."""
    ENGINES[settings.generator].preflight(settings, world=world, fsdp=fsdp)
