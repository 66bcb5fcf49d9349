"""The live dashboard: the comparisons of ``dashboards.views`` on a sweep or a tuning study while it runs.

    python -m dashboards.app --host 127.0.0.1 --port 8050 [--tracking-uri URI] [--mlflow-url URL] [--refresh-s 10]
    http://127.0.0.1:8050/?sweep=NAME      (or ?study=NAME): opens on that sweep or study

A Dash app. Dash draws the very plotly figures the offline report (``rpg report``) draws, from the same view
functions, so the page and the report show the same numbers; and it serves its JavaScript and CSS (React, plotly.js,
its components) from the installed Python package (``serve_locally=True``, no external stylesheet, script or font),
so the page works offline: it sends no request to any host but its own, and Dash has no telemetry.

The page: what to show (every sweep that has a parent run of kind sweep, every tuning study), the grouping (label or
a design axis that varies), the metric (default: the headline), a baseline group, the statistic (mean | IQM) and the
x axis (step | tokens | wall-clock); below, the paper's table, the paper panel, the design grid (more than one
cell), the KL trade-off, the performance profile, stability, the runs (linked to MLflow with ``--mlflow-url``) and,
for a study, Optuna's figures and the trials. Every ``--refresh-s`` seconds the page asks the store for the
selection's runs (one search); when anything changed (a run, a status, a metric's latest value) the data is read
again and the figures are redrawn, so a running sweep's new points appear. Errors (an empty store, an unknown
sweep) are shown in the page as a message.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import logging
import os
import threading
import urllib.parse
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboards import views
from dashboards.data import Data, load, summary
from dashboards.report import figure_makers
from rpg_core import runs as read
from rpg_core.tracking import RunKind

__all__ = ["create_app", "main", "selections"]

log = logging.getLogger("dashboards.app")
STUDY_TAG = "rpg.study"  # flows.tuner's tag naming a study (dashboards does not import flows)
_CSS = {"font-family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "max-width": "1360px",
        "margin": "16px auto", "color": "#222", "padding": "0 12px"}  # fmt: skip
_CELL = {"border": "1px solid #ddd", "padding": "4px 8px", "text-align": "right", "font-size": "13px"}
_HEAD = {**_CELL, "background": "#f6f6f6", "text-align": "left"}
_TITLES = {
    "paper_panel": "Training and evaluation curves (the paper panel)", "design_grid": "The design grid",
    "tradeoff": "KL vs the metric: the trade-off", "performance_profile": "Performance profile",
    "stability": "Stability", "study_optimization_history": "Study: optimization history",
    "study_param_importances": "Study: parameter importances", "study_slice": "Study: slices",
    "study_contour": "Study: contour",
}  # fmt: skip


# -- reading the store -------------------------------------------------------------------------------------------------

_study_names: dict[str, str] = {}  # tune parent run id -> study name (a run's tags do not change)


def selections(tracking_uri: str | None) -> list[tuple[str, str]]:
    """``[("sweep", name), ..., ("study", name), ...]``, newest first: every sweep with a parent run of kind sweep
    (tag ``sweep``) and every tuning study (its parent run of kind tune, tag ``rpg.study``)."""
    sweeps = read.find_runs(kind=RunKind.SWEEP, tracking_uri=tracking_uri)
    out = [("sweep", s) for s in dict.fromkeys(sweeps["sweep"].dropna())]
    tunes = read.find_runs(kind=RunKind.TUNE, tracking_uri=tracking_uri)
    for rid, name in zip(tunes["run_id"], tunes["name"]):
        if rid not in _study_names:
            tag = read.run_tags(rid, tracking_uri=tracking_uri).get(STUDY_TAG)
            _study_names[rid] = tag or str(name).removeprefix("tune-")
        out.append(("study", _study_names[rid]))
    return list(dict.fromkeys(out))


def _runs_now(kind: str, name: str, tracking_uri: str | None) -> pd.DataFrame:
    """The selection's training runs as the store has them now (one search): what the refresh compares."""
    if kind == "sweep":
        return read.find_runs(kind=RunKind.TRAIN, sweep=name, tracking_uri=tracking_uri)
    frame = read.find_runs(kind=RunKind.TRAIN, tags={STUDY_TAG: name}, tracking_uri=tracking_uri)
    parent = read.find_runs(kind=RunKind.TUNE, tags={STUDY_TAG: name}, tracking_uri=tracking_uri)
    return pd.concat([frame, parent], ignore_index=True)  # the parent's metrics move as trials finish


def _version(selection: str, frame: pd.DataFrame) -> str:
    """``<selection>@<hash>``: changes whenever a run appears, changes status or logs a new latest value of a metric."""
    return f"{selection}@{hashlib.sha1(frame.to_csv(index=False).encode()).hexdigest()[:16]}"


def _parse(selection: str) -> tuple[str, str]:
    kind, _, name = selection.partition(":")
    return kind, name


def _from_query(search: str | None) -> str | None:
    q = urllib.parse.parse_qs((search or "").lstrip("?"))
    for kind in ("sweep", "study"):
        if q.get(kind):
            return f"{kind}:{q[kind][0]}"
    return None


def _choose(search: str | None, value: str | None, from_url: bool, found: list[tuple[str, str]]) -> str | None:
    """The selection to show: the URL's on load or when it changes, else the one chosen, else the newest."""
    if from_url or value is None:
        value = _from_query(search) or value
    return value or (f"{found[0][0]}:{found[0][1]}" if found else None)


# -- rendering ---------------------------------------------------------------------------------------------------------


def _cell(text: str) -> Any:
    """A table cell's display string (views.Table.text: ``**best**``, ``__second__`` then any Δ) as components."""
    for mark, tag in (("**", html.B), ("__", html.U)):
        if text.startswith(mark):
            core, _, rest = text[2:].partition(mark)
            return [tag(core), rest] if rest else tag(core)
    return text


def _paper_table(table: views.Table) -> html.Div:
    t = table.text
    head = html.Tr([html.Th(t.index.name or "", style=_HEAD), *[html.Th(c, style=_HEAD) for c in t.columns]])
    rows = [html.Tr([html.Th(str(g), style=_HEAD), *[html.Td(_cell(v), style=_CELL) for v in row]])
            for g, row in zip(t.index, t.to_numpy())]  # fmt: skip
    return html.Div([html.Table([html.Thead(head), html.Tbody(rows)], id="paper-table", className="paper",
                                style={"border-collapse": "collapse"}),
                     html.P(table.note, className="note", style={"font-size": "12px", "color": "#555"})])  # fmt: skip


def _frame_table(frame: pd.DataFrame, table_id: str, links: tuple[str, ...] = ()) -> html.Table:
    """A small frame as an HTML table; ``links`` columns hold space-separated URLs, shown as links."""

    def show(col: str, v: Any) -> Any:
        if col in links:
            return [html.A(u.rsplit("/", 1)[-1][:12], href=u, target="_blank", style={"margin-right": "6px"})
                    for u in str(v or "").split()]  # fmt: skip
        if isinstance(v, float):
            return "—" if pd.isna(v) else f"{v:.4g}"
        return "—" if v is None or v is pd.NA else str(v)

    head = html.Tr([html.Th(c, style=_HEAD) for c in frame.columns])
    body = [html.Tr([html.Td(show(c, v), style=_CELL) for c, v in zip(frame.columns, row)]) for row in frame.itertuples(index=False)]
    return html.Table([html.Thead(head), html.Tbody(body)], id=table_id, style={"border-collapse": "collapse"})


def _figures(data: Data, *, by: str, metric: str, stat: str, x: str) -> dict[str, Any]:
    """The figures the report draws for the same choices (``report.figure_makers``: name -> Figure, or the message
    of the view that failed)."""
    makers = _safely(lambda: figure_makers(data, by=by, metric=metric, stat=stat, x=x))
    if isinstance(makers, str):  # the selection could not be laid out: its message in the panel's place
        return {"paper_panel": makers}
    return {name: _safely(make) for name, make in makers.items()}


def _safely(make, default: Any = None) -> Any:
    """The view's result, or (one view failing must not take the page down) its error as a message."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001  (shown in the page; the traceback goes to the log)
        log.exception("view failed")
        return default if default is not None else f"{type(e).__name__}: {e}"


def _figure_block(name: str, fig: Any) -> html.Div:
    if isinstance(fig, str):
        inner = html.P(f"could not draw this figure: {fig}", className="error", style={"color": "#a33"})
    else:
        height = int(fig.layout.height or 450)
        inner = dcc.Graph(id=f"graph-{name}", figure=fig, config={"displaylogo": False}, style={"height": f"{height}px"})
    return html.Div([html.H2(_TITLES.get(name, name), style={"font-size": "18px"}), inner], id=f"fig-{name}",
                    className="figure")  # fmt: skip


def _content(data: Data, *, by: str, metric: str, baseline: str | None, stat: str, x: str,
             mlflow_url: str | None) -> list[Any]:  # fmt: skip
    table = views.paper_table(data, metrics=None if metric == data.headline else [metric], by=by, baseline=baseline,
                              stat=stat)  # fmt: skip (the report's call, so both show the same table)
    figs = _figures(data, by=by, metric=metric, stat=stat, x=x)
    parts: list[Any] = [html.Div(id="figure-list", hidden=True, **{"data-figures": ",".join(figs)})]
    if data.parent is not None and mlflow_url:
        parts.append(html.A("parent run in MLflow", href=views.run_url(mlflow_url, data.parent["run_id"]), target="_blank"))
    parts += [html.P(n, className="warn", style={"color": "#a33"}) for n in data.notes]
    parts += [html.H2("The paper's table", style={"font-size": "18px"}), _paper_table(table)]
    parts += [_figure_block(name, f) for name, f in figs.items()]
    s = summary(data, metric).sort_values(["label", "seed"])
    runs = s[["label", "seed", "status", "last", "best", "last_step"]].copy()
    if mlflow_url:
        runs["mlflow"] = [views.run_url(mlflow_url, r) for r in s["run_id"]]
    parts += [html.H2(f"Runs ({metric})", style={"font-size": "18px"}), _frame_table(runs, "runs-table", ("mlflow",))]
    if data.kind == "study":
        trials = views.trials_table(data, mlflow_url)
        trials = trials.drop(columns="runs") if "links" in trials else trials  # the links name the same runs
        parts += [html.H2("Trials", style={"font-size": "18px"}), _frame_table(trials, "trials-table", ("links",))]
    return parts


# -- the app -----------------------------------------------------------------------------------------------------------


def _dropdown(id_: str, label: str, **kw: Any) -> html.Div:
    return html.Div([html.Label(label, style={"font-size": "12px", "color": "#555"}), dcc.Dropdown(id=id_, **kw)],
                    style={"min-width": "180px", "flex": "1"})  # fmt: skip


def _radio(id_: str, label: str, options: list[str], value: str) -> html.Div:
    return html.Div([html.Label(label, style={"font-size": "12px", "color": "#555"}),
                     dcc.RadioItems(id=id_, options=options, value=value, inline=True)], style={"flex": "0 0 auto"})  # fmt: skip


def create_app(tracking_uri: str | None = None, mlflow_url: str | None = None, refresh_s: float = 10) -> Dash:
    app = Dash(__name__, serve_locally=True, title="rpg-lab live", update_title=None, external_scripts=[],
               external_stylesheets=[])  # fmt: skip
    store = tracking_uri or "the default store"
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
        dcc.Store(id="version"),
        html.H1("rpg-lab: live comparison", style={"font-size": "22px", "margin-bottom": "4px"}),
        html.P(id="status", style={"font-size": "13px", "color": "#666"}),
        html.Div([
            _dropdown("selection", "sweep or study", clearable=False),
            _dropdown("by", "group by", clearable=False),
            _dropdown("metric", "metric", clearable=False),
            _dropdown("baseline", "baseline", placeholder="none"),
            _radio("stat", "statistic", [s.value for s in views.Stat], views.Stat.MEAN.value),
            _radio("x", "x axis", [a.value for a in views.XAxis], views.XAxis.STEP.value),
        ], style={"display": "flex", "gap": "12px", "flex-wrap": "wrap", "align-items": "end"}),
        html.Div(id="message", style={"color": "#a33", "margin": "12px 0", "white-space": "pre-wrap"}),
        html.Div(id="content"),
    ], style=_CSS)  # fmt: skip

    lock = threading.Lock()  # one computation at a time: a second request for the same view waits, then hits the cache
    datas: collections.OrderedDict[str, Data] = collections.OrderedDict()
    pages: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
    # The store is read by one poll at a time; a poll that finds a read in flight (a slow or unreachable store, or a
    # second page) answers from the last read at once. Dash drops the answer of a callback that is triggered again
    # before it returns, so a poll slower than the refresh must not make every tick wait for the store.
    reading = threading.Lock()
    seen: dict[str, Any] = {}  # "found": the selections; "error": why the last read failed; selection -> (runs, time)

    def read_store(search: str | None, value: str | None, from_url: bool) -> None:
        try:
            seen["found"] = selections(tracking_uri)
            chosen = _choose(search, value, from_url, seen["found"])
            if chosen:
                seen[chosen] = (_runs_now(*_parse(chosen), tracking_uri), dt.datetime.now().strftime("%H:%M:%S"))
            seen.pop("error", None)
        except Exception as e:  # noqa: BLE001  (an unreachable store: say so, keep polling)
            log.exception("reading %s failed", store)
            seen["error"] = f"cannot read {store}: {type(e).__name__}: {e}"

    @app.callback(Output("selection", "options"), Output("selection", "value"), Output("url", "search"),
                  Output("status", "children"), Output("version", "data"),
                  Input("url", "search"), Input("tick", "n_intervals"), Input("selection", "value"),
                  State("version", "data"))  # fmt: skip
    def poll(search, _n, value, version):
        """Every tick: the selections, the chosen one's runs, the status line, and a new version if they changed."""
        from_url = ctx.triggered_id == "url"
        if reading.acquire(blocking=False):
            try:
                read_store(search, value, from_url)
            finally:
                reading.release()
        if "found" not in seen:
            return no_update, no_update, no_update, seen.get("error", f"reading {store} ..."), no_update
        options = [{"label": f"{k} {n}", "value": f"{k}:{n}"} for k, n in seen["found"]]
        value = _choose(search, value, from_url, seen["found"])
        if value is None:
            return options, None, no_update, f"no sweep or study in {store} yet (start one: rpg sweep, rpg tune)", None
        if value not in {o["value"] for o in options}:
            options.append({"label": f"{value.replace(':', ' ')} (no parent run)", "value": value})
        kind, name = _parse(value)
        wanted = "?" + urllib.parse.urlencode({kind: name})
        url = wanted if wanted != search else no_update
        if value not in seen:
            return options, value, url, seen.get("error", f"reading the runs of {kind} {name} ..."), no_update
        frame, when = seen[value]
        train = frame[frame["kind"] == RunKind.TRAIN.value]
        running = int((train["status"] == read.RunStatus.RUNNING.value).sum())
        status = f"last refreshed {when}, {len(train)} runs ({running} running); {kind} {name}, store {store}"
        if "error" in seen:
            status += f"; the last read failed: {seen['error']}"
        new = _version(value, frame)
        # a new version only when no view is being drawn: one superseded before it returns would never be shown
        return options, value, url, status, new if new != version and not lock.locked() else no_update

    @app.callback(Output("content", "children"), Output("message", "children"),
                  Output("by", "options"), Output("by", "value"), Output("metric", "options"), Output("metric", "value"),
                  Output("baseline", "options"), Output("baseline", "value"),
                  Input("version", "data"), Input("by", "value"), Input("metric", "value"), Input("baseline", "value"),
                  Input("stat", "value"), Input("x", "value"))  # fmt: skip
    def render(version, by, metric, baseline, stat, x):
        """The selection's data (read again only for a new version) and every view for the chosen controls."""
        if not version:
            return [], "", [], None, [], None, [], None
        selection = version.rsplit("@", 1)[0]
        with lock:
            try:
                data = datas.get(version)
                if data is None:
                    kind, name = _parse(selection)
                    data = datas[version] = load(**{kind: name}, tracking_uri=tracking_uri, keys="all")  # any metric
                    while len(datas) > 4:
                        datas.popitem(last=False)
                by = by if by in ["label", *data.varying_axes] else "label"
                metric = metric if metric in data.metrics else data.headline
                groups = data.groups(by)
                baseline = baseline if baseline in groups else None
                key = (version, by, metric, baseline, stat, x)
                if key not in pages:
                    pages[key] = (_content(data, by=by, metric=metric, baseline=baseline, stat=stat, x=x,
                                           mlflow_url=mlflow_url), "")  # fmt: skip
                    while len(pages) > 16:
                        pages.popitem(last=False)
                content, message = pages[key]
            except Exception as e:  # noqa: BLE001  (a readable message, never a traceback)
                if not isinstance(e, ValueError):  # load's ValueErrors name the selection and what is missing
                    log.exception("rendering %s failed", selection)
                    e = f"{selection.replace(':', ' ')}: {type(e).__name__}: {e}"
                return [], str(e), [], None, [], None, [], None
        return (content, message, ["label", *data.varying_axes], by, data.metrics, metric, groups, baseline)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else .rpg/mlflow.db)")
    p.add_argument("--mlflow-url", help="the MLflow UI's base URL, for links to runs")
    p.add_argument("--refresh-s", type=float, default=10, help="seconds between reads of the store")
    args = p.parse_args(argv)
    if args.refresh_s <= 0:
        p.error("--refresh-s must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per poll
    # a tracking server that does not answer: say so within seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    app = create_app(args.tracking_uri, args.mlflow_url, args.refresh_s)
    print(f"rpg live dashboard on http://{args.host}:{args.port}/  (?sweep=NAME or ?study=NAME)", flush=True)
    app.run(host=args.host, port=args.port, debug=False, dev_tools_disable_version_check=True)  # no version fetch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
