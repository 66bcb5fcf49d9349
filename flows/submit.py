"""One run-submission unit, shared by the flows that run many things under one MLflow parent run (``sweep``,
``nightly_eval``, a tuning flow): the parent run's lifecycle written once, and one training run submitted with its
outcome read back through ``rpg_core.runs``. Prefect-free: the Prefect task around ``submit`` (the machine's GPU
slots, retries that resume) lives in flows/rpg_flows.py.

```python
with parent_run(RunKind.SWEEP, experiment="rpg", name="sweep-smoke", tracking_uri=uri) as parent:
    outcome = submit(child_config(cfg, parent, sweep="smoke"), workdir=work, gpu="0")
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.core import run_training
from rpg_core.config import RunConfig
from rpg_core.config import run_key as run_key_of
from rpg_core.runs import final_metrics, get_run
from rpg_core.tracking import PRUNED_EXIT, RunKind, Tracker, host_name

__all__ = ["RunOutcome", "child_config", "parent_run", "submit"]

NOT_STARTED = "NOT_STARTED"  # the status of a submission that made no MLflow run (it failed before tracking began)


@contextlib.contextmanager
def parent_run(kind: RunKind, *, experiment: str, name: str, tracking_uri: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:  # fmt: skip
    """The parent MLflow run of a sweep, study or nightly (tag ``rpg.kind`` = ``kind``), ended on leaving the block:
    FINISHED, FAILED on an exception (a flow that raises because some of its runs failed), KILLED on an interrupt
    or cancellation (KeyboardInterrupt, SystemExit, Prefect's termination signals: BaseExceptions)."""
    tracker = Tracker(experiment=experiment, run_name=name, tracking_uri=tracking_uri, params=params, tags=tags,
                      kind=kind)  # fmt: skip
    try:
        yield tracker
    except Exception:
        tracker.finish("FAILED")
        raise
    except BaseException:
        tracker.finish("KILLED")
        raise
    tracker.finish("FINISHED")


def child_config(cfg: RunConfig, parent: Tracker, *, sweep: str | None = None, name: str | None = None) -> RunConfig:
    """``cfg`` tracked in the parent's store, nested under it, tagged ``sweep``, its MLflow run named ``name`` (e.g.
    ``SweepRun.run_name``; bookkeeping: the key is unchanged)."""
    tags = {**cfg.tracking.tags, **({"sweep": sweep} if sweep else {})}
    tracking = {"tracking_uri": parent.tracking_uri, "parent_run_id": parent.run_id, "tags": tags}
    if name:
        tracking["run_name"] = name
    return cfg.with_overrides({"tracking": tracking})


@dataclass(frozen=True)
class RunOutcome:
    """What one submitted training run came to."""

    key: str  # the config key (shared by the seeds of one configuration)
    seed: int
    run_id: str | None  # its MLflow run (None: it failed before tracking began)
    status: str  # the MLflow run's status (rpg_core.runs.RunStatus), NOT_STARTED without a run
    step: int  # the last checkpointed step
    returncode: int  # of the `rpg train` process (0: done; PRUNED_EXIT: stopped on request; -9: killed by the timeout)
    seconds: float
    gpu: str  # the CUDA device it ran on ("": CPU)
    host: str  # the machine (rpg_core.tracking.host_name(): $RPG_HOST, else the host name)
    log: Path
    metrics: dict[str, float] = field(default_factory=dict)  # final values, from MLflow

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def pruned(self) -> bool:
        """Stopped on a coordinator's request (a tuner's pruning; its MLflow run ends KILLED, tagged
        ``rpg.pruned_at_step``): not ``ok``, not a failure to retry."""
        return self.returncode == PRUNED_EXIT

    @property
    def run_key(self) -> str:
        return run_key_of(self.key, self.seed)


def submit(cfg: RunConfig, *, workdir: str | Path, gpu: str = "", fresh: bool = False, timeout_s: float | None = None,
           cwd: str | Path | None = None, on_progress: Callable[[str], None] | None = None) -> RunOutcome:  # fmt: skip
    """Train ``cfg`` as its own ``rpg train`` process on ``gpu`` (resuming its checkpoints unless ``fresh``), then
    read its MLflow run's status and final metrics back through rpg_core.runs. ``on_progress``: each progress line
    while it trains (flows.core.run_training)."""
    out = run_training(cfg, workdir=workdir, gpu=gpu, fresh=fresh, timeout_s=timeout_s, cwd=cwd, on_progress=on_progress)
    row = get_run(out.run_id, tracking_uri=cfg.tracking.tracking_uri) if out.run_id else None
    return RunOutcome(key=cfg.key(), seed=cfg.train.seed, run_id=out.run_id, status=NOT_STARTED if row is None else str(row["status"]),
                      step=out.step, returncode=out.returncode, seconds=out.seconds, gpu=out.gpu, host=host_name(), log=out.log,
                      metrics={} if row is None else final_metrics(row))  # fmt: skip
