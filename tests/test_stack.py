"""infra/stack.py: the local stack up on free ports (Prefect server, MLflow server, optuna-dashboard, the live
dashboard, the served deployments), usable by clients through env.sh, and down with nothing left listening or running."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from servers import alive, free_port, listening

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.system
@pytest.mark.server
def test_stack_up_and_down(tmp_path):
    home = tmp_path / "stack"
    pp, mp, op, dp = free_port(), free_port(), free_port(), free_port()
    cmd = [sys.executable, "infra/stack.py", "--home", str(home), "--prefect-port", str(pp), "--mlflow-port", str(mp),
           "--optuna-port", str(op), "--dashboard-port", str(dp)]  # fmt: skip
    try:
        r = subprocess.run([*cmd, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Prefect UI  http://127.0.0.1:{pp}" in r.stdout and f"MLflow UI   http://127.0.0.1:{mp}" in r.stdout
        assert f"Optuna UI   http://127.0.0.1:{op}" in r.stdout and f"Dashboard   http://127.0.0.1:{dp}" in r.stdout
        env = (home / "env.sh").read_text()
        assert f"export PREFECT_API_URL=http://127.0.0.1:{pp}/api" in env and "DO_NOT_TRACK=true" in env
        journal = home / "optuna.journal"
        assert f"export RPG_OPTUNA_STORAGE={shlex.quote(str(journal))}\n" in env
        assert f"export RPG_OPTUNA_DASHBOARD_URL=http://127.0.0.1:{op}\n" in env
        assert f"export RPG_DASHBOARD_URL=http://127.0.0.1:{dp}\n" in env
        pids = {n: int((home / f"{n}.pid").read_text()) for n in ("prefect", "mlflow", "optuna", "dashboard", "serve")}
        # the served flows see the same storage and dashboard as env.sh's clients
        environ = Path(f"/proc/{pids['serve']}/environ").read_text().split("\0")
        serve_env = dict(kv.split("=", 1) for kv in environ if "=" in kv)
        assert serve_env["RPG_OPTUNA_STORAGE"] == str(journal)
        assert serve_env["RPG_OPTUNA_DASHBOARD_URL"] == f"http://127.0.0.1:{op}"
        # the dashboard serves its page, and lists a study written to the journal by a client
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.create_study(study_name="t", storage=JournalStorage(JournalFileBackend(str(journal))))
        with urllib.request.urlopen(f"http://127.0.0.1:{op}/dashboard", timeout=10) as resp:
            assert resp.status == 200 and b"/static/bundle.js" in resp.read()
        # its script from the package, offline (a browser sends Accept-Encoding; without it the dashboard answers 500)
        req = urllib.request.Request(f"http://127.0.0.1:{op}/static/bundle.js", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and len(resp.read()) > 100_000
        with urllib.request.urlopen(f"http://127.0.0.1:{op}/api/studies", timeout=10) as resp:
            assert [s["study_name"] for s in json.loads(resp.read())["study_summaries"]] == ["t"]
        # the live dashboard reads the stack's MLflow server and links to its UI
        args = Path(f"/proc/{pids['dashboard']}/cmdline").read_text().split("\0")
        assert args[args.index("--tracking-uri") + 1] == args[args.index("--mlflow-url") + 1] == f"http://127.0.0.1:{mp}"
        # the UIs answer, and the deployments get registered by the serve process
        for url in (f"http://127.0.0.1:{pp}/", f"http://127.0.0.1:{mp}/", f"http://127.0.0.1:{dp}/"):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
        deadline = time.monotonic() + 120
        names: set[str] = set()
        while time.monotonic() < deadline and len(names) < 5:
            req = urllib.request.Request(f"http://127.0.0.1:{pp}/api/deployments/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=10) as resp:
                names = {d["name"] for d in json.loads(resp.read())}
            time.sleep(0.5)
        assert names == {"sweep", "tune", "train", "evaluate", "nightly"}
        again = subprocess.run([*cmd, "up"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already recorded" in again.stderr
    finally:
        r = subprocess.run([*cmd, "down"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "stopped: serve, dashboard, optuna, mlflow, prefect" in r.stdout
    assert not any(listening(port) for port in (pp, mp, op, dp))
    assert not any(alive(pid) for pid in pids.values())


@pytest.mark.integration
def test_stack_refuses_a_non_postgres_url_before_starting_anything(tmp_path):
    r = subprocess.run([sys.executable, "infra/stack.py", "--home", str(tmp_path), "--pg-url", "mysql://u:p@h:3306",
                        "up"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "--pg-url: 'mysql' is not allowed; allowed: postgresql://" in r.stderr
    assert not list(tmp_path.glob("*.pid"))  # nothing started
