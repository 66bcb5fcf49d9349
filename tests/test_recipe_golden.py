"""Golden values of a few training steps of the tiny model (torchtune's recipe tests): the per-step losses, KL
estimates, clipping, ratio extremes, gradient norm, reward and length, and a checksum of the final weights, pinned
for three design points. Any change to what a step computes (sampling, rewards, advantages, the objective, the
update order, the optimizer) changes these numbers; a refactor that only moves code must not.

Only public entry points: ``load_run_config``, ``Trainer(cfg)``, ``Trainer.model``, ``Trainer.fit()`` and its
``TrainResult.history``.

The numbers were produced on CPU with one thread (``torch.set_num_threads(1)``, set by the test) by

    RPG_REGEN_GOLDEN=1 PYTHONPATH=. python -m pytest -q -s tests/test_recipe_golden.py

which prints the new ``GOLDEN`` table instead of asserting; paste it below after checking that the change in the
numbers is the one intended (a pure refactor must not need this).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import scoring_task
from rpg_core.config import load_run_config
from rpg_core.trainer import Trainer

pytestmark = pytest.mark.integration

REGEN = os.environ.get("RPG_REGEN_GOLDEN") == "1"
STEPS = 3
REL, ABS = 1e-5, 1e-7

# Every design point: 2 prompts x 8 samples, 2 epochs x 2 mini-batches (4 optimizer steps per rollout, so
# pi_theta != pi_old from the second update on and the clip acts), a FIXED reference with beta = 0.1 (the KL to
# the initial model grows over the steps; with an iterative reference refreshed every step and one update per
# rollout the KL term would be identically 0), lr 1e-3 so the ratio moves visibly in 4 updates.
COMMON = [
    "rollout.prompts_per_step=2",
    "rollout.n=8",
    "algorithm.micro_batch_size=8",
    "algorithm.epochs=2",
    "algorithm.mini_batches=2",
    "algorithm.reference=fixed",
    "objective.beta=0.1",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "reward.dynamic_sampling=false",  # the golden steps must each train on the 16 samples drawn
    "tracking.enabled=false",
    "train.checkpoint_every=0",
]

DESIGN_POINTS = {
    # RPG-REINFORCE-URKL, Algorithm 2 with RPG-Style (dual) clip; the preset's overlong shaping stays on.
    "rpg_reinforce_urkl": ("rpg_reinforce_urkl", []),
    # RPG-UFKL, the fully differentiable form, unclipped: l = -w A + beta s (w - log w - 1) (Table 1), which
    # reports its pg and KL parts separately.
    "rpg_ufkl_unclipped": ("rpg_ufkl", ["objective.clip=none"]),
    # GRPO: k3 penalty in the loss, PPO clip, (R - mean) / std advantages, per-sequence token means.
    "grpo": ("grpo", []),
}

METRICS = (
    "actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/kl_k1", "actor/kl_k2", "actor/kl_k3", "actor/clipfrac",
    "actor/ratio_max", "actor/ratio_min", "actor/grad_norm", "actor/entropy", "actor/updates", "adv/abs_mean",
    "reward/mean", "reward/std", "acc/strict", "response_length/mean",
)  # fmt: skip


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in sorted(model.named_parameters())}


def _checksums(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """The distance the weights moved, and a fixed random projection of the final weights (any change to any
    weight changes it)."""
    g = torch.Generator().manual_seed(0)
    delta = math.sqrt(sum(float((after[n] - before[n]).square().sum()) for n in after))
    proj = sum(float((after[n] * torch.randn(after[n].shape, generator=g, dtype=torch.float64)).sum()) for n in after)
    return {"weights/delta_norm": delta, "weights/projection": proj}


def run_design_point(tmp_path: Path, name: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    preset, extra = DESIGN_POINTS[name]
    source = scoring_task.write_zero_task(tmp_path / "data")
    cfg = load_run_config(
        preset=preset,
        overrides=[*scoring_task.overrides(source), *COMMON, *extra, f"train.steps={STEPS}",
                   f"train.output_dir={tmp_path / 'runs'}"],
    )  # fmt: skip
    tr = Trainer(cfg)
    before = _weights(tr.model)
    hist = tr.fit().history
    rows = [{k: float(m[k]) for k in METRICS if k in m} for m in hist]
    return rows, _checksums(before, _weights(tr.model))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _table(name: str, rows: list[dict[str, float]], sums: dict[str, float]) -> str:
    """The GOLDEN entry of one design point, as Python: each metric's values at steps 1..STEPS, then the checksums."""
    lines = [f"    {name!r}: {{"]
    lines += [f"        {k!r}: ({', '.join(repr(r[k]) for r in rows)})," for k in METRICS if k in rows[0]]
    lines += [f"        {k!r}: {v!r}," for k, v in sums.items()]
    return "\n".join([*lines, "    },"])


@pytest.mark.parametrize("name", list(DESIGN_POINTS))
def test_golden_steps(tmp_path, one_thread, name):
    rows, sums = run_design_point(tmp_path, name)
    if REGEN:
        print("\n" + _table(name, rows, sums))
        pytest.skip("RPG_REGEN_GOLDEN=1: printed the new values")
    assert len(rows) == STEPS and all(set(r) == set(rows[0]) for r in rows)
    # The setup does what it is for: some samples score, so the policy-gradient term acts ...
    assert any(r["reward/std"] > 0 and r["adv/abs_mean"] > 0 for r in rows)
    if "actor/pg_loss" in rows[0]:
        assert any(r["actor/pg_loss"] != 0 for r in rows)
    # ... and the fixed reference makes the KL act: pi_theta moves off pi_ref = the initial model with step 1's
    # first update, so step 1's later updates already see KL > 0, and it stays off.
    assert all(r["actor/updates"] == 4 for r in rows)
    for r in rows:
        assert r["actor/kl_k3"] > 0 and r["actor/kl_k2"] > 0
        if "actor/kl_loss" in r:
            assert r["actor/kl_loss"] > 0
    want = GOLDEN[name]
    assert set(rows[0]) | set(sums) == set(want), "the metrics a step reports changed"
    for k in rows[0]:
        got = tuple(r[k] for r in rows)
        assert got == pytest.approx(want[k], rel=REL, abs=ABS), (name, k, got, want[k])
    for k, v in sums.items():
        assert v == pytest.approx(want[k], rel=REL, abs=ABS), (name, k, v, want[k])


# fmt: off
GOLDEN: dict[str, dict[str, float | tuple[float, ...]]] = {
    'rpg_reinforce_urkl': {
        'actor/loss': (0.2919321898370981, -0.0888590607792139, -0.2498801238834858),
        'actor/kl_k1': (-0.1416250430047512, 0.3503199480473995, 0.3707841485738754),
        'actor/kl_k2': (0.026853703428059816, 0.09744684677571058, 0.12927489914000034),
        'actor/kl_k3': (0.030259106308221817, 0.07977552339434624, 0.10283726453781128),
        'actor/clipfrac': (0.21875, 0.24609375, 0.05078125),
        'actor/ratio_max': (1.9196767807006836, 1.5815244913101196, 1.2834120988845825),
        'actor/ratio_min': (0.5814869999885559, 0.3871976137161255, 0.5426710844039917),
        'actor/grad_norm': (0.7448131730780005, 0.9255112856626511, 0.8368326425552368),
        'actor/entropy': (10.78989553451538, 10.790013790130615, 10.790050506591797),
        'actor/updates': (4.0, 4.0, 4.0),
        'adv/abs_mean': (0.21875, 0.59375, 0.4375),
        'reward/mean': (-1.875, -1.625, -0.25),
        'reward/std': (0.5, 0.8062257766723633, 0.6831300258636475),
        'acc/strict': (0.0625, 0.1875, 0.875),
        'response_length/mean': (8.0, 8.0, 8.0),
        'weights/delta_norm': 9.880935793125913,
        'weights/projection': -39.5620676113333,
    },
    'rpg_ufkl_unclipped': {
        'actor/loss': (-0.033771976886782795, -0.027400769293308258, 0.008240948664024472),
        'actor/pg_loss': (-0.03631586208939552, -0.0339654553681612, 0.0),
        'actor/kl_loss': (0.0025438861339353025, 0.006564686278579757, 0.008240948664024472),
        'actor/kl_k1': (-0.1509331911802292, 0.3434983491897583, 0.35756897181272507),
        'actor/kl_k2': (0.02822120813652873, 0.10297204833477736, 0.13848876953125),
        'actor/kl_k3': (0.031798020005226135, 0.08390560746192932, 0.11107712239027023),
        'actor/ratio_max': (1.9218767881393433, 1.5459762811660767, 1.1015610694885254),
        'actor/ratio_min': (0.5828877687454224, 0.2858857810497284, 0.464884877204895),
        'actor/grad_norm': (0.8761998005211353, 0.970527857542038, 0.19363927096128464),
        'actor/entropy': (10.78989553451538, 10.789985179901123, 10.790401935577393),
        'actor/updates': (4.0, 4.0, 4.0),
        'adv/abs_mean': (0.21875, 0.59375, 0.0),
        'reward/mean': (-1.875, -1.625, 0.0),
        'reward/std': (0.5, 0.8062257766723633, 0.0),
        'acc/strict': (0.0625, 0.1875, 1.0),
        'response_length/mean': (8.0, 8.0, 8.0),
        'weights/delta_norm': 9.504207885931052,
        'weights/projection': -44.87875915731348,
    },
    'grpo': {
        'actor/loss': (-0.027566459553781897, -0.03624427691102028, -0.009521123953163624),
        'actor/pg_loss': (-0.03013094700872898, -0.0424234583042562, -0.02601087326183915),
        'actor/kl_loss': (0.0025644865236245096, 0.006179181975312531, 0.016489750239998102),
        'actor/kl_k1': (-0.12351563945412636, 0.24052910134196281, 0.5581233501434326),
        'actor/kl_k2': (0.02294942713342607, 0.072088404558599, 0.21253057941794395),
        'actor/kl_k3': (0.025644835084676743, 0.06179181858897209, 0.16489747166633606),
        'actor/clipfrac': (0.234375, 0.3203125, 0.09765625),
        'actor/ratio_max': (1.9257148504257202, 1.802795171737671, 1.4452416896820068),
        'actor/ratio_min': (0.5860828161239624, 0.35876819491386414, 0.6002709865570068),
        'actor/grad_norm': (0.7154214568436146, 1.5247682929039001, 1.3671193271875381),
        'actor/entropy': (10.78989553451538, 10.789867401123047, 10.79021692276001),
        'actor/updates': (4.0, 4.0, 4.0),
        'adv/abs_mean': (0.30935874581336975, 0.9057102203369141, 0.618717610836029),
        'reward/mean': (-0.875, -0.25, 0.75),
        'reward/std': (0.5, 1.0, 0.6831300258636475),
        'acc/strict': (0.0625, 0.375, 0.875),
        'response_length/mean': (8.0, 8.0, 8.0),
        'weights/delta_norm': 10.92074234690247,
        'weights/projection': -43.117160365699434,
    },
}
# fmt: on
