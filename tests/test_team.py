"""The team set-up without containers, for real: `infra/stack.py up --db postgres --pool P --auth` (a Postgres cluster
of its own, Prefect on asyncpg, MLflow on psycopg with proxied artifacts, the deployments on a process work pool, both
servers behind a login), two machines joining with `infra/team/worker.sh <the head's env.sh>` from their own copies
of the project, and sweeps triggered through the API as the UI's Run button does: the runs spread over both machines
and land in MLflow; a cancelled sweep leaves nothing behind and a re-trigger completes it; `down` leaves nothing
running. The servers listen on 127.0.0.1 here; `--auth` is what `--host 0.0.0.0` turns on by itself."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
import servers
from servers import alive, free_port, listening, training_processes

pytestmark = [pytest.mark.system, pytest.mark.server, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
stack = servers.stack


@pytest.fixture
def reachable_tmp():
    """A fresh folder the `postgres` user can reach: root runs the cluster as that user, and pytest's tmp_path is
    private to root. Removed afterwards, whatever the outcome."""
    base = Path(tempfile.mkdtemp(prefix="rpg-team-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


HOSTS = ("a", "b")  # two machines, played by two worker processes here, each from its own copy of the project


def _copy_project(dst: Path) -> Path:
    """A checkout of this project at another path (what a second machine has): the code, without the virtualenv,
    the run folders or git."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv*", ".rpg", ".git", "runs", "__pycache__", "*.egg-info",
                                                             ".pytest_cache", "mlruns"))  # fmt: skip
    return dst


def _group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running (zombies aside)."""
    import psutil

    return any(p.info["status"] != psutil.STATUS_ZOMBIE for p in psutil.process_iter(["status"])
               if _pgid(p.pid) == pgid)  # fmt: skip


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _most_at_once(intervals: list[tuple[int, int]]) -> int:
    """The largest number of [start, end) intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def _status(url: str, credentials: str | None = None, data: bytes | None = None) -> int:
    """The HTTP status of a GET (a POST with ``data``) to ``url``, with basic auth for ``user:password``."""
    headers = {"Content-Type": "application/json"}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _check_logins(home: Path, client_env: dict[str, str]) -> None:
    """Both servers refuse a request without the credentials or with wrong ones (401) and answer with env.sh's; their
    health endpoints stay open (what `up` and `rpg train` poll); the secrets are the owner's only."""
    for name in ("auth.json", "env.sh", "mlflow_auth.ini", "postgres.json"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name
    keys = json.loads((home / "auth.json").read_text())
    prefect, mlflow = client_env["PREFECT_API_URL"], client_env["MLFLOW_TRACKING_URI"]
    assert client_env["PREFECT_API_AUTH_STRING"] == keys["prefect_auth_string"]
    mlflow_login = f"{client_env['MLFLOW_TRACKING_USERNAME']}:{client_env['MLFLOW_TRACKING_PASSWORD']}"
    assert mlflow_login == f"{keys['mlflow_username']}:{keys['mlflow_password']}"
    calls = {  # Prefect's API and MLflow's REST API, a read each; Prefect's also a POST (what the Run button sends)
        "prefect": (f"{prefect}/admin/version", None, client_env["PREFECT_API_AUTH_STRING"]),
        "prefect POST": (f"{prefect}/deployments/filter", b"{}", client_env["PREFECT_API_AUTH_STRING"]),
        "mlflow": (f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", None, mlflow_login),
    }
    got = {name: (_status(url, None, data), _status(url, "rpg:wrong", data), _status(url, login, data))
           for name, (url, data, login) in calls.items()}  # fmt: skip
    assert got == {name: (401, 401, 200) for name in calls}, got
    assert _status(f"{prefect}/health") == _status(f"{mlflow}/health") == 200


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)


@pytest.mark.skipif(servers.postgres_missing() is not None, reason=str(servers.postgres_missing()))
def test_team_sweep_fills_both_hosts_and_a_cancelled_sweep_resumes(reachable_tmp, monkeypatch):
    """A Postgres head node with log-ins on both servers (unauthenticated requests get 401; a worker without the
    credentials refuses to start, naming them) and two machines (workers `a` and `b`, started with the head's env.sh,
    each from its own copy of the project at another path, two device ids each). An 8-run smoke sweep (4
    configurations x 2 seeds) pressed as the Run button does: every run is its own `train` flow run on the pool, both
    hosts take runs, never more than two at once per host, all finish, and every MLflow run records its host, device,
    group and run folder (on its own host's copy).
    Then a longer sweep is cancelled mid-way: no training process is left, no GPU slot stays held, the runs that
    were training end KILLED with their checkpoints; a re-trigger runs only what was missing."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    base = reachable_tmp
    home, pool = base / "head", "test-pool"
    pp, mp, op, dp, pgp = free_port(), free_port(), free_port(), free_port(), free_port()
    cmd = [sys.executable, "infra/stack.py", "--home", str(home)]
    head = [*cmd, "--db", "postgres", "--pg-data", str(base / "pg"), "--pg-port", str(pgp),
            "--prefect-port", str(pp), "--mlflow-port", str(mp), "--optuna-port", str(op), "--dashboard-port", str(dp),
            "--pool", pool, "--auth"]  # fmt: skip
    workers: dict[str, subprocess.Popen] = {}
    copies = {h: _copy_project(base / f"machine-{h}" / ("deep" * (i + 1)) / "rpg-lab") for i, h in enumerate(HOSTS)}
    try:
        r = subprocess.run([*head, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(store: postgres)" in r.stdout and f"on work pool {pool}" in r.stdout
        postmaster = int((home / "postgres.pid").read_text())
        exports = (home / "env.sh").read_text().splitlines()
        client_env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in exports if line)
        assert client_env["PREFECT_API_URL"] == f"http://127.0.0.1:{pp}/api"
        assert client_env["RPG_OPTUNA_STORAGE"].endswith(f"@127.0.0.1:{pgp}/optuna")
        assert urllib.request.urlopen(f"http://127.0.0.1:{op}/api/studies", timeout=10).status == 200  # on Postgres
        _check_logins(home, client_env)
        # Two machines join, each from its own copy: here both on this machine, with two device ids each (this
        # CPU-only torch runs on the CPU whatever CUDA_VISIBLE_DEVICES says). The forms leave `gpus` empty. The
        # client settings come from the head's env.sh, handed to worker.sh (the credentials reach the flow runs).
        not_client = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RPG_ROOT", *stack.CLIENT_AUTH)
        machine = {k: v for k, v in os.environ.items() if k not in not_client}
        urls = {k: client_env[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}  # a worker without the login
        bare = subprocess.run(["bash", "infra/team/worker.sh"], cwd=copies["a"], capture_output=True, text=True,
                              env={**machine, "PYTHON": sys.executable, **urls}, timeout=60)  # fmt: skip
        assert bare.returncode == 2, bare.stdout + bare.stderr
        assert "the server requires a login (401) and PREFECT_API_AUTH_STRING is not set" in bare.stderr
        assert "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD is not set" in bare.stderr
        for h in HOSTS:
            env = {**machine, "RPG_POOL": pool, "RPG_GPUS": "0,1", "RPG_HOST": h,
                   "PYTHON": sys.executable, "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "OMP_NUM_THREADS": "1",  # four training processes share this machine's cores: no oversubscription
                   "PREFECT_HOME": str(base / f"worker-{h}-prefect")}  # fmt: skip
            log = (base / f"worker-{h}.log").open("w")
            workers[h] = subprocess.Popen(["bash", "infra/team/worker.sh", str(home / "env.sh")], cwd=copies[h],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        for h in HOSTS:
            _wait_for(lambda h=h: "Worker" in (base / f"worker-{h}.log").read_text(), 120, f"worker {h}")
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this process's MLflow client logs in
            monkeypatch.setenv(k, client_env[k])
        mlflow = MlflowClient(client_env["MLFLOW_TRACKING_URI"])

        def children(parent_id: str):
            exp = mlflow.get_experiment_by_name("rpg")
            return mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")

        def sweep_parents():
            exp = mlflow.get_experiment_by_name("rpg")
            return [] if exp is None else mlflow.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'sweep'")

        with temporary_settings({PREFECT_API_URL: client_env["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: client_env["PREFECT_API_AUTH_STRING"]}):
            # -- 1. the 8-run smoke sweep spreads over both machines ---------------------------------------------
            run = run_deployment("sweep/sweep", parameters={"sweep_file": "sweeps/smoke.yaml", "seeds": [0, 1]},
                                 timeout=900, poll_interval=2)  # fmt: skip
            if not run.state.is_completed():  # the whole story: the sweep's message, then each failed run's log
                runs_logs = "".join(f"\n--- {p}\n" + p.read_text()[-2000:] for h in HOSTS
                                    for p in sorted((copies[h] / ".rpg/sweeps/smoke/logs").glob("*.log"))
                                    if "rc=0" not in p.read_text()[-200:])  # fmt: skip
                workers_logs = "".join((base / f"worker-{h}.log").read_text()[-3000:] for h in HOSTS)
                pytest.fail(f"{run.state.name}: {run.state.message}\n{runs_logs}\n{workers_logs}")
            assert run.work_pool_name == pool and run.work_queue_name == "control"
            (parent,) = sweep_parents()
            kids = children(parent.info.run_id)
            assert len(kids) == 8 and all(c.info.status == "FINISHED" and "acc/strict" in c.data.metrics for c in kids)
            hosts = {c.data.tags["rpg.host"] for c in kids}
            assert hosts == set(HOSTS), hosts
            for h in HOSTS:  # each machine: its own run folders, at most one run per device at once
                mine = [c for c in kids if c.data.tags["rpg.host"] == h]
                assert all(c.data.tags["run_dir"].startswith(str(copies[h])) for c in mine)
                assert _most_at_once([(c.info.start_time, c.info.end_time) for c in mine]) <= 2
            groups = {}
            for c in kids:  # the seeds of one configuration share its config key, which is their group
                assert c.data.tags["rpg.group"] == c.data.tags["config_key"]
                groups.setdefault(c.data.tags["config_key"], set()).add(c.data.tags["seed"])
            assert len(groups) == 4 and all(seeds == {"0", "1"} for seeds in groups.values())
            # Results reach everyone through the head: artifacts proxied to its store, both servers on Postgres.
            local = mlflow.download_artifacts(kids[0].info.run_id, "config.yaml", str(base))
            assert yaml.safe_load(Path(local).read_text())["tracking"]["parent_run_id"] == parent.info.run_id
            assert list((home / "mlartifacts").glob(f"*/{kids[0].info.run_id}/artifacts/config.yaml"))
            import psycopg

            info = json.loads((home / "postgres.json").read_text())
            with psycopg.connect(f"postgresql://{info['user']}:{info['password']}@127.0.0.1:{pgp}/mlflow") as conn:
                assert conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] == 9
            assert not (home / "mlflow.db").exists() and not (home / "prefect" / "prefect.db").exists()
            devices = set()
            for h in HOSTS:
                for f in (copies[h] / ".rpg" / "sweeps" / "smoke" / "logs").glob("*.log"):
                    text = f.read_text()
                    devices |= {(h, d) for d in ("0", "1") if f"CUDA_VISIBLE_DEVICES='{d}')" in text}
            assert devices == {(h, d) for h in HOSTS for d in ("0", "1")}, devices
            with get_client(sync_client=True) as client:
                subs = client.read_flow_runs()
                trains = [f for f in subs if f.parent_task_run_id and f.name.startswith("smoke/")]
                assert len(trains) == 8 and all(f.state.is_completed() and f.work_queue_name == "gpu" for f in trains)
                # each train flow run is named after its run: <sweep>/<design>-s<seed>
                assert {f.name for f in trains} == {f"smoke/rpg_reinforce-{d}-dual-s{s}" for d in ("FKL", "UFKL", "RKL",
                                                                                                   "URKL") for s in (0, 1)}
                for h in HOSTS:
                    limit = client.read_global_concurrency_limit_by_name(f"rpg-gpu-{h}")
                    assert (limit.limit, limit.active_slots) == (2, 0)
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

                board = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-smoke-runs"])))
                assert any("8 runs: 8 finished" in (a.data or "") for a in board), [a.data for a in board][-1:]

            # -- 2. a longer sweep cancelled mid-way, then re-triggered -------------------------------------------
            over = ["train.steps=30", "train.eval_every=30", "train.checkpoint_every=3"]
            params = {"sweep_file": "sweeps/smoke.yaml", "seeds": [0, 1], "overrides": over}
            first = run_deployment("sweep/sweep", parameters=params, timeout=0)
            pid = lambda: [p for p in sweep_parents() if p.data.params.get("overrides") == " ".join(over)]  # noqa: E731
            (p2,) = _wait_for(pid, 120, "the second sweep's parent run")
            _wait_for(lambda: sum(c.info.status == "FINISHED" for c in children(p2.info.run_id)) >= 2, 600,
                      "two runs of the second sweep to finish")  # fmt: skip
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(first.id, Cancelling())  # what the UI's Cancel does
                _wait_for(lambda: client.read_flow_run(first.id).state.is_cancelled(), 120, "the sweep to be cancelled")
                marker = str(base)
                _wait_for(lambda: not training_processes(marker), 90, "every training process to stop")
                subs = [f for f in client.read_flow_runs() if f.parent_task_run_id and f.name.startswith("smoke/")]
                _wait_for(lambda: all(client.read_flow_run(f.id).state.is_final() for f in subs), 90,
                          "every train flow run to end")  # fmt: skip
                for h in HOSTS:
                    _wait_for(lambda h=h: client.read_global_concurrency_limit_by_name(f"rpg-gpu-{h}").active_slots == 0,
                              90, f"host {h}'s GPU slots to be released")  # fmt: skip
            kids = children(p2.info.run_id)
            finished = {c.data.tags["config_key"] + "-s" + c.data.tags["seed"] for c in kids if c.info.status == "FINISHED"}
            assert 2 <= len(finished) < 8
            assert all(c.info.status in ("FINISHED", "KILLED") for c in kids), [c.info.status for c in kids]
            # the runs stopped mid-way kept their checkpoints on their machine's disk (MLflow says which, and where)
            stopped = {c.data.tags["config_key"] + "-s" + c.data.tags["seed"]: c for c in kids
                       if c.info.status == "KILLED" and c.data.tags.get("rpg.checkpoint_step")}  # fmt: skip
            for key, c in stopped.items():
                host = c.data.tags["rpg.host"]
                assert (copies[host] / ".rpg" / "runs" / key / "checkpoints").is_dir()
            again = run_deployment("sweep/sweep", parameters=params, timeout=900, poll_interval=2)
            assert again.state.is_completed(), again.state
            (p3,) = [p for p in pid() if p.info.run_id != p2.info.run_id]
            assert int(p3.data.params["runs"]) == 8 and p3.data.metrics["runs_finished"] == 8 - len(finished)
            exp = mlflow.get_experiment_by_name("rpg")
            done = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.`rpg.kind` = 'train'")
            keys = [c.data.tags["config_key"] + "-s" + c.data.tags["seed"] for c in done if "train.steps" in c.data.params
                    and c.data.params["train.steps"] == "30"]  # fmt: skip
            assert len(keys) == len(set(keys)) == 8  # every run of the sweep finished once, none twice
            # each stopped run went back to the machine that has its checkpoint and resumed into its own MLflow run
            for key, c in stopped.items():
                resumed = mlflow.get_run(c.info.run_id)
                assert resumed.info.status == "FINISHED" and resumed.data.tags["rpg.host"] == c.data.tags["rpg.host"]
                log = copies[c.data.tags["rpg.host"]] / ".rpg" / "sweeps" / "smoke" / "logs" / f"{key}.log"
                assert f"resumed {key}" in log.read_text()

            # -- 3. a tuning study on the pool: its trials are train flow runs, its study on the head's Postgres ----
            tune_over = ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]
            tuned = run_deployment("tune/tune", parameters={"study_file": "sweeps/tune_smoke.yaml", "trials": 3,
                                                            "overrides": tune_over}, timeout=900, poll_interval=2)  # fmt: skip
            assert tuned.state.is_completed(), tuned.state
            assert tuned.work_queue_name == "control"
            import optuna

            from rpg_core.tuning import cells, load_study, study_name

            spec = load_study(ROOT / "sweeps" / "tune_smoke.yaml", tune_over)
            name = study_name(spec, cells(spec)[0][0])
            study = optuna.load_study(study_name=name, storage=client_env["RPG_OPTUNA_STORAGE"])  # head's Postgres
            assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
            parent_id = study.user_attrs["mlflow_parent_run_id"]
            tex = mlflow.get_experiment_by_name("tune-smoke").experiment_id
            trial_runs = mlflow.search_runs([tex], f"tags.mlflow.parentRunId = '{parent_id}'")
            assert sorted(r.info.run_id for r in trial_runs) == sorted(t.user_attrs["mlflow_run_ids"][0]
                                                                       for t in study.trials)  # fmt: skip
            assert {r.data.tags["rpg.host"] for r in trial_runs} <= set(HOSTS)
            assert mlflow.get_run(parent_id).data.tags["best.value"] == str(study.best_value)
            with get_client(sync_client=True) as client:
                subs = [f for f in client.read_flow_runs() if f.name.startswith(name)]
                assert len(subs) == 3 and all(f.work_queue_name == "gpu" for f in subs)

            # -- 4. machine a's GPU worker killed mid-run: its runs go silent, are Crashed, and run again on b ------
            # (flows.deploy: heartbeats every 30 s, Crashed after 90 s without one; the sweep resubmits a crashed run)
            lost_over = ["train.steps=24", "train.eval_every=24", "train.checkpoint_every=4"]
            params = {"sweep_file": "sweeps/smoke.yaml", "seeds": [2], "overrides": lost_over, "retries": 1}
            fourth = run_deployment("sweep/sweep", parameters=params, timeout=0)
            (p4,) = _wait_for(lambda: [p for p in sweep_parents() if p.data.params.get("overrides") == " ".join(lost_over)],
                              120, "the fourth sweep's parent run")  # fmt: skip
            victim = "a"
            on_victim = lambda: [c for c in children(p4.info.run_id) if c.data.tags.get("rpg.host") == victim  # noqa: E731
                                 and c.info.status == "RUNNING" and c.data.metrics]  # fmt: skip
            _wait_for(on_victim, 300, f"a run training on {victim}")
            import psutil

            (gpu_worker,) = [p for p in psutil.process_iter(["cmdline"]) if f"{victim}-gpu" in (p.info["cmdline"] or [])]
            tree = [gpu_worker, *gpu_worker.children(recursive=True)]  # its flow runs and their `rpg train`
            os.kill(workers[victim].pid, signal.SIGKILL)  # worker.sh first (no trap runs): its control worker lives on
            for proc in tree:
                proc.kill()
            killed_at = time.monotonic()
            with get_client(sync_client=True) as client:
                _wait_for(lambda: client.read_flow_run(fourth.id).state.is_final(), 600, "the fourth sweep to end")
                final = client.read_flow_run(fourth.id).state
                assert final.is_completed(), f"{final.name}: {final.message}"
                trains = [f for f in client.read_flow_runs() if f.parent_task_run_id and f.name.endswith("-s2")
                          and f.name.startswith("smoke/")]  # fmt: skip
                crashed = [f for f in trains if f.state.is_crashed()]
                assert 1 <= len(crashed) <= 2, [(f.name, f.state.name) for f in trains]
                assert all(f.state.message == "no heartbeat for 90 s: its worker or machine was lost" for f in crashed)
                print(f"killed {victim}'s GPU worker: {len(crashed)} run(s) Crashed, the sweep completed "
                      f"{time.monotonic() - killed_at:.0f} s later")
                assert sum(f.state.is_completed() for f in trains) == 4
                _wait_for(lambda: client.read_global_concurrency_limit_by_name(f"rpg-gpu-{victim}").active_slots == 0, 120,
                          f"the slots {victim}'s lost runs held to lapse")  # fmt: skip
                assert client.read_global_concurrency_limit_by_name("rpg-gpu-b").active_slots == 0
            assert not training_processes(str(copies[victim]))
            kids = children(p4.info.run_id)
            finished = [c for c in kids if c.info.status == "FINISHED"]
            assert sorted(c.data.tags["config_key"] for c in finished) == sorted({c.data.tags["config_key"] for c in kids})
            assert len(finished) == 4  # every configuration once
            lost = [c for c in kids if c.info.status != "FINISHED"]  # the killed attempts, ended by the dispatcher
            # (a run killed before its MLflow run began has none to end)
            assert 1 <= len(lost) <= len(crashed), [(c.data.tags["rpg.host"], c.info.status) for c in kids]
            for c in lost:
                assert c.info.status == "FAILED" and c.data.tags["rpg.exit"] == "lost" and c.data.tags["rpg.host"] == victim
                assert "crashed: no heartbeat for 90 s" in c.data.tags["rpg.lost_reason"]
            again = {c.data.tags["config_key"] for c in lost}  # ran again on the machine that was left
            assert {c.data.tags["rpg.host"] for c in finished if c.data.tags["config_key"] in again} == {"b"}
    finally:
        for w in workers.values():
            with contextlib.suppress(ProcessLookupError):  # a killed machine's group may be gone already
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers.values():  # the whole group: a killed worker.sh leaves its control worker orphaned in it
            deadline = time.monotonic() + 30
            while _group_alive(w.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
            w.wait()
        down = subprocess.run([*cmd, "down"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and down.stdout.strip() == "stopped: dashboard, optuna, mlflow, prefect, postgres", down.stderr
    assert not any(listening(port) for port in (pp, mp, op, dp, pgp))
    deadline = time.monotonic() + 10
    while alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(postmaster) and not any(alive(w.pid) or _group_alive(w.pid) for w in workers.values())
    assert not training_processes(str(base))
