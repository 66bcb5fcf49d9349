"""The read API: everything that reads results from MLflow (the flows' dedupe and summaries, the nightly evaluation,
``rpg eval``'s target lookup, plots, dashboards, a tuner) finds runs and loads their values here, as pandas
DataFrames. Writing goes through ``rpg_core.tracking``.

* **Which runs.** ``find_runs`` filters in MLflow's own search (one query per 1000 runs) on what a run says it is:
  its ``rpg.kind`` tag (``RunKind``: train | eval | sweep | tune | nightly), experiment, sweep (tag ``sweep``),
  config key (tag ``config_key``), group (tag ``rpg.group``: the config key, which the seeds of one configuration
  share), seed (tag ``seed``), any tags, status, parent run and end time. One run of a sweep is its config key and
  its seed.
  A training run written before the ``rpg.kind`` tag existed is recognised by its ``run_dir`` tag without an
  ``rpg.kind`` (legacy runs): ``kind=TRAIN`` finds both, and both read ``kind == "train"``.
* **One row per run.** ``run_id, name, experiment, kind, status, lifecycle, start_time, end_time`` (UTC timestamps),
  ``parent_run_id, sweep, run_dir, group, host, gpu, checkpoint_step`` (tags ``mlflow.parentRunId``, ``sweep``, ``run_dir``,
  ``rpg.group``, ``rpg.host``: the machine, ``rpg.gpu``: e.g. ``cuda:0 NVIDIA H200`` or ``cpu``; host and gpu are
  where the run last (re)started), ``checkpoint_step`` (tag ``rpg.checkpoint_step``: the step of its newest complete
  checkpoint, on ``host``'s disk; None before the first), one column per design axis (``rpg_core.tracking.AXIS_TAGS``: method, design, form,
  direction, normalized, estimator, clip, agg, beta, advantage, reference, config_key, model, task, seed, ...;
  as strings, missing: NA, ``pd.isna``), the params asked for (column = param name, e.g. ``optim.lr``), then one
  column per metric with its final value (MLflow's latest: the value at the largest step). A metric whose name is
  already a column is ``metrics.<name>``; ``final_metrics(row)`` gives them back by name.
* **Histories** (``histories``): a long frame ``run_id, key, step, value, timestamp`` at full resolution, sorted by
  run, key, step, timestamp.

Batched histories, measured in ``benchmarks/bench_runs.py`` (20 runs x 10 metrics x 50 steps, SQLite):

* ``MlflowClient.get_metric_history`` is one call per run per metric (200 calls for 20 x 10).
* ``MlflowClient`` has no bulk history in MLflow 3.17. The stores' ``get_metric_history_bulk_interval`` (the UI's
  chart endpoint) *samples* each run to ``max_results`` points (the server allows at most 2500 per run) and the SQL
  store still queries run by run: not full resolution, not batched.
* Chosen: one query per metric over up to 500 runs at once. For SQL stores (sqlite/postgresql/mysql URIs), the query
  of ``SqlAlchemyStore.get_metric_history_bulk`` (the store method behind the server's ``get-history-bulk`` endpoint):
  full resolution, one ``SELECT ... WHERE key = ? AND run_uuid IN (...)`` on the store's own table model, read as
  plain rows rather than ORM objects: 111813 points of 183 runs x 13 metrics in 0.75 s, against 6.2-7.2 s for
  the store method itself (loaded 2-core machine, the store of benchmarks/bench_report.py). For a
  tracking server (http/https URIs), that endpoint, ``/ajax-api/2.0/mlflow/metrics/get-history-bulk``: at most 100
  runs and 25000 points a request, so a full answer may be cut: the chunk of runs is halved and asked again, and one
  run with more points than that is read page by page (``get_metric_history``). Other stores (file store): the
  per-run loop. Round trips grow with the number of metric names (x runs/500 or runs/100), not runs x metrics.
  Measured (benchmarks/bench_runs.py, 10000 points, loaded 2-core machine): SQLite 200 queries 654 ms (naive) vs
  10 queries 510 ms: locally the per-point cost (MLflow builds an ORM object per point) dominates, not the trips;
  tracking server 400 requests 5.5 s vs 10 requests 0.98 s (5.6x), where each trip costs a request.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import os
import time
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import pandas as pd

from rpg_core.tracking import (
    AXIS_TAGS,
    CHECKPOINT_TAG,
    GPU_TAG,
    GROUP_TAG,
    HEARTBEAT_S,
    HEARTBEAT_TAG,
    HOST_TAG,
    KIND_TAG,
    RunKind,
    default_tracking_uri,
)

__all__ = [
    "HISTORY_COLUMNS",
    "INFO_COLUMNS",
    "LOST_AFTER_S",
    "LostRun",
    "collect_lost",
    "lost_runs",
    "RunStatus",
    "final_metrics",
    "find_runs",
    "get_run",
    "get_runs",
    "histories",
    "list_artifacts",
    "load_table",
    "run_tags",
]

LEGACY_TRAIN_TAG = "run_dir"  # the trainer's run folder; before rpg.kind, the only mark of a training run
SWEEP_TAG = "sweep"
PARENT_TAG = "mlflow.parentRunId"
SEED_TAG = "seed"  # an axis tag (RunConfig.axis_tags())
INFO_COLUMNS = ("run_id", "name", "experiment", "experiment_id", "kind", "status", "lifecycle", "start_time", "end_time",
                "parent_run_id", "sweep", "run_dir", "group", "host", "gpu", "checkpoint_step")  # fmt: skip
HISTORY_COLUMNS = ("run_id", "key", "step", "value", "timestamp")

_PAGE = 1000  # runs per search page (MLflow's default page size)
_SQL_RUNS = 500  # run ids per bulk-history query (an IN list; far below SQLite's 32766 variables)
_HTTP_RUNS = 100  # the server's limit of run ids per get-history-bulk request (MAX_RUN_IDS_PER_REQUEST)
_HTTP_MAX_ROWS = 25000  # the server's limit of points per get-history-bulk answer (MAX_HISTORY_RESULTS)
_BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"


class RunStatus(StrEnum):
    """An MLflow run's status (``mlflow.entities.RunStatus`` names)."""

    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


# -- finding runs ------------------------------------------------------------------------------------------------------


def find_runs(
    *,
    kind: RunKind | str | None = None,
    experiments: str | Sequence[str] | None = None,
    sweep: str | None = None,
    config_key: str | None = None,
    group: str | None = None,
    seed: int | None = None,
    status: RunStatus | str | Sequence[RunStatus | str] | None = None,
    tags: Mapping[str, str | None] | None = None,
    parent_run_id: str | None = None,
    ended_after: int | dt.datetime | None = None,
    limit: int | None = None,
    params: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """The active runs matching every filter given, newest first, one row each (columns: module docstring).

    ``config_key`` and ``group`` (a training run's ``RunConfig.key()``, tags ``config_key`` and ``rpg.group``)
    find every seed of a configuration; ``seed`` (tag ``seed``) one of them. ``experiments``: names (None: every
    active experiment; an unknown name matches nothing). ``tags``: ``{name: value}``, a None value meaning "has no
    such tag". ``status``: one or several. ``ended_after``: end time strictly after (epoch ms or a datetime).
    ``limit``: at most this many (the newest). ``params``: param names to add as columns. Bad filter values raise
    ValueError naming the argument.
    """
    kind = _enum(RunKind, kind, "kind")
    statuses = [_enum(RunStatus, s, "status") for s in ([status] if isinstance(status, str) else status or [])]
    if limit is not None and limit < 1:
        raise ValueError(f"limit: {limit} must be >= 1")
    client = _client(tracking_uri)
    exps = _experiments(client, experiments)
    if not exps:
        return _frame([], {}, params)
    where: dict[str, str | None] = dict(tags or {})
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed: {seed!r} must be an int")
        seed = int(seed)
    filters = ((SWEEP_TAG, sweep), ("config_key", config_key), (GROUP_TAG, group), (SEED_TAG, seed),
               (PARENT_TAG, parent_run_id))  # fmt: skip
    for name, value in filters:
        if value is not None:
            where[name] = str(value)
    clauses = [_tag_clause(k, v) for k, v in where.items()]
    if ended_after is not None:
        ms = round(ended_after.timestamp() * 1000) if isinstance(ended_after, dt.datetime) else int(ended_after)
        clauses.append(f"attributes.end_time > {ms}")
    if kind is None:
        variants = [clauses]
    else:
        variants = [[*clauses, _tag_clause(KIND_TAG, kind.value)]]
        if kind is RunKind.TRAIN:  # legacy training runs: a run_dir tag, no rpg.kind
            variants.append([*clauses, _tag_clause(KIND_TAG, None), f"tags.`{LEGACY_TRAIN_TAG}` IS NOT NULL"])
    # MLflow's filter has no OR, and IN only for run ids: one search per kind variant and status
    by_status = [[f"attributes.status = {_quote(s.value, 'status')}"] for s in statuses] or [[]]
    runs: dict[str, Any] = {}
    for variant in variants:
        for st in by_status:
            for run in _search(client, list(exps), " and ".join([*variant, *st]), limit):
                runs.setdefault(run.info.run_id, run)
    ordered = sorted(runs.values(), key=lambda r: (-(r.info.start_time or 0), r.info.run_id))
    return _frame(ordered[:limit] if limit else ordered, exps, params)


# -- runs whose process is gone ------------------------------------------------------------------------------------

LOST_AFTER_S = 10 * HEARTBEAT_S  # a RUNNING run silent this long (ten missed heartbeats) has no live process


@dataclass(frozen=True)
class LostRun:
    run_id: str
    name: str
    experiment: str
    reason: str


def lost_runs(*, experiments: str | Sequence[str] | None = None, tracking_uri: str | None = None,
              now: float | None = None) -> list[LostRun]:  # fmt: skip
    """The RUNNING runs whose process is gone (killed by SIGKILL, the OOM killer, a power cut: nothing ended them).
    Liveness, not age: a training run of this machine (tag ``rpg.host``) is lost when no process holds its run
    folder's lock (``checkpoints.held_by``: the kernel drops the lock with its holder), or when its folder is gone; any
    other run when its heartbeat (``tracking.HEARTBEAT_TAG``, stamped every ``HEARTBEAT_S`` by a live writer) is older
    than ``LOST_AFTER_S``. A run with neither (written before heartbeats existed) is not judged."""
    from pathlib import Path

    from rpg_core import checkpoints
    from rpg_core.tracking import host_name

    now = time.time() if now is None else now
    client = _client(tracking_uri)
    exps = _experiments(client, experiments)
    here = host_name()
    out = []
    for run in _search(client, list(exps), "attributes.status = 'RUNNING'", None) if exps else []:
        tags = run.data.tags
        run_dir, reason = tags.get(LEGACY_TRAIN_TAG), None
        if run_dir and tags.get(HOST_TAG) == here:
            if not Path(run_dir).is_dir():
                reason = f"its run folder {run_dir} on {here} is gone"
            elif checkpoints.held_by(Path(run_dir)) is None:
                reason = f"no process holds its run folder's lock ({run_dir} on {here})"
        elif tags.get(HEARTBEAT_TAG, "").isdigit():
            silent = now - int(tags[HEARTBEAT_TAG])
            if silent > LOST_AFTER_S:
                where = f" (on {tags[HOST_TAG]})" if tags.get(HOST_TAG) else ""
                reason = f"no heartbeat for {silent / 60:.0f} min{where}"
        if reason is not None:
            out.append(LostRun(run.info.run_id, run.info.run_name or "", exps[run.info.experiment_id], reason))
    return out


def collect_lost(*, experiments: str | Sequence[str] | None = None, tracking_uri: str | None = None,
                 dry_run: bool = False) -> list[LostRun]:  # fmt: skip
    """Find the lost runs (``lost_runs``) and end each FAILED with ``rpg.exit=lost`` and its reason
    (``tracking.mark_lost``), unless ``dry_run``. Run by ``rpg runs gc``, a sweep's or a study's start, and ``make up``."""
    from rpg_core.tracking import mark_lost

    lost = lost_runs(experiments=experiments, tracking_uri=tracking_uri)
    if not dry_run:
        for r in lost:
            mark_lost(r.run_id, r.reason, tracking_uri=tracking_uri)
    return lost


def get_runs(run_ids: Iterable[str], *, params: Sequence[str] = (), tracking_uri: str | None = None) -> pd.DataFrame:
    """The runs with these ids, in the order given (unknown ids are left out; deleted runs are included, their
    ``lifecycle`` is "deleted"). One search per 100 ids."""
    from mlflow.entities import ViewType

    ids = list(dict.fromkeys(run_ids))
    client = _client(tracking_uri)
    exps = _experiments(client, None, view=ViewType.ALL)
    found: dict[str, Any] = {}
    for i in range(0, len(ids), 100):
        chunk = ids[i : i + 100]
        where = f"attributes.run_id IN ({', '.join(_quote(r, 'run_ids') for r in chunk)})"
        for run in _search(client, list(exps), where, None, view=ViewType.ALL):
            found[run.info.run_id] = run
    return _frame([found[r] for r in ids if r in found], exps, params)


def get_run(run_id: str, *, params: Sequence[str] = (), tracking_uri: str | None = None) -> pd.Series | None:
    """One run's row (see ``get_runs``), or None if the store has no such run."""
    frame = get_runs([run_id], params=params, tracking_uri=tracking_uri)
    return None if frame.empty else frame.iloc[0]


def final_metrics(row: pd.Series) -> dict[str, float]:
    """``{metric name: final value}`` of one row of a frame read without ``params`` (the metrics it has)."""
    fixed = {*INFO_COLUMNS, *AXIS_TAGS}
    out = {}
    for col, value in row.items():
        if col in fixed or pd.isna(value):
            continue
        name = col.removeprefix("metrics.") if col.removeprefix("metrics.") in fixed else col
        out[name] = float(value)
    return out


# -- histories ---------------------------------------------------------------------------------------------------------


def histories(
    runs: Iterable[str] | pd.DataFrame, keys: Sequence[str] | None = None, *, tracking_uri: str | None = None
) -> pd.DataFrame:
    """Every logged point of the metrics ``keys`` (None: every metric each run has) of ``runs`` (run ids, or a frame
    with a ``run_id`` column), as a long frame ``run_id, key, step, value, timestamp`` sorted by run, key, step
    and timestamp. Batched per metric name (module docstring)."""
    ids = list(dict.fromkeys(runs["run_id"] if isinstance(runs, pd.DataFrame) else runs))
    client = _client(tracking_uri)
    if keys is None:  # which runs have which metric: one search per 100 runs
        from mlflow.entities import ViewType

        exps = _experiments(client, None, view=ViewType.ALL)
        by_key: dict[str, list[str]] = {}
        for i in range(0, len(ids), 100):
            where = f"attributes.run_id IN ({', '.join(_quote(r, 'runs') for r in ids[i : i + 100])})"
            for run in _search(client, list(exps), where, None, view=ViewType.ALL):
                for k in run.data.metrics:
                    by_key.setdefault(k, []).append(run.info.run_id)
    else:
        by_key = {k: ids for k in dict.fromkeys(keys)}
    rows: list[tuple[str, str, int, float, int]] = []
    fetch = _history_reader(client)
    for key, key_ids in by_key.items():
        rows += fetch(key_ids, key)
    frame = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    frame = frame.astype({"run_id": object, "key": object, "step": "int64", "value": "float64", "timestamp": "int64"})
    return frame.sort_values(["run_id", "key", "step", "timestamp"], kind="stable", ignore_index=True)


def _history_reader(client: Any):
    """``fetch(run_ids, key) -> [(run_id, key, step, value, timestamp), ...]`` for the client's store."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # The store behind the client: MlflowClient exposes no bulk history (private attribute, stable since MLflow 2).
    store = client._tracking_client.store

    def row(run_id: str, m: Any) -> tuple[str, str, int, float, int]:
        return (run_id, m.key, int(m.step), float(m.value), int(m.timestamp))

    def per_run(run_ids: list[str], key: str) -> list[tuple]:
        return [row(r, m) for r in run_ids for m in client.get_metric_history(r, key)]  # pages through a run

    if isinstance(store, SqlAlchemyStore):

        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import select

        table = SqlMetric.__table__
        cols = (table.c.run_uuid, table.c.key, table.c.step, table.c.value, table.c.timestamp, table.c.is_nan)

        def sql(run_ids: list[str], key: str) -> list[tuple]:
            # The rows of get_metric_history_bulk's query (the metrics table, NaN stored as is_nan, read back as NaN
            # as SqlMetric.to_mlflow_entity does) as plain tuples: building an ORM object and an entity per point made
            # 111813 points take 6-7 s; tuples 0.75 s (module docstring).
            out = []
            with store.ManagedSessionMaker() as session:
                for i in range(0, len(run_ids), _SQL_RUNS):
                    q = select(*cols).where(table.c.key == key, table.c.run_uuid.in_(run_ids[i : i + _SQL_RUNS]))
                    out += [(r, k, int(st), math.nan if nan else float(v), int(ts))
                            for r, k, st, v, ts, nan in session.execute(q)]  # fmt: skip
            return out

        return sql
    if isinstance(store, RestStore):
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        def ask(run_ids: list[str], key: str) -> list[tuple]:
            query = {"run_id": run_ids, "metric_key": key, "max_results": _HTTP_MAX_ROWS}
            resp = http_request(store.get_host_creds(), _BULK_ENDPOINT, "GET", params=query)
            got = verify_rest_response(resp, _BULK_ENDPOINT).json().get("metrics", [])
            if len(got) < _HTTP_MAX_ROWS:
                return [(m["run_id"], m["key"], int(m["step"]), float(m["value"]), int(m["timestamp"])) for m in got]
            if len(run_ids) == 1:  # one run with more points than an answer holds
                return per_run(run_ids, key)
            half = len(run_ids) // 2  # the answer may be cut: ask for fewer runs at once
            return ask(run_ids[:half], key) + ask(run_ids[half:], key)

        def http(run_ids: list[str], key: str) -> list[tuple]:
            return [r for i in range(0, len(run_ids), _HTTP_RUNS) for r in ask(run_ids[i : i + _HTTP_RUNS], key)]

        return http
    return per_run


# -- artifacts ---------------------------------------------------------------------------------------------------------


def run_tags(run_id: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """Every tag of one run (the frames hold only the axis and bookkeeping tags)."""
    return dict(_client(tracking_uri).get_run(run_id).data.tags)


def list_artifacts(run_id: str, path: str | None = None, *, tracking_uri: str | None = None) -> list[str]:
    """The artifact paths directly under ``path`` of one run (folders and files, relative to the run's root)."""
    return [f.path for f in _client(tracking_uri).list_artifacts(run_id, path)]


def load_table(run_id: str, path: str, *, tracking_uri: str | None = None) -> pd.DataFrame | None:
    """A table artifact written by ``Tracker.log_table`` (``mlflow.log_table``'s JSON, ``orient="split"``) as a
    DataFrame, or None when the run has no such artifact. Works for every artifact store (downloads the one file)."""
    import json
    import tempfile

    client = _client(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception as e:  # MLflow raises its own exceptions (or OSError) for a missing file, per store
            if "not" in str(e).lower() or isinstance(e, OSError):
                return None
            raise
        with open(local, encoding="utf-8") as f:
            data = json.load(f)
    return pd.DataFrame(data["data"], columns=data["columns"])


# -- internals ---------------------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def _enum(enum: type[StrEnum], value: Any, name: str) -> Any:
    if value is None or isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed: {[e.value for e in enum]}") from None


def _quote(value: Any, name: str) -> str:
    text = str(value.value if isinstance(value, StrEnum) else value)
    if "'" in text:  # MLflow's filter grammar has no escape for a quote inside a string
        raise ValueError(f"{name}: {text!r} contains a single quote, which an MLflow filter cannot hold")
    return f"'{text}'"


def _tag_clause(name: str, value: str | None) -> str:
    if "`" in name:
        raise ValueError(f"tags: {name!r} contains a backtick, which an MLflow filter cannot hold")
    return f"tags.`{name}` IS NULL" if value is None else f"tags.`{name}` = {_quote(value, f'tags[{name!r}]')}"


def _experiments(client: Any, names: str | Sequence[str] | None, view: Any = None) -> dict[str, str]:
    """experiment id -> name: the named ones that exist, or all (active ones unless ``view`` says otherwise)."""
    from mlflow.entities import ViewType

    if names is None:
        out, token = {}, None
        while True:
            page = client.search_experiments(view_type=view or ViewType.ACTIVE_ONLY, max_results=_PAGE,
                                             page_token=token)  # fmt: skip
            out.update({e.experiment_id: e.name for e in page})
            token = page.token
            if not token:
                return out
    out = {}
    for name in [names] if isinstance(names, str) else names:
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "active":
            out[exp.experiment_id] = exp.name
    return out


def _search(client: Any, exp_ids: list[str], where: str, limit: int | None, view: Any = None) -> list[Any]:
    from mlflow.entities import ViewType

    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(exp_ids, where, run_view_type=view or ViewType.ACTIVE_ONLY,
                                  max_results=min(_PAGE, limit or _PAGE), order_by=["attributes.start_time DESC"],
                                  page_token=token)  # fmt: skip
        out += page
        token = page.token
        if not token or (limit and len(out) >= limit):
            return out[:limit] if limit else out


def _kind(tags: Mapping[str, str]) -> str | None:
    if KIND_TAG in tags:
        return tags[KIND_TAG]
    return RunKind.TRAIN.value if LEGACY_TRAIN_TAG in tags else None


def _time(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _frame(runs: list[Any], exps: Mapping[str, str], params: Sequence[str]) -> pd.DataFrame:
    fixed = [*INFO_COLUMNS, *AXIS_TAGS, *[p for p in params if p not in INFO_COLUMNS and p not in AXIS_TAGS]]
    taken = set(fixed)
    names = sorted({k for r in runs for k in r.data.metrics})
    metric_col = {k: f"metrics.{k}" if k in taken else k for k in names}
    rows = []
    for r in runs:
        tags, info = r.data.tags, r.info
        row: dict[str, Any] = {
            "run_id": info.run_id, "name": info.run_name, "experiment": exps.get(info.experiment_id),
            "experiment_id": info.experiment_id,
            "kind": _kind(tags), "status": info.status, "lifecycle": info.lifecycle_stage,
            "start_time": _time(info.start_time), "end_time": _time(info.end_time),
            "parent_run_id": tags.get(PARENT_TAG), "sweep": tags.get(SWEEP_TAG), "run_dir": tags.get(LEGACY_TRAIN_TAG),
            "group": tags.get(GROUP_TAG), "host": tags.get(HOST_TAG), "gpu": tags.get(GPU_TAG),
            "checkpoint_step": int(tags[CHECKPOINT_TAG]) if tags.get(CHECKPOINT_TAG, "").isdigit() else None,
        }  # fmt: skip
        row.update({t: tags.get(t) for t in AXIS_TAGS})
        row.update({p: r.data.params.get(p) for p in fixed[len(INFO_COLUMNS) + len(AXIS_TAGS) :]})
        row.update({metric_col[k]: v for k, v in r.data.metrics.items()})
        rows.append(row)
    columns = [*fixed, *metric_col.values()]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("start_time", "end_time"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    return frame.astype({metric_col[k]: "float64" for k in names})
