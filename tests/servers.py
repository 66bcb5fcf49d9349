"""Helpers for the tests that start real servers and processes: a free port, whether a process is still alive, the
stack's offline settings (``QUIET``, ``server_env``) and an ``mlflow server`` started with them."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def training_processes(marker: str) -> list[int]:
    """The pids of live `rpg train` processes whose command line mentions ``marker`` (a path of the calling test)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "rpg_core.cli train" in cmd and marker in cmd and alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def wait_healthy(url: str, proc, timeout: float = 120, what: str = "mlflow server") -> None:
    """Poll ``<url>/health`` until it answers; fail if ``proc`` died or ``timeout`` passed."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.5)


def _load_stack():
    """infra/stack.py as a module (it is a script, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "infra" / "stack.py"
    spec = importlib.util.spec_from_file_location("_rpg_stack", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack = _load_stack()
QUIET = dict(stack.QUIET)  # the settings that keep the servers (and their UIs) from calling out, as the stack's


def postgres_missing() -> str | None:
    """Why this machine cannot run a Postgres stack (the stack's own cluster), or None."""
    import shutil
    import subprocess

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


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server a test starts: this process's, the stack's ``QUIET`` settings, then ``extra``."""
    return {**os.environ, **QUIET, **extra}


@contextlib.contextmanager
def mlflow_server(uri: str, cwd: Path, timeout: float = 120):
    """``mlflow server`` on ``uri`` at 127.0.0.1:<free port> with the stack's settings (one worker, no job runner,
    telemetry off), until ``/health`` answers; yields its URL; stopped (SIGTERM to its group, then SIGKILL) after."""
    import signal
    import subprocess
    import sys

    port = free_port()
    log = (Path(cwd) / f"mlflow-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1", "--artifacts-destination",
                             str(Path(cwd) / "mlartifacts")], cwd=cwd, env=server_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()
