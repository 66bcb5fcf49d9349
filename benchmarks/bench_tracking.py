"""What one training step pays to log ~30 metrics to MLflow on SQLite, as seen by the caller.

Compares, on a fresh SQLite store in a temp dir:

* ``Tracker.log_metrics``                     rpg_core.tracking: validate + enqueue; one writer thread batches
* ``MlflowClient.log_batch``                  synchronous: one SQLite transaction per step
* ``MlflowClient.log_batch(synchronous=False)`` MLflow's own async logging (a queue + thread pools in the store)

For each: per-call latency (median / p99 / max, in microseconds) and the wall time until every step is durably
written (the flush). Usage: ``.venv/bin/python benchmarks/bench_tracking.py [--steps 200] [--metrics 30]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpg_core.tracking import Tracker, ensure_experiment  # noqa: E402


def _metrics(step: int, n: int) -> dict[str, float]:
    return {f"group{i % 5}/metric_{i}": step * 1e-3 + i for i in range(n)}


def _stats(ts: list[float]) -> tuple[float, float, float]:
    us = sorted(t * 1e6 for t in ts)
    return statistics.median(us), us[min(len(us) - 1, int(0.99 * len(us)))], us[-1]


def bench_tracker(uri: str, steps: int, n: int) -> tuple[list[float], float]:
    tr = Tracker(experiment="bench", run_name="tracker", tracking_uri=uri)
    ts = []
    t0 = time.perf_counter()
    for s in range(steps):
        m = _metrics(s, n)
        t = time.perf_counter()
        tr.log_metrics(m, step=s)
        ts.append(time.perf_counter() - t)
    tr.flush()
    total = time.perf_counter() - t0
    tr.finish()
    return ts, total


def bench_client(uri: str, steps: int, n: int, synchronous: bool) -> tuple[list[float], float]:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(uri, "bench")
    run_id = client.create_run(exp_id, run_name=f"log_batch sync={synchronous}").info.run_id
    ts, ops = [], []
    t0 = time.perf_counter()
    for s in range(steps):
        m = _metrics(s, n)
        t = time.perf_counter()
        now = int(time.time() * 1000)
        op = client.log_batch(run_id, metrics=[Metric(k, v, now, s) for k, v in m.items()], synchronous=synchronous)
        ts.append(time.perf_counter() - t)
        if op is not None:
            ops.append(op)
    for op in ops:  # the only way MLflow's async mode reports a failed write
        op.wait()
    total = time.perf_counter() - t0
    client.set_terminated(run_id)
    hist = client.get_metric_history(run_id, "group0/metric_0")
    assert len(hist) == steps, (synchronous, len(hist))
    return ts, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--metrics", type=int, default=30)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        t = time.perf_counter()
        ensure_experiment(uri, "bench")
        print(f"fresh SQLite store + experiment: {time.perf_counter() - t:.2f} s")
        rows = [
            ("Tracker.log_metrics (queue + writer thread)", *bench_tracker(uri, args.steps, args.metrics)),
            ("MlflowClient.log_batch, synchronous", *bench_client(uri, args.steps, args.metrics, True)),
            ("MlflowClient.log_batch, synchronous=False", *bench_client(uri, args.steps, args.metrics, False)),
        ]
    print(f"\n{args.steps} steps x {args.metrics} metrics, SQLite; caller-side time per call (us), "
          "then wall time until all written")
    print(f"{'method':46} {'median':>9} {'p99':>9} {'max':>9} {'all written':>12} {'per step':>10}")
    for name, ts, total in rows:
        med, p99, mx = _stats(ts)
        print(f"{name:46} {med:9.1f} {p99:9.1f} {mx:9.1f} {total:10.2f} s {total / args.steps * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
