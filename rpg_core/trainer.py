"""The training loop (spec §4-§6): sample, reward, advantages, K passes of mini-batch updates with
``policy_loss``, reference refresh, periodic evaluation; checkpoints with exact resume; one MLflow run.

One step of ``Trainer`` (``train_step``), each algorithm decision in the room that owns it:

    prompts  -> _rollout: n samples each, scored, DAPO group filter   rollout.Generator, rewards.group_filter
             -> log pi_old, log pi_ref (forward passes, spec §2.8)     rollout.batched_logprobs
             -> shape_rewards (overlong, KL in the reward, §6.2/§6.4)  objectives.shaping
             -> advantages A (group-relative, spec §4.5)               objectives.compute_advantages
             -> K epochs x mini_batches optimizer steps of policy_loss update.update
             -> reference refresh (iterative every N steps | fixed initial model, spec §5)

Runs unchanged under ``accelerate launch`` (DDP, gloo on CPU): each process samples its share of the prompts,
the loss is normalised by all-reduced token/sequence counts, so the gradient is that of the global loss.
"""

from __future__ import annotations

import math
import os
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rpg_core import checkpoints
from rpg_core import evaluation
from rpg_core import faults
from rpg_core import metrics as metrics_mod
from rpg_core import rewards as rewards_mod
from rpg_core.config import Device, Precision, RunConfig, Schedule
from rpg_core.models import load_model, load_tokenizer
from rpg_core.prompts import PromptStream, load_problems
from rpg_core.tracking import CHECKPOINT_TAG, STOPPED_TAG, stop_tags
from rpg_core.objectives import (
    CorrectionConfig,
    Overlong,
    ReferenceMode,
    RolloutCorrection,
    compute_advantages,
    correction_weights,
    kl_in_reward,
    mismatch_metrics,
    shape_rewards,
)
from rpg_core.rollout import (
    Generator,
    Rollout,
    RolloutBatch,
    SamplingParams,
    SyncedGenerator,
    batched_logprobs,
    make_generator,
    mix_seed,
    preflight,
)
from rpg_core.rollout.vllm import sync_tolerance
from rpg_core.update import NonFiniteError, UpdateBatch, update

__all__ = ["NonFiniteError", "SyncMismatchError", "Trainer", "TrainResult", "corrected_advantages", "device_label",
           "heldout_eval"]  # fmt: skip

EvalHook = Callable[["Trainer", int], dict[str, float]]


class SyncMismatchError(RuntimeError):
    """After a weight sync, the sampling engine's log-probs are further from the trainer's than
    ``rollout.vllm_sync_tolerance``: it samples from another policy than the one trained; the run stops."""


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str | None
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None  # the reason of a stop request it honoured (tracking.STOP_TAG, e.g. "pruned"), else None


class Trainer:
    """One training run of ``cfg``. ``fit()`` runs (or resumes) it to ``cfg.train.steps``. ``problems``: the run's
    (training, held-out) problems, when the caller has read them already (``rpg train`` does, before torch loads)."""

    def __init__(self, cfg: RunConfig, *, eval_hook: EvalHook | None = None, resume: bool = True,
                 problems: tuple[list, list] | None = None):  # fmt: skip
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.cfg = cfg
        self.key = cfg.key()  # the configuration (shared by its seeds)
        self.run_key = cfg.run_key()  # this run: the configuration and its seed
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
        self.run_dir = Path(cfg.train.output_dir) / self.run_key
        self.ckpt_dir = self.run_dir / checkpoints.FOLDER
        self._hold()

        # Data first: a bad dataset or benchmark fails before the model is loaded.
        self.train_problems, self.eval_problems = problems if problems is not None else load_problems(cfg)
        ev = cfg.evaluation
        self.benchmarks = [
            evaluation.load_benchmark(b, data_dir=ev.data_dir, limit=ev.limit) for b in ev.benchmarks
        ]
        fsdp = self.acc.state.fsdp_plugin.fsdp_version if self.acc.distributed_type is DistributedType.FSDP else None
        # the engine's refusals (vLLM not installed, vLLM under FSDP1) before any model loads
        preflight(cfg.rollout, world=self.world, fsdp=fsdp)
        self.tok = load_tokenizer(cfg.model.name)
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
        self.generator: Generator = make_generator(
            cfg.rollout.generator, self.policy, self.tok, batch_size=cfg.rollout.batch_size, autocast=self.autocast,
            rollout=cfg.rollout, max_len=cfg.sequence_budget,
        )
        # an engine with its own weights (vLLM): its log-probs come with the samples, each sync is checked
        self.synced = self.generator if isinstance(self.generator, SyncedGenerator) else None
        self.scorer = rewards_mod.MathVerifyScorer() if cfg.reward.rule == rewards_mod.AnswerRule.MATH_VERIFY else None
        self.eval_hook = eval_hook if eval_hook is not None else heldout_eval
        self.prompts = PromptStream(cfg, self.tok, self.train_problems)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_eval: float | None = None
        self.best_metrics: dict[str, list[float]] = {}  # benchmark metric -> [best value, its step] ("Best", §8)
        self.run_id: str | None = None
        if resume:
            self._maybe_resume()
        elif self.is_main and self.ckpt_dir.is_dir() and any(self.ckpt_dir.iterdir()):
            # --fresh: the old attempt's checkpoints move aside (kept, not deleted), so that a fresh run killed
            # early never resumes from them later (their step may be ahead of the fresh run's)
            aside = self.run_dir / f"{checkpoints.FOLDER}.before-fresh-{time.strftime('%Y%m%dT%H%M%S')}"
            self.ckpt_dir.rename(aside)
            print(f"rpg train --fresh: the earlier checkpoints of {self.run_key} moved to {aside}", flush=True)
        self.fresh = not resume
        self.tracker = _start_tracker(self)

    @property
    def policy(self) -> torch.nn.Module:
        """pi_theta itself (the DDP wrapper's module under several processes)."""
        return self.acc.unwrap_model(self.model)

    # -- one step --------------------------------------------------------------------------------------------

    def _rollout(self) -> Rollout:
        """Sample, score and (with dynamic sampling) filter groups until this process has its share of the step's
        prompts or the rounds run out (spec §6.2); returns this process's kept samples."""
        cfg, r = self.cfg, self.cfg.rollout
        local = r.prompts_per_step // self.world
        out = Rollout(engine_logps=[] if self.synced is not None else None)
        rounds = cfg.reward.max_gen_rounds if cfg.reward.dynamic_sampling else 1
        for i in range(rounds):
            # Sampling is a function of (seed, step, rank) only, so a resumed run samples what an uninterrupted
            # one would have; later rounds continue the engine's stream.
            seed = mix_seed(cfg.train.seed, self.step, self.rank) if i == 0 else None
            params = SamplingParams(r.n, r.temperature, r.top_p, r.top_k, r.max_new_tokens, seed=seed)
            prompts = self.prompts.next(r.prompts_per_step)[self.rank :: self.world]
            if self.synced is not None:
                samples, logps = self.synced.generate_logprobs([p.ids for p in prompts], params)
                flat_logps = [lp for group in logps for lp in group]
            else:
                samples = self.generator.generate([p.ids for p in prompts], params)
            gids = [g for g, group in enumerate(samples) for _ in group]
            flat = [ids for group in samples for ids in group]
            texts = self.tok.batch_decode(flat, skip_special_tokens=True)
            answers = [prompts[g].problem.answer for g in gids]
            scores = rewards_mod.score_responses(cfg.reward.rule, texts, answers, scorer=self.scorer)
            keep = rewards_mod.group_filter([s.acc for s in scores], gids)  # DAPO's filter (spec §6.2)
            st = out.stats
            st.rounds += 1
            st.groups_seen += len(prompts)
            st.groups_mixed += sum(keep[g * r.n] for g in range(len(prompts))) if r.n > 1 else 0
            st.acc_sum += sum(s.acc for s in scores)
            st.samples += len(scores)
            for g, p in enumerate(prompts):
                if (cfg.reward.dynamic_sampling and not keep[g * r.n]) or len(out.prompts) >= local:
                    continue
                out.prompts.append(p)
                rows = range(g * r.n, (g + 1) * r.n)
                out.responses += [flat[j] for j in rows]
                out.group_ids += [len(out.prompts) - 1] * r.n
                out.texts += [texts[j] for j in rows]
                out.scores += [scores[j] for j in rows]
                if out.engine_logps is not None:
                    out.engine_logps += [flat_logps[j] for j in rows]
            done = len(out.prompts) >= local
            if self.world > 1:  # every process must agree on whether to sample another round
                done = bool(self._allreduce(torch.tensor(float(done)), "min"))
            if done:
                break
        if self.world > 1:  # equal local batch sizes keep DDP's collective calls in step
            out = out.first_groups(int(self._allreduce(torch.tensor(float(len(out.prompts))), "min")))
        return out

    def train_step(self) -> dict[str, float]:
        """One training step (rollout + K epochs of updates). Returns its metrics (reduced over processes)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cfg.optim.lr * lr_factor(cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        # Sampling draws from the engine's own seeded stream; anything else random in the step (the dropout of
        # models that have it) is a function of (seed, step, rank) too, so resumes are exact.
        torch.manual_seed(mix_seed(cfg.train.seed, self.step, self.rank, 1))
        ro = self._rollout()
        if self.synced is not None:  # its memory to the log-prob passes and the update; load_weights wakes it
            self.synced.sleep()
        t_rollout = time.perf_counter() - t0
        st = ro.stats
        m: dict[str, float] = {
            "lr": lr,
            "ds/rounds": st.rounds,
            "ds/groups_mixed": st.groups_mixed / max(1, st.groups_seen),
            "acc/sampled": st.acc_sum / max(1, st.samples),  # every sample drawn, before the group filter
        }
        if not ro.responses:  # dynamic sampling kept nothing: no update this step
            m.update({"ds/kept_groups": 0.0, "time/step": time.perf_counter() - t0})
            return m
        batch = ro.batch(self.tok.pad_token_id)
        mask = batch.response_mask.to(self.acc.device)

        # log pi_old and log pi_ref, recomputed in a forward pass (spec §2.8). With a single optimizer step per
        # rollout the update's own forward pass runs at theta = theta_old, so the update takes pi_old as its
        # detached log-prob (w = 1 exactly, spec §5) and the pass runs only if the KL in the reward needs it.
        t1 = time.perf_counter()
        several = cfg.algorithm.epochs * cfg.algorithm.mini_batches > 1
        old_logp = self._logprobs(self.policy, batch) if several or kl_in_reward(cfg.objective) else None
        # pi_old for the sampler-trainer mismatch (metrics, rollout.correction) of an engine with its own weights;
        # with a single optimizer step it is not passed to the update (which takes its own detached log-prob)
        sampling_logp = self._logprobs(self.policy, batch) if self.synced is not None and old_logp is None else old_logp
        engine_logp = ro.engine_logp_tensor(mask.shape[1])
        engine_logp = engine_logp.to(mask.device) if engine_logp is not None else None
        ref_logp = self._logprobs(self.ref_model, batch) if self.ref_model is not None else None
        overlong = Overlong(cfg.rollout.max_new_tokens, cfg.overlong_buffer, cfg.reward.overlong_factor)
        reward = shape_rewards(
            cfg.objective, torch.tensor([s.score for s in ro.scores], dtype=torch.float32), mask,
            overlong=overlong if cfg.reward.overlong_shaping else None, old_logp=old_logp, ref_logp=ref_logp,
        )  # fmt: skip
        adv = compute_advantages(cfg.algorithm.advantage, reward.advantage_input, batch.group_ids.to(mask.device), mask)
        pg_adv = adv  # the update's advantage: A, or A times the rollout correction's weights (per token)
        if engine_logp is not None:
            pg_adv, corrected = corrected_advantages(cfg.rollout.correction, adv, sampling_logp, engine_logp, mask)
            m.update(corrected)
        t_logprob = time.perf_counter() - t1

        t2 = time.perf_counter()
        upd = update(
            self.model, self.opt, cfg, UpdateBatch(batch, mask, pg_adv, old_logp if several else None, ref_logp),
            step=self.step, backend=self.acc, world=self.world, autocast=self.autocast,
            all_reduce_sum=lambda t: self._allreduce(t, "sum"),
        )  # fmt: skip
        t_update = time.perf_counter() - t2
        if self.ref_model is not None and cfg.algorithm.reference is ReferenceMode.ITERATIVE:
            if (self.step + 1) % cfg.algorithm.ref_refresh_every == 0:  # pi_ref <- pi_theta (spec §5)
                self.ref_model.load_state_dict(self.policy.state_dict())
        t3 = time.perf_counter()
        self.generator.load_weights(self.policy)
        if self.synced is not None:
            m.update(self._check_sync(ro, mask, sampling_logp, engine_logp))
            m["time/sync"] = time.perf_counter() - t3

        lens = torch.tensor([len(x) for x in ro.responses], dtype=torch.float32)
        step_time = time.perf_counter() - t0
        m.update(_sample_metrics(cfg, ro, reward.sequence, lens, adv, mask))
        m.update({"time/rollout": t_rollout, "time/logprob": t_logprob, "time/update": t_update, "time/step": step_time,
                  "perf/tokens_per_s": float(batch.attention_mask.sum()) / step_time,
                  "perf/gen_tokens_per_s": float(lens.sum()) / max(t_rollout, 1e-9), **upd})  # fmt: skip
        if self.world > 1:
            m = self._reduce_metrics(m)
        self._last_samples = _samples_table(self.step, ro, reward.sequence, cfg.train.log_samples)
        return m

    def _check_sync(self, ro: Rollout, mask: Tensor, trainer_old: Tensor, engine: Tensor) -> dict[str, float]:
        """An engine with its own weights, after the step's weight sync: the mean |engine - trainer| log-prob of a
        few of this step's tokens (``rollout.vllm_check_tokens``), both with the new weights (SyncMismatchError
        above ``rollout.vllm_sync_tolerance``); and the sampler-trainer mismatch of the step's samples (``engine``:
        the engine's log-probs at sampling time, vs the trainer's before the update, ``trainer_old``)."""
        r = self.cfg.rollout
        diff = self.synced.check(self.policy, [ro.prompts[g].ids for g in ro.group_ids], ro.responses,
                                 r.vllm_check_tokens)  # fmt: skip
        tol = sync_tolerance(r.vllm_sync_tolerance, self.cfg.model.precision)
        # Under DDP every process checks its own engine; they share their results first, so that one broken engine
        # stops every process at the same point with the same message, rather than one raising and the others
        # waiting in the next collective until the launcher kills them. (A NaN stays NaN in its own slot.)
        each = torch.zeros(self.world, dtype=torch.float64)
        each[self.rank] = diff
        each = (self._allreduce(each, "sum") if self.world > 1 else each).tolist()
        bad = {rank: d for rank, d in enumerate(each) if not d <= tol}  # NaN included
        if bad:
            default = "" if r.vllm_sync_tolerance is not None else f" (the {self.cfg.model.precision} default)"
            where = ("" if self.world == 1 else
                     f" of process {', '.join(map(str, bad))} (of {self.world})")  # fmt: skip
            shown = ", ".join(f"{d:.3g}" for d in bad.values())
            raise SyncMismatchError(
                f"step {self.step + 1}: after the weight sync the vLLM engine's log-probs{where} are {shown} (mean |Δ| "
                f"over {r.vllm_check_tokens} sampled tokens) from the trainer's, above rollout.vllm_sync_tolerance="
                f"{tol}{default}: it no longer samples the trained policy (docs/vllm.md)"
            )
        mm = mismatch_metrics(trainer_old, engine, mask)
        return {"rollout/sync_logp_abs_diff": diff, "rollout/mismatch_abs_logp_diff": mm.mean_abs_logp_diff,
                "rollout/mismatch_kl_k3": mm.kl_k3, "rollout/mismatch_share_outside": mm.share_outside}  # fmt: skip

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        return batched_logprobs(model, batch, self.cfg.algorithm.micro_batch_size, autocast=self.autocast)

    # -- distributed helpers --------------------------------------------------------------------------------

    def _allreduce(self, t: Tensor, op: str) -> Tensor:
        import torch.distributed as dist

        t = t.to(self.acc.device).clone()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.cpu()

    def _reduce_metrics(self, m: dict[str, float]) -> dict[str, float]:
        """Each metric by its declared reduction over processes (rpg_core.metrics)."""
        names = sorted(m)
        t = torch.tensor([m[k] for k in names], dtype=torch.float64)
        total, hi, lo = self._allreduce(t, "sum"), self._allreduce(t, "max"), self._allreduce(t, "min")
        by = {metrics_mod.Reduce.MEAN: total / self.world, metrics_mod.Reduce.SUM: total,
              metrics_mod.Reduce.MAX: hi, metrics_mod.Reduce.MIN: lo}  # fmt: skip
        return {k: float(by[metrics_mod.reduction(k)][i]) for i, k in enumerate(names)}

    # -- the run ---------------------------------------------------------------------------------------------

    def _hold(self) -> None:
        """One writer per run: the main process holds the run folder's lock while it trains (RunDirBusy if another
        process does); a live run is told from a lost one by it (runs.lost_runs). Released when fit() ends."""
        if self.is_main:
            from rpg_core.tracking import host_name

            lock = checkpoints.keep(self.run_dir, f"{os.getpid()} {host_name()}")
            # a Trainer that fails in __init__ (bad checkpoint, ...) or is dropped unfitted lets go of it too
            weakref.finalize(self, checkpoints.release, self.run_dir, lock)

    def fit(self, *, stop_after: int | None = None) -> TrainResult:
        """Train to ``cfg.train.steps`` (from the resumed step). ``stop_after`` ends the process's work early
        after that many steps of this call (used to simulate an interruption)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        status = "FAILED"
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=f"rpg {self.run_key}", disable=not self.is_main,
                   dynamic_ncols=True, leave=True)  # fmt: skip
        done_here = 0
        stopped: str | None = None
        self._hold()
        try:
            evaluates = cfg.train.eval_every and (self.eval_problems or self.benchmarks)
            if self.step == 0 and evaluates:
                self._evaluate(0)
            while self.step < cfg.train.steps:
                faults.point("step_start", self.step + 1)
                m = self.train_step()
                self.step += 1
                m["step"] = float(self.step)
                self.history.append(m)
                if evaluates and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps):
                    m.update(self._evaluate(self.step))
                self.tracker.log_metrics({k: v for k, v in m.items() if k != "step"}, step=self.step)
                faults.point("after_log", self.step)
                if self.is_main and cfg.train.log_samples and getattr(self, "_last_samples", None):
                    self.tracker.log_table(self._last_samples, f"samples/step_{self.step:05d}.json")
                bar.update(1)
                if self.is_main:
                    bar.write(_log_line(self.step, cfg.train.steps, m))
                out_of_time = cfg.train.max_minutes is not None and (
                    time.perf_counter() - t_start > 60 * cfg.train.max_minutes
                )
                last = self.step == cfg.train.steps
                saved = last or out_of_time or bool(
                    cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0
                )
                if saved:
                    self.save_checkpoint()
                    faults.point("after_checkpoint", self.step)
                done_here += 1
                # A coordinator's stop request (a tuner pruning this run), read once per step after the step is
                # logged, evaluated and checkpointed; a finished run has nothing left to stop.
                stopped = None if last else self._stop_request()
                if stopped is not None:
                    if not saved:
                        self.save_checkpoint()
                    self.tracker.set_tags(stop_tags(stopped, self.step))
                    break
                if out_of_time:
                    self.tracker.set_tags({STOPPED_TAG: f"max_minutes={cfg.train.max_minutes} at step {self.step}"})
                    break
                if stop_after is not None and done_here >= stop_after:
                    status = "KILLED"
                    return TrainResult(self.run_dir, self.run_id, self.step, self.history)
            status = "KILLED" if stopped is not None else "FINISHED"
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
            checkpoints.release(self.run_dir)
            if self.scorer is not None:
                self.scorer.close()
        return TrainResult(self.run_dir, self.run_id, self.step, self.history, stopped=stopped)

    def stop_at_step_end(self, why: str) -> None:
        """Stop cleanly after the current step: checkpoint, end the run KILLED, ``TrainResult.stopped == why`` (rpg
        train calls it on SIGTERM: a scheduler's preemption, ``kill``). Safe from a signal handler."""
        self._stop_signal = why

    def _stop_request(self) -> str | None:
        """The reason of a stop request on this run, or None: a signal this process got (``stop_at_step_end``), else
        the main process reads its run's tags (one MLflow read, bounded in time: ``Tracker.stop_requested``); every
        process gets the main one's answer, so all stop together at the same step."""
        reason = (getattr(self, "_stop_signal", None) or self.tracker.stop_requested()) if self.is_main else None
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            reason = broadcast_object_list([reason], from_process=0)[0]
        return reason

    def _evaluate(self, step: int) -> dict[str, float]:
        """The held-out hook (main process) and the benchmark evaluation (all processes share the samples), with
        "Best" (the maximum over evaluations so far, step 0 included) and "Last" tracked as the paper reports
        them (spec §8). Returns the metrics to log at ``step``."""
        res: dict[str, float] = {}
        if self.is_main and self.eval_problems:
            res = {f"eval/{k}": v for k, v in self.eval_hook(self, step).items()}
            main = res.get("eval/acc_strict")
            if main is not None:
                self.best_eval = main if self.best_eval is None else max(self.best_eval, main)
                res["eval/best_acc_strict"] = self.best_eval
            faults.point("eval", step)
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
            self.policy, self.tok, self.benchmarks, ev,
            max_new_tokens=ev.max_new_tokens or self.cfg.rollout.max_new_tokens, autocast=self.autocast,
            generator=self.generator, rank=self.rank, world=self.world,
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
        path = checkpoints.checkpoint_dir(self.run_dir, self.step)
        weights = self.acc.get_state_dict(self.model)  # a collective under FSDP: every process calls it
        if self.is_main:
            lagged = self.ref_model is not None and self.cfg.algorithm.reference is ReferenceMode.ITERATIVE
            state = {
                "step": self.step,
                "cursor": self.prompts.cursor,
                "run_id": self.run_id,
                "run_key": self.run_key,
                "config_key": self.key,
                "seed": self.cfg.train.seed,
                "best_eval": self.best_eval,
                "best_metrics": self.best_metrics,
                "history": self.history,
                "python_rng": checkpoints.rng_to_json(random.getstate()),
            }
            checkpoints.write(
                self.run_dir, self.step, model=weights, optimizer=self.opt.state_dict(),
                reference=self.ref_model.state_dict() if lagged else None, state=state,
                config_yaml=self.cfg.to_yaml(), keep=self.cfg.train.keep_checkpoints,
            )  # fmt: skip
            if getattr(self, "tracker", None) is not None:  # where a resume finds it: this step, on rpg.host's disk
                self.tracker.set_tags({CHECKPOINT_TAG: str(self.step)})
        self.acc.wait_for_everyone()
        return path

    def _maybe_resume(self) -> None:
        """Resume from the newest good checkpoint (``checkpoints.verify``: COMPLETE's manifest, every file's size and
        sha256, state.json and config.yaml parse; then it must load), saying which newer ones it skipped and why.
        None there: a fresh start; some there but none good: ValueError naming each with its reason."""
        skipped: list[tuple[Path, str]] = []
        for path, reason in checkpoints.good_first(self.run_dir):
            if reason is None:
                try:
                    self._resume_from(path)
                    break
                except _ForeignCheckpoint as e:  # never skipped: refused, one line and exit 2 in rpg train
                    raise ValueError(str(e)) from None
                except Exception as e:  # noqa: BLE001 - verified, yet torch (or the state) would not load: next one
                    reason = f"cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            skipped.append((path, reason))
            if self.is_main:
                print(f"skipped checkpoint {path}: {reason}", flush=True)
        else:
            if skipped:
                raise ValueError(
                    f"no good checkpoint to resume run {self.run_key} from: "
                    + "; ".join(f"{p} ({r})" for p, r in skipped)
                    + f"; move them out of {self.ckpt_dir}, or start this run afresh (rpg train --fresh)"
                )
            return
        if self.is_main:
            legacy = checkpoints.read_manifest(path) is None
            note = ", written before checksums were recorded: files, archives and state checked" if legacy else ""
            print(f"resumed {self.run_key} from {path} (step {self.step}, MLflow run {self.run_id}{note})", flush=True)

    def _resume_from(self, path: Path) -> None:
        """Load the checkpoint at ``path`` (verified) into the trainer: every file is read before anything is set,
        so a file that fails to load leaves the trainer as it was (raises _ForeignCheckpoint for another run's)."""
        state = checkpoints.read_state(path)
        found = state.get("run_key")
        if found != self.run_key:  # copied or moved here from another run's folder, or older than run keys
            of = f"run {found}" if found else f"config {state.get('config_key')} (a checkpoint without a run key)"
            raise _ForeignCheckpoint(
                f"checkpoint {path} belongs to {of}, not to this run {self.run_key} (config {self.key}, seed "
                f"{self.cfg.train.seed}); refusing to resume from it: move it to its own run's folder, or start this "
                "run afresh (rpg train --fresh)"
            )
        dev = self.acc.device
        model = checkpoints.load_tensors(path, checkpoints.MODEL, dev)
        opt = checkpoints.load_tensors(path, checkpoints.OPTIMIZER, dev)
        ref = checkpoints.load_tensors(path, checkpoints.REFERENCE, dev)
        loop = (state["step"], state["cursor"], state["run_id"], state["best_eval"], state["history"],
                state.get("best_metrics", {}), checkpoints.rng_from_json(state["python_rng"]))  # fmt: skip
        self.policy.load_state_dict(model)
        self.opt.load_state_dict(opt)
        if ref is not None and self.ref_model is not None:
            self.ref_model.load_state_dict(ref)
        random.setstate(loop[-1])
        self.step, self.prompts.cursor, self.run_id, self.best_eval, self.history, self.best_metrics = loop[:-1]
        self.generator.load_weights(self.policy)


class _ForeignCheckpoint(Exception):
    """A checkpoint of another run in this run's folder: refused, never skipped."""


# -- what a step logs ---------------------------------------------------------------------------------------------


def _sample_metrics(cfg: RunConfig, ro: Rollout, reward: Tensor, lens: Tensor, adv: Tensor, mask: Tensor) -> dict:
    """The step's rewards, accuracies, lengths and advantages of the trained samples (declared in rpg_core.metrics)."""
    lenient = rewards_mod.score_responses(rewards_mod.AnswerRule.LENIENT, ro.texts, ro.answers())
    accs = torch.tensor([float(s.acc) for s in ro.scores])
    fmt = torch.tensor([float(s.pred != rewards_mod.INVALID) for s in ro.scores])
    return {
        "reward/mean": float(reward.mean()),
        "reward/std": float(reward.std()) if len(reward) > 1 else 0.0,
        "acc/strict": float(accs.mean()),
        "acc/lenient": float(torch.tensor([float(s.acc) for s in lenient]).mean()),
        "acc/format": float(fmt.mean()),
        "response_length/mean": float(lens.mean()),
        "response_length/max": float(lens.max()),
        "response_length/clip_frac": float((lens >= cfg.rollout.max_new_tokens).float().mean()),
        "adv/abs_mean": float(adv.abs().sum() / mask.sum()),
        "ds/kept_groups": float(len(ro.prompts)),
    }


def corrected_advantages(
    cfg: CorrectionConfig, adv: Tensor, trainer_old: Tensor, engine_logp: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """The update's per-token advantage under ``rollout.correction`` and its metric: ``adv`` [B, T] itself with mode
    none (no metric), else ``adv * weights`` with ``objectives.correction_weights`` of the trainer's pi_old
    (``trainer_old``) and the engine's log-probs, and ``rollout/correction_share`` (the share of the valid tokens
    whose weight was truncated or masked). The weights reach the policy-gradient term only: ``policy_loss`` takes A
    there alone (objectives/correction.py); the KL term of the loss is never weighted."""
    if cfg.mode is RolloutCorrection.NONE:
        return adv, {}
    cw = correction_weights(cfg, trainer_old, engine_logp, mask)
    return adv * cw.weights, {"rollout/correction_share": cw.share_corrected}


def _samples_table(step: int, ro: Rollout, reward: Tensor, n: int) -> list[dict]:
    rows = list(zip(ro.group_ids, ro.texts, ro.scores, reward.tolist(), strict=True))[:n]
    return [{"step": step, "problem": ro.prompts[g].problem.problem, "answer": ro.prompts[g].problem.answer,
             "completion": t, "pred": s.pred, "reward": float(rw), "acc": s.acc} for g, t, s, rw in rows]  # fmt: skip


# -- the schedule ----------------------------------------------------------------------------------------------


def lr_factor(cfg: RunConfig, step: int) -> float:
    """The learning-rate schedule: linear warm-up, then constant or cosine decay (spec §7.1)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule is Schedule.CONSTANT:
        return 1.0
    span = max(1, cfg.train.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- held-out evaluation (the default periodic hook) ------------------------------------------------------------


HELDOUT_TABLE = "heldout_problems.json"  # eval/step_NNNNNN/heldout_problems.json: id, answer, correct, lenient, length


def heldout_eval(trainer: Trainer, step: int) -> dict[str, float]:
    """Strict (paper rule) and lenient accuracy of one sample per held-out problem at ``train.eval_temperature``.
    Seeded by step only, so every evaluation of a run is comparable and resumes reproduce it. Logs the per-problem
    table ``eval/step_NNNNNN/heldout_problems.json`` (strict ``correct`` as 0/1)."""
    cfg = trainer.cfg
    probs = trainer.eval_problems
    r = cfg.rollout
    seed = mix_seed(cfg.train.seed, 10**6 + step, 0)
    params = SamplingParams(1, cfg.train.eval_temperature, r.top_p, r.top_k, r.max_new_tokens, seed=seed)
    ids = [trainer.prompts.ids(p) for p in probs]
    outs = trainer.generator.generate(ids, params)
    texts = [trainer.tok.decode(o[0], skip_special_tokens=True) for o in outs]
    gts = [p.answer for p in probs]
    strict = rewards_mod.score_responses(rewards_mod.AnswerRule.PAPER, texts, gts)
    lenient = rewards_mod.score_responses(rewards_mod.AnswerRule.LENIENT, texts, gts)
    n = max(1, len(probs))
    if getattr(trainer, "tracker", None) is not None:  # per problem, for paired comparisons (dashboards): the same problems every run
        rows = [{"id": p.id, "answer": p.answer, "correct": float(s.acc), "lenient": float(le.acc),
                 "response_length": len(o[0])} for p, s, le, o in zip(probs, strict, lenient, outs)]  # fmt: skip
        trainer.tracker.log_table(rows, f"eval/step_{step:06d}/{HELDOUT_TABLE}")
    return {
        "acc_strict": sum(s.acc for s in strict) / n,
        "acc_lenient": sum(s.acc for s in lenient) / n,
        "format": sum(s.pred != rewards_mod.INVALID for s in strict) / n,
        "response_length": sum(len(o[0]) for o in outs) / n,
    }


# -- tracking --------------------------------------------------------------------------------------------------


def _start_tracker(trainer: Trainer):
    """The run's MLflow run (re-attached on resume; only the main process writes)."""
    from rpg_core.tracking import GPU_TAG, GROUP_TAG, HOST_TAG, RunKind, Tracker, flatten_params, host_name

    cfg = trainer.cfg
    t = cfg.tracking
    enabled = t.enabled and trainer.is_main
    params = flatten_params(cfg.model_dump(mode="json"))
    params["config_key"] = trainer.key
    tags = cfg.axis_tags()
    # The machine and device of this (re)start: a resume on another machine overwrites them.
    tags.update({GROUP_TAG: trainer.key, HOST_TAG: host_name(), GPU_TAG: device_label(trainer.acc.device)})
    tags.update({"run_dir": str(trainer.run_dir.resolve()), "world_size": str(trainer.world), **t.tags})
    if t.parent_run_id and not trainer.run_id:  # a resumed run stays under the sweep run that started it
        tags["mlflow.parentRunId"] = t.parent_run_id  # shown nested under the sweep's run in the MLflow UI
    name = t.run_name or f"{cfg.design_name()}-s{cfg.train.seed}"
    run_id = trainer.run_id
    id_file = trainer.run_dir / checkpoints.RUN_ID
    if run_id is None and enabled and not trainer.fresh and id_file.is_file():
        run_id = _unfinished_run(id_file.read_text().strip(), t.tracking_uri)  # killed before its first checkpoint
    tracker = Tracker(
        experiment=t.experiment,
        run_name=name,
        run_id=run_id,
        params=params,
        tags=tags,
        tracking_uri=t.tracking_uri,
        enabled=enabled,
        mutable=RunConfig.is_bookkeeping,
        kind=RunKind.TRAIN,
    )
    if enabled:
        resumed, trainer.run_id = run_id is not None, tracker.run_id
        if not resumed:
            id_file.write_text(tracker.run_id + "\n")
        try:
            if resumed:  # a stop request an earlier attempt honoured (or never saw) must not stop this one
                tracker.clear_stop()
                if tracker.previous_status == "RUNNING":  # this process holds the run's lock: that attempt is gone
                    print(f"run {trainer.run_key}: its previous attempt ended without a word (killed or lost); "
                          f"MLflow run {tracker.run_id} goes on from step {trainer.step}", flush=True)  # fmt: skip
            tracker.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        except BaseException as e:  # stopped (or failed) before fit() owns the run: it must not stay RUNNING
            tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    return tracker


def _unfinished_run(run_id: str, tracking_uri: str | None) -> str | None:
    """``run_id`` if that MLflow run (an attempt of this run killed before its first checkpoint) is there, active and
    not FINISHED, to go on in; else None (a new run): another store, deleted, or finished."""
    from rpg_core.runs import get_run

    try:
        row = get_run(run_id, tracking_uri=tracking_uri)
    except Exception:  # noqa: BLE001 - not a run of this store
        return None
    ok = row is not None and row["lifecycle"] == "active" and row["status"] != "FINISHED"
    return run_id if ok else None


def device_label(device: torch.device | str) -> str:
    """The device a run trains on, as tag ``rpg.gpu``: ``"cpu"``, or ``"cuda:<id> <name>"`` (e.g.
    ``"cuda:3 NVIDIA H200"``) where ``<id>`` is the GPU's entry in ``$CUDA_VISIBLE_DEVICES`` (the machine's index or
    UUID that a GPU pool handed out), else the device index. Under several processes: the main process's device."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ident = visible[index] if index < len(visible) else str(index)
    return f"cuda:{ident} {torch.cuda.get_device_name(index)}"


# -- helpers ----------------------------------------------------------------------------------------------------


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
