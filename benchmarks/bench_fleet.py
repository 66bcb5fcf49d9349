"""The scheduling overhead of a sweep's two dispatch paths, and the 8-run smoke sweep on one machine vs two.

    python benchmarks/bench_fleet.py [--out benchmarks/results/fleet.json]

Starts a stack of its own (infra/stack.py on free 127.0.0.1 ports, SQLite stores, the deployments on a process work
pool) and runs the smoke sweep with seeds 0 and 1 (8 runs, 2 devices per machine) three times:
- ``local``: the sweep flow called here, its runs tasks of this process on this machine's 2 devices;
- ``pool-1``: the sweep deployment on the pool with one worker machine (`a`, 2 devices);
- ``pool-2``: the same with two worker machines (`a` and `b`, 2 devices each), each from its own copy of the project.
Per run, the times come from the run logs' markers (flows/core.py writes the epoch at each process start and end):
- trigger -> start: from the sweep's start (its parent MLflow run) to each device's first process start;
- end -> next start: on one device, from a process's end to the next process's start (the queue's hand-over);
- wall: the sweep's parent MLflow run, start to end.
On this 2-core machine the "machines" share the cores: compare the overheads, not the wall times, as a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^=== (?:\S+ \S+ t=(?P<start>[0-9.]+) .*CUDA_VISIBLE_DEVICES='(?P<dev>[^']*)'|end t=(?P<end>[0-9.]+))")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _intervals(logs: list[tuple[str, Path]]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(host, device) -> sorted [(process start, end)] from the run logs' markers."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for host, path in logs:
        start, dev = None, ""
        for line in path.read_text().splitlines():
            m = MARK.match(line)
            if not m:
                continue
            if m["start"]:
                start, dev = float(m["start"]), m["dev"]
            elif start is not None:
                out.setdefault((host, dev), []).append((start, float(m["end"])))
                start = None
    return {k: sorted(v) for k, v in out.items()}


def _stats(intervals: dict, t0: float, t1: float) -> dict:
    first = [v[0][0] - t0 for v in intervals.values()]
    gaps = [b[0] - a[1] for v in intervals.values() for a, b in zip(v, v[1:], strict=False)]
    runs = sum(len(v) for v in intervals.values())
    busy = sum(e - s for v in intervals.values() for s, e in v)
    return {
        "runs": runs,
        "wall_s": round(t1 - t0, 1),
        "trigger_to_start_s": {"mean": round(statistics.mean(first), 2), "max": round(max(first), 2)},
        "end_to_next_start_s": {"mean": round(statistics.mean(gaps), 2), "median": round(statistics.median(gaps), 2),
                                "n": len(gaps)} if gaps else None,  # fmt: skip
        "process_s_mean": round(busy / runs, 1),
        "hosts": sorted({h for h, _ in intervals}),
        "devices": len(intervals),
    }


def _parent_times(mlflow_uri: str, experiment: str) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name(experiment)
    (parent,) = c.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'sweep'")
    return parent.info.start_time / 1000, parent.info.end_time / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet.json")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="rpg-bench-fleet-"))
    home, pool = base / "head", "bench-pool"
    pp, mp, op, dp = _free_port(), _free_port(), _free_port(), _free_port()
    stack = [sys.executable, "infra/stack.py", "--home", str(home), "--prefect-port", str(pp), "--mlflow-port", str(mp),
             "--optuna-port", str(op), "--dashboard-port", str(dp)]  # fmt: skip
    workers: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        r = subprocess.run([*stack, "--pool", pool, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise SystemExit(r.stdout + r.stderr)
        env_lines = (home / "env.sh").read_text().split()
        client = dict(x.split("=", 1) for x in env_lines if "=" in x)
        os.environ.update(client)
        uri = client["MLFLOW_TRACKING_URI"]
        from prefect.deployments import run_deployment

        # -- local: this process's tasks on this machine's two devices ---------------------------------------------
        from flows.rpg_flows import sweep

        work = base / "local"
        os.environ.update(RPG_HOST="local", OMP_NUM_THREADS="1")  # as the workers below: 2 processes on the cores
        sweep(sweep_file="sweeps/smoke.yaml", seeds=[0, 1], gpus="0,1", concurrency=2, workdir=str(work),
              overrides=[f"train.output_dir={work / 'runs'}", "tracking.experiment=bench-local"])  # fmt: skip
        t0, t1 = _parent_times(uri, "bench-local")
        results["local"] = _stats(_intervals([("local", f) for f in (work / "smoke" / "logs").glob("*.log")]), t0, t1)
        print("local", results["local"], flush=True)

        # -- the pool: one machine, then two -----------------------------------------------------------------------
        copies = {}
        for h in ("a", "b"):
            copies[h] = base / f"machine-{h}" / "rpg-lab"
            shutil.copytree(ROOT, copies[h], ignore=shutil.ignore_patterns(".venv", ".rpg", ".git", "runs", "__pycache__",
                                                                           "*.egg-info", ".pytest_cache"))  # fmt: skip
        for phase, hosts in (("pool-1", ("a",)), ("pool-2", ("a", "b"))):
            for h in hosts[len(workers):]:
                env = {**os.environ, "RPG_POOL": pool, "RPG_GPUS": "0,1", "RPG_HOST": h, "PYTHON": sys.executable,
                       "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_HOME": str(base / f"worker-{h}"),
                       "OMP_NUM_THREADS": "1"}  # fmt: skip
                env.pop("RPG_ROOT", None)
                log = (base / f"worker-{h}.log").open("w")
                workers.append(subprocess.Popen(["bash", "infra/team/worker.sh"], cwd=copies[h], env=env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
            time.sleep(15)  # the workers start polling
            wd = f".rpg/bench-{phase}"
            run = run_deployment("sweep/sweep", parameters={"sweep_file": "sweeps/smoke.yaml", "seeds": [0, 1],
                                 "workdir": wd, "overrides": [f"tracking.experiment=bench-{phase}"]},
                                 timeout=1800, poll_interval=2)  # fmt: skip
            if not run.state.is_completed():
                raise SystemExit(f"{phase}: {run.state}")
            t0, t1 = _parent_times(uri, f"bench-{phase}")
            logs = [(h, f) for h in hosts for f in (copies[h] / wd / "smoke" / "logs").glob("*.log")]
            results[phase] = _stats(_intervals(logs), t0, t1)
            print(phase, results[phase], flush=True)
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
        subprocess.run([*stack, "down"], cwd=ROOT, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
    out = {"machine": f"{os.cpu_count()} cores", "sweep": "sweeps/smoke.yaml, seeds 0,1 (8 runs), 2 devices per host",
           "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
