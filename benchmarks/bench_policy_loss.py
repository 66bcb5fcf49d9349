#!/usr/bin/env python
"""Wall time of ``policy_loss`` (forward + backward) against a plain verl-style PPO clipped loss.

Measured in one process, on the same inputs, candidates interleaved round-robin across repeats (the starting
candidate rotates each repeat) so that machine noise and cache state affect all of them alike:

  rpg_reinforce_urkl   policy_loss with PRESETS["rpg_reinforce_urkl"].objective (RPG-REINFORCE, URKL, dual clip
                       0.2/0.28, c=10, beta=1e-4, token-mean), iterative mode (ref_logp=None), advantages [B]
  ppo_clip (baseline)  verl ``compute_policy_loss``: ratio = exp(logp - old_logp), max(-A w, -A clamp(w)),
                       token-mean over the mask, plus a detached clip fraction
  --all-forms          every form of the design space (differentiable / reinforce / penalty / reward) at the
                       preset's settings, the preset in fixed-reference mode, and verl's dual-clip PPO, for information

One measurement = the loss computation + ``loss.backward()`` on a fresh leaf ``logp`` (its .grad is reset outside
the timed region). The Python garbage collector is disabled while timing, as ``timeit`` does.

    python benchmarks/bench_policy_loss.py --batch 64 --tokens 1024 --repeats 50 --warmup 10 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_core.objectives.config import Form, ObjectiveConfig
from rpg_core.objectives.losses import policy_loss
from rpg_core.objectives.presets import PRESETS

PRESET = "rpg_reinforce_urkl"
BASELINE = "ppo_clip"
GOAL = 1.5
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_DTYPES = {"int64": torch.int64, "bool": torch.bool, "float": None}  # float: the --dtype


# -- inputs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    logp0: Tensor  # [B, T] values of log pi_theta (a fresh leaf is made from it for every call)
    old_logp: Tensor  # [B, T]
    ref_logp: Tensor  # [B, T], only for the fixed-reference row
    adv: Tensor  # [B], both signs
    adv_bt: Tensor  # [B, T], the advantage broadcast to tokens and materialised, as verl's data carries it
    mask: Tensor  # [B, T] 0/1 of --mask-dtype (verl's response_mask is a slice of the int64 attention mask)


def make_inputs(
    batch: int, tokens: int, dtype: torch.dtype, mask_dtype: torch.dtype, noise: float, seed: int
) -> Inputs:
    """Right-padded responses of varying length, log-probs of sampled tokens, logp = old_logp + noise."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, tokens // 8), tokens + 1, (batch,), generator=g)
    lengths[0] = tokens  # at least one full-length response
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(mask_dtype)
    # Log-probs of sampled tokens: mostly near 0 (confident tokens), a heavy tail of unlikely ones.
    old_logp = -torch.empty(batch, tokens).exponential_(2.0, generator=g).clamp(max=20.0)
    logp = old_logp + noise * torch.randn(batch, tokens, generator=g)
    ref_logp = old_logp + 0.05 * torch.randn(batch, tokens, generator=g)
    adv = torch.randn(batch, generator=g)
    adv[0] = abs(adv[0]) + 0.1  # both signs, whatever the seed
    if batch > 1:
        adv[1] = -abs(adv[1]) - 0.1
    return Inputs(
        logp0=logp.to(dtype),
        old_logp=old_logp.to(dtype),
        ref_logp=ref_logp.to(dtype),
        adv=adv.to(dtype),
        adv_bt=adv[:, None].expand(batch, tokens).contiguous().to(dtype),
        mask=mask,
    )


# -- the candidates ------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """verl_F.masked_mean."""
    return (values * mask).sum() / mask.sum()


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float):
    """verl ``compute_policy_loss`` (vanilla PPO clip), token-mean aggregation, with the detached clip fraction."""
    ratio = torch.exp(logp - old_logp)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask).detach()
    loss = (pg_losses * mask).sum() / mask.sum()  # agg_loss(loss_agg_mode="token-mean")
    return loss, pg_clipfrac


def ppo_dual_clip_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float, clip_c: float
):
    """verl ``compute_policy_loss`` with the dual clip (clip_ratio_c), as the released RPG code runs it."""
    negative_approx_kl = logp - old_logp
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, mask).detach()
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask).detach()
    pg_losses3 = -adv * clip_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (adv < 0).float(), mask).detach()
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    loss = (pg_losses * mask).sum() / mask.sum()
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


@dataclass
class Candidate:
    name: str
    description: str
    step: Callable[[Tensor], Tensor]  # leaf logp -> scalar loss (everything the trainer would compute)
    times_ms: list[float]


def build_candidates(x: Inputs, all_forms: bool) -> list[Candidate]:
    obj = PRESETS[PRESET].objective
    lo, hi = obj.eps_low, obj.eps_high

    def rpg(cfg: ObjectiveConfig, ref: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        return lambda logp: policy_loss(cfg, logp, x.old_logp, ref, x.adv, x.mask).loss

    cands = [
        Candidate(PRESET, f"policy_loss {obj.summary()} (iterative)", rpg(obj), []),
        Candidate(BASELINE, f"verl PPO clip ({lo}, {hi}), token-mean", lambda logp: ppo_clip_loss(
            logp, x.old_logp, x.adv_bt, x.mask, lo, hi)[0], []),
    ]
    if all_forms:
        cands.append(Candidate("ppo_dual_clip", f"verl PPO dual clip ({lo}, {hi}, c={obj.clip_c}), token-mean",
                               lambda logp: ppo_dual_clip_loss(logp, x.old_logp, x.adv_bt, x.mask, lo, hi,
                                                               obj.clip_c)[0], []))
        for form in Form:
            if form is obj.form:
                continue  # the preset itself is already measured
            cfg = ObjectiveConfig.parse({**obj.model_dump(), "form": form})  # same clip, beta, URKL / k3-reverse
            cands.append(Candidate(f"form={form.value}", f"policy_loss {cfg.summary()} (iterative)", rpg(cfg), []))
        cands.append(Candidate(f"{PRESET}[fixed-ref]", f"policy_loss {obj.summary()} (fixed ref_logp)",
                               rpg(obj, x.ref_logp), []))
    return cands


# -- timing --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(cand: Candidate, logp0: Tensor) -> float:
    logp = logp0.detach().clone().requires_grad_(True)
    _sync(logp.device)
    t0 = time.perf_counter()
    loss = cand.step(logp)
    loss.backward()
    _sync(logp.device)  # on a GPU, time until the kernels are done, not just launched
    t1 = time.perf_counter()
    if logp.grad is None:
        raise RuntimeError(f"{cand.name}: no gradient reached logp")
    return (t1 - t0) * 1e3


def measure(cands: list[Candidate], logp0: Tensor, warmup: int, repeats: int) -> None:
    n = len(cands)
    for r in range(warmup):
        for i in range(n):
            run_once(cands[(r + i) % n], logp0)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for i in range(n):  # round-robin, rotating the starting candidate
                c = cands[(r + i) % n]
                c.times_ms.append(run_once(c, logp0))
    finally:
        gc.enable()


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs), "p10_ms": quantile(xs, 0.1), "p90_ms": quantile(xs, 0.9),
            "mean_ms": statistics.fmean(xs), "min_ms": min(xs), "n": len(xs)}


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="B, sequences")
    p.add_argument("--tokens", type=int, default=1024, help="T, padded response length")
    p.add_argument("--repeats", type=int, default=50, help="timed iterations per candidate")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations per candidate first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (None: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device of the inputs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the input tensors")
    p.add_argument("--mask-dtype", choices=list(MASK_DTYPES), default="int64",
                   help="dtype of the 0/1 mask (int64 = verl's response_mask; float = the --dtype)")
    p.add_argument("--noise", type=float, default=0.15, help="std of logp - old_logp (drives how many tokens clip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-forms", action="store_true", help="also time every form of the design space")
    p.add_argument("--json", metavar="PATH", default=None, help="write the numbers to this JSON file")
    a = p.parse_args(argv)
    if a.batch < 1 or a.tokens < 1 or a.repeats < 1 or a.warmup < 0 or (a.threads is not None and a.threads < 1):
        p.error("--batch, --tokens, --repeats, --threads must be >= 1 and --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    x = make_inputs(args.batch, args.tokens, dtype, MASK_DTYPES[args.mask_dtype] or dtype, args.noise, args.seed)
    device = torch.device(args.device)
    if device.type != "cpu":
        x = Inputs(**{k: v.to(device) for k, v in vars(x).items()})

    # What the inputs look like: the clip fractions policy_loss reports (so we know the clip branches are exercised).
    m = policy_loss(PRESETS[PRESET].objective, x.logp0.clone().requires_grad_(True), x.old_logp, None, x.adv,
                    x.mask).metrics
    _, ppo_clipfrac = ppo_clip_loss(x.logp0, x.old_logp, x.adv_bt, x.mask, 0.2, 0.28)
    cands = build_candidates(x, args.all_forms)

    print(f"torch {torch.__version__} | {platform.python_implementation()} {platform.python_version()} | "
          f"{platform.machine()} | cpus {os.cpu_count()} | torch threads {torch.get_num_threads()} | device {device}")
    print(f"inputs: B={args.batch} T={args.tokens} dtype={args.dtype} mask={args.mask_dtype} "
          f"valid tokens={int(m['n_tokens'])} "
          f"({m['n_tokens'] / (args.batch * args.tokens):.0%}) | noise std {args.noise} | "
          f"adv>=0 on {int((x.adv >= 0).sum())}/{args.batch} rows")
    print(f"        preset clipfrac={m['clipfrac']:.3f} (high {m['clipfrac_high']:.3f}, low {m['clipfrac_low']:.3f}, "
          f"dual {m['clipfrac_dual']:.4f}) | PPO clipfrac={float(ppo_clipfrac):.3f}")
    print(f"timing: {args.warmup} warm-up + {args.repeats} timed forward+backward per candidate, "
          f"{len(cands)} candidates round-robin\n")

    measure(cands, x.logp0, args.warmup, args.repeats)

    res = {c.name: stats(c.times_ms) for c in cands}
    base = res[BASELINE]["median_ms"]
    w = max(len(c.name) for c in cands)
    print(f"{'config':<{w}}  {'median ms':>9}  {'p10':>7}  {'p90':>7}  {'vs PPO':>6}  description")
    for c in cands:
        s = res[c.name]
        print(f"{c.name:<{w}}  {s['median_ms']:>9.3f}  {s['p10_ms']:>7.3f}  {s['p90_ms']:>7.3f}  "
              f"{s['median_ms'] / base:>5.2f}x  {c.description}")
    ratio = res[PRESET]["median_ms"] / base
    # The per-repeat ratio (same round of the round-robin) is less sensitive to slow drifts of the machine.
    paired = [a / b for a, b in zip(cands[0].times_ms, cands[1].times_ms, strict=True)]
    verdict = "OK" if ratio <= GOAL else "ABOVE GOAL"
    print(f"\nRPG-REINFORCE-URKL dual-clip / PPO clip = {ratio:.2f}x (goal <= {GOAL}x) [{verdict}]; "
          f"per-repeat ratio median {statistics.median(paired):.2f}x "
          f"(p10 {quantile(paired, 0.1):.2f}x, p90 {quantile(paired, 0.9):.2f}x)")

    if args.json:
        out = {
            "args": vars(args),
            "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "argv": sys.argv},
            "inputs": {"valid_tokens": int(m["n_tokens"]), "preset_clipfrac": m["clipfrac"],
                       "ppo_clipfrac": float(ppo_clipfrac)},
            "results": {c.name: {**res[c.name], "ratio_vs_ppo": res[c.name]["median_ms"] / base,
                                 "description": c.description, "times_ms": c.times_ms} for c in cands},
            "headline": {"name": f"{PRESET} / {BASELINE}", "ratio": ratio, "goal": GOAL, "ok": ratio <= GOAL,
                         "paired_ratio_median": statistics.median(paired)},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
