"""Saved views of the MLflow UI (3.17) that open on what a training comparison needs: the training runs of an
experiment or of one sweep, with the design axes and the headline metrics as columns, sorted by the headline metric,
the headline metrics charted first.

    from rpg_core.mlflow_view import runs_view, ui_url

    fragment = runs_view(uri, "rpg", sweep="kl-v1", axes=("direction", "estimator"))
    print(ui_url(fragment) or fragment)   # http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=...

How the UI stores a view (read in its JS bundle and checked in headless Chromium by pressing its own "Views > Save as
new view"): the experiment tag ``mlflow.sharedViewState.<key>`` holds an envelope
``{"name", "createdAt" (epoch ms), "updatedAt", "state"}`` whose ``state`` is a JSON string (the UI writes it
deflated as ``deflate;<base64>``; it reads plain JSON too). The state is the search facets (``searchFilter,
orderByKey, orderByAsc, startTime, lifecycleFilter, modelVersionFilter, datasetsFilter``) and the UI state
(``selectedColumns``, ``compareRunCharts``, ``compareRunSections``, ...). A view with an envelope is listed by name in
the runs page's "Views" menu; ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens it. Facts that shape the
state written here:

* **Mode.** MLflow 3.17's UI ignores the experiment tag ``mlflow.experimentKind`` for navigation: the sidebar's
  GenAI / Model training switch decides (URL parameter ``workflowType``, else the browser's localStorage, else
  GenAI), and ``#/experiments/<id>`` in GenAI mode opens the GenAI traces overview. The links made here therefore
  carry ``workflowType=machine_learning`` (it is not a search facet, so the view still applies).
* **The filter lives in the view.** A URL with any search facet parameter ignores the saved state. The filter is
  ``tags.`rpg.kind` = 'train'`` (and ``tags.`sweep` = '<name>'``): a sweep's parent run (``rpg.kind=sweep``) is not
  listed and draws no "Unassigned" line in the charts. Sorting by a metric, not by start time, also keeps the UI from
  fetching the parents of listed runs (it does so only for the default sort or no filter).
* **Columns** are keys ``tags.`<name>```, ``metrics.`<name>``` and ``attributes.`<name>```. Left alone, the UI
  shows them grouped by type, metrics (alphabetically) before tags, and cuts the run name at 190 px; the view's
  ``columnOrder`` and ``columnWidths`` (keyed by the grid's column ids) put the run name in full, then the design
  (``RunConfig.design_name``: the preset, else form-KL-clip) and the seed, the metrics in the order given, then the
  other axes (the grid renders only the columns in sight: at 1400 px the headline metrics are, the axes after
  them a scroll away).
* **Charts.** The UI adds a chart for every metric the listed runs have, each in the section named by its prefix
  (``eval/acc_strict`` in ``eval``); with ``isAccordionReordered`` false it sorts the sections alphabetically, so
  a "headline" section could not stay first. Here the sections are written in order (``isAccordionReordered``
  true): the headline metrics first (full names as titles), then the schema's sections (rpg_core.metrics)
  alphabetically, then "Model metrics" and "System metrics"; a section the schema does not name (a benchmark's
  ``eval/<bench>``) is appended by the UI.

Writing is idempotent: an unchanged view is not rewritten (one experiment read), a changed one keeps its key and
``createdAt``. Runs hidden, pinned or expanded are not part of a view (the UI does not carry them).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_AXES",
    "DEFAULT_METRICS",
    "EXPERIMENT_VIEW_KEY",
    "VIEW_TAG_PREFIX",
    "experiment_view_tag",
    "run_fragment",
    "runs_view",
    "sweep_view_key",
    "ui_url",
    "view_fragment",
    "view_state",
]

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_VIEW_KEY = "rpg-training"  # the experiment-wide view of the training runs (runs_view writes it)
DEFAULT_AXES = ("divergence", "estimator", "clip", "beta", "seed")
# The headline metrics: held-out accuracy first (the sort key unless a benchmark's Mean@k is given), the reward, the
# KL to the reference (k3 estimate) and the policy's entropy.
DEFAULT_METRICS = ("eval/acc_strict", "reward/mean", "actor/kl_k3", "actor/entropy")
# The runs table's grid column ids (ag-grid colId, read in the UI's DOM): the row checkbox, the run name, "Created"
# and "Duration". The UI groups columns by type (metrics, params, tags) unless the view sets columnOrder.
CHECKBOX_COLUMN, RUN_NAME_COLUMN = "1", "attributes.`Run Name`"
TRAILING_COLUMNS = ("runDateAndNestInfo", "duration")
RUN_NAME_WIDTH = 320  # px: a name like kl_design/rpg_reinforce-FKL-k3-dual-s0 in full (the UI's default is 190)
DESIGN_WIDTH = 210  # px: a design like rpg_reinforce-URKL-dual or penalty-k3-reverse-noclip (the UI's default is 100)
ML_MODE = "workflowType=machine_learning"  # the UI's "Model training" mode (see the module docstring)
HEADLINE_SECTION = "headline"
_MEAN_AT_K = re.compile(r"eval/[^/]+/mean_at_\d+\Z")


def sweep_view_key(sweep: str) -> str:
    """The view key of sweep ``sweep``: ``rpg-sweep-<name>`` (characters outside letters, digits, ``_ . -`` become
    ``-``, so the key stays a plain URL parameter and tag name)."""
    return "rpg-sweep-" + re.sub(r"[^\w.\-]", "-", sweep)


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _headline(metrics: Sequence[str]) -> str:
    """The sort key: the first Mean@k (the paper's headline) among ``metrics``, else the first metric."""
    return next((m for m in metrics if _MEAN_AT_K.match(m)), metrics[0])


def _section_name(metric: str) -> str:
    """The chart section the UI files ``metric`` under: its name up to the last ``/``; none: "Model metrics"."""
    head = metric.rsplit("/", 1)[0] if "/" in metric else ""
    return "Model metrics" if not head else ("System metrics" if head == "system" else head)


def _schema_sections() -> list[str]:
    """The sections the metric schema's fixed names fall in (templates with a ``{bench}`` left to the UI)."""
    from rpg_core.metrics import SCHEMA

    return sorted({_section_name(m.name) for m in SCHEMA if "{" not in m.name} - {"Model metrics", "System metrics"})


def view_state(*, sweep: str | None = None, axes: Sequence[str] = (), metrics: Sequence[str] = (),
               key: str = EXPERIMENT_VIEW_KEY) -> dict[str, Any]:  # fmt: skip
    """The UI state of a training-runs view (what ``runs_view`` writes, before encoding): pure, no I/O.

    ``axes``: design-axis tags shown after ``design`` (default ``DEFAULT_AXES``); ``metrics``: metric columns and
    headline charts (default ``DEFAULT_METRICS``), sorted by the first Mean@k among them, else the first. Chart and
    section ids derive from ``key``, so the same arguments give the same state."""
    axes = list(dict.fromkeys(["design", *(axes or DEFAULT_AXES)]))  # design: the preset, else form-KL-clip
    metrics = list(dict.fromkeys(metrics or DEFAULT_METRICS))
    for name in (*axes, *metrics):
        if not isinstance(name, str) or not name or "`" in name:
            raise ValueError(f"view_state: bad column name {name!r}")
    where = [f"tags.`rpg.kind` = {_quote('train')}"]
    if sweep is not None:
        if not str(sweep).strip():
            raise ValueError("view_state: sweep must be a non-empty name")
        where.append(f"tags.`sweep` = {_quote(sweep)}")
    sort = _headline(metrics)
    columns = [*(f"tags.`{a}`" for a in axes), *(f"metrics.`{m}`" for m in metrics)]
    # the table reads left to right: the run's name in full, what it is (its design: the preset, else form-KL-clip,
    # which says most axes), its seed, how it did, then the axes one by one
    first = [f"tags.`{a}`" for a in axes if a in ("design", "seed")]
    order = [CHECKBOX_COLUMN, RUN_NAME_COLUMN, *first, *(f"metrics.`{m}`" for m in metrics),
             *(c for c in columns if c not in first and c.startswith("tags.")), *TRAILING_COLUMNS]  # fmt: skip
    sections = [HEADLINE_SECTION, *_schema_sections(), "Model metrics", "System metrics"]
    sec_id = {name: f"{key}-section-{i}" for i, name in enumerate(sections)}
    charts = [
        {"uuid": f"{key}-chart-{i}", "type": "LINE", "runsCountToCompare": 10, "metricSectionId": sec_id[HEADLINE_SECTION],
         "deleted": False, "isGenerated": False, "metricKey": m, "selectedMetricKeys": [m], "displayName": m,
         "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "xAxisKey": "step",
         "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
         "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True,
         "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}}
        for i, m in enumerate(metrics)
    ]  # fmt: skip
    return {
        "searchFilter": " and ".join(where),
        "orderByKey": f"metrics.`{sort}`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": order,
        "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH, "tags.`design`": DESIGN_WIDTH},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [
            {"uuid": sec_id[name], "name": name, "display": True, "isReordered": name == HEADLINE_SECTION,
             "deleted": False, "isGenerated": name != HEADLINE_SECTION}
            for name in sections
        ],  # fmt: skip
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": True,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "chartsSearchFilter": "",
    }


def _view_name(sweep: str | None) -> str:
    return f"rpg: sweep {sweep}" if sweep is not None else "rpg: training runs"


def _envelope(name: str, state: Mapping[str, Any], existing: str | None, now_ms: int | None = None) -> str | None:
    """The tag value for a view ``name`` with ``state``; None when ``existing`` already says the same (then nothing
    is written). A rewritten view keeps the ``createdAt`` of ``existing``."""
    created = None
    if existing:
        try:
            old = json.loads(existing)
            if old.get("name") == name and json.loads(old.get("state", "")) == state:
                return None
            created = old.get("createdAt") if isinstance(old.get("createdAt"), int) else None
        except (ValueError, TypeError, AttributeError):
            pass  # not ours, or the UI's deflated form: rewrite
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": name, "createdAt": created or now, "updatedAt": now,
                       "state": json.dumps(state, separators=(",", ":"))}, separators=(",", ":"))  # fmt: skip


def experiment_view_tag(existing_tags: Mapping[str, str]) -> tuple[str, str] | None:
    """``(tag key, value)`` of the experiment-wide training-runs view to write on an experiment whose tags are
    ``existing_tags``; None if it is already there and unchanged (then nothing is written)."""
    tag = VIEW_TAG_PREFIX + EXPERIMENT_VIEW_KEY
    value = _envelope(_view_name(None), view_state(key=EXPERIMENT_VIEW_KEY), existing_tags.get(tag))
    return None if value is None else (tag, value)


def run_fragment(experiment_id: str, run_id: str) -> str:
    """``#/experiments/<id>/runs/<run id>?workflowType=machine_learning``: a run's page in the "Model training" mode
    (the short route ``#/runs/<run id>`` redirects there but drops the mode: the page opens as a GenAI evaluation)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"


def view_fragment(experiment_id: str, key: str) -> str:
    """``#/experiments/<id>/runs?viewStateShareKey=<key>&workflowType=machine_learning``: the UI route of a view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{ML_MODE}"


def runs_view(tracking_uri: str | None, experiment: str, *, sweep: str | None = None, axes: Sequence[str] = (),
              metrics: Sequence[str] = ()) -> str:  # fmt: skip
    """Write (idempotently) the saved view of the training runs of ``experiment`` (of one ``sweep`` if given) and
    return its URL fragment; ``ui_url(fragment)`` makes it a link.

    The view lists only training runs (``tags.rpg.kind = 'train'``, and ``tags.sweep = '<sweep>'``: the sweep's
    parent run stays out of the table and the charts), shows the ``design`` tag, the ``axes`` tags (default
    ``DEFAULT_AXES``) and the ``metrics`` (default ``DEFAULT_METRICS`` plus every benchmark Mean@k
    ``eval/<bench>/mean_at_<k>`` already logged by the sweep's runs), is sorted by the first Mean@k among them, else
    the first metric, best first, and charts them first. Key: ``rpg-sweep-<sweep>`` (``sweep_view_key``), or
    ``rpg-training`` without a sweep (a sweep's view writes that one too, so the "Views" menu always lists it).
    Creates the experiment if missing.
    Listed by name ("rpg: sweep <name>") in the UI's "Views" menu.

    Example, in a sweep flow whose grid varies ``objective.direction`` and ``objective.estimator``::

        fragment = runs_view(uri, experiment, sweep=name, axes=("direction", "estimator", "seed"))
        print(f"MLflow: {ui_url(fragment) or fragment}")
        # MLflow: http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=rpg-sweep-kl-v1&workflowType=...
    """
    from rpg_core import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    exp_id = tracking.ensure_experiment(uri, experiment)
    key = sweep_view_key(sweep) if sweep is not None else EXPERIMENT_VIEW_KEY
    metrics = list(metrics) or [*DEFAULT_METRICS, *_logged_mean_at_k(uri, experiment, sweep)]
    existing = tracking.experiment_tags(exp_id, uri)
    writes = {}
    value = _envelope(_view_name(sweep), view_state(sweep=sweep, axes=axes, metrics=metrics, key=key),
                      existing.get(VIEW_TAG_PREFIX + key))  # fmt: skip
    if value is not None:
        writes[VIEW_TAG_PREFIX + key] = value
    wide = experiment_view_tag(existing) if sweep is not None else None
    if wide is not None:  # the experiment-wide view too, so the UI's "Views" menu always lists it
        writes[wide[0]] = wide[1]
    if writes:
        tracking.set_experiment_tags(exp_id, writes, uri)
    return view_fragment(exp_id, key)


def _logged_mean_at_k(uri: str, experiment: str, sweep: str | None, max_runs: int = 200) -> list[str]:
    """The Mean@k metric names logged by the newest training runs (of ``sweep``), sorted (rpg_core.runs)."""
    from rpg_core.runs import RunKind, find_runs

    runs = find_runs(kind=RunKind.TRAIN, experiments=experiment, sweep=sweep, limit=max_runs, tracking_uri=uri)
    return sorted(c for c in runs.columns if _MEAN_AT_K.match(c.removeprefix("metrics.")))


def ui_url(fragment: str, base: str | None = None) -> str | None:
    """The browser link of a view ``fragment``: ``base`` (default ``$RPG_MLFLOW_URL``, the MLflow UI that
    infra/stack.py's env.sh exports) + ``/`` + fragment; None when there is no base."""
    base = (base or os.environ.get("RPG_MLFLOW_URL", "")).strip().rstrip("/")
    return f"{base}/{fragment}" if base else None
