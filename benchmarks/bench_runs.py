"""Full metric histories of many runs: ``rpg_core.runs.histories`` (batched per metric name) vs the naive loop
(``MlflowClient.get_metric_history`` per run per metric), on a synthetic store written by the real Tracker.

Counts the store round trips each makes (calls of the store's history methods; over HTTP, requests) and times them
(median of ``--repeats``), checks both return the same points, and writes ``benchmarks/results/runs_history.json``.
``--http`` also reads through a local ``mlflow server`` on the same SQLite file.

Usage: ``.venv/bin/python benchmarks/bench_runs.py [--runs 20] [--metrics 10] [--steps 50] [--repeats 5] [--http]``
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
from collections import Counter
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.store.tracking.rest_store import RestStore  # noqa: E402
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils import rest_utils  # noqa: E402

from rpg_core import runs  # noqa: E402
from rpg_core.tracking import RunKind, Tracker  # noqa: E402

CALLS: Counter[str] = Counter()


def _count(owner, name: str, label: str) -> None:
    real = getattr(owner, name)

    def wrapper(*a, **kw):
        CALLS[label] += 1
        return real(*a, **kw)

    setattr(owner, name, wrapper)


def make_store(uri: str, n_runs: int, n_metrics: int, steps: int) -> tuple[list[str], list[str]]:
    keys = [f"group{i % 3}/metric_{i}" for i in range(n_metrics)]
    ids = []
    for r in range(n_runs):
        t = Tracker(experiment="bench", run_name=f"run-{r}", tracking_uri=uri, kind=RunKind.TRAIN)
        for s in range(steps):
            t.log_metrics({k: r + s * 1e-3 + i for i, k in enumerate(keys)}, step=s)
        t.finish()
        ids.append(t.run_id)
    return ids, keys


def naive(uri: str, ids: list[str], keys: list[str]) -> list[tuple]:
    client = MlflowClient(uri)
    return sorted((r, k, m.step, m.value) for r in ids for k in keys for m in client.get_metric_history(r, k))


def bulk(uri: str, ids: list[str], keys: list[str]) -> list[tuple]:
    h = runs.histories(ids, keys, tracking_uri=uri)
    return sorted(zip(h["run_id"], h["key"], h["step"], h["value"], strict=True))


def measure(uri: str, ids: list[str], keys: list[str], repeats: int) -> dict:
    out = {}
    points = {}
    for name, fn in (("naive", naive), ("bulk", bulk)):
        times = []
        for _ in range(repeats):
            CALLS.clear()
            t0 = time.perf_counter()
            points[name] = fn(uri, ids, keys)
            times.append(time.perf_counter() - t0)
        out[name] = {"calls": dict(CALLS), "round_trips": sum(CALLS.values()), "median_s": statistics.median(times),
                     "points": len(points[name])}  # fmt: skip
    assert points["naive"] == points["bulk"], "the two readers disagree"
    out["speedup"] = out["naive"]["median_s"] / out["bulk"]["median_s"]
    return out


def start_server(db_uri: str, cwd: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--http", action="store_true", help="also through a local mlflow server")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "runs_history.json"))
    args = ap.parse_args()
    _count(SqlAlchemyStore, "get_metric_history", "get_metric_history")
    _count(SqlAlchemyStore, "get_metric_history_bulk", "get_metric_history_bulk")
    _count(RestStore, "get_metric_history", "GET get-history")
    _count(rest_utils, "http_request", "GET get-history-bulk")  # runs.py calls it only for the bulk endpoint
    results = {"runs": args.runs, "metrics": args.metrics, "steps": args.steps, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        ids, keys = make_store(uri, args.runs, args.metrics, args.steps)
        print(f"store: {args.runs} runs x {args.metrics} metrics x {args.steps} steps in {time.perf_counter() - t0:.1f} s")
        results["sqlite"] = measure(uri, ids, keys, args.repeats)
        if args.http:
            proc, url = start_server(uri, tmp)
            try:
                results["http"] = measure(url, ids, keys, args.repeats)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    for store in ("sqlite", "http"):
        if store in results:
            r = results[store]
            for name in ("naive", "bulk"):
                print(f"{store:<7} {name:<6} {r[name]['round_trips']:>5} round trips  {r[name]['median_s'] * 1e3:8.1f} ms"
                      f"  ({r[name]['points']} points)")  # fmt: skip
            print(f"{store:<7} bulk is {r['speedup']:.1f}x faster")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
