"""`accelerate launch --num_processes 2` on CPU (gloo), with the shipped infra/accelerate/cpu_2proc.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rpg_core.config import load_run_config

pytestmark = [pytest.mark.system, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_gloo_run(tmp_path):
    """Two processes train (each samples half the prompts) and share the benchmark evaluation; the gathered
    evaluation equals a one-process `rpg eval` of the same checkpoint sample for sample."""
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(5)))  # fmt: skip
    cfg = load_run_config(
        preset="rpg_reinforce_urkl",
        overrides=[
            "model.name=tiny", "data.level=add1", "data.n_train=64", "data.n_eval=0",
            "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
            "reward.dynamic_sampling=false", "algorithm.epochs=2", "algorithm.micro_batch_size=2",
            "optim.lr=1e-3", "optim.warmup_steps=0", "train.steps=2", "train.log_samples=1",
            f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.eval_every=2", f"evaluation.benchmarks=[{bench}]", "evaluation.k=3", "evaluation.batch_size=6",
            "evaluation.log_samples=3",
        ],
    )  # fmt: skip
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(cfg.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "infra/accelerate/cpu_2proc.yaml"),
         "--main_process_port", "0", "-m", "rpg_core.cli", "train", "--config", str(cfg_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = tmp_path / "runs" / cfg.run_key() / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert len(state["history"]) == 2
    # Each process sampled 2 of the 4 prompts; metrics are the average over both (8 responses per step).
    assert state["history"][0]["ds/kept_groups"] == 2.0
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("rpg").experiment_id])
    assert len(runs) == 1, "only the main process logs"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.info.run_id == state["run_id"]
    w = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in w.values())

    # The evaluation at step 2 (3 calls of 2 problems x 3 samples, dealt to 2 processes) equals one process's.
    art = client.download_artifacts(run.info.run_id, "eval/step_000002/toy_samples.json", str(tmp_path))
    table = json.loads(Path(art).read_text())
    logged = sorted((row[table["columns"].index("problem_id")], row[table["columns"].index("sample")],
                     row[table["columns"].index("response")]) for row in table["data"])  # fmt: skip
    assert len(logged) == 15
    out = tmp_path / "one.json"
    r = subprocess.run(
        [sys.executable, "-m", "rpg_core.cli", "eval", "--model", str(ckpt), "--benchmarks", str(bench), "--k", "3",
         "--batch-size", "6", "--no-mlflow", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(out.read_text())["samples"]["toy"]
    assert sorted((s["problem_id"], s["sample"], s["response"]) for s in one) == logged
    assert run.data.metrics["eval/toy/n_problems"] == 5
