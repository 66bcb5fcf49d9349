"""Time and peak memory of one training step: rpg-lab's ``Trainer`` vs TRL's ``GRPOTrainer``, side by side.

Both sides run the same job: the same model (the embedded default SmolLM2-135M-Instruct unless ``--model``), the
same prompts in the same order (two-digit addition, the paper's one-shot template rendered with the model's chat
template, token for token identical), ``--group`` samples per prompt, at most ``--max-new-tokens`` new tokens,
temperature 1, top-p 1, the paper's strict "Answer:" reward, fp32 on CPU, lr 1e-6, and exactly ONE optimizer
update per generated batch of prompts x group completions (no reference model, no old-log-prob pass).

Each side runs in its own fresh child process (``--child``), so its peak memory is its own and is comparable:

* ``ru_maxrss``: the child's peak resident set size over its whole life (model loading included), in GiB;
* ``step peak``: the highest RSS a background thread saw (reading ``/proc/self/statm`` every 5 ms) during a step.

A step is timed as the wall time of one full training step: generation + reward + update. The first step of each
side is a warm-up and is reported on its own; the table shows the median of the ``--steps`` steps after it.

    .venv/bin/python benchmarks/bench_trainer_vs_trl.py                  # 8 prompts x 8 samples, 64 new tokens
    .venv/bin/python benchmarks/bench_trainer_vs_trl.py --only ours --also-dapo
    .venv/bin/python benchmarks/bench_trainer_vs_trl.py --prompts 2 --group 2 --max-new-tokens 8 --steps 1  # smoke

TRL side (``GRPOConfig``): num_generations=group, per_device_train_batch_size=--trl-micro-batch (default 8, the
same micro-batch as ours and TRL's own default; 0 = the whole batch; ``8,0`` runs both, one child each, shown as
``trl:mb8`` and ``trl:mb64``) and gradient_accumulation_steps=prompts*group/micro-batch, so the
generation batch (per_device_train_batch_size x steps_per_generation) is exactly prompts x group and one optimizer
step consumes it; num_iterations=1 (no old-log-prob pass), beta=0 (no reference model), loss_type="dapo" (the
token-mean over the whole accumulated batch, like ours), bf16=False, use_cpu=True, gradient checkpointing as TRL
defaults it (on; ``--trl-gradient-checkpointing off`` to turn it off), no checkpoints, report_to="none".
Requires ``pip install trl`` (tested with trl 1.16.0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
LEVEL = "add2"
TEMPLATE = "paper_oneshot"
N_TRAIN, N_EVAL, SEED = 4096, 128, 0  # the trainer's data defaults (data.n_train, data.n_eval, train.seed)


# -- memory -----------------------------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of this process over a window, sampled from /proc/self/statm by a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            with self._lock:
                self.peak = max(self.peak, r)
            time.sleep(self.interval)

    def reset(self) -> None:
        with self._lock:
            self.peak = self.rss()

    def read(self) -> int:
        r = self.rss()
        with self._lock:
            self.peak = max(self.peak, r)
            return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- shared inputs ----------------------------------------------------------------------------------------------


def step_problems(prompts: int, n_steps: int):
    """The problems of each step, in the order rpg_core.trainer.Trainer draws them (seeded per-epoch shuffle of the
    arithmetic training split); the TRL side gets these, the OUR side's own draws are recorded and compared."""
    import torch

    from rpg_core.data import ArithmeticLevel, arithmetic_split

    train, _ = arithmetic_split(ArithmeticLevel(LEVEL), N_TRAIN, N_EVAL, SEED)
    out, cursor = [], 0
    for _ in range(n_steps):
        step = []
        for _ in range(prompts):
            epoch, i = divmod(cursor, len(train))
            g = torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
            step.append(train[int(torch.randperm(len(train), generator=g)[i])])
            cursor += 1
        out.append(step)
    return out


def render(tok, problem) -> str:
    from rpg_core.data import PromptTemplate, arithmetic_example, build_messages, render_prompt

    ex, sol = arithmetic_example(LEVEL)
    return render_prompt(tok, build_messages(problem, PromptTemplate(TEMPLATE), ex, sol))


def _timed(fn, sink: list[float]):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sink.append(time.perf_counter() - t)

    return wrapper


def _log(side: str, msg: str) -> None:
    print(f"[{side}] {msg}", file=sys.stderr, flush=True)


def _step_record(i: int, wall: float, peak: int, gen: float | None, rollout: float | None, **extra) -> dict:
    upd = wall - rollout if rollout is not None else None
    return {"step": i, "warmup": i == 0, "wall_s": wall, "generation_s": gen, "rollout_s": rollout, "update_s": upd,
            "step_peak_gib": peak / GIB, **extra}  # fmt: skip


# -- OUR side ---------------------------------------------------------------------------------------------------


def child_ours(a: argparse.Namespace) -> dict:
    import torch

    from rpg_core.config import load_run_config
    from rpg_core.trainer import Trainer

    side = f"ours:{a.preset}"
    sampler = RssSampler()
    P, G, T, n = a.prompts, a.group, a.max_new_tokens, a.steps + 1
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as tmp:
        overrides = [
            f"model.name={a.model}", "data.task=arithmetic", f"data.level={LEVEL}", f"data.template={TEMPLATE}",
            f"data.n_train={N_TRAIN}", f"data.n_eval={N_EVAL}", f"train.seed={SEED}",
            f"rollout.prompts_per_step={P}", f"rollout.n={G}", f"rollout.max_new_tokens={T}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
            "reward.rule=paper", "reward.dynamic_sampling=false", "reward.overlong_shaping=false",
            "algorithm.epochs=1", "algorithm.mini_batches=1", "model.precision=fp32", "train.device=cpu",
            "optim.lr=1e-6", "optim.warmup_steps=0", "tracking.enabled=false", "train.eval_every=0",
            f"train.output_dir={tmp}", "train.checkpoint_every=0", "train.log_samples=0", f"train.steps={n}",
        ]  # fmt: skip
        if a.micro_batch:
            overrides.append(f"algorithm.micro_batch_size={a.micro_batch}")
        cfg = load_run_config(preset=a.preset, overrides=overrides)
        t = time.perf_counter()
        tr = Trainer(cfg, resume=False)
        setup_s = time.perf_counter() - t
        _log(side, f"set up in {setup_s:.1f} s, RSS {sampler.rss() / GIB:.2f} GiB")
        gen_times: list[float] = []
        tr.generator.generate = _timed(tr.generator.generate, gen_times)
        drawn: list[str] = []
        orig_next = tr.prompts.next

        def next_prompts(k):
            ps = orig_next(k)
            drawn.extend(p.problem.problem for p in ps)
            return ps

        tr.prompts.next = next_prompts
        rss_before = sampler.rss()
        steps, problems = [], []
        for i in range(n):
            gen_times.clear()
            drawn.clear()
            sampler.reset()
            t = time.perf_counter()
            m = tr.train_step()
            tr.step += 1
            wall = time.perf_counter() - t
            peak = sampler.read()
            rec = _step_record(
                i, wall, peak, sum(gen_times), m.get("time/rollout"),
                trainer_time_step_s=m.get("time/step"), logprob_s=m.get("time/logprob"),
                trainer_update_s=m.get("time/update"), completion_mean_tokens=m.get("response_length/mean"),
                reward_mean=m.get("reward/mean"), updates=m.get("actor/updates"),
            )  # fmt: skip
            steps.append(rec)
            problems.append(list(drawn))
            _log(side, _progress(rec, n))
        result = {
            "side": side,
            "framework": "rpg-lab",
            "preset": a.preset,
            "micro_batch_size": cfg.algorithm.micro_batch_size,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "uses_reference_model": tr.ref_model is not None,
            "optimizer_updates_per_step": cfg.algorithm.epochs * cfg.algorithm.mini_batches,
            "setup_s": setup_s,
            "rss_before_steps_gib": rss_before / GIB,
            "steps": steps,
            "problems": problems,
            "threads": torch.get_num_threads(),
        }
    sampler.close()
    result["ru_maxrss_gib"] = ru_maxrss_bytes() / GIB
    return result


# -- TRL side ---------------------------------------------------------------------------------------------------


def child_trl(a: argparse.Namespace) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rpg_core.models import load_tokenizer, resolve_model
    from rpg_core.rewards import paper_score

    sampler = RssSampler()
    P, G, T, n = a.prompts, a.group, a.max_new_tokens, a.steps + 1
    batch = P * G
    mb = math.gcd(int(a.trl_micro_batch) or batch, batch)
    gas = batch // mb
    side = f"trl:mb{mb}"
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    ours_tok = load_tokenizer(a.model)
    per_step = step_problems(P, n)
    rows = []
    for step in per_step:
        for p in step:
            text = render(ours_tok, p)
            # TRL tokenizes a plain-text prompt with tokenizer(text) (special tokens on); ours with them off after the
            # chat template. Check that both give the same ids, so both sides condition on the same tokens.
            if tok(text)["input_ids"] != ours_tok(text, add_special_tokens=False)["input_ids"]:
                raise RuntimeError("TRL would tokenize the prompt differently from rpg-lab (special tokens)")
            rows.append({"prompt": text, "answer": p.answer, "problem": p.problem})
    dataset = Dataset.from_list(rows)

    seen: list[list[str]] = []

    def paper_reward(prompts, completions, answer, problem, **kw):
        seen.append(list(dict.fromkeys(problem)))  # the distinct problems of this generation batch, in order
        return [paper_score(c, ans).score for c, ans in zip(completions, answer, strict=True)]

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            max_steps=n,
            per_device_train_batch_size=mb,
            gradient_accumulation_steps=gas,  # steps_per_generation defaults to this: one generation per update
            num_generations=G,
            num_iterations=1,
            beta=0.0,
            loss_type="dapo",
            max_completion_length=T,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            bf16=False,
            fp16=False,
            use_cpu=True,
            gradient_checkpointing=a.trl_gradient_checkpointing == "on",
            model_init_kwargs={"dtype": "float32"},
            shuffle_dataset=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
            seed=SEED,
        )
        t = time.perf_counter()
        trainer = GRPOTrainer(model=path, reward_funcs=paper_reward, args=args, train_dataset=dataset,
                              processing_class=tok)  # fmt: skip
        setup_s = time.perf_counter() - t
        _log(side, f"set up in {setup_s:.1f} s, RSS {sampler.rss() / GIB:.2f} GiB, "
                   f"per_device_train_batch_size={mb}, gradient_accumulation_steps={gas}, "
                   f"generation_batch_size={args.generation_batch_size}")  # fmt: skip
        gen_times: list[float] = []
        rollout_times: list[float] = []
        trainer._generate_single_turn = _timed(trainer._generate_single_turn, gen_times)  # model.generate
        trainer._generate_and_score_completions = _timed(trainer._generate_and_score_completions, rollout_times)
        steps: list[dict] = []
        trl_logs: list[dict] = []
        rss_before: list[int] = []

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                rss_before.append(sampler.rss())

            def on_step_begin(self, args, state, control, **kw):
                gen_times.clear()
                rollout_times.clear()
                sampler.reset()
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                wall = time.perf_counter() - self.t
                peak = sampler.read()
                rec = _step_record(len(steps), wall, peak, sum(gen_times) if gen_times else None,
                                   sum(rollout_times) if rollout_times else None,
                                   generations=len(rollout_times), optimizer_step=state.global_step)  # fmt: skip
                steps.append(rec)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "train_runtime" not in logs:
                    logs_copy = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                    trl_logs.append(logs_copy)
                    if steps:
                        steps[-1]["completion_mean_tokens"] = logs_copy.get("completions/mean_length")
                        steps[-1]["reward_mean"] = logs_copy.get("reward")
                        _log(side, _progress(steps[-1], n))

        trainer.add_callback(StepTimer())
        if not a.verbose:
            trainer.remove_callback(PrinterCallback)  # the raw log dicts (disable_tqdm=True); we print our own lines
        trainer.train()
        result = {
            "side": side,
            "framework": f"trl {trl.__version__}",
            "micro_batch_size": mb,
            "gradient_accumulation_steps": gas,
            "generation_batch_size": args.generation_batch_size,
            "steps_per_generation": args.steps_per_generation,
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "loss_type": args.loss_type,
            "beta": args.beta,
            "uses_reference_model": getattr(trainer, "ref_model", None) is not None,
            "optim": str(args.optim),
            "setup_s": setup_s,
            "rss_before_steps_gib": rss_before[0] / GIB if rss_before else None,
            "steps": steps,
            "problems": seen,
            "trl_logs": trl_logs,
            "threads": torch.get_num_threads(),
        }
    sampler.close()
    result["ru_maxrss_gib"] = ru_maxrss_bytes() / GIB
    if len(steps) != n or any(s.get("generations") != 1 for s in steps):
        raise RuntimeError(f"expected {n} optimizer steps with one generation each, got {steps}")
    return result


def _progress(rec: dict, n: int) -> str:
    tag = " (warm-up)" if rec["warmup"] else ""
    parts = [f"step {rec['step'] + 1}/{n}{tag}: {rec['wall_s']:.2f} s"]
    if rec.get("generation_s") is not None:
        parts.append(f"generation {rec['generation_s']:.2f} s")
    if rec.get("update_s") is not None:
        parts.append(f"update {rec['update_s']:.2f} s")
    parts.append(f"step peak {rec['step_peak_gib']:.2f} GiB")
    if rec.get("completion_mean_tokens") is not None:
        parts.append(f"mean completion {rec['completion_mean_tokens']:.1f} tok")
    return ", ".join(parts)


# -- parent -----------------------------------------------------------------------------------------------------


def run_child(kind: str, a: argparse.Namespace, preset: str | None = None, trl_mb: int = 8) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_DISABLE_TELEMETRY": "1",
    })  # fmt: skip
    if not a.verbose:
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", kind, "--child-out", str(out), "--prompts", str(a.prompts),
           "--group", str(a.group), "--max-new-tokens", str(a.max_new_tokens), "--steps", str(a.steps),
           "--threads", str(a.threads), "--model", a.model, "--trl-micro-batch", str(trl_mb),
           "--trl-gradient-checkpointing", a.trl_gradient_checkpointing, "--micro-batch", str(a.micro_batch),
           "--preset", preset or a.preset]  # fmt: skip
    label = f"ours:{preset}" if kind == "ours" else f"trl:mb{trl_mb}"
    print(f"== {label}: running in a fresh process ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    try:
        if rc != 0:
            raise RuntimeError(f"the {label} child failed with exit status {rc}")
        res = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    res["process_wall_s"] = time.perf_counter() - t
    return res


def summarize(res: dict) -> dict:
    measured = [s for s in res["steps"] if not s["warmup"]] or res["steps"]

    def med(key):
        vals = [s[key] for s in measured if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    warm = res["steps"][0]
    return {
        "side": res["side"],
        "measured_steps": len(measured) if len(res["steps"]) > 1 else 0,
        "median_step_s": med("wall_s"),
        "median_generation_s": med("generation_s"),
        "median_rollout_s": med("rollout_s"),
        "median_update_s": med("update_s"),
        "max_step_peak_gib": max(s["step_peak_gib"] for s in measured),
        "ru_maxrss_gib": res["ru_maxrss_gib"],
        "warmup_step_s": warm["wall_s"],
        "warmup_step_peak_gib": warm["step_peak_gib"],
        "mean_completion_tokens": med("completion_mean_tokens"),
        "micro_batch_size": res.get("micro_batch_size"),
        "gradient_checkpointing": res.get("gradient_checkpointing"),
    }


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(summaries: list[dict]) -> list[dict]:
    head = (f"{'side':<24} {'steps':>5} {'s/step':>8} {'gen s':>7} {'rollout s':>9} {'update s':>8} "
            f"{'step peak GiB':>13} {'maxrss GiB':>10} {'warm-up s':>9} {'mb':>3} {'gc':>3} "
            f"{'compl tok':>9}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for s in summaries:
        print(
            f"{s['side']:<24} {s['measured_steps']:>5} {_f(s['median_step_s'], '.2f'):>8} "
            f"{_f(s['median_generation_s'], '.2f'):>7} {_f(s['median_rollout_s'], '.2f'):>9} "
            f"{_f(s['median_update_s'], '.2f'):>8} {_f(s['max_step_peak_gib'], '.2f'):>13} "
            f"{_f(s['ru_maxrss_gib'], '.2f'):>10} {_f(s['warmup_step_s'], '.2f'):>9} "
            f"{_f(s['micro_batch_size'], 'd'):>3} {'on' if s['gradient_checkpointing'] else 'off':>3} "
            f"{_f(s['mean_completion_tokens'], '.1f'):>9}"
        )
    ratios = []
    for trl in [s for s in summaries if s["side"].startswith("trl")]:
        for s in summaries:
            if s["side"].startswith("trl"):
                continue
            r = {
                "side": s["side"],
                "vs": trl["side"],
                "time": s["median_step_s"] / trl["median_step_s"],
                "update_time": (s["median_update_s"] / trl["median_update_s"])
                if s["median_update_s"] and trl["median_update_s"] else None,
                "ru_maxrss": s["ru_maxrss_gib"] / trl["ru_maxrss_gib"],
                "step_peak": s["max_step_peak_gib"] / trl["max_step_peak_gib"],
            }  # fmt: skip
            ratios.append(r)
            print(
                f"{s['side']} / {trl['side']}: time {r['time']:.2f}x (goal <= 0.4x), "
                f"update {_f(r['update_time'], '.2f')}x, peak memory {r['ru_maxrss']:.2f}x maxrss / "
                f"{r['step_peak']:.2f}x step peak (goal <= 0.3x)"
            )
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (group size, >= 2)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="measured steps per side, after one warm-up step")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both")
    p.add_argument("--model", default="smollm2-135m", help="rpg model name (the embedded default) or a local dir")
    p.add_argument("--preset", default="rpg_reinforce_urkl", help="our method preset")
    p.add_argument("--also-dapo", action="store_true", help="also run ours with the dapo preset (beta 0)")
    p.add_argument("--micro-batch", type=int, default=0, help="ours: algorithm.micro_batch_size (0: its default)")
    p.add_argument("--trl-micro-batch", default="8",
                   help="TRL per_device_train_batch_size; 0 = the whole batch (gradient_accumulation_steps=1); a "
                   "comma list (e.g. 8,0) runs one TRL child per value")
    p.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                   help="TRL's gradient_checkpointing (TRL defaults it to on)")
    p.add_argument("--out", default="benchmarks/results/trainer_vs_trl.json", help="JSON with every number")
    p.add_argument("--verbose", action="store_true", help="keep the libraries' warnings")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.group < 2:
        p.error("--group must be >= 2 (TRL's GRPO needs at least 2 generations per prompt)")

    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        res = child_ours(a) if a.child == "ours" else child_trl(a)
        Path(a.child_out).write_text(json.dumps(res, indent=1))
        return 0

    results = []
    if a.only in ("both", "ours"):
        results.append(run_child("ours", a, a.preset))
        if a.also_dapo and a.preset != "dapo":
            results.append(run_child("ours", a, "dapo"))
    if a.only in ("both", "trl"):
        batch = a.prompts * a.group  # one TRL child per distinct effective micro-batch size
        for mb in dict.fromkeys(math.gcd(int(x) or batch, batch) for x in a.trl_micro_batch.split(",") if x.strip()):
            results.append(run_child("trl", a, trl_mb=mb))

    same_prompts = None
    for trl_res in [r for r in results if r["side"].startswith("trl")]:
        for r in results:
            if r is not trl_res:
                same = r["problems"] == trl_res["problems"]
                same_prompts = same if same_prompts is None else same_prompts and same
                if not same:
                    print(f"WARNING: {r['side']} and {trl_res['side']} trained on different prompts", file=sys.stderr)
    summaries = [summarize(r) for r in results]
    print(f"\nSmolLM2-135M fp32 on CPU ({a.threads} threads): {a.prompts} prompts x {a.group} samples, "
          f"{a.max_new_tokens} new tokens, one optimizer update per step; median of {a.steps} step(s) after 1 "
          f"warm-up step; same prompts on both sides: {same_prompts}")  # fmt: skip
    ratios = print_table(summaries)
    versions = {}
    for mod in ("torch", "transformers", "accelerate", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - trl may be absent with --only ours
            versions[mod] = None
    out = {
        "args": {k: v for k, v in vars(a).items() if not k.startswith("child")},
        "versions": versions,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "processor": _cpu_model()},  # fmt: skip
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "same_prompts": same_prompts,
        "summary": summaries,
        "ratios_vs_trl": ratios,
        "runs": results,
    }
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
