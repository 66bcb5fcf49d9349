"""infra/stack.py: the local stack up on free ports (Prefect server, MLflow server, optuna-dashboard, the live
dashboard, the served deployments), usable by clients through env.sh, and down with nothing left listening or running."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from servers import alive, free_port, listening

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


def _request(url: str, login: str | None, data: bytes | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    return urllib.request.Request(url, data=data, headers=headers)


@pytest.mark.system
@pytest.mark.server
@pytest.mark.parametrize("auth", [False, True], ids=["open", "auth"])
def test_stack_up_and_down(tmp_path, auth):
    """The local stack, and with ``--auth`` (log-ins on 127.0.0.1: SQLite user store, the served flows and the live
    dashboard with the credentials) the same checks made with env.sh's credentials, and 401 without them."""
    home = tmp_path / "stack"
    pp, mp, op, dp = free_port(), free_port(), free_port(), free_port()
    cmd = [sys.executable, "infra/stack.py", "--home", str(home), "--prefect-port", str(pp), "--mlflow-port", str(mp),
           "--optuna-port", str(op), "--dashboard-port", str(dp)]  # fmt: skip
    try:
        r = subprocess.run([*cmd, "up", *(["--auth"] if auth else [])], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                        for line in (home / "env.sh").read_text().splitlines())  # fmt: skip
        prefect_login = exported.get("PREFECT_API_AUTH_STRING")
        user, password = exported.get("MLFLOW_TRACKING_USERNAME"), exported.get("MLFLOW_TRACKING_PASSWORD")
        mlflow_login = f"{user}:{password}" if auth else None
        assert (prefect_login is not None) == auth and json.loads((home / "stack.json").read_text())["auth"] == auth
        if auth:
            for name in ("auth.json", "env.sh", "mlflow_auth.ini", "mlflow_auth.db"):
                assert (home / name).stat().st_mode & 0o777 == 0o600, name
            for url, data in ((f"http://127.0.0.1:{pp}/api/deployments/filter", b"{}"),
                              (f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/search?max_results=1", None)):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(_request(url, None, data), timeout=10)
                assert refused.value.code == 401
            # the served flows and the live dashboard (a client of MLflow) have the credentials; `up`'s runs line
            # below read the store with them too
            for name in ("serve", "dashboard"):
                environ = Path(f"/proc/{int((home / f'{name}.pid').read_text())}/environ").read_text().split("\0")
                logins = {f"PREFECT_API_AUTH_STRING={prefect_login}", f"MLFLOW_TRACKING_PASSWORD={password}"}
                assert logins <= set(environ), name
        assert f"Prefect UI  http://127.0.0.1:{pp}" in r.stdout and f"MLflow UI   http://127.0.0.1:{mp}" in r.stdout
        assert f"Optuna UI   http://127.0.0.1:{op}" in r.stdout and f"Dashboard   http://127.0.0.1:{dp}" in r.stdout
        assert "  runs      (the store has no runs yet" in r.stdout  # a fresh store: no link, said so
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
        # the UIs answer, and `up` returned with the deployments registered (the Run buttons exist)
        for url, login in ((f"http://127.0.0.1:{pp}/", None), (f"http://127.0.0.1:{mp}/", mlflow_login),
                           (f"http://127.0.0.1:{dp}/", None)):
            with urllib.request.urlopen(_request(url, login), timeout=10) as resp:
                assert resp.status == 200
        req = _request(f"http://127.0.0.1:{pp}/api/deployments/filter", prefect_login, b"{}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert {d["name"] for d in json.loads(resp.read())} == {"sweep", "tune", "train", "evaluate", "nightly_eval"}
        # Prefect serves its V1 UI only (infra/prefect_server.py): the V2 UI, which calls out, is not offered
        with urllib.request.urlopen(f"http://127.0.0.1:{pp}/ui-settings", timeout=10) as resp:
            ui = json.loads(resp.read())
        assert (ui["available_uis"], ui["default_ui"], ui["v2_base_url"]) == (["v1"], "v1", None)
        assert ui["auth"] == ("BASIC" if auth else None)  # the V1 UI opens on its login page
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


@pytest.mark.integration
def test_runs_link_opens_the_newest_sweep(tmp_path):
    """``up``'s MLflow link: the newest sweep's saved view, with the axes its training runs differ in."""
    import importlib.util
    import json as _json

    from mlflow.tracking import MlflowClient

    from rpg_core.tracking import ensure_experiment

    spec = importlib.util.spec_from_file_location("_stack", ROOT / "infra" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert stack.runs_link(uri, "http://h:5000").startswith("(the store has no runs yet")
    exp = ensure_experiment(uri, "rpg")
    client = MlflowClient(tracking_uri=uri)
    for name in ("old", "new"):
        parent = client.create_run(exp, run_name=f"sweep-{name}", tags={"rpg.kind": "sweep", "sweep": name})
        for d in ("forward", "reverse"):
            client.create_run(exp, run_name=f"{name}-{d}", tags={
                "rpg.kind": "train", "sweep": name, "mlflow.parentRunId": parent.info.run_id, "method": "rpg",
                "direction": d, "beta": "0.1", "seed": "0"})  # fmt: skip
        time.sleep(0.01)
    line = stack.runs_link(uri, "http://h:5000")
    assert line == (f"http://h:5000/#/experiments/{exp}/runs?viewStateShareKey=rpg-sweep-new&workflowType=machine_learning"
                    "   (newest sweep: new)")  # fmt: skip
    state = _json.loads(_json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.rpg-sweep-new"])["state"])
    assert state["selectedColumns"][:4] == ["tags.`design`", "tags.`direction`", "tags.`seed`", "metrics.`eval/acc_strict`"]
    assert state["searchFilter"] == "tags.`rpg.kind` = 'train' and tags.`sweep` = 'new'"


def _stack_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_stack_auth", ROOT / "infra" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    return stack


@pytest.mark.integration
@pytest.mark.parametrize("flags", [["--host", "0.0.0.0"], ["--auth"]])
def test_stack_refuses_a_login_it_cannot_set_up_before_starting_anything(tmp_path, flags):
    """A host other machines reach turns authentication on, and without MLflow's auth extra (Flask-WTF) `up` stops
    at once with one line naming the flag and what to install: no file written, no process started."""
    home = tmp_path / "stack"
    no_flask_wtf = ("import runpy, sys; sys.modules['flask_wtf'] = None; sys.argv = ['infra/stack.py', *sys.argv[1:]]; "
                    "runpy.run_path('infra/stack.py', run_name='__main__')")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", no_flask_wtf, "--home", str(home), *flags, "up"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    head = "--host 0.0.0.0 (reachable by other machines) needs authentication" if "--host" in flags else "--auth"
    assert r.stderr.startswith(f"{head}: MLflow's basic-auth app needs Flask-WTF, which is missing"), r.stderr
    assert "mlflow[auth]" in r.stderr
    assert ("keep the default --host 127.0.0.1" if "--host" in flags else "leave --auth out") in r.stderr
    assert not home.exists()  # nothing written, nothing started


@pytest.mark.integration
def test_stack_auth_is_on_beyond_the_loopback_and_its_secrets_are_private(tmp_path):
    """Which hosts need a login, the credentials kept in auth.json (mode 600) and reused by the next `up`, a private
    file staying private when rewritten, and `check` naming what is missing without a server to ask."""
    stack = _stack_module()
    assert all(stack.is_loopback(h) for h in ("127.0.0.1", "localhost", "127.0.0.2", "::1"))
    assert not any(stack.is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "head.example.org", "::"))
    with pytest.raises(SystemExit, match=r"--host 0.0.0.0: the servers would be open to the network without "):
        stack.up(tmp_path / "h", 1, 2, host="0.0.0.0", auth=False)
    assert not (tmp_path / "h").exists()
    keys, fresh = stack._auth_secrets(tmp_path)
    assert fresh and keys["prefect_auth_string"].startswith("rpg:") and len(keys["mlflow_password"]) >= 32
    stack._keep_auth(tmp_path, keys)
    assert (tmp_path / "auth.json").stat().st_mode & 0o777 == 0o600
    assert stack._auth_secrets(tmp_path) == (keys, False)  # kept across down/up
    lost = tmp_path / "lost"  # a user store whose credentials are gone: refused, nothing started
    lost.mkdir()
    (lost / "mlflow_auth.db").touch()
    with pytest.raises(SystemExit, match=r"--auth: .*auth.json \(the credentials\) is missing but MLflow's user store"):
        stack.up(lost, free_port(), free_port(), optuna_port=free_port(), dashboard_port=free_port(), auth=True)
    assert not (lost / "auth.json").exists() and not list(lost.glob("*.pid"))
    open_file = tmp_path / "env.sh"
    open_file.write_text("old")
    open_file.chmod(0o644)
    stack._write_private(open_file, "export X=1\n")
    assert open_file.stat().st_mode & 0o777 == 0o600 and open_file.read_text() == "export X=1\n"
    client = stack._client_auth(keys)
    assert set(client) == set(stack.CLIENT_AUTH) and client["MLFLOW_TRACKING_USERNAME"] == "admin"
    port = free_port()
    problems = stack.check_clients({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, timeout=2)
    assert problems[0].startswith(f"PREFECT_API_URL http://127.0.0.1:{port}/api: no server answers (")
    assert problems[1] == "MLFLOW_TRACKING_URI is not set: source the head's env.sh (infra/README.md, \"A team\")"
