"""Prefect flows: ``sweep`` trains every run of a sweep file, each as its own ``rpg train`` process.

``sweep`` expands the sweep (invalid and duplicate combinations dropped, ``rpg sweep expand``), skips every config
key that already has a FINISHED MLflow training run (unless ``force``), and runs the rest at most ``concurrency``
at a time through this machine's Prefect global concurrency limit ``rpg-gpu-<host>`` (created or grown here:
Prefect only warns about a missing limit). Each run gets one device of ``gpus`` (``CUDA_VISIBLE_DEVICES``; ``cpu``:
CPU; empty: the machine's GPUs, ``$RPG_GPUS``, else CPU), is retried ``retries`` times (a retry resumes from the
run's last checkpoint), and nests under one parent MLflow run of the sweep. The flow returns a summary table (also a
Prefect table artifact and the parent run's ``summary.json``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.concurrency.sync import concurrency as concurrency_slots
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.core import GpuPool, finished_runs, gpus_of
from flows.submit import child_config, parent_run, submit
from rpg_core import metrics as metrics_mod
from rpg_core.benchmarks import BenchmarkName
from rpg_core.config import Precision, RunConfig
from rpg_core.runs import RunStatus, find_runs, get_runs
from rpg_core.tracking import RunKind, default_tracking_uri, ensure_experiment, set_run_tags

NIGHTLY_TAG = "rpg.nightly"  # on a training run: the nightly run that evaluated it
SUMMARY_METRICS = ("eval/acc_strict", "acc/strict", "reward/mean")
GPUS_PATTERN = r"^(cpu|[0-9, ]*)$"
GPUS_HELP = "CUDA devices, e.g. 0,1,2,3; cpu: CPU; empty: the machine's GPUs ($RPG_GPUS, set by worker.sh), else CPU"


def gpu_limit_name(host: str | None = None) -> str:
    """``rpg-gpu-<host>``: the Prefect global concurrency limit of one machine's GPUs (one slot per GPU, or per CPU
    run). Per machine, because a team's workers share one Prefect server and each machine has its own GPUs."""
    host = host or os.environ.get("RPG_HOST") or socket.gethostname()
    return "rpg-gpu-" + (re.sub(r"[^a-z0-9-]+", "-", host.lower()).strip("-") or "host")


def ensure_gpu_limit(slots: int = 1) -> str:
    """Create this machine's limit with ``slots`` if it is missing, or grow it to ``slots`` (never shrink it: a
    running sweep may hold more); returns its name. ``concurrency()`` on a missing limit would only warn."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = gpu_limit_name()
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            current = 0
        if current < slots:
            client.upsert_global_concurrency_limit_by_name(name, slots)
    return name


# A sweep takes its slots of its machine's rpg-gpu-<host> limit once, for its whole duration (min(concurrency, runs to
# do)), and hands them to its tasks through a local semaphore: a task acquiring a server slot itself waits ~2 s
# after the previous task released it (the client retries), which cost 24 % on the smoke sweep
# (benchmarks/bench_orchestration.py). Another flow still waits for the server's slots.
_LOCAL_SLOTS: dict[str, threading.Semaphore] = {}


@task(task_run_name="train-{index}-{key}")
def train_run(index: int, key: str, config_yaml: str, workdir: str, gpus: str, fresh: bool,
              slots: str = "") -> dict[str, Any]:  # fmt: skip
    """One training process (flows.submit.submit), holding a slot of the ``rpg-gpu-<host>`` limit and one device for
    its whole life; a failed run raises (Prefect retries it, and the retry resumes)."""
    import yaml
    from prefect.concurrency.sync import concurrency

    cfg = RunConfig.from_dict(yaml.safe_load(config_yaml))
    logger = get_run_logger()
    local = _LOCAL_SLOTS.get(slots)
    with local if local is not None else concurrency(gpu_limit_name(), occupy=1, strict=True):
        with GpuPool.parse(gpus, Path(workdir) / "locks").acquire() as gpu:
            logger.info("run %d %s on %s", index, key, f"GPU {gpu}" if gpu else "CPU")
            out = submit(cfg, workdir=workdir, gpu=gpu, fresh=fresh)
    if not out.ok:
        tail = "".join(out.log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run {key} exited with {out.returncode} (log {out.log}):\n{tail}")
    logger.info("run %d %s %s: MLflow run %s, step %d, %.0f s", index, key, out.status, out.run_id, out.step,
                out.seconds)
    return {"run_id": out.run_id, "seconds": round(out.seconds, 1), "gpu": gpu}


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True)
def sweep(
    sweep_file: Annotated[str, Field(description="a sweep YAML, e.g. sweeps/smoke.yaml")] = "sweeps/smoke.yaml",
    overrides: Annotated[list[str], Field(description="section.field=value for every run")] = [],  # noqa: B006
    concurrency: Annotated[int | None, Field(ge=1, le=64, description="runs at once; empty: one per GPU")] = None,
    force: Annotated[bool, Field(description="re-run configs that already finished")] = False,
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN, description=GPUS_HELP)] = "",
    retries: Annotated[int, Field(ge=0, le=10, description="retries of a failed run (each resumes)")] = 1,
    workdir: Annotated[str, Field(description="configs, logs and GPU locks of the runs")] = ".rpg/sweeps",
) -> list[dict[str, Any]]:
    from rpg_core.sweeps import expand, load_sweep

    logger = get_run_logger()
    devices = gpus_of(gpus)
    gpus = ",".join(devices) or "cpu"  # resolved here, once: the tasks run on this machine
    concurrency = concurrency or max(1, len(devices))
    if devices and concurrency > len(devices):  # before any compute: the extra slots would only wait for a GPU
        raise ValueError(f"concurrency={concurrency} exceeds the {len(devices)} GPUs in gpus={gpus!r}; allowed: 1..{len(devices)}")
    exp = expand(load_sweep(sweep_file, overrides=overrides or None))
    sw = exp.sweep
    if not exp.runs:
        raise ValueError(f"sweep {sw.name}: no valid runs ({len(exp.dropped)} combinations dropped)")
    first = exp.runs[0].config
    uri = first.tracking.tracking_uri or default_tracking_uri()
    experiment = first.tracking.experiment
    ensure_experiment(uri, experiment)  # once, before the processes fan out (SQLite migrations race)
    done = {} if force else finished_runs(uri, experiment)
    todo = [r for r in exp.runs if r.key not in done]
    logger.info("sweep %s: %d runs, %d already finished, %d to run (%d dropped combinations)",
                sw.name, len(exp.runs), len(exp.runs) - len(todo), len(todo), len(exp.dropped))  # fmt: skip
    gpu_limit = ensure_gpu_limit(concurrency)
    work = Path(workdir) / sw.name
    params = {"sweep_file": sweep_file, "runs": len(exp.runs), "concurrency": concurrency,
              "overrides": " ".join(overrides), "force": force}  # fmt: skip
    with parent_run(RunKind.SWEEP, experiment=experiment, name=f"sweep-{sw.name}", tracking_uri=uri, params=params,
                    tags={"sweep": sw.name}) as parent:  # fmt: skip
        t0 = time.perf_counter()
        slots = f"{parent.run_id}"
        _LOCAL_SLOTS[slots] = threading.Semaphore(concurrency)
        futures = {}
        held = min(concurrency, len(todo))
        try:
            with concurrency_slots(gpu_limit, occupy=held, strict=True) if held else contextlib.nullcontext():
                for r in todo:
                    cfg = child_config(r.config, parent, sweep=sw.name)
                    futures[r.key] = train_run.with_options(retries=retries, retry_delay_seconds=2).submit(
                        r.index, r.key, cfg.to_yaml(), str(work), gpus, force, slots
                    )
                for fut in futures.values():
                    fut.wait()
        finally:
            _LOCAL_SLOTS.pop(slots, None)
        rows: list[dict[str, Any]] = []
        failed = 0
        for r in exp.runs:
            row: dict[str, Any] = {"index": r.index, "key": r.key, "seed": r.seed, **r.axes,
                                   "method": r.config.method_name()}  # fmt: skip
            if r.key in done:
                row.update(status="skipped (finished)", run_id=done[r.key])
            else:
                state = futures[r.key].state
                if state.is_completed():
                    row.update(status="finished", **futures[r.key].result())
                else:
                    failed += 1
                    row.update(status=f"failed: {str(state.message or state.name)[:200]}")
            rows.append(row)
        _add_metrics(rows, uri)
        create_table_artifact(rows, key=f"sweep-{sw.name.replace('_', '-')}", description=f"sweep {sw.name}")
        parent.log_table(rows, "summary.json")
        parent.log_metrics({"runs_finished": sum(r["status"] == "finished" for r in rows), "runs_failed": failed,
                            "seconds": time.perf_counter() - t0})  # fmt: skip
        if failed:  # the parent run ends FAILED
            raise RuntimeError(
                f"sweep {sw.name}: {failed} of {len(todo)} runs failed; re-run to complete the missing ones"
            )
    return rows


def _add_metrics(rows: list[dict[str, Any]], uri: str) -> None:
    """The final value of a few headline metrics of each run (rpg_core.runs, one search), for the summary table."""
    final = get_runs([r["run_id"] for r in rows if r.get("run_id")], tracking_uri=uri).set_index("run_id")
    for row in rows:
        if row.get("run_id") not in final.index:
            continue
        for name in SUMMARY_METRICS:
            if name in final.columns and not pd.isna(value := final.at[row["run_id"], name]):
                row[name] = round(float(value), 4)


@flow(name="train", log_prints=True)
def train(
    config: Annotated[str, Field(description="a run config YAML")] = "configs/demo_add2_urkl.yaml",
    overrides: Annotated[list[str], Field(description="section.field=value")] = [],  # noqa: B006
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN, description=GPUS_HELP)] = "",
    fresh: Annotated[bool, Field(description="ignore the config's checkpoints")] = False,
    workdir: Annotated[str, Field(description="configs, logs and GPU locks")] = ".rpg/sweeps",
) -> dict[str, Any]:
    """One training run as its own process (one slot of ``rpg-gpu-<host>``, one GPU); resumes unless ``fresh``."""
    from rpg_core.config import load_run_config

    cfg = load_run_config(config, overrides=overrides or None)
    ensure_gpu_limit()
    out = train_run.with_options(retries=0)(0, cfg.key(), cfg.to_yaml(), str(Path(workdir) / "single"), gpus, fresh)
    return {"key": cfg.key(), **out}



@flow(name="evaluate", log_prints=True)
def evaluate(
    model: Annotated[str, Field(description="smollm2-135m | Hub id | model dir | checkpoint or run dir | MLflow run id")],
    benchmarks: Annotated[list[BenchmarkName], Field(min_length=1)] = ["aime24", "aime25", "amc23"],  # noqa: B006
    k: Annotated[int, Field(ge=1, le=1024, description="samples per problem (Mean@k)")] = 32,
    max_new_tokens: Annotated[int | None, Field(ge=1, description="default: the run's, else 2048")] = None,
    limit: Annotated[int | None, Field(ge=1, description="first N problems of each benchmark")] = None,
    precision: Precision = Precision.FP32,
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN, description=GPUS_HELP)] = "",
    tracking_uri: Annotated[str | None, Field(description="default $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")] = None,
    workdir: str = ".rpg/sweeps",
) -> dict[str, float]:
    """``rpg eval`` of one model or checkpoint in its own process; a checkpoint's results go into its training run."""
    return eval_run(model, list(benchmarks), k, max_new_tokens, limit, precision, gpus, tracking_uri, workdir)


@task(task_run_name="eval-{model}")
def eval_run(model: str, benchmarks: list[str], k: int, max_new_tokens: int | None, limit: int | None,
             precision: str, gpus: str, tracking_uri: str | None, workdir: str) -> dict[str, float]:  # fmt: skip
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from prefect.concurrency.sync import concurrency

    gpu_limit = ensure_gpu_limit()
    args = ["--model", model, "--benchmarks", ",".join(benchmarks), "--k", str(k),
            "--precision", Precision(precision).value]  # fmt: skip
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--limit", limit), ("--tracking-uri", tracking_uri)):
        if value is not None:
            args += [flag, str(value)]
    with concurrency(gpu_limit, occupy=1, strict=True), GpuPool.parse(gpus, Path(workdir) / "locks").acquire() as gpu:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "eval.json"
            proc = subprocess.run([sys.executable, "-m", "rpg_core.cli", "eval", *args, "--output", str(out)],
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, capture_output=True, text=True)  # fmt: skip
            print(proc.stdout[-4000:])
            if proc.returncode != 0:
                raise RuntimeError(f"rpg eval {model} exited with {proc.returncode}: {proc.stderr[-2000:]}")
            return json.loads(out.read_text())["metrics"]


@flow(name="nightly_eval", log_prints=True)
def nightly_eval(
    model: Annotated[str, Field(description="evaluate this model; empty: runs finished since the last nightly")] = "",
    benchmarks: Annotated[list[BenchmarkName], Field(min_length=1)] = ["aime24", "aime25", "amc23"],  # noqa: B006
    k: Annotated[int, Field(ge=1, le=1024)] = 32,
    max_new_tokens: Annotated[int | None, Field(ge=1)] = None,
    limit: Annotated[int | None, Field(ge=1)] = None,
    precision: Precision = Precision.FP32,
    experiment: Annotated[str, Field(description="MLflow experiment of the training runs")] = "rpg",
    tracking_uri: Annotated[str | None, Field(description="default $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")] = None,
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN, description=GPUS_HELP)] = "",
    workdir: str = ".rpg/sweeps",
) -> list[dict[str, Any]]:
    """Evaluate the newest checkpoints on AIME24/AIME25/AMC23: every training run finished since the previous
    nightly (recorded as a ``nightly`` run in the ``rpg-eval`` experiment), or the named ``model``. Each
    checkpoint's results land in its own training run."""
    from rpg_core.evaluation import EVAL_EXPERIMENT

    uri = tracking_uri or default_tracking_uri()
    ensure_experiment(uri, EVAL_EXPERIMENT)
    previous = find_runs(kind=RunKind.NIGHTLY, experiments=EVAL_EXPERIMENT, status=RunStatus.FINISHED, limit=1,
                         tracking_uri=uri)  # fmt: skip
    since = 0 if previous.empty else round(previous["start_time"].iloc[0].timestamp() * 1000)
    if model:
        targets = [model]
    else:  # training runs not yet evaluated by a nightly (evaluating re-opens a run, which moves its end time)
        todo = find_runs(kind=RunKind.TRAIN, experiments=experiment, status=RunStatus.FINISHED, ended_after=since,
                         tags={NIGHTLY_TAG: None}, tracking_uri=uri)  # fmt: skip
        targets = list(todo["run_id"])
    print(f"nightly_eval: {len(targets)} model(s) to evaluate (training runs finished since {since} ms)")
    rows = []
    failed = 0
    with parent_run(RunKind.NIGHTLY, experiment=EVAL_EXPERIMENT, name=f"nightly-{time.strftime('%Y-%m-%d')}",
                    tracking_uri=uri, params={"benchmarks": ",".join(benchmarks), "k": k}) as nightly:  # fmt: skip
        for target in targets:
            fut = eval_run.submit(target, list(benchmarks), k, max_new_tokens, limit, precision, gpus, uri, workdir)
            fut.wait()
            if fut.state.is_completed():
                m = fut.result()
                if not model:
                    set_run_tags(target, {NIGHTLY_TAG: nightly.run_id}, tracking_uri=uri)
                rows.append({"model": target, "status": "evaluated",
                             **{n: round(v, 4) for n, v in m.items() if _is_mean_at_k(n)}})  # fmt: skip
            else:
                failed += 1
                rows.append({"model": target, "status": f"failed: {str(fut.state.message)[:200]}"})
        if rows:
            create_table_artifact(rows, key="nightly-eval", description="nightly evaluation")
            nightly.log_table(rows, "summary.json")
        nightly.log_metrics({"evaluated": len(rows) - failed, "failed": failed})
        if failed:  # the nightly run ends FAILED
            raise RuntimeError(f"nightly_eval: {failed} of {len(targets)} evaluations failed")
    return rows


def _is_mean_at_k(name: str) -> bool:
    """Whether ``name`` (an `rpg eval` metric, ``<bench>/<metric>``) is a Mean@k, by its declaration in the schema."""
    return metrics_mod.lookup(f"eval/{name}").name == metrics_mod.MEAN_AT_K
