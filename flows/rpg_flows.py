"""Prefect flows: ``sweep`` trains every run of a sweep file, each as its own ``rpg train`` process.

``sweep`` expands the sweep (seeds x grid; invalid and duplicate combinations dropped, ``rpg sweep expand``), skips
every run (config key and seed) that already has a FINISHED MLflow training run (unless ``force``), and hands the
rest to a dispatcher (flows/dispatch.py): on this machine, at most ``concurrency`` at a time through its Prefect
global concurrency limit ``rpg-gpu-<host>`` (created or grown here: Prefect only warns about a missing limit), one
device of ``gpus`` each (``CUDA_VISIBLE_DEVICES``; ``cpu``: CPU; empty: the machine's GPUs, ``$RPG_GPUS``, else CPU);
or, deployed on a work pool (the team), each run as its own flow run of the ``train`` deployment, which any worker
with a free GPU takes. A failed process is retried ``retries`` times where its checkpoint is (a retry resumes). The
runs nest under one parent MLflow run of the sweep; their progress is a Prefect artifact updated as they change
state; cancelling the sweep cancels its runs. The flow returns a summary table (also a Prefect table artifact and the
parent run's ``summary.json``).
"""

from __future__ import annotations

import contextlib
import os
import re
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

from flows.core import GpuPool, finished_runs, gpus_of, host_slug, local_devices
from flows.dispatch import Dispatch, RunState, Ticket, is_cancelled, make_dispatcher, mark_started, pool_of_current_run
from flows.forms import Allowed, check_gpus, choice, form, run_name, shipped, sweep_path
from flows.progress import Progress
from flows.submit import child_config, parent_run, submit
from rpg_core import metrics as metrics_mod
from rpg_core.benchmarks import BenchmarkName
from rpg_core.config import GeneratorKind, Precision, RunConfig
from rpg_core.runs import RunStatus, collect_lost, find_runs, get_runs
from rpg_core.tracking import RunKind, default_tracking_uri, ensure_experiment, host_name, set_run_tags

NIGHTLY_TAG = "rpg.nightly"  # on a training run: the nightly run that evaluated it
SUMMARY_METRICS = ("eval/acc_strict", "acc/strict", "reward/mean")
GPUS_PATTERN = r"^(cpu|[0-9, ]*)$"
GPUS_HELP = "CUDA devices, e.g. 0,1,2,3; cpu: CPU; empty: the machine's GPUs ($RPG_GPUS, set by worker.sh), else CPU"
# Form fields the flows share (one declaration, one help text in every Run form)
Gpus = Annotated[str, Field(pattern=GPUS_PATTERN, description=GPUS_HELP), Allowed("cpu, empty, or CUDA device indices "
                                                                                   "like 0,1,2,3")]  # fmt: skip
RunRetries = Annotated[int, Field(ge=0, le=10, description="retries of a failed run (each resumes)")]
WhereRuns = Annotated[Dispatch, Field(description="where the runs go: auto: the work pool when deployed on one, else "
                                                 "this machine; local: this machine; pool: the work pool")]  # fmt: skip
# The evaluation forms' fields (evaluate, nightly_eval)
Benchmarks = Annotated[list[BenchmarkName], Field(min_length=1, description="benchmarks to evaluate")]
SamplesK = Annotated[int, Field(ge=1, le=1024, description="samples per problem (Mean@k)")]
MaxNewTokens = Annotated[int | None, Field(ge=1, le=65536, description="generation length; empty: the run's, else "
                                                                       "2048")]  # fmt: skip
ProblemLimit = Annotated[int | None, Field(ge=1, description="the first N problems of each benchmark; empty: all")]
EvalPrecision = Annotated[Precision, Field(description="fp32, or bf16 (autocast)")]
EvalEngine = Annotated[GeneratorKind, Field(description="the sampling engine: prefix (built-in), hf (transformers "
                                                        "generate), vllm (a vLLM engine: docs/vllm.md)")]  # fmt: skip
TrackingUri = Annotated[str | None, Field(description="MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else "
                                                      ".rpg/mlflow.db")]  # fmt: skip
EvalWorkdir = Annotated[str, Field(description="where the GPU locks are")]
ShippedSweep = choice(shipped())  # the sweeps in sweeps/ (not the tune_* studies): the form's dropdown
ShippedStudy = choice(shipped(studies=True))


def gpu_limit_name(host: str | None = None) -> str:
    """``rpg-gpu-<host>``: the Prefect global concurrency limit of one machine's GPUs (one slot per GPU, or per CPU
    run). Per machine, because a team's workers share one Prefect server and each machine has its own GPUs."""
    return "rpg-gpu-" + host_slug(host or host_name())


# Slots are leased: a holder that dies without releasing (SIGKILL, power cut) loses its slot when the lease runs out
# (Prefect's repossessor checks every 15 s). Prefect's default lease is 300 s; ours is the shortest the server
# accepts, so a crashed run's slot comes back within about 75 s; a live holder renews it every 0.75 x SLOT_LEASE_S.
# A cancelled run releases its slot at once (the context manager exits as the cancel unwinds the stack).
SLOT_LEASE_S = 60.0


def ensure_gpu_limit(slots: int = 1) -> str:
    """Create this machine's limit with ``slots`` if it is missing, or grow it to ``slots`` (never shrink it: a
    running sweep may hold more); returns its name. ``concurrency()`` on a missing limit would only warn."""
    import tempfile

    from filelock import FileLock
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = gpu_limit_name()
    # Read-then-write is a race on the server (Prefect's upsert "is not done atomically", and an update is a blind
    # PATCH): runs starting together on one machine each create (one 409s) or one grows the limit to 2 and another,
    # which read the old 0, writes 1 over it (CI saw both). The limit is this machine's, and so are its callers: a
    # lock on this machine's disk makes the read and the write one step. The 409 retry stays for callers that share
    # a name from two machines (the same RPG_HOST twice).
    with FileLock(str(Path(tempfile.gettempdir()) / f"{name}.lock")), get_client(sync_client=True) as client:
        for _ in range(5):
            try:
                current = client.read_global_concurrency_limit_by_name(name).limit
            except ObjectNotFound:
                current = 0
            if current >= slots:
                break
            try:
                client.upsert_global_concurrency_limit_by_name(name, slots)
                break
            except ObjectAlreadyExists:  # made meanwhile elsewhere: read it again
                continue
    return name


def gpu_slots(occupy: int = 1):
    """Hold ``occupy`` slots of this machine's limit (leased: see SLOT_LEASE_S)."""
    # A renewal that fails (a busy server; Prefect tries 3 times in ~3 s) must not kill a run that is training:
    # Prefect's default under strict=True cancels the holder (CI saw a run of a loaded team sweep fail so). The
    # device locks (GpuPool) and a worker's --limit still keep one run per GPU if the slot lapses meanwhile.
    return concurrency_slots(gpu_limit_name(), occupy=occupy, strict=True, lease_duration=SLOT_LEASE_S,
                             raise_on_lease_renewal_failure=False)  # fmt: skip


def project_dir() -> Path:
    """The checkout (or installed copy) a flow run works in: ``$RPG_ROOT`` (infra/team/worker.sh sets it to its own
    checkout, at whatever path), else this package's parent folder when it holds ``sweeps/``, else the current
    folder. Relative paths of the forms (sweep files, ``workdir``, ``train.output_dir``) are relative to it, so each
    machine runs from its own copy and keeps its own run folders."""
    env = os.environ.get("RPG_ROOT", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    return here if (here / "sweeps").is_dir() else Path.cwd()


def _enter_project() -> None:
    """A worker starts flow runs in a temporary folder: work in the project's (each flow run is its own process)."""
    root = project_dir()
    if Path.cwd().resolve() != root:
        os.chdir(root)


# A local sweep takes its slots of its machine's rpg-gpu-<host> limit once, for its whole duration (min(concurrency,
# runs to do)), and hands them to its tasks through a local semaphore: a task acquiring a server slot itself waits ~2 s
# after the previous task released it (the client retries), which cost 24 % on the smoke sweep
# (benchmarks/bench_orchestration.py). Another flow still waits for the server's slots.
_LOCAL_SLOTS: dict[str, threading.Semaphore] = {}


@task(task_run_name="train-{index}-{key}")
def train_run(index: int, key: str, config_yaml: str, workdir: str, gpus: str, fresh: bool,
              slots: str = "", ticket: str = "") -> dict[str, Any]:  # fmt: skip
    """One training process (flows.submit.submit), holding a slot of the ``rpg-gpu-<host>`` limit and one device for
    its whole life; a failed run raises (Prefect retries it, and the retry resumes). A pruned run (stopped on a
    coordinator's request, ``RunOutcome.pruned``) returns ``{"pruned": True, ...}``: a retry would resume it."""
    import yaml

    cfg = RunConfig.from_dict(yaml.safe_load(config_yaml))
    logger = get_run_logger()
    if ticket and is_cancelled(ticket):  # a retry scheduled just before its coordinator was cancelled
        return {"cancelled": True}
    local = _LOCAL_SLOTS.get(slots)
    with local if local is not None else gpu_slots(1):
        with GpuPool.parse(gpus, Path(workdir) / "locks" / gpu_limit_name()).acquire() as gpu:
            if ticket:
                mark_started(ticket, gpu)
            name = cfg.tracking.run_name or key
            logger.info("%s (run %d, %s) starts on %s, %s", name, index, key, host_name(), f"GPU {gpu}" if gpu else "CPU")
            out = submit(cfg, workdir=workdir, gpu=gpu, fresh=fresh, on_progress=logger.info)  # step/total, reward, acc
    if out.pruned:
        logger.info("%s pruned at step %d: MLflow run %s, %.0f s", name, out.step, out.run_id, out.seconds)
        return {"pruned": True, "run_id": out.run_id, "step": out.step, "seconds": round(out.seconds, 1), "gpu": gpu,
                "host": host_name()}  # fmt: skip
    if not out.ok and ticket and is_cancelled(ticket):  # stopped by the cancel: no retry
        return {"cancelled": True, "run_id": out.run_id}
    if not out.ok:
        tail = "".join(out.log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run {key} exited with {out.returncode} (log {out.log}):\n{tail}")
    logger.info("%s %s: MLflow run %s, step %d, %.0f s", name, out.status, out.run_id, out.step, out.seconds)
    return {"run_id": out.run_id, "seconds": round(out.seconds, 1), "gpu": gpu, "host": host_name()}


def _sweep_name(path: str) -> str:
    """A sweep or study file's ``name:`` (what its MLflow parent run and artifacts are named after), else its stem."""
    import yaml

    try:
        name = (yaml.safe_load((project_dir() / path).read_text()) or {}).get("name")
    except Exception:  # noqa: BLE001 - a bad file is refused by the flow itself, with its own message
        name = None
    return str(name or Path(path).stem)


def _sweep_run_name(p: dict[str, Any]) -> str:
    return "sweep " + _sweep_name(sweep_path(p.get("sweep", "smoke"), p.get("sweep_file") or ""))


# validate_parameters=False: @form checks the parameters (one line per bad field), not Prefect
@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True, validate_parameters=False,
      flow_run_name=run_name(_sweep_run_name))  # fmt: skip
@form
def sweep(
    sweep: Annotated[ShippedSweep, Field(description="a shipped sweep (the file sweeps/NAME.yaml)")] = "smoke",
    sweep_file: Annotated[str, Field(description="another sweep YAML, e.g. sweeps/my.yaml; given, it replaces "
                                     "sweep")] = "",  # fmt: skip
    overrides: Annotated[list[str], Field(description="section.field=value for every run")] = [],  # noqa: B006
    seeds: Annotated[list[int] | None, Field(description="train.seed values; empty: the sweep file's")] = None,
    concurrency: Annotated[int | None, Field(ge=1, le=1024, description="runs at once; empty: one per GPU of this "
                                             "machine, or on a work pool every run queued for any free GPU")] = None,  # fmt: skip
    force: Annotated[bool, Field(description="re-run configs that already finished")] = False,
    gpus: Gpus = "",
    retries: RunRetries = 1,
    dispatch: WhereRuns = Dispatch.AUTO,
    shared_checkpoints: Annotated[bool, Field(description="train.output_dir is a folder every machine shares: a "
                                              "run resumes on any machine, not only where it stopped")] = False,  # fmt: skip
    workdir: Annotated[str, Field(description="configs, logs and GPU locks of the runs")] = ".rpg/sweeps",
) -> list[dict[str, Any]]:
    """Train every run of a sweep file (seeds x grid): skip the finished ones, submit the rest (this machine's GPUs,
    or the team's work pool), show their progress, retry, summarise; cancelling it cancels its runs."""
    from rpg_core.sweeps import expand, load_sweep

    _enter_project()
    sweep_file = sweep_path(sweep, sweep_file)
    logger = get_run_logger()
    where = dispatch if dispatch is not Dispatch.AUTO else (Dispatch.POOL if pool_of_current_run() else Dispatch.LOCAL)
    if where is Dispatch.LOCAL:
        check_gpus(gpus)
        devices, concurrency = local_devices(gpus, concurrency)
        gpus = ",".join(devices) or "cpu"  # resolved here, once: the tasks run on this machine
    exp = expand(load_sweep(sweep_file, overrides=overrides or None, seeds=seeds or None)).require_runs()
    sw = exp.sweep
    if not exp.runs:
        raise ValueError(f"sweep {sw.name}: no valid runs ({len(exp.dropped)} combinations dropped)")
    first = exp.runs[0].config
    uri = first.tracking.tracking_uri or default_tracking_uri()
    experiment = first.tracking.experiment
    ensure_experiment(uri, experiment)  # once, before the processes fan out (SQLite migrations race)
    for r in collect_lost(experiments=experiment, tracking_uri=uri):  # RUNNING in MLflow, no process: said so
        logger.warning("run %s (%s) has no live process: ended FAILED, rpg.exit=lost (%s); it resumes from its "
                       "checkpoint if it is part of this sweep", r.name, r.run_id, r.reason)  # fmt: skip
    done = {} if force else finished_runs(uri, experiment)
    todo = [r for r in exp.runs if r.config.run_key() not in done]
    logger.info("sweep %s: %d runs (%d seeds), %d already finished, %d to run (%d dropped combinations), on %s",
                sw.name, len(exp.runs), len(sw.seeds), len(exp.runs) - len(todo), len(todo), len(exp.dropped),
                "the work pool" if where is Dispatch.POOL else f"this machine ({gpus})")  # fmt: skip
    work = str(Path(workdir) / sw.name)
    params = {"sweep_file": sweep_file, "runs": len(exp.runs), "seeds": ",".join(map(str, sw.seeds)),
              "concurrency": concurrency or 0, "overrides": " ".join(overrides), "force": force,
              "dispatch": where.value}  # fmt: skip
    with parent_run(RunKind.SWEEP, experiment=experiment, name=f"sweep-{sw.name}", tracking_uri=uri, params=params,
                    tags={"sweep": sw.name}) as parent:  # fmt: skip
        t0 = time.perf_counter()
        view = _mlflow_view(sw.name, uri, experiment, [r.config for r in exp.runs])
        if view:
            logger.info("sweep %s: its runs in MLflow (design axes and headline metrics as columns): %s", sw.name, view)
        slots = parent.run_id
        tickets = [Ticket(r.index, child_config(r.config, parent, sweep=sw.name, name=r.run_name(sw.name)),
                          name=r.run_name(sw.name)) for r in todo]  # fmt: skip
        progress = Progress(f"sweep-{re.sub(r'[^a-z0-9-]+', '-', sw.name.lower())}", f"sweep {sw.name}", parent,
                            skipped=len(exp.runs) - len(todo))  # fmt: skip
        held = min(concurrency, len(todo)) if where is Dispatch.LOCAL else 0
        if held:
            ensure_gpu_limit(concurrency)
            _LOCAL_SLOTS[slots] = threading.Semaphore(concurrency)
        dispatcher = make_dispatcher(where, parent, task=train_run, workdir=work, gpus=gpus, retries=retries,
                                     fresh=force, slots=slots, shared_checkpoints=shared_checkpoints)  # fmt: skip
        try:
            with gpu_slots(held) if held else contextlib.nullcontext():
                # at most `concurrency` runs exist at once: a run waiting for a GPU slot is "queued" in the progress
                # artifact, not a task run shown as Running while it waits
                _drive(dispatcher, tickets, progress, limit=concurrency)
        finally:
            _LOCAL_SLOTS.pop(slots, None)
        rows = _summary(exp.runs, done, tickets, uri)
        progress.update(tickets)
        parent.log_table(rows, "summary.json")
        _answer(sw.name, uri, parent, logger, view)
        failed = sum(t.state is not RunState.FINISHED for t in tickets)
        parent.log_metrics({"runs_finished": sum(t.state is RunState.FINISHED for t in tickets),
                            "runs_failed": failed, "seconds": time.perf_counter() - t0})  # fmt: skip
        if failed:  # the parent run ends FAILED
            first = next(t for t in tickets if t.state is not RunState.FINISHED)
            raise RuntimeError(
                f"sweep {sw.name}: {failed} of {len(todo)} runs failed; re-run to complete the missing ones. "
                f"First: {first.name} {first.state.value}: {first.message[:600]}"
            )
    return rows


def _mlflow_view(name: str, uri: str, experiment: str, configs: list[RunConfig]) -> str | None:
    """The sweep's saved view in the MLflow UI (rpg_core.mlflow_view: its training runs only, the method, the design
    axes its runs differ in and the seed as columns, the headline metrics first), as a link when the UI's address is
    known (``$RPG_MLFLOW_URL``, else the tracking server); None (said in the log) when it cannot be written."""
    from rpg_core.mlflow_view import runs_view, ui_url
    from rpg_core.tracking import AXIS_TAGS

    tags = [c.axis_tags() for c in configs]
    varied = [a for a in AXIS_TAGS if a not in ("method", "design", "config_key", "objective_key", "seed", "preset")
              and len({t[a] for t in tags}) > 1]  # fmt: skip
    try:
        fragment = runs_view(uri, experiment, sweep=name, axes=(*varied, "seed"))
    except Exception as e:  # noqa: BLE001 - a link is a convenience: the sweep runs without it
        get_run_logger().warning("sweep %s: no MLflow view: %s: %s", name, type(e).__name__, e)
        return None
    from flows.summary import mlflow_base

    return ui_url(fragment) or ui_url(fragment, mlflow_base(uri))


def _answer(name: str, uri: str, parent, logger, view: str | None = None) -> None:
    """What the sweep found, where a user looks: its configurations ranked by the headline metric over seeds
    (flows/summary.py) on the parent MLflow run (``ranked.json``, ``ranked.md``, its description) and as the Prefect
    Markdown artifact ``sweep-<name>``; the last log line says the best and links to the comparison views."""
    from prefect.artifacts import create_markdown_artifact

    from flows.summary import comparison_links, rank

    key = f"sweep-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}"
    try:
        ranking = rank(name, tracking_uri=uri)
    except ValueError as e:  # no training run of the sweep reached MLflow (every one failed before tracking)
        logger.warning("sweep %s: nothing to rank: %s", name, e)
        return
    ranking.log_to(parent)
    create_markdown_artifact(ranking.markdown(), key=key, description=f"sweep {name}: {ranking.headline()}")
    logger.info("sweep %s: %s; compare: %s", name, ranking.headline(), " · ".join(comparison_links(name, uri, view)))


def _drive(dispatcher, tickets: list[Ticket], progress: Progress, *, limit: int | None, poll_s: float = 1.0) -> None:
    """Start the tickets (at most ``limit`` unfinished at once, if given), refresh their states until all are done,
    and keep the progress artifacts current. Cancelled (Prefect's termination signal, an interrupt): cancel every
    unfinished run, record them as cancelled, and let the cancel go on."""
    waiting = list(tickets)
    try:
        dispatcher.plan(tickets)
        progress.update(tickets)
        while True:
            active = sum(1 for t in tickets if t.attempts and not t.done)
            while waiting and (limit is None or active < limit):
                dispatcher.start(waiting.pop(0))
                active += 1
            changed = dispatcher.refresh(tickets)
            if changed:
                progress.update(tickets)
            if not waiting and all(t.done for t in tickets):
                return
            time.sleep(poll_s)
    except BaseException:
        dispatcher.cancel(tickets)
        with contextlib.suppress(Exception):
            progress.update(tickets)
        raise


def _summary(runs, done: dict[str, str], tickets: list[Ticket], uri: str) -> list[dict[str, Any]]:
    """One row per run of the sweep: skipped (finished earlier), or its ticket's outcome; with headline metrics."""
    by_key = {t.run_key: t for t in tickets}
    rows: list[dict[str, Any]] = []
    for r in runs:
        run_key = r.config.run_key()
        row: dict[str, Any] = {"index": r.index, "key": r.key, "seed": r.seed, **r.axes,
                               "method": r.config.method_name()}  # fmt: skip
        if run_key in done:
            row.update(status="skipped (finished)", run_id=done[run_key])
        else:
            t = by_key[run_key]
            status = "finished" if t.state is RunState.FINISHED else t.state.value
            if t.state is RunState.FAILED:
                status = f"failed: {t.message[:200]}"
            row.update(status=status, run_id=t.run_id, host=t.host, gpu=t.gpu,
                       seconds=None if t.seconds is None else round(t.seconds, 1))  # fmt: skip
        rows.append(row)
    _add_metrics(rows, uri)
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


def _tune_run_name(p: dict[str, Any]) -> str:
    return "tune " + _sweep_name(sweep_path(p.get("study", "tune_smoke"), p.get("study_file") or ""))


@flow(name="tune", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True, validate_parameters=False,
      flow_run_name=run_name(_tune_run_name))  # fmt: skip
@form
def tune(
    study: Annotated[ShippedStudy, Field(description="a shipped study (the file sweeps/NAME.yaml)")] = "tune_smoke",
    study_file: Annotated[str, Field(description="another study YAML (a sweep with a search: section); given, it "
                                     "replaces study")] = "",  # fmt: skip
    overrides: Annotated[list[str], Field(description="section.field=value for every trial")] = [],  # noqa: B006
    trials: Annotated[int | None, Field(ge=1, le=10000, description="trials in all (running ones count); "
                                        "empty: the study file's budget")] = None,  # fmt: skip
    seeds: Annotated[list[int] | None, Field(description="train.seed values of every trial; empty: the file's")] = None,
    concurrency: Annotated[int | None, Field(ge=1, le=1024, description="runs at once; empty: one per GPU of this "
                                             "machine, or 4 on a work pool")] = None,  # fmt: skip
    prune: Annotated[bool, Field(description="stop trials whose learning curves fall behind (the file's pruner)")] = True,
    gpus: Gpus = "",
    retries: RunRetries = 1,
    dispatch: WhereRuns = Dispatch.AUTO,
    workdir: Annotated[str, Field(description="configs, logs and GPU locks of the runs")] = ".rpg/tune",
) -> list[dict[str, Any]]:
    """Tune a study file with Optuna: each trial's runs go where a sweep's go (this machine's GPUs, or the team's
    work pool), learning curves are pruned, and re-triggering continues the same study (flows/tuner.py)."""
    from flows.dispatch import PoolDispatcher
    from flows.tuner import run_study
    from rpg_core.tuning import load_study

    _enter_project()
    study_file = sweep_path(study, study_file)
    load_study(study_file, overrides or None, seeds or None)  # a bad file fails here, before any compute
    where = dispatch if dispatch is not Dispatch.AUTO else (Dispatch.POOL if pool_of_current_run() else Dispatch.LOCAL)
    if where is Dispatch.LOCAL:
        check_gpus(gpus)
        devices, concurrency = local_devices(gpus, concurrency)
        gpus = ",".join(devices) or "cpu"
    concurrency = concurrency or 4
    progress: dict[str, Progress] = {}

    def on_change(name: str, tickets: list[Ticket]) -> None:
        if name in progress:
            progress[name].update(tickets)

    def make(parent, name: str):
        progress[name] = Progress(f"tune-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}", f"study {name}", parent)
        if where is Dispatch.POOL:
            return PoolDispatcher(parent, pool=pool_of_current_run() or "", workdir=str(Path(workdir) / name),
                                  gpus=gpus, retries=retries)  # fmt: skip
        slots = parent.run_id
        _LOCAL_SLOTS[slots] = threading.Semaphore(concurrency)
        return make_dispatcher(Dispatch.LOCAL, parent, task=train_run, workdir=str(Path(workdir) / name), gpus=gpus,
                               retries=retries, slots=slots)  # fmt: skip

    logger = get_run_logger()
    held = concurrency if where is Dispatch.LOCAL else 0
    if held:
        ensure_gpu_limit(concurrency)
    try:
        with gpu_slots(held) if held else contextlib.nullcontext():
            summaries = run_study(study_file, make_dispatcher=make, overrides=overrides or None, seeds=seeds or None,
                                  trials=trials, concurrency=concurrency, prune=prune, say=logger.info,
                                  on_change=on_change)  # fmt: skip
    finally:
        for p in progress.values():
            _LOCAL_SLOTS.pop(p.parent.run_id, None)
    rows = []
    for sm in summaries:
        for t in sm["trials"]:
            rows.append({"study": sm["study"], "trial": t["number"], "state": t["state"], "value": t["value"],
                         **{k: t["params"].get(k) for k in sorted({p for x in sm["trials"] for p in x["params"]})},
                         "config_key": t["config_key"], "mlflow_run_id": t["mlflow_run_id"], "note": t["note"]})  # fmt: skip
        create_table_artifact(rows, key=f"tune-{re.sub(r'[^a-z0-9-]+', '-', sm['study'].lower())}",
                              description=f"study {sm['study']}: best {sm['best']}")  # fmt: skip
    return summaries


def _train_run_name(p: dict[str, Any]) -> str:
    """A train flow run's name: its MLflow run's (a sweep's ``<sweep>/<design>-s<seed>``, else ``<design>-s<seed>``)."""
    import yaml

    from rpg_core.config import load_run_config

    if p.get("config_yaml"):
        cfg = RunConfig.from_dict(yaml.safe_load(p["config_yaml"]))
    else:
        cfg = load_run_config(str(project_dir() / p.get("config", "configs/demo_add2_urkl.yaml")),
                              overrides=p.get("overrides") or None)  # fmt: skip
    return cfg.tracking.run_name or f"{cfg.design_name()}-s{cfg.train.seed}"


@flow(name="train", log_prints=True, validate_parameters=False, flow_run_name=run_name(_train_run_name))
@form
def train(
    config: Annotated[str, Field(description="a run config YAML")] = "configs/demo_add2_urkl.yaml",
    overrides: Annotated[list[str], Field(description="section.field=value")] = [],  # noqa: B006
    gpus: Gpus = "",
    fresh: Annotated[bool, Field(description="ignore the config's checkpoints")] = False,
    workdir: Annotated[str, Field(description="configs, logs and GPU locks")] = ".rpg/sweeps",
    retries: Annotated[int, Field(ge=0, le=10, description="retries of a failed process, here (each resumes)")] = 0,
    config_yaml: Annotated[str, Field(description="a whole run config as YAML (what a sweep sends); "
                                                  "replaces config and overrides")] = "",  # fmt: skip
) -> dict[str, Any]:
    """One training run as its own process (one slot of ``rpg-gpu-<host>``, one GPU of this machine); resumes unless
    ``fresh``. A sweep on a work pool submits each of its runs as a flow run of this deployment."""
    import yaml

    from rpg_core.config import load_run_config

    _enter_project()
    check_gpus(gpus)
    cfg = RunConfig.from_dict(yaml.safe_load(config_yaml)) if config_yaml else load_run_config(config, overrides=overrides or None)
    devices = gpus_of(gpus)
    ensure_gpu_limit(max(1, len(devices)))
    _say_where_it_resumes(cfg)
    work = str(Path(workdir) if config_yaml else Path(workdir) / "single")
    out = train_run.with_options(retries=retries, retry_delay_seconds=2, task_run_name=f"train-{cfg.run_key()}")(
        0, cfg.run_key(), cfg.to_yaml(), work, ",".join(devices) or "cpu", fresh
    )
    return {"key": cfg.key(), "run_key": cfg.run_key(), **out}


def _say_where_it_resumes(cfg: RunConfig) -> None:
    """Before a run starts on this machine: resume from the checkpoint here, or say that it starts over because its
    earlier attempt ran on another machine whose run folder this one cannot reach."""
    from rpg_core import checkpoints

    logger = get_run_logger()
    ckpt = checkpoints.latest_good(Path(cfg.train.output_dir) / cfg.run_key(), checksums=False)[0]
    if ckpt is not None:
        logger.info("%s resumes from %s on %s", cfg.run_key(), ckpt, host_name())
        return
    uri = cfg.tracking.tracking_uri or default_tracking_uri()
    earlier = find_runs(kind=RunKind.TRAIN, config_key=cfg.key(), seed=cfg.train.seed, tracking_uri=uri,
                        parent_run_id=cfg.tracking.parent_run_id or None, limit=1)  # fmt: skip
    if not earlier.empty and earlier["status"].iloc[0] != RunStatus.FINISHED and earlier["host"].iloc[0] != host_name():
        logger.warning("%s starts over on %s: its earlier attempt (MLflow run %s) ran on %s, whose checkpoints this "
                       "machine cannot reach (set train.output_dir to a folder every machine shares to resume across "
                       "machines)", cfg.run_key(), host_name(), earlier["run_id"].iloc[0], earlier["host"].iloc[0])  # fmt: skip


@flow(name="evaluate", log_prints=True, validate_parameters=False,
      flow_run_name=run_name(lambda p: f"evaluate {p.get('model')}"))  # fmt: skip
@form
def evaluate(
    model: Annotated[str, Field(description="smollm2-135m | Hub id | model dir | checkpoint or run dir | MLflow run id")],
    benchmarks: Benchmarks = ["aime24", "aime25", "amc23"],  # noqa: B006
    k: SamplesK = 32,
    max_new_tokens: MaxNewTokens = None,
    limit: ProblemLimit = None,
    precision: EvalPrecision = Precision.FP32,
    engine: EvalEngine = GeneratorKind.PREFIX,
    gpus: Gpus = "",
    tracking_uri: TrackingUri = None,
    workdir: EvalWorkdir = ".rpg/sweeps",
) -> dict[str, float]:
    """``rpg eval`` of one model or checkpoint in its own process; a checkpoint's results go into its training run."""
    _enter_project()
    check_gpus(gpus)
    return eval_run(model, list(benchmarks), k, max_new_tokens, limit, precision, gpus, tracking_uri or None, workdir,
                    engine)


@task(task_run_name="eval-{model}")
def eval_run(model: str, benchmarks: list[str], k: int, max_new_tokens: int | None, limit: int | None,
             precision: str, gpus: str, tracking_uri: str | None, workdir: str,
             engine: str = GeneratorKind.PREFIX) -> dict[str, float]:  # fmt: skip
    import json
    import os
    import subprocess
    import sys
    import tempfile

    gpu_limit = ensure_gpu_limit()
    args = ["--model", model, "--benchmarks", ",".join(benchmarks), "--k", str(k),
            "--precision", Precision(precision).value, "--engine", GeneratorKind(engine).value]  # fmt: skip
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--limit", limit), ("--tracking-uri", tracking_uri)):
        if value is not None:
            args += [flag, str(value)]
    with gpu_slots(1), GpuPool.parse(gpus, Path(workdir) / "locks" / gpu_limit).acquire() as gpu:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "eval.json"
            proc = subprocess.run([sys.executable, "-m", "rpg_core.cli", "eval", *args, "--output", str(out)],
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, capture_output=True, text=True)  # fmt: skip
            print(proc.stdout[-4000:])
            if proc.returncode != 0:
                raise RuntimeError(f"rpg eval {model} exited with {proc.returncode}: {proc.stderr[-2000:]}")
            return json.loads(out.read_text())["metrics"]


def _nightly_run_name(p: dict[str, Any]) -> str:
    return f"nightly {time.strftime('%Y-%m-%d')}" + (f" {p['model']}" if p.get("model") else "")


@flow(name="nightly_eval", log_prints=True, validate_parameters=False, flow_run_name=run_name(_nightly_run_name))
@form
def nightly_eval(
    model: Annotated[str, Field(description="evaluate this model; empty: runs finished since the last nightly")] = "",
    benchmarks: Benchmarks = ["aime24", "aime25", "amc23"],  # noqa: B006
    k: SamplesK = 32,
    max_new_tokens: MaxNewTokens = None,
    limit: ProblemLimit = None,
    precision: EvalPrecision = Precision.FP32,
    engine: EvalEngine = GeneratorKind.PREFIX,
    experiment: Annotated[str, Field(description="MLflow experiment of the training runs")] = "rpg",
    tracking_uri: TrackingUri = None,
    gpus: Gpus = "",
    workdir: EvalWorkdir = ".rpg/sweeps",
) -> list[dict[str, Any]]:
    """Evaluate the newest checkpoints on AIME24/AIME25/AMC23: every training run finished since the previous
    nightly (recorded as a ``nightly`` run in the ``rpg-eval`` experiment), or the named ``model``. Each
    checkpoint's results land in its own training run."""
    from rpg_core.evaluation import EVAL_EXPERIMENT

    _enter_project()
    check_gpus(gpus)
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
                    tracking_uri=uri, params={"benchmarks": ",".join(benchmarks), "k": k,
                                              "engine": GeneratorKind(engine).value}) as nightly:  # fmt: skip
        for target in targets:
            fut = eval_run.submit(target, list(benchmarks), k, max_new_tokens, limit, precision, gpus, uri, workdir,
                                  engine)
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
