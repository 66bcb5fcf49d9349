"""rpg_core.tracking against real SQLite MLflow stores in tmp dirs (no mocks): what lands, resume, failures, limits."""

from __future__ import annotations

import enum
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpg_core import tracking
from rpg_core.tracking import Tracker, TrackingError, default_tracking_uri, ensure_experiment, flatten_params

pytestmark = pytest.mark.integration

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Color(enum.Enum):
    RED = "red"


class Level(str, enum.Enum):
    HARD = "hard"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs ~1.5-2.5 s); tests use their own runs in it."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{db}"
    ensure_experiment(uri, "rpg")
    return uri


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# -- flatten_params, default_tracking_uri: no store needed -------------------------------------------------------------


@pytest.mark.unit
def test_flatten_params_nested_dicts_lists_enums_none():
    cfg = {
        "model": {"name": "tiny", "dtype": None, "lora": {"r": 8, "alpha": 16.0}},
        "objective": {"form": Color.RED, "level": Level.HARD, "clip": True},
        "data": {"levels": [1, 2, 3], "names": ("a", "b"), "stops": [], "extra": {}},
        "evals": [{"name": "gsm", "n": 10}, {"name": "math", "n": 5}],
        "lr": 1e-6,
    }
    assert flatten_params(cfg) == {
        "model.name": "tiny",
        "model.dtype": "None",
        "model.lora.r": "8",
        "model.lora.alpha": "16.0",
        "objective.form": "red",
        "objective.level": "hard",
        "objective.clip": "True",
        "data.levels": "[1, 2, 3]",
        "data.names": '["a", "b"]',
        "data.stops": "[]",
        "data.extra": "{}",
        "evals.0.name": "gsm",
        "evals.0.n": "10",
        "evals.1.name": "math",
        "evals.1.n": "5",
        "lr": "1e-06",
    }
    assert flatten_params({"x": [Color.RED, None]}) == {"x": '["red", null]'}
    assert flatten_params({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}
    with pytest.raises(TypeError):
        flatten_params([1, 2])


@pytest.mark.unit
def test_flatten_params_truncates_past_mlflow_param_limit():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert tracking.MAX_PARAM_VALUE == MAX_PARAM_VAL_LENGTH == 6000  # the limit we rely on is MLflow's
    out = flatten_params({"prompt": "x" * 10_000, "ok": "y" * 6000})
    assert len(out["prompt"]) == 6000 and out["prompt"].endswith("...[truncated, 10000 chars]")
    assert out["ok"] == "y" * 6000


@pytest.mark.unit
def test_default_tracking_uri_env_and_rpg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("RPG_HOME", str(tmp_path / "home"))
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert (tmp_path / "home").is_dir()

    monkeypatch.delenv("RPG_HOME")
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / '.rpg' / 'mlflow.db'}" and uri.startswith("sqlite:////")
    assert not (tmp_path / ".rpg" / "mlflow.db").exists()  # only the directory; the DB comes with the first use


@pytest.mark.unit
def test_host_name_is_rpg_host_else_the_hostname(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "node-a.cluster")
    monkeypatch.setenv("RPG_HOST", " gpu-box-3 ")
    assert tracking.host_name() == "gpu-box-3"
    for unset in ("", "  "):
        monkeypatch.setenv("RPG_HOST", unset)
        assert tracking.host_name() == "node-a.cluster"
    monkeypatch.delenv("RPG_HOST")
    assert tracking.host_name() == "node-a.cluster"
    assert {tracking.GROUP_TAG, tracking.HOST_TAG, tracking.GPU_TAG} == {"rpg.group", "rpg.host", "rpg.gpu"}


@pytest.mark.unit
def test_disabled_tracker_is_a_noop_and_touches_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RPG_HOME", raising=False)
    (tmp_path / "f.txt").write_text("x")
    for uri in (None, f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"):
        t = Tracker(experiment="rpg", run_name="r", params={"a": "1"}, tags={"b": "2"}, tracking_uri=uri, enabled=False)
        assert t.run_id is None
        t.log_metrics({"bad:name": "not checked"}, step=1)
        t.log_text("x", "a.txt")
        t.log_table([{"a": 1}], "t.json")
        t.log_dict({"a": 1}, "c.yaml")
        t.log_artifact(tmp_path / "f.txt")
        t.set_tags({"c": "3"})
        t.flush()
        t.finish("FAILED")
        t.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


# -- one run: what lands ---------------------------------------------------------------------------------------------


def test_params_tags_metrics_land_and_read_back(store):
    params = flatten_params({"model": {"name": "tiny"}, "grid": {f"p{i}": i for i in range(250)}})  # > 100: chunked
    with Tracker(experiment="rpg", run_name="land", params=params, tags={"form": "reinforce"}, tracking_uri=store) as t:
        run_id = t.run_id
        assert isinstance(run_id, str) and len(run_id) == 32
        for step in (1, 2, 3):
            t.log_metrics({"reward/mean": 0.1 * step, "kl/k3": step, "loss total": -step}, step=step)
        t.log_metrics({f"wide/m{i}": i for i in range(1500)}, step=4)  # > 1000 metrics: split across log_batch calls
        t.log_metrics({"bad/nan": float("nan"), "bad/inf": float("inf")}, step=5)
        t.set_tags({"stopped": "no", "long": "z" * 9000})
        t.flush()
        client = MlflowClient(store)
        assert client.get_run(run_id).info.status == "RUNNING"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "land"
    assert run.data.params == params and len(run.data.params) == 251
    tags = run.data.tags
    assert tags["form"] == "reinforce" and tags["stopped"] == "no" and tags["mlflow.user"]
    assert len(tags["long"]) == 8000 and tags["long"].endswith("...[truncated, 9000 chars]")
    assert [s for s, _ in _history(client, run_id, "reward/mean")] == [1, 2, 3]
    assert [v for _, v in _history(client, run_id, "reward/mean")] == pytest.approx([0.1, 0.2, 0.3])
    assert _history(client, run_id, "loss total") == [(1, -1.0), (2, -2.0), (3, -3.0)]
    assert len(run.data.metrics) == 3 + 1500 + 2 and run.data.metrics["wide/m1499"] == 1499
    assert math.isnan(run.data.metrics["bad/nan"])  # NaN kept as NaN
    assert run.data.metrics["bad/inf"] == pytest.approx(1.7976931348623157e308)  # the SQL store clamps inf

    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "rpg" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert exp.artifact_location == (db_dir / "mlartifacts").as_uri()  # beside the DB, not ./mlruns of the cwd


def test_log_metrics_does_not_block_while_the_db_is_locked(store):
    t = Tracker(experiment="rpg", run_name="locked", tracking_uri=store)
    con = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # another process holding the write lock: every MLflow write now waits
    try:
        times = []
        for step in range(20):
            t0 = time.perf_counter()
            t.log_metrics({f"m{i}": i * step for i in range(30)}, step=step)
            times.append(time.perf_counter() - t0)
        assert sorted(times)[10] < 0.002  # a synchronous SQLite write alone takes ~7-15 ms
        with pytest.raises(TimeoutError):
            t.flush(timeout=0.3)
    finally:
        con.execute("COMMIT")
        con.close()
    t.finish()
    assert [s for s, _ in _history(MlflowClient(store), t.run_id, "m3")] == list(range(20))


def test_bad_metric_names_and_values_are_rejected_in_the_caller(store):
    t = Tracker(experiment="rpg", run_name="names", tracking_uri=store)
    for bad in ["acc:strict", "a//b", "/a", "a/", "./a", "..", "", "x" * 251, "reward!", "a\nb", "a\n"]:
        with pytest.raises(ValueError, match="invalid MLflow metric name"):
            t.log_metrics({bad: 1.0}, step=1)
    for bad_value in ["0.5", None, True]:
        with pytest.raises(TypeError, match="must be a number"):
            t.log_metrics({"ok": bad_value}, step=1)
    with pytest.raises(ValueError, match="invalid MLflow tag name"):
        t.set_tags({"a:b": "x"})
    with pytest.raises(ValueError, match="invalid MLflow param name"):
        Tracker(experiment="rpg", run_name="p", params={"a//b": 1}, tracking_uri=store)
    t.log_metrics({"reward/mean": 1, "a b-c_d.e": 2}, step=1)
    t.finish()
    assert set(MlflowClient(store).get_run(t.run_id).data.metrics) == {"reward/mean", "a b-c_d.e"}


def test_artifacts_table_dict_text_file_download_and_parse(store, tmp_path):
    import pandas as pd
    import yaml

    rows = [{"prompt": "1+1=", "completion": "2", "reward": 1.0}, {"prompt": "2+2=", "completion": "5", "reward": 0.0}]
    cfg = {"model": {"name": "tiny", "levels": [1, 2]}, "objective": {"form": Color.RED, "beta": 0.05}}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.json").write_text('{"step": 3}')
    t = Tracker(experiment="rpg", run_name="artifacts", tracking_uri=store)
    t.log_table(rows, "samples/step_0003.json")
    rows.append({"prompt": "mutated after the call"})  # log_table snapshots its rows
    t.log_dict(cfg, "config.yaml")
    t.log_dict(cfg, "config.json")
    t.log_text("step 3: ok\n", "samples/step_0003.txt")
    t.log_artifact(tmp_path / "ckpt" / "state.json", "checkpoint")
    t.log_artifact(tmp_path / "ckpt")
    t.log_table([{"prompt": "again", "completion": "x", "reward": 0.5}], "samples/step_0003.json")  # replaces
    t.log_table(rows[:1], "samples/step_0004.json")
    t.finish()

    client = MlflowClient(store)
    out = Path(client.download_artifacts(t.run_id, "", str(tmp_path / "dl")))
    # mlflow.log_table's format; dtype=False: pandas would otherwise turn the completion "2" into the number 2
    table = pd.read_json(out / "samples" / "step_0004.json", orient="split", dtype=False)
    assert table.to_dict("records") == rows[:1]
    assert json.loads((out / "samples" / "step_0004.json").read_text()) == {
        "columns": ["prompt", "completion", "reward"],
        "data": [["1+1=", "2", 1.0]],
    }
    assert pd.read_json(out / "samples" / "step_0003.json", orient="split")["prompt"].tolist() == ["again"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "model": {"name": "tiny", "levels": [1, 2]},
        "objective": {"form": "red", "beta": 0.05},
    }
    assert list(yaml.safe_load((out / "config.yaml").read_text())) == ["model", "objective"]  # key order kept
    assert json.loads((out / "config.json").read_text())["objective"]["beta"] == 0.05
    assert (out / "samples" / "step_0003.txt").read_text() == "step 3: ok\n"
    assert json.loads((out / "checkpoint" / "state.json").read_text()) == {"step": 3}
    assert (out / "state.json").exists()  # the directory's contents at the artifact root
    logged = json.loads(client.get_run(t.run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [
        {"path": "samples/step_0003.json", "type": "table"},
        {"path": "samples/step_0004.json", "type": "table"},
    ]
    # what mlflow.load_table / the UI use to find a run's tables
    found = client.search_runs(
        [client.get_run(t.run_id).info.experiment_id],
        "tags.mlflow.loggedArtifacts LIKE '%\"path\"%:%\"samples/step_0004.json\",%\"type\"%:%\"table\"%'",
    )
    assert [r.info.run_id for r in found] == [t.run_id]


def test_logged_artifacts_tag_stays_valid_json_under_the_tag_limit(store, monkeypatch):
    # MlflowClient.log_table breaks after ~150 tables: MLflow cuts this tag at 8000 chars, then cannot parse it.
    monkeypatch.setattr(tracking, "MAX_TAG_VALUE", 300)
    t = Tracker(experiment="rpg", run_name="many-tables", tracking_uri=store)
    for step in range(12):
        t.log_table([{"step": step}], f"samples/step_{step:04d}.json")
    t.finish()
    tag = MlflowClient(store).get_run(t.run_id).data.tags["mlflow.loggedArtifacts"]
    paths = [e["path"] for e in json.loads(tag)]
    assert len(tag) <= 300 and paths[-1] == "samples/step_0011.json"
    assert paths == [f"samples/step_{s:04d}.json" for s in range(12 - len(paths), 12)]  # the newest, in order


# -- resume, finish ----------------------------------------------------------------------------------------------------


def test_reattach_continues_the_same_run(store):
    params = flatten_params({"objective": {"form": "reinforce"}, "train": {"steps": 10}})
    t = Tracker(experiment="rpg", run_name="resume-me", params=params, tracking_uri=store)
    run_id = t.run_id
    for step in (1, 2, 3):
        t.log_metrics({"reward/mean": step}, step=step)
    t.finish("KILLED")  # e.g. preempted
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "KILLED"

    t2 = Tracker(
        experiment="rpg",
        run_name="resume-me",
        run_id=run_id,
        params={**params, "resume.from": "step 3"},  # same values again, plus a new param
        tags={"form": "reinforce"},
        tracking_uri=store,
    )
    assert t2.run_id == run_id and t2.resumed
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in (4, 5):
        t2.log_metrics({"reward/mean": step}, step=step)
    t2.finish()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**params, "resume.from": "step 3"}
    assert run.data.tags["rpg.resumes"] == "1" and run.data.tags["form"] == "reinforce"
    assert _history(client, run_id, "reward/mean") == [(s, float(s)) for s in range(1, 6)]
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'resume-me'")) == 1


def test_resume_with_a_changed_param_names_it(store):
    params = {"objective.beta": "0.05", "seed": "1"}
    t = Tracker(experiment="rpg", run_name="conflict", params=params, tracking_uri=store)
    t.finish("FAILED")
    with pytest.raises(ValueError, match=r"'objective\.beta': logged '0\.05', now '0\.1'") as e:
        Tracker(experiment="rpg", run_id=t.run_id, params={"objective.beta": 0.1, "seed": 1}, tracking_uri=store)
    assert "seed" not in str(e.value)
    run = MlflowClient(store).get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.params["objective.beta"] == "0.05"  # untouched
    with pytest.raises(TrackingError, match="not found"):
        Tracker(experiment="rpg", run_id="0" * 32, tracking_uri=store)


def test_resume_keeps_changed_bookkeeping_params_and_records_them(store):
    """A run resumed under another sweep (new parent run) or with a new time limit: bookkeeping params may change.
    The logged values stay (MLflow params are immutable), the new ones are recorded in a tag, and twice-changed
    params keep their first logged value; a computation param still may not change."""
    from rpg_core.config import RunConfig

    assert RunConfig.is_bookkeeping("tracking.parent_run_id") and RunConfig.is_bookkeeping("train.max_minutes")
    assert RunConfig.is_bookkeeping("tracking.tags.sweep") and RunConfig.is_bookkeeping("preset")
    assert not RunConfig.is_bookkeeping("train.steps") and not RunConfig.is_bookkeeping("objective.beta")
    params = {"objective.beta": "0.05", "tracking.parent_run_id": "p1", "train.max_minutes": "None"}
    t = Tracker(experiment="rpg", run_name="moved", params=params, tracking_uri=store)
    t.finish("FAILED")
    kw = dict(experiment="rpg", run_id=t.run_id, tracking_uri=store, mutable=RunConfig.is_bookkeeping)
    Tracker(params={**params, "tracking.parent_run_id": "p2"}, **kw).finish("FAILED")
    Tracker(params={**params, "tracking.parent_run_id": "p3", "train.max_minutes": "30"}, **kw).finish("FINISHED")
    run = MlflowClient(store).get_run(t.run_id)
    assert run.data.params == params
    assert json.loads(run.data.tags["rpg.changed_on_resume"]) == {"tracking.parent_run_id": ["p1", "p3"],
                                                                   "train.max_minutes": ["None", "30"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"'objective\.beta': logged '0\.05', now '0\.1'"):
        Tracker(params={**params, "objective.beta": "0.1"}, **kw)


def test_finish_failed_is_final_and_idempotent(store):
    t = Tracker(experiment="rpg", run_name="fails", tracking_uri=store)
    t.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(ValueError, match="status"):
        t.finish("DONE")
    t.finish("FAILED")
    t.finish("FINISHED")  # no-op
    t.flush()  # no-op after finish
    run = MlflowClient(store).get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"loss": 1.0}  # queued data written before ending
    with pytest.raises(TrackingError, match="finished"):
        t.log_metrics({"loss": 2.0}, step=2)


def test_context_manager_marks_an_exception_failed(store):
    with pytest.raises(RuntimeError), Tracker(experiment="rpg", run_name="ctx", tracking_uri=store) as t:
        raise RuntimeError("boom")
    assert MlflowClient(store).get_run(t.run_id).info.status == "FAILED"


# -- stores, experiments, failures -------------------------------------------------------------------------------------


def test_two_trackers_to_two_stores_do_not_mix(store, tmp_path):
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    a = Tracker(experiment="rpg", run_name="in-a", tracking_uri=store)
    b = Tracker(experiment="rpg", run_name="in-b", tracking_uri=other)
    for step in range(5):
        a.log_metrics({"only/a": step}, step=step)
        b.log_metrics({"only/b": -step}, step=step)
    b.log_text("b", "b.txt")
    a.finish()
    b.finish()
    ca, cb = MlflowClient(store), MlflowClient(other)
    ra, rb = ca.get_run(a.run_id), cb.get_run(b.run_id)
    assert set(ra.data.metrics) == {"only/a"} and set(rb.data.metrics) == {"only/b"}
    for client, foreign in ((ca, b.run_id), (cb, a.run_id)):
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_run(foreign)
    assert [r.info.run_name for r in cb.search_runs([rb.info.experiment_id])] == ["in-b"]
    assert rb.info.artifact_uri.startswith((tmp_path / "other" / "mlartifacts").as_uri())
    assert ca.list_artifacts(a.run_id) == []


def test_ensure_experiment_idempotent_tags_existing_refuses_deleted(store):
    assert ensure_experiment(store, "rpg") == ensure_experiment(store, "rpg")
    client = MlflowClient(store)
    plain = client.create_experiment("made-elsewhere")  # without the UI-kind tag
    assert ensure_experiment(store, "made-elsewhere") == plain
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    gone = client.create_experiment("deleted-one")
    client.delete_experiment(gone)
    with pytest.raises(TrackingError, match="deleted"):
        ensure_experiment(store, "deleted-one")


def test_background_failure_surfaces_on_the_next_call(tmp_path):
    db = tmp_path / "doomed" / "mlflow.db"
    uri = f"sqlite:///{db}"
    t = Tracker(experiment="rpg", run_name="doomed", tracking_uri=uri)
    t.log_metrics({"a": 1.0}, step=1)
    t.flush()
    db.unlink()  # the DB disappears under a running job: SQLite then refuses writes ("readonly database")
    t.log_metrics({"a": 2.0}, step=2)  # queued fine; the writer fails in the background
    with pytest.raises(TrackingError, match="background writer") as e:
        t.flush()
    assert "readonly database" in str(e.value.__cause__)
    with pytest.raises(TrackingError):  # and keeps failing: nothing is logged after a failure
        t.log_metrics({"a": 3.0}, step=3)
    t.finish("FAILED")  # already reported: does not raise again (so it cannot mask a caller's exception)

    # A failure no call has reported yet is raised by finish(): here the run is deleted by another client.
    uri2 = f"sqlite:///{tmp_path / 'ok' / 'mlflow.db'}"
    t2 = Tracker(experiment="rpg", run_name="deleted-under-us", tracking_uri=uri2)
    MlflowClient(uri2).delete_run(t2.run_id)
    t2.log_metrics({"a": 1.0}, step=1)
    with pytest.raises(TrackingError, match="background writer") as e:
        t2.finish()
    assert "must be in the 'active' state" in str(e.value.__cause__)


@pytest.mark.system
@pytest.mark.subprocess
@pytest.mark.slow
def test_processes_racing_on_a_fresh_db_all_succeed(tmp_path):
    # Without the lock in ensure_experiment, 3 of 4 processes die in MLflow's first-use migration (stack.md §3a).
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = (
        "import sys; from rpg_core.tracking import Tracker\n"
        "t = Tracker(experiment='rpg', run_name='p' + sys.argv[1], tracking_uri=sys.argv[2])\n"
        "[t.log_metrics({'x': s}, step=s) for s in range(10)]\nt.finish()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i), uri], env=env, stderr=subprocess.PIPE) for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode()[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rpg").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["p0", "p1", "p2", "p3"]
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"x": 9.0} for r in runs)


def test_a_tracking_uri_nothing_can_log_to_is_refused_at_once(tmp_path):
    """check_tracking_uri: an unknown scheme, a port nobody listens on (at once), a listener that never answers (three
    tries of ``timeout`` seconds: a busy server is not taken for a dead one; not MLflow's minutes of retries), each
    one line naming the URI; a local store and a real server pass."""
    import socket

    from servers import free_port, mlflow_server

    with pytest.raises(ValueError, match=r"tracking URI 'foo://bar': scheme 'foo' is not allowed; allowed: sqlite://"):
        tracking.check_tracking_uri("foo://bar")
    port = free_port()
    with pytest.raises(ValueError, match=rf"'http://127.0.0.1:{port}': no MLflow server answers \(.*refused\); start"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{port}")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"no MLflow server answers \(no answer within 0.5 s, 3 times\)"):
            tracking.check_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - t0 < 10
    for ok in (f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "mlruns"), "postgresql+psycopg://u@127.0.0.1/x"):
        tracking.check_tracking_uri(ok)  # no I/O for these: the store is opened (and checked) by the run
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(uri, tmp_path) as url:
        tracking.check_tracking_uri(url)


def test_rpg_train_refuses_a_dead_tracking_server_before_loading_anything(tmp_path):
    from servers import free_port

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "train", "--model", "tiny", "--set",
                        f"train.output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no MLflow server answers" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())  # nothing written
