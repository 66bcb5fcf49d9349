"""Postgres restarting under a sweep: the stack on Postgres (Prefect's and MLflow's stores), the smoke sweep started
as the Run button does, and the database restarted (``pg_ctl restart -m fast``: every connection cut) while its
runs train. The sweep completes, every run FINISHED in MLflow with each step of each metric once, and no GPU slot
stays held."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import servers
from servers import free_port

# slow: `make test-all` (about 4.5 minutes alone; in the full suite on 2 cores its sweep once did not start training
# within 5 minutes, the cause not found yet: the assertion now says the sweep's state and the stack's serve log)
pytestmark = [pytest.mark.system, pytest.mark.server, pytest.mark.subprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
stack = servers.stack


@pytest.mark.skipif(servers.postgres_missing() is not None, reason=str(servers.postgres_missing()))
def test_postgres_restarting_under_a_sweep_loses_nothing():
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.rpg_flows import gpu_limit_name

    base = Path(tempfile.mkdtemp(prefix="rpg-pg-restart-"))
    base.chmod(0o755)  # the postgres user reaches its cluster's folder
    home, pg_data = base / "stack", base / "pg"
    ports = {k: free_port() for k in ("prefect", "mlflow", "optuna", "dashboard", "pg")}
    cmd = [sys.executable, "infra/stack.py", "--home", str(home)]
    up = [*cmd, "--db", "postgres", "--pg-data", str(pg_data), "--pg-port", str(ports["pg"]),
          "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]),
          "--optuna-port", str(ports["optuna"]), "--dashboard-port", str(ports["dashboard"])]  # fmt: skip
    try:
        r = subprocess.run([*up, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        env = dict(line.removeprefix("export ").split("=", 1) for line in (home / "env.sh").read_text().splitlines()
                   if line.startswith("export "))  # fmt: skip
        uri = env["MLFLOW_TRACKING_URI"].strip("'\"")
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"].strip("'\"")}):
            workdir = base / "work"
            run = run_deployment("sweep/sweep", parameters={"sweep_file": "sweeps/smoke.yaml", "concurrency": 2,
                                                            "workdir": str(workdir), "overrides": ["train.steps=30"]},
                                 timeout=0)  # fmt: skip
            logs = workdir / "smoke" / "logs"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not any("step 1/" in p.read_text() for p in logs.glob("*.log")):
                time.sleep(0.5)
            if not any("step 1/" in p.read_text() for p in logs.glob("*.log")):
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run.id).state
                serve = (home / "serve.log").read_text()[-3000:] if (home / "serve.log").exists() else ""
                pytest.fail(f"no run started training in 300 s; sweep {state.name}: {state.message}; logs "
                            f"{sorted(p.name for p in logs.glob('*.log'))}; serve.log:\n{serve}")
            restart = stack._pg_ctl(pg_data, "restart", "-m", "fast", "-w", "-t", "60", "-l",
                                    str(pg_data / "server.log"), "-o", f"-p {ports['pg']} -h 127.0.0.1 -k ''")  # fmt: skip
            assert restart.returncode == 0, restart.stdout + restart.stderr
            before = {p.name: p.read_text().count("| reward") for p in logs.glob("*.log")}
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 900
                state = client.read_flow_run(run.id).state
                while time.monotonic() < deadline and not state.is_final():
                    time.sleep(2)
                    try:
                        state = client.read_flow_run(run.id).state
                    except Exception:  # noqa: BLE001 - the API's database coming back
                        continue
                tails = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log")))
                assert state.is_completed(), f"{state.name}: {state.message}{tails}"
                after = {p.name: p.read_text().count("| reward") for p in logs.glob("*.log")}
                assert any(0 < before.get(n, 0) < after[n] for n in after), "no run was training across the restart"
                limit = client.read_global_concurrency_limit_by_name(gpu_limit_name())  # this machine's GPU slots
        mlflow = MlflowClient(uri)
        exp = mlflow.get_experiment_by_name("rpg")
        kids = mlflow.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'train'")
        assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids), [k.info.status for k in kids]
        for k in kids:
            for key in k.data.metrics:
                steps = [m.step for m in mlflow.get_metric_history(k.info.run_id, key)]
                assert len(steps) == len(set(steps)), (k.info.run_name, key, steps)
            loss = sorted(m.step for m in mlflow.get_metric_history(k.info.run_id, "actor/loss"))
            assert loss == list(range(1, 31)), (k.info.run_name, loss)
        assert limit.active_slots == 0  # no slot held
    finally:
        subprocess.run([*cmd, "down"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
