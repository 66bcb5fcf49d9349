"""How long ``rpg report`` takes at the scale of the paper's design grid: the 61 distinct losses of
``sweeps/kl_design.yaml`` x 3 seeds x 50 logged steps, in a synthetic SQLite store (the runs carry the real configs'
axis tags; their curves are synthetic: a per-configuration trend plus per-seed noise).

Measured: writing the store (not part of the report), loading it through dashboards.data (the read API's batched
histories), building every view, writing the page and the tables, the PNGs (kaleido + the system Chromium), and the
time headless Chromium takes to open the page until every figure has drawn.

    python benchmarks/bench_report.py [--configs 61] [--seeds 3] [--steps 50] [--no-png] [--out DIR]

Results: benchmarks/results/report.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("reward/mean", "acc/strict", "actor/entropy", "response_length/mean", "response_length/clip_frac",
        "actor/kl_k1", "actor/kl_k2", "actor/kl_k3", "actor/clipfrac", "actor/grad_norm", "perf/tokens_per_s",
        "time/step")  # fmt: skip
EVAL_EVERY = 5


def write_store(uri: str, configs: int, seeds: int, steps: int) -> dict:
    """The synthetic sweep ``bench`` (a parent run and configs x seeds children), written with MLflow's batch API."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from rpg_core.sweeps import expand, load_sweep
    from rpg_core.tracking import GROUP_TAG, KIND_TAG, RunKind

    exp = expand(load_sweep(ROOT / "sweeps" / "kl_design.yaml"))
    cfgs = [r.config for r in exp.runs][:configs]
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("rpg")
    parent = client.create_run(exp_id, run_name="sweep-bench", tags={KIND_TAG: RunKind.SWEEP.value, "sweep": "bench"})
    rng = np.random.default_rng(0)
    points = 0
    for i, cfg in enumerate(cfgs):
        skill = rng.uniform(0.3, 0.7)
        kl_scale = rng.uniform(0.001, 0.05)
        for seed in range(seeds):
            c = cfg.with_overrides([f"train.seed={seed}"])
            tags = {**c.axis_tags(), KIND_TAG: RunKind.TRAIN.value, GROUP_TAG: c.key(), "sweep": "bench",
                    "mlflow.parentRunId": parent.info.run_id}  # fmt: skip
            run = client.create_run(exp_id, run_name=f"bench-{i}-s{seed}", tags=tags)
            t0 = int(time.time() * 1000)
            ms: list = []
            noise = rng.normal(0, 0.03, size=steps + 1)
            for s in range(1, steps + 1):
                frac = s / steps
                vals = {"reward/mean": 2 * (skill * frac + noise[s]) - 1, "acc/strict": skill * frac + noise[s],
                        "actor/entropy": 1.5 * (1 - 0.5 * frac), "response_length/mean": 20 + 5 * frac,
                        "response_length/clip_frac": 0.05 * frac, "actor/kl_k1": kl_scale * frac,
                        "actor/kl_k2": kl_scale * frac * 0.9, "actor/kl_k3": kl_scale * frac * 1.1,
                        "actor/clipfrac": 0.02, "actor/grad_norm": 1 + noise[s], "perf/tokens_per_s": 400.0,
                        "time/step": 30.0}  # fmt: skip
                ms += [Metric(k, float(v), t0 + 30000 * s, s) for k, v in vals.items()]
                if s % EVAL_EVERY == 0 or s == 1:
                    ms.append(Metric("eval/acc_strict", float(skill * frac + noise[s - 1]), t0 + 30000 * s, s))
            for j in range(0, len(ms), 1000):
                client.log_batch(run.info.run_id, metrics=ms[j : j + 1000])
            client.set_terminated(run.info.run_id)
            points += len(ms)
    client.log_batch(parent.info.run_id, tags=[RunTag("rpg.runs", str(configs * seeds))])
    client.set_terminated(parent.info.run_id)
    return {"runs": configs * seeds, "points": points}


def render_seconds(html: Path) -> float | None:
    """Seconds headless Chromium takes from navigation until every figure of the page has drawn."""
    from dashboards.report import find_browser

    browser = find_browser()
    if browser is None:
        return None
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        t = time.perf_counter()
        page.goto(html.as_uri())
        page.wait_for_function("() => window.RPG_REPORT && window.RPG_REPORT.figures.every("
                               "f => document.querySelector('#fig-' + f + ' .main-svg'))", timeout=120_000)  # fmt: skip
        secs = time.perf_counter() - t
        b.close()
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=61)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report.json"))
    args = ap.parse_args()
    from dashboards import report
    from dashboards.data import PANEL, load

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        t = time.perf_counter()
        size = write_store(uri, args.configs, args.seeds, args.steps)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        data = load(sweep="bench", tracking_uri=uri, keys=[*PANEL, "eval/acc_strict"])
        load_s = time.perf_counter() - t
        rep = report.write(data, Path(tmp) / "report", png=not args.no_png, log=False)
        render = render_seconds(rep.html)
        result = {
            "configs": args.configs, "seeds": args.seeds, "steps": args.steps, **size,
            "write_store_s": round(write_s, 1), "load_s": round(load_s, 2),
            **{f"{k}_s": round(v, 2) for k, v in rep.seconds.items()},
            "report_s": round(load_s + rep.seconds["total"], 2),
            "browser_render_s": None if render is None else round(render, 2),
            "html_mb": round(rep.html.stat().st_size / 1e6, 1), "figures": len(rep.figures), "pngs": len(rep.pngs),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        }  # fmt: skip
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
