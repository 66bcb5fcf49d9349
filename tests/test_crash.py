"""Crashes lose nothing and double nothing: a training run SIGKILLed at six named points (rpg_core/faults.py), each
time resumed by the same command, ends with MLflow histories equal to an uninterrupted run's, one point per step;
a run whose process is gone is found (by its run folder's lock here, by its heartbeat elsewhere) and ended FAILED
with rpg.exit=lost, and a live one never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rpg_core import runs, tracking
from rpg_core.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny", "data.level=add1", "data.n_train=64", "data.n_eval=4", "rollout.prompts_per_step=2",
        "rollout.n=4", "rollout.max_new_tokens=8", "algorithm.micro_batch_size=4", "optim.lr=1e-3",
        "optim.warmup_steps=0", "train.log_samples=0", "reward.dynamic_sampling=false", "train.steps=6",
        "train.checkpoint_every=2", "train.eval_every=2", "train.keep_checkpoints=3"]  # fmt: skip
WALL_CLOCK = ("time/", "perf/")  # measured, not computed: the same steps, not the same values


def _cfg(base: Path):
    return load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, f"train.output_dir={base / 'runs'}", f"tracking.tracking_uri=sqlite:///{base / 'mlflow.db'}"])  # fmt: skip


def _train(cfg_file: Path, fault: str | None = None, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONHASHSEED": "0", **env}
    e.pop("RPG_FAULT", None)
    if fault:
        e["RPG_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(cfg_file)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _only_run(uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rpg")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1, [r.info.run_name for r in found]
    return found[0].info.run_id


@pytest.mark.system
@pytest.mark.subprocess
def test_sigkill_at_six_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Six steps, a checkpoint every two, an evaluation every two. One process per kill, each resumed by the same
    command: in the evaluation before step 1 (no checkpoint yet: the next attempt goes on in the same MLflow run,
    recorded in the run folder); after checkpoint 2 is complete; after step 3's metrics were handed to the writer (before any
    checkpoint: the resume recomputes step 3, which MLflow has already); in step 4's evaluation; inside checkpoint
    4's write (the weights written, not the rest: resume falls back to checkpoint 2); at the start of step 5. Then
    the last process finishes. Every metric of the run has the steps of the uninterrupted run's, once each, and
    the same values (wall-clock metrics: the same steps)."""
    a, b = tmp_path / "a", tmp_path / "b"
    ca, cb = _cfg(a), _cfg(b)
    assert ca.run_key() == cb.run_key()
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(ca.to_yaml())
    fb.write_text(cb.to_yaml())
    r = _train(fa)
    assert r.returncode == 0, r.stdout + r.stderr
    kills = ["eval@0", "after_checkpoint@2", "after_log@3", "eval@4", "checkpoint_write@4", "step_start@5"]
    for fault in kills:
        r = _train(fb, fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stdout[-2000:] + r.stderr[-2000:])
    r = _train(fb)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed " in r.stdout and "its previous attempt ended without a word" in r.stdout
    uri_a, uri_b = ca.tracking.tracking_uri, cb.tracking.tracking_uri
    run_a, run_b = _only_run(uri_a), _only_run(uri_b)  # one MLflow run through all six attempts
    tags = MlflowClient(uri_b).get_run(run_b).data.tags
    assert tags["rpg.resumes"] == str(len(kills))
    assert MlflowClient(uri_b).get_run(run_b).info.status == "FINISHED"
    ha, hb = _histories(uri_a, run_a), _histories(uri_b, run_b)
    assert sorted(ha) == sorted(hb)
    assert {s for s, _ in ha["eval/acc_strict"]} == {0, 2, 4, 6} and {s for s, _ in ha["actor/loss"]} == set(range(1, 7))
    for key, points in ha.items():
        steps_a, steps_b = [s for s, _ in points], [s for s, _ in hb[key]]
        assert steps_b == steps_a, (key, steps_b)  # one point per step: none doubled, none lost
        if not key.startswith(WALL_CLOCK):
            assert hb[key] == points, key


@pytest.mark.system
@pytest.mark.subprocess
def test_a_killed_run_is_found_lost_by_its_lock_and_a_live_one_is_not(tmp_path):
    """A run SIGKILLed mid-way stays RUNNING in MLflow; `rpg runs gc` ends it FAILED with rpg.exit=lost, saying no
    process holds its folder's lock. A run training at the same time is left alone. Resuming the lost run clears the
    mark and finishes it."""
    cfg = _cfg(tmp_path)
    f = tmp_path / "run.yaml"
    f.write_text(cfg.to_yaml())
    uri = cfg.tracking.tracking_uri
    r = _train(f, "after_log@3")
    assert r.returncode == -signal.SIGKILL, r.stderr
    lost_id = _only_run(uri)
    assert MlflowClient(uri).get_run(lost_id).info.status == "RUNNING"  # nothing ended it
    # a second, live run (another seed) trains while gc looks
    live_cfg = cfg.with_overrides(["train.seed=1", "train.steps=400", "train.eval_every=0", "train.checkpoint_every=0"])
    live_file = tmp_path / "live.yaml"
    live_file.write_text(live_cfg.to_yaml())
    env = {**os.environ}
    env.pop("RPG_FAULT", None)
    live = subprocess.Popen([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(live_file)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("rpg")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(client.search_runs([exp.experiment_id])) < 2:
            time.sleep(0.5)
        gc = subprocess.run([sys.executable, "-m", "rpg_core.cli", "runs", "gc", "--tracking-uri", uri],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        assert f"ended {lost_id} " in gc.stdout and "no process holds its run folder's lock" in gc.stdout, gc.stdout
        assert "1 lost run(s) ended" in gc.stdout, gc.stdout
        run = client.get_run(lost_id)
        assert run.info.status == "FAILED" and run.data.tags[tracking.EXIT_TAG] == tracking.LOST
        (live_run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != lost_id]
        assert live_run.info.status == "RUNNING" and tracking.EXIT_TAG not in live_run.data.tags
        assert live.poll() is None
    finally:
        live.kill()
        live.wait(timeout=30)
    r = _train(f)  # the lost run resumes: same MLflow run, the mark gone, FINISHED
    assert r.returncode == 0, r.stdout + r.stderr
    run = MlflowClient(uri).get_run(lost_id)
    assert run.info.status == "FINISHED" and tracking.EXIT_TAG not in run.data.tags


@pytest.mark.integration
def test_a_run_elsewhere_is_lost_when_its_heartbeat_stops(tmp_path, monkeypatch):
    """A run on another machine is judged by its heartbeat: a live writer stamps it every HEARTBEAT_S (0.2 s here)
    even when nothing is logged; LOST_AFTER_S after the last stamp it is lost, not before."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.2)
    monkeypatch.setenv("RPG_HOST", "elsewhere")
    t = tracking.Tracker(run_name="far", tracking_uri=uri, kind=tracking.RunKind.SWEEP,
                         tags={tracking.HOST_TAG: "elsewhere"})  # fmt: skip
    first = int(MlflowClient(uri).get_run(t.run_id).data.tags[tracking.HEARTBEAT_TAG])
    time.sleep(1.5)  # nothing logged meanwhile
    t.flush()
    beat = int(MlflowClient(uri).get_run(t.run_id).data.tags[tracking.HEARTBEAT_TAG])
    assert beat >= first + 1
    monkeypatch.setenv("RPG_HOST", "here")
    assert runs.lost_runs(tracking_uri=uri, now=beat + runs.LOST_AFTER_S - 1) == []
    (lost,) = runs.lost_runs(tracking_uri=uri, now=beat + runs.LOST_AFTER_S + 60)
    assert lost.run_id == t.run_id and lost.reason.startswith("no heartbeat for ") and lost.reason.endswith("(on elsewhere)")
    t.finish()
    assert runs.lost_runs(tracking_uri=uri, now=beat + 10**6) == []  # ended: not RUNNING


def _start_mlflow(uri: str, cwd: Path, port: int) -> subprocess.Popen:
    from servers import server_env, wait_healthy

    log = (cwd / f"mlflow-{port}-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1", "--artifacts-destination",
                             str(cwd / "mlartifacts")], cwd=cwd, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.system
@pytest.mark.server
@pytest.mark.subprocess
def test_the_mlflow_server_killed_mid_run_loses_and_doubles_nothing(tmp_path):
    """The tracking server is SIGKILLed while a run trains and comes back 20 s later on the same port and store. The
    run goes on meanwhile (the writer queues and retries; the stop-request reads give up after 5 s each), ends
    FINISHED, and every metric has each of its steps exactly once, as an uninterrupted run of the same config."""
    from servers import free_port

    store = f"sqlite:///{tmp_path / 'server.db'}"
    port = free_port()
    server = _start_mlflow(store, tmp_path, port)
    cfg = _cfg(tmp_path).with_overrides(["train.steps=40", "train.eval_every=10", "train.checkpoint_every=10",
                                         f"tracking.tracking_uri=http://127.0.0.1:{port}"])  # fmt: skip
    f = tmp_path / "run.yaml"
    f.write_text(cfg.to_yaml())
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("RPG_FAULT", None)
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(f)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "step 3/40" not in (tmp_path / "train.log").read_text():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.2)
        _stop(server)  # mid-run
        down_at = (tmp_path / "train.log").read_text().count("| reward")
        time.sleep(20)
        during = (tmp_path / "train.log").read_text().count("| reward") - down_at
        server = _start_mlflow(store, tmp_path, port)
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(server)
        log.close()
    assert down_at < 40, "the server went down after the run ended: nothing tested"
    assert during >= 3, f"training waited on the dead server: {during} steps in 20 s"
    run_id = _only_run(store)
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
    h = _histories(store, run_id)
    assert [s for s, _ in h["actor/loss"]] == list(range(1, 41))
    assert [s for s, _ in h["eval/acc_strict"]] == [0, 10, 20, 30, 40]
    assert all(len({s for s, _ in pts}) == len(pts) for pts in h.values())  # no step twice in any metric


@pytest.mark.system
@pytest.mark.subprocess
def test_sigterm_checkpoints_the_step_it_reached_and_exits_cleanly(tmp_path):
    """SIGTERM (a preemption, `kill`): the run stops at the end of its step with a checkpoint of that step (not the
    last periodic one), ends KILLED with the reason tagged, exits 143 saying how to resume, no traceback; running
    it again resumes from that step and finishes, every step logged once."""
    cfg = _cfg(tmp_path).with_overrides(["train.steps=30", "train.checkpoint_every=0", "train.eval_every=0"])
    f = tmp_path / "run.yaml"
    f.write_text(cfg.to_yaml())
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("RPG_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(f)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out = ""
    while "step 3/30" not in out:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        out += line
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    out += rest
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err and "rpg train: stopped by SIGTERM at step " in out, out + err
    step = int(out.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert 3 <= step < 30
    ckpts = sorted((Path(cfg.train.output_dir) / cfg.run_key() / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{step:06d}"]  # checkpoint_every=0: only the one SIGTERM wrote
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(_only_run(cfg.tracking.tracking_uri))
    assert run.info.status == "KILLED" and run.data.tags["stopped"].startswith(f"SIGTERM at step {step}")
    r = _train(f)
    assert r.returncode == 0 and f"resumed {cfg.run_key()} from {ckpts[0]} (step {step}," in r.stdout, r.stdout + r.stderr
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(run.info.run_id).info.status == "FINISHED"
    h = _histories(cfg.tracking.tracking_uri, run.info.run_id)
    assert [s for s, _ in h["actor/loss"]] == list(range(1, 31))
    assert all(len({s for s, _ in pts}) == len(pts) for pts in h.values())  # no step twice in any metric


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MiB tmpfs: room for one checkpoint of the tiny run (~38 MB with its reference), not two. Root only (the
    CI runs as root); elsewhere the test is skipped saying so."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.system
@pytest.mark.subprocess
def test_a_full_disk_at_checkpoint_time_keeps_the_last_checkpoint_and_says_so(tmp_path, small_disk):
    """The disk fills while checkpoint 4 is written: rpg train stops with one line naming the step, the folder and
    the cause, exit 1, no traceback; checkpoint 2 stays whole and nothing half-written is left; the MLflow run ends
    FAILED with the error. Once there is room, the same command resumes from step 2 and finishes, each step once."""
    cfg = _cfg(tmp_path).with_overrides([f"train.output_dir={small_disk / 'runs'}", "train.steps=4"])
    f = tmp_path / "run.yaml"
    f.write_text(cfg.to_yaml())
    r = _train(f)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("rpg train:")]
    assert "Traceback" not in r.stderr and len(err) == 1, r.stderr[-3000:]
    assert "checkpoint of step 4 not written" in err[0] and "No space left on device" in err[0], err[0]
    assert "the checkpoint of step 2 is kept" in err[0], err[0]
    folder = small_disk / "runs" / cfg.run_key() / "checkpoints"
    from rpg_core import checkpoints

    assert sorted(p.name for p in folder.iterdir()) == ["step_000002"]  # no .tmp_ left to fill the disk further
    assert checkpoints.verify(folder / "step_000002") is None
    uri = cfg.tracking.tracking_uri
    run = MlflowClient(uri).get_run(_only_run(uri))
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    r = _train(f)
    assert r.returncode == 0 and f"resumed {cfg.run_key()} from {folder / 'step_000002'}" in r.stdout, r.stdout + r.stderr
    h = _histories(uri, run.info.run_id)
    assert [s for s, _ in h["actor/loss"]] == [1, 2, 3, 4]


@pytest.mark.integration
def test_a_fresh_start_moves_the_old_checkpoints_aside(tmp_path):
    """`--fresh` (resume=False) keeps the earlier attempt's checkpoints but out of the way: a fresh run killed before
    its own first checkpoint must not resume from the old run's step 2 later."""
    from rpg_core import checkpoints
    from rpg_core.trainer import Trainer

    cfg = _cfg(tmp_path).with_overrides(["train.steps=2", "train.eval_every=0", "train.device=cpu"])
    Trainer(cfg).fit()
    run_dir = Path(cfg.train.output_dir) / cfg.run_key()
    assert checkpoints.latest(run_dir).name == "step_000002"
    fresh = Trainer(cfg, resume=False)
    assert fresh.step == 0 and checkpoints.latest(run_dir) is None
    (aside,) = run_dir.glob("checkpoints.before-fresh-*")
    assert (aside / "step_000002" / checkpoints.MARKER).is_file()
    fresh.fit(stop_after=1)  # interrupted after step 1, before any checkpoint of its own
    assert Trainer(cfg).step == 0  # resumes nothing of the old run
