"""The flows' building blocks without Prefect: finished runs by config key in a real MLflow store, the GPU pool's
exclusivity across threads and processes, and training runs as their own processes (finish, resume, fail, kill)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.core import GpuPool, finished_runs, run_training
from rpg_core.sweeps import expand, load_sweep

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_gpus_field_names_devices_cpu_or_the_machines(monkeypatch):
    from flows.core import gpus_of

    monkeypatch.delenv("RPG_GPUS", raising=False)
    assert gpus_of(" 0, 1,") == ["0", "1"] and gpus_of("") == [] and gpus_of("cpu") == []
    monkeypatch.setenv("RPG_GPUS", "2,3")  # set by infra/team/worker.sh on a GPU machine
    assert gpus_of("") == ["2", "3"] and gpus_of("CPU") == [] and gpus_of("1") == ["1"]
    monkeypatch.setenv("RPG_GPUS", "GPU-5f2a")  # a UUID, say: not what CUDA_VISIBLE_DEVICES gets from us
    with pytest.raises(ValueError, match=r"RPG_GPUS='GPU-5f2a': 'GPU-5f2a' is not a CUDA device index"):
        gpus_of("")


@pytest.mark.subprocess
def test_gpu_pool_hands_each_device_to_one_holder(tmp_path):
    pool = GpuPool.parse("0,1", tmp_path / "locks")
    holders: dict[str, int] = {"0": 0, "1": 0}
    peak, seen, lock = [0], [], threading.Lock()

    def work():
        with pool.acquire(poll_s=0.01) as dev:
            with lock:
                holders[dev] += 1
                seen.append(dev)
                assert holders[dev] == 1, f"device {dev} given twice"
                peak[0] = max(peak[0], sum(holders.values()))
            time.sleep(0.05)
            with lock:
                holders[dev] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 6 and peak[0] == 2 and set(seen) == {"0", "1"}
    # another process holding GPU 0 and 1: this one waits, then times out
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from flows.core import GpuPool\n"
            "p = GpuPool.parse('0,1', sys.argv[1])\n"
            "with p.acquire(), p.acquire():\n    print('held', flush=True); time.sleep(30)")  # fmt: skip
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "locks"), str(ROOT)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=r"no free GPU among \['0', '1'\]"):
            with pool.acquire(poll_s=0.05, timeout_s=0.5):
                pass
    finally:
        other.kill()
        other.wait()
    with pool.acquire(timeout_s=5) as dev:  # released when the holder died
        assert dev in ("0", "1")
    with GpuPool.parse("", tmp_path).acquire() as dev:
        assert dev == ""  # CPU
    with pytest.raises(ValueError, match="lists a device twice"):
        GpuPool.parse("0,0", tmp_path)


def _smoke_config(tmp_path: Path, index: int = 0, *extra: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml", overrides=[
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", *extra,
    ])  # fmt: skip
    return expand(sweep).runs[index].config, uri


@pytest.mark.integration
@pytest.mark.subprocess
def test_training_process_finishes_resumes_and_fails(tmp_path):
    cfg, uri = _smoke_config(tmp_path)
    assert finished_runs(uri, "rpg") == {}  # no experiment yet
    said: list[str] = []
    first = run_training(cfg, workdir=tmp_path / "work", cwd=ROOT, on_progress=said.append)
    assert first.ok and first.step == 2 and first.run_id
    # its progress, line by line, as it trained (the flows log these to Prefect): both steps, the held-out eval of
    # step 2 (train.eval_every: 2), the end; none of tqdm's bar redraws
    assert [line.split(" | ")[0] for line in said[:2]] == ["step 1/2", "step 2/2"] and len(said) == 3
    assert said[2].startswith("done: step 2,") and said[2].endswith(f"MLflow run {first.run_id}")
    assert " | reward " in said[0] and " | eval " in said[1] and "%|" not in "".join(said)
    assert finished_runs(uri, "rpg") == {cfg.run_key(): first.run_id}  # by key and seed
    again = run_training(cfg, workdir=tmp_path / "work", cwd=ROOT)  # nothing left to do: resumes at step 2
    assert again.ok and again.run_id == first.run_id and again.step == 2
    log = first.log.read_text()
    assert log.count("=== end t=") == 2 and f"resumed {cfg.run_key()}" in log
    # a run that fails before any compute (bad data source): reported, not finished
    bad, _ = _smoke_config(tmp_path, 1, "data.task=dataset", "data.source=missing.jsonl")
    out = run_training(bad, workdir=tmp_path / "work", cwd=ROOT)
    assert out.returncode == 2 and out.run_id is None and "missing.jsonl" in out.log.read_text()
    assert set(finished_runs(uri, "rpg")) == {cfg.run_key()}


@pytest.mark.subprocess
def test_killed_training_process_is_not_finished_and_a_rerun_completes(tmp_path):
    """A run killed mid-way is not finished; running it again resumes from its last checkpoint into the same
    MLflow run and finishes it. The timeout kills too (1 s: still importing)."""
    cfg, uri = _smoke_config(tmp_path, 2, "train.steps=8", "train.checkpoint_every=1", "train.eval_every=0")
    timed_out = run_training(cfg, workdir=tmp_path / "work", cwd=ROOT, timeout_s=1)
    assert timed_out.returncode == -9 and not timed_out.ok and "stopped after 1 s" in timed_out.log.read_text()
    path = tmp_path / "work" / "configs" / f"{cfg.run_key()}.yaml"  # written by run_training
    proc = subprocess.Popen([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "runs" / cfg.run_key() / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert marker.exists()
    assert cfg.run_key() not in finished_runs(uri, "rpg")
    done = run_training(cfg, workdir=tmp_path / "work", cwd=ROOT)
    assert done.ok and done.step == 8 and finished_runs(uri, "rpg") == {cfg.run_key(): done.run_id}
    assert f"resumed {cfg.run_key()}" in done.log.read_text()


@pytest.mark.subprocess
def test_stop_all_ends_a_running_training_killed_with_its_checkpoints(tmp_path):
    """What a cancelled sweep does to its runs on this machine (flows.core.stop_all): the training process gets
    SIGINT, ends its MLflow run KILLED (not left RUNNING) and keeps its checkpoints; running it again resumes."""
    import threading

    from flows.core import stop_all
    from rpg_core.runs import get_run

    cfg, uri = _smoke_config(tmp_path, 1, "train.steps=400", "train.checkpoint_every=1", "train.eval_every=0")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(out=run_training(cfg, workdir=tmp_path / "work", cwd=ROOT)))
    runner.start()
    marker = tmp_path / "runs" / cfg.run_key() / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    assert stop_all() == 1  # one process was running
    runner.join(timeout=60)
    out = outcome["out"]
    assert not out.ok and out.run_id and out.step >= 2
    assert get_run(out.run_id, tracking_uri=uri)["status"] == "KILLED"
    assert stop_all() == 0


def test_submission_unit_parent_lifecycle_and_outcome(tmp_path):
    """flows.submit: a training run submitted under a parent run comes back with its MLflow run, status, step and
    final metrics (read through rpg_core.runs), nested under the parent and tagged with the sweep; the parent
    ends FINISHED, FAILED on an exception and KILLED on an interrupt, each tagged with its kind."""
    from flows.submit import child_config, parent_run, submit
    from rpg_core.runs import find_runs, get_run
    from rpg_core.tracking import RunKind, host_name

    cfg, uri = _smoke_config(tmp_path, 3)
    with parent_run(RunKind.SWEEP, experiment="rpg", name="sweep-t", tracking_uri=uri, tags={"sweep": "t"}) as parent:
        child = child_config(cfg, parent, sweep="t")
        assert child.key() == cfg.key() and child.tracking.parent_run_id == parent.run_id
        out = submit(child, workdir=tmp_path / "work", cwd=ROOT)
    assert out.ok and out.status == "FINISHED" and out.step == 2 and out.key == cfg.key()
    assert (out.seed, out.run_key, out.host) == (cfg.train.seed, cfg.run_key(), host_name())
    row = get_run(out.run_id, tracking_uri=uri)
    assert (row["parent_run_id"], row["sweep"], row["kind"], row["config_key"]) == (parent.run_id, "t", "train", cfg.key())
    assert out.metrics["reward/mean"] == row["reward/mean"] and "eval/acc_strict" in out.metrics
    for exc, status in ((RuntimeError("some runs failed"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(exc)):
            with parent_run(RunKind.TUNE, experiment="rpg", name=f"p-{status}", tracking_uri=uri):
                raise exc
    untagged = find_runs(tags={"rpg.kind": None}, tracking_uri=uri)  # legacy training runs only (read as train)
    assert list(untagged["run_id"]) in ([], [out.run_id])  # [] once the trainer writes kind=train (branch core)
    statuses = {r.name: r.status for r in find_runs(tracking_uri=uri).itertuples()}
    assert statuses == {"sweep-t": "FINISHED", "p-FAILED": "FAILED", "p-KILLED": "KILLED", row["name"]: "FINISHED"}
    assert set(find_runs(kind=RunKind.TUNE, tracking_uri=uri)["name"]) == {"p-FAILED", "p-KILLED"}


@pytest.mark.unit
def test_nightly_summary_picks_mean_at_k_by_its_declaration():
    """The nightly table shows each benchmark's Mean@k, chosen by the metric schema's declaration (not by a name
    suffix): its standard error, Pass@k, the perf numbers and the clean subset's other metrics are left out."""
    from flows.rpg_flows import _is_mean_at_k

    names = ["aime24/mean_at_32", "amc23_clean/mean_at_32", "aime24/mean_at_32_se", "aime24/pass_at_32",
             "aime24/n_problems", "perf/seconds", "perf/tokens_per_s"]  # fmt: skip
    assert [n for n in names if _is_mean_at_k(n)] == ["aime24/mean_at_32", "amc23_clean/mean_at_32"]
