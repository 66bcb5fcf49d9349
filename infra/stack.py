"""The local stack in one command: Prefect server, MLflow server (SQLite) and the served deployments, on 127.0.0.1.

    python infra/stack.py up   [--prefect-port 4200] [--mlflow-port 5000] [--home .rpg/stack]
    python infra/stack.py down [--home .rpg/stack]
    python infra/stack.py status

``up`` starts each process in its own session (logs and pid files in ``--home``), waits for its health endpoint,
and writes ``<home>/env.sh`` with the client settings (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``); ``down``
stops every process group (SIGTERM, then SIGKILL) and checks the ports are free. Telemetry is off everywhere and
the Prefect UI is the V1 UI, which makes no external requests (../shared/docs/stack.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
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
ORDER = ("prefect", "mlflow", "serve")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


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


def up(home: Path, prefect_port: int, mlflow_port: int, cron: str) -> dict[str, str]:
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if any((home / f"{n}.pid").exists() for n in ORDER):
        raise SystemExit(f"a stack is already recorded in {home}: run `python infra/stack.py down --home {home}`")
    for port in (prefect_port, mlflow_port):
        if not _port_free(port):
            raise SystemExit(f"port {port} on 127.0.0.1 is in use; pick another (--prefect-port/--mlflow-port)")
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    base = {**os.environ, **QUIET, "PREFECT_HOME": str(home / "prefect")}
    try:
        prefect_env = {**base, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port)}
        p = _start("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(prefect_port)], prefect_env, home)  # fmt: skip
        m = _start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                              "--artifacts-destination", str(home / "mlartifacts")], base, home)  # fmt: skip
        _wait(f"{prefect_url}/api/health", p, home / "prefect.log")
        _wait(f"{mlflow_url}/health", m, home / "mlflow.log")
        client = {"PREFECT_API_URL": f"{prefect_url}/api", "MLFLOW_TRACKING_URI": mlflow_url}
        _start("serve", [sys.executable, "-m", "flows.serve", "--cron", cron], {**base, **client}, home)
    except BaseException:
        down(home)
        raise
    lines = [f"export {k}={v}" for k, v in {**client, **{k: v for k, v in QUIET.items()}}.items()]
    (home / "env.sh").write_text("\n".join(lines) + "\n")
    urls = {"prefect_ui": prefect_url, "mlflow_ui": mlflow_url, **client}
    (home / "stack.json").write_text(json.dumps({**urls, "ports": [prefect_port, mlflow_port]}, indent=1))
    return urls


def down(home: Path, timeout: float = 20) -> list[str]:
    home = home.resolve()
    stopped = []
    for name in reversed(ORDER):
        pid_file = home / f"{name}.pid"
        if not pid_file.exists():
            continue
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
    p.add_argument("--cron", default="0 2 * * *", help="nightly_eval schedule")
    args = p.parse_args(argv)
    if args.action == "up":
        urls = up(args.home, args.prefect_port, args.mlflow_port, args.cron)
        print(f"Prefect UI  {urls['prefect_ui']}   (deployments: sweep, train, evaluate, nightly_eval)")
        print(f"MLflow UI   {urls['mlflow_ui']}")
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
