"""The sweep's ranked summary (flows/summary.py) on a real MLflow store whose values are set by hand: the ranking,
the means and intervals over seeds, failed seeds listed but left out, the Markdown with links, and what the parent
run holds afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from flows.summary import NOTE_TAG, comparison_links, rank
from rpg_core.sweeps import expand, load_sweep
from rpg_core.tracking import GROUP_TAG, KIND_TAG, RunKind, Tracker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

# eval/acc_strict at the last step (step 2) per divergence and seed; at step 0 every run is at 0.1. RKL's seed 1
# FAILED (its 0.1 must not count).
LAST = {"FKL": (0.5, 0.7), "UFKL": (0.2, 0.4), "RKL": (0.9, 0.1), "URKL": (0.6, 0.8)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranked")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    parent = Tracker(run_name="sweep-smoke", tracking_uri=uri, kind=RunKind.SWEEP, tags={"sweep": "smoke"})
    client = MlflowClient(tracking_uri=uri)
    ids = {}
    for r in expand(load_sweep(ROOT / "sweeps" / "smoke.yaml", seeds=[0, 1])).runs:
        div = r.config.objective.divergence_name
        tags = {**r.config.axis_tags(), KIND_TAG: RunKind.TRAIN.value, GROUP_TAG: r.key, "sweep": "smoke",
                "mlflow.parentRunId": parent.run_id}  # fmt: skip
        run = client.create_run(parent.experiment_id, run_name=r.run_name("smoke"), tags=tags)
        t0 = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric("eval/acc_strict", 0.1, t0, 0),
                                                   Metric("eval/acc_strict", LAST[div][r.seed], t0 + 1000, 2)])  # fmt: skip
        client.set_terminated(run.info.run_id, "FAILED" if (div, r.seed) == ("RKL", 1) else "FINISHED")
        ids[f"{div}-s{r.seed}"] = run.info.run_id
    return uri, ids, parent


def test_configurations_ranked_by_mean_over_seeds_with_intervals(store):
    uri, ids, _ = store
    r = rank("smoke", tracking_uri=uri)
    assert r.metric == "eval/acc_strict"  # the headline: held-out strict accuracy (no benchmark Mean@k logged)
    assert [row["configuration"] for row in r.rows] == ["RKL", "URKL", "FKL", "UFKL"]
    by = {row["configuration"]: row for row in r.rows}
    # two seeds a and b: the bootstrap means are a, (a+b)/2, b (probabilities 1/4, 1/2, 1/4), so the 2.5 % and
    # 97.5 % quantiles are min and max: the 95 % interval is [min, max]
    assert by["URKL"]["mean"] == pytest.approx(0.7) and (by["URKL"]["low"], by["URKL"]["high"]) == pytest.approx((0.6, 0.8))
    assert by["FKL"]["mean"] == pytest.approx(0.6) and (by["FKL"]["low"], by["FKL"]["high"]) == pytest.approx((0.5, 0.7))
    assert by["UFKL"]["mean"] == pytest.approx(0.3) and by["UFKL"]["n"] == 2
    # RKL: the failed seed is listed, not counted: 0.9 from one seed, no interval
    assert by["RKL"]["mean"] == pytest.approx(0.9) and by["RKL"]["n"] == 1
    assert [(s, rid, st) for s, rid, _, st in by["RKL"]["runs"]] == [(0, ids["RKL-s0"], "FINISHED"),
                                                                     (1, ids["RKL-s1"], "FAILED")]  # fmt: skip
    assert r.headline() == "best on eval/acc_strict (Last): RKL 0.900 (n=1)"
    assert set(r.axes) >= {"direction", "normalized"} and "seed" not in r.axes


def test_markdown_links_each_seed_to_its_run(store):
    uri, ids, _ = store
    md = rank("smoke", tracking_uri=uri).markdown(base="http://127.0.0.1:5000")
    lines = md.splitlines()
    assert lines[0] == "### sweep smoke: best on eval/acc_strict (Last): RKL 0.900 (n=1)"
    urkl = next(line for line in lines if "**URKL**" in line)
    assert urkl.startswith("| 2 | **URKL** |") and "0.700 [0.600, 0.800] (n=2)" in urkl
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_run(ids["URKL-s0"]).info.experiment_id  # the run page in "Model training" mode
    page = "http://127.0.0.1:5000/#/experiments/{}/runs/{}?workflowType=machine_learning"
    assert f"[s0 0.600]({page.format(exp, ids['URKL-s0'])})" in urkl
    rkl = next(line for line in lines if "**RKL**" in line)
    assert f"[s1 0.100]({page.format(exp, ids['RKL-s1'])}) (failed)" in rkl
    # a local store has no UI to link to: seeds without links
    plain = rank("smoke", tracking_uri=uri).markdown()
    assert "](" not in plain and "s0 0.600" in plain


def test_the_parent_run_holds_the_ranking(store, tmp_path):
    uri, _, parent = store
    r = rank("smoke", tracking_uri=uri)
    r.log_to(parent)
    parent.flush()  # the tracker writes in the background
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent.run_id)
    assert run.data.tags[NOTE_TAG].startswith("### sweep smoke: best on eval/acc_strict")
    path = client.download_artifacts(parent.run_id, "ranked.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(x["rank"], x["configuration"], x["mean"], x["seeds"]) for x in rows] == [
        (1, "RKL", 0.9, 1), (2, "URKL", 0.7, 2), (3, "FKL", 0.6, 2), (4, "UFKL", 0.3, 2)]  # fmt: skip
    assert "ranked.md" in {a.path for a in client.list_artifacts(parent.run_id)}


def test_comparison_links(monkeypatch):
    monkeypatch.setenv("RPG_DASHBOARD_URL", "http://127.0.0.1:8050")
    assert comparison_links("smoke", "http://127.0.0.1:5000") == [
        "dashboard http://127.0.0.1:8050/?sweep=smoke", "MLflow http://127.0.0.1:5000", "report: rpg report --sweep smoke"]
    view = "http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=rpg-sweep-smoke&workflowType=machine_learning"
    assert comparison_links("smoke", "http://127.0.0.1:5000", view)[1] == f"MLflow {view}"  # the sweep's saved view
    monkeypatch.delenv("RPG_DASHBOARD_URL")
    assert comparison_links("smoke", "sqlite:///x.db") == ["report: rpg report --sweep smoke"]
