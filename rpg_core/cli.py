"""The ``rpg`` command.

``rpg design``   the KL design space, every loss checked against its exact objective.
``rpg presets``  the paper's 12 methods.
``rpg train``    one training run: ``--config FILE.yaml`` and/or ``--preset NAME``, ``--set section.field=value``.
                 Exit status 0 done, 1 stopped on NaN/inf, 2 bad config or data, 3 (``tracking.PRUNED_EXIT``) stopped
                 on a coordinator's request (a tuner's pruning; tag ``rpg.stop``).
``rpg sweep expand FILE``  the runs of a sweep file: resolved, de-duplicated, invalid combinations with reasons.
``rpg eval``     AIME24/AIME25/AMC23 at Mean@k (spec §8) of a model, checkpoint, run folder or MLflow run.
``rpg tune FILE``  an Optuna study of a study file (flows.tuner).
``rpg runs gc``  end the runs whose process is gone (FAILED, rpg.exit=lost).
``rpg report``   the comparison of a sweep, runs or a study: offline HTML, PNGs, tables with CIs (dashboards.report).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

from rpg_core.objectives import PRESETS, Clip, Form, ObjectiveConfig, ObjectiveConfigError

_ONPOLICY = {
    "forward": "dKL(ref||theta)  forward",
    "reverse": "dKL(theta||ref)  reverse",
    "zero": "0  (no regularisation)",
    "other": "matches no KL",
    "none": "-  (KL acts on the advantage)",
}


def design_space(beta: float) -> list[ObjectiveConfig]:
    """One config per distinct KL term (canonical key at clip='dual') of form x direction x normalization x
    estimator x importance weight."""
    seen: dict[str, ObjectiveConfig] = {}
    for form, direction, normalized, estimator, weight in itertools.product(
        list(Form), ("forward", "reverse"), (True, False), ("k1", "k2", "k3"), (False, True)
    ):
        try:
            cfg = ObjectiveConfig(
                form=form, direction=direction, normalized=normalized, estimator=estimator, kl_is_weight=weight,
                beta=beta, clip="dual",
            )
        except ObjectiveConfigError:
            continue  # penalty + forward + kl_is_weight: rejected with its reason
        seen.setdefault(cfg.key(), cfg.canonical())
    return list(seen.values())


# The released RPG/verl code's `kl_loss_type` for each penalty-form KL term (spec §3.4; iterative reference).
_CODE_NAMES = {
    "k1-reverse": "kl",
    "k2-reverse": "mse",
    "k3-reverse": "low_var_kl",
    "k1-forward": "rpg_fkl",
    "k3-forward": "rpg_ufkl",
    "k1-reverse*w": "rpg_rkl",
    "k3-reverse*w": "rpg_urkl",
}


def _used_by(cfg: ObjectiveConfig) -> str:
    names = [
        p.name
        for p in PRESETS.values()
        if (p.objective.form, p.objective.divergence_name) == (cfg.form, cfg.divergence_name) and p.objective.beta > 0
    ]
    if cfg.form is Form.PENALTY and cfg.divergence_name in _CODE_NAMES:
        names.append(f"code: {_CODE_NAMES[cfg.divergence_name]}")
    return ", ".join(names)


def cmd_design(args: argparse.Namespace) -> int:
    from rpg_core.objectives.exact import identify_objective, onpolicy_kl_gradient

    t0 = time.perf_counter()
    rows = design_space(args.beta)
    print("RPG design space: every distinct loss checked against the exact objective it claims (spec §2.5, §2.7)")
    print(
        "  dL/dtheta vs -dJ/dtheta, J = E_theta[A] - beta*D(ref, theta) by enumeration over 6 outcomes (float64),\n"
        "  for softmax and unnormalized exp(theta) policies, iterative and fixed reference; clipped columns keep\n"
        "  every ratio inside the clip. 'iter.' = exact only with the iterative reference (pi_ref = pi_old).\n"
    )
    head = f"{'form':<15}{'KL term':<13}{'clip=none':<20}{'clip=ppo':<20}{'clip=dual':<20}{'on-policy KL gradient':<30}"
    print(head + "used by")
    print("-" * (len(head) + 30))
    failures, keys, exact_keys = [], set(), set()
    for cfg in rows:
        cells = []
        for clip in Clip:
            c = cfg.model_copy(update={"clip": clip})
            ident = identify_objective(c)
            keys.add(c.key())
            if ident.objective:
                exact_keys.add(c.key())
                tag = " iter." if ident.iterative_only else ""
                same = " =" if c.canonical().form is not c.form else ""  # merged with the Table 1/4 surrogate
                cells.append(f"{ident.objective}{same} ok {ident.error:.0e}{tag}")
            else:
                cells.append("-" if cfg.form is Form.REWARD else "no exact J")
            if cfg.form.is_rpg and (ident.objective != cfg.divergence_name or ident.iterative_only):
                failures.append(c.summary())
        onpol = _ONPOLICY[onpolicy_kl_gradient(cfg)]
        print(
            f"{cfg.form.value:<15}{cfg.divergence_name:<13}{cells[0]:<20}{cells[1]:<20}{cells[2]:<20}{onpol:<30}"
            f"{_used_by(cfg)}"
        )
    print(
        f"\n{len(keys)} distinct losses ({len(rows)} KL terms x 3 clips, less merges); {len(exact_keys)} are exact\n"
        "surrogates of a KL-regularised objective, every RPG-form loss among them. '=' marks an unclipped penalty that\n"
        "IS the Table 1/4 surrogate (same key). GRPO's k3 is exact for no objective; on-policy its gradient is the\n"
        "FORWARD KL's (spec §3.3); with the paper's importance weight (k3-reverse*w) it is URKL.\n"
    )
    print(f"{'preset':<24}{'paper name':<22}{'key':<14}{'advantage':<23}{'reference':<11}{'lr':<7}objective")
    for p in PRESETS.values():
        print(
            f"{p.name:<24}{p.paper_name:<22}{p.objective.key():<14}{p.advantage.value:<23}{p.reference.value:<11}"
            f"{p.lr:<7.0e}{p.objective.summary()}"
        )
    print(f"\nchecked in {time.perf_counter() - t0:.1f} s")
    if failures:
        print(f"FAILED: {len(failures)} RPG-form losses do not match their objective: {failures}", file=sys.stderr)
        return 1
    print("all RPG-form losses are gradient-exact")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for p in PRESETS.values():
        if args.name and p.name != args.name:
            continue
        print(f"{p.name}  ({p.paper_name})  key={p.objective.key()}")
        print(f"  objective : {p.objective.summary()}")
        print(f"  advantage : {p.advantage.value}   reference: {p.reference.value}   lr: {p.lr:g}")
        print(f"  DAPO dynamic sampling: {p.dynamic_sampling}   overlong shaping: {p.overlong_shaping}")
        for note in p.code_differences:
            print(f"  vs code   : {note}")
    return 0


def resolve_train_config(args: argparse.Namespace):
    """preset < --config file < --model/--task shortcuts < --set overrides, validated (raises RunConfigError)."""
    from rpg_core.config import deep_merge, load_run_config, parse_overrides

    over = parse_overrides(args.set)
    short: dict = {}
    if args.model:
        short.setdefault("model", {})["name"] = args.model
    if args.task:
        if args.task in ("arithmetic", "dataset"):
            short.setdefault("data", {})["task"] = args.task
        else:  # a file or Hub dataset name
            short.setdefault("data", {}).update(task="dataset", source=args.task)
    return load_run_config(args.config, preset=args.preset, overrides=deep_merge(short, over))


_TRAINER = None  # the Trainer of this process, once built: a SIGTERM asks it to stop at the end of its step
TERM_EXIT = 128 + 15  # rpg train stopped by SIGTERM, with a checkpoint of the step it reached: run it again to resume


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption, ``kill``) once training runs: a clean stop at the end of the current step,
    with a checkpoint of that step, the run KILLED in MLflow, exit ``TERM_EXIT``. SIGINT (Ctrl-C, a cancelled
    sweep's stop), a second SIGTERM, or a SIGTERM before training started: stop at once like Ctrl-C, the run KILLED
    with its last checkpoint. Further signals are then ignored, so they cannot cut that clean-up short (the sender's
    SIGKILL after its grace period remains the backstop)."""
    import signal

    def stop(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and _TRAINER is not None and getattr(_TRAINER, "_stop_signal", None) is None:
            _TRAINER.stop_at_step_end("SIGTERM")
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


_RUN_LOCK = None  # the run directory's lock file, held while this process trains (checkpoints.hold)


def cmd_train(args: argparse.Namespace) -> int:
    from rpg_core.config import RunConfigError

    try:
        cfg = resolve_train_config(args)
    except RunConfigError as e:
        print(f"rpg train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# config key {cfg.key()}  seed {cfg.train.seed}  run key {cfg.run_key()}  method {cfg.method_name()}")
        print(cfg.to_yaml(), end="")
        return 0
    from rpg_core.prompts import load_problems

    try:  # the data files (exist, UTF-8, non-empty, every row valid): read once, before torch and the model load
        problems = load_problems(cfg)
    except (ValueError, OSError) as e:
        print(f"rpg train: {e}", file=sys.stderr)
        return 2
    if cfg.tracking.enabled:  # a store nothing can log to: said now, not minutes later after the model loaded
        from rpg_core.tracking import check_tracking_uri, default_tracking_uri

        try:
            check_tracking_uri(cfg.tracking.tracking_uri or default_tracking_uri())
        except ValueError as e:
            print(f"rpg train: {e}", file=sys.stderr)
            return 2
    global _RUN_LOCK
    if os.environ.get("RANK", "0") == "0":  # one writer per run dir (several processes of one run: the main one)
        from pathlib import Path

        from rpg_core import checkpoints
        from rpg_core.tracking import host_name

        run_dir = Path(cfg.train.output_dir) / cfg.run_key()
        try:
            _RUN_LOCK = checkpoints.hold(run_dir, f"{os.getpid()} {host_name()}")
        except checkpoints.RunDirBusy as e:
            print(f"rpg train: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # found now, not at the first checkpoint after minutes of compute
            print(f"rpg train: train.output_dir={cfg.train.output_dir!r}: cannot write {str(run_dir)!r} "
                  f"({e.strerror or e}); allowed: a writable directory", file=sys.stderr)  # fmt: skip
            return 2
    from rpg_core import checkpoints
    from rpg_core.trainer import NonFiniteError, Trainer

    _stop_on_sigterm()
    print(f"rpg train: {cfg.design_name()} ({cfg.objective.summary()}) on {cfg.model.name}, run {cfg.run_key()} "
          f"(config {cfg.key()}, seed {cfg.train.seed})", flush=True)  # fmt: skip
    global _TRAINER
    try:
        trainer = _TRAINER = Trainer(cfg, resume=not args.fresh, problems=problems)
    except ValueError as e:  # bad data source, unknown model, ...: before any training compute
        print(f"rpg train: {e}", file=sys.stderr)
        return 2
    try:
        res = trainer.fit()
    except NonFiniteError as e:
        print(f"rpg train: stopped: {e}. The last good checkpoint is kept in {trainer.ckpt_dir}", file=sys.stderr)
        return 1
    except checkpoints.CheckpointWriteError as e:  # the run ends FAILED with the error; nothing half-written is left
        print(f"rpg train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # fit() ends its run KILLED; a stop that came before fit's own try ends it here
        trainer.tracker.finish("KILLED")
        raise
    if res.stopped == "SIGTERM":  # a clean stop: a checkpoint of this step; not a failure, to be resumed
        if trainer.is_main:
            print(f"rpg train: stopped by SIGTERM at step {res.step}, checkpoint written in {trainer.ckpt_dir}; "
                  "running it again resumes", flush=True)  # fmt: skip
        if trainer.world > 1:  # as for a pruned run below: the main process alone reports the outcome
            trainer.acc.wait_for_everyone()
            return TERM_EXIT if trainer.is_main else 0
        return TERM_EXIT
    if res.stopped is not None:  # a coordinator's request (a tuner's pruning): not a failure, not to be retried
        from rpg_core.tracking import PRUNED, PRUNED_EXIT, STOP_TAG

        if trainer.is_main:
            what = "pruned" if res.stopped == PRUNED else f"stopped ({res.stopped})"
            print(f"rpg train: {what} at step {res.step} (stop requested by tag {STOP_TAG}={res.stopped} on MLflow run "
                  f"{res.run_id}); checkpoint in {trainer.ckpt_dir}, running it again resumes", flush=True)  # fmt: skip
        if trainer.world > 1:
            # Under accelerate the first process to exit non-zero makes torch's launcher SIGTERM the others: the
            # other processes wait until the main one has ended the MLflow run and said so, and exit 0; the main
            # process alone reports the outcome (accelerate launch itself then exits 1).
            trainer.acc.wait_for_everyone()
            return PRUNED_EXIT if trainer.is_main else 0
        return PRUNED_EXIT
    if trainer.is_main:
        print(f"done: step {res.step}, run dir {res.run_dir}, MLflow run {res.run_id}")
    return 0


def eval_engine(engine: str, kv_cache_gib: float | None, settings=None):
    """``rpg eval --engine`` / ``--vllm-kv-cache-gib`` as the engine's settings (a ``RolloutConfig``: its generator and,
    for vllm, its KV cache), checked without torch against the evaluation's ``settings`` (an ``EvalConfig``) when
    given. Errors are one line naming the flag and what it allows."""
    import math

    from rpg_core.config import GeneratorKind, RolloutConfig

    try:
        kind = GeneratorKind(engine)
    except ValueError:
        raise ValueError(f"--engine {engine!r}: allowed: {', '.join(k.value for k in GeneratorKind)}") from None
    if kind is GeneratorKind.VLLM and settings is not None and settings.temperature == 0 and settings.k > 1:
        raise ValueError(f"--engine vllm with --temperature 0 takes --k 1 (got --k {settings.k}): vLLM refuses several "
                         "greedy samples of a prompt (they would all be the same)")  # fmt: skip
    if kv_cache_gib is None:
        return RolloutConfig(generator=kind)
    if kind is not GeneratorKind.VLLM:
        raise ValueError(f"--vllm-kv-cache-gib applies to --engine vllm only (it is {kind.value})")
    if not (math.isfinite(kv_cache_gib) and kv_cache_gib > 0):
        raise ValueError(f"--vllm-kv-cache-gib {kv_cache_gib}: allowed: a number of GiB > 0, e.g. 1")
    return RolloutConfig(generator=kind, vllm_kv_cache_gib=kv_cache_gib)


def _as_eval_flag(missing: str) -> str:
    """``VLLMMissing``'s line (written for ``rollout.generator: vllm`` and ``rpg train``) said of ``--engine vllm``."""
    return missing.replace("rollout.generator: vllm", "--engine vllm")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from rpg_core.config import EvalConfig, field_errors

    fields = dict(benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()], k=args.k,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                  max_prompt_tokens=args.max_prompt_tokens, template=args.template, rule=args.rule, limit=args.limit,
                  data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size, log_samples=args.log_samples)  # fmt: skip
    try:
        settings = EvalConfig(**{k: v for k, v in fields.items() if v is not None})
        settings.check(section=None)  # errors name the flags
        engine = eval_engine(args.engine, args.vllm_kv_cache_gib, settings)
        if not args.no_mlflow:  # a store nothing can log to: said before the model loads
            from rpg_core.tracking import check_tracking_uri, default_tracking_uri

            check_tracking_uri(args.tracking_uri or default_tracking_uri())
    except ValidationError as e:  # errors name the flags
        print(f"rpg eval: {field_errors(e, lambda loc: '--' + str(loc[0]).replace('_', '-'))[0]}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"rpg eval: {e}", file=sys.stderr)
        return 2
    from rpg_core.evaluation import as_dict, run_eval
    from rpg_core.models import ModelNotFoundError
    from rpg_core.rollout import VLLMMissing

    try:
        run = run_eval(args.model, settings, precision=args.precision, device=args.device,
                       tracking=not args.no_mlflow, tracking_uri=args.tracking_uri, experiment=args.experiment,
                       new_run=args.new_run, engine=engine)  # fmt: skip
    except (ValueError, ModelNotFoundError, FileNotFoundError) as e:
        print(f"rpg eval: {e}", file=sys.stderr)
        return 2
    except VLLMMissing as e:  # run_eval's preflight, before the benchmarks and the model load
        print(f"rpg eval: {_as_eval_flag(str(e))}", file=sys.stderr)
        return 2
    print(f"\n{run.target.describe()}: k={settings.k}, T={settings.temperature}, "
          f"max_new_tokens={run.result.settings['max_new_tokens']}, rules {run.result.settings['rules']}, "
          f"engine {run.result.settings['engine']}")  # fmt: skip
    print(run.result.table())
    if run.run_id:
        where = "its training run" if run.into_training_run else "a new run"
        print(f"logged to MLflow ({where}) {run.run_id}, step {run.target.step or 0}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(as_dict(run.result), f, indent=1, default=str)
        print(f"wrote {args.output}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune a study file with Optuna on this machine (flows/tuner.py): validated before any compute."""
    from flows.tuner import cli

    return cli(args)


def _tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study file (a sweep file with a search: section), e.g. sweeps/tune_smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="section.field=value for every trial (repeatable)")  # fmt: skip
    p.add_argument("--trials", type=int, default=None, help="trials in all, running ones included (default: the file's budget)")
    p.add_argument("--seeds", default=None, help="train.seed values of every trial, e.g. 0,1 (default: the file's)")
    p.add_argument("--concurrency", type=int, default=None, help="runs at once (default: one per GPU, else 1)")
    p.add_argument("--gpus", default="", help="CUDA devices, e.g. 0,1; cpu: CPU; default: $RPG_GPUS, else CPU")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed run (each resumes)")
    p.add_argument("--storage", default=None, help="Optuna storage: a journal file or postgresql+psycopg://... "
                   "(default: $RPG_OPTUNA_STORAGE, else .rpg/optuna.journal)")  # fmt: skip
    p.add_argument("--workdir", default=".rpg/tune", help="configs, logs and device locks of the runs")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")


def cmd_sweep_expand(args: argparse.Namespace) -> int:
    import json

    from rpg_core.config import RunConfigError
    from rpg_core.sweeps import SweepError, expand, kl_warnings, load_sweep

    try:
        seeds = None
        if args.seeds:
            bad = [x for x in args.seeds.split(",") if not x.strip().lstrip("-").isdigit()]
            if bad:
                raise SweepError(f"--seeds {args.seeds!r}: {bad[0]!r} is not an integer; allowed: e.g. 0,1,2")
            seeds = [int(x) for x in args.seeds.split(",")]
        exp = expand(load_sweep(args.file, overrides=args.set, seeds=seeds))
        if not exp.runs:  # nothing would run: the table and its reasons, then an error (exit 2)
            print(exp.table())
            exp.require_runs()
    except (SweepError, RunConfigError) as e:
        print(f"rpg sweep expand: {e}", file=sys.stderr)
        return 2
    warnings = kl_warnings(exp.sweep, exp)
    if args.json:
        print(json.dumps({"sweep": exp.sweep.name, "runs": exp.as_dicts(),
                          "dropped": [{"seed": d.seed, "axes": d.axes, "reason": d.reason} for d in exp.dropped],
                          "warnings": warnings}, indent=1))  # fmt: skip
    else:
        print(exp.table())
    for w in warnings:  # not fatal: the runs are valid, the comparison is what is void
        print(f"rpg sweep expand: warning: {w}", file=sys.stderr)
    return 0


def cmd_runs_gc(args: argparse.Namespace) -> int:
    """End the RUNNING runs whose process is gone as FAILED, tagged rpg.exit=lost (rpg_core.runs.collect_lost)."""
    from rpg_core.tracking import check_tracking_uri, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(uri)
    except ValueError as e:
        print(f"rpg runs gc: {e}", file=sys.stderr)
        return 2
    from rpg_core.runs import collect_lost

    lost = collect_lost(experiments=args.experiment, tracking_uri=uri, dry_run=args.dry_run)
    verb = "would end" if args.dry_run else "ended"
    for r in lost:
        print(f"{verb} {r.run_id} ({r.experiment}/{r.name}) FAILED, rpg.exit=lost: {r.reason}")
    print(f"rpg runs gc: {len(lost)} lost run(s) {verb.split()[-1]} in {uri}" if lost else
          f"rpg runs gc: no lost run in {uri} (every RUNNING run has a live process)")  # fmt: skip
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rpg_core.plots import plot_run

    curves = plot_run(args.run, args.out, tracking_uri=args.tracking_uri)
    for key, points in curves.items():
        print(f"{key:<20} " + "  ".join(f"{s}:{v:.3f}" for s, v in points))
    print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    chosen = [n for n, v in (("--sweep", args.sweep), ("--runs", args.runs), ("--study", args.study)) if v]
    if len(chosen) != 1:  # checked before anything is imported or read
        print(f"rpg report: give exactly one of --sweep, --runs, --study (got {', '.join(chosen) or 'none'})",
              file=sys.stderr)  # fmt: skip
        return 2
    from dashboards.report import cli

    return cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpg", description="rpg-lab: KL-regularized policy gradient design space")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("design", help="table of the KL design space, every loss gradient-checked")
    p.add_argument("--beta", type=float, default=0.5, help="KL coefficient used by the checks (default 0.5)")
    p.set_defaults(func=cmd_design)
    p = sub.add_parser("presets", help="the paper's 12 methods, their configs and the code's differences")
    p.add_argument("name", nargs="?", help="one preset name")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("train", help="one training run (resumes from its last checkpoint by default)")
    p.add_argument("--config", help="YAML run config (sections: model, data, rollout, reward, objective, ...)")
    p.add_argument("--preset", help="start from a paper method, e.g. rpg_reinforce_urkl (see `rpg presets`)")
    p.add_argument("--model", help="smollm2-135m (embedded default) | tiny | local dir | Hub id")
    p.add_argument("--task", help="arithmetic | a .jsonl/.parquet file | a Hub dataset name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set optim.lr=1e-5")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tune", help="tune a study file's coefficients with Optuna (pruned, resumable)")
    _tune_arguments(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("sweep", help="sweep definitions (sweeps/*.yaml)")
    sweep_sub = p.add_subparsers(dest="sweep_command", required=True)
    q = sweep_sub.add_parser("expand", help="the resolved, de-duplicated runs of a sweep file with their config keys")
    q.add_argument("file", help="a sweep YAML file, e.g. sweeps/smoke.yaml")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run, e.g. train.steps=3")
    q.add_argument("--seeds", metavar="S,S,...", help="train.seed values, replacing the file's seeds: (e.g. 0,1,2)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_sweep_expand)
    p = sub.add_parser("runs", help="the MLflow runs: gc ends the runs whose process is gone")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("gc", help="end RUNNING runs whose process is gone (SIGKILL, OOM, power cut) as FAILED, "
                            "tagged rpg.exit=lost; live ones are told by their run folder's lock or their heartbeat")  # fmt: skip
    q.add_argument("--experiment", action="append", help="only these experiments (repeatable; default: all)")
    q.add_argument("--dry-run", action="store_true", help="list them, change nothing")
    q.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")
    q.set_defaults(func=cmd_runs_gc)
    p = sub.add_parser("eval", help="Mean@k / Pass@k / Maj@k on AIME24, AIME25, AMC23 (the paper's protocol)")
    p.add_argument("--model", required=True,
                   help="smollm2-135m | tiny | model dir | Hub id | checkpoint dir | run dir | MLflow run id")  # fmt: skip
    p.add_argument("--benchmarks", default="aime24,aime25,amc23",
                   help="comma-separated: aime24, aime25, amc23, gsm8k, math500 or .jsonl/.parquet files")  # fmt: skip
    p.add_argument("--k", type=int, help="samples per problem (default 32, the paper's Mean@32)")
    p.add_argument("--max-new-tokens", type=int, help="default: the training run's, else 2048 (the paper's)")
    p.add_argument("--temperature", type=float, help="default 1.0 (the paper's code)")
    p.add_argument("--top-p", type=float, help="default 1.0")
    p.add_argument("--top-k", type=int, help="default 0 = off")
    p.add_argument("--max-prompt-tokens", type=int, help="prompts are left-truncated to this (default 2048)")
    p.add_argument("--template", help="prompt template: paper (default) | paper_oneshot | raw")
    p.add_argument("--rule", help="answer rule for all benchmarks: paper | lenient | math_verify (default: each's)")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--data-dir", help="folder with aime24.jsonl etc. (default $RPG_EVAL_DATA, else the Hub)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per generate call (default 64)")
    p.add_argument("--log-samples", type=int, help="responses per problem kept in MLflow (default 4)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--engine", default="prefix", help="the sampling engine: prefix (built-in, default) | hf | vllm "
                   "(vllm: make install installs it; docs/vllm.md)")  # fmt: skip
    p.add_argument("--vllm-kv-cache-gib", type=float, help="--engine vllm: the engine's KV cache in GiB (default 1, "
                   "rollout.vllm_kv_cache_gib's; host memory on CPU)")  # fmt: skip
    p.add_argument("--experiment", default="rpg-eval", help="MLflow experiment of new evaluation runs")
    p.add_argument("--new-run", action="store_true", help="never log into the checkpoint's training run")
    p.add_argument("--no-mlflow", action="store_true", help="do not record the evaluation")
    p.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")
    p.add_argument("--output", help="also write every result (per problem and per sample) to this JSON file")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="an offline HTML report (figures, tables, CIs over seeds) of a sweep, runs or a study")
    p.add_argument("--sweep", help="a sweep's name (its runs' tag sweep), e.g. kl_divergences")
    p.add_argument("--runs", help="comma-separated MLflow run ids of training runs")
    p.add_argument("--study", help="a tuning study's name, as `rpg tune` prints it")
    p.add_argument("--out", help="output folder (default .rpg/reports/<selection>)")
    p.add_argument("--by", default="label", help="group runs by: label (default: the configuration), or a design "
                   "axis (method, divergence, direction, normalized, estimator, form, clip, beta, ...)")  # fmt: skip
    p.add_argument("--metric", help="the metric the table, grid and trade-off rank by (default: the first "
                   "benchmark's Mean@k, else eval/acc_strict)")  # fmt: skip
    p.add_argument("--baseline", help="a group (e.g. GRPO) every other is compared with: difference, P(improvement), "
                   "paired per-problem differences")  # fmt: skip
    p.add_argument("--stat", default="mean", choices=["mean", "iqm"], help="statistic over a group's runs")
    p.add_argument("--x", default="step", choices=["step", "tokens", "wall"], help="the curves' x axis")
    p.add_argument("--no-png", action="store_true", help="skip the PNG figures (they need Chromium: make browser)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent MLflow run")
    p.add_argument("--mlflow-url", help="the MLflow UI's URL for run links (default $RPG_MLFLOW_URL)")
    p.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("plot", help="accuracy curves of a run (from MLflow) as a PNG")
    p.add_argument("run", help="a run directory (.rpg/runs/<key>) or an MLflow run id")
    p.add_argument("--out", default="accuracy.png")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "beta", 1.0) <= 0:
        print("rpg design: --beta must be > 0 (the checks need a KL term)", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
