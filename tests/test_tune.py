"""The tuner end to end with its real parts: `rpg tune` processes training the tiny model, a journal file storage, a
real MLflow store. A study completes its budget; a planted bad region is pruned; a point equal to a finished run is
reused without training; a SIGKILLed `rpg tune` re-run ends with exactly its budget, no config key trained twice;
bad study files are refused before any compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.system, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]


def study_file(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "tune_smoke.yaml").read_text())
    base = {**spec["base"], **changes.pop("base", {})}
    spec.update(changes, base=base)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def tune_cmd(tmp_path: Path, path: Path, *args: str) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [sys.executable, "-m", "rpg_core.cli", "tune", str(path), "--storage", str(tmp_path / "optuna.journal"),
            "--set", f"tracking.tracking_uri={uri}", "--set", f"train.output_dir={tmp_path / 'runs'}",
            "--workdir", str(tmp_path / "work"), "--json", *args]  # fmt: skip


ENV = {**os.environ, "RPG_TUNE_REPORT_S": "0.5", "OMP_NUM_THREADS": "1"}


def run_tune(tmp_path: Path, path: Path, *args: str, timeout: float = 900) -> dict:
    r = subprocess.run(tune_cmd(tmp_path, path, *args), capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(r.stdout)


def train_runs(tmp_path: Path, experiment: str = "tune-smoke"):
    ml = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ml.get_experiment_by_name(experiment)
    return ml, ml.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'train'")


def test_a_study_completes_its_budget_and_a_point_equal_to_a_finished_run_is_reused(tmp_path):
    """Three trials over two learning rates (categorical): every trial trains once per new point; a trial that lands
    on a point already trained is told from that run at once. The study's parent run holds the best, the figures and
    one child per trained point; each Optuna trial records its MLflow run."""
    path = study_file(tmp_path, search={"optim.lr": {"type": "categorical", "choices": [1.0e-3, 1.0e-2]},
                                        "objective.beta": {"type": "categorical", "choices": [0.01]}},
                      enqueue=[{"optim.lr": 1.0e-3}, {"optim.lr": 1.0e-2}, {"optim.lr": 1.0e-3}],
                      budget={"trials": 3}, pruner="none")  # fmt: skip
    out = run_tune(tmp_path, path)
    trials = out["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3, trials
    assert out["best"]["value"] == min(t["value"] for t in trials)  # objective: minimize actor/kl_k3
    assert trials[2]["config_key"] == trials[0]["config_key"] != trials[1]["config_key"]
    assert trials[2]["mlflow_run_ids"] == trials[0]["mlflow_run_ids"]  # reused: no new run
    assert trials[2]["value"] == trials[0]["value"]
    ml, runs = train_runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    parent = out["mlflow_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert {r.data.tags["rpg.trial"] for r in runs} == {"0", "1"}
    assert {r.data.tags["rpg.trial_state"] for r in runs} == {"COMPLETE"}
    p = ml.get_run(parent)
    assert p.data.tags["rpg.kind"] == "tune" and p.info.status == "FINISHED"
    assert float(p.data.tags["best.value"]) == pytest.approx(out["best"]["value"])
    assert p.data.metrics["tune/trials_complete"] == 3
    arts = {a.path for a in ml.list_artifacts(parent, "figures")}
    assert "figures/optimization_history.png" in arts
    # the Optuna study itself, read back from the journal
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.load_study(study_name=out["study"], storage=storage)
    assert [t.user_attrs["mlflow_run_ids"] for t in study.trials] == [t["mlflow_run_ids"] for t in trials]
    # Another study over the same space (its objective reads the curve differently: another name) starts from the
    # finished runs inside its space, as trials with their curves: its budget of 2 is met without training.
    path2 = study_file(tmp_path, search={"optim.lr": {"type": "categorical", "choices": [1.0e-3, 1.0e-2]},
                                         "objective.beta": {"type": "categorical", "choices": [0.01]}},
                       objective={"metric": "actor/kl_k3", "direction": "minimize", "reduce": "last"},
                       budget={"trials": 2}, pruner="none")  # fmt: skip
    other = run_tune(tmp_path, path2)
    assert other["study"] != out["study"] and [t["note"] for t in other["trials"]] == ["imported", "imported"]
    assert sorted(t["config_key"] for t in other["trials"]) == sorted({t["config_key"] for t in trials})
    assert len(train_runs(tmp_path)[1]) == 2  # nothing trained


def test_a_planted_bad_region_is_pruned_and_its_run_stops_with_a_checkpoint(tmp_path):
    """The objective here is the logged learning rate (maximize): a curve that the trial's own point decides, so the
    planted bad point (lr 1e-7, the "learning rate of about 0") is known to be worse at every step. After one full
    trial at lr 1e-2 (the median pruner's start-up) the bad trial is pruned past its warm-up: its run checkpoints,
    ends KILLED with rpg.pruned_at_step well before the last step, and the trial is PRUNED."""
    path = study_file(tmp_path, base={"train.steps": 40, "train.eval_every": 0, "train.checkpoint_every": 0},
                      search={"optim.lr": {"type": "categorical", "choices": [1.0e-2, 1.0e-7]}},
                      enqueue=[{"optim.lr": 1.0e-2}, {"optim.lr": 1.0e-7}],
                      objective={"metric": "lr", "direction": "maximize", "reduce": "last"},
                      pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 2}, budget={"trials": 2})  # fmt: skip
    out = run_tune(tmp_path, path)
    good, bad = out["trials"]
    assert good["state"] == "COMPLETE" and good["value"] == pytest.approx(1e-2)
    assert bad["state"] == "PRUNED", out
    _, runs = train_runs(tmp_path)
    by_trial = {r.data.tags["rpg.trial"]: r for r in runs}
    stopped = by_trial["1"]
    assert stopped.info.status == "KILLED" and stopped.data.tags["rpg.trial_state"] == "PRUNED"
    at = int(stopped.data.tags["rpg.pruned_at_step"])
    assert 2 <= at < 40 and int(stopped.data.tags["rpg.checkpoint_step"]) == at
    assert by_trial["0"].info.status == "FINISHED"


def test_a_killed_study_rerun_ends_with_exactly_its_budget_and_trains_no_key_twice(tmp_path):
    """`rpg tune` SIGKILLed while its second trial trains (with checkpoints): its run stops with the process (it ends
    KILLED, keeping its checkpoint); the same command again resumes that trial into the same MLflow run and finishes
    the budget: 3 trials, 3 distinct config keys, 3 MLflow runs, all FINISHED."""
    path = study_file(tmp_path, base={"train.steps": 30, "train.checkpoint_every": 1, "train.eval_every": 5},
                      budget={"trials": 3}, pruner="none")  # fmt: skip
    proc = subprocess.Popen(tune_cmd(tmp_path, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:] if proc.poll() is not None else "timeout"
            ckpts = list((tmp_path / "runs").glob("*/checkpoints/step_*/COMPLETE"))
            if len({c.parents[2] for c in ckpts}) >= 2:  # the second trial's run has a checkpoint
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # the orphaned run got SIGTERM (PR_SET_PDEATHSIG) and ends KILLED
    out = run_tune(tmp_path, path)
    trials = out["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3, trials
    keys = [t["config_key"] for t in trials]
    assert len(set(keys)) == 3
    _, runs = train_runs(tmp_path)
    assert sorted(r.data.tags["config_key"] for r in runs) == sorted(keys)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_id for r in runs) == sorted(t["mlflow_run_id"] for t in trials)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search": {"optim.lrate": {"type": "float", "low": 0.1, "high": 1}}}, "'optim.lrate' is not a config field"),
        ({"objective": {"metric": "eval/accuracy"}}, "objective.metric: metric 'eval/accuracy' is not declared"),
        ({"budget": {"trials": 0}}, "budget.trials: Input should be greater than or equal to 1"),
    ],
)
def test_bad_study_files_are_refused_before_any_compute(tmp_path, changes, message):
    path = study_file(tmp_path, **changes)
    r = subprocess.run(tune_cmd(tmp_path, path), capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
