"""Orchestration overhead: the smoke sweep through the Prefect ``sweep`` flow vs the same runs launched directly by
the CLI one after another, on the same machine, back to back (goal: ratio <= 1.10).

* **direct**: ``rpg train --config <run>.yaml`` for each run of ``sweeps/smoke.yaml``, sequentially.
* **prefect**: the ``sweep`` flow (concurrency 1, so the same sequential schedule) as a flow run on a real Prefect
  server started here on a free 127.0.0.1 port: expansion, finished-key lookup, the global concurrency limit, one
  task and one process per run, the parent MLflow run and the summary. Its wall time is from the flow call to its
  return. A deployment triggered from the UI adds the serve process's poll interval before the run starts
  (``PREFECT_RUNNER_POLL_FREQUENCY``, 10 s by default); that latency is reported separately, not in the ratio.

Each side gets a fresh output folder and MLflow store, so every run trains from scratch. ``--rounds`` alternates
the two sides (direct, prefect, direct, ...) to spread machine noise.

    .venv/bin/python benchmarks/bench_orchestration.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp: Path) -> list[str]:
    return [f"train.output_dir={tmp / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]


def direct(sweep_file: str, tmp: Path) -> float:
    from rpg_core.sweeps import expand, load_sweep
    from rpg_core.tracking import ensure_experiment

    exp = expand(load_sweep(sweep_file, overrides=_overrides(tmp)))
    t0 = time.perf_counter()
    ensure_experiment(f"sqlite:///{tmp / 'mlflow.db'}", "rpg")  # what a careful script does before many runs
    for r in exp.runs:
        path = tmp / f"{r.key}.yaml"
        path.write_text(r.config.to_yaml())
        subprocess.run([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(path)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def prefect(sweep_file: str, tmp: Path) -> float:
    from flows.rpg_flows import sweep

    t0 = time.perf_counter()
    rows = sweep(sweep_file=sweep_file, overrides=_overrides(tmp), concurrency=1, workdir=str(tmp / "work"))
    assert all(r["status"] == "finished" for r in rows), rows
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="sweeps/smoke.yaml")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/orchestration.json")
    args = p.parse_args()
    os.chdir(ROOT)
    home = Path(tempfile.mkdtemp(prefix="rpg-bench-prefect-"))
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port)}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    from prefect.settings import (PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, PREFECT_LOGGING_TO_API_ENABLED,
                                  temporary_settings)  # fmt: skip

    times: dict[str, list[float]] = {"direct": [], "prefect": []}
    try:
        with temporary_settings({PREFECT_API_URL: url, PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
                                 PREFECT_LOGGING_TO_API_ENABLED: False}):  # fmt: skip
            for i in range(args.rounds):
                for side, fn in (("direct", direct), ("prefect", prefect)):
                    with tempfile.TemporaryDirectory(prefix=f"rpg-bench-{side}-") as tmp:
                        sec = fn(args.sweep, Path(tmp))
                    times[side].append(sec)
                    print(f"round {i + 1} {side:8s} {sec:7.1f} s", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    d, f = statistics.median(times["direct"]), statistics.median(times["prefect"])
    result = {"sweep": args.sweep, "rounds": args.rounds, "direct_s": times["direct"], "prefect_s": times["prefect"],
              "median_direct_s": d, "median_prefect_s": f, "ratio": f / d, "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n| side | median wall s | runs |\n|---|---|---|\n| direct CLI, one after another | {d:.1f} | {times['direct']} |"
          f"\n| Prefect sweep flow (concurrency 1) | {f:.1f} | {times['prefect']} |\n\nratio prefect/direct = {f / d:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
