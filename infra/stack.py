"""The stack in one command: Prefect server, MLflow server, optuna-dashboard, the live dashboard and the flows'
deployments.

    python infra/stack.py up   [--prefect-port 4200] [--mlflow-port 5000] [--optuna-port 8080] [--dashboard-port 8050]
                               [--home .rpg/stack]
    python infra/stack.py up   --db postgres [--pg-port 5432 | --pg-url postgresql://user:pw@host:port]
                               [--host 0.0.0.0] [--pool gpu-pool]                       (a team's head node)
                               [--auth]                  (authentication on 127.0.0.1 too; on by itself elsewhere)
    python infra/stack.py down [--home .rpg/stack]
    python infra/stack.py status
    python infra/stack.py check                 (whether this shell's client settings reach the servers; worker.sh)

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

Authentication (``--auth``; on by itself, and required, for any ``--host`` other than the loopback): Prefect's
server API takes one shared string (``PREFECT_SERVER_API_AUTH_STRING``; clients ``PREFECT_API_AUTH_STRING``), and
MLflow runs its basic-auth app (``--app-name basic-auth``, the ``mlflow[auth]`` extra; its user store in
``<home>/mlflow_auth.db``, or the database ``mlflow_auth`` on Postgres; clients ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``). The secrets are generated once and kept in ``<home>/auth.json`` (mode 600, reused
across ``down``/``up`` like ``postgres.json``) and reach the clients through ``env.sh``. optuna-dashboard and the live
dashboard have no login of their own: with authentication on they listen on 127.0.0.1 only. ``up`` refuses a
non-loopback ``--host`` when authentication cannot be set up, before anything starts. Behind a TLS proxy,
``PREFECT_UI_API_URL`` in ``up``'s environment gives the Prefect UI the proxy's API URL (infra/README.md).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import ipaddress
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
import urllib.error
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
AUTH_DATABASE = "mlflow_auth"  # MLflow's user store on Postgres (its own alembic history: not in the mlflow database)
# The clients' credentials (env.sh); the servers' own settings never come from the caller's environment.
CLIENT_AUTH = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SERVER_AUTH = ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME",
               "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")  # fmt: skip


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


DEPLOYMENTS = ("sweep", "tune", "train", "evaluate", "nightly_eval")  # flows.serve's, each named after its flow


def _wait_deployments(prefect_url: str, proc: subprocess.Popen, log: Path, timeout: float = 180,
                      auth_string: str | None = None) -> None:  # fmt: skip
    """Until every deployment of ``DEPLOYMENTS`` is registered on the server (``flows.serve`` registers them a few
    seconds after it starts: the imports)."""
    deadline, names = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{prefect_url}/api/deployments/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json", **_basic(auth_string)})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                names = {d["name"] for d in json.loads(r.read())}
            if names >= set(DEPLOYMENTS):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"the deployments {sorted(set(DEPLOYMENTS) - names)} were not registered; last lines of "
                       f"{log}:\n{log.read_text()[-2000:]}")


def _start(name: str, cmd: list[str], env: dict[str, str], home: Path) -> subprocess.Popen:
    log = home / f"{name}.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    (home / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only from the first byte (never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(text)


# --- authentication: Prefect's API auth string, MLflow's basic-auth app ----------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: whatever it resolves to, other machines may reach it


def auth_unavailable() -> str | None:
    """Why the servers' authentication cannot be set up here, or None."""
    if importlib.util.find_spec("flask_wtf") is None:
        return ('MLflow\'s basic-auth app needs Flask-WTF, which is missing (`pip install -c constraints.txt -e '
                '".[dev,team]"` brings it: mlflow[auth])')  # fmt: skip
    return None


def _basic(credentials: str | None) -> dict[str, str]:
    """The ``Authorization`` header of HTTP basic auth for ``user:password`` (none for None)."""
    if not credentials:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def _auth_secrets(home: Path) -> tuple[dict[str, str], bool]:
    """The stack's credentials and whether they are new: kept in ``<home>/auth.json`` (written by ``_keep_auth``)
    and reused across ``down``/``up``, else generated. The Prefect string has the ``user:password`` form, so that
    ``curl -u "$PREFECT_API_AUTH_STRING"`` works; the Prefect UI's login asks for the whole string."""
    f = home / "auth.json"
    if f.exists():
        return json.loads(f.read_text()), False
    return {"prefect_auth_string": f"rpg:{secrets.token_urlsafe(24)}", "mlflow_username": "admin",
            "mlflow_password": secrets.token_urlsafe(24), "mlflow_secret_key": secrets.token_hex(32)}, True  # fmt: skip


def _keep_auth(home: Path, secrets_: dict[str, str]) -> None:
    _write_private(home / "auth.json", json.dumps(secrets_, indent=1) + "\n")


def _client_auth(secrets_: dict[str, str]) -> dict[str, str]:
    """The clients' settings (env.sh, the served flows, workers): Prefect's auth string, MLflow's user."""
    return {"PREFECT_API_AUTH_STRING": secrets_["prefect_auth_string"],
            "MLFLOW_TRACKING_USERNAME": secrets_["mlflow_username"],
            "MLFLOW_TRACKING_PASSWORD": secrets_["mlflow_password"]}  # fmt: skip


def _mlflow_auth_env(home: Path, secrets_: dict[str, str], database_uri: str) -> dict[str, str]:
    """The MLflow server's auth settings: an ini naming its user store (``<home>/mlflow_auth.ini``, mode 600: it may
    hold the Postgres password), the admin's password (used when the store is created) and Flask's secret key (CSRF
    of the user-management forms; kept, so a restart keeps sessions valid). A verified login is cached for 60 s in
    each server process: without it every request pays a PBKDF2 hash, ~300 ms of CPU here (26 ms a request with
    it), which starves a busy server; the price is that a changed password reaches the other process within 60 s."""
    ini = home / "mlflow_auth.ini"
    _write_private(ini, "[mlflow]\n"
                        "default_permission = READ\n"
                        f"database_uri = {database_uri}\n"
                        f"admin_username = {secrets_['mlflow_username']}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        "auth_cache_ttl_seconds = 60\n")  # fmt: skip
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["mlflow_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_["mlflow_secret_key"]}  # fmt: skip


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` with ``values`` for the block (MLflow's client reads its credentials from there)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
        _write_private(info_file, json.dumps({"user": "rpg", "password": password, "data": str(data)}))
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


def _create_databases(server_url: str, databases: tuple[str, ...] = DATABASES) -> set[str]:
    """The ``prefect``, ``mlflow`` and ``optuna`` databases (and ``mlflow_auth`` with authentication), created if
    missing (their schemas: the servers' own migrations; Optuna's by ``_init_optuna_schema``). Returns the ones that
    were there already."""
    try:
        import psycopg
    except ImportError:
        raise SystemExit('--db postgres needs psycopg for MLflow: pip install -e ".[team]"') from None
    with psycopg.connect(f"{server_url}/postgres", autocommit=True, connect_timeout=10) as conn:
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for db in databases:
            if db not in have:
                conn.execute(f'CREATE DATABASE "{db}"')
    return have & set(databases)


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
       mlflow_allowed_hosts: str | None = None, auth: bool | None = None) -> dict[str, str]:  # fmt: skip
    """Start the stack; returns its URLs (and the clients' settings). ``auth``: None turns authentication on exactly
    when ``host`` is not the loopback; a non-loopback ``host`` without it is refused."""
    public_host = not is_loopback(host)
    auth = public_host if auth is None else auth
    if public_host and not auth:
        raise SystemExit(f"--host {host}: the servers would be open to the network without authentication; "
                         "allowed without it: 127.0.0.1 or localhost")  # fmt: skip
    if auth and (why := auth_unavailable()):
        if public_host:
            raise SystemExit(f"--host {host} (reachable by other machines) needs authentication: {why}; or keep the "
                             "default --host 127.0.0.1")  # fmt: skip
        raise SystemExit(f"--auth: {why}; or leave --auth out (on 127.0.0.1 the servers need no login)")
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
    # optuna-dashboard and the live dashboard have no login: with authentication on, this machine only
    ui_host = "127.0.0.1" if auth else host
    ui_public = "127.0.0.1" if auth else public
    prefect_url, mlflow_url = f"http://{public}:{prefect_port}", f"http://{public}:{mlflow_port}"
    optuna_url, dashboard_url = f"http://{ui_public}:{optuna_port}", f"http://{ui_public}:{dashboard_port}"
    if auth:
        keys, fresh = _auth_secrets(home)
        client_auth = _client_auth(keys)
    else:
        keys, fresh, client_auth = {}, False, {}
    kept = {k: v for k, v in os.environ.items() if k not in CLIENT_AUTH + SERVER_AUTH}  # the stack's, not the caller's
    base = {**kept, **QUIET, "PREFECT_HOME": str(home / "prefect"), **client_auth}
    try:
        if db == "postgres":
            data = (pg_data or home / "postgres").resolve()
            server = pg_url.rstrip("/") if pg_url else _pg_cluster(home, data, pg_port)
            had = _create_databases(server, DATABASES + ((AUTH_DATABASE,) if auth else ()))
            after_scheme = server.split("://", 1)[1]  # the same server, through each store's driver
            prefect_db = f"postgresql+asyncpg://{after_scheme}/prefect"
            mlflow_db = f"postgresql+psycopg://{after_scheme}/mlflow"
            optuna_db = f"postgresql+psycopg://{after_scheme}/optuna"
            users_db, users_kept = f"postgresql+psycopg://{after_scheme}/{AUTH_DATABASE}", AUTH_DATABASE in had
            _init_optuna_schema(optuna_db)
        else:
            prefect_db, mlflow_db = None, f"sqlite:///{home / 'mlflow.db'}"  # Prefect: $PREFECT_HOME/prefect.db
            optuna_db = str(home / "optuna.journal")  # a JournalFileBackend file: safe for several processes
            Path(optuna_db).touch()  # the dashboard takes a path as a journal only if the file exists
            users_db, users_kept = f"sqlite:///{home / 'mlflow_auth.db'}", (home / "mlflow_auth.db").exists()
        if auth and fresh:
            if users_kept:  # its admin password was the lost auth.json's: nobody could log in
                raise SystemExit(f"--auth: {home / 'auth.json'} (the credentials) is missing but MLflow's user store "
                                 f"{users_db.split('@')[-1]} is there: restore auth.json, or drop the store (its "
                                 "users go with it)")  # fmt: skip
            _keep_auth(home, keys)
        if auth and db == "sqlite" and not users_kept:  # password hashes: the owner's only (an empty file is a new DB)
            _write_private(home / "mlflow_auth.db", "")
        prefect_env = {**base, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                       "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or f"{prefect_url}/api"}  # a proxy's
        if prefect_db:
            prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_db
        if auth:
            prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = keys["prefect_auth_string"]
        # the V1 UI only: Prefect's V2 UI calls an analytics host (infra/prefect_server.py)
        p = _start("prefect", [sys.executable, str(ROOT / "infra" / "prefect_server.py"), "server", "start", "--host",
                               host, "--port", str(prefect_port)], prefect_env, home)  # fmt: skip
        mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(mlflow_port),
                      "--workers", "1" if db == "sqlite" else "2", "--backend-store-uri", mlflow_db,
                      "--artifacts-destination", str(home / "mlartifacts")]  # fmt: skip
        if mlflow_allowed_hosts:
            mlflow_cmd += ["--allowed-hosts", mlflow_allowed_hosts]
        mlflow_env = base
        if auth:
            mlflow_cmd += ["--app-name", "basic-auth"]
            mlflow_env = {**base, **_mlflow_auth_env(home, keys, users_db)}
        m = _start("mlflow", mlflow_cmd, mlflow_env, home)
        # wsgiref: one process (the default, gunicorn, forks two and puts a control socket in ~/.gunicorn)
        o = _start("optuna", [sys.executable, "-m", "optuna_dashboard._cli", optuna_db, "--host", ui_host,
                              "--port", str(optuna_port), "--server", "wsgiref"], base, home)  # fmt: skip
        local = lambda port: f"http://127.0.0.1:{port}"  # noqa: E731  (health checks from this node)
        # the live dashboard reads the MLflow server from this node; its run links are for browsers (the public URL)
        d = _start("dashboard", [sys.executable, "-m", "dashboards.app", "--host", ui_host, "--port",
                                 str(dashboard_port), "--tracking-uri", local(mlflow_port), "--mlflow-url", mlflow_url],
                   base, home)  # fmt: skip
        _wait(f"{local(prefect_port)}/api/health", p, home / "prefect.log")  # both health endpoints need no login
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
            s = _start("serve", [sys.executable, "-m", "flows.serve", "--cron", cron], {**base, **local_client}, home)
            # `up` returns when the Run buttons exist: the deployments registered, not only the process started
            _wait_deployments(local(prefect_port), s, home / "serve.log", auth_string=keys.get("prefect_auth_string"))
    except BaseException:
        down(home)
        raise
    lines = [f"export {k}={shlex.quote(v)}" for k, v in {**client, **client_auth, **QUIET}.items()]
    _write_private(home / "env.sh", "\n".join(lines) + "\n")  # the credentials; RPG_OPTUNA_STORAGE: Postgres's password
    urls = {"prefect_ui": prefect_url, "mlflow_ui": mlflow_url, "optuna_dashboard": optuna_url, "dashboard": dashboard_url,
            **client}  # fmt: skip
    with _environ(client_auth):  # MLflow's client takes its user from the environment
        urls["lost_runs"] = end_lost_runs(local(mlflow_port))  # RUNNING, with no process left since the last up
        urls["mlflow_runs"] = runs_link(local(mlflow_port), mlflow_url)  # not in stack.json: it changes with the store
    public_urls = {k: v for k, v in urls.items() if k not in ("RPG_OPTUNA_STORAGE", "mlflow_runs", "lost_runs")}  # `status` prints stack.json
    info = {**public_urls, "ports": [prefect_port, mlflow_port, optuna_port, dashboard_port], "db": db, "pool": pool,
            "auth": auth}  # fmt: skip
    (home / "stack.json").write_text(json.dumps(info, indent=1))
    return urls


# axis tags that name a whole configuration or its parts' keys: never what a sweep "varies" for a reader
_NOT_AXES = ("design", "config_key", "objective_key", "seed")


def end_lost_runs(tracking_uri: str) -> str:
    """What ``up`` prints about the runs a crash left RUNNING (a machine that lost power with the stack): each one
    ends FAILED, tagged rpg.exit=lost (``rpg_core.runs.collect_lost``, as ``rpg runs gc``). Never raises."""
    try:
        from rpg_core.runs import collect_lost

        lost = collect_lost(tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - `up` has succeeded; `rpg runs gc` can be run by hand
        return f"(could not look for lost runs: {type(e).__name__}: {e}; run `rpg runs gc`)"
    if not lost:
        return ""
    names = ", ".join(f"{r.name or r.run_id} ({r.reason})" for r in lost[:5]) + (" ..." if len(lost) > 5 else "")
    return f"{len(lost)} run(s) left RUNNING with no process ended FAILED, rpg.exit=lost: {names}"


def runs_link(tracking_uri: str, mlflow_url: str) -> str:
    """What ``up`` prints after "MLflow UI": a link to the saved view (rpg_core.mlflow_view) of the newest sweep's
    training runs (its columns: the design axes its runs differ in, and the seed), else of the newest experiment's
    training runs, else that the store has no runs yet. Never raises: a failure is said in the line."""
    try:
        from rpg_core.mlflow_view import runs_view, ui_url
        from rpg_core.runs import find_runs
        from rpg_core.tracking import AXIS_TAGS

        sweeps = find_runs(kind="sweep", limit=1, tracking_uri=tracking_uri)
        if len(sweeps):
            name, experiment = sweeps["sweep"].iloc[0], sweeps["experiment"].iloc[0]
            if isinstance(name, str) and name:
                runs = find_runs(kind="train", sweep=name, experiments=experiment, tracking_uri=tracking_uri)
                varied = [a for a in AXIS_TAGS if a not in _NOT_AXES and a in runs and runs[a].nunique() > 1]
                fragment = runs_view(tracking_uri, experiment, sweep=name, axes=(*varied, "seed") if varied else ())
                return f"{ui_url(fragment, mlflow_url)}   (newest sweep: {name})"
        train = find_runs(kind="train", limit=1, tracking_uri=tracking_uri)
        if len(train):
            experiment = train["experiment"].iloc[0]
            return f"{ui_url(runs_view(tracking_uri, experiment), mlflow_url)}   (training runs of {experiment})"
        return "(the store has no runs yet: a sweep prints its own link when it starts)"
    except Exception as e:  # noqa: BLE001 - a link is a convenience; `up` has succeeded
        return f"(no link to the runs: {type(e).__name__}: {e})"


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


def _get(url: str, credentials: str | None, timeout: float) -> tuple[int | None, str]:
    """GET ``url`` with basic auth: (status, body's start), or (None, why nothing answered)."""
    req = urllib.request.Request(url, headers=_basic(credentials))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(200).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(200).decode(errors="replace")
    except (OSError, ValueError) as e:
        return None, str(getattr(e, "reason", e))


def check_clients(env: dict[str, str] | None = None, timeout: float = 10) -> list[str]:
    """What keeps the client settings ``env`` (default: this process's environment, e.g. a sourced ``env.sh``) from
    using the stack: one line per problem, [] when Prefect's API and MLflow's REST API both answer. Stdlib only
    (``worker.sh`` runs it before anything imports Prefect), no secret printed."""
    env = os.environ if env is None else env
    problems = []
    source = "source the head's env.sh (infra/README.md, \"A team\")"
    api = env.get("PREFECT_API_URL", "").rstrip("/")
    uri = env.get("MLFLOW_TRACKING_URI", "").rstrip("/")
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    targets = [("PREFECT_API_URL", api, f"{api}/admin/version", env.get("PREFECT_API_AUTH_STRING"),
                "PREFECT_API_AUTH_STRING")]  # fmt: skip
    if uri.split("://", 1)[0].lower() in ("http", "https") or not uri:  # a local store needs no server
        targets.append(("MLFLOW_TRACKING_URI", uri, f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
                        f"{user}:{password}" if user and password else None,
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"))  # fmt: skip
    for var, base_url, url, credentials, names in targets:
        if not base_url:
            problems.append(f"{var} is not set: {source}")
            continue
        status, text = _get(url, credentials, timeout)
        if status == 200:
            continue
        if status is None:
            problems.append(f"{var} {base_url}: no server answers ({text})")
        elif status == 401 and credentials is None:
            problems.append(f"{var} {base_url}: the server requires a login (401) and {names} is not set: {source}")
        elif status == 401:
            problems.append(f"{var} {base_url}: the server refused {names} (401): take the head's current env.sh")
        else:
            problems.append(f"{var} {base_url}: answered {status}: {' '.join(text.split())[:120]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python infra/stack.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status", "check"])
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
    p.add_argument("--auth", action="store_true", default=None,
                   help="log-ins on both servers at any --host (on by itself for hosts but 127.0.0.1/localhost)")
    args = p.parse_args(argv)
    if args.action == "up":
        db = "postgres" if args.pg_url else args.db
        urls = up(args.home, args.prefect_port, args.mlflow_port, args.cron, db=db, optuna_port=args.optuna_port,
                  dashboard_port=args.dashboard_port, pg_port=args.pg_port, pg_url=args.pg_url, pg_data=args.pg_data,
                  host=args.host, pool=args.pool, mlflow_allowed_hosts=args.mlflow_allowed_hosts,
                  auth=args.auth)  # fmt: skip
        where = f"on work pool {args.pool}: start workers with infra/team/worker.sh" if args.pool else "served here"
        print(f"Prefect UI  {urls['prefect_ui']}   (deployments {', '.join(DEPLOYMENTS)}; {where})")
        print(f"MLflow UI   {urls['mlflow_ui']}   (store: {db})")
        print(f"  runs      {urls['mlflow_runs']}")
        if urls.get("lost_runs"):
            print(f"  lost      {urls['lost_runs']}")
        studies = urls["RPG_OPTUNA_STORAGE"] if db == "sqlite" else "postgres, database optuna"
        auth = json.loads((args.home / "stack.json").read_text())["auth"]
        only_here = "; this machine only: no login of its own" if auth and not is_loopback(args.host) else ""
        print(f"Optuna UI   {urls['optuna_dashboard']}   (studies: {studies}{only_here})")
        print(f"Dashboard   {urls['dashboard']}   (live comparison: {urls['dashboard']}/?sweep=NAME or "
              f"/?study=NAME{only_here})")  # fmt: skip
        login = f"; log-ins: Prefect and MLflow, credentials in {args.home / 'auth.json'}" if auth else ""
        print(f"clients:    source {args.home / 'env.sh'}   stop: python infra/stack.py down{login}")
    elif args.action == "down":
        stopped = down(args.home)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.action == "check":
        problems = check_clients()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 2
        print(f"ok: Prefect {os.environ['PREFECT_API_URL']} and MLflow {os.environ['MLFLOW_TRACKING_URI']} answer")
    else:
        info = args.home / "stack.json"
        alive = {n: (args.home / f"{n}.pid").exists() for n in ORDER}
        print(json.dumps({"running": alive, **(json.loads(info.read_text()) if info.exists() else {})}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
