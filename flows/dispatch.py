"""Where a coordinator's training runs execute: the run-submission unit that ``sweep`` (and the tuning flow) hand their
runs to, with two back ends behind one interface.

- ``LocalDispatcher``: each run a Prefect task in the coordinator's process, which starts one ``rpg train`` process on
  a device of this machine (``flows.submit.submit``). The flow served on one machine (``flows.serve``), or called
  directly.
- ``PoolDispatcher``: each run its own flow run of the ``train`` deployment on the coordinator's work pool
  (``run_deployment``, a sub-flow of the coordinator), so any worker with a free GPU takes it. The team set-up
  (``flows.deploy --pool``, ``infra/team/worker.sh``): every GPU machine's worker takes at most one run per GPU.

The coordinator starts tickets, refreshes their states (queued, running, finished, failed, cancelled: ``RunState``)
as it waits, and cancels them all when it is itself cancelled. A run's MLflow run (id, host, GPU, final metrics) is
read back through ``rpg_core.runs`` by its parent run, config key and seed, whichever back end ran it.

```python
dispatcher = make_dispatcher(Dispatch.AUTO, tracker, task=train_run, workdir=".rpg/sweeps/smoke", gpus="0,1", retries=1)
tickets = [dispatcher.start(Ticket(i, cfg)) for i, cfg in enumerate(configs, 1)]
while not all(t.done for t in tickets):
    dispatcher.refresh(tickets); time.sleep(2)
```
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.core import host_slug
from rpg_core.config import RunConfig
from rpg_core.config import run_key as run_key_of
from rpg_core.runs import find_runs
from rpg_core.tracking import RunKind, Tracker

__all__ = ["Dispatch", "LocalDispatcher", "PoolDispatcher", "ProcessDispatcher", "RunState", "Ticket", "make_dispatcher", "pool_of_current_run"]

TRAIN_DEPLOYMENT = "train/train"  # flows.deploy registers it on the pool (queue GPU_QUEUE)


class Dispatch(enum.StrEnum):
    """Where a coordinator's runs go: ``auto`` = the work pool when the coordinator itself runs from one (the team),
    else this machine."""

    AUTO = "auto"
    LOCAL = "local"
    POOL = "pool"


class RunState(enum.StrEnum):
    QUEUED = "queued"  # submitted, waiting for a GPU (a slot of this machine, or a worker of the pool)
    RUNNING = "running"  # its `rpg train` process is running
    FINISHED = "finished"
    FAILED = "failed"  # after its retries
    CANCELLED = "cancelled"
    PRUNED = "pruned"  # stopped on its coordinator's request (a tuning study's pruner), with its checkpoint

    @property
    def terminal(self) -> bool:
        return self in (RunState.FINISHED, RunState.FAILED, RunState.CANCELLED, RunState.PRUNED)


@dataclass
class Ticket:
    """One run handed to a dispatcher; the dispatcher keeps its state up to date."""

    index: int
    cfg: RunConfig  # the child config (nested under the coordinator's parent run)
    name: str = ""  # the Prefect task or flow run name
    state: RunState = RunState.QUEUED
    message: str = ""  # why it failed, or where it went
    run_id: str | None = None  # its MLflow run, once the trainer made one
    host: str = ""
    gpu: str = ""
    seconds: float | None = None
    attempts: int = 0  # pool: flow runs submitted for it (a crashed one is submitted again)
    flow_run_id: str | None = None  # pool: the current flow run of `train`
    future: Any = None  # local: the Prefect task future
    submitted: float = field(default_factory=time.time)
    started: float | None = None

    @property
    def run_key(self) -> str:
        return self.cfg.run_key()

    @property
    def done(self) -> bool:
        return self.state.terminal


def _mlflow_rows(parent: Tracker, tickets: Sequence[Ticket]) -> dict[str, dict[str, Any]]:
    """run key -> the newest MLflow training run of each ticket (one search): the runs tagged with the tickets' sweep
    in their experiment (a run resumed under a later sweep stays nested under the one that started it), else the
    runs nested under ``parent``."""
    first = tickets[0].cfg
    sweep = first.tracking.tags.get("sweep")
    if sweep:
        runs = find_runs(kind=RunKind.TRAIN, experiments=first.tracking.experiment, sweep=sweep,
                         tracking_uri=parent.tracking_uri)  # fmt: skip
    else:
        runs = find_runs(kind=RunKind.TRAIN, parent_run_id=parent.run_id, tracking_uri=parent.tracking_uri)
    out: dict[str, dict[str, Any]] = {}
    for row in runs.to_dict("records")[::-1]:  # newest first in the frame: the newest wins
        if row.get("config_key") and row.get("seed") is not None:
            out[run_key_of(row["config_key"], int(row["seed"]))] = row
    return out


def _fill_from_mlflow(tickets: Sequence[Ticket], parent: Tracker) -> None:
    if not tickets:
        return
    rows = _mlflow_rows(parent, tickets)
    for t in tickets:
        row = rows.get(t.run_key)
        if row is not None:
            t.run_id = row["run_id"]
            t.host = row.get("host") or t.host
            t.gpu = t.gpu or row.get("gpu") or ""  # the device it was given, where known; else what MLflow recorded


class Dispatcher:
    """The interface both back ends implement."""

    where: Dispatch

    def plan(self, tickets: Sequence[Ticket]) -> None:
        """Before the first start: anything to look up once for all the tickets."""

    def start(self, ticket: Ticket) -> Ticket:  # pragma: no cover - interface
        raise NotImplementedError

    def refresh(self, tickets: Sequence[Ticket]) -> bool:  # pragma: no cover - interface
        """Update every ticket's state; True when any changed."""
        raise NotImplementedError

    def cancel(self, tickets: Sequence[Ticket]) -> None:  # pragma: no cover - interface
        """Stop every unfinished run (they keep their last checkpoint)."""
        raise NotImplementedError

    def adopt(self, ticket: Ticket, handle: str) -> bool:
        """Take over a run an earlier coordinator started and that may still be going (``handle``: what ``start``
        recorded in ``ticket.flow_run_id``); False when it is not running any more (start it again)."""
        return False


# -- this machine ------------------------------------------------------------------------------------------------------

_STARTED: dict[str, tuple[float, str]] = {}  # ticket id -> (start time, device): written by the task once it runs
_CANCELLED: set[str] = set()  # ticket ids cancelled by their coordinator: their task must not start (or retry) a run
_STARTED_LOCK = threading.Lock()


def mark_started(ticket_id: str, gpu: str) -> None:
    with _STARTED_LOCK:
        _STARTED[ticket_id] = (time.time(), gpu)


def is_cancelled(ticket_id: str) -> bool:
    """Whether the coordinator cancelled this ticket: its task returns instead of starting a process, and a process
    that the cancel stopped is not retried (a Prefect retry 2 s later would start a new one after the cancel)."""
    with _STARTED_LOCK:
        return ticket_id in _CANCELLED


class LocalDispatcher(Dispatcher):
    """Runs as Prefect tasks of the coordinator (``flows.rpg_flows.train_run``), on this machine's devices."""

    where = Dispatch.LOCAL

    def __init__(self, parent: Tracker, *, task: Any, workdir: str, gpus: str, retries: int, fresh: bool = False,
                 slots: str = ""):  # fmt: skip
        # ``task``: the coordinator's own train_run. Passed in, not imported here: a served flow is loaded from its
        # file as a module of its own, and the task must see that module's local slots.
        self.task, self.parent, self.workdir, self.gpus, self.retries, self.fresh, self.slots = (
            task, parent, workdir, gpus, retries, fresh, slots
        )  # fmt: skip

    def _id(self, t: Ticket) -> str:
        return f"{self.parent.run_id}/{t.run_key}"

    def start(self, ticket: Ticket) -> Ticket:
        ticket.attempts += 1
        ticket.future = self.task.with_options(retries=self.retries, retry_delay_seconds=2, task_run_name=ticket.name
                                               or f"train-{ticket.index}-{ticket.run_key}").submit(
            ticket.index, ticket.run_key, ticket.cfg.to_yaml(), self.workdir, self.gpus, self.fresh, self.slots,
            self._id(ticket),
        )  # fmt: skip
        return ticket

    def refresh(self, tickets: Sequence[Ticket]) -> bool:
        before = [(t.state, t.run_id) for t in tickets]
        for t in tickets:
            if t.done or t.future is None:
                continue
            state = t.future.state
            with _STARTED_LOCK:
                started = _STARTED.get(self._id(t))
            if started is not None:
                t.started, t.gpu = started[0], started[1] or "cpu"
            if state.is_completed():
                res = t.future.result()
                t.state = RunState.PRUNED if res.get("pruned") else RunState.FINISHED
                t.seconds = res.get("seconds")
            elif state.is_cancelled():
                t.state = RunState.CANCELLED
            elif state.is_failed() or state.is_crashed():
                t.state, t.message = RunState.FAILED, str(state.message or state.name)[:300]
            elif started is not None:
                t.state = RunState.RUNNING
        if any(t.state is not RunState.QUEUED for t in tickets):
            _fill_from_mlflow(tickets, self.parent)
        return before != [(t.state, t.run_id) for t in tickets]

    def cancel(self, tickets: Sequence[Ticket]) -> None:
        from flows.core import stop_all

        with _STARTED_LOCK:
            _CANCELLED.update(self._id(t) for t in tickets if not t.done)
        for t in tickets:  # one not started yet never starts (Prefect's future wraps a concurrent.futures one)
            wrapped = getattr(t.future, "wrapped_future", None)
            if not t.done and wrapped is not None:
                wrapped.cancel()
        stop_all()  # the running ones: SIGINT, a grace period, SIGKILL
        for t in tickets:
            if not t.done:
                t.state = RunState.CANCELLED


class ProcessDispatcher(Dispatcher):
    """Without Prefect (``rpg tune`` on the command line): each run an ``rpg train`` process started from a thread
    of this process, at most ``concurrency`` at once, one device of this machine each (``GpuPool``: the same lock
    files every sweep and study of this machine takes its devices through), a failed process retried ``retries``
    times (each resumes from its checkpoint). Cancelling stops every process of this one (SIGINT, grace, SIGKILL)."""

    where = Dispatch.LOCAL

    def __init__(self, parent: Tracker, *, workdir: str, gpus: str, retries: int, concurrency: int,
                 fresh: bool = False, lock_dir: str | None = None):  # fmt: skip
        from flows.core import GpuPool, local_devices

        self.parent, self.workdir, self.retries, self.fresh = parent, workdir, retries, fresh
        devices, concurrency = local_devices(gpus, concurrency)
        self.pool = GpuPool(devices, lock_dir or f"{workdir}/locks")
        self.slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self.wake = threading.Event()  # set when a run ends: the coordinator acts at once instead of at its next poll

    def _run(self, t: Ticket) -> None:
        from flows.submit import submit

        try:
            with self.slots, self.pool.acquire() as gpu:
                if self._cancelled.is_set():
                    return
                with self._lock:
                    t.state, t.started, t.gpu = RunState.RUNNING, time.time(), gpu or "cpu"
                while True:
                    out = submit(t.cfg, workdir=self.workdir, gpu=gpu, fresh=self.fresh and t.attempts == 1)
                    with self._lock:
                        t.run_id, t.seconds = out.run_id or t.run_id, (t.seconds or 0) + out.seconds
                        if self._cancelled.is_set():
                            t.state = RunState.CANCELLED
                        elif out.ok:
                            t.state = RunState.FINISHED
                        elif getattr(out, "pruned", False):
                            t.state = RunState.PRUNED
                        elif t.attempts <= self.retries:
                            t.attempts += 1
                            t.message = f"exited with {out.returncode}: retry {t.attempts - 1} (log {out.log})"
                            continue
                        else:
                            tail = "".join(out.log.read_text().splitlines(keepends=True)[-8:])
                            t.state, t.message = RunState.FAILED, f"exited with {out.returncode} (log {out.log}):\n{tail}"
                    self.wake.set()
                    return
        except Exception as e:  # noqa: BLE001 - the ticket says what went wrong; the coordinator goes on
            with self._lock:
                t.state, t.message = RunState.FAILED, f"{type(e).__name__}: {e}"
            self.wake.set()

    def start(self, ticket: Ticket) -> Ticket:
        ticket.attempts += 1
        ticket.future = threading.Thread(target=self._run, args=(ticket,), name=f"run-{ticket.run_key}", daemon=True)
        ticket.future.start()
        return ticket

    def refresh(self, tickets: Sequence[Ticket]) -> bool:
        with self._lock:
            before = [(t.state, t.run_id) for t in tickets]
        if any(t.state is not RunState.QUEUED for t in tickets):
            _fill_from_mlflow(tickets, self.parent)
        return before != [(t.state, t.run_id) for t in tickets]

    def cancel(self, tickets: Sequence[Ticket]) -> None:
        from flows.core import stop_all

        self._cancelled.set()
        stop_all()
        for t in tickets:
            if isinstance(t.future, threading.Thread):
                t.future.join(timeout=60)
            if not t.done:
                t.state = RunState.CANCELLED


# -- the team's work pool ----------------------------------------------------------------------------------------------


def pool_of_current_run() -> str | None:
    """The work pool of the flow run this code runs in (a deployment on a pool, taken by a worker), else None
    (served by ``flows.serve``, or called directly)."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).work_pool_name


def ensure_queue(pool: str, name: str) -> None:
    """Create the work queue ``name`` in ``pool`` if it is missing: a worker polling a queue that does not exist
    takes nothing, from any of its queues (infra/team/worker.sh's own queue ``gpu-<host>``, via flows.deploy)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_queue(name=name, work_pool_name=pool)
        except ObjectAlreadyExists:
            pass


def host_queue(host: str) -> str:
    """The work queue only ``host``'s GPU worker polls (besides ``gpu``): where a run goes to resume from its
    checkpoint on that machine's disk."""
    return f"gpu-{host_slug(host)}"


class PoolDispatcher(Dispatcher):
    """Each run its own flow run of the ``train`` deployment, a sub-flow of the coordinator; any worker of the pool
    with a free GPU takes it, and that worker retries a failed process where its checkpoint is (``retries``).

    Checkpoints live on the disk of the machine that wrote them (MLflow tags ``rpg.host``, ``rpg.checkpoint_step``).
    A run with a checkpoint from an earlier attempt goes to that machine's own queue (``gpu-<host>``), so it resumes
    there; if that machine's GPU worker is offline, it goes to any machine and starts over (the train flow says so).
    With ``shared_checkpoints`` (``train.output_dir`` a folder every machine shares) every run goes to any machine and
    resumes anywhere. A flow run that crashed (its machine or worker lost) is submitted again, ``retries`` times."""

    where = Dispatch.POOL

    def __init__(self, parent: Tracker, *, pool: str, workdir: str, gpus: str, retries: int, fresh: bool = False,
                 shared_checkpoints: bool = False, deployment: str = TRAIN_DEPLOYMENT):  # fmt: skip
        self.parent, self.pool, self.workdir, self.gpus, self.retries, self.fresh = (
            parent, pool, workdir, gpus, retries, fresh
        )  # fmt: skip
        self.shared, self.deployment = shared_checkpoints, deployment
        self._resume: dict[str, tuple[str, int]] | None = None  # run key -> (host, checkpoint step)
        self._looked: set[str] = set()
        self._queue: dict[str, str] = {}  # ticket run key -> the host queue it was sent to
        self._workers_checked = 0.0

    def _resume_hosts(self, tickets: Sequence[Ticket]) -> dict[str, tuple[str, int]]:
        """run key -> (machine, step) of the newest unfinished earlier attempt that left a checkpoint (one search)."""
        if self._resume is None:
            self._resume = {}
        new = [t for t in tickets if t.run_key not in self._looked]  # a tuner plans its trials as it asks them
        self._looked.update(t.run_key for t in new)
        if new:
            tickets = new
            if not self.shared and not self.fresh and tickets:
                runs = find_runs(kind=RunKind.TRAIN, experiments=tickets[0].cfg.tracking.experiment,
                                 status=["KILLED", "FAILED", "RUNNING"], tracking_uri=self.parent.tracking_uri)  # fmt: skip
                wanted = {t.run_key for t in tickets}
                for row in runs.to_dict("records")[::-1]:  # oldest first: the newest wins
                    if row.get("config_key") and row.get("seed") is not None and row.get("checkpoint_step"):
                        key = run_key_of(row["config_key"], int(row["seed"]))
                        if key in wanted and row.get("host"):
                            self._resume[key] = (row["host"], int(row["checkpoint_step"]))
        return self._resume

    def start(self, ticket: Ticket, *, anywhere: bool = False) -> Ticket:
        from prefect.deployments import run_deployment

        ticket.attempts += 1
        queue = None
        resume = None if anywhere else (self._resume or {}).get(ticket.run_key)
        if resume is not None:
            queue = host_queue(resume[0])
            self._ensure_queue(queue)
            self._queue[ticket.run_key] = resume[0]
            ticket.message = f"resumes on {resume[0]} (checkpoint of step {resume[1]})"
        params = {"config_yaml": ticket.cfg.to_yaml(), "workdir": self.workdir, "gpus": self.gpus,
                  "fresh": self.fresh, "retries": self.retries}  # fmt: skip
        run = run_deployment(self.deployment, parameters=params, timeout=0, as_subflow=True, work_queue_name=queue,
                             flow_run_name=ticket.name or None, tags=["rpg", f"run:{ticket.run_key}"])  # fmt: skip
        ticket.flow_run_id, ticket.state = str(run.id), RunState.QUEUED
        return ticket

    def plan(self, tickets: Sequence[Ticket]) -> None:
        """Look up, once for all tickets, which machine holds each one's checkpoint (before the first start)."""
        self._resume_hosts(tickets)

    def _ensure_queue(self, name: str) -> None:
        ensure_queue(self.pool, name)

    def _offline_hosts(self) -> set[str]:
        """The machines whose GPU worker (``<host>-gpu``, infra/team/worker.sh) the pool does not list as online."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            online = {w.name.removesuffix("-gpu") for w in client.read_workers_for_work_pool(self.pool)
                      if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}  # fmt: skip
        return {h for h in self._queue.values() if h not in online}

    def refresh(self, tickets: Sequence[Ticket]) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.states import Cancelled

        before = [(t.state, t.run_id) for t in tickets]
        live = {t.flow_run_id: t for t in tickets if not t.done and t.flow_run_id}
        if live:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(live))),
                                             limit=len(live))  # fmt: skip
            offline: set[str] = set()
            waiting_on_host = [r for r in runs if live[str(r.id)].run_key in self._queue and r.state is not None
                               and (r.state.is_scheduled() or r.state.is_pending())]  # fmt: skip
            if waiting_on_host and time.monotonic() - self._workers_checked > 30:
                self._workers_checked = time.monotonic()
                offline = self._offline_hosts()
            for run in runs:
                t, state = live[str(run.id)], run.state
                if state is None:
                    continue
                host = self._queue.get(t.run_key)
                if host in offline and (state.is_scheduled() or state.is_pending()):
                    with get_client(sync_client=True) as client:
                        client.set_flow_run_state(run.id, Cancelled(message=f"{host} is offline"), force=True)
                    self._queue.pop(t.run_key, None)
                    self.start(t, anywhere=True)
                    t.message = f"{host}, which has its checkpoint, is offline: starts over on any machine"
                elif state.is_completed():
                    t.state, t.seconds = RunState.FINISHED, run.total_run_time.total_seconds()
                elif state.is_crashed() and t.attempts <= self.retries:
                    self._lost(t, run.name, state.message)
                    t.message = f"flow run {run.name} crashed ({state.message or 'no message'}): submitted again"
                    self.start(t, anywhere=True)
                elif state.is_failed() or state.is_crashed():
                    if state.is_crashed():
                        self._lost(t, run.name, state.message)
                    t.state, t.message = RunState.FAILED, str(state.message or state.name)[:300]
                elif state.is_cancelled() or state.is_cancelling():
                    t.state = RunState.CANCELLED
                elif state.is_running():
                    t.state, t.started = RunState.RUNNING, t.started or time.time()
        if any(t.state is not RunState.QUEUED for t in tickets):
            _fill_from_mlflow(tickets, self.parent)
        return before != [(t.state, t.run_id) for t in tickets]

    def _lost(self, ticket: Ticket, flow_run: str, why: str | None) -> None:
        """A crashed flow run (its worker or machine lost: no heartbeat, flows/deploy.py) leaves its MLflow run
        RUNNING: end it now as lost (FAILED, ``rpg.exit=lost``, the reason), as ``rpg runs gc`` would in 5 minutes. A
        later attempt on the machine holding its checkpoint re-attaches to it and clears the mark."""
        from rpg_core.tracking import mark_lost

        row = _mlflow_rows(self.parent, [ticket]).get(ticket.run_key)
        if row is not None and row.get("status") == "RUNNING":  # else it crashed before its MLflow run began
            mark_lost(row["run_id"], f"flow run {flow_run} crashed: {why or 'no message'}",
                      tracking_uri=self.parent.tracking_uri)  # fmt: skip

    def adopt(self, ticket: Ticket, handle: str) -> bool:
        """A flow run of ``train`` that a killed coordinator left on the pool keeps going (a sub-flow outlives its
        parent's process): wait for it rather than start a second run in the same run folder."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            try:
                run = client.read_flow_run(handle)
            except Exception:  # noqa: BLE001 - deleted, or never existed: start it again
                return False
        if run.state is None or run.state.is_final():
            return False
        ticket.flow_run_id, ticket.attempts = handle, 1
        ticket.state = RunState.RUNNING if run.state.is_running() else RunState.QUEUED
        return True

    def cancel(self, tickets: Sequence[Ticket]) -> None:
        """Cancel every unfinished flow run: a queued one at once, a running one through its worker (which stops the
        flow run's process group: the train flow and its `rpg train` stop, the slot is released)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        with get_client(sync_client=True) as client:
            for t in tickets:
                if t.done or not t.flow_run_id:
                    continue
                run = client.read_flow_run(t.flow_run_id)
                pending = run.state is None or run.state.is_scheduled() or run.state.is_pending()
                client.set_flow_run_state(t.flow_run_id, Cancelled() if pending else Cancelling(), force=True)
                t.state = RunState.CANCELLED


def make_dispatcher(where: Dispatch, parent: Tracker, *, task: Any, workdir: str, gpus: str, retries: int,
                    fresh: bool = False, slots: str = "", shared_checkpoints: bool = False) -> Dispatcher:  # fmt: skip
    """``auto``: the pool when this flow run came from a work pool, else this machine."""
    pool = pool_of_current_run() if where is not Dispatch.LOCAL else None
    if where is Dispatch.AUTO:
        where = Dispatch.POOL if pool else Dispatch.LOCAL
    if where is Dispatch.POOL:
        if not pool:
            raise ValueError("dispatch=pool: this flow run did not come from a work pool (served locally, or called "
                             "directly); allowed here: auto, local")  # fmt: skip
        return PoolDispatcher(parent, pool=pool, workdir=workdir, gpus=gpus, retries=retries, fresh=fresh,
                              shared_checkpoints=shared_checkpoints)  # fmt: skip
    return LocalDispatcher(parent, task=task, workdir=workdir, gpus=gpus, retries=retries, fresh=fresh, slots=slots)
