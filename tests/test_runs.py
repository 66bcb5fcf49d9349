"""The read API (rpg_core.runs) against a real SQLite MLflow store written by the real Tracker, and once through a
real tracking server: which runs each filter finds, the exact rows and the exact histories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rpg_core import runs
from rpg_core.config import load_run_config
from rpg_core.runs import RunStatus, find_runs, get_run, get_runs, histories
from rpg_core.tracking import AXIS_TAGS, GPU_TAG, GROUP_TAG, HOST_TAG, RunKind, Tracker

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5

pytestmark = pytest.mark.integration


def _value(i: int, key: str, step: int) -> float:
    return {"reward/mean": i + step / 10, "loss": -step - i / 100}[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three training runs of two configs (seeds 0 and 1 of one; a sweep's children; tagged as the trainer tags them:
    the axes, the group, the machine and the device), one of them FAILED, a legacy
    training run (run_dir tag, no rpg.kind), the sweep's parent, an eval run in rpg-eval and a nightly."""
    tmp = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    cfgs = [base, base.with_overrides(["train.seed=1"]), base.with_overrides(["objective.beta=0.05"])]
    made: dict[str, Tracker] = {}

    def tracker(name: str, **kw) -> Tracker:
        time.sleep(0.003)  # distinct start times (ms): newest first is a defined order
        t = Tracker(run_name=name, tracking_uri=uri, **kw)
        made[name] = t
        return t

    sweep = tracker("sweep-demo", kind=RunKind.SWEEP, tags={"sweep": "demo"}, params={"runs": 2})
    for i, cfg in enumerate(cfgs):
        tags = {**cfg.axis_tags(), GROUP_TAG: cfg.key(), HOST_TAG: f"host-{i}", GPU_TAG: "cpu" if i else "cuda:0 H200",
                "run_dir": f"/runs/{cfg.run_key()}"}  # fmt: skip
        if i < 2:
            tags.update({"sweep": "demo", "mlflow.parentRunId": sweep.run_id})
        t = tracker(f"train-{i}", kind=RunKind.TRAIN, tags=tags, params={"config_key": cfg.key(), "optim.lr": 1e-6 * (i + 1)})
        for s in range(STEPS):
            t.log_metrics({k: _value(i, k, s) for k in ("reward/mean", "loss")}, step=s)
        t.log_metrics({"seed": 7.0}, step=0)  # a metric named like an axis column
        t.finish("FAILED" if i == 2 else "FINISHED")
    legacy = tracker("legacy", tags={"run_dir": "/runs/old", "config_key": "0123456789ab"})
    legacy.log_metrics({"reward/mean": 0.5}, step=3)
    legacy.finish()
    sweep.finish()
    ev = tracker("eval-tiny", experiment="rpg-eval", kind=RunKind.EVAL, tags={"rpg.model": "tiny"})
    ev.log_metrics({"eval/aime24/mean_at_4": 0.25})
    ev.finish()
    tracker("nightly", experiment="rpg-eval", kind=RunKind.NIGHTLY).finish()
    return uri, {n: t.run_id for n, t in made.items()}, cfgs


def test_find_runs_by_kind_experiment_sweep_key_group_status(store):
    uri, ids, cfgs = store
    train = find_runs(kind=RunKind.TRAIN, tracking_uri=uri)
    assert list(train["run_id"]) == [ids["legacy"], ids["train-2"], ids["train-1"], ids["train-0"]]  # newest first
    assert list(train["kind"]) == ["train"] * 4 and list(train["experiment"]) == ["rpg"] * 4
    assert list(train["status"]) == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    assert list(find_runs(kind="eval", tracking_uri=uri)["run_id"]) == [ids["eval-tiny"]]
    assert list(find_runs(kind=RunKind.SWEEP, tracking_uri=uri)["name"]) == ["sweep-demo"]
    assert len(find_runs(tracking_uri=uri)) == 7 and len(find_runs(experiments="rpg-eval", tracking_uri=uri)) == 2
    assert find_runs(experiments=["nope"], tracking_uri=uri).empty
    assert list(find_runs(sweep="demo", kind="train", tracking_uri=uri)["name"]) == ["train-1", "train-0"]
    assert list(find_runs(parent_run_id=ids["sweep-demo"], tracking_uri=uri)["name"]) == ["train-1", "train-0"]
    assert list(find_runs(config_key=cfgs[2].key(), tracking_uri=uri)["name"]) == ["train-2"]
    # the seeds of one configuration: one config key, one group; a seed picks one run of it
    assert cfgs[0].key() == cfgs[1].key() != cfgs[2].key() and cfgs[0].run_key() != cfgs[1].run_key()
    assert list(find_runs(config_key=cfgs[0].key(), tracking_uri=uri)["name"]) == ["train-1", "train-0"]
    assert list(find_runs(group=cfgs[0].key(), tracking_uri=uri)["name"]) == ["train-1", "train-0"]
    assert list(find_runs(group=cfgs[0].key(), seed=1, tracking_uri=uri)["name"]) == ["train-1"]
    assert list(find_runs(group=cfgs[0].key(), seed=0, tracking_uri=uri)["name"]) == ["train-0"]
    assert list(find_runs(seed=0, kind="train", tracking_uri=uri)["name"]) == ["train-2", "train-0"]
    assert find_runs(group=cfgs[0].key(), seed=2, tracking_uri=uri).empty
    assert find_runs(group=cfgs[0].run_key(), tracking_uri=uri).empty
    done = find_runs(kind="train", status=RunStatus.FINISHED, tracking_uri=uri)
    assert list(done["name"]) == ["legacy", "train-1", "train-0"]
    assert list(find_runs(kind="train", status=["FAILED", "KILLED"], tracking_uri=uri)["name"]) == ["train-2"]
    assert list(find_runs(kind="train", limit=2, tracking_uri=uri)["name"]) == ["legacy", "train-2"]
    assert list(find_runs(tags={"rpg.model": "tiny"}, tracking_uri=uri)["name"]) == ["eval-tiny"]
    assert list(find_runs(kind="train", tags={"sweep": None}, tracking_uri=uri)["name"]) == ["legacy", "train-2"]
    t1 = train.set_index("name").loc["train-1", "end_time"]
    assert list(find_runs(kind="train", ended_after=t1, tracking_uri=uri)["name"]) == ["legacy", "train-2"]
    assert list(find_runs(kind="train", ended_after=int(t1.timestamp() * 1000), tracking_uri=uri)["name"]) == [
        "legacy", "train-2"]  # fmt: skip


def test_rows_carry_the_design_axes_and_final_values(store):
    uri, ids, cfgs = store
    frame = find_runs(kind="train", params=["optim.lr"], tracking_uri=uri)
    fixed = [*runs.INFO_COLUMNS, *AXIS_TAGS, "optim.lr"]
    assert list(frame.columns) == [*fixed, "loss", "reward/mean", "metrics.seed"]  # by metric name
    train = frame.set_index("name")
    row = train.loc["train-2"]
    tags = cfgs[2].axis_tags()
    assert {a: row[a] for a in AXIS_TAGS} == tags and row["beta"] == "0.05" and row["method"] == "custom"
    assert (row["run_id"], row["run_dir"]) == (ids["train-2"], f"/runs/{cfgs[2].run_key()}")
    assert (row["group"], row["host"], row["gpu"]) == (cfgs[2].key(), "host-2", "cpu")
    assert (train.loc["train-0", "group"], train.loc["train-0", "gpu"]) == (cfgs[0].key(), "cuda:0 H200")
    assert train.loc["train-1", "group"] == train.loc["train-0", "group"] and train.loc["train-1", "host"] == "host-1"
    assert pd.isna(train.loc["legacy", "group"]) and pd.isna(train.loc["legacy", "host"])
    assert pd.isna(row["sweep"]) and pd.isna(row["parent_run_id"])  # not a sweep's run
    assert train.loc["train-0", "parent_run_id"] == ids["sweep-demo"] and train.loc["train-0", "seed"] == "0"
    assert train.loc["train-1", "seed"] == "1" and train.loc["train-1", "optim.lr"] == "2e-06"
    # final values: the value at the last step; a metric named like a column is metrics.<name>
    assert train.loc["train-1", "reward/mean"] == pytest.approx(1.4) and train.loc["train-2", "loss"] == -4.02
    assert train.loc["train-0", "metrics.seed"] == 7.0 and pd.isna(train.loc["legacy", "loss"])
    assert train.loc["legacy", "reward/mean"] == 0.5 and pd.isna(train.loc["legacy", "method"])
    assert str(train["start_time"].dtype) == "datetime64[ns, UTC]" or "UTC" in str(train["start_time"].dtype)
    assert (train["end_time"] >= train["start_time"]).all()
    one = get_run(ids["eval-tiny"], tracking_uri=uri)
    assert (one["kind"], one["experiment"], one["status"], one["eval/aime24/mean_at_4"]) == ("eval", "rpg-eval", "FINISHED", 0.25)
    assert get_run("0" * 32, tracking_uri=uri) is None
    both = get_runs([ids["nightly"], ids["train-0"], "f" * 32], tracking_uri=uri)
    assert list(both["name"]) == ["nightly", "train-0"] and list(both["kind"]) == ["nightly", "train"]


def test_bad_filters_name_the_argument(store):
    uri = store[0]
    with pytest.raises(ValueError, match=r"kind: 'training' is not allowed; allowed: \['train', 'eval'"):
        find_runs(kind="training", tracking_uri=uri)
    with pytest.raises(ValueError, match=r"status: 'DONE' is not allowed; allowed: \['RUNNING'"):
        find_runs(status="DONE", tracking_uri=uri)
    with pytest.raises(ValueError, match="sweep.*single quote"):
        find_runs(tags={"sweep": "it's"}, tracking_uri=uri)
    with pytest.raises(ValueError, match=r"seed: '1' must be an int"):
        find_runs(seed="1", tracking_uri=uri)


def test_histories_full_resolution_in_one_query_per_metric(store, monkeypatch):
    uri, ids, _ = store
    train = find_runs(kind="train", tracking_uri=uri)
    calls: list[int] = []
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def count(conn, cursor, statement, params, context, many):  # every SQL statement any engine runs
        if "FROM metrics" in statement and "run_uuid IN" in statement:
            calls.append(len(params) - 1 if isinstance(params, (tuple, list)) else -1)  # run ids bound, less the key

    event.listen(Engine, "before_cursor_execute", count)
    try:
        h = histories(train, ["reward/mean", "loss"], tracking_uri=uri)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert calls == [4, 4]  # one query per metric for all four runs
    assert list(h.columns) == list(runs.HISTORY_COLUMNS)
    expected = sorted(
        [(ids[f"train-{i}"], k, s, _value(i, k, s)) for i in range(3) for k in ("reward/mean", "loss") for s in range(STEPS)]
        + [(ids["legacy"], "reward/mean", 3, 0.5)]
    )
    assert [tuple(r) for r in h[["run_id", "key", "step", "value"]].itertuples(index=False)] == expected
    assert h["timestamp"].gt(1.7e12).all() and str(h["step"].dtype) == "int64"
    every = histories([ids["train-0"], ids["eval-tiny"]], tracking_uri=uri)  # keys=None: each run's own metrics
    assert sorted(set(zip(every["run_id"], every["key"]))) == sorted([
        (ids["train-0"], "loss"), (ids["train-0"], "reward/mean"), (ids["train-0"], "seed"),
        (ids["eval-tiny"], "eval/aime24/mean_at_4")])  # fmt: skip
    assert len(every) == 2 * STEPS + 2
    assert histories([], tracking_uri=uri).empty


@pytest.mark.server
@pytest.mark.subprocess
def test_histories_through_a_tracking_server_match_the_store(store, tmp_path, monkeypatch):
    """The same runs read over HTTP (the server's get-history-bulk endpoint): the same frames. With the per-answer
    cap lowered, answers count as cut: the runs are asked in halves, then one run page by page, still exact."""
    uri, ids, _ = store
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        http = f"http://127.0.0.1:{port}"
        wait_healthy(http, proc)
        local = histories(find_runs(kind="train", tracking_uri=uri), tracking_uri=uri)
        remote = histories(find_runs(kind="train", tracking_uri=http), tracking_uri=http)
        pd.testing.assert_frame_equal(remote, local)
        monkeypatch.setattr(runs, "_HTTP_MAX_ROWS", STEPS)  # every run's answer is "full"
        pd.testing.assert_frame_equal(histories(list(local["run_id"].unique()), tracking_uri=http), local)
        a = find_runs(tracking_uri=uri).drop(columns=["start_time", "end_time"])
        b = find_runs(tracking_uri=http).drop(columns=["start_time", "end_time"])
        pd.testing.assert_frame_equal(a, b)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)



def test_plot_reads_its_curves_through_the_read_api(tmp_path):
    from rpg_core.plots import plot_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(run_name="p", tracking_uri=uri, kind=RunKind.TRAIN, tags={"method": "grpo", "model": "tiny"})
    for s in (0, 2, 4):
        t.log_metrics({"eval/acc_strict": s / 8, "acc/sampled": 0.5}, step=s)
    t.finish()
    curves = plot_run(t.run_id, tmp_path / "p.png", tracking_uri=uri)
    assert curves == {"eval/acc_strict": [(0, 0.0), (2, 0.25), (4, 0.5)], "acc/sampled": [(0, 0.5), (2, 0.5), (4, 0.5)]}
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no MLflow run"):
        plot_run("0" * 32, tmp_path / "q.png", tracking_uri=uri)
