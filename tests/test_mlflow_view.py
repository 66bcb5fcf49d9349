"""rpg_core.mlflow_view: the saved MLflow UI views of the training runs. The state written (filter, columns, sort,
charts, keys), idempotence, the experiment-wide view a sweep's view writes too; and in a real browser (system Chromium) on
a real ``mlflow server``: a sweep's view opens on the runs table with the axis and metric columns, without the sweep's
parent run, asking no host but this machine."""

from __future__ import annotations

import json
import re

import pytest

from browser import chromium  # noqa: F401  (the fixture)
from rpg_core import mlflow_view as mv
from rpg_core.tracking import ensure_experiment


def _tag(uri: str, exp_id: str, key: str) -> dict:
    from mlflow.tracking import MlflowClient

    return json.loads(MlflowClient(tracking_uri=uri).get_experiment(exp_id).tags[mv.VIEW_TAG_PREFIX + key])


@pytest.mark.unit
def test_state_of_a_sweep_view_filters_training_runs_of_the_sweep():
    s = mv.view_state(sweep="kl-v1", axes=("direction", "estimator"), key="rpg-sweep-kl-v1")
    assert s["searchFilter"] == "tags.`rpg.kind` = 'train' and tags.`sweep` = 'kl-v1'"
    assert s["selectedColumns"] == [
        "tags.`design`", "tags.`direction`", "tags.`estimator`",
        *(f"metrics.`{m}`" for m in mv.DEFAULT_METRICS),
    ]  # fmt: skip
    assert (s["orderByKey"], s["orderByAsc"]) == ("metrics.`eval/acc_strict`", False)
    # left to right: the run's name in full, what it is, how it did, the axes (the UI's own order: metrics, then tags)
    assert s["columnOrder"] == ["1", "attributes.`Run Name`", "tags.`design`", *(f"metrics.`{m}`" for m in mv.DEFAULT_METRICS),
                                "tags.`direction`", "tags.`estimator`", "runDateAndNestInfo", "duration"]  # fmt: skip
    assert s["columnWidths"] == {"attributes.`Run Name`": 320, "tags.`design`": 210}
    assert (s["startTime"], s["lifecycleFilter"], s["modelVersionFilter"], s["datasetsFilter"]) == (
        "ALL", "Active", "All Runs", [])  # fmt: skip
    # the headline charts first, in their own section, in order; the sections kept in the order written
    assert s["isAccordionReordered"] is True
    sections = [sec["name"] for sec in s["compareRunSections"]]
    assert sections[0] == "headline" and sections[-2:] == ["Model metrics", "System metrics"]
    assert sections[1:-2] == sorted(sections[1:-2]) and "eval" in sections and "actor" in sections
    head = s["compareRunSections"][0]["uuid"]
    charts = s["compareRunCharts"]
    assert [c["metricKey"] for c in charts] == list(mv.DEFAULT_METRICS)
    assert all(c["type"] == "LINE" and c["metricSectionId"] == head and c["displayName"] == c["metricKey"]
               for c in charts)  # fmt: skip
    assert len({c["uuid"] for c in charts} | {sec["uuid"] for sec in s["compareRunSections"]}) == len(charts) + len(
        sections)
    # not carried by the UI: never written
    assert not {"runsHidden", "runsPinned", "runsExpanded"} & set(s)


@pytest.mark.unit
def test_state_defaults_sort_by_mean_at_k_and_quote_names():
    s = mv.view_state()
    assert s["searchFilter"] == "tags.`rpg.kind` = 'train'"
    assert s["selectedColumns"][: len(mv.DEFAULT_AXES) + 1] == [f"tags.`{a}`" for a in ("design", *mv.DEFAULT_AXES)]
    s = mv.view_state(sweep="it's", metrics=("reward/mean", "eval/gsm8k/mean_at_4", "eval/acc_strict"))
    assert s["searchFilter"].endswith("tags.`sweep` = 'it\\'s'")
    assert s["orderByKey"] == "metrics.`eval/gsm8k/mean_at_4`"
    assert s["selectedColumns"][-3:] == ["metrics.`reward/mean`", "metrics.`eval/gsm8k/mean_at_4`",
                                         "metrics.`eval/acc_strict`"]  # fmt: skip
    with pytest.raises(ValueError, match="bad column"):
        mv.view_state(axes=("a`b",))
    assert mv.sweep_view_key("kl v1/x") == "rpg-sweep-kl-v1-x"


@pytest.mark.integration
def test_runs_view_writes_once_and_keeps_its_key(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    frag = mv.runs_view(uri, "exp", sweep="s1", axes=("direction",))
    exp_id = ensure_experiment(uri, "exp")
    assert frag == f"#/experiments/{exp_id}/runs?viewStateShareKey=rpg-sweep-s1&workflowType=machine_learning"
    env = _tag(uri, exp_id, "rpg-sweep-s1")
    assert env["name"] == "rpg: sweep s1" and isinstance(env["createdAt"], int)
    assert json.loads(env["state"]) == mv.view_state(sweep="s1", axes=("direction",), key="rpg-sweep-s1")
    writes = []
    real = MlflowClient.set_experiment_tag
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", lambda self, *a: (writes.append(a), real(self, *a)))
    assert mv.runs_view(uri, "exp", sweep="s1", axes=("direction",)) == frag
    assert writes == []  # unchanged: not rewritten
    mv.runs_view(uri, "exp", sweep="s1", axes=("direction", "beta"))
    assert [w[1] for w in writes] == [mv.VIEW_TAG_PREFIX + "rpg-sweep-s1"]
    again = _tag(uri, exp_id, "rpg-sweep-s1")
    assert again["createdAt"] == env["createdAt"] and "tags.`beta`" in json.loads(again["state"])["selectedColumns"]


@pytest.mark.integration
def test_a_sweep_view_writes_the_experiment_wide_view_too(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = ensure_experiment(uri, "rpg")  # the writer tags the kind only: views are rpg_core.mlflow_view's
    assert MlflowClient(tracking_uri=uri).get_experiment(exp_id).tags == {
        "mlflow.experimentKind": "custom_model_development"}  # fmt: skip
    mv.runs_view(uri, "rpg", sweep="s1")
    env = _tag(uri, exp_id, mv.EXPERIMENT_VIEW_KEY)
    assert env["name"] == "rpg: training runs"
    assert json.loads(env["state"]) == mv.view_state(key=mv.EXPERIMENT_VIEW_KEY)
    writes = []
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", lambda self, *a: writes.append(a))
    mv.runs_view(uri, "rpg", sweep="s2")
    assert [w[1] for w in writes] == [mv.VIEW_TAG_PREFIX + "rpg-sweep-s2"]  # the unchanged wide view: no write
    # an experiment made elsewhere (no tags) gets the kind tag from ensure_experiment, its view from runs_view
    other = MlflowClient(tracking_uri=uri).create_experiment("made-elsewhere")
    monkeypatch.undo()
    assert mv.runs_view(uri, "made-elsewhere").startswith(f"#/experiments/{other}/runs?viewStateShareKey=rpg-training")
    tags = MlflowClient(tracking_uri=uri).get_experiment(other).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert mv.VIEW_TAG_PREFIX + mv.EXPERIMENT_VIEW_KEY in tags


@pytest.mark.unit
def test_ui_url(monkeypatch):
    monkeypatch.delenv("RPG_MLFLOW_URL", raising=False)
    assert mv.ui_url("#/experiments/1/runs") is None
    assert mv.ui_url("#/x", "http://h:5000/") == "http://h:5000/#/x"
    monkeypatch.setenv("RPG_MLFLOW_URL", "http://127.0.0.1:5000")
    assert mv.ui_url("#/x") == "http://127.0.0.1:5000/#/x"


# -- in a real browser ------------------------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.server
@pytest.mark.subprocess
def test_sweep_view_in_the_browser(chromium, tmp_path_factory, tmp_path):  # noqa: F811
    from dashboard_store import SWEEP, shared_store
    from servers import mlflow_server

    from rpg_core.runs import find_runs

    uri, ids, _ = shared_store(tmp_path_factory)
    experiment = find_runs(kind="sweep", tracking_uri=uri)["experiment"].iloc[0]
    parent = find_runs(kind="sweep", tracking_uri=uri)["name"].iloc[0]
    children = set(find_runs(kind="train", sweep=SWEEP, tracking_uri=uri)["name"])
    since = len(chromium.requests)
    with mlflow_server(uri, tmp_path) as url:
        frag = mv.runs_view(url, experiment, sweep=SWEEP, axes=("direction", "seed"))
        page = chromium.page()
        page.goto(mv.ui_url(frag, url))
        page.get_by_text(f"rpg: sweep {SWEEP}").first.wait_for(timeout=60_000)  # the view's name in "Views"
        close = page.get_by_label("Close", exact=True)  # the assistant panel opens on a first visit: room for columns
        if close.count():
            close.first.click()
        page.locator("[role=row]", has_text=sorted(children)[0]).first.wait_for(timeout=30_000)
        chromium.screenshot(page, "sweep-view-table", full_page=False)
        # the columns on screen, left to right: the run name in full, the method and the axes, then the metrics
        cells = page.eval_on_selector_all("[role=columnheader][col-id]", """hs => hs.map(h => [h.getAttribute('col-id'),
            h.getBoundingClientRect().x, h.getBoundingClientRect().width])""")  # fmt: skip
        x = {c: (left, w) for c, left, w in cells if w > 0}
        on_screen = [c for c, (left, w) in sorted(x.items(), key=lambda kv: kv[1][0]) if left + w <= 1400]
        wanted = ["attributes.`Run Name`", "tags.`design`", "tags.`seed`",
                  *(f"metrics.`{m}`" for m in mv.DEFAULT_METRICS[:3])]  # fmt: skip
        assert [c for c in on_screen if c in wanted] == wanted, on_screen
        assert (x["attributes.`Run Name`"][1], x["tags.`design`"][1]) == (mv.RUN_NAME_WIDTH, mv.DESIGN_WIDTH)
        page.locator(".ag-body-horizontal-scroll-viewport").first.evaluate("e => { e.scrollLeft = e.scrollWidth }")
        page.locator("[role=columnheader][col-id='tags.`direction`']").first.wait_for()  # the axes: a scroll away
        body = page.inner_text("body")
        assert "/runs?" in page.url and "Overview" not in body  # the training runs page, not the GenAI overview
        assert f"{len(children)} matching runs" in body
        shown = {n for n in children | {parent} if page.get_by_role("link", name=n, exact=True).count()}
        assert shown == children  # every training run of the sweep, not its parent
        # the charts: the headline section first, without the parent ("Unassigned") line
        page.goto(mv.ui_url(frag, url) + "&compareRunsMode=CHART")
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # a chart drawn, not a spinner
        page.wait_for_timeout(1000)
        chromium.screenshot(page, "sweep-view-charts", full_page=False)
        text = page.inner_text("body")
        at = [re.search(rf"(^|\n){name}\s*\((\d+)\)", text) for name in ("headline", "eval", "Model metrics")]
        assert all(at) and at[0].group(2) == str(len(mv.DEFAULT_METRICS)), text
        assert at[0].start() < at[1].start() < at[2].start()  # the sections' order: headline first
        assert "Unassigned" not in text and parent not in text
        # the experiment-wide view opens on the runs table too
        page.goto(mv.ui_url(mv.runs_view(url, experiment), url))
        page.get_by_text("rpg: training runs").first.wait_for(timeout=30_000)
        chromium.screenshot(page, "experiment-view", full_page=False)
        assert f"{len(children)} matching runs" in page.inner_text("body")
    chromium.assert_local(since)
