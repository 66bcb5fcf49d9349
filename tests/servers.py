"""Helpers for the tests that start real servers and processes: a free port, whether a process is still alive."""

from __future__ import annotations

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
