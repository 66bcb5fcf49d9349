"""The training loop (spec §4-§6): sample, reward, advantages, K passes of mini-batch updates with
``policy_loss``, reference refresh, periodic evaluation; checkpoints with exact resume; one MLflow run.

One step of ``Trainer``:

    prompts  -> rollout (n samples each)                          rollout.Generator
             -> rewards (+ DAPO overlong shaping, group filter)    rewards
             -> log pi_old, log pi_ref (forward pass, spec §2.8)  rollout.token_logprobs
             -> advantages A (group-relative, spec §4.5)          objectives.compute_advantages
             -> for K epochs, for each mini-batch: accumulate micro-batch gradients of
                objectives.policy_loss, clip, AdamW step          (one optimizer step per mini-batch)
             -> reference refresh (iterative every N steps | fixed initial model, spec §5)

Runs unchanged under ``accelerate launch`` (DDP, gloo on CPU): each process samples its share of the prompts,
the loss is normalised by all-reduced token/sequence counts, so the gradient is that of the global loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rpg_core import data as data_mod
from rpg_core import evaluation
from rpg_core import rewards as rewards_mod
from rpg_core.config import Device, GeneratorKind, Precision, RunConfig, Schedule, Task
from rpg_core.models import load_model, load_tokenizer
from rpg_core.objectives import Form, compute_advantages, policy_loss, reward_kl_penalty
from rpg_core.objectives.aggregation import aggregate
from rpg_core.objectives.config import Aggregation
from rpg_core.rollout import (
    Generator,
    HFGenerator,
    PrefixSharingGenerator,
    RolloutBatch,
    SamplingParams,
    build_batch,
    mix_seed,
    token_logprobs,
)

__all__ = ["NonFiniteError", "Trainer", "TrainResult", "heldout_eval"]

EvalHook = Callable[["Trainer", int], dict[str, float]]
CHECKPOINT_MARKER = "COMPLETE"


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stops and the last good checkpoint is kept."""


GENERATORS = {GeneratorKind.PREFIX: PrefixSharingGenerator, GeneratorKind.HF: HFGenerator}


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str | None
    step: int
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Prompt:
    problem: data_mod.Problem
    ids: list[int]


class Trainer:
    """One training run of ``cfg``. ``fit()`` runs (or resumes) it to ``cfg.train.steps``."""

    def __init__(self, cfg: RunConfig, *, eval_hook: EvalHook | None = None, resume: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.key = cfg.key()
        # cpu=True without a GPU selects gloo under `accelerate launch` (infra/accelerate/cpu_2proc.yaml).
        self.acc = Accelerator(cpu=cfg.train.device is Device.CPU or not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        if cfg.rollout.prompts_per_step % self.world:
            raise ValueError(
                f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the number of "
                f"processes ({self.world})"
            )
        if cfg.train.deterministic:  # else index/scatter backward kernels sum in a varying order (tests caught it)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.autocast = torch.bfloat16 if cfg.model.precision is Precision.BF16 else None
        self.run_dir = Path(cfg.train.output_dir) / self.key
        self.ckpt_dir = self.run_dir / "checkpoints"

        # Data first: a bad dataset or benchmark fails before the model is loaded.
        self.train_problems, self.eval_problems = _load_problems(cfg)
        ev = cfg.evaluation
        self.benchmarks = [
            evaluation.load_benchmark(b, data_dir=ev.data_dir, limit=ev.limit) for b in ev.benchmarks
        ]
        self.tok = load_tokenizer(cfg.model.name)
        self.example = data_mod.arithmetic_example(cfg.data.level) if cfg.data.task is Task.ARITHMETIC else None
        _seed_everything(cfg.train.seed)
        model = load_model(cfg.model.name, dtype=torch.float32, device="cpu", seed=cfg.train.seed)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True  # for generate; the training forward passes use_cache=False
        self.ref_model: torch.nn.Module | None = None
        if cfg.uses_reference:  # a fixed initial model, or a reference lagging by ref_refresh_every steps
            self.ref_model = _frozen_copy(model)
        decay, no_decay = _param_groups(model)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
        )
        self.model, self.opt = self.acc.prepare(model, opt)
        if self.ref_model is not None:
            self.ref_model.to(self.acc.device)
        gen_cls = GENERATORS[cfg.rollout.generator]
        self.generator: Generator = gen_cls(
            self.acc.unwrap_model(self.model), self.tok, batch_size=cfg.rollout.batch_size, autocast=self.autocast
        )
        self.scorer = rewards_mod.MathVerifyScorer() if cfg.reward.rule == rewards_mod.AnswerRule.MATH_VERIFY else None
        self.eval_hook = eval_hook if eval_hook is not None else heldout_eval
        self.step = 0
        self.cursor = 0  # training prompts consumed so far (epoch-wise shuffled order)
        self.history: list[dict[str, float]] = []
        self.best_eval: float | None = None
        self.best_metrics: dict[str, list[float]] = {}  # benchmark metric -> [best value, its step] ("Best", §8)
        self.run_id: str | None = None
        self._prompt_cache: dict[int, list[int]] = {}
        if resume:
            self._maybe_resume()
        self.tracker = self._start_tracker()

    # -- data ------------------------------------------------------------------------------------------------

    def _prompt_ids(self, problem: data_mod.Problem) -> list[int]:
        msgs = data_mod.build_messages(
            problem,
            data_mod.PromptTemplate(self.cfg.data.template),
            *((self.example[0], self.example[1]) if self.example else ()),
        )
        text = data_mod.render_prompt(self.tok, msgs, chat_template=self.cfg.data.chat_template)
        ids = self.tok(text, add_special_tokens=not self.cfg.data.chat_template)["input_ids"]
        return ids[-self.cfg.data.max_prompt_tokens :]  # left truncation (spec §8)

    def _next_prompts(self, k: int) -> list[_Prompt]:
        """The next ``k`` training prompts of a seeded, per-epoch shuffled order (same on every process)."""
        out = []
        n = len(self.train_problems)
        for _ in range(k):
            epoch, i = divmod(self.cursor, n)
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            idx = int(torch.randperm(n, generator=g)[i])
            self.cursor += 1
            if idx not in self._prompt_cache:
                self._prompt_cache[idx] = self._prompt_ids(self.train_problems[idx])
            out.append(_Prompt(self.train_problems[idx], self._prompt_cache[idx]))
        return out

    # -- one step --------------------------------------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule is Schedule.CONSTANT:
            return 1.0
        span = max(1, self.cfg.train.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _rollout(self) -> tuple[list[_Prompt], list[list[int]], list[int], list[str], list[rewards_mod.Score], dict]:
        """Sample, score and (with dynamic sampling) filter; returns this process's kept samples."""
        cfg, r = self.cfg, self.cfg.rollout
        params = SamplingParams(r.n, r.temperature, r.top_p, r.top_k, r.max_new_tokens)
        local = r.prompts_per_step // self.world
        kept_p: list[_Prompt] = []
        kept: list[tuple[list[int], str, rewards_mod.Score, int]] = []
        stats = {"rounds": 0, "groups_seen": 0, "groups_mixed": 0, "acc_sum": 0.0, "samples": 0}
        rounds = cfg.reward.max_gen_rounds if cfg.reward.dynamic_sampling else 1
        for _ in range(rounds):
            prompts = self._next_prompts(r.prompts_per_step)[self.rank :: self.world]
            samples = self.generator.generate([p.ids for p in prompts], params)
            stats["rounds"] += 1
            for p, group in zip(prompts, samples, strict=True):
                texts = self.tok.batch_decode(group, skip_special_tokens=True)
                scores = rewards_mod.score_responses(
                    rewards_mod.AnswerRule(cfg.reward.rule), texts, [p.problem.answer] * len(texts), scorer=self.scorer
                )
                accs = [s.acc for s in scores]
                mixed = len(set(accs)) > 1
                stats["groups_seen"] += 1
                stats["groups_mixed"] += int(mixed)
                stats["acc_sum"] += sum(accs)
                stats["samples"] += len(accs)
                if cfg.reward.dynamic_sampling and not mixed:
                    continue  # DAPO group filter (spec §6.2)
                if len(kept_p) < local:
                    gid = len(kept_p)
                    kept_p.append(p)
                    kept += [(ids, t, s, gid) for ids, t, s in zip(group, texts, scores, strict=True)]
            done = len(kept_p) >= local
            if self.world > 1:  # every process must agree on whether to sample another round
                done = bool(self._allreduce(torch.tensor(float(done)), "min"))
            if done:
                break
        if self.world > 1:  # equal local batch sizes keep DDP's collective calls in step
            n_keep = int(self._allreduce(torch.tensor(float(len(kept_p))), "min"))
            kept_p, kept = kept_p[:n_keep], [k for k in kept if k[3] < n_keep]
        responses = [k[0] for k in kept]
        texts = [k[1] for k in kept]
        scores = [k[2] for k in kept]
        gids = [k[3] for k in kept]
        return kept_p, responses, gids, texts, scores, stats

    def train_step(self) -> dict[str, float]:
        """One training step (rollout + K epochs of updates). Returns its metrics (averaged over processes)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cfg.optim.lr * self._lr_factor(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        # Sampling randomness is a function of (seed, step, rank) only, so a resumed run samples what an
        # uninterrupted one would have.
        torch.manual_seed(mix_seed(cfg.train.seed, self.step, self.rank))
        prompts, responses, gids, texts, scores, ds = self._rollout()
        t_rollout = time.perf_counter() - t0

        m: dict[str, float] = {
            "lr": lr,
            "ds/rounds": ds["rounds"],
            "ds/groups_mixed": ds["groups_mixed"] / max(1, ds["groups_seen"]),
            "acc/sampled": ds["acc_sum"] / max(1, ds["samples"]),  # every sample drawn, before the group filter
        }
        if not responses:  # dynamic sampling kept nothing: no update this step
            m.update({"ds/kept_groups": 0.0, "time/step": time.perf_counter() - t0})
            return m
        batch = build_batch([prompts[g].ids for g in gids], responses, gids, self.tok.pad_token_id)
        mask = batch.response_mask.to(self.acc.device)
        lengths = [len(x) for x in responses]
        base = torch.tensor([s.score for s in scores], dtype=torch.float32)
        if cfg.reward.overlong_shaping:  # DAPO overlong reward shaping (spec §6.2)
            pen = [
                rewards_mod.overlong_penalty(
                    n, max_len=cfg.rollout.max_new_tokens, buffer_len=cfg.overlong_buffer, factor=cfg.reward.overlong_factor
                )
                for n in lengths
            ]
            reward = base + torch.tensor(pen, dtype=torch.float32)
        else:
            reward = base

        # log pi_old and log pi_ref, recomputed in a forward pass (spec §2.8). With a single optimizer step per
        # rollout the update's own forward pass runs at theta = theta_old, so pi_old is its detached log-prob
        # (w = 1 exactly, spec §5) and the extra pass is skipped.
        t1 = time.perf_counter()
        n_updates = cfg.algorithm.epochs * cfg.algorithm.mini_batches
        old_logp = self._logprobs(self.acc.unwrap_model(self.model), batch) if n_updates > 1 else None
        ref_logp = self._logprobs(self.ref_model, batch) if self.ref_model is not None else None
        if cfg.objective.form is Form.REWARD and cfg.objective.beta > 0:
            # KL in the reward (spec §6.4): token-level rewards, outcome on the last token.
            old_for_kl = old_logp if old_logp is not None else self._logprobs(self.acc.unwrap_model(self.model), batch)
            kl_pen = reward_kl_penalty(cfg.objective, old_for_kl, ref_logp if ref_logp is not None else old_for_kl, mask)
            tok_reward = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            last = mask.long().sum(-1).clamp(min=1) - 1
            tok_reward[torch.arange(len(batch)), last] = reward.to(mask.device)
            adv_in = tok_reward - kl_pen.float()
        else:
            adv_in = reward.to(mask.device)
        adv = compute_advantages(cfg.algorithm.advantage, adv_in, batch.group_ids.to(mask.device), mask)
        t_logprob = time.perf_counter() - t1

        t2 = time.perf_counter()
        upd = self._update(batch, mask, adv, old_logp, ref_logp)
        t_update = time.perf_counter() - t2
        if self.ref_model is not None and cfg.algorithm.reference.value == "iterative":
            if (self.step + 1) % cfg.algorithm.ref_refresh_every == 0:  # pi_ref <- pi_theta (spec §5)
                self.ref_model.load_state_dict(self.acc.unwrap_model(self.model).state_dict())
        self.generator.load_weights(self.acc.unwrap_model(self.model))

        accs = torch.tensor([float(s.acc) for s in scores])
        lenient = rewards_mod.score_responses(
            rewards_mod.AnswerRule.LENIENT, texts, [prompts[g].problem.answer for g in gids]
        )
        fmt = torch.tensor([float(s.pred != "[INVALID]") for s in scores])
        lens = torch.tensor(lengths, dtype=torch.float32)
        n_tok = float(batch.attention_mask.sum())
        step_time = time.perf_counter() - t0
        m.update(
            {
                "reward/mean": float(reward.mean()),
                "reward/std": float(reward.std()) if len(reward) > 1 else 0.0,
                "acc/strict": float(accs.mean()),
                "acc/lenient": float(torch.tensor([float(s.acc) for s in lenient]).mean()),
                "acc/format": float(fmt.mean()),
                "response_length/mean": float(lens.mean()),
                "response_length/max": float(lens.max()),
                "response_length/clip_frac": float((lens >= cfg.rollout.max_new_tokens).float().mean()),
                "adv/abs_mean": float(adv.abs().sum() / mask.sum()),
                "ds/kept_groups": float(len(prompts)),
                "time/rollout": t_rollout,
                "time/logprob": t_logprob,
                "time/update": t_update,
                "time/step": step_time,
                "perf/tokens_per_s": n_tok / step_time,
                "perf/gen_tokens_per_s": float(lens.sum()) / max(t_rollout, 1e-9),
                **upd,
            }
        )
        if self.world > 1:
            m = self._reduce_metrics(m)
        self._last_samples = [
            {"step": self.step, "problem": prompts[g].problem.problem, "answer": prompts[g].problem.answer,
             "completion": t, "pred": s.pred, "reward": float(rw), "acc": s.acc}
            for g, t, s, rw in list(zip(gids, texts, scores, reward.tolist(), strict=True))[: cfg.train.log_samples]
        ]  # fmt: skip
        return m

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        out = []
        mb = self.cfg.algorithm.micro_batch_size
        with torch.no_grad():
            for i in range(0, len(batch), mb):
                idx = torch.arange(i, min(i + mb, len(batch)))
                lp = token_logprobs(model, batch.select(idx), autocast=self.autocast)[0]
                out.append(torch.nn.functional.pad(lp, (0, batch.response_mask.shape[1] - lp.shape[1])))
        return torch.cat(out)

    def _update(
        self, batch: RolloutBatch, mask: Tensor, adv: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None
    ) -> dict[str, float]:
        """K epochs over ``mini_batches`` optimizer steps, each accumulated over micro-batches so the gradient is
        exactly that of the mini-batch's aggregated loss (a global token-mean, not a mean of micro-batch means)."""
        cfg, a = self.cfg, self.cfg.algorithm
        b = len(batch)
        self._full_t = batch.response_mask.shape[1]
        mb_size = b // a.mini_batches if b >= a.mini_batches else b
        sums: dict[str, float] = {}
        weight_total = 0.0
        maxes = {"ratio_max": -math.inf}
        mins = {"ratio_min": math.inf}
        grad_norms, ent_sum, ent_n = [], 0.0, 0.0
        self.model.train()
        for epoch in range(a.epochs):
            g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, self.step, epoch + 1))
            order = torch.arange(b)
            if a.epochs * a.mini_batches > 1:  # shuffle whole groups, so micro-batches keep sharing prompt passes
                gids = batch.group_ids
                perm = torch.unique(gids)[torch.randperm(len(torch.unique(gids)), generator=g)]
                order = torch.cat([torch.nonzero(gids == x).flatten() for x in perm])
            for start in range(0, b, mb_size):
                mb = order[start : start + mb_size]
                denom = self._denominator(mask[mb])
                micro = [mb[i : i + a.micro_batch_size] for i in range(0, len(mb), a.micro_batch_size)]
                for j, idx in enumerate(micro):
                    sync = contextlib.nullcontext() if j == len(micro) - 1 else self.acc.no_sync(self.model)
                    with sync:
                        sub = batch.select(idx)  # response columns cut to this micro-batch's longest response
                        logp, ent = token_logprobs(self.model, sub, autocast=self.autocast, with_entropy=epoch == 0)
                        t = logp.shape[1]
                        sub_mask = mask[idx, :t]
                        old = old_logp[idx, :t] if old_logp is not None else logp.detach()
                        ref = ref_logp[idx, :t] if ref_logp is not None else None
                        out = policy_loss(cfg.objective, logp, old, ref, adv[idx, :t], sub_mask)
                        loss = self._micro_loss(out.per_token, sub_mask, denom)
                        if not torch.isfinite(loss):
                            raise NonFiniteError(f"step {self.step}: the loss is {float(loss.detach())} (epoch {epoch})")
                        self.acc.backward(loss)
                    w = float(sub_mask.sum())
                    weight_total += w
                    for k, v in out.metrics.items():
                        if k in ("ratio_max",):
                            maxes[k] = max(maxes[k], v)
                        elif k in ("ratio_min",):
                            mins[k] = min(mins[k], v)
                        elif k != "n_tokens":
                            sums[k] = sums.get(k, 0.0) + v * w
                    if ent is not None:
                        ent_sum += float(ent.sum())
                        ent_n += w
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
                gn = float(self.acc.clip_grad_norm_(self.model.parameters(), clip))
                if not math.isfinite(gn):
                    self.opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"step {self.step}: the gradient norm is {gn} (epoch {epoch})")
                grad_norms.append(gn)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        out_m = {f"actor/{k}": v / max(weight_total, 1.0) for k, v in sums.items()}
        out_m.update({f"actor/{k}": v for k, v in {**maxes, **mins}.items()})
        out_m["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out_m["actor/entropy"] = ent_sum / max(ent_n, 1.0)
        out_m["actor/updates"] = float(len(grad_norms))
        return out_m

    def _denominator(self, mask: Tensor) -> float:
        """The mini-batch's normaliser over all processes: valid tokens (token-mean) or sequences (seq-mean)."""
        agg = self.cfg.objective.agg
        if agg is Aggregation.TOKEN_MEAN:
            local = mask.sum().float()
        elif agg is Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
            return 1.0
        else:
            local = (mask.sum(-1) > 0).sum().float()
        return float(self._allreduce(local, "sum")) if self.world > 1 else float(local)

    def _micro_loss(self, per_token: Tensor, mask: Tensor, denom: float) -> Tensor:
        """This micro-batch's share of the mini-batch loss, from the one ``aggregate`` definition. DDP averages
        gradients over processes, hence the factor ``world``."""
        o = self.cfg.objective
        # Dr. GRPO's constant horizon defaults to the rollout batch's padded T, not the trimmed micro-batch's.
        agg = aggregate(per_token, mask, o.agg, o.agg_norm_len or self._full_t)
        if o.agg is Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
            share = 1.0
        elif o.agg is Aggregation.TOKEN_MEAN:
            share = float(mask.sum()) / denom
        else:
            share = float((mask.sum(-1) > 0).sum()) / denom
        return agg * share * self.world

    # -- distributed helpers --------------------------------------------------------------------------------

    def _allreduce(self, t: Tensor, op: str) -> Tensor:
        import torch.distributed as dist

        t = t.to(self.acc.device).clone()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.cpu()

    def _reduce_metrics(self, m: dict[str, float]) -> dict[str, float]:
        names = sorted(m)
        t = torch.tensor([m[k] for k in names], dtype=torch.float64)
        mean = self._allreduce(t, "sum") / self.world
        hi = self._allreduce(t, "max")
        lo = self._allreduce(t, "min")
        out = {}
        for i, k in enumerate(names):
            if k.endswith("_max") or k.endswith("/max") or k.startswith("time/"):
                out[k] = float(hi[i])
            elif k.endswith("_min"):
                out[k] = float(lo[i])
            elif k.startswith("perf/"):
                out[k] = float(mean[i]) * self.world  # throughput of all processes together
            else:
                out[k] = float(mean[i])
        return out

    # -- the run ---------------------------------------------------------------------------------------------

    def fit(self, *, stop_after: int | None = None) -> TrainResult:
        """Train to ``cfg.train.steps`` (from the resumed step). ``stop_after`` ends the process's work early
        after that many steps of this call (used to simulate an interruption)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        status = "FAILED"
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"rpg {self.key}", disable=not self.is_main,
                   dynamic_ncols=True, leave=True)  # fmt: skip
        done_here = 0
        try:
            evaluates = cfg.train.eval_every and (self.eval_problems or self.benchmarks)
            if self.step == 0 and evaluates:
                self._evaluate(0)
            while self.step < cfg.train.steps:
                m = self.train_step()
                self.step += 1
                m["step"] = float(self.step)
                self.history.append(m)
                if evaluates and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps):
                    m.update(self._evaluate(self.step))
                self.tracker.log_metrics({k: v for k, v in m.items() if k != "step"}, step=self.step)
                if self.is_main and cfg.train.log_samples and getattr(self, "_last_samples", None):
                    self.tracker.log_table(self._last_samples, f"samples/step_{self.step:05d}.json")
                bar.update(1)
                if self.is_main:
                    bar.write(_log_line(self.step, cfg.train.steps, m))
                out_of_time = cfg.train.max_minutes is not None and (
                    time.perf_counter() - t_start > 60 * cfg.train.max_minutes
                )
                last = self.step == cfg.train.steps
                if last or out_of_time or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                    self.save_checkpoint()
                done_here += 1
                if out_of_time:
                    self.tracker.set_tags({"stopped": f"max_minutes={cfg.train.max_minutes} at step {self.step}"})
                    break
                if stop_after is not None and done_here >= stop_after:
                    status = "KILLED"
                    return TrainResult(self.run_dir, self.run_id, self.step, self.history)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except NonFiniteError as e:
            self.tracker.set_tags({"error": str(e)[:4000]})
            raise
        except BaseException as e:
            self.tracker.set_tags({"error": f"{type(e).__name__}: {e}"[:4000]})
            raise
        finally:
            bar.close()
            self.tracker.finish(status=status)
            if self.scorer is not None:
                self.scorer.close()
        return TrainResult(self.run_dir, self.run_id, self.step, self.history)

    def _evaluate(self, step: int) -> dict[str, float]:
        """The held-out hook (main process) and the benchmark evaluation (all processes share the samples), with
        "Best" (the maximum over evaluations so far, step 0 included) and "Last" tracked as the paper reports
        them (spec §8). Returns the metrics to log at ``step``."""
        res: dict[str, float] = {}
        if self.is_main and self.eval_problems:
            rng = torch.get_rng_state()
            res = {f"eval/{k}": v for k, v in self.eval_hook(self, step).items()}
            torch.set_rng_state(rng)
            main = res.get("eval/acc_strict")
            if main is not None:
                self.best_eval = main if self.best_eval is None else max(self.best_eval, main)
                res["eval/best_acc_strict"] = self.best_eval
        if self.benchmarks:
            res.update(self._benchmark_eval(step))
        if self.is_main and step == 0:
            self.tracker.log_metrics(res, step=0)
        self.acc.wait_for_everyone()
        return res

    def _benchmark_eval(self, step: int) -> dict[str, float]:
        from accelerate.utils import gather_object

        ev = self.cfg.evaluation
        result = evaluation.evaluate(
            self.acc.unwrap_model(self.model), self.tok, self.benchmarks, ev,
            max_new_tokens=ev.max_new_tokens or self.cfg.rollout.max_new_tokens, autocast=self.autocast,
            generator_cls=GENERATORS[self.cfg.rollout.generator], rank=self.rank, world=self.world,
            gather=gather_object, progress=self.is_main, model_label=f"{self.cfg.model.name} @ step {step}",
        )  # fmt: skip
        if not self.is_main:
            return {}
        metrics = result.metrics("eval/")
        out = {**metrics, **evaluation.update_best(self.best_metrics, metrics, step)}
        evaluation.log_eval(self.tracker, result, step=step, log_samples=ev.log_samples, metrics=False)
        summary = evaluation.best_last(self.best_metrics, metrics, step)
        self.tracker.log_dict(summary, "eval/best_last.json")
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Atomically write model, optimizer, reference (if lagged) and loop state; keep the last few."""
        self.acc.wait_for_everyone()
        path = self.ckpt_dir / f"step_{self.step:06d}"
        weights = self.acc.get_state_dict(self.model)  # a collective under FSDP: every process calls it
        if self.is_main:
            tmp = self.ckpt_dir / f".tmp_step_{self.step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(weights, tmp / "model.pt")
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
            if self.ref_model is not None and self.cfg.algorithm.reference.value == "iterative":
                torch.save(self.ref_model.state_dict(), tmp / "ref_model.pt")
            state = {
                "step": self.step,
                "cursor": self.cursor,
                "run_id": self.run_id,
                "config_key": self.key,
                "best_eval": self.best_eval,
                "best_metrics": self.best_metrics,
                "history": self.history,
                "python_rng": _jsonable_rng(random.getstate()),
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            (tmp / CHECKPOINT_MARKER).write_text("ok\n")
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            for old in sorted(_complete_checkpoints(self.ckpt_dir))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        self.acc.wait_for_everyone()
        return path

    def _maybe_resume(self) -> None:
        ckpts = sorted(_complete_checkpoints(self.ckpt_dir)) if self.ckpt_dir.is_dir() else []
        if not ckpts:
            return
        path = ckpts[-1]
        state = json.loads((path / "state.json").read_text())
        if state["config_key"] != self.key:
            raise RuntimeError(f"checkpoint {path} belongs to config {state['config_key']}, not {self.key}")
        model = self.acc.unwrap_model(self.model)
        model.load_state_dict(torch.load(path / "model.pt", map_location=self.acc.device, weights_only=True))
        self.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.acc.device, weights_only=True))
        if (path / "ref_model.pt").exists() and self.ref_model is not None:
            self.ref_model.load_state_dict(torch.load(path / "ref_model.pt", map_location=self.acc.device))
        self.step, self.cursor, self.run_id = state["step"], state["cursor"], state["run_id"]
        self.best_eval, self.history = state["best_eval"], state["history"]
        self.best_metrics = state.get("best_metrics", {})
        random.setstate(_rng_from_json(state["python_rng"]))
        self.generator.load_weights(model)
        if self.is_main:
            print(f"resumed {self.key} from {path} (step {self.step}, MLflow run {self.run_id})", flush=True)

    # -- tracking --------------------------------------------------------------------------------------------

    def _start_tracker(self):
        from rpg_core.tracking import Tracker, flatten_params

        cfg = self.cfg
        t = cfg.tracking
        enabled = t.enabled and self.is_main
        params = flatten_params(cfg.model_dump(mode="json"))
        params["config_key"] = self.key
        tags = cfg.axis_tags()
        tags.update({"run_dir": str(self.run_dir.resolve()), "world_size": str(self.world), **t.tags})
        if t.parent_run_id and not self.run_id:  # a resumed run stays under the sweep run that started it
            tags["mlflow.parentRunId"] = t.parent_run_id  # shown nested under the sweep's run in the MLflow UI
        name = t.run_name or f"{cfg.method_name()}-{self.key}"
        tracker = Tracker(
            experiment=t.experiment,
            run_name=name,
            run_id=self.run_id,
            params=params,
            tags=tags,
            tracking_uri=t.tracking_uri,
            enabled=enabled,
            mutable=RunConfig.is_bookkeeping,
        )
        if enabled:
            self.run_id = tracker.run_id
            tracker.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        return tracker


# -- held-out evaluation (the default periodic hook) ------------------------------------------------------------


def heldout_eval(trainer: Trainer, step: int) -> dict[str, float]:
    """Strict (paper rule) and lenient accuracy of one sample per held-out problem at ``train.eval_temperature``.
    Seeded by step only, so every evaluation of a run is comparable and resumes reproduce it."""
    cfg = trainer.cfg
    probs = trainer.eval_problems
    torch.manual_seed(mix_seed(cfg.train.seed, 10**6 + step, 0))
    params = SamplingParams(1, cfg.train.eval_temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens)
    ids = [trainer._prompt_ids(p) for p in probs]
    outs = trainer.generator.generate(ids, params)
    texts = [trainer.tok.decode(o[0], skip_special_tokens=True) for o in outs]
    gts = [p.answer for p in probs]
    strict = rewards_mod.score_responses(rewards_mod.AnswerRule.PAPER, texts, gts)
    lenient = rewards_mod.score_responses(rewards_mod.AnswerRule.LENIENT, texts, gts)
    n = max(1, len(probs))
    return {
        "acc_strict": sum(s.acc for s in strict) / n,
        "acc_lenient": sum(s.acc for s in lenient) / n,
        "format": sum(s.pred != "[INVALID]" for s in strict) / n,
        "response_length": sum(len(o[0]) for o in outs) / n,
    }


# -- helpers ----------------------------------------------------------------------------------------------------


def _load_problems(cfg: RunConfig) -> tuple[list[data_mod.Problem], list[data_mod.Problem]]:
    d = cfg.data
    if d.task is Task.ARITHMETIC:
        return data_mod.arithmetic_split(data_mod.ArithmeticLevel(d.level), d.n_train, d.n_eval, cfg.train.seed)
    train = data_mod.load_problems(d.source, split=d.split, problem_key=d.problem_key, answer_key=d.answer_key, limit=d.limit)
    if d.eval_source:
        evals = data_mod.load_problems(d.eval_source, problem_key=d.problem_key, answer_key=d.answer_key, limit=d.n_eval)
    elif d.n_eval:
        if len(train) <= d.n_eval:
            raise ValueError(f"data.n_eval={d.n_eval} leaves no training problems out of {len(train)}")
        evals, train = train[-d.n_eval :], train[: -d.n_eval]
    else:
        evals = []
    if not train:
        raise ValueError(f"data.source={d.source!r} has no problems")
    return train, evals


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _param_groups(model: torch.nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Weight decay on matrices only (biases and norms excluded), as usual for AdamW on transformers."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay


def _complete_checkpoints(d: Path) -> list[Path]:
    return [p for p in d.glob("step_*") if (p / CHECKPOINT_MARKER).exists()]


def _jsonable_rng(state: Any) -> Any:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state: Any) -> Any:
    return (state[0], tuple(state[1]), state[2])


def _log_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for k, label, fmt in (
        ("reward/mean", "reward", "+.3f"),
        ("acc/strict", "acc", ".3f"),
        ("acc/lenient", "lenient", ".3f"),
        ("actor/kl_k3", "kl", ".2e"),
        ("actor/clipfrac", "clip", ".3f"),
        ("response_length/mean", "len", ".1f"),
        ("actor/grad_norm", "gnorm", ".3f"),
        ("eval/acc_strict", "eval", ".3f"),
        ("time/step", "s", ".1f"),
    ):
        if k in m:
            parts.append(f"{label} {format(m[k], fmt)}")
    return " | ".join(parts)
