"""One process of a multi-process vLLM training run, started by ``accelerate launch`` from tests/test_vllm.py:

    accelerate launch --config_file CONFIG tests/vllm_dist_worker.py RUN.yaml OUT_DIR

Trains ``RUN.yaml`` (rollout.generator: vllm) with the trainer as ``rpg train`` does, rewards from ``coin_scores``
(a random model earns none otherwise), and writes what this process saw to ``OUT_DIR/rank<r>.json``: the cores it
is bound to and torch's thread count, the prompts its engine sampled, each post-sync check, the run's (reduced)
history, a checksum of its weights, whether its parameters were sharded, and its engine's and its trainer's
log-probs of one fixed probe (the same on every process) before and after training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from test_vllm import coin_scores


def main(cfg_path: str, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from rpg_core import trainer as trainer_mod
    from rpg_core.config import load_run_config
    from rpg_core.rollout import VLLMGenerator, build_batch, token_logprobs

    trainer_mod.rewards_mod.score_responses = coin_scores
    seen: dict[str, list] = {"prompts": [], "checks": []}
    sample, check = VLLMGenerator.generate_logprobs, VLLMGenerator.check

    def spy_sample(self, prompts, params, **kw):
        seen["prompts"].append([list(p) for p in prompts])
        return sample(self, prompts, params, **kw)

    def spy_check(self, *a, **kw):
        seen["checks"].append(check(self, *a, **kw))
        return seen["checks"][-1]

    VLLMGenerator.generate_logprobs, VLLMGenerator.check = spy_sample, spy_check
    tr = trainer_mod.Trainer(load_run_config(cfg_path), resume=False)
    tok = tr.tok
    probe_p = [tok("What is 2 + 3?")["input_ids"], tok("Hi there")["input_ids"]]
    probe_r = [tok(" The answer is 5.")["input_ids"], tok(" Hello, how are you")["input_ids"]]

    def probe() -> dict[str, list[list[float]]]:
        engine = tr.generator.engine_logprobs(probe_p, probe_r)
        batch = build_batch(probe_p, probe_r, [0, 1], tok.pad_token_id)
        with torch.no_grad():
            mine = token_logprobs(tr.policy, batch, shared_prefix=False)[0]
        return {"engine": engine, "trainer": [mine[i, : len(r)].tolist() for i, r in enumerate(probe_r)]}

    rank = tr.rank
    before = probe()
    where = {"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    res = tr.fit()
    after = probe()
    sharded = [isinstance(p, DTensor) for p in tr.policy.parameters()]
    weights = tr.policy.state_dict()
    checksum = sum(float((v.full_tensor() if isinstance(v, DTensor) else v).double().sum()) for v in weights.values())
    out = {"rank": rank, "world": tr.world, **where, **seen, "history": res.history, "probe_before": before,
           "probe_after": after, "checksum": checksum, "sharded": sharded}  # fmt: skip
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
