"""The team set-up without containers, for real: `infra/stack.py up --db postgres --pool P` (a Postgres cluster of its
own, Prefect on asyncpg, MLflow on psycopg with proxied artifacts, the deployments on a process work pool), a GPU
machine joining with `infra/team/worker.sh`, and the smoke sweep triggered through the API as the UI's Run button
does: the worker runs it, the runs land in MLflow's Postgres database, and `down` leaves nothing running."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from servers import alive, free_port, listening

pytestmark = [pytest.mark.system, pytest.mark.server, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rpg_stack", ROOT / "infra" / "stack.py")
stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stack)


def _have_postgres() -> str | None:
    """Why this machine cannot run the test, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg missing: pip install -e ".[team]"'
    for name in ("initdb", "pg_ctl"):
        try:
            stack._pg_bin(name)
        except SystemExit:
            return f"PostgreSQL's {name} is not installed"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(["id", "postgres"],
                                                                                 capture_output=True).returncode):
        return "running as root without a postgres user to run the cluster"  # fmt: skip
    return None


@pytest.fixture
def reachable_tmp():
    """A fresh folder the `postgres` user can reach: root runs the cluster as that user, and pytest's tmp_path is
    private to root. Removed afterwards, whatever the outcome."""
    base = Path(tempfile.mkdtemp(prefix="rpg-team-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(_have_postgres() is not None, reason=str(_have_postgres()))
def test_team_head_on_postgres_and_a_worker_run_the_smoke_sweep(reachable_tmp):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = reachable_tmp
    home, pool = base / "head", "test-pool"
    pp, mp, pgp = free_port(), free_port(), free_port()
    cmd = [sys.executable, "infra/stack.py", "--home", str(home)]
    head = [*cmd, "--db", "postgres", "--pg-data", str(base / "pg"), "--pg-port", str(pgp),
            "--prefect-port", str(pp), "--mlflow-port", str(mp), "--pool", pool]  # fmt: skip
    worker = None
    try:
        r = subprocess.run([*head, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(store: postgres)" in r.stdout and f"on work pool {pool}" in r.stdout
        postmaster = int((home / "postgres.pid").read_text())
        exports = (home / "env.sh").read_text().splitlines()
        client_env = dict(line.removeprefix("export ").split("=", 1) for line in exports if line)
        assert client_env["PREFECT_API_URL"] == f"http://127.0.0.1:{pp}/api"
        # A GPU machine joins: here the same machine, with two device ids (this CPU-only torch runs on the CPU
        # whatever CUDA_VISIBLE_DEVICES says); the form's `gpus` and `concurrency` are left empty: the machine's.
        env = {**os.environ, **client_env, "RPG_POOL": pool, "RPG_GPUS": "0,1", "PYTHON": sys.executable,
               "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_HOME": str(base / "worker-prefect")}  # fmt: skip
        wlog = (base / "worker.log").open("w")
        worker = subprocess.Popen(["bash", "infra/team/worker.sh"], cwd=ROOT, env=env, stdout=wlog,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        params = {"sweep_file": "sweeps/smoke.yaml", "workdir": str(base / "work"),
                  "overrides": [f"train.output_dir={base / 'runs'}"]}  # fmt: skip
        with temporary_settings({PREFECT_API_URL: client_env["PREFECT_API_URL"]}):
            run = run_deployment("sweep/sweep", parameters=params, timeout=600, poll_interval=2)
        assert run.state.is_completed(), (run.state, (base / "worker.log").read_text()[-3000:])
        assert run.work_pool_name == pool
        assert "worker on pool test-pool with 2 slot(s), GPUs '0,1'" in (base / "worker.log").read_text()
        logs = [p.read_text() for p in (base / "work" / "smoke" / "logs").glob("*.log")]
        one_device = [("CUDA_VISIBLE_DEVICES='0')" in t) != ("CUDA_VISIBLE_DEVICES='1')" in t) for t in logs]
        assert len(logs) == 4 and all(one_device)

        # Every run is in MLflow (through the server, artifacts proxied to the head's store) ...
        mlflow = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
        exp = mlflow.get_experiment_by_name("rpg")
        assert exp.artifact_location.startswith("mlflow-artifacts:")
        (parent,) = mlflow.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'sweep'")
        assert parent.data.params["concurrency"] == "2"  # one per GPU of the machine
        children = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == 4
        assert all(c.info.status == "FINISHED" and "acc/strict" in c.data.metrics for c in children)
        local = mlflow.download_artifacts(children[0].info.run_id, "config.yaml", str(base))
        cfg = yaml.safe_load(Path(local).read_text())
        assert cfg["train"]["steps"] == 2 and cfg["tracking"]["parent_run_id"] == parent.info.run_id
        assert list((home / "mlartifacts").glob(f"*/{children[0].info.run_id}/artifacts/config.yaml"))
        # ... and both servers keep their state in Postgres, not in a file beside them.
        import psycopg

        info = json.loads((home / "postgres.json").read_text())
        url = f"postgresql://{info['user']}:{info['password']}@127.0.0.1:{pgp}"
        with psycopg.connect(f"{url}/mlflow") as conn:
            assert conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] == 5
        with psycopg.connect(f"{url}/prefect") as conn:
            rows = conn.execute("SELECT f.name, r.state_name FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                "WHERE r.id = %s", (run.id,)).fetchall()  # fmt: skip
            assert rows == [("sweep", "Completed")]
        assert not (home / "mlflow.db").exists() and not (home / "prefect" / "prefect.db").exists()
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        down = subprocess.run([*cmd, "down"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and down.stdout.strip() == "stopped: mlflow, prefect, postgres", down.stderr
    assert not any(listening(port) for port in (pp, mp, pgp))
    deadline = time.monotonic() + 10
    while alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(postmaster) and (worker is None or not alive(worker.pid))
