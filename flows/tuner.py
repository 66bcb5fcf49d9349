"""The tuning coordinator: one Optuna study per grid cell of a study file, owned by this process alone (ask/tell,
the only writer), each trial trained as ordinary runs (one per seed) through a dispatcher (flows/dispatch.py: this
machine's devices, or the team's work pool). The trainer knows nothing of Optuna.

- **Ask.** Up to ``concurrency`` runs at once; TPE with the constant liar, so parallel trials spread out. A point the
  config rejects is told FAIL (user attr ``infeasible``) without compute. A point whose config key already has a
  FINISHED run for every seed is told at once from those runs (``reused``), without training.
- **Prune.** Every few seconds the running trials' curves of the objective metric are read through the read API
  (rpg_core.runs, one batched query) and reported to Optuna (the mean over seeds at each step all seeds reached); on a
  prune decision the coordinator asks the trial's runs to stop (MLflow tag ``rpg.stop``): each checkpoints, ends
  KILLED with ``rpg.pruned_at_step`` and exits ``PRUNED_EXIT``. A failed run (a NaN loss) fails its trial.
- **Tell.** The value of a trial is the mean over its seeds of each curve's value (``Objective.reduce``).
- **Resume.** Re-running the same study file continues the same study (its name comes from the file and overrides):
  trials finished in MLflow meanwhile are told; a trial left RUNNING resumes its runs from their checkpoints (same
  trial, same MLflow runs) or, with no checkpoint anywhere, is told FAIL and asked again (``trial_retries``).
  FINISHED training runs of the experiment that lie in the search space (same key as the point their params give)
  join the study as trials before the first ask.
- **MLflow.** The study is a parent run (``rpg.kind=tune``, re-attached on resume) holding the best value and
  params, parameter importances, the optimization-history figure and a link to optuna-dashboard; each trial's runs
  are its children, tagged ``rpg.study``, ``rpg.trial`` and ``rpg.trial_state``; each Optuna trial records its runs'
  ids (user attr ``mlflow_run_ids``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from flows.dispatch import Dispatcher, RunState, Ticket
from flows.submit import child_config
from rpg_core.config import RunConfigError
from rpg_core.runs import RunStatus, collect_lost, find_runs, histories
from rpg_core.tracking import RunKind, Tracker, default_tracking_uri, ensure_experiment, request_stop, set_run_tags
from rpg_core.tuning import (
    DASHBOARD_ENV,
    Cell,
    Goal,
    Study,
    active_dims,
    cells,
    curve_value,
    defaults,
    load_study,
    make_pruner,
    make_sampler,
    open_storage,
    storage_url,
    study_name,
    suggest,
    trial_config,
)

__all__ = ["STUDY_TAG", "TRIAL_STATE_TAG", "TRIAL_TAG", "Tuner", "open_study", "run_study"]

STUDY_TAG, TRIAL_TAG, TRIAL_STATE_TAG = "rpg.study", "rpg.trial", "rpg.trial_state"
REPORT_EVERY_S = float(os.environ.get("RPG_TUNE_REPORT_S", 3.0))  # how often running trials' curves are read (one
# query for all of them); the trainer checks for a stop request once per step
MAX_INFEASIBLE = 100  # asks in a row the config rejects before the study gives up on its space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Flight:
    """A trial being trained: its runs (tickets; one per seed not already finished) and what was reported."""

    trial: optuna.Trial
    params: dict[str, Any]
    key: str  # the config key its seeds share
    tickets: list[Ticket]
    reused: dict[int, str] = field(default_factory=dict)  # seed -> a FINISHED run of this key and seed
    pruned_at: int | None = None
    reported: set[int] = field(default_factory=set)

    @property
    def run_ids(self) -> list[str]:
        return [*self.reused.values(), *(t.run_id for t in self.tickets if t.run_id)]

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tickets)


class Tuner:
    """Runs one cell of a study to its budget (``trials`` overrides the file's)."""

    def __init__(self, study: Study, cell: Cell, ostudy: optuna.Study, *, parent: Tracker, dispatcher: Dispatcher,
                 concurrency: int, trials: int | None = None, say: Callable[[str], None] = print,
                 on_change: Callable[[list[Ticket]], None] | None = None, poll_s: float = 1.0,
                 report_every_s: float = REPORT_EVERY_S):  # fmt: skip
        self.spec, self.cell, self.study, self.name = study, cell, ostudy, ostudy.study_name
        self.report_every_s = report_every_s
        self.parent, self.dispatcher = parent, dispatcher
        self.concurrency, self.say, self.on_change, self.poll_s = max(1, concurrency), say, on_change, poll_s
        self.max_trials = trials if trials is not None else study.budget.trials
        self.gpu_hours = study.budget.gpu_hours
        self.objective = study.objective
        self.experiment = cell.config.tracking.experiment
        self.uri = parent.tracking_uri
        self.flights: list[Flight] = []
        self.tickets: list[Ticket] = []
        self._last_report = 0.0
        self._infeasible_streak = 0
        self._seconds_done = sum(float(t.user_attrs.get("device_seconds", 0.0)) for t in self.study.trials)

    # -- bookkeeping ---------------------------------------------------------------------------------------------------

    def _counted(self, t: optuna.trial.FrozenTrial) -> bool:
        """Whether a trial uses the budget: asked and not infeasible and not lost-and-asked-again."""
        if t.state is TrialState.WAITING:
            return False
        return t.state is not TrialState.FAIL or not (t.user_attrs.get("infeasible") or t.user_attrs.get("requeued"))

    def _used(self) -> int:
        return sum(self._counted(t) for t in self.study.get_trials(deepcopy=False))

    def _device_hours(self) -> float:
        now = time.time()
        live = sum((t.seconds or 0.0) + (now - t.started if t.started and not t.done else 0.0) for t in self.tickets)
        return (self._seconds_done + live) / 3600.0

    def _budget_left(self) -> bool:
        if self.max_trials is not None and self._used() >= self.max_trials:
            return False
        return self.gpu_hours is None or self._device_hours() < self.gpu_hours

    def _active_runs(self) -> int:
        return sum(1 for t in self.tickets if not t.done)

    # -- MLflow reads --------------------------------------------------------------------------------------------------

    def _finished(self, key: str) -> dict[int, str]:
        """seed -> the newest FINISHED training run of this config key (any study, sweep or single run)."""
        runs = find_runs(kind=RunKind.TRAIN, experiments=self.experiment, config_key=key, status=RunStatus.FINISHED,
                         tracking_uri=self.uri)  # fmt: skip
        out: dict[int, str] = {}
        for row in runs.to_dict("records")[::-1]:  # oldest first: the newest wins
            if row.get("seed") is not None:
                out[int(row["seed"])] = row["run_id"]
        return {s: out[s] for s in self.spec.seeds if s in out}

    def _curves(self, run_ids: list[str]) -> dict[str, list[tuple[int, float]]]:
        if not run_ids:
            return {}
        h = histories(run_ids, [self.objective.metric], tracking_uri=self.uri)
        out: dict[str, list[tuple[int, float]]] = {r: [] for r in run_ids}
        for rid, step, value in zip(h["run_id"], h["step"], h["value"], strict=True):
            out[rid].append((int(step), float(value)))
        return out

    @staticmethod
    def _mean_curve(curves: list[list[tuple[int, float]]]) -> dict[int, float]:
        """step -> the mean over runs, at the steps every run reached (the last value logged at a step)."""
        per = [dict(c) for c in curves]
        if not per:
            return {}
        steps = set(per[0]).intersection(*per[1:])
        return {s: sum(p[s] for p in per) / len(per) for s in sorted(steps)}

    def _value(self, run_ids: list[str]) -> tuple[float | None, dict[int, float], str]:
        """(value, intermediate values, why no value) of a trial from its runs' curves."""
        curves = self._curves(run_ids)
        values = [curve_value(curves[r], self.objective) for r in run_ids]
        inter = self._mean_curve([curves[r] for r in run_ids])
        if any(v is None for v in values):
            return None, inter, f"metric {self.objective.metric} was never logged"
        if any(math.isnan(v) for v in values):  # type: ignore[arg-type]
            return None, inter, f"metric {self.objective.metric} is NaN"
        return sum(values) / len(values), inter, ""  # type: ignore[arg-type]

    # -- ask -----------------------------------------------------------------------------------------------------------

    def _configs(self, params: dict[str, Any]):
        return {seed: trial_config(self.spec, self.cell, params, seed) for seed in self.spec.seeds}

    def _ask(self) -> None:
        trial = self.study.ask()
        params = suggest(trial, self.spec, self.cell)
        try:
            cfgs = self._configs(params)
        except (RunConfigError, ValueError) as e:
            self._infeasible_streak += 1
            trial.set_user_attr("infeasible", str(e)[:500])
            self.study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} {_fmt(params)}: infeasible ({str(e)[:200]})")
            if self._infeasible_streak >= MAX_INFEASIBLE:
                raise RuntimeError(f"study {self.name}: {MAX_INFEASIBLE} points in a row were rejected by the config; "
                                   f"last: {e}") from None  # fmt: skip
            return
        self._infeasible_streak = 0
        self._launch(trial, params, cfgs)

    def _launch(self, trial: optuna.Trial, params: dict[str, Any], cfgs: dict, *, resume: bool = False,
                handles: dict[str, str] | None = None) -> None:
        key = next(iter(cfgs.values())).key()
        trial.set_user_attr("config_key", key)
        trial.set_user_attr("run_keys", [c.run_key() for c in cfgs.values()])
        finished = self._finished(key)
        done = self.study._storage.get_trial(trial._trial_id).intermediate_values  # noqa: SLF001 - a resumed trial's
        flight = Flight(trial, params, key, [], reused=finished, reported=set(done))
        twin = next((f for f in self.flights if f.key == key), None)
        if twin is not None:  # the same point is being trained for another trial: share its runs
            flight.tickets, flight.reused = twin.tickets, twin.reused
        else:
            for seed, cfg in cfgs.items():
                if seed in finished:
                    continue
                point = "-".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                                 for k, v in sorted(params.items()))  # fmt: skip
                name = f"{self.name}/t{trial.number}-{point}-s{seed}" if point else f"{self.name}/t{trial.number}-s{seed}"
                child = child_config(cfg, self.parent, name=name)
                child = child.with_overrides({"tracking": {"tags": {**child.tracking.tags, STUDY_TAG: self.name,
                                                                    TRIAL_TAG: str(trial.number)}}})  # fmt: skip
                t = Ticket(trial.number, child, name=name)
                self.tickets.append(t)
                flight.tickets.append(t)
                handle = (handles or {}).get(cfg.run_key())
                if not (handle and self.dispatcher.adopt(t, handle)):
                    if resume:
                        self.dispatcher.plan([t])  # pool: back to the machine holding its checkpoint
                    self.dispatcher.start(t)
            started = {t.run_key: t.flow_run_id for t in flight.tickets if t.flow_run_id}
            if started:  # pool: where each run went, so a re-run coordinator can wait for it instead
                trial.set_user_attr("flow_runs", started)
        self.flights.append(flight)
        how = "resumes" if resume else ("reused from finished runs" if not flight.tickets else "started")
        self.say(f"trial {trial.number} {_fmt(params)}: {how} (config {key}, {len(flight.tickets)} runs)")

    # -- report, prune, tell -------------------------------------------------------------------------------------------

    def _report(self) -> None:
        """Report every running trial's new curve points; stop the runs of a trial the pruner gives up on."""
        live = [f for f in self.flights if f.pruned_at is None and len(f.run_ids) == len(self.spec.seeds)]
        if not live:
            return
        curves = self._curves([r for f in live for r in f.run_ids])
        for f in live:
            inter = self._mean_curve([curves.get(r, []) for r in f.run_ids])
            for step in sorted(set(inter) - f.reported):
                if math.isnan(inter[step]):
                    continue
                f.trial.report(inter[step], step)
                f.reported.add(step)
                if f.trial.should_prune():
                    f.pruned_at = step
                    self.say(f"trial {f.trial.number} {_fmt(f.params)}: pruned at step {step} "
                             f"({self.objective.metric}={inter[step]:.4g})")  # fmt: skip
                    break
        self._stop_pruned()

    def _stop_pruned(self) -> None:
        for f in self.flights:
            if f.pruned_at is None:
                continue
            for t in f.tickets:
                if not t.done and t.run_id and not getattr(t, "_stop_sent", False):
                    request_stop(t.run_id, "pruned", tracking_uri=self.uri)
                    t._stop_sent = True  # type: ignore[attr-defined]

    def _tell_done(self) -> None:
        for f in [f for f in self.flights if f.done]:
            if any(t.state is RunState.CANCELLED for t in f.tickets):
                continue  # the coordinator is being cancelled: the trial stays RUNNING, to resume
            self.flights.remove(f)
            trial, runs = f.trial, f.run_ids
            seconds = sum(t.seconds or 0.0 for t in f.tickets)
            self._seconds_done += seconds
            trial.set_user_attr("device_seconds", seconds)
            trial.set_user_attr("mlflow_run_ids", runs)
            failed = [t for t in f.tickets if t.state is RunState.FAILED]
            if f.pruned_at is None and any(t.state is RunState.PRUNED for t in f.tickets):
                f.pruned_at = max(f.reported, default=0)  # stopped on an earlier coordinator's request
            if f.pruned_at is not None:
                self.study.tell(trial, state=TrialState.PRUNED)
                state, note = TrialState.PRUNED, f"pruned at step {f.pruned_at}"
            elif failed:
                trial.set_user_attr("error", failed[0].message[:500])
                self.study.tell(trial, state=TrialState.FAIL)
                state, note = TrialState.FAIL, f"failed: {failed[0].message.splitlines()[0][:200]}"
            else:
                value, inter, why = self._value(runs)
                for step in sorted(set(inter) - f.reported):
                    trial.report(inter[step], step)
                if value is None:
                    trial.set_user_attr("error", why)
                    self.study.tell(trial, state=TrialState.FAIL)
                    state, note = TrialState.FAIL, f"failed: {why}"
                else:
                    self.study.tell(trial, value)
                    state, note = TrialState.COMPLETE, f"{self.objective.metric} = {value:.4g}"
            for rid in {t.run_id for t in f.tickets if t.run_id}:
                with contextlib.suppress(Exception):
                    set_run_tags(rid, {TRIAL_STATE_TAG: state.name}, tracking_uri=self.uri)
            self.say(f"trial {trial.number} {_fmt(f.params)}: {note}{self._best_note()}")
            self._log_progress()

    def _best_note(self) -> str:
        try:
            best = self.study.best_trial
        except ValueError:
            return ""
        return f" (best: trial {best.number}, {best.value:.4g})"

    # -- start: what is already known ----------------------------------------------------------------------------------

    def _import_finished(self) -> int:
        """FINISHED training runs of the experiment inside the search space (the point their params give has their
        config key) join the study as trials, once per config key, before the first ask."""
        known = {t.user_attrs.get("config_key") for t in self.study.get_trials(deepcopy=False)}
        runs = find_runs(kind=RunKind.TRAIN, experiments=self.experiment, status=RunStatus.FINISHED,
                         params=list(self.spec.search), tracking_uri=self.uri)  # fmt: skip
        if runs.empty:
            return 0
        base = self.cell.config.model_dump(mode="json")
        added = 0
        for key, group in runs.groupby("config_key"):
            if key in known or not key:
                continue
            by_seed = {int(s): rid for s, rid in zip(group["seed"], group["run_id"], strict=True) if s is not None}
            if any(s not in by_seed for s in self.spec.seeds):
                continue
            row = group.iloc[0]
            raw = {n: self.spec.search[n].parse(row.get(n)) for n in self.spec.search}
            params = {n: raw[n] for n in active_dims(self.spec, raw, base)}
            if any(v is None for v in params.values()):
                continue
            try:
                if self._configs(params)[self.spec.seeds[0]].key() != key:
                    continue  # its other fields differ from this study's base
            except (RunConfigError, ValueError):
                continue
            ids = [by_seed[s] for s in self.spec.seeds]
            value, inter, _ = self._value(ids)
            if value is None:
                continue
            dists = {n: self.spec.search[n].distribution() for n in params}
            self.study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, value=value, intermediate_values=inter,
                user_attrs={"config_key": key, "mlflow_run_ids": ids, "imported": True}))  # fmt: skip
            added += 1
        if added:
            self.say(f"study {self.name}: {added} finished runs in the search space joined as trials")
        return added

    def _reconcile(self) -> None:
        """Trials left RUNNING by an earlier coordinator (killed, cancelled): told from MLflow if their runs finished,
        resumed from their checkpoints, else told FAIL and asked again (up to ``trial_retries``)."""
        for fz in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = optuna.Trial(self.study, fz._trial_id)  # noqa: SLF001
            params = {n: fz.params[n] for n in fz.params}
            key = fz.user_attrs.get("config_key")
            try:
                cfgs = self._configs(params)
            except (RunConfigError, ValueError):
                cfgs = {}
            if not key or not cfgs:
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            finished = self._finished(key)
            if len(finished) == len(self.spec.seeds):  # finished meanwhile (or trained by a twin)
                self._launch(trial, params, cfgs)
                continue
            rows = find_runs(kind=RunKind.TRAIN, experiments=self.experiment, config_key=key, tracking_uri=self.uri)
            ckpt = rows["checkpoint_step"].notna().any() if "checkpoint_step" in rows else False
            handles = fz.user_attrs.get("flow_runs") or {}
            if ckpt or handles:
                self.say(f"trial {fz.number}: its runs resume from their checkpoints, or are still running")
                self._launch(trial, params, cfgs, resume=True, handles=handles)
                continue
            retries = int(fz.user_attrs.get("retries", 0))
            trial.set_user_attr("requeued", retries < self.spec.trial_retries)
            self.study.tell(trial, state=TrialState.FAIL)
            if retries < self.spec.trial_retries:
                self.study.enqueue_trial(params, user_attrs={"retries": retries + 1, "retry_of": fz.number})
                self.say(f"trial {fz.number}: lost without a checkpoint; asked again ({retries + 1}/{self.spec.trial_retries})")
            else:
                self.say(f"trial {fz.number}: lost without a checkpoint, {retries} times: failed")

    # -- the loop ------------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.study
        if s.user_attrs.get("mlflow_parent_run_id") != self.parent.run_id:
            s.set_user_attr("mlflow_parent_run_id", self.parent.run_id)
        fresh_study = not s.get_trials(deepcopy=False)
        self._import_finished()
        self._reconcile()
        if fresh_study and self.spec.enqueue_defaults:
            point = defaults(self.spec, self.cell)
            if point is None:
                self.say(f"study {self.name}: enqueue_defaults: the base config's values lie outside the search "
                         "space; not enqueued")  # fmt: skip
            else:
                s.enqueue_trial(point, user_attrs={"defaults": True}, skip_if_exists=True)
        if fresh_study:
            for point in self.spec.enqueue:
                s.enqueue_trial({k: self.spec.search[k].parse(v) for k, v in point.items()})  # as listed
        self.say(f"study {self.name}: {self._used()} of {self.max_trials or 'unlimited'} trials used"
                 + (f", {self.gpu_hours} device-hours budget" if self.gpu_hours else ""))  # fmt: skip
        try:
            while True:
                while self._budget_left() and (not self.flights or self._active_runs() + len(self.spec.seeds)
                                               <= self.concurrency):  # fmt: skip
                    self._ask()
                changed = self.dispatcher.refresh(self.tickets) if self.tickets else False
                if time.monotonic() - self._last_report > self.report_every_s or any(f.done for f in self.flights):
                    self._last_report = time.monotonic()
                    self._report()
                self._stop_pruned()  # a run that got its MLflow run after its trial was pruned
                self._tell_done()
                if changed and self.on_change is not None:
                    self.on_change(self.tickets)
                if not self.flights and not self._budget_left():
                    break
                wake = getattr(self.dispatcher, "wake", None)  # ProcessDispatcher: a run ended
                if wake is not None and wake.wait(self.poll_s):
                    wake.clear()
                elif wake is None:
                    time.sleep(self.poll_s)
        except BaseException:
            self.dispatcher.cancel(self.tickets)
            raise
        finally:
            with contextlib.suppress(Exception):
                self._log_progress()
        self._log_results()
        return self.summary()

    # -- results -------------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            ids = t.user_attrs.get("mlflow_run_ids") or []
            trials.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                           "config_key": t.user_attrs.get("config_key"), "mlflow_run_id": ids[0] if ids else None,
                           "mlflow_run_ids": ids, "pruned_at_step": max(t.intermediate_values, default=None)
                           if t.state is TrialState.PRUNED else None,
                           "note": t.user_attrs.get("infeasible") or t.user_attrs.get("error") or
                           ("imported" if t.user_attrs.get("imported") else "")})  # fmt: skip
        best = None
        with contextlib.suppress(ValueError):
            b = self.study.best_trial
            best = {"number": b.number, "value": b.value, "params": b.params,
                    "config_key": b.user_attrs.get("config_key"), "mlflow_run_ids": b.user_attrs.get("mlflow_run_ids")}  # fmt: skip
        return {"study": self.name, "storage": storage_url(), "direction": self.objective.direction.value,
                "metric": self.objective.metric, "trials": trials, "best": best}  # fmt: skip

    def _log_progress(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        step = len(trials)
        m = {"tune/trials_complete": sum(t.state is TrialState.COMPLETE for t in trials),
             "tune/trials_pruned": sum(t.state is TrialState.PRUNED for t in trials)}  # fmt: skip
        with contextlib.suppress(ValueError):
            m["tune/best_value"] = self.study.best_value
        self.parent.log_metrics(m, step=step)

    def _log_results(self) -> None:
        """Best value and params, importances, the optimization history: on the study's parent run."""
        summary = self.summary()
        self.parent.log_dict(summary, "study.json")
        best = summary["best"]
        tags: dict[str, Any] = {}
        if best is not None:
            tags.update({"best.trial": best["number"], "best.value": best["value"], "best.config_key": best["config_key"]})
            tags.update({f"best.{k}": v for k, v in best["params"].items()})
        complete = [t for t in self.study.trials if t.state is TrialState.COMPLETE]
        importances: dict[str, float] = {}
        if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
            with contextlib.suppress(Exception):
                importances = {k: float(v) for k, v in optuna.importance.get_param_importances(self.study).items()}
        tags.update({f"importance.{k}": f"{v:.4f}" for k, v in importances.items()})
        self.parent.log_dict(importances, "importances.json")
        if tags:
            self.parent.set_tags(tags)
        self._log_figures(importances)

    def _log_figures(self, importances: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):
            for p in figures(self.study, Path(tmp), importances=bool(importances)):
                self.parent.log_artifact(p, "figures")


def figures(study: optuna.Study, folder: Path, *, importances: bool = True, prefix: str = "") -> list[Path]:
    """The study's optimization history (every trial's value and the best so far) and its parameter importances
    (fANOVA, with 2+ complete trials) as PNGs in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    out = []
    complete = [t for t in study.trials if t.state is TrialState.COMPLETE]
    with _quiet():
        plots = [("optimization_history", ov.plot_optimization_history, bool(complete))]
        plots.append(("param_importances", ov.plot_param_importances, importances and len(complete) >= 2))
        for name, plot, wanted in plots:
            if not wanted:
                continue
            ax = plot(study)
            ax.figure.set_size_inches(8, 4.5)
            ax.figure.tight_layout()
            path = folder / f"{prefix}{name}.png"
            ax.figure.savefig(path, dpi=110)
            plt.close(ax.figure)
            out.append(path)
    return out


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib plots
        yield


def _fmt(params: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) + "}"


def dashboard_link(study: optuna.Study) -> str | None:
    """The study's page in optuna-dashboard (``$RPG_OPTUNA_DASHBOARD_URL``, exported by the stack), else None."""
    base = os.environ.get(DASHBOARD_ENV, "").strip().rstrip("/")
    return f"{base}/dashboard/studies/{study._study_id}" if base else None  # noqa: SLF001


def study_tags(study: Study, name: str, ostudy: optuna.Study, storage: str) -> dict[str, str]:
    tags = {STUDY_TAG: name, "rpg.optuna_storage": storage, "rpg.objective": study.objective.metric,
            "rpg.direction": study.objective.direction.value}  # fmt: skip
    link = dashboard_link(ostudy)
    if link:
        tags["rpg.optuna_dashboard"] = link
    return tags


def better(a: float, b: float, goal: Goal) -> bool:
    return a > b if goal is Goal.MAXIMIZE else a < b


def open_study(spec: Study, cell: Cell, storage: Any, *, prune: bool = True) -> optuna.Study:
    """The cell's Optuna study in ``storage``: created, or loaded to continue it. A continued study's sampler is
    seeded with the file's seed plus the trials it already has: the same seed again would draw the same first
    points again (a resumed TPE's random start-up repeats the killed coordinator's asks)."""
    study = optuna.create_study(
        study_name=study_name(spec, cell), storage=storage, load_if_exists=True,
        direction=spec.objective.direction.value, sampler=make_sampler(spec.sampler, spec),
        pruner=make_pruner(spec.pruner, cell.config.train.steps, enabled=prune),
    )  # fmt: skip
    done = len(study.get_trials(deepcopy=False))
    if done:
        study.sampler = make_sampler(spec.sampler.model_copy(update={"seed": spec.sampler.seed + done}), spec)
    return study


def _parent(spec: Study, ostudy: optuna.Study, cell: Cell, params: dict[str, Any]) -> Tracker:
    """The study's MLflow run: the one recorded in the study (a resumed study continues it), else a new one."""
    cfg = cell.config
    uri = cfg.tracking.tracking_uri or default_tracking_uri()
    ensure_experiment(uri, cfg.tracking.experiment)  # once, before runs fan out (SQLite migrations race)
    tags = {**study_tags(spec, ostudy.study_name, ostudy, storage_url()), **cfg.tracking.tags}
    known = ostudy.user_attrs.get("mlflow_parent_run_id")
    if known:
        with contextlib.suppress(Exception):
            return Tracker(experiment=cfg.tracking.experiment, run_id=known, tags=tags, tracking_uri=uri,
                           kind=RunKind.TUNE)  # fmt: skip
    return Tracker(experiment=cfg.tracking.experiment, run_name=f"tune-{ostudy.study_name}", params=params, tags=tags,
                   tracking_uri=uri, kind=RunKind.TUNE)  # fmt: skip


def run_study(path: str | Path, *, make_dispatcher: Callable[[Tracker, str], Dispatcher], overrides: list[str] | None
              = None, seeds: list[int] | None = None, trials: int | None = None, concurrency: int = 1,
              prune: bool = True, storage: str | None = None, say: Callable[[str], None] = print,
              on_change: Callable[[str, list[Ticket]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run every grid cell's study of a study file to its budget (one after another); returns their summaries.
    ``make_dispatcher(parent run, study name)`` gives the dispatcher of a cell's runs."""
    spec = load_study(path, overrides, seeds)
    cell_list, dropped = cells(spec)
    for line in [*dropped, *study_warnings(spec, cell_list)]:
        say(f"study {spec.name}: {line}")
    url = storage_url(storage)
    ostorage = open_storage(url)
    out = []
    for cell in cell_list:
        ostudy = open_study(spec, cell, ostorage, prune=prune)
        params = {"study_file": str(path), "overrides": " ".join(overrides or []), "seeds": ",".join(map(str, spec.seeds)),
                  "metric": spec.objective.metric, "direction": spec.objective.direction.value,
                  "sampler": spec.sampler.kind.value, "pruner": spec.pruner.kind.value if prune else "none"}  # fmt: skip
        parent = _parent(spec, ostudy, cell, params)
        for r in collect_lost(experiments=cell.config.tracking.experiment, tracking_uri=parent.tracking_uri):
            say(f"run {r.name} ({r.run_id}) has no live process: ended FAILED, rpg.exit=lost ({r.reason})")
        try:
            tuner = Tuner(spec, cell, ostudy, parent=parent, dispatcher=make_dispatcher(parent, ostudy.study_name),
                          concurrency=concurrency, trials=trials, say=say,
                          on_change=(lambda t, n=ostudy.study_name: on_change(n, t)) if on_change else None)  # fmt: skip
            summary = tuner.run()
        except Exception:
            parent.finish("FAILED")
            raise
        except BaseException:
            parent.finish("KILLED")
            raise
        parent.finish("FINISHED")
        summary["storage"], summary["mlflow_run_id"] = url, parent.run_id
        out.append(summary)
    return out


def study_warnings(spec: Study, cell_list: list[Cell]) -> list[str]:
    """The KL settings the study searches or sets, in cells whose KL term cannot act (``RunConfig.kl_inert_reason``,
    the same rule ``rpg sweep expand`` warns with): tuning beta there tunes nothing."""
    from rpg_core.config import KL_SETTINGS
    from rpg_core.sweeps import kl_settings_set

    touched = [f for f in KL_SETTINGS if f in spec.search or f in kl_settings_set(spec)]
    if not touched:
        return []
    out = []
    for c in cell_list:
        reason = c.config.kl_inert_reason()
        if reason is not None:
            out.append(f"{'cell ' + c.label if c.label else 'every trial'} searches or sets KL settings "
                       f"({', '.join(touched)}) but {reason}")  # fmt: skip
    return out


# -- rpg tune (rpg_core/cli.py) -----------------------------------------------------------------------------------------


def cli(args: Any) -> int:
    """``rpg tune``: the study's runs as ``rpg train`` processes of this machine (ProcessDispatcher), no Prefect."""
    import sys

    from flows.core import local_devices
    from flows.dispatch import ProcessDispatcher
    from rpg_core.tuning import StudyError

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        print(f"rpg tune: --seeds {args.seeds!r}: expected integers, e.g. 0,1", file=sys.stderr)
        return 2
    for flag, value, low in (("--trials", args.trials, 1), ("--concurrency", args.concurrency, 1), ("--retries", args.retries, 0)):
        if value is not None and value < low:
            print(f"rpg tune: {flag} {value}: allowed: >= {low}", file=sys.stderr)
            return 2
    try:
        spec = load_study(args.study, args.overrides or None, seeds)
        cells(spec)
        open_storage(args.storage)
        devices, concurrency = local_devices(args.gpus, args.concurrency)
    except (StudyError, ValueError) as e:
        print(f"rpg tune: {e}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=out, flush=True)

    def make(parent: Tracker, name: str) -> Dispatcher:
        return ProcessDispatcher(parent, workdir=str(Path(args.workdir) / name), gpus=",".join(devices) or "cpu",
                                 retries=args.retries, concurrency=concurrency,
                                 lock_dir=str(Path(args.workdir) / "locks"))  # every study of this workdir  # fmt: skip

    try:
        summaries = run_study(args.study, make_dispatcher=make, overrides=args.overrides or None, seeds=seeds,
                              trials=args.trials, concurrency=concurrency, prune=not args.no_prune,
                              storage=args.storage, say=say)  # fmt: skip
    except KeyboardInterrupt:
        print("rpg tune: interrupted; its runs stopped with their checkpoints. Run the same command to continue the "
              "study.", file=sys.stderr)  # fmt: skip
        return 130
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2, default=str))
    else:
        for sm in summaries:
            print(table(sm))
    return 0


def table(summary: dict[str, Any]) -> str:
    """The trials of one study as a text table, best first."""
    names = sorted({p for t in summary["trials"] for p in t["params"]})
    head = ["#", "state", summary["metric"], *names, "config", "note"]
    goal = Goal(summary["direction"])
    ranked = sorted(summary["trials"], key=lambda t: (t["value"] is None, -(t["value"] or 0) if goal is Goal.MAXIMIZE
                                                      else (t["value"] or 0)))  # fmt: skip
    rows = [[str(t["number"]), t["state"].lower(), "" if t["value"] is None else f"{t['value']:.4g}",
             *(_cell(t["params"].get(n)) for n in names), t["config_key"] or "", (t["note"] or "")[:60]] for t in ranked]  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    best = summary["best"]
    lines.append(f"\nstudy {summary['study']} ({summary['storage']}): {len(rows)} trials; best: "
                 + (f"trial {best['number']}, {summary['metric']} = {best['value']:.4g}, {best['params']}" if best else "none"))  # fmt: skip
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
