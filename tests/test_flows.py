"""The Prefect flows against a real Prefect server (started here on a free 127.0.0.1 port, stopped after) and a
real MLflow store: the smoke sweep end to end, a second trigger that runs nothing new, a failed run and a killed run
that a re-run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, listening, training_processes

pytestmark = [pytest.mark.system, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[1]


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (serve ignores SIGINT for seconds), SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME; the client settings point at it."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "true", "PREFECT_SERVER_UI_ENABLED": "false"}  # fmt: skip
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    from prefect.settings import (PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, PREFECT_LOGGING_TO_API_ENABLED,
                                  temporary_settings)  # fmt: skip

    with temporary_settings({PREFECT_API_URL: url, PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
                             PREFECT_LOGGING_TO_API_ENABLED: False}):  # fmt: skip
        yield url
    _stop(proc)
    log.close()
    assert not listening(port)


def test_smoke_sweep_runs_every_config_once(prefect_server, tmp_path, monkeypatch):
    from flows.rpg_flows import gpu_limit_name, sweep

    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = [f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]
    kw = dict(sweep_file="sweeps/smoke.yaml", overrides=over, concurrency=2, gpus="0,1", workdir=str(tmp_path / "work"))
    rows = sweep(**kw)  # device ids only name CUDA_VISIBLE_DEVICES: on this CPU-only torch the runs use the CPU
    assert [r["status"] for r in rows] == ["finished"] * 4
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rpg").experiment_id
    (parent,) = client.search_runs([exp], "tags.`rpg.kind` = 'sweep'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["config_key"] for c in children) == sorted(r["key"] for r in rows)
    assert all(c.info.status == "FINISHED" and "acc/strict" in c.data.metrics for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["runs_finished"] == 4
    spans = [(c.info.start_time, c.info.end_time) for c in children]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap <= 2  # concurrency=2: never more than 2 training processes at once
    # each process got one device, given in its environment; two runs at once never shared one
    gpu = {r["run_id"]: r["gpu"] for r in rows}
    assert set(gpu.values()) == {"0", "1"}
    for r in rows:
        log = tmp_path / "work" / "smoke" / "logs" / f"{r['key']}-s{r['seed']}.log"  # one log per run key
        assert f"(CUDA_VISIBLE_DEVICES='{r['gpu']}')" in log.read_text()
    for a in children:
        for b in children:
            if a is not b and a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time:
                assert gpu[a.info.run_id] != gpu[b.info.run_id]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        assert pc.read_global_concurrency_limit_by_name(gpu_limit_name()).limit == 2  # created by the flow
        # its progress, as the UI shows it: the newest version of the keyed Markdown artifact, every run finished
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        board = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-smoke-runs"])))
        newest = max(board, key=lambda a: a.created).data
        assert "4 runs: 4 finished" in newest and newest.count("| finished |") == 4, newest
        assert len(board) >= 2  # written as the runs changed state, not only at the end
        # concurrency=2 of 4 runs: the first version shows two waiting for a slot (no task run exists for them yet)
        first = min(board, key=lambda a: a.created).data
        assert "4 runs: 4 waiting for a GPU slot" in first or "2 waiting for a GPU slot" in first, first
        # the answer: the configurations ranked over seeds, on the parent run and as the sweep's artifact
        (ranked,) = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-smoke"])))
        assert ranked.data.startswith("### sweep smoke: best on eval/acc_strict (Last): ") and ranked.data.count("| **") == 4
    assert parent.data.tags["mlflow.note.content"] == ranked.data
    assert {"ranked.json", "ranked.md", "summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # A second trigger runs nothing new.
    again = sweep(**kw)
    assert [r["status"] for r in again] == ["skipped (finished)"] * 4
    assert [r["run_id"] for r in again] == [r["run_id"] for r in rows]


def test_failed_run_is_reported_and_a_rerun_completes_only_it(prefect_server, tmp_path, monkeypatch):
    """One config needs a data file that does not exist yet: it fails (after its retry), the sweep reports it and
    fails; once the file exists, re-running the sweep runs only that config."""
    import json

    import yaml

    from flows.rpg_flows import sweep

    monkeypatch.chdir(ROOT)
    smoke = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    data = tmp_path / "problems.jsonl"
    spec = {"name": "partial", "preset": smoke["preset"], "base": {**smoke["base"], "train.steps": 1},
            "grid": {"variant": [{"label": "builtin", "data.level": "add1"},
                                 {"label": "from-file", "data.task": "dataset", "data.source": str(data),
                                  "data.n_eval": 0}]}}  # fmt: skip
    path = tmp_path / "partial.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(sweep_file=str(path), overrides=[f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"],
              retries=1, workdir=str(tmp_path / "work"))  # fmt: skip
    with pytest.raises(RuntimeError, match="sweep partial: 1 of 2 runs failed; re-run to complete the missing ones"):
        sweep(**kw)
    (log,) = [t for p in (tmp_path / "work" / "partial" / "logs").glob("*.log") if "no such file" in (t := p.read_text())]
    assert log.count("=== end t=") == 2  # the first attempt and its retry
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rpg").experiment_id
    (parent,) = client.search_runs([exp], "tags.`rpg.kind` = 'sweep'")
    assert parent.info.status == "FAILED" and parent.data.metrics["runs_failed"] == 1
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(20)))  # fmt: skip
    rows = sweep(**kw)
    assert [r["status"] for r in rows] == ["skipped (finished)", "finished"]


def _kill_when(marker: Path, config_path: Path, timeout: float = 300) -> threading.Thread:
    """In the background: once ``marker`` exists, SIGKILL the `rpg train --config <config_path>` process (an OOM kill,
    a node going away)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"train" in argv and str(config_path).encode() in argv:
                os.kill(int(proc.name), signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killed_run_is_reported_and_a_rerun_resumes_only_it(prefect_server, tmp_path, monkeypatch):
    """One training process of a sweep is SIGKILLed after its second checkpoint: the sweep reports it (and fails),
    the other run finishes. Re-running the sweep runs only the killed one, which resumes from its checkpoint into
    the same MLflow run."""
    import json

    import pandas as pd
    import yaml

    from flows.rpg_flows import sweep
    from rpg_core.sweeps import expand, load_sweep

    monkeypatch.chdir(ROOT)
    smoke = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    spec = {"name": "killed", "preset": smoke["preset"],
            "base": {**smoke["base"], "train.steps": 8, "train.checkpoint_every": 1, "train.eval_every": 0},
            "grid": {"objective.direction": ["forward", "reverse"]}}  # fmt: skip
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = [f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]
    kw = dict(sweep_file=str(path), overrides=over, retries=0, workdir=str(tmp_path / "work"))
    victim_run = expand(load_sweep(str(path), overrides=over)).runs[0]
    victim = victim_run.key
    marker = tmp_path / "runs" / victim_run.run_key / "checkpoints" / "step_000002" / "COMPLETE"
    killer = _kill_when(marker, tmp_path / "work" / "killed" / "configs" / f"{victim_run.run_key}.yaml")
    with pytest.raises(RuntimeError, match="sweep killed: 1 of 2 runs failed"):
        sweep(**kw)
    killer.join(timeout=5)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rpg").experiment_id
    (parent,) = client.search_runs([exp], "tags.`rpg.kind` = 'sweep'")
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    status = {row["key"]: row["status"] for row in pd.DataFrame(**summary).to_dict("records")}
    assert status[victim].startswith("failed: ") and "exited with -9" in status[victim]
    assert list(status.values()).count("finished") == 1
    (killed,) = client.search_runs([exp], f"params.config_key = '{victim}'")
    assert killed.info.status == "RUNNING"  # as the kill left it
    rows = sweep(**kw)
    assert {r["key"]: r["status"] for r in rows} == {k: "finished" if k == victim else "skipped (finished)" for k in status}
    assert next(r for r in rows if r["key"] == victim)["run_id"] == killed.info.run_id  # the same MLflow run
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["mlflow.parentRunId"] == parent.info.run_id  # stays under the sweep run that started it
    assert json.loads(resumed.data.tags["rpg.changed_on_resume"])["tracking.parent_run_id"][0] == parent.info.run_id
    # steps 1-2 (or 1-3: a step may log before its checkpoint is written) by the killed process, the rest resumed
    assert sorted({m.step for m in client.get_metric_history(killed.info.run_id, "reward/mean")}) == list(range(1, 9))
    assert f"resumed {victim_run.run_key}" in (tmp_path / "work" / "killed" / "logs" / f"{victim_run.run_key}.log").read_text()


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`python -m flows.serve` (the deployments) against the test server, polling every second."""
    from prefect.client.orchestration import get_client

    home = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(home),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
           "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--cron", "0 2 * * *"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name("nightly_eval/nightly_eval")
                break
            except Exception:  # noqa: BLE001 - not registered yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("serve did not start:\n" + (home / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.5)
    yield home
    _stop(proc)
    log.close()


def test_run_button_triggers_the_smoke_sweep(served, tmp_path):
    """What the UI's Run button does: create a flow run of the `sweep` deployment with the form's parameters.
    Bad parameters are refused by the server; the run completes in the serve process; every expanded config ends
    as a finished MLflow child run. The nightly deployment carries its cron schedule."""
    from prefect.client.orchestration import get_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"sweep_file": "sweeps/smoke.yaml", "concurrency": 2, "workdir": str(tmp_path / "work"),
              "overrides": [f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]}  # fmt: skip
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sweep/sweep")
        for bad, field in (({"concurrency": 0}, "concurrency"), ({"gpus": "a,b"}, "gpus"), ({"force": "maybe"}, "force")):
            with pytest.raises(Exception, match=field):
                client.create_flow_run_from_deployment(dep.id, parameters={**params, **bad})
        run = client.create_flow_run_from_deployment(dep.id, parameters=params)
        deadline = time.monotonic() + 600
        while not (state := client.read_flow_run(run.id).state).is_final():
            assert time.monotonic() < deadline, f"sweep run still {state.name}"
            time.sleep(1)
        assert state.is_completed(), state.message
        nightly = client.read_deployment_by_name("nightly_eval/nightly_eval")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    client_ml = MlflowClient(uri)
    exp = client_ml.get_experiment_by_name("rpg").experiment_id
    runs = client_ml.search_runs([exp], "tags.sweep = 'smoke' and attributes.status = 'FINISHED'")
    children = [r for r in runs if r.data.tags.get("rpg.kind") != "sweep"]
    assert len(runs) == 5 and len(children) == 4 and all("acc/strict" in c.data.metrics for c in children)


def test_cancelling_a_served_sweep_stops_its_runs_and_a_rerun_completes_it(served, tmp_path):
    """The UI's Cancel on a sweep served on this machine: its training processes stop (ending their MLflow runs
    KILLED, not RUNNING, with their checkpoints), the machine's GPU slots are released, and triggering the sweep
    again runs only what was missing: both cancelled runs resume from their checkpoints into their MLflow runs."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from flows.rpg_flows import gpu_limit_name, sweep

    smoke = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    spec = {"name": "cancelled", "preset": smoke["preset"],
            "base": {**smoke["base"], "train.steps": 30, "train.checkpoint_every": 1, "train.eval_every": 0,
                     "tracking.experiment": "cancel"},
            "grid": {"objective.direction": ["forward", "reverse"]}}  # fmt: skip
    path = tmp_path / "cancelled.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = [f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]
    params = {"sweep_file": str(path), "concurrency": 2, "gpus": "0,1", "workdir": str(tmp_path / "work"),
              "overrides": over}  # fmt: skip
    ckpt = lambda: {c.parents[2] for c in (tmp_path / "runs").glob("*/checkpoints/step_*/COMPLETE")}  # noqa: E731
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sweep/sweep")
        run = client.create_flow_run_from_deployment(dep.id, parameters=params)
        deadline = time.monotonic() + 300
        while len(ckpt()) < 2:  # both runs are training and have a checkpoint
            assert time.monotonic() < deadline and not client.read_flow_run(run.id).state.is_final()
            time.sleep(0.1)
        client.set_flow_run_state(run.id, Cancelling())  # what the UI's Cancel does
        deadline = time.monotonic() + 120
        while not client.read_flow_run(run.id).state.is_cancelled() or training_processes(str(tmp_path)):
            assert time.monotonic() < deadline, (client.read_flow_run(run.id).state, training_processes(str(tmp_path)))
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while client.read_global_concurrency_limit_by_name(gpu_limit_name()).active_slots:
            assert time.monotonic() < deadline, "the cancelled sweep's GPU slots are still held"
            time.sleep(0.5)
    ml = MlflowClient(uri)
    exp = ml.get_experiment_by_name("cancel").experiment_id
    kids = ml.search_runs([exp], "tags.`rpg.kind` = 'train'")
    logs = "".join(f"--- {p.name}\n" + p.read_text()[-2500:] for p in sorted((tmp_path / "work").rglob("*.log")))
    assert len(kids) == 2 and {k.info.status for k in kids} == {"KILLED"}, ([k.info.status for k in kids], logs)
    (parent,) = ml.search_runs([exp], "tags.`rpg.kind` = 'sweep'")
    assert parent.info.status == "KILLED"
    rows = sweep(sweep_file=str(path), overrides=over, gpus="0,1", concurrency=2, workdir=str(tmp_path / "work"))
    assert [r["status"] for r in rows] == ["finished"] * 2
    assert {r["run_id"] for r in rows} == {k.info.run_id for k in kids}  # completed in their own MLflow runs
    logs = [f.read_text() for f in (tmp_path / "work" / "cancelled" / "logs").glob("*.log")]
    assert len(logs) == 2 and all("resumed " in t for t in logs)


@pytest.mark.integration
def test_a_crashed_holders_gpu_slot_is_reclaimed(prefect_server, monkeypatch):
    """Prefect leaves a slot held by a process that died without releasing it; ours are leased (SLOT_LEASE_S), so
    the server takes it back once the lease runs out: a SIGKILLed holder's slot is free again within ~75 s."""
    from prefect.client.orchestration import get_client

    from flows.rpg_flows import SLOT_LEASE_S, ensure_gpu_limit

    monkeypatch.setenv("RPG_HOST", "crashy")
    name = ensure_gpu_limit(1)
    code = ("import os, time; os.environ['RPG_HOST'] = 'crashy'\n"
            "from flows.rpg_flows import gpu_slots\n"
            "with gpu_slots(1):\n    print('held', flush=True); time.sleep(600)\n")  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
        holder.kill()  # SIGKILL: no release
        holder.wait()
        t0 = time.monotonic()
        while client.read_global_concurrency_limit_by_name(name).active_slots:
            assert time.monotonic() - t0 < SLOT_LEASE_S + 60, "the dead holder's slot was never reclaimed"
            time.sleep(1)


@pytest.mark.skipif(__import__("rpg_core.data", fromlist=["x"]).shared_data_dir() is None, reason="shared/data absent")
def test_nightly_eval_evaluates_runs_finished_since_the_last_nightly(prefect_server, tmp_path, monkeypatch):
    """A finished training run is evaluated by the next nightly into its own MLflow run; the nightly after that
    finds nothing new; a named model is evaluated into a new eval run."""
    from flows.core import run_training
    from flows.rpg_flows import nightly_eval
    from rpg_core.sweeps import expand, load_sweep

    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = expand(load_sweep(ROOT / "sweeps" / "smoke.yaml", overrides=[
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", "train.steps=1"])).runs[0].config  # fmt: skip
    out = run_training(cfg, workdir=tmp_path / "work", cwd=ROOT)
    assert out.ok
    kw = dict(benchmarks=["aime24"], k=2, limit=1, max_new_tokens=4, tracking_uri=uri, workdir=str(tmp_path / "work"))
    rows = nightly_eval(**kw)
    assert [r["model"] for r in rows] == [out.run_id] and rows[0]["status"] == "evaluated"
    client = MlflowClient(uri)
    hist = client.get_metric_history(out.run_id, "eval/aime24/mean_at_2")
    assert [h.step for h in hist] == [1]  # into the training run, at its checkpoint's step
    assert nightly_eval(**kw) == []  # nothing finished since
    named = nightly_eval(model="tiny", **kw)
    assert named[0]["model"] == "tiny" and "aime24/mean_at_2" in named[0]
    nightlies = client.search_runs([client.get_experiment_by_name("rpg-eval").experiment_id], "tags.`rpg.kind` = 'nightly'")
    assert len(nightlies) == 3 and all(n.info.status == "FINISHED" for n in nightlies)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.skipif(__import__("rpg_core.data", fromlist=["x"]).shared_data_dir() is None, reason="shared/data absent")
def test_evaluate_flow_samples_with_the_vllm_engine(prefect_server, tmp_path, monkeypatch, tokenizer):
    """The evaluate and nightly_eval forms' ``engine``: evaluate with vllm runs `rpg eval --engine vllm` in its own
    process (the model: test_vllm's tiny Qwen2 with heads of 64, which vLLM's CPU attention takes, saved as a folder);
    its MLflow eval run records the engine, and its Mean@2 is a mean of 0/1 verdicts over 2 samples of 1 problem."""
    from flows.rpg_flows import evaluate
    from test_vllm import vllm_tiny_model

    monkeypatch.chdir(ROOT)
    model_dir = tmp_path / "model"
    vllm_tiny_model(0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = evaluate(model=str(model_dir), engine="vllm", benchmarks=["aime24"], k=2, limit=1, max_new_tokens=4,
                       tracking_uri=uri, workdir=str(tmp_path / "work"))  # fmt: skip
    assert metrics["aime24/mean_at_2"] in (0.0, 0.5, 1.0)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rpg-eval").experiment_id])
    assert run.data.params["evaluation.engine"] == "vllm", run.data.params


def test_tune_flow_runs_a_study_with_its_trials_as_tasks_and_continues_it(prefect_server, tmp_path, monkeypatch):
    """The `tune` flow on this machine: each trial's run a Prefect task holding a GPU slot, the study's progress as
    artifacts, the trials table; triggered again with a larger budget it continues the same study (same name, same
    MLflow parent) and trains only the new trial."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.rpg_flows import tune

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RPG_OPTUNA_STORAGE", str(tmp_path / "optuna.journal"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = yaml.safe_load((ROOT / "sweeps" / "tune_smoke.yaml").read_text())
    spec["base"]["train.steps"] = 2
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    over = [f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]
    kw = dict(study_file=str(path), overrides=over, concurrency=2, gpus="0,1", workdir=str(tmp_path / "work"))
    (first,) = tune(**kw, trials=2)
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"], first
    with get_client(sync_client=True) as pc:
        key = "tune-" + first["study"].lower().replace("_", "-")
        board = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-runs"])))
        assert "2 runs: 2 finished" in max(board, key=lambda a: a.created).data
        table = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert table and first["trials"][0]["config_key"] in str(table[-1].data)
    (second,) = tune(**kw, trials=3)
    assert second["study"] == first["study"] and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert [t["state"] for t in second["trials"]] == ["COMPLETE"] * 3
    ml = MlflowClient(uri)
    exp = ml.get_experiment_by_name("tune-smoke").experiment_id
    kids = ml.search_runs([exp], f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")
    assert sorted(k.info.run_id for k in kids) == sorted(t["mlflow_run_id"] for t in second["trials"])


@pytest.mark.integration
def test_deploy_registers_the_flows_on_a_work_pool(prefect_server):
    """For GPU machines: `python -m flows.deploy --pool P` puts the four deployments on a process work pool (a
    `prefect worker start --pool P` per machine then runs them; infra/team/worker.sh)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy, ensure_pool

    with get_client(sync_client=True) as client:
        deploy("test-gpu-pool", cron="30 3 * * *")  # creates the pool
        pool = client.read_work_pool("test-gpu-pool")
        deps = {d.name: d for d in client.read_deployments() if d.work_pool_name == "test-gpu-pool"}
        client.create_work_pool(WorkPoolCreate(name="test-k8s-pool", type="kubernetes"))
    assert pool.type == "process" and "command" in pool.base_job_template["variables"]["properties"]
    assert ensure_pool("test-gpu-pool") is False  # already there: left as it is
    assert set(deps) == {"sweep", "tune", "train", "evaluate", "nightly_eval"}
    # by module, with no code location: each worker imports the flows from its own checkout, at any path
    assert deps["sweep"].entrypoint == "flows.rpg_flows.sweep" and not deps["sweep"].pull_steps
    assert deps["sweep"].work_queue_name == deps["tune"].work_queue_name == "control"  # coordinators: no GPU slot
    assert {deps[n].work_queue_name for n in ("train", "evaluate", "nightly_eval")} == {"gpu"}
    assert [s.schedule.cron for s in deps["nightly_eval"].schedules] == ["30 3 * * *"]
    with pytest.raises(ValueError, match="test-k8s-pool: an existing work pool of type 'kubernetes'; allowed: 'process'"):
        ensure_pool("test-k8s-pool")


@pytest.mark.integration
def test_gpu_limit_is_per_machine_and_never_shrinks(prefect_server, monkeypatch):
    """A team's machines share one Prefect server: each has its own `rpg-gpu-<host>` limit. A smaller sweep must not
    shrink the limit under a bigger one that is still running."""
    from prefect.client.orchestration import get_client

    from flows.rpg_flows import ensure_gpu_limit, gpu_limit_name

    assert gpu_limit_name("GPU-Node_07.cluster") == "rpg-gpu-gpu-node-07-cluster"
    monkeypatch.setenv("RPG_HOST", "node-a")
    assert ensure_gpu_limit(3) == "rpg-gpu-node-a"
    assert ensure_gpu_limit(1) == "rpg-gpu-node-a"
    monkeypatch.setenv("RPG_HOST", "node-b")
    ensure_gpu_limit()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("rpg-gpu-node-a").limit == 3
        assert client.read_global_concurrency_limit_by_name("rpg-gpu-node-b").limit == 1


def _all_at_once(calls: list) -> list:
    """Run every call in its own thread, released together by a barrier, each in a copy of this context (the fixture's
    client settings are a context variable); their results in order, or the test fails naming every error."""
    import contextvars

    barrier, results, errors = threading.Barrier(len(calls)), [None] * len(calls), []

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - the test reports every failure
            errors.append(repr(e))

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, i)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    return results


@pytest.mark.integration
def test_gpu_limit_created_by_many_runs_at_once(prefect_server, monkeypatch):
    """The runs of a team sweep start together on a machine, each making sure of its machine's limit. Prefect's upsert
    reads, then creates: two creators raced, and the second's 409 (ObjectAlreadyExists) failed its run in CI; then
    one that grew the limit to 2 was overwritten by one that had read 0 and wrote 1 (CI again: a shrunken limit). Eight
    at once, released by a barrier, all return, and the limit ends at the largest slot count asked for, in each of 8
    rounds (without the machine's lock, one round in four shrank the limit)."""
    from prefect.client.orchestration import get_client

    from flows.rpg_flows import ensure_gpu_limit

    for r in range(8):
        monkeypatch.setenv("RPG_HOST", f"node-race-{r}")
        names = _all_at_once([lambda s=1 + i % 2: ensure_gpu_limit(s) for i in range(8)])
        assert names == [f"rpg-gpu-node-race-{r}"] * 8
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(names[0]).limit == 2, f"round {r}"


@pytest.mark.integration
def test_sweep_rejects_bad_input_before_compute(prefect_server, tmp_path, monkeypatch):
    from flows.rpg_flows import sweep
    from rpg_core.sweeps import SweepError

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"concurrency=3 exceeds the 2 GPUs in gpus='0,1'; allowed: 1..2"):
        sweep(sweep_file="sweeps/smoke.yaml", concurrency=3, gpus="0,1", workdir=str(tmp_path))
    monkeypatch.setenv("RPG_GPUS", "0,1")  # what worker.sh sets: an empty `gpus` field means these
    with pytest.raises(ValueError, match=r"concurrency=3 exceeds the 2 GPUs in gpus='0,1'; allowed: 1..2"):
        sweep(sweep_file="sweeps/smoke.yaml", concurrency=3, workdir=str(tmp_path))
    with pytest.raises(SweepError, match="sweep file 'sweeps/nope.yaml' does not exist"):
        sweep(sweep_file="sweeps/nope.yaml", workdir=str(tmp_path))
    assert not (tmp_path / "smoke").exists()  # nothing started


@pytest.mark.integration
def test_a_flow_run_whose_heartbeats_stop_is_crashed(prefect_server):
    """A worker lost mid-run leaves its flow runs RUNNING with nothing to end them. The automation flows.deploy makes
    marks a run of the pool's deployments Crashed once its heartbeats stop (here after 15 s rather than 90), which the
    sweep's dispatcher resubmits. A run of another deployment (beating at Prefect's slower default) is not judged.
    Made twice, or by four workers at once, there is one automation; a new set of deployments replaces it."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.states import Running

    from flows.deploy import crash_automation_name, ensure_crash_detection

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("heartbeat-test")
        watched, other = (str(client.create_deployment(flow_id=flow_id, name=n)) for n in ("watched", "other"))
        runs = {n: client.create_flow_run_from_deployment(d) for n, d in (("watched", watched), ("other", other))}
        for r in runs.values():
            client.set_flow_run_state(r.id, Running(), force=True)
    pool = "heartbeat-pool"
    made = _all_at_once([lambda: ensure_crash_detection(pool, [watched], silent_after_s=15)] * 4)
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(crash_automation_name(pool))
    assert str(automation.id) in made  # the smallest id survives (its maker kept it); the others were deleted
    assert ensure_crash_detection(pool, [watched], silent_after_s=15) == str(automation.id)  # kept as it is
    try:
        beat = time.monotonic()
        for n, d in (("watched", watched), ("other", other)):  # each run beats once, then its machine is lost
            emit_event(event="prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{runs[n].id}"},
                       related=[{"prefect.resource.id": f"prefect.deployment.{d}", "prefect.resource.role": "deployment"}])  # fmt: skip
        EventsWorker.drain_all()
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while not (state := client.read_flow_run(runs["watched"].id).state).is_crashed():
                assert time.monotonic() < deadline, f"still {state.name} {time.monotonic() - beat:.0f} s after its beat"
                time.sleep(1)
            crashed_after = time.monotonic() - beat
            assert crashed_after >= 15, crashed_after  # not before its silence was long enough
            assert state.message == "no heartbeat for 15 s: its worker or machine was lost"
            assert client.read_flow_run(runs["other"].id).state.is_running()
        print(f"crashed {crashed_after:.0f} s after its last heartbeat (15 s allowed)")
    finally:
        replaced = ensure_crash_detection(pool, [watched, other], silent_after_s=20)  # a new set: replaced
        with get_client(sync_client=True) as client:
            assert [str(a.id) for a in client.read_automations_by_name(crash_automation_name(pool))] == [replaced]
            client.delete_automation(replaced)
    assert replaced != str(automation.id)
