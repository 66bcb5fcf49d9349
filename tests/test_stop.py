"""Stopping a training run on a coordinator's request (a tuner's pruning), through MLflow: ``request_stop`` tags the
run, the trainer reads the tag once per step, checkpoints, ends the run KILLED tagged ``rpg.pruned_at_step``, and
``rpg train`` exits ``PRUNED_EXIT``; a resume clears the request and trains on. Real SQLite stores, a real MLflow
server (stalled and killed under a reading tracker), the tiny model in process and in an ``rpg train`` process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rpg_core import tracking
from rpg_core.tracking import (
    PRUNED_EXIT,
    PRUNED_TAG,
    STOP_TAG,
    STOPPED_TAG,
    Tracker,
    TrackingError,
    request_stop,
    stop_tags,
)
from servers import free_port, wait_healthy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _tags(uri: str, run_id: str) -> dict[str, str]:
    return MlflowClient(uri).get_run(run_id).data.tags


def test_request_stop_is_read_by_the_runs_tracker_and_cleared(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(run_name="r", tracking_uri=uri)
    assert t.stop_requested() is None
    request_stop(t.run_id, tracking_uri=uri)  # from another client, as a coordinator on another machine would
    assert t.stop_requested() == "pruned" == _tags(uri, t.run_id)[STOP_TAG]
    request_stop(t.run_id, "budget spent", tracking_uri=uri)
    assert t.stop_requested() == "budget spent"
    for bad in ("", "  ", "two\nlines"):
        with pytest.raises(ValueError, match="one-line string"):
            request_stop(t.run_id, bad, tracking_uri=uri)
    t.set_tags(stop_tags("pruned", 7))
    t.flush()
    assert _tags(uri, t.run_id)[PRUNED_TAG] == "7"
    t.clear_stop()  # what a resumed training run does first
    tags = _tags(uri, t.run_id)
    assert STOP_TAG not in tags and PRUNED_TAG not in tags and t.stop_requested() is None
    t.clear_stop()  # nothing to delete: no error
    t.finish("KILLED")
    assert t.stop_requested() is None  # a finished tracker reads nothing
    assert stop_tags("budget spent", 3) == {STOPPED_TAG: "budget spent at step 3 (stop requested)"}
    off = Tracker(enabled=False)
    off.clear_stop()
    assert off.stop_requested() is None


@pytest.mark.server
@pytest.mark.subprocess
def test_stop_read_survives_a_stalled_and_a_dead_server(tmp_path, monkeypatch, caplog):
    """The server stops answering (SIGSTOP): the read gives up after its timeout, and the next one does not wait on
    the stalled read again; answering again (SIGCONT), the request is seen; gone (SIGKILL), the read fails: None,
    one warning per outage, never an exception."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    caplog.set_level(logging.DEBUG, logger=tracking.__name__)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    http = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(http, proc)
        t = Tracker(run_name="r", tracking_uri=http)
        request_stop(t.run_id, tracking_uri=http)
        assert t.stop_requested() == "pruned"
        warnings = lambda: [r for r in caplog.records if r.levelno == logging.WARNING]  # noqa: E731
        os.killpg(proc.pid, signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
        assert t.stop_requested(timeout_s=0.5) is None
        assert len(warnings()) == 1 and "could not read the stop request" in warnings()[0].getMessage()
        assert t.stop_requested(timeout_s=60) is None  # the stalled read is not waited on again
        os.killpg(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while (seen := t.stop_requested(timeout_s=30)) is None and time.monotonic() < deadline:
            time.sleep(0.1)  # until the stalled read is answered and a fresh one is made
        assert seen == "pruned" and len(warnings()) == 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert t.stop_requested(timeout_s=30) is None and t.stop_requested(timeout_s=30) is None
        assert len(warnings()) == 2  # one per outage; the second failed read of this one logs at debug level
        with pytest.raises(TrackingError, match="could not end MLflow run"):  # the server is gone
            t.finish("KILLED")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


TINY = [
    "model.name=tiny", "data.level=add1", "data.n_train=64", "data.n_eval=4", "rollout.prompts_per_step=2",
    "rollout.n=4", "rollout.max_new_tokens=8", "algorithm.micro_batch_size=4", "optim.lr=1e-3",
    "optim.warmup_steps=0", "train.log_samples=2", "reward.dynamic_sampling=false",
]  # fmt: skip


def test_a_pruned_run_stops_at_that_step_and_a_resume_completes_it(tmp_path):
    """The stop is requested during step 2's evaluation: the run stops after step 2 (logged, evaluated), with a
    checkpoint of step 2 (checkpoint_every=3 would not have written one), KILLED, tagged rpg.pruned_at_step=2. Started
    again, the run clears the request and trains on to step 4, FINISHED, in the same MLflow run."""
    from rpg_core.config import load_run_config
    from rpg_core.trainer import Trainer, heldout_eval

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, "train.steps=4", "train.eval_every=1", "train.checkpoint_every=3", "train.device=cpu",
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"])  # fmt: skip
    asked = []

    def prune_at_2(tr: Trainer, step: int) -> dict[str, float]:
        if step == 2:
            request_stop(tr.run_id, tracking_uri=uri)
            asked.append(step)
        return heldout_eval(tr, step)

    tr = Trainer(cfg, eval_hook=prune_at_2)
    res = tr.fit()
    assert asked == [2] and (res.stopped, res.step, len(res.history)) == ("pruned", 2, 2)
    assert [p.name for p in tr.ckpt_dir.glob("step_*")] == ["step_000002"]
    state = json.loads((tr.ckpt_dir / "step_000002" / "state.json").read_text())
    assert (state["step"], state["run_id"], len(state["history"])) == (2, res.run_id, 2)
    client = MlflowClient(uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "KILLED"
    tags = run.data.tags
    assert (tags[PRUNED_TAG], tags[STOP_TAG], tags["rpg.checkpoint_step"]) == ("2", "pruned", "2")
    assert STOPPED_TAG not in tags
    assert [m.step for m in client.get_metric_history(res.run_id, "eval/acc_strict")] == [0, 1, 2]

    again = Trainer(cfg)  # a resume (a re-run of the same config): the old request must not stop it
    assert again.step == 2 and again.run_id == res.run_id
    tags = _tags(uri, res.run_id)
    assert STOP_TAG not in tags and PRUNED_TAG not in tags and tags["rpg.resumes"] == "1"
    done = again.fit()
    assert (done.stopped, done.step, len(done.history), done.run_id) == (None, 4, 4, res.run_id)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and STOP_TAG not in run.data.tags and PRUNED_TAG not in run.data.tags
    assert [m.step for m in client.get_metric_history(res.run_id, "acc/strict")] == [1, 2, 3, 4]


@pytest.mark.subprocess
def test_rpg_train_stopped_by_request_stop_exits_pruned(tmp_path):
    """`rpg train` as its own process (flows.submit.submit -> flows.core.run_training), pruned from this process once
    it has checkpointed step 2: it exits PRUNED_EXIT, the outcome says pruned (not ok), the run ends KILLED with a
    checkpoint of the step it stopped at, and its log says so."""
    from flows.core import stop_all
    from flows.submit import submit
    from rpg_core.sweeps import expand, load_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml", overrides=[
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", "train.steps=400",
        "train.checkpoint_every=1", "train.eval_every=0"])  # fmt: skip
    cfg = expand(sweep).runs[0].config
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(out=submit(cfg, workdir=tmp_path / "work", cwd=ROOT)))
    runner.start()
    ckpts = tmp_path / "runs" / cfg.run_key() / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "step_000002" / "COMPLETE").exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        run_id = json.loads((ckpts / "step_000002" / "state.json").read_text())["run_id"]
        request_stop(run_id, tracking_uri=uri)
        runner.join(timeout=120)
    finally:
        if runner.is_alive():
            stop_all()
            runner.join()
    out = outcome["out"]
    assert out.returncode == PRUNED_EXIT == 3 and out.pruned and not out.ok
    assert (out.run_id, out.status) == (run_id, "KILLED")
    pruned_at = int(_tags(uri, run_id)[PRUNED_TAG])
    assert 2 <= pruned_at == out.step < 400 and (ckpts / f"step_{pruned_at:06d}" / "COMPLETE").exists()
    assert f"rpg train: pruned at step {pruned_at} (stop requested by tag {STOP_TAG}=pruned" in out.log.read_text()


@pytest.mark.system
@pytest.mark.subprocess
def test_two_processes_stop_together(tmp_path):
    """Under `accelerate launch` (2 gloo processes) only the main process reads the request; both stop after the same
    step (neither waits in a collective for the other); the main process exits PRUNED_EXIT after ending the run, the
    other one 0, so torch's launcher SIGTERMs nobody (accelerate launch itself then exits 1)."""
    from rpg_core.config import load_run_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, "data.n_eval=0", "train.steps=400", "train.checkpoint_every=1", f"train.output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri={uri}"])  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "infra/accelerate/cpu_2proc.yaml"),
         "--main_process_port", "0", "-m", "rpg_core.cli", "train", "--config", str(path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ckpts = tmp_path / "runs" / cfg.run_key() / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / "step_000002" / "COMPLETE").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run_id = json.loads((ckpts / "step_000002" / "state.json").read_text())["run_id"]
        request_stop(run_id, tracking_uri=uri)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    pruned_at = int(_tags(uri, run_id)[PRUNED_TAG])
    assert f"rpg train: pruned at step {pruned_at} " in out, out[-3000:]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert (ckpts / f"step_{pruned_at:06d}" / "COMPLETE").exists() and pruned_at < 400
    # torch's elastic launcher lists the processes that exited non-zero: the main one alone, with PRUNED_EXIT
    assert proc.returncode == 1 and out.count("exitcode  :") == out.count("exitcode  : 3 ") == 1, out[-3000:]
    assert "rank      : 0 " in out and "SIGTERM" not in out, out[-3000:]
