"""``rpg report``: one self-contained HTML page of a sweep, a set of runs or a tuning study, that opens offline (plotly's
JavaScript inline, no CDN, no request to any host), with its figures as PNGs and its tables as Markdown, LaTeX and CSV;
logged as artifacts (``report/``) of the sweep's or study's parent MLflow run, so it opens in the MLflow UI too.

    rpg report --sweep kl_divergences --out reports/kl          # every view of dashboards.views
    rpg report --study tune_urkl-3f2a... --out reports/study    # plus the study's history, importances, slices
    rpg report --runs ID,ID,... --baseline GRPO --stat iqm

PNGs are drawn by kaleido, which drives a Chromium-family browser: the system's (``chromium``; ``make browser``
installs it) or ``$BROWSER_PATH``. Without one the page and the tables are still written, and the report says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards import views
from dashboards.data import Data, load, problem_scores

__all__ = ["Report", "benchmark_table", "build", "figure_makers", "find_browser", "paired_table", "write"]

ARTIFACT_DIR = "report"
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@dataclass
class Report:
    out: Path
    html: Path
    figures: dict[str, Any]  # name -> plotly Figure, in page order
    tables: dict[str, pd.DataFrame]
    pngs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logged_to: str | None = None  # the MLflow run id the report was logged to
    seconds: dict[str, float] = field(default_factory=dict)


def find_browser() -> str | None:
    """The Chromium-family executable kaleido can drive: ``$BROWSER_PATH``, else the first on ``$PATH``."""
    env = os.environ.get("BROWSER_PATH", "").strip()
    if env and Path(env).exists():
        return env
    return next((p for p in (shutil.which(b) for b in _BROWSERS) if p), None)


def build(data: Data, *, by: str = "label", metric: str | None = None, baseline: str | None = None,
          stat: views.Stat | str = views.Stat.MEAN, x: views.XAxis | str = views.XAxis.STEP,
          mlflow_url: str | None = None, problems: bool = True,
          ) -> tuple[dict[str, Any], dict[str, pd.DataFrame], list[str], views.Table]:  # fmt: skip
    """Every figure and table of the report (the live app draws the same functions): ``(figures, tables, notes, the
    paper's table)``. ``problems``: read the per-problem tables (one artifact read per run and benchmark)."""
    metric = metric or data.headline
    notes = list(data.notes)
    figs: dict[str, Any] = {}
    tables: dict[str, pd.DataFrame] = {}
    table = views.paper_table(data, metrics=None if metric == data.headline else [metric], by=by, baseline=baseline, stat=stat)
    tables["paper_table"] = table.cells
    for name, make in figure_makers(data, by=by, metric=metric, stat=stat, x=x).items():
        figs[name] = make()
    if "design_grid" in figs:
        tables["design_grid"] = views.grid_values(data, metric)
    if "tradeoff" in figs:
        tables["tradeoff"] = views.tradeoff_points(data, metric)
    tables["stability"] = views.stability_table(data)
    scores = problem_scores(data) if problems else None
    if scores is not None and len(scores):
        tables["benchmark_ci"] = benchmark_table(data, scores, by=by)
        if baseline:
            paired = paired_table(data, baseline, by=by, scores=scores)
            if paired is not None:
                tables["paired_problems"] = paired
    elif problems:
        notes.append("no per-problem evaluation tables: benchmark CIs over problems and paired differences not shown")
    if data.study is not None:
        tables["trials"] = views.trials_table(data, mlflow_url)
    tables["runs"] = _runs_table(data, metric)
    return figs, tables, notes, table


def benchmark_table(data: Data, scores: pd.DataFrame, *, by: str = "label") -> pd.DataFrame:
    """Per benchmark and group, the score at the last evaluation with a CI that covers the finite problem set as well
    as the seeds (``stats.benchmark_ci``: problems and runs resampled; AIME's 30 problems make one problem 3.3
    points). When a group's runs were evaluated on different problems (the held-out split follows ``train.seed``)
    the matrix is not rectangular: the CI resamples the runs' scores only, and ``over`` says so."""
    from dashboards import stats

    scores = scores.assign(g=scores["run_id"].map(data.runs.set_index("run_id")[by].astype(str)))
    rows = []
    for (b, g), sg in scores.groupby(["bench", "g"]):
        mat = sg.pivot_table(index="run_id", columns="problem", values="score", aggfunc="mean")
        if mat.notna().all().all():
            e, over = stats.benchmark_ci(mat.to_numpy()), "runs and problems"
        else:
            e, over = stats.bootstrap_ci(mat.mean(axis=1).to_numpy()), "runs (problem sets differ)"
        rows.append({"bench": b, by: g, "score": e.value, "low": e.low, "high": e.high, "runs": mat.shape[0],
                     "problems": mat.shape[1], "over": over})  # fmt: skip
    return pd.DataFrame(rows)


def figure_makers(data: Data, *, by: str = "label", metric: str | None = None, stat: views.Stat | str = views.Stat.MEAN,
                  x: views.XAxis | str = views.XAxis.STEP) -> dict[str, Any]:  # fmt: skip
    """The figures a selection gets, in page order, as ``{name: make()}``: the report and the live app draw the same
    ones. The panel shows ``metric`` among its first 12; the grid only when it has more than one cell; the trade-off
    only when the runs logged a KL value; a study's own figures last."""
    metric = metric or data.headline
    panel = data.metrics[:12] if metric in data.metrics[:12] else [metric, *data.metrics[:11]]
    makers: dict[str, Any] = {"paper_panel": lambda: views.paper_panel(data, metrics=panel, by=by, stat=stat, x=x)}
    if len(views.grid_values(data, metric, reps=1)) > 1:
        makers["design_grid"] = lambda: views.design_grid(data, metric)
    if views.tradeoff_points(data, metric)["kl"].notna().any():
        makers["tradeoff"] = lambda: views.tradeoff(data, metric)
    makers["performance_profile"] = lambda: views.performance_profiles(data, metric, by=by)
    makers["stability"] = lambda: views.stability(data)
    if data.study is not None:
        for name, f in views.study_figures(data):
            makers[f"study_{name}"] = lambda f=f: f
    return makers


def paired_table(data: Data, baseline: str, *, by: str = "label", bench: str | None = None,
                 scores: pd.DataFrame | None = None) -> pd.DataFrame | None:  # fmt: skip
    """Per group vs ``baseline``, on the problems both evaluated at their last evaluation (each problem's score
    averaged over a group's runs first): ``stats.paired_difference`` (mean, CI, wins/losses/ties, sign-test p)."""
    from dashboards import stats

    scores = problem_scores(data, bench) if scores is None else scores
    if scores.empty:
        return None
    scores = scores.assign(g=scores["run_id"].map(data.runs.set_index("run_id")[by].astype(str)))
    rows = []
    for b, sb in scores.groupby("bench"):
        per = sb.groupby(["g", "problem"])["score"].mean().unstack("problem")
        if baseline not in per.index:
            continue
        for g in per.index:
            if g == baseline:
                continue
            both = per.loc[[g, baseline]].dropna(axis=1)
            if both.shape[1] == 0:
                continue
            d = stats.paired_difference(both.loc[g].to_numpy(), both.loc[baseline].to_numpy())
            rows.append({"bench": b, by: g, "baseline": baseline, "problems": d.n, "mean_diff": d.mean, "low": d.low,
                         "high": d.high, "wins": d.wins, "losses": d.losses, "ties": d.ties, "p_value": d.p_value})  # fmt: skip
    return pd.DataFrame(rows) if rows else None


def write(data: Data, out: str | Path, *, by: str = "label", metric: str | None = None, baseline: str | None = None,
          stat: views.Stat | str = views.Stat.MEAN, x: views.XAxis | str = views.XAxis.STEP, png: bool = True,
          log: bool = True, mlflow_url: str | None = None) -> Report:  # fmt: skip
    """Write ``out/index.html``, ``out/figures/*.png`` and ``out/tables/*`` and (``log``) upload them to the parent
    run. Returns what was written and how long each part took."""
    import plotly.offline

    t0 = time.perf_counter()
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    figs, tables, notes, table = build(data, by=by, metric=metric, baseline=baseline, stat=stat, x=x, mlflow_url=mlflow_url)
    seconds = {"views": time.perf_counter() - t0}
    (out / "tables" / "paper_table.md").write_text(table.markdown() + "\n")
    (out / "tables" / "paper_table.tex").write_text(table.latex() + "\n")
    for name, t in tables.items():
        frame = t.copy()
        if isinstance(frame.columns, pd.MultiIndex):
            frame.columns = ["/".join(map(str, c)) for c in frame.columns]
        frame.to_csv(out / "tables" / f"{name}.csv")
    t1 = time.perf_counter()
    page = _page(data, figs, tables, table, notes, plotly.offline.get_plotlyjs(), by=by, stat=stat, x=x,
                 mlflow_url=mlflow_url)  # fmt: skip
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    seconds["html"] = time.perf_counter() - t1
    report = Report(out, index, figs, tables, notes=notes, seconds=seconds)
    if png:
        t2 = time.perf_counter()
        report.pngs = _pngs(figs, out / "figures", report.notes)
        seconds["png"] = time.perf_counter() - t2
    if log and data.parent is not None:
        from rpg_core.tracking import log_artifacts_to_run

        log_artifacts_to_run(data.parent["run_id"], out, ARTIFACT_DIR, tracking_uri=data.tracking_uri)
        report.logged_to = data.parent["run_id"]
    elif log:
        report.notes.append("no parent run (a sweep's or a study's): the report was not logged to MLflow")
    seconds["total"] = time.perf_counter() - t0
    return report


def _pngs(figs: dict[str, Any], folder: Path, notes: list[str]) -> list[Path]:
    browser = find_browser()
    if browser is None:
        notes.append("no Chromium-family browser found (make browser, or set BROWSER_PATH): PNG figures not written")
        return []
    import kaleido

    os.environ.setdefault("BROWSER_PATH", browser)
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, f in figs.items():
        width = 1300 if name in ("paper_panel", "design_grid", "stability") else 1000
        specs.append({"fig": f, "path": folder / f"{name}.png", "opts": {"width": width, "height": int(f.layout.height or 500)}})
    # kaleido's page loads MathJax from a CDN by default: off (no figure uses LaTeX); plotly.js comes from the
    # installed plotly package. So drawing a PNG requests nothing from any host.
    kaleido.write_fig_from_object_sync(specs, kopts={"page_generator": png_page()})
    return [s["path"] for s in specs if s["path"].exists()]


def png_page() -> Any:
    """kaleido's page for drawing PNGs: plotly.js from the installed package, no MathJax (its default comes from a
    CDN; no figure here uses LaTeX)."""
    import kaleido

    return kaleido.PageGenerator(mathjax=False)


def _runs_table(data: Data, metric: str) -> pd.DataFrame:
    from dashboards.data import summary

    s = summary(data, metric)
    r = data.runs.set_index("run_id")
    cols = ["run_id", "label", "seed", "status", "last", "best", "last_step"]
    return s[cols].assign(name=s["run_id"].map(r["name"]), group=s["group"]).sort_values(["label", "seed"])


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1360px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}.note{color:#555;font-size:12px}.warn{color:#a33;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}nav a{margin-right:12px;font-size:13px}
.figure{margin:8px 0 16px 0}
"""
_TITLES = {
    "paper_panel": "Training and evaluation curves (the paper panel)",
    "design_grid": "The design grid",
    "tradeoff": "KL vs accuracy: the trade-off",
    "performance_profile": "Performance profile",
    "stability": "Stability",
    "study_optimization_history": "Study: optimization history",
    "study_param_importances": "Study: parameter importances",
    "study_slice": "Study: slices",
    "study_contour": "Study: contour",
}
_TABLE_TITLES = {
    "benchmark_ci": "Benchmark scores with CIs over runs and problems",
    "paired_problems": "Paired per-problem differences against the baseline",
    "design_grid": "The design grid's cells",
    "tradeoff": "The trade-off's points",
    "stability": "Stability per configuration",
    "trials": "The study's trials",
    "runs": "Every run",
}


def _page(data: Data, figs: dict[str, Any], tables: dict[str, pd.DataFrame], table: views.Table, notes: list[str],
          plotly_js: str, *, by: str, stat: Any, x: Any, mlflow_url: str | None) -> str:  # fmt: skip
    e = html.escape
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_groups = data.runs["group"].nunique()
    seeds = sorted(int(s) for s in data.runs["seed"].dropna().unique())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.title)} — rpg report</title>",
             f"<style>{_CSS}</style><script>{plotly_js}</script></head><body>",
             f"<h1>{e(data.title)}</h1>",
             f"<p class='meta'>{len(data.runs)} training runs, {n_groups} configurations, seeds {e(str(seeds))}; "
             f"grouped by <b>{e(by)}</b>, {e(str(getattr(stat, 'value', stat)))} over runs, x = {e(str(getattr(x, 'value', x)))}; "
             f"headline {e(data.headline)}. Store: {e(str(data.tracking_uri or 'default'))}. Written {when}.</p>"]  # fmt: skip
    if data.parent is not None and mlflow_url:
        parts.append(f"<p class='meta'><a href='{e(views.run_url(mlflow_url, data.parent['run_id']))}'>parent run in MLflow</a></p>")
    parts += [f"<p class='warn'>{e(n)}</p>" for n in notes]
    nav = ["<a href='#table'>table</a>", *[f"<a href='#{k}'>{e(_TITLES.get(k, k))}</a>" for k in figs],
           *[f"<a href='#t-{k}'>{e(_TABLE_TITLES.get(k, k))}</a>" for k in tables if k != "paper_table"]]  # fmt: skip
    parts.append("<nav>" + "".join(nav) + "</nav>")
    parts.append("<h2 id='table'>The paper's table</h2>" + table.html())
    for k, f in figs.items():
        parts.append(f"<h2 id='{k}'>{e(_TITLES.get(k, k))}</h2><div class='figure' data-figure='{k}'>")
        parts.append(f.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{k}", config={"displaylogo": False}))
        parts.append("</div>")
    for k, t in tables.items():
        if k == "paper_table":
            continue
        frame = t.copy()
        if "run_id" in frame and mlflow_url:
            frame["run_id"] = [f"<a href='{e(views.run_url(mlflow_url, r))}'>{e(r[:12])}</a>" for r in frame["run_id"]]
        if "links" in frame:
            frame["links"] = [" ".join(f"<a href='{e(u)}'>run</a>" for u in str(v).split()) for v in frame["links"]]
        parts.append(f"<h2 id='t-{k}'>{e(_TABLE_TITLES.get(k, k.replace('_', ' ')))}</h2>")
        parts.append(frame.to_html(index=False, escape=False, float_format=lambda v: f"{v:.4g}", na_rep="—",
                                   classes="data", table_id=f"table-{k}"))  # fmt: skip
    parts.append(f"<script>window.RPG_REPORT = {json.dumps({'figures': list(figs), 'tables': list(tables)})};</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def cli(args: Any) -> int:
    """``rpg report``: validated arguments in (rpg_core.cli), a report out; returns the exit code."""
    import sys

    runs = [r for r in (args.runs or "").split(",") if r.strip()] or None
    try:
        data = load(sweep=args.sweep, runs=runs, study=args.study, tracking_uri=args.tracking_uri,
                    extra=[args.metric] if args.metric else ())  # fmt: skip
        if args.by != "label" and args.by not in data.runs:
            raise ValueError(f"--by: {args.by!r} is not a design axis; allowed: label, group, seed, {', '.join(data.varying_axes)}")
        if args.metric and args.metric not in data.metrics:
            raise ValueError(f"--metric: {args.metric!r} was not logged by these runs; logged: {', '.join(data.metrics)}")
        out = Path(args.out or Path(".rpg") / "reports" / _slug(data.title))
        rep = write(data, out, by=args.by, metric=args.metric, baseline=args.baseline, stat=args.stat, x=args.x,
                    png=not args.no_png, log=not args.no_log, mlflow_url=args.mlflow_url or os.environ.get("RPG_MLFLOW_URL"))  # fmt: skip
    except ValueError as e:
        print(f"rpg report: {e}", file=sys.stderr)
        return 2
    for n in rep.notes:
        print(f"rpg report: note: {n}", file=sys.stderr)
    print(f"rpg report: {rep.html} ({len(rep.figures)} figures, {len(rep.pngs)} PNGs, {len(rep.tables)} tables) "
          f"in {rep.seconds['total']:.1f} s" + (f"; logged to MLflow run {rep.logged_to} under {ARTIFACT_DIR}/" if rep.logged_to else ""))  # fmt: skip
    with contextlib.suppress(Exception):
        print((rep.out / "tables" / "paper_table.md").read_text())
    return 0


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-")


def selection_args(sweep: str | None, runs: Sequence[str] | None, study: str | None) -> None:
    """Exactly one selection (checked by the CLI before anything is read)."""
    chosen = [n for n, v in (("--sweep", sweep), ("--runs", runs), ("--study", study)) if v]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --sweep, --runs, --study (got {', '.join(chosen) or 'none'})")
