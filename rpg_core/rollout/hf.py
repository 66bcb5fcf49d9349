"""transformers ``generate`` on the training model (``GeneratorKind.HF``), left padding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .base import DEFAULT_SEED, GroupGenerator, SamplingParams, autocast, left_pad, strip_response

__all__ = ["HFGenerator"]


class HFGenerator(GroupGenerator):
    """transformers ``generate`` on the training model, left padding.

    ``model.generate`` draws from torch's global RNG and takes no generator, so the engine keeps its own stream by
    swapping it in: inside ``torch.random.fork_rng`` the global RNG is seeded with ``SamplingParams.seed`` (or set
    to the state the previous call left), and the caller's global RNG state is restored afterwards."""

    _state: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (CPU state, CUDA state of the model's device)

    @contextlib.contextmanager
    def _stream(self, seed: int | None, device: torch.device) -> Iterator[None]:
        device = torch.device(device)
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            if seed is not None or self._state is None:
                torch.manual_seed(seed if seed is not None else DEFAULT_SEED)
            else:
                torch.set_rng_state(self._state[0])
                if cuda and self._state[1] is not None:
                    torch.cuda.set_rng_state(self._state[1], device)
            yield
            self._state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)

    def _sample_chunk(self, chunk: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        device = next(self.model.parameters()).device
        ids, attn = left_pad([p for p in chunk for _ in range(params.n)], pad, device)  # n rows a prompt
        greedy = params.temperature == 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy, pad_token_id=pad, eos_token_id=eos)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        with autocast(device, self.autocast):
            seqs = self.model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        return [strip_response(r, eos, pad) for r in seqs[:, ids.shape[1] :].tolist()]
