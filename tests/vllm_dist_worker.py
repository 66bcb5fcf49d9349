"""One process of a multi-process run with vLLM engines, started by ``accelerate launch`` from tests/test_vllm.py:

    accelerate launch --config_file infra/accelerate/cpu_2proc.yaml tests/vllm_dist_worker.py trainer RUN.yaml OUT
    accelerate launch --config_file infra/accelerate/cpu_2proc.yaml tests/vllm_dist_worker.py fsdp2 OUT
    accelerate launch --config_file infra/accelerate/cpu_2proc.yaml tests/vllm_dist_worker.py lost_sync RUN.yaml OUT

``trainer``: trains ``RUN.yaml`` (rollout.generator: vllm) with the trainer, as ``rpg train`` does (DDP), rewards
from ``coin_scores`` (a random model earns none otherwise). ``fsdp2``: the tiny model sharded with FSDP2's
``fully_shard`` (per decoder layer, then the root, as accelerate's FSDP2 plugin wraps it; accelerate itself cannot:
the trainer's ``Accelerator(cpu=True)`` is MULTI_CPU, where accelerate ignores ``distributed_type: FSDP``), a
``VLLMGenerator`` on it and 2 optimizer steps of the log-likelihood of its own samples, each followed by a sync.
``lost_sync``: ``trainer``, but process 1's engine silently keeps its first weights (every later sync lost); each
process reports the step and the message of the SyncMismatchError it raised.

Each process writes what it saw to ``OUT/rank<r>.json``: the cores it is bound to and torch's thread count, the
prompts its engine sampled, each post-sync check, for each weight sync how many whole tensors ``full_weights`` gave
the engine and the most of them alive at once, a checksum of its weights, whether its parameters were sharded, and
its engine's and its model's log-probs of one fixed probe (the same on every process) before and after training;
``trainer`` also the run's (reduced) history."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from test_vllm import coin_scores, counted_weights, vllm_tiny_model


def spy(seen: dict[str, list]) -> None:
    """Record the engine's sampled prompts, its post-sync checks, and per weight sync ``[tensors given, the most of
    them alive at once]`` (weak references: vLLM holding a tensor keeps it alive)."""
    from rpg_core.rollout import VLLMGenerator
    from rpg_core.rollout import vllm as vllm_mod

    seen.update(prompts=[], checks=[], gathered=[])
    sample, check, gather = VLLMGenerator.generate_logprobs, VLLMGenerator.check, vllm_mod.full_weights

    def spy_sample(self, prompts, params, **kw):
        seen["prompts"].append([list(p) for p in prompts])
        return sample(self, prompts, params, **kw)

    def spy_check(self, *a, **kw):
        seen["checks"].append(check(self, *a, **kw))
        return seen["checks"][-1]

    def spy_gather(model):
        return counted_weights(gather(model), lambda *c: seen["gathered"].append(list(c)))

    VLLMGenerator.generate_logprobs, VLLMGenerator.check, vllm_mod.full_weights = spy_sample, spy_check, spy_gather


def probe(generator, model, tok) -> dict[str, list[list[float]]]:
    """The engine's and the model's log-probs of two fixed responses (a collective under FSDP: every process)."""
    from rpg_core.rollout import build_batch, token_logprobs

    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Hi there")["input_ids"]]
    responses = [tok(" The answer is 5.")["input_ids"], tok(" Hello, how are you")["input_ids"]]
    engine = generator.engine_logprobs(prompts, responses)
    batch = build_batch(prompts, responses, [0, 1], tok.pad_token_id)
    with torch.no_grad():
        mine = token_logprobs(model, batch, shared_prefix=False)[0]
    return {"engine": engine, "model": [mine[i, : len(r)].tolist() for i, r in enumerate(responses)]}


def weights_report(model) -> dict:
    from torch.distributed.tensor import DTensor

    full = [(v.full_tensor() if isinstance(v, DTensor) else v) for v in model.state_dict().values()]
    return {"checksum": sum(float(v.double().sum()) for v in full),
            "sharded": [isinstance(p, DTensor) for p in model.parameters()]}  # fmt: skip


def run_trainer(cfg_path: str, seen: dict) -> dict:
    from rpg_core import trainer as trainer_mod
    from rpg_core.config import load_run_config

    trainer_mod.rewards_mod.score_responses = coin_scores
    tr = trainer_mod.Trainer(load_run_config(cfg_path), resume=False)
    before = probe(tr.generator, tr.policy, tr.tok)
    where = {"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    res = tr.fit()
    return {"rank": tr.rank, "world": tr.world, **where, "history": res.history, "probe_before": before,
            "probe_after": probe(tr.generator, tr.policy, tr.tok), **weights_report(tr.policy)}  # fmt: skip


def run_lost_sync(cfg_path: str) -> dict:
    from rpg_core import trainer as trainer_mod
    from rpg_core.config import load_run_config
    from rpg_core.rollout import VLLMGenerator

    trainer_mod.rewards_mod.score_responses = coin_scores
    load, calls = VLLMGenerator.load_weights, []

    def lossy(self, model):  # process 1: the build's sync goes in, every later one is lost
        calls.append(1)
        if int(os.environ["RANK"]) != 1 or len(calls) == 1:
            load(self, model)

    VLLMGenerator.load_weights = lossy
    tr = trainer_mod.Trainer(load_run_config(cfg_path), resume=False)
    try:
        tr.fit()
    except trainer_mod.SyncMismatchError as e:
        return {"rank": tr.rank, "world": tr.world, "step": tr.step, "error": str(e)}
    return {"rank": tr.rank, "world": tr.world, "step": tr.step, "error": None}


def run_fsdp2(seen: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from rpg_core.config import GeneratorKind, RolloutConfig
    from rpg_core.models import TINY, load_tokenizer
    from rpg_core.rollout import SamplingParams, VLLMGenerator, build_batch, token_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = load_tokenizer(TINY)
    model = vllm_tiny_model(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = VLLMGenerator(model, tok, batch_size=16, rollout=RolloutConfig(generator=GeneratorKind.VLLM,
                                                                         vllm_kv_cache_gib=0.1))  # fmt: skip
    before = probe(gen, model, tok)
    where = {"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    questions = [f"What is {a} + {a + 1}?" for a in range(2 * world)][rank::world]  # each process its own
    for step in range(2):
        prompts = [tok(q)["input_ids"] for q in questions]
        samples, _ = gen.generate_logprobs(prompts, SamplingParams(n=2, max_new_tokens=8, seed=100 * step + rank))
        ps, rs = [p for p, g in zip(prompts, samples) for _ in g], [r for g in samples for r in g]
        batch = build_batch(ps, rs, [i // 2 for i in range(len(rs))], tok.pad_token_id)
        lp = token_logprobs(model, batch)[0]
        loss = -(lp * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()  # FSDP2 reduce-scatters: every process's shard gets the mean gradient
        opt.step()
        opt.zero_grad()
        gen.load_weights(model)
        gen.check(model, ps, rs, 64)
    return {"rank": rank, "world": world, **where, "probe_before": before, "probe_after": probe(gen, model, tok),
            **weights_report(model)}  # fmt: skip


def main(mode: str, *args: str) -> None:
    seen: dict[str, list] = {}
    spy(seen)
    out = {"trainer": lambda: run_trainer(args[0], seen), "lost_sync": lambda: run_lost_sync(args[0]),
           "fsdp2": lambda: run_fsdp2(seen)}[mode]()
    Path(args[-1], f"rank{out['rank']}.json").write_text(json.dumps({**out, **seen}))


if __name__ == "__main__":
    main(*sys.argv[1:])
