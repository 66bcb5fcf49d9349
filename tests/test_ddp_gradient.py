"""The gradient of a 2-process (gloo, DDP) update equals the 1-process gradient of the same global batch.

At the update seam (rpg_core.update.update): one fixed rollout batch of 4 groups x 2 responses, fixed advantages and
old/reference log-probs, on the tiny model in float64. Two processes each take 2 groups (unequal response lengths,
so the token-mean normaliser is not a mean of per-process means) in micro-batches of 1 (accumulation); one process
takes all 8 rows in a single micro-batch. The gradients are captured just before the optimizer step.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rpg_core.config import load_run_config
from rpg_core.models import tiny_model
from rpg_core.rollout import RolloutBatch, build_batch, token_logprobs
from rpg_core.update import UpdateBatch, update

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PAD = 2

pytestmark = [pytest.mark.system, pytest.mark.subprocess]


class _Backend:
    """What the trainer's Accelerator provides to the update, with plain torch (DDP's no_sync for accumulation)."""

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def _fixed_batch():
    """8 rows: groups 0 and 1 (rank 0's) have short responses, groups 2 and 3 (rank 1's) long ones."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 900, (n,), generator=g).tolist() for n in (5, 3, 6, 4)]
    lengths = [2, 3, 1, 2, 9, 7, 11, 8]
    responses = [torch.randint(10, 900, (n,), generator=g).tolist() for n in lengths]
    gids = [0, 0, 1, 1, 2, 2, 3, 3]
    batch = build_batch([prompts[i] for i in gids], responses, gids, PAD)
    model = tiny_model(0).double()
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch)
    mask = batch.response_mask
    noise = lambda s: torch.randn(mask.shape, dtype=torch.float64, generator=g) * s * mask  # noqa: E731
    adv = torch.randn(len(gids), 1, dtype=torch.float64, generator=g) * mask  # [B, T], as compute_advantages gives
    return batch, adv, logp + noise(0.1), logp + noise(0.2)


def _rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """Rows of the global batch at its full width (so Dr. GRPO's horizon T is the same as the global batch's)."""
    idx = torch.tensor(rows)
    return RolloutBatch(batch.input_ids[idx], batch.attention_mask[idx], batch.response_mask[idx],
                        batch.group_ids[idx], batch.prompt_len)  # fmt: skip


def _grads(agg: str, rows: list[int], micro: int, world: int) -> list[torch.Tensor]:
    cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
        "model.name=tiny", f"objective.agg={agg}", f"algorithm.micro_batch_size={micro}", "optim.grad_clip=null",
        "algorithm.reference=fixed", "objective.beta=0.1", "reward.dynamic_sampling=false"])  # fmt: skip
    batch, adv, old, ref = _fixed_batch()
    idx = torch.tensor(rows)
    model = tiny_model(0).double()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda o, a, k: captured.extend(p.grad.detach().clone() for p in model.parameters()))

    def all_reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    data = UpdateBatch(_rows(batch, rows), _rows(batch, rows).response_mask, adv[idx], old[idx], ref[idx])
    update(model, opt, cfg, data, step=0, backend=_Backend(), world=world, all_reduce_sum=all_reduce_sum)
    return captured


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = [0, 1, 2, 3] if rank == 0 else [4, 5, 6, 7]
        torch.save({agg: _grads(agg, rows, micro=1, world=2) for agg in AGGS}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_process_gradient_equals_one_process(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    two = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    for agg in AGGS:
        one = _grads(agg, list(range(8)), micro=8, world=1)
        assert len(one) == len(two[0][agg]) > 0
        scale = max(float(g.abs().max()) for g in one)
        assert scale > 0, agg
        for a, b0, b1 in zip(one, two[0][agg], two[1][agg], strict=True):
            assert torch.equal(b0, b1)  # DDP: both processes hold the averaged gradient
            assert float((a - b0).abs().max()) <= 1e-6 * scale, agg
    # The global normaliser matters: the mean of the two halves' own token-mean gradients is another gradient.
    halves = [_grads("token-mean", rows, micro=4, world=1) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
    mean_of_means = [(a + b) / 2 for a, b in zip(*halves, strict=True)]
    one = _grads("token-mean", list(range(8)), micro=8, world=1)
    assert max(float((a - b).abs().max()) for a, b in zip(one, mean_of_means, strict=True)) > 1e-3 * scale
