"""Engines: make_generator's registry is exactly GeneratorKind; sampling seeds travel in SamplingParams, each engine
draws from its own stream (the global torch RNG is left alone) and gives exactly what seeding the global RNG gave."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rpg_core.config import GeneratorKind
from rpg_core.rollout import ENGINES, HFGenerator, PrefixSharingGenerator, SamplingParams, make_generator

pytestmark = pytest.mark.integration


def test_registry_is_the_enum(tokenizer, tiny_model_factory):
    assert set(ENGINES) == set(GeneratorKind)
    model = tiny_model_factory(0)
    assert type(make_generator(GeneratorKind.PREFIX, model, tokenizer)) is PrefixSharingGenerator
    gen = make_generator("hf", model, tokenizer, batch_size=4, autocast=torch.bfloat16)
    assert type(gen) is HFGenerator and gen.batch_size == 4 and gen.autocast is torch.bfloat16
    with pytest.raises(ValueError):
        make_generator("vllm-typo", model, tokenizer)


class _GlobalStream:
    """The engines as they were before seeds travelled in SamplingParams: a seed re-seeds torch's global RNG,
    which the sampler draws from (the prefix sampler's generator=None)."""

    def _stream(self, seed, device):
        if seed is not None:
            torch.manual_seed(seed)
        self._rng = None
        return contextlib.nullcontext()


class _OldPrefix(_GlobalStream, PrefixSharingGenerator):
    pass


class _OldHF(_GlobalStream, HFGenerator):
    pass


@pytest.mark.parametrize("new_cls, old_cls", [(PrefixSharingGenerator, _OldPrefix), (HFGenerator, _OldHF)],
                         ids=["prefix", "hf"])  # fmt: skip
def test_seeded_engines_reproduce_the_global_rng_and_leave_it_alone(tokenizer, tiny_model_factory, new_cls, old_cls):
    model = tiny_model_factory(2)
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Hi there")["input_ids"]]
    params = SamplingParams(n=3, temperature=1.0, top_k=50, max_new_tokens=10, seed=1234)
    rest = SamplingParams(n=3, temperature=1.0, top_k=50, max_new_tokens=10)  # seed None: continue the stream
    old = old_cls(model, tokenizer, batch_size=4)  # batch_size 4: two chunks per call, the stream runs across
    want = [old.generate(prompts, params), old.generate(prompts, rest)]

    torch.manual_seed(99)
    before = torch.get_rng_state()
    new = new_cls(model, tokenizer, batch_size=4)
    got = [new.generate(prompts, params), new.generate(prompts, rest)]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert got == want  # bit-identical samples, the second call continuing the seeded stream
    assert got[0] != got[1]
    assert new.generate(prompts, params) == want[0]  # re-seeding restarts the stream
