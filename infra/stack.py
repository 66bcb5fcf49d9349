"""The stack in one command: Prefect server, MLflow server, optuna-dashboard, the live dashboard and the flows'
deployments.

    python infra/stack.py up   [--prefect-port 4200] [--mlflow-port 5000] [--optuna-port 8080] [--dashboard-port 8050]
                               [--home .rpg/stack]
    python infra/stack.py up   --db postgres [--pg-port 5432 | --pg-url postgresql://user:pw@host:port]
                               [--host 0.0.0.0] [--pool gpu-pool]                       (a team's head node)
    python infra/stack.py down [--home .rpg/stack]
    python infra/stack.py status

Local (the default): SQLite stores on 127.0.0.1 and ``flows.serve`` serving the deployments here. A team's head
node: ``--db postgres`` puts Prefect (``postgresql+asyncpg``) and MLflow (``postgresql+psycopg``, artifacts proxied
from ``<home>/mlartifacts``) on Postgres: a cluster of its own in ``<home>/postgres`` (``initdb``/``pg_ctl``, run as
the ``postgres`` user when started by root; password in ``<home>/postgres.json``, data kept across ``down``/``up``)
or an existing server (``--pg-url``); ``--pool`` registers the deployments on a Prefect process work pool instead of
serving them, and GPU machines run them with ``infra/team/worker.sh``. optuna-dashboard shows the tuning studies:
a journal file ``<home>/optuna.journal`` locally, the database ``optuna`` on Postgres. The live dashboard
(``python -m dashboards.app``) compares the runs of a sweep or a study as they come in, read from the MLflow server;
``<its URL>/?sweep=NAME`` (or ``?study=NAME``) opens on one.

``up`` starts each process in its own session (logs and pid files in ``--home``), waits for its health endpoint,
and writes ``<home>/env.sh`` with the client settings (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``,
``RPG_OPTUNA_STORAGE``, ``RPG_OPTUNA_DASHBOARD_URL``, ``RPG_DASHBOARD_URL``, ``RPG_MLFLOW_URL`` (the MLflow UI, for links); the served flows get the same); ``down``
stops every process group (SIGTERM, then SIGKILL; Postgres with ``pg_ctl stop``). Telemetry is off everywhere and
the Prefect UI is the V1 UI, which makes no external requests (../shared/docs/stack.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_SERVER_UI_V2_ENABLED": "false",  # the V2 UI fetches an analytics config from the internet
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # 2 processes and ~0.5 GiB instead of 16 and ~3 GiB
}
ORDER = ("postgres", "prefect", "mlflow", "optuna", "dashboard", "serve")  # started in this order, stopped in the reverse
DATABASES = ("prefect", "mlflow", "optuna")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1" if host == "0.0.0.0" else host, port)) != 0


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up; last lines of {log}:\n{log.read_text()[-2000:]}")


def _start(name: str, cmd: list[str], env: dict[str, str], home: Path) -> subprocess.Popen:
    log = home / f"{name}.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    (home / f"{name}.pid").write_text(str(proc.pid))
    return proc


# --- Postgres: a cluster of the stack's own (initdb + pg_ctl), or an existing server -------------------------------


def _pg_bin(name: str) -> str:
    """``initdb``/``pg_ctl`` from PATH, else from the newest /usr/lib/postgresql/<version>/bin (Debian's layout)."""
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise SystemExit(f"--db postgres: `{name}` not found; install PostgreSQL (apt install postgresql) or pass "
                         "--pg-url postgresql://user:password@host:port for an existing server")  # fmt: skip
    return found


def _as_pg_owner(cmd: list[str]) -> list[str]:
    """Postgres refuses to run as root: root runs it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_ctl(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_as_pg_owner([_pg_bin("pg_ctl"), "-D", str(data), *args]), capture_output=True, text=True)


def _pg_cluster(home: Path, data: Path, port: int) -> str:
    """Initialise (once) and start the stack's own cluster on 127.0.0.1:``port``; returns its server URL."""
    info_file = home / "postgres.json"
    if not (data / "PG_VERSION").exists():
        password = os.environ.get("RPG_PG_PASSWORD") or secrets.token_urlsafe(18)
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            data.chmod(0o700)
            if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(data)]).returncode != 0:
                raise SystemExit(f"--pg-data {data}: the postgres user cannot reach it (a parent folder is private); "
                                 "pass --pg-data in a folder it can reach, e.g. /var/lib/rpg-postgres")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="rpg-initdb-") as tmp:  # the password, for initdb's eyes only
            pwfile = Path(tmp) / "pw"
            pwfile.write_text(password + "\n")
            if os.geteuid() == 0:
                shutil.chown(tmp, "postgres")
                shutil.chown(pwfile, "postgres")
            r = subprocess.run(_as_pg_owner([_pg_bin("initdb"), "-D", str(data), "-U", "rpg", "--auth=scram-sha-256",
                                             f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"]),
                               capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"initdb {data} failed:\n{r.stdout}{r.stderr}")
        info_file.write_text(json.dumps({"user": "rpg", "password": password, "data": str(data)}))
        info_file.chmod(0o600)
    if info_file.exists():
        info = json.loads(info_file.read_text())
    elif os.environ.get("RPG_PG_PASSWORD"):  # a kept cluster whose home was removed
        info = {"user": "rpg", "password": os.environ["RPG_PG_PASSWORD"]}
    else:
        raise SystemExit(f"the cluster in {data} has no {info_file} with its password: set RPG_PG_PASSWORD")
    # TCP on 127.0.0.1 only (the servers on this node are its only clients), no Unix socket.
    r = _pg_ctl(data, "start", "-w", "-t", "60", "-l", str(data / "server.log"), "-o", f"-p {port} -h 127.0.0.1 -k ''")
    if r.returncode != 0:
        log = data / "server.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise SystemExit(f"pg_ctl start failed:\n{r.stdout}{r.stderr}\n{tail}")
    (home / "postgres.pid").write_text((data / "postmaster.pid").read_text().split()[0])
    (home / "postgres.data").write_text(str(data))
    return f"postgresql://{info['user']}:{urllib.parse.quote(info['password'], safe='')}@127.0.0.1:{port}"


def _create_databases(server_url: str) -> None:
    """The ``prefect``, ``mlflow`` and ``optuna`` databases, created if missing (their schemas: the servers' own
    migrations; Optuna's by ``_init_optuna_schema``)."""
    try:
        import psycopg
    except ImportError:
        raise SystemExit('--db postgres needs psycopg for MLflow: pip install -e ".[team]"') from None
    with psycopg.connect(f"{server_url}/postgres", autocommit=True, connect_timeout=10) as conn:
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for db in DATABASES:
            if db not in have:
                conn.execute(f'CREATE DATABASE "{db}"')


def _init_optuna_schema(url: str) -> None:
    """Optuna's tables in an empty database: the dashboard does not create them and exits without them."""
    import optuna  # only here: 0.4 s

    optuna.storages.RDBStorage(url).engine.dispose()


def _stop_postgres(home: Path) -> None:
    data = Path((home / "postgres.data").read_text())
    r = _pg_ctl(data, "stop", "-m", "fast", "-w", "-t", "60")
    if r.returncode != 0 and "PID file" not in r.stderr:  # "does not exist": it was not running
        raise RuntimeError(f"pg_ctl stop failed:\n{r.stdout}{r.stderr}")
    (home / "postgres.data").unlink()


# --- up / down -------------------------------------------------------------------------------------------------------


def up(home: Path, prefect_port: int, mlflow_port: int, cron: str = "0 2 * * *", *, db: str = "sqlite",
       optuna_port: int = 8080, dashboard_port: int = 8050, pg_port: int = 5432, pg_url: str | None = None,
       pg_data: Path | None = None, host: str = "127.0.0.1", pool: str | None = None,
       mlflow_allowed_hosts: str | None = None) -> dict[str, str]:  # fmt: skip
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if any((home / f"{n}.pid").exists() for n in ORDER):
        raise SystemExit(f"a stack is already recorded in {home}: run `python infra/stack.py down --home {home}`")
    if db not in ("sqlite", "postgres"):
        raise SystemExit(f"--db: {db!r} is not allowed; allowed: ['sqlite', 'postgres']")
    if pg_url and not pg_url.startswith(("postgresql://", "postgres://")):
        scheme = pg_url.split("://")[0]
        raise SystemExit(f"--pg-url: {scheme!r} is not allowed; allowed: postgresql://user:password@host:port")
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise SystemExit('optuna-dashboard is not installed: pip install -c constraints.txt -e ".[dev,team]"')
    own_pg = db == "postgres" and not pg_url
    for port in (prefect_port, mlflow_port, optuna_port, dashboard_port, *((pg_port,) if own_pg else ())):
        if not _port_free(port, host):
            raise SystemExit(f"port {port} is in use; pick another "
                             "(--prefect-port/--mlflow-port/--optuna-port/--dashboard-port/--pg-port)")  # fmt: skip
    public = socket.getfqdn() if host == "0.0.0.0" else host  # what other machines and browsers use
    prefect_url, mlflow_url = f"http://{public}:{prefect_port}", f"http://{public}:{mlflow_port}"
    optuna_url, dashboard_url = f"http://{public}:{optuna_port}", f"http://{public}:{dashboard_port}"
    base = {**os.environ, **QUIET, "PREFECT_HOME": str(home / "prefect")}
    try:
        if db == "postgres":
            data = (pg_data or home / "postgres").resolve()
            server = pg_url.rstrip("/") if pg_url else _pg_cluster(home, data, pg_port)
            _create_databases(server)
            after_scheme = server.split("://", 1)[1]  # the same server, through each store's driver
            prefect_db = f"postgresql+asyncpg://{after_scheme}/prefect"
            mlflow_db = f"postgresql+psycopg://{after_scheme}/mlflow"
            optuna_db = f"postgresql+psycopg://{after_scheme}/optuna"
            _init_optuna_schema(optuna_db)
        else:
            prefect_db, mlflow_db = None, f"sqlite:///{home / 'mlflow.db'}"  # Prefect: $PREFECT_HOME/prefect.db
            optuna_db = str(home / "optuna.journal")  # a JournalFileBackend file: safe for several processes
            Path(optuna_db).touch()  # the dashboard takes a path as a journal only if the file exists
        prefect_env = {**base, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                       "PREFECT_UI_API_URL": f"{prefect_url}/api"}
        if prefect_db:
            prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_db
        p = _start("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                               "--port", str(prefect_port)], prefect_env, home)  # fmt: skip
        mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(mlflow_port),
                      "--workers", "1" if db == "sqlite" else "2", "--backend-store-uri", mlflow_db,
                      "--artifacts-destination", str(home / "mlartifacts")]  # fmt: skip
        if mlflow_allowed_hosts:
            mlflow_cmd += ["--allowed-hosts", mlflow_allowed_hosts]
        m = _start("mlflow", mlflow_cmd, base, home)
        # wsgiref: one process (the default, gunicorn, forks two and puts a control socket in ~/.gunicorn)
        o = _start("optuna", [sys.executable, "-m", "optuna_dashboard._cli", optuna_db, "--host", host,
                              "--port", str(optuna_port), "--server", "wsgiref"], base, home)  # fmt: skip
        local = lambda port: f"http://127.0.0.1:{port}"  # noqa: E731  (health checks from this node)
        # the live dashboard reads the MLflow server from this node; its run links are for browsers (the public URL)
        d = _start("dashboard", [sys.executable, "-m", "dashboards.app", "--host", host, "--port", str(dashboard_port),
                                 "--tracking-uri", local(mlflow_port), "--mlflow-url", mlflow_url], base, home)  # fmt: skip
        _wait(f"{local(prefect_port)}/api/health", p, home / "prefect.log")
        _wait(f"{local(mlflow_port)}/health", m, home / "mlflow.log")
        _wait(f"{local(optuna_port)}/api/studies", o, home / "optuna.log")
        _wait(f"{local(dashboard_port)}/", d, home / "dashboard.log")
        # the tuner's storage and the dashboard link it writes into MLflow (a link for browsers: the public URL), and
        # the live dashboard's URL (for links too)
        optuna_client = {"RPG_OPTUNA_STORAGE": optuna_db, "RPG_OPTUNA_DASHBOARD_URL": optuna_url,
                         "RPG_DASHBOARD_URL": dashboard_url, "RPG_MLFLOW_URL": mlflow_url}  # fmt: skip
        client = {"PREFECT_API_URL": f"{prefect_url}/api", "MLFLOW_TRACKING_URI": mlflow_url, **optuna_client}
        local_client = {"PREFECT_API_URL": f"{local(prefect_port)}/api", "MLFLOW_TRACKING_URI": local(mlflow_port),
                        **optuna_client}  # fmt: skip
        if pool:  # the deployments on a process work pool: workers on the GPU machines run them
            r = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", pool, "--cron", cron], cwd=ROOT,
                               env={**base, **local_client}, capture_output=True, text=True)  # fmt: skip
            (home / "deploy.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise RuntimeError(f"python -m flows.deploy --pool {pool} failed:\n{(r.stdout + r.stderr)[-2000:]}")
        else:
            _start("serve", [sys.executable, "-m", "flows.serve", "--cron", cron], {**base, **local_client}, home)
    except BaseException:
        down(home)
        raise
    lines = [f"export {k}={shlex.quote(v)}" for k, v in {**client, **QUIET}.items()]
    (home / "env.sh").write_text("\n".join(lines) + "\n")
    (home / "env.sh").chmod(0o600)  # RPG_OPTUNA_STORAGE holds the Postgres password
    urls = {"prefect_ui": prefect_url, "mlflow_ui": mlflow_url, "optuna_dashboard": optuna_url, "dashboard": dashboard_url,
            **client}  # fmt: skip
    public_urls = {k: v for k, v in urls.items() if k != "RPG_OPTUNA_STORAGE"}  # `status` prints stack.json
    info = {**public_urls, "ports": [prefect_port, mlflow_port, optuna_port, dashboard_port], "db": db, "pool": pool}
    (home / "stack.json").write_text(json.dumps(info, indent=1))
    return urls


def down(home: Path, timeout: float = 20) -> list[str]:
    home = home.resolve()
    stopped = []
    for name in reversed(ORDER):
        pid_file = home / f"{name}.pid"
        if not pid_file.exists():
            continue
        if name == "postgres":
            _stop_postgres(home)
        else:
            pid = int(pid_file.read_text())
            try:
                os.killpg(pid, signal.SIGTERM)  # serve and workers ignore SIGINT for seconds (stack.md): SIGTERM
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    os.killpg(pid, 0)
                    time.sleep(0.2)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pid_file.unlink()
        stopped.append(name)
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python infra/stack.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("RPG_STACK_HOME", ROOT / ".rpg" / "stack")))
    p.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    p.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    p.add_argument("--optuna-port", type=int, default=int(os.environ.get("OPTUNA_PORT", 8080)), help="optuna-dashboard")
    p.add_argument("--dashboard-port", type=int, default=int(os.environ.get("DASHBOARD_PORT", 8050)),
                   help="the live dashboard (python -m dashboards.app)")  # fmt: skip
    p.add_argument("--cron", default="0 2 * * *", help="nightly_eval schedule")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite", help="the servers' stores")
    p.add_argument("--pg-port", type=int, default=int(os.environ.get("PG_PORT", 5432)), help="the stack's own cluster")
    p.add_argument("--pg-url", help="an existing server, postgresql://user:password@host:port (implies --db postgres)")
    p.add_argument("--pg-data", type=Path, help="the stack's own cluster's folder (default <home>/postgres)")
    p.add_argument("--host", default="127.0.0.1", help="the servers' address (0.0.0.0: reachable by other machines)")
    p.add_argument("--pool", help="register the deployments on this Prefect process work pool instead of serving them")
    p.add_argument("--mlflow-allowed-hosts", help="MLflow's --allowed-hosts (Host headers other machines use)")
    args = p.parse_args(argv)
    if args.action == "up":
        db = "postgres" if args.pg_url else args.db
        urls = up(args.home, args.prefect_port, args.mlflow_port, args.cron, db=db, optuna_port=args.optuna_port,
                  dashboard_port=args.dashboard_port, pg_port=args.pg_port, pg_url=args.pg_url, pg_data=args.pg_data,
                  host=args.host, pool=args.pool, mlflow_allowed_hosts=args.mlflow_allowed_hosts)  # fmt: skip
        where = f"on work pool {args.pool}: start workers with infra/team/worker.sh" if args.pool else "served here"
        print(f"Prefect UI  {urls['prefect_ui']}   (deployments sweep, train, evaluate, nightly_eval; {where})")
        print(f"MLflow UI   {urls['mlflow_ui']}   (store: {db})")
        studies = urls["RPG_OPTUNA_STORAGE"] if db == "sqlite" else "postgres, database optuna"
        print(f"Optuna UI   {urls['optuna_dashboard']}   (studies: {studies})")
        print(f"Dashboard   {urls['dashboard']}   (live comparison: {urls['dashboard']}/?sweep=NAME or /?study=NAME)")
        print(f"clients:    source {args.home / 'env.sh'}   stop: python infra/stack.py down")
    elif args.action == "down":
        stopped = down(args.home)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        info = args.home / "stack.json"
        alive = {n: (args.home / f"{n}.pid").exists() for n in ORDER}
        print(json.dumps({"running": alive, **(json.loads(info.read_text()) if info.exists() else {})}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
