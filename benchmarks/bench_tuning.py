"""The tuner's cost and what pruning saves, on the tiny model (CPU).

    python benchmarks/bench_tuning.py [--trials 8] [--steps 60] [--out benchmarks/results/tuning.json]

Three measurements on one study (sweeps/tune_smoke.yaml with ``--steps`` steps a trial, one seed, concurrency 1):
- ``direct``: the study's trial configs (the points a first, unpruned study chose) trained one after another by
  ``flows.core.run_training``, the same ``rpg train`` processes the tuner starts, without Optuna or a coordinator;
- ``tune``: ``rpg tune`` on the same study without pruning (a fresh storage and MLflow store): ask/tell, the
  learning-curve reads, the study's MLflow run and figures. Overhead per trial = (tune wall - direct wall) / trials,
  and as a share of a trial's wall time;
- ``pruned``: ``rpg tune`` with the median pruner (start-up 2 trials, warm-up a third of training) on the same
  sampler seed: the device-seconds of its runs against ``tune``'s, and whether the best point differs.
The machine's cores are shared by everything that runs: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study(tmp: Path, steps: int, trials: int, pruner: dict) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "tune_smoke.yaml").read_text())
    spec["base"].update({"train.steps": steps, "train.eval_every": 0, "train.checkpoint_every": 0})
    spec.update(budget={"trials": trials}, pruner=pruner)
    p = tmp / "study.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def tune(tmp: Path, path: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "rpg_core.cli", "tune", str(path), "--storage", str(tmp / "optuna.journal"),
           "--set", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "--set", f"train.output_dir={tmp / 'runs'}",
           "--workdir", str(tmp / "work"), "--json"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout), wall


def device_seconds(tmp: Path) -> float:
    from mlflow.tracking import MlflowClient

    ml = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = ml.get_experiment_by_name("tune-smoke")
    runs = ml.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'train'")
    return sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tuning.json"))
    args = ap.parse_args()
    from flows.core import run_training
    from rpg_core.tuning import cells, load_study, trial_config

    out: dict = {"trials": args.trials, "steps": args.steps, "model": "tiny", "seeds": 1, "concurrency": 1}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, tempfile.TemporaryDirectory() as c:
        a, b, c = Path(a), Path(b), Path(c)
        path = study(a, args.steps, args.trials, {"kind": "none"})
        full, wall = tune(a, path)
        out["tune"] = {"wall_s": round(wall, 1), "device_s": round(device_seconds(a), 1), "best": full["best"]}
        print("tune (no pruning):", out["tune"], flush=True)
        # the same points, trained directly
        spec = load_study(path, [f"tracking.tracking_uri=sqlite:///{c / 'mlflow.db'}", f"train.output_dir={c / 'runs'}"])
        cell = cells(spec)[0][0]
        t0 = time.perf_counter()
        for t in full["trials"]:
            cfg = trial_config(spec, cell, t["params"], seed=0)
            res = run_training(cfg, workdir=c / "work")
            assert res.ok, res.log.read_text()[-2000:]
        direct = time.perf_counter() - t0
        out["direct"] = {"wall_s": round(direct, 1)}
        per = (wall - direct) / args.trials
        out["overhead"] = {"per_trial_s": round(per, 2), "share": round((wall - direct) / direct, 4)}
        print("direct:", out["direct"], "overhead:", out["overhead"], flush=True)
        path = study(b, args.steps, args.trials, {"kind": "median", "startup_trials": 2})
        pruned, wall_p = tune(b, path)
        states = [t["state"] for t in pruned["trials"]]
        out["pruned"] = {"wall_s": round(wall_p, 1), "device_s": round(device_seconds(b), 1), "best": pruned["best"],
                         "pruned_trials": states.count("PRUNED"),
                         "pruned_at": [t["pruned_at_step"] for t in pruned["trials"] if t["state"] == "PRUNED"]}  # fmt: skip
        out["pruning_saves"] = round(1 - out["pruned"]["device_s"] / out["tune"]["device_s"], 4)
        out["same_best"] = pruned["best"]["config_key"] == full["best"]["config_key"]
        print("pruned:", out["pruned"], "saves:", out["pruning_saves"], "same best:", out["same_best"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
