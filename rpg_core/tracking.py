"""MLflow tracking for rpg-lab: one ``Tracker`` per training run, writing through ``MlflowClient`` with an explicit URI
(no global ``mlflow`` state, so several trackers in one process do not interfere).

* **Where.** ``default_tracking_uri()``: ``$MLFLOW_TRACKING_URI`` if set, else
  ``sqlite:///<RPG_HOME or ./.rpg>/mlflow.db`` (absolute). For every ``sqlite:`` file store, new experiments keep their
  artifacts in ``mlartifacts/`` beside the DB; MLflow 3.17's own default is ``./mlruns`` relative to the cwd.
  HTTP/Postgres stores keep their server's default artifact location.
* **Initialisation.** ``ensure_experiment(uri, name)`` creates the DB tables and the experiment once, tagged
  ``mlflow.experimentKind=custom_model_development``. MLflow 3.17's UI no longer navigates by that tag: the saved
  views of the training runs (``rpg_core.mlflow_view``, written through ``set_experiment_tags``) and their links
  (``workflowType=machine_learning``) open the UI on the runs.
  For SQLite it holds ``<db>.lock`` meanwhile: MLflow's first-use migration breaks when several processes start on
  a fresh DB.
* **Non-blocking metrics.** ``log_metrics``, ``set_tags``, ``log_text``, ``log_dict`` and ``log_table`` validate and
  snapshot their input in the caller (~6 us for 30 metrics) and queue it for one writer thread per tracker. The writer
  drains the queue, coalesces metrics and tags into ``MlflowClient.log_batch`` calls (<= 1000 entities, <= 100 tags
  each) and writes artifacts in call order. A SQLite ``log_batch`` costs ~7-15 ms whatever its size, so a slow store
  makes batches larger, not steps slower. MLflow's ``synchronous=False`` was measured and not used
  (benchmarks/bench_tracking.py): ~60 us median but p99 ~7-9 ms and a 120 ms first call, up to 10 concurrent writer
  threads on one SQLite file, and failures reach only callers that keep and wait on each returned future.
* **Failures.** If a write fails (after two retries on "database is locked"), the writer stops; the next
  ``log_*``/``set_tags``/``flush`` call, and every later one, raises ``TrackingError`` chained to MLflow's error.
  ``finish()`` still tries to end the run and raises that error only if no earlier call did, so it does not mask an
  exception the training loop is already handling in its ``finally``.
* **Metric values** are logged as given, non-finite ones included: NaN is stored as NaN; the SQL store stores +-inf as
  +-1.797e308. A divergence stays visible in the charts; stopping on it is the trainer's job. Non-numbers raise
  ``TypeError`` in the caller.
* **Names.** Metric, param and tag keys are checked in the caller against MLflow's rules in their portable form
  (letters, digits, ``_ - . /``, space; no ``:``, which MLflow refuses on Windows; a normalised relative path; at most
  250 chars). A bad key raises ``ValueError`` naming it; keys are never rewritten, so two names cannot merge.
* **Limits.** Param values over MLflow's 6000 chars and tag values over 8000 are cut to the limit, ending in
  ``...[truncated, N chars]``, before MLflow sees them. Params go in chunks of 100 (MLflow's per-batch limit).
* **Tables.** ``log_table`` writes ``mlflow.log_table``'s JSON (``orient="split"``) and keeps the run tag
  ``mlflow.loggedArtifacts`` that the UI and ``mlflow.load_table`` use. Unlike ``MlflowClient.log_table`` it replaces an
  existing file instead of appending (a resumed run that re-logs a step gets no duplicate rows), and it keeps that tag
  under the 8000-char tag limit by listing only the newest tables: ``MlflowClient.log_table`` fails with a
  ``JSONDecodeError`` after ~150 tables in one run, because MLflow truncates the tag and cannot parse it back.
* **Resume.** ``Tracker(run_id=...)`` re-attaches: same run id, status RUNNING again, params already there with the
  same value are not re-logged, and a changed param raises ``ValueError`` naming each param with old and new value.
  MLflow cannot clear ``end_time``, so the UI shows the previous end time until ``finish()``. Each metric keeps
  exactly one point per step: a killed attempt may have logged steps past its last checkpoint, and the resumed
  attempt, which recomputes them from that checkpoint, does not log them again (``log_metrics`` drops a point at or
  before the last step the run holds for that metric). The resume is exact, so the kept points are the ones the
  resumed attempt computes (tested against an uninterrupted run by SIGKILL at six points: tests/test_crash.py).
* **Disabled.** ``enabled=False`` makes every method a no-op: no MLflow import, no file touched, ``run_id`` is None.
* **Exit.** A process that exits without ``finish()`` flushes the queue at exit and ends the run as KILLED.
* **Stop requests.** A coordinator on any machine asks a running training run to stop by tagging it (``request_stop``:
  ``STOP_TAG`` = the reason, e.g. ``pruned``); the trainer reads its own run's tags once per step
  (``Tracker.stop_requested``), checkpoints, tags ``PRUNED_TAG`` (or ``STOPPED_TAG``), ends the run KILLED and
  ``rpg train`` exits with ``PRUNED_EXIT``. A read never blocks training for long: it runs in a daemon thread and is
  waited on for at most a few seconds; a failed or stalled read counts as "no request" (one warning). A restarted
  (resumed) training run deletes both tags first (``Tracker.clear_stop``), so an old request does not stop it again.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import json
import logging
import os
import posixpath
import queue
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# MLflow telemetry off unless the user opted in explicitly (stack.md §3e: DO_NOT_TRACK must be "true", not "1").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

__all__ = [
    "AXIS_TAGS",
    "EXPERIMENT_KIND_TAG",
    "CHECKPOINT_TAG",
    "GPU_TAG",
    "PRUNED",
    "PRUNED_EXIT",
    "PRUNED_TAG",
    "STOPPED_TAG",
    "STOP_TAG",
    "GROUP_TAG",
    "HOST_TAG",
    "KIND_TAG",
    "RunKind",
    "TrackingError",
    "Tracker",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten_params",
    "host_name",
    "request_stop",
    "set_run_tags",
    "stop_tags",
]

_log = logging.getLogger(__name__)

# MLflow 3.17 limits (mlflow/utils/validation.py).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000

EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
KIND_TAG = "rpg.kind"  # every run the platform writes carries it (rpg_core/runs.py finds runs by it)
# A training run's configuration key (RunConfig.key(), the seed left out): the seeds of one configuration share it, so
# a comparison groups runs by it (rpg_core.runs: column ``group``, ``find_runs(group=...)``).
GROUP_TAG = "rpg.group"
# The machine (host_name()) and the device (e.g. "cuda:0 NVIDIA H200", or "cpu") a training run last (re)started on.
HOST_TAG = "rpg.host"
# Liveness: a run's writer thread stamps HEARTBEAT_TAG (unix seconds) every HEARTBEAT_S while its process lives, even
# when nothing is logged (a long evaluation); a RUNNING run whose process is gone (SIGKILL, OOM, a power cut) is
# found by rpg_core.runs.lost_runs and ended FAILED with EXIT_TAG=LOST (mark_lost).
HEARTBEAT_TAG = "rpg.heartbeat"
HEARTBEAT_S = 30.0
EXIT_TAG = "rpg.exit"
LOST = "lost"
LOST_REASON_TAG = "rpg.lost_reason"
CHECKPOINT_TAG = "rpg.checkpoint_step"  # the step of a training run's newest complete checkpoint (on rpg.host's disk)
GPU_TAG = "rpg.gpu"
# Stopping a running training run from elsewhere (a tuner pruning a trial, on any machine): a coordinator sets STOP_TAG
# on the run (request_stop; its value is the reason). The trainer stops after the step it is on, checkpoints, tags
# PRUNED_TAG = that step when the reason is PRUNED (else STOPPED_TAG = "<reason> at step N"), ends the run KILLED, and
# `rpg train` exits with PRUNED_EXIT. A resumed run deletes STOP_TAG and PRUNED_TAG when it starts, and trains on.
STOP_TAG = "rpg.stop"
PRUNED = "pruned"  # request_stop's default reason: the tuner's pruning
PRUNED_TAG = "rpg.pruned_at_step"
STOPPED_TAG = "stopped"  # why a training run stopped early for another reason (also: train.max_minutes)
# `rpg train`'s exit status for a run that stopped on a request (flows.core.TrainOutcome.pruned); 1 and 2 are failures.
PRUNED_EXIT = 3
# The tags a training run carries per design axis (RunConfig.axis_tags() writes exactly these; rpg_core.runs reads
# them as DataFrame columns). Tags, not params: MLflow groups and filters on them, and they hold canonical values.
AXIS_TAGS = (
    "method", "design", "preset", "form", "direction", "normalized", "estimator", "kl_is_weight", "divergence", "clip", "agg",
    "beta", "advantage", "reference", "objective_key", "config_key", "model", "task", "seed",
)  # fmt: skip


class RunKind(enum.StrEnum):
    """What an MLflow run is: the value of its ``rpg.kind`` tag."""

    TRAIN = "train"  # one training run (`rpg train`)
    EVAL = "eval"  # one `rpg eval` of a model that is not a training run's checkpoint
    SWEEP = "sweep"  # a sweep's parent run
    TUNE = "tune"  # a tuning study's parent run
    NIGHTLY = "nightly"  # one nightly evaluation pass

_KEY_RE = re.compile(r"[/\w.\- ]+")


class TrackingError(RuntimeError):
    """The background MLflow writer failed, or a run cannot be attached to; ``__cause__`` holds MLflow's error."""


def host_name() -> str:
    """This machine's name as the platform records it (tag ``rpg.host``): ``$RPG_HOST`` if set (a team names its
    machines there), else ``socket.gethostname()``. The one place that decides it."""
    import socket

    return os.environ.get("RPG_HOST", "").strip() or socket.gethostname()


# -- URIs and experiments ----------------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute RPG_HOME or ./.rpg>/mlflow.db``; creates that
    directory (the DB itself comes with the first use)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    home = Path(os.environ.get("RPG_HOME") or ".rpg").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


# The stores MLflow 3.17 opens (a scheme's "+driver" variants too, e.g. postgresql+psycopg); a bare path is a file store
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str, timeout: float = 5.0, tries: int = 3) -> None:
    """Refuse, in one line, a tracking URI no run could log to, before anything loads: a scheme MLflow does not know,
    or an ``http(s)://`` server that does not answer ``/health`` (MLflow itself retries for minutes, after the model
    has loaded). Nothing listening is refused at once; a server that is there but slow (a busy machine: four runs
    starting on two cores) gets ``tries`` of ``timeout`` seconds. Raises ValueError naming the URI and what to do;
    no MLflow import."""
    import urllib.error
    import urllib.parse
    import urllib.request

    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    base = scheme.split("+", 1)[0]
    if scheme and base not in TRACKING_SCHEMES and not re.fullmatch(r"[a-z]", scheme):  # c:\... is a Windows path
        raise ValueError(f"tracking URI {uri!r}: scheme {scheme!r} is not allowed; allowed: "
                         f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local path")  # fmt: skip
    if base not in ("http", "https"):
        return
    why = ""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status == 200:
                    return
                why = f"/health answered {r.status}"
        except urllib.error.HTTPError as e:
            why = f"/health answered {e.code}"
            if e.code < 500:
                break
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            why = str(reason)
            if not isinstance(reason, TimeoutError) and not isinstance(e, TimeoutError):
                break  # refused, unknown host, bad URL: asking again changes nothing
            why = f"no answer within {timeout:g} s, {attempt + 1} times"
        if attempt + 1 < tries:
            time.sleep(1.0)
    raise ValueError(f"tracking URI {uri!r}: no MLflow server answers ({why}); start the stack (`make up`, then "
                     "`source .rpg/stack/env.sh`), or unset MLFLOW_TRACKING_URI to log to the local store "
                     ".rpg/mlflow.db")  # fmt: skip


def _sqlite_path(uri: str) -> Path | None:
    """The DB file of a ``sqlite:///`` URI (absolute), or None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def _artifact_location(uri: str) -> str | None:
    """``file:///<db dir>/mlartifacts`` for a SQLite store; None (the server's default) otherwise."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


_experiments: dict[tuple[str, str], str] = {}
_experiments_lock = threading.Lock()


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store (DB tables) and the experiment ``name`` if missing; return the experiment id.

    Call it once in the parent before fanning out processes onto one SQLite file (MLflow's first-use migration is not
    safe against concurrent processes). For SQLite it also holds ``<db>.lock`` while creating, so processes that race
    here anyway are serialised. An existing experiment gets the ``mlflow.experimentKind`` tag if it lacks one.
    """
    key = (uri, name)
    with _experiments_lock:
        if key in _experiments:
            return _experiments[key]
        db = _sqlite_path(uri)
        if db is not None:
            from filelock import FileLock

            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(db) + ".lock"):
                exp_id = _get_or_create_experiment(uri, name)
        else:
            exp_id = _get_or_create_experiment(uri, name)
        _experiments[key] = exp_id
        return exp_id


def _get_or_create_experiment(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)  # creates and migrates the DB on first use
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=_artifact_location(uri), tags=dict([EXPERIMENT_KIND_TAG])
            )
        except MlflowException as e:  # created by another process meanwhile (HTTP/Postgres stores, no file lock)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) in {uri} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another experiment name"
        )
    if EXPERIMENT_KIND_TAG[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND_TAG)
    return exp.experiment_id


def experiment_tags(experiment_id: str, tracking_uri: str | None = None) -> dict[str, str]:
    """The tags of an experiment (one read), e.g. to write a saved UI view only when it changed."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri=tracking_uri or default_tracking_uri()).get_experiment(experiment_id).tags)


def set_experiment_tags(experiment_id: str, tags: Mapping[str, str], tracking_uri: str | None = None) -> None:
    """Set tags on an experiment (one write each; MLflow has no batch for experiment tags)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)


def set_run_tags(run_id: str, tags: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    """Tag an existing run without re-attaching to it (its status and end time stay as they are), e.g. a training run
    marked as evaluated by a nightly. Keys and values are checked and cut as a Tracker's."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    clean = Tracker._clean_tags(tags)
    MlflowClient(tracking_uri=tracking_uri or default_tracking_uri()).log_batch(
        run_id, tags=[RunTag(k, v) for k, v in clean.items()]
    )


def log_artifacts_to_run(run_id: str, folder: str | os.PathLike, artifact_path: str | None = None,
                         tracking_uri: str | None = None) -> None:
    """Upload every file of ``folder`` (recursively) into an existing run's artifacts under ``artifact_path``, without
    re-attaching to it (its status and end time stay as they are): e.g. a report logged on a finished sweep's run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri or default_tracking_uri()).log_artifacts(run_id, str(folder), artifact_path)


def request_stop(run_id: str, reason: str = PRUNED, *, tracking_uri: str | None = None) -> None:
    """Ask the running training run ``run_id`` to stop after its current step (tag ``STOP_TAG`` = ``reason``): it
    checkpoints, ends KILLED and ``rpg train`` exits ``PRUNED_EXIT``. Works from any machine that reaches the store.
    A run that already ended keeps the tag until it is resumed, which deletes it."""
    if not isinstance(reason, str) or not reason.strip() or "\n" in reason:
        raise ValueError(f"request_stop: reason must be a non-empty one-line string (e.g. {PRUNED!r}), got {reason!r}")
    set_run_tags(run_id, {STOP_TAG: reason.strip()}, tracking_uri=tracking_uri)


def mark_lost(run_id: str, reason: str, tracking_uri: str | None = None) -> None:
    """End a RUNNING run whose process is gone (``rpg_core.runs.lost_runs`` decides) as FAILED, tagged
    ``EXIT_TAG=LOST`` and ``LOST_REASON_TAG=reason``. A resume of it later re-attaches and runs it on."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri or default_tracking_uri())
    set_run_tags(run_id, {EXIT_TAG: LOST, LOST_REASON_TAG: reason}, tracking_uri=client.tracking_uri)
    client.set_terminated(run_id, status="FAILED")


def stop_tags(reason: str, step: int) -> dict[str, str]:
    """The tags a training run that stopped on a request at ``step`` carries: ``PRUNED_TAG`` = step when pruned, else
    ``STOPPED_TAG`` with the reason."""
    return {PRUNED_TAG: str(step)} if reason == PRUNED else {STOPPED_TAG: f"{reason} at step {step} (stop requested)"}


# -- params ------------------------------------------------------------------------------------------------------------


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[truncated, {len(value)} chars]"
    return value[: limit - len(marker)] + marker


def _scalar(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    return v


def _as_mapping(v: Any) -> Mapping | None:
    if isinstance(v, Mapping):
        return v
    if hasattr(v, "model_dump"):  # pydantic
        return v.model_dump(mode="json")
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return None


def flatten_params(d: Mapping[str, Any] | Any, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` with string values, as MLflow params.

    Mappings (and pydantic models / dataclasses) are descended into, joining keys with ``sep``. Lists and tuples of
    scalars become one JSON value (``[1, 2]``, ``["a", "b"]``); lists holding mappings or lists are descended into with
    the index as the key (``a.0.b``). Enums become their value, None ``"None"``, bools ``"True"``/``"False"`` and other
    scalars ``str(v)``, as ``mlflow.log_params`` would. Empty mappings and lists are kept as ``"{}"``/``"[]"``. Values
    longer than MLflow's 6000-char param limit end in ``...[truncated, N chars]``.
    """
    out: dict[str, str] = {}

    def walk(v: Any, key: str) -> None:
        m = _as_mapping(v)
        if m is not None:
            if not m and key:
                out[key] = "{}"
            for k, sub in m.items():
                k = _scalar(k)
                walk(sub, f"{key}{sep}{k}" if key else str(k))
            return
        if isinstance(v, (list, tuple)):
            items = [_scalar(x) for x in v]
            if any(_as_mapping(x) is not None or isinstance(x, (list, tuple)) for x in items):
                for i, x in enumerate(items):
                    walk(x, f"{key}{sep}{i}" if key else str(i))
            else:
                out[key] = _truncate(json.dumps(items, default=str), MAX_PARAM_VALUE)
            return
        out[key] = _truncate(str(_scalar(v)), MAX_PARAM_VALUE)

    if _as_mapping(d) is None:
        raise TypeError(f"flatten_params needs a mapping (or pydantic model / dataclass), got {type(d).__name__}")
    walk(d, prefix)
    return out


# -- validation --------------------------------------------------------------------------------------------------------


def _check_key(key: Any, what: str) -> str:
    """Raise ValueError unless ``key`` is a portable MLflow metric/param/tag name."""
    if not isinstance(key, str):
        raise ValueError(f"MLflow {what} name must be a str, got {type(key).__name__}: {key!r}")
    norm = posixpath.normpath(key) if key else ""
    if (
        not _KEY_RE.fullmatch(key)
        or len(key) > MAX_KEY
        or norm != key
        or norm in (".", "..")
        or norm.startswith(("/", "../"))
    ):
        raise ValueError(
            f"invalid MLflow {what} name {key!r}: use 1-{MAX_KEY} letters, digits, '_', '-', '.', '/' and spaces, "
            "as a normalised relative path (no '//', './', '..', leading or trailing '/')"
        )
    return key


def _check_artifact_file(path: str) -> str:
    norm = posixpath.normpath(path)
    if not path or norm != path or norm.startswith(("/", "../")) or norm in (".", "..") or path.endswith("/"):
        raise ValueError(f"invalid artifact file {path!r}: use a relative posix path such as 'samples/step_0003.json'")
    return path


# -- the tracker -------------------------------------------------------------------------------------------------------

_METRICS, _TAGS, _CALL, _FLUSH, _STOP = range(5)


class Tracker:
    """One MLflow run: params and tags at start, then non-blocking metrics/artifacts, then ``finish``. See the module
    docstring for the design. Usable as a context manager (``finish("FAILED")`` on an exception)."""

    def __init__(
        self,
        experiment: str = "rpg",
        run_name: str | None = None,
        run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
        enabled: bool = True,
        mutable: Callable[[str], bool] | None = None,
        kind: RunKind | None = None,
    ) -> None:
        """``mutable(param)``: params that may change between attempts of one run (bookkeeping, e.g. a sweep's
        parent run or a time limit). On resume, a changed one keeps its logged value (MLflow params are immutable)
        and its new value goes into the tag ``rpg.changed_on_resume`` (JSON ``{param: [logged, now]}``); any other
        change is an error."""
        self.enabled = bool(enabled)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self.resumed = False
        self.previous_status: str | None = None  # on resume: the run's status before this attempt re-attached
        self._logged_upto: dict[str, int] = {}  # metric -> the last step an earlier attempt logged (on resume)
        self._finished = False
        self._stop_read: _Read | None = None
        self._stop_read_failing = False
        if not self.enabled:
            return

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or default_tracking_uri()
        self.tracking_uri = uri
        params = {_check_key(k, "param"): _truncate(str(v), MAX_PARAM_VALUE) for k, v in (params or {}).items()}
        tags = self._clean_tags({**(tags or {}), **({KIND_TAG: RunKind(kind).value} if kind is not None else {})})
        self.experiment_id = ensure_experiment(uri, experiment)
        self._client = client = MlflowClient(tracking_uri=uri)

        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                raise TrackingError(f"cannot re-attach to MLflow run {run_id!r}: not found in {uri}") from e
            if run.info.lifecycle_stage != "active":
                raise TrackingError(
                    f"cannot re-attach to MLflow run {run_id!r}: it is deleted (restore it with "
                    f"`mlflow runs restore --run-id {run_id}`)"
                )
            old = run.data.params
            changed = {k: v for k, v in params.items() if k in old and old[k] != v}
            allowed = {k: [old[k], v] for k, v in changed.items() if mutable is not None and mutable(k)}
            conflicts = [(k, old[k], v) for k, v in changed.items() if k not in allowed]
            if allowed:
                before = json.loads(run.data.tags.get("rpg.changed_on_resume", "{}"))
                tags["rpg.changed_on_resume"] = json.dumps({**before, **allowed}, sort_keys=True)
            if conflicts:
                lines = "; ".join(f"{k!r}: logged {a!r}, now {b!r}" for k, a, b in conflicts)
                raise ValueError(
                    f"cannot resume MLflow run {run_id}: {len(conflicts)} param(s) differ from the logged run "
                    f"(MLflow params are immutable): {lines}"
                )
            params = {k: v for k, v in params.items() if k not in old}
            # Exactly one point per step: what the previous attempt logged past its checkpoint is not logged again
            # (a resume is exact, so the resumed attempt computes the same values for those steps).
            self._logged_upto = {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1)
                                 for k in run.data.metrics}  # fmt: skip
            resumes = int(run.data.tags.get("rpg.resumes", "0") or 0) + 1
            tags["rpg.resumes"] = str(resumes)
            self.previous_status = run.info.status  # RUNNING: the previous attempt died without ending the run
            client.update_run(run_id, status="RUNNING")
            self.resumed = True
            self._table_paths = _parse_logged_artifacts(run.data.tags.get(LOGGED_ARTIFACTS_TAG))
        else:
            from mlflow.tracking.context.registry import resolve_tags

            all_tags = resolve_tags(tags)  # + mlflow.user, mlflow.source.*, git commit, as mlflow.start_run does
            run = client.create_run(self.experiment_id, run_name=run_name, tags=self._clean_tags(all_tags))
            run_id = run.info.run_id
            tags = {}
            self._table_paths = []
        self.run_id = run_id
        self.artifact_uri = run.info.artifact_uri

        # Params (and resume tags) synchronously: a bad value fails here, at start, not in the background.
        tags[HEARTBEAT_TAG] = str(int(time.time()))
        self._beat = time.monotonic()
        try:
            self._write_batch([], list(tags.items()), params=list(params.items()))
        except Exception:
            if not self.resumed:  # do not leave a half-made run RUNNING
                client.set_terminated(run_id, status="FAILED")
            raise

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._error_reported = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._worker, name=f"rpg-tracker-{run_id[:8]}", daemon=True)
        self._thread.start()
        _live.add(self)

    # -- public API --------------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queue ``{name: number}`` at ``step`` (default 0), timestamped now. Returns in microseconds."""
        if not self.enabled or not metrics:
            return
        self._check()
        ts = int(time.time() * 1000)
        step = 0 if step is None else int(step)
        rows = []
        for k, v in metrics.items():
            if k not in _good_metric_keys:
                _good_metric_keys.add(_check_key(k, "metric"))
            if isinstance(v, (str, bytes, bool)) or v is None:
                raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}: {v!r}")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}: {v!r}") from None
            rows.append((k, v, ts, step))
        if self._logged_upto:  # a resumed run: drop the points its killed attempt logged already
            rows = [r for r in rows if r[3] > self._logged_upto.get(r[0], -1)]
            if not rows:
                return
        self._q.put((_METRICS, rows))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values as str, cut to MLflow's 8000 chars with a marker)."""
        if not self.enabled or not tags:
            return
        self._check()
        self._q.put((_TAGS, self._clean_tags(tags)))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue ``text`` as the artifact ``artifact_file`` (replacing an existing one)."""
        if not self.enabled:
            return
        self._check()
        _check_artifact_file(artifact_file)
        self._q.put((_CALL, self._write_text, (str(text), artifact_file)))

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Queue ``d`` as YAML (``.yaml``/``.yml``, key order kept) or JSON (anything else, as ``mlflow.log_dict``).
        Serialised now, so later changes to ``d`` are not logged and unserialisable values raise here."""
        if not self.enabled:
            return
        self._check()
        _check_artifact_file(artifact_file)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(_plain(d), indent=2, default_flow_style=False, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(d, indent=2, default=str)
        self._q.put((_CALL, self._write_text, (text, artifact_file)))

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """Queue a table (one dict per row) as a ``.json`` artifact in ``mlflow.log_table``'s format, listed in the
        run's ``mlflow.loggedArtifacts`` tag so the UI and ``mlflow.load_table`` find it."""
        if not self.enabled:
            return
        self._check()
        _check_artifact_file(artifact_file)
        if not artifact_file.endswith(".json"):
            raise ValueError(f"log_table writes JSON: artifact_file must end in .json, got {artifact_file!r}")
        snapshot = [dict(r) for r in rows]
        self._q.put((_CALL, self._write_table, (snapshot, artifact_file)))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts (under ``artifact_path``). Synchronous: the file is
        read before this returns, so the caller may delete or rewrite it afterwards."""
        if not self.enabled:
            return
        self._check()
        local_path = Path(local_path)
        if not local_path.exists():
            raise FileNotFoundError(f"log_artifact: {local_path} does not exist")
        if artifact_path is not None:
            _check_artifact_file(artifact_path)
        if local_path.is_dir():
            self._client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued so far is written; raise ``TrackingError`` if the writer failed."""
        if not self.enabled or self._finished:
            return
        self._check()
        done = threading.Event()
        self._q.put((_FLUSH, done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if not self._thread.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tracker flush did not finish within {timeout} s")
        self._check()

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, stop the writer and end the run with ``status`` ("FINISHED" | "FAILED" | "KILLED"). Idempotent.
        Raises the writer's error if no earlier call has raised it."""
        if not self.enabled:
            return
        status = str(status).upper()
        if status not in RUN_STATUSES:
            raise ValueError(f"finish status must be one of {RUN_STATUSES}, got {status!r}")
        with self._lock:
            if self._finished:
                return
            self._finished = True
        _live.discard(self)
        if self._thread.is_alive():
            self._q.put((_STOP,))
            self._thread.join()
        try:
            tags = self._client.get_run(self.run_id).data.tags
            for key in (EXIT_TAG, LOST_REASON_TAG):  # judged lost while its server was unreachable: it was not
                if key in tags:
                    self._client.delete_tag(self.run_id, key)
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            if self._error is None:
                raise TrackingError(f"could not end MLflow run {self.run_id} as {status}: {e}") from e
            _log.warning("could not end MLflow run %s as %s: %s", self.run_id, status, e)
        if self._error is not None and not self._error_reported:
            self._check()

    def stop_requested(self, timeout_s: float = 5.0) -> str | None:
        """The reason of a stop request on this run (tag ``STOP_TAG``, set by ``request_stop``), else None. One
        ``get_run`` (~ms on SQLite, one HTTP GET on a server) in a daemon thread, waited on for at most ``timeout_s``:
        MLflow's HTTP client retries an unreachable server for minutes, which must not hold up training. A read that
        fails or is still stalled counts as "no request" (a warning once per outage; a stalled read is not waited on
        again, nor doubled). Disabled or finished: None."""
        if not self.enabled or self._finished:
            return None
        pending = self._stop_read
        if pending is not None and not pending.done.is_set():
            return None  # the previous read is still stalled (the server is unreachable): do not wait on it again
        read = self._stop_read = _Read(lambda: self._client.get_run(self.run_id).data.tags.get(STOP_TAG))
        if not read.done.wait(timeout_s):
            self._stop_read_failed(f"no answer within {timeout_s:g} s")
            return None
        if read.error is not None:
            self._stop_read_failed(f"{type(read.error).__name__}: {read.error}")
            return None
        self._stop_read_failing = False
        return (read.value or "").strip() or None

    def _stop_read_failed(self, why: str) -> None:
        level = logging.DEBUG if self._stop_read_failing else logging.WARNING
        self._stop_read_failing = True
        _log.log(level, "could not read the stop request of MLflow run %s (%s); training goes on", self.run_id, why)

    def clear_stop(self) -> None:
        """Delete ``STOP_TAG`` and ``PRUNED_TAG`` from this run, synchronously: a training run that (re)starts is
        not stopped by a request an earlier attempt already honoured. A run ended as lost (``mark_lost``) and now
        resumed is no longer lost: ``EXIT_TAG`` and ``LOST_REASON_TAG`` go too."""
        if not self.enabled:
            return
        tags = self._client.get_run(self.run_id).data.tags
        for key in (STOP_TAG, PRUNED_TAG, EXIT_TAG, LOST_REASON_TAG):
            if key in tags:
                self._client.delete_tag(self.run_id, key)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    def __repr__(self) -> str:
        if not self.enabled:
            return "Tracker(enabled=False)"
        return f"Tracker(run_id={self.run_id!r}, uri={self.tracking_uri!r}, finished={self._finished})"

    # -- internals ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {_check_key(k, "tag"): _truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}

    def _check(self) -> None:
        if self._error is not None:
            self._error_reported = True
            raise TrackingError(
                f"MLflow background writer for run {self.run_id} failed; nothing is logged after the failure: "
                f"{type(self._error).__name__}: {self._error}"
            ) from self._error
        if self._finished:
            raise TrackingError(f"tracker for MLflow run {self.run_id} is finished")

    def _worker(self) -> None:
        while True:
            try:  # wakes at least every HEARTBEAT_S, to stamp the heartbeat of a live process
                items = [self._q.get(timeout=max(0.0, HEARTBEAT_S - (time.monotonic() - self._beat)) + 0.01)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            metrics: list = []
            tags: dict[str, str] = {}
            stop = False
            if time.monotonic() - self._beat >= HEARTBEAT_S:
                self._beat = time.monotonic()
                items.insert(0, (_TAGS, {HEARTBEAT_TAG: str(int(time.time()))}))
            try:
                for it in items:
                    kind = it[0]
                    if kind == _METRICS:
                        metrics.extend(it[1])
                    elif kind == _TAGS:
                        tags.update(it[1])
                    else:
                        self._retry(self._write_batch, metrics, list(tags.items()))
                        metrics, tags = [], {}
                        if kind == _CALL:
                            self._retry(it[1], *it[2])
                        elif kind == _FLUSH:
                            it[1].set()
                        else:
                            stop = True
                self._retry(self._write_batch, metrics, list(tags.items()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller by _check()
                self._error = e
                _log.error("MLflow background writer for run %s failed: %s", self.run_id, e)
                for it in items:
                    if it[0] == _FLUSH:
                        it[1].set()
                return
            if stop:
                return

    @staticmethod
    def _retry(fn, *args) -> None:
        for delay in (0.2, 1.0, None):
            try:
                return fn(*args)
            except Exception as e:
                if delay is None or "database is locked" not in str(e):
                    raise
                time.sleep(delay)

    def _write_batch(self, metrics: list, tags: list, params: list | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        params = params or []
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = params[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
        for m, t in _chunks(metrics, tags):
            self._client.log_batch(
                self.run_id, metrics=[Metric(*row) for row in m], tags=[RunTag(k, v) for k, v in t]
            )

    def _write_text(self, text: str, artifact_file: str) -> None:
        name = posixpath.basename(artifact_file)
        folder = posixpath.dirname(artifact_file) or None
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, name)
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
            self._client.log_artifact(self.run_id, p, folder)

    def _write_table(self, rows: list[dict], artifact_file: str) -> None:
        import pandas as pd

        text = pd.DataFrame(rows).to_json(orient="split", index=False, date_format="iso")
        self._write_text(text, artifact_file)
        entry = {"path": artifact_file, "type": "table"}
        if entry in self._table_paths:
            return
        self._table_paths.append(entry)
        while len(self._table_paths) > 1 and len(json.dumps(self._table_paths)) > MAX_TAG_VALUE:
            del self._table_paths[0]  # MLflow's tag limit: list the newest tables only
        self._client.set_tag(self.run_id, LOGGED_ARTIFACTS_TAG, json.dumps(self._table_paths))


class _Read:
    """One call of ``fn`` in a daemon thread (a stalled MLflow read never keeps the process from exiting)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e
            finally:
                self.done.set()

        threading.Thread(target=run, name="rpg-tracker-read", daemon=True).start()


def _plain(v: Any) -> Any:
    """Mappings, sequences, enums and paths -> plain YAML-safe values."""
    m = _as_mapping(v)
    if m is not None:
        return {str(_scalar(k)): _plain(x) for k, x in m.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    v = _scalar(v)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _parse_logged_artifacts(value: str | None) -> list[dict]:
    """The ``mlflow.loggedArtifacts`` list of a run; [] if absent or cut by MLflow's tag limit (invalid JSON)."""
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return []
    return [e for e in parsed if isinstance(e, dict) and e.get("type") == "table"] if isinstance(parsed, list) else []


def _chunks(metrics: list, tags: list) -> Iterator[tuple[list, list]]:
    """Split into log_batch calls within MLflow's limits (1000 metrics, 100 tags, 1000 entities per call)."""
    mi = ti = 0
    while mi < len(metrics) or ti < len(tags):
        t = tags[ti : ti + MAX_PARAMS_TAGS_PER_BATCH]
        ti += len(t)
        m = metrics[mi : mi + min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(t))]
        mi += len(m)
        yield m, t


_good_metric_keys: set[str] = set()
_live: weakref.WeakSet[Tracker] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    """A process that exits without ``finish()``: write what is queued and end the run as KILLED."""
    for tracker in list(_live):
        try:
            tracker.finish("KILLED")
        except Exception as e:  # noqa: BLE001 - nothing left to raise to
            _log.warning("tracker %r: %s", tracker, e)
