"""The comparisons, built once as functions of ``dashboards.data.Data`` and used by both surfaces (the offline report,
``dashboards.report``, and the live app, ``dashboards.app``). Every figure is a plotly Figure; every number a figure
shows comes from a frame function beside it (``curve_bands``, ``paper_table``, ``grid_values``, ``tradeoff_points``,
``stability_table``, ``trials_table``), computed with ``dashboards.stats`` and tested against it.

* the paper panel: Mean@k, reward, entropy, response length, k1/k2/k3, clip fractions over steps (or tokens, or
  wall-clock), one line per group (a method, a configuration or any design axis), mean or IQM over the group's runs
  with a bootstrap band;
* the paper's table: groups x metrics x {Last, Best}, each cell mean ± CI half-width (n), the difference to a
  baseline with its probability of improvement, best bold and second underlined; Markdown, LaTeX, HTML;
* the design grid: a final metric over direction x normalization against form x clip, one facet per estimator;
* the trade-off: mean KL against the final metric per configuration, with the Pareto front;
* stability: entropy collapse, responses at the length cap, failed or NaN runs per configuration;
* a tuning study: optimization history, parameter importances, slices and a contour (Optuna's plotly figures), and
  the trials linked to their MLflow runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import stats
from dashboards.data import Data, summary

__all__ = ["Stat", "Table", "XAxis", "curve_bands", "design_grid", "grid_values", "paper_panel", "paper_table",
           "performance_profiles", "run_url", "stability", "stability_table", "study_figures", "tradeoff", "tradeoff_points",
           "trials_table"]  # fmt: skip

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # fmt: skip
KL_KEYS = ("actor/kl_k3", "actor/kl_k1", "actor/kl_k2", "actor/kl_value")


class Stat(StrEnum):
    """The statistic over a group's runs (rliable recommends the IQM over the mean for few runs)."""

    MEAN = "mean"
    IQM = "iqm"


class XAxis(StrEnum):
    STEP = "step"
    TOKENS = "tokens"  # cumulative prompt + response tokens (mean over the group's runs at that step)
    WALL = "wall"  # seconds since the run's first point (mean over the group's runs at that step)


_X_COLUMN = {XAxis.STEP: "step", XAxis.TOKENS: "tokens", XAxis.WALL: "wall_s"}
_X_TITLE = {XAxis.STEP: "step", XAxis.TOKENS: "tokens", XAxis.WALL: "wall-clock (s)"}


def _colors(groups: Sequence[str]) -> dict[str, str]:
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# -- the paper panel ---------------------------------------------------------------------------------------------------


def curve_bands(data: Data, metric: str, *, by: str = "label", stat: Stat | str = Stat.MEAN,
                x: XAxis | str = XAxis.STEP, level: float = 0.95, reps: int = 1000, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """``group, step, x, value, low, high, n``: per group and step, the statistic of ``metric`` over the group's runs
    that logged that step, with its percentile bootstrap interval over those runs (``stats.bootstrap_band``); ``x``
    is the step, or the mean over those runs of their tokens or seconds at that step."""
    stat, x = Stat(stat), XAxis(x)
    cols = ["group", "step", "x", "value", "low", "high", "n"]
    h = data.history[data.history["key"] == metric].drop_duplicates(["run_id", "step"], keep="last")
    if h.empty:
        return pd.DataFrame(columns=cols)
    values = h.pivot(index="run_id", columns="step", values="value")  # one pivot for every group
    xs = h.pivot(index="run_id", columns="step", values=_X_COLUMN[x]).reindex_like(values).to_numpy()
    group_of = data.runs.set_index("run_id")[by].astype(str).reindex(values.index).to_numpy()
    steps, mat = values.columns.to_numpy(), values.to_numpy()
    out = []
    for g in pd.unique(group_of[~pd.isna(group_of)]):
        rows = group_of == g
        keep = ~np.isnan(mat[rows]).all(axis=0)  # the steps this group logged
        m = mat[rows][:, keep]
        value, low, high, n = stats.bootstrap_band(m, stat.value, level=level, reps=reps, seed=seed)
        out.append(pd.DataFrame({"group": g, "step": steps[keep], "x": np.nanmean(xs[rows][:, keep], axis=0),
                                 "value": value, "low": low, "high": high, "n": n}))  # fmt: skip
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def _top_groups(data: Data, by: str, max_groups: int) -> tuple[Data, list[str], str]:
    """At most ``max_groups`` groups, the best by their mean Last headline metric: the data restricted to them, their
    names, and a phrase for the figure's title ("" when every group is kept)."""
    groups = data.groups(by)
    if len(groups) <= max_groups:
        return data, groups, ""
    s = summary(data, data.headline)
    rank = s.assign(_g=s[by].astype(str)).groupby("_g")["last"].mean().sort_values(ascending=False)
    groups = [g for g in rank.index if g in set(groups)][:max_groups]
    keep = set(data.runs.loc[data.runs[by].astype(str).isin(groups), "run_id"])
    sub = Data(data.title, data.kind, data.runs[data.runs["run_id"].isin(keep)],
               data.history[data.history["run_id"].isin(keep)], data.parent, data.study, data.tracking_uri)  # fmt: skip
    return sub, groups, f" (the best {max_groups} of {rank.size} by Last {data.headline})"


def paper_panel(data: Data, *, metrics: Sequence[str] | None = None, by: str = "label", stat: Stat | str = Stat.MEAN,
                x: XAxis | str = XAxis.STEP, level: float = 0.95, reps: int = 1000, seed: int = 0,
                cols: int = 3, max_groups: int = 10) -> go.Figure:  # fmt: skip
    """One subplot per metric (default: every declared metric of ``data.metrics`` in the panel's order, at most 12),
    one line per group with its bootstrap band. With more than ``max_groups`` groups only the best ``max_groups`` by
    their mean Last headline metric are drawn (the title says so; the table and the grid show every group)."""
    stat, x = Stat(stat), XAxis(x)
    metrics = list(metrics or data.metrics[:12])
    data, groups, shown = _top_groups(data, by, max_groups)
    color = _colors(groups)
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, horizontal_spacing=0.07, vertical_spacing=0.12)
    for i, m in enumerate(metrics):
        r, c = i // cols + 1, i % cols + 1
        bands = curve_bands(data, m, by=by, stat=stat, x=x, level=level, reps=reps, seed=seed)
        for g, b in bands.groupby("group", sort=False):
            b = b.sort_values("x")
            bx, lo, hi, val = (b[c].to_numpy(float) for c in ("x", "low", "high", "value"))
            fig.add_trace(go.Scatter(x=np.r_[bx, bx[::-1]], y=np.r_[hi, lo[::-1]], fill="toself",
                                     mode="lines", fillcolor=_rgba(color[g], 0.18), line={"width": 0}, hoverinfo="skip",
                                     showlegend=False, legendgroup=g), row=r, col=c)  # fmt: skip
            fig.add_trace(go.Scatter(x=bx, y=val, mode="lines+markers", name=g, legendgroup=g,
                                     line={"color": color[g], "width": 2}, marker={"size": 4}, showlegend=i == 0,
                                     customdata=np.c_[lo, hi, b["n"].to_numpy(float)],
                                     hovertemplate=f"{g}<br>{m}: %{{y:.4g}} [%{{customdata[0]:.4g}}, "
                                                   f"%{{customdata[1]:.4g}}] n=%{{customdata[2]}}<extra></extra>"),
                          row=r, col=c)  # fmt: skip
        fig.update_xaxes(title_text=_X_TITLE[x] if r == rows else None, row=r, col=c)
    fig.update_layout(title=f"{data.title}: {stat.value} over runs, {round(level * 100)}% bootstrap band, by {by}{shown}",
                      height=300 * rows + 80, template="plotly_white", legend={"orientation": "h", "y": -0.08},
                      margin={"t": 80, "l": 50, "r": 20, "b": 40})  # fmt: skip
    return fig


# -- the paper's table -------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """The paper's table: ``cells`` has one row per group and per (metric, Last|Best) the columns ``value, low, high,
    n`` (and, with a baseline, ``delta, p_improve``); ``text`` the same as display strings, best bold (``**``),
    second underlined."""

    cells: pd.DataFrame
    text: pd.DataFrame
    baseline: str | None
    note: str

    def markdown(self) -> str:
        t = self.text
        head = "| " + " | ".join([t.index.name or "", *t.columns]) + " |"
        sep = "|" + "|".join(["---"] + [":-:"] * len(t.columns)) + "|"
        body = ["| " + " | ".join([str(i), *[_md(v) for v in row]]) + " |" for i, row in zip(t.index, t.to_numpy())]
        return "\n".join([head, sep, *body, "", self.note])

    def latex(self) -> str:
        t = self.text
        cols = "l" + "c" * len(t.columns)
        esc = _tex_escape
        lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
                 " & ".join([esc(t.index.name or ""), *[esc(c) for c in t.columns]]) + " \\\\", "\\midrule"]  # fmt: skip
        lines += [" & ".join([esc(str(i)), *[_tex(v) for v in row]]) + " \\\\" for i, row in zip(t.index, t.to_numpy())]
        lines += ["\\bottomrule", "\\end{tabular}", f"% {self.note}"]
        return "\n".join(lines)

    def html(self) -> str:
        t = self.text
        head = "".join(f"<th>{_html_escape(c)}</th>" for c in [t.index.name or "", *t.columns])
        body = "".join("<tr>" + f"<th>{_html_escape(str(i))}</th>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>"
                       for i, row in zip(t.index, t.to_numpy()))  # fmt: skip
        return f'<table class="paper"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><p class="note">{_html_escape(self.note)}</p>'


def paper_table(data: Data, *, metrics: Sequence[str] | None = None, by: str = "label", baseline: str | None = None,
                stat: Stat | str = Stat.MEAN, level: float = 0.95, reps: int = 2000, seed: int = 0) -> Table:  # fmt: skip
    """Groups x metrics x {Last, Best}: per run its Last and Best (``data.summary``), then over the group's runs
    (seeds) the statistic with its bootstrap CI (``stats.bootstrap_ci``). With ``baseline`` (a group), each cell also
    gets the difference of means to the baseline's and the probability that a run of this group beats a run of the
    baseline (``stats.probability_of_improvement``, Mann-Whitney). Groups are ordered by the first metric's Last."""
    stat = Stat(stat)
    metrics = list(metrics or _table_metrics(data))
    groups = data.groups(by)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline: {baseline!r} is not a {by} of {data.title}; allowed: {', '.join(groups)}")
    records: dict[str, dict[tuple[str, str, str], float]] = {g: {} for g in groups}
    per_run = {m: summary(data, m).assign(_g=lambda f: f[by].astype(str)) for m in metrics}
    for m in metrics:
        s = per_run[m]
        for which in ("last", "best"):
            base = s.loc[s["_g"] == baseline, which].dropna().to_numpy() if baseline else None
            for g in groups:
                vals = s.loc[s["_g"] == g, which].dropna().to_numpy()
                rec = records[g]
                if len(vals) == 0:
                    rec.update({(m, which, f): np.nan for f in ("value", "low", "high", "n")})
                    continue
                e = stats.bootstrap_ci(vals, stat.value, level=level, reps=reps, seed=seed)
                rec.update({(m, which, "value"): e.value, (m, which, "low"): e.low, (m, which, "high"): e.high,
                            (m, which, "n"): e.n})  # fmt: skip
                if base is not None and len(base) and g != baseline:
                    rec[(m, which, "delta")] = float(np.mean(vals) - np.mean(base))
                    rec[(m, which, "p_improve")] = stats.probability_of_improvement(vals, base)
    cells = pd.DataFrame.from_dict(records, orient="index")
    cells.columns = pd.MultiIndex.from_tuples(cells.columns, names=["metric", "which", "field"])
    cells.index.name = by
    first = (metrics[0], "last", "value")
    if first in cells:
        cells = cells.sort_values(first, ascending=False, na_position="last")
    text = pd.DataFrame(index=cells.index)
    for m in metrics:
        for which in ("last", "best"):
            col = f"{_short(m)} {which.capitalize()}"
            vals = cells[(m, which, "value")] if (m, which, "value") in cells else pd.Series(np.nan, index=cells.index)
            order = vals.dropna().sort_values(ascending=False).unique()
            marks = {v: i for i, v in enumerate(order[:2])}
            out = []
            for g in cells.index:
                v = cells.at[g, (m, which, "value")]
                if pd.isna(v):
                    out.append("—")
                    continue
                half = (cells.at[g, (m, which, "high")] - cells.at[g, (m, which, "low")]) / 2
                s = f"{v:.3f} ± {half:.3f} ({int(cells.at[g, (m, which, 'n')])})"
                rank = marks.get(v)
                s = f"**{s}**" if rank == 0 else (f"__{s}__" if rank == 1 else s)
                if baseline and g != baseline and (m, which, "delta") in cells and not pd.isna(cells.at[g, (m, which, "delta")]):
                    s += f" Δ {cells.at[g, (m, which, 'delta')]:+.3f}, P(>) {cells.at[g, (m, which, 'p_improve')]:.2f}"
                out.append(s)
            text[col] = out
    text.index.name = by
    note = (f"{stat.value} over runs (seeds) ± half the {round(level * 100)}% percentile bootstrap CI ({reps} resamples, "
            f"seed {seed}), (n runs). Last: the value at the last logged step; Best: the best over steps (spec §8). "
            f"Bold: best, underlined: second." + (f" Δ: difference of means to {baseline}; P(>): probability that a run "
                                                    f"beats a run of {baseline} (Mann-Whitney)." if baseline else ""))  # fmt: skip
    return Table(cells, text, baseline, note)


def _table_metrics(data: Data) -> list[str]:
    bench = [m for m in data.metrics if m.startswith("eval/") and "/mean_at_" in m]
    return bench or [data.headline]


def _short(metric: str) -> str:
    parts = metric.split("/")
    if len(parts) == 3 and parts[0] == "eval" and parts[2].startswith("mean_at_"):
        return f"{parts[1].upper()} Mean@{parts[2].removeprefix('mean_at_')}"
    return metric


def _md(s: str) -> str:
    return s.replace("__", "<u>", 1).replace("__", "</u>", 1) if s.startswith("__") else s


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("Δ", r"$\Delta$"),
                 ("±", r"$\pm$"), ("β", r"$\beta$"), ("—", "--")):  # fmt: skip
        s = s.replace(a, b)
    return s


def _tex(s: str) -> str:
    if s.startswith("**"):
        core, _, rest = s[2:].partition("**")
        return r"\textbf{" + _tex_escape(core) + "}" + _tex_escape(rest)
    if s.startswith("__"):
        core, _, rest = s[2:].partition("__")
        return r"\underline{" + _tex_escape(core) + "}" + _tex_escape(rest)
    return _tex_escape(s)


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _html(s: str) -> str:
    if s.startswith("**"):
        core, _, rest = s[2:].partition("**")
        return f"<b>{_html_escape(core)}</b>{_html_escape(rest)}"
    if s.startswith("__"):
        core, _, rest = s[2:].partition("__")
        return f"<u>{_html_escape(core)}</u>{_html_escape(rest)}"
    return _html_escape(s)


# -- the design grid ---------------------------------------------------------------------------------------------------

GRID_ROWS = ("direction", "normalized")
GRID_COLS = ("form", "clip")


def grid_values(data: Data, metric: str | None = None, *, level: float = 0.95, reps: int = 2000,
                seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """``estimator, row, col, value, low, high, n, failed, runs``: per grid cell (direction/normalization x form/clip,
    one facet per estimator) the IQM of the runs' Last ``metric`` with its bootstrap CI; ``failed`` counts the cell's
    runs that failed or ended NaN."""
    metric = metric or data.headline
    s = summary(data, metric)
    r = data.runs.set_index("run_id")
    s = s.assign(**{a: s["run_id"].map(r[a]).astype(str) for a in ("estimator", *GRID_ROWS, *GRID_COLS)})
    s["row"] = s["direction"] + " / " + s["normalized"].map({"true": "normalized", "false": "unnormalized"}).fillna(s["normalized"])
    s["col"] = s["form"] + " / " + s["clip"]
    out = []
    for (est, row, col), c in s.groupby(["estimator", "row", "col"], sort=True):
        ok = c[(c["status"] != "FAILED") & c["last"].notna() & np.isfinite(c["last"].astype(float))]
        rec = {"estimator": est, "row": row, "col": col, "n": len(ok), "failed": len(c) - len(ok), "runs": len(c)}
        if len(ok):
            e = stats.bootstrap_ci(ok["last"].to_numpy(float), "iqm", level=level, reps=reps, seed=seed)
            rec.update(value=e.value, low=e.low, high=e.high)
        else:
            rec.update(value=np.nan, low=np.nan, high=np.nan)
        out.append(rec)
    return pd.DataFrame(out, columns=["estimator", "row", "col", "value", "low", "high", "n", "failed", "runs"])


def design_grid(data: Data, metric: str | None = None, **kw: Any) -> go.Figure:
    """Heatmaps of ``grid_values``: rows direction/normalization, columns form/clip, one facet per estimator; each cell
    shows IQM [CI] n; a cell whose runs all failed reads "failed", one with no run "—"."""
    metric = metric or data.headline
    v = grid_values(data, metric, **kw)
    rows = sorted(v["row"].unique())
    cols = sorted(v["col"].unique())
    ests = sorted(v["estimator"].unique()) or ["—"]
    fig = make_subplots(rows=1, cols=len(ests), subplot_titles=[f"estimator {e}" for e in ests], horizontal_spacing=0.08)
    finite = v["value"].dropna()
    zmin, zmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if zmax - zmin < 1e-12:  # every cell equal: a scale around the value rather than plotly's -0.5..0.5
        zmin, zmax = zmin - 0.5 * (abs(zmin) or 1), zmax + 0.5 * (abs(zmax) or 1)
    for i, e in enumerate(ests):
        z = np.full((len(rows), len(cols)), np.nan)
        text = [["—"] * len(cols) for _ in rows]
        for rec in v[v["estimator"] == e].itertuples():
            a, b = rows.index(rec.row), cols.index(rec.col)
            if rec.n == 0:
                text[a][b] = f"failed ({rec.failed})" if rec.failed else "—"
            else:
                z[a, b] = rec.value
                text[a][b] = f"{rec.value:.3f}<br>[{rec.low:.3f}, {rec.high:.3f}]<br>n={rec.n}" + (
                    f", {rec.failed} failed" if rec.failed else "")  # fmt: skip
        fig.add_trace(go.Heatmap(z=z, x=cols, y=rows, text=text, texttemplate="%{text}", colorscale="Viridis",
                                 zmin=zmin, zmax=zmax, showscale=i == len(ests) - 1, hoverongaps=False,
                                 hovertemplate="%{y} | %{x}<br>%{text}<extra></extra>"), row=1, col=i + 1)  # fmt: skip
    fig.update_layout(title=f"{data.title}: Last {metric}, IQM over seeds with 95% CI, per design cell",
                      height=140 + 90 * max(1, len(rows)), template="plotly_white", margin={"t": 80, "l": 60, "r": 20})  # fmt: skip
    return fig


# -- the trade-off -----------------------------------------------------------------------------------------------------


def tradeoff_points(data: Data, metric: str | None = None, kl: str | None = None) -> pd.DataFrame:
    """``group, label, direction, normalized, kl, metric, n, pareto``: per configuration, the mean over its runs of
    the run's mean KL over steps (``kl``: the first of k3, k1, k2, the loss's KL value that the runs logged) and of
    its Last ``metric``; ``pareto``: no other configuration has both less KL and a higher metric."""
    metric = metric or data.headline
    keys = set(data.history["key"])
    kl = kl or next((k for k in KL_KEYS if k in keys), KL_KEYS[0])
    s = summary(data, metric)
    k = summary(data, kl)
    r = data.runs.set_index("run_id")
    f = s[["run_id", "group", "label"]].assign(metric=s["last"], kl=s["run_id"].map(k.set_index("run_id")["mean"]))
    f = f.assign(direction=f["run_id"].map(r["direction"]), normalized=f["run_id"].map(r["normalized"]))
    g = f.groupby("group").agg(label=("label", "first"), direction=("direction", "first"),
                               normalized=("normalized", "first"), kl=("kl", "mean"), metric=("metric", "mean"),
                               n=("metric", "count")).reset_index()  # fmt: skip
    ok = g.dropna(subset=["kl", "metric"])
    g["pareto"] = [
        bool(not pd.isna(a.kl) and not pd.isna(a.metric) and not ((ok["kl"] <= a.kl) & (ok["metric"] >= a.metric)
             & ((ok["kl"] < a.kl) | (ok["metric"] > a.metric))).any())
        for a in g.itertuples()
    ]  # fmt: skip
    g.attrs.update(metric=metric, kl=kl)
    return g


def tradeoff(data: Data, metric: str | None = None, kl: str | None = None) -> go.Figure:
    p = tradeoff_points(data, metric, kl)
    metric, kl = p.attrs["metric"], p.attrs["kl"]
    fig = go.Figure()
    symbols = {"true": "circle", "false": "diamond"}
    colors = _colors(sorted(p["direction"].dropna().astype(str).unique()))
    for (d, nz), q in p.groupby([p["direction"].astype(str), p["normalized"].astype(str)]):
        fig.add_trace(go.Scatter(x=q["kl"], y=q["metric"], mode="markers", name=f"{d} / {'normalized' if nz == 'true' else 'unnormalized'}",
                                 marker={"color": colors.get(d, "#444"), "symbol": symbols.get(nz, "square"), "size": 11,
                                         "line": {"width": 1, "color": "#222"}},
                                 text=q["label"], customdata=q["n"],
                                 hovertemplate="%{text}<br>KL %{x:.4g}<br>" + metric + " %{y:.4g}<br>n=%{customdata}<extra></extra>"))  # fmt: skip
    front = p[p["pareto"]].sort_values("kl")
    if len(front):
        fig.add_trace(go.Scatter(x=front["kl"], y=front["metric"], mode="lines", name="Pareto front (less KL, higher metric)",
                                 line={"dash": "dash", "color": "#333"}, hoverinfo="skip"))  # fmt: skip
    fig.update_layout(title=f"{data.title}: mean {kl} over training vs Last {metric} (mean over seeds)",
                      xaxis_title=f"mean {kl}", yaxis_title=f"Last {metric}", template="plotly_white", height=460)  # fmt: skip
    return fig


# -- stability ---------------------------------------------------------------------------------------------------------


def stability_table(data: Data, *, collapse: float = 0.1) -> pd.DataFrame:
    """Per configuration: ``runs``, ``failed`` (status FAILED), ``nan`` (runs that logged a NaN or infinite loss,
    reward, gradient norm or KL estimate), ``entropy_collapsed`` (runs whose last entropy fell below ``collapse`` x their first),
    ``entropy_ratio`` (mean over runs of last / first entropy), ``length_cap`` (mean over runs of the fraction of
    responses at the length cap over the last third of the run's steps)."""
    h = data.history
    per_run = data.runs.set_index("run_id")[["group"]].copy()
    bad = h[h["key"].isin(["actor/loss", "reward/mean", "actor/grad_norm", *KL_KEYS]) & ~np.isfinite(h["value"])]
    per_run["nan"] = per_run.index.isin(bad["run_id"].unique())
    ent = h[h["key"] == "actor/entropy"].sort_values(["run_id", "step"]).groupby("run_id")["value"]
    first, last, count = ent.first(), ent.last(), ent.count()
    ratio = (last / first).where((count >= 2) & (first > 0))
    per_run["entropy_ratio"] = ratio.reindex(per_run.index)
    cap = h[h["key"] == "response_length/clip_frac"]
    tail = cap[cap["step"] >= cap.groupby("run_id")["step"].transform("max") * 2 / 3]
    per_run["length_cap"] = tail.groupby("run_id")["value"].mean().reindex(per_run.index)
    per_run["failed"] = (data.runs.set_index("run_id")["status"] == "FAILED").reindex(per_run.index)
    g = per_run.groupby("group", sort=False)
    out = pd.DataFrame({
        "label": data.runs.drop_duplicates("group").set_index("group")["label"],
        "runs": g.size(), "failed": g["failed"].sum().astype(int), "nan": g["nan"].sum().astype(int),
        "entropy_collapsed": g["entropy_ratio"].apply(lambda r: int((r < collapse).sum())),
        "entropy_ratio": g["entropy_ratio"].mean(), "length_cap": g["length_cap"].mean(),
    })  # fmt: skip
    out.index.name = "group"
    return out.reset_index()[["group", "label", "runs", "failed", "nan", "entropy_collapsed", "entropy_ratio",
                              "length_cap"]]  # fmt: skip


def stability(data: Data, table: pd.DataFrame | None = None, **kw: Any) -> go.Figure:
    """Bars of ``stability_table`` (given, or computed with ``kw``) per configuration."""
    t = stability_table(data, **kw) if table is None else table
    fig = make_subplots(rows=1, cols=3, subplot_titles=["last / first entropy (mean over runs)",
                                                        "responses at the length cap (last third)",
                                                        "failed or NaN runs"])  # fmt: skip
    fig.add_trace(go.Bar(x=t["label"], y=t["entropy_ratio"], marker_color="#1f77b4", name="entropy ratio"), row=1, col=1)
    fig.add_trace(go.Bar(x=t["label"], y=t["length_cap"], marker_color="#ff7f0e", name="length cap"), row=1, col=2)
    fig.add_trace(go.Bar(x=t["label"], y=t["failed"] + t["nan"], marker_color="#d62728", name="failed/NaN",
                         text=[f"{a}/{n}" for a, n in zip(t["failed"] + t["nan"], t["runs"])]), row=1, col=3)  # fmt: skip
    fig.update_layout(title=f"{data.title}: stability per configuration", showlegend=False, template="plotly_white",
                      height=420)  # fmt: skip
    return fig


# -- performance profiles ----------------------------------------------------------------------------------------------


def performance_profiles(data: Data, metric: str | None = None, *, by: str = "label", points: int = 101,
                         level: float = 0.95, reps: int = 1000, seed: int = 0, max_groups: int = 10) -> go.Figure:  # fmt: skip
    """The run-score distributions (rliable): for each threshold tau, the fraction of a group's runs whose Last
    ``metric`` exceeds tau, with a bootstrap band."""
    metric = metric or data.headline
    data, groups, shown = _top_groups(data, by, max_groups)
    s = summary(data, metric)
    vals = s["last"].dropna()
    lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)
    taus = np.linspace(lo - 1e-9, hi, points)
    color = _colors(groups)
    fig = go.Figure()
    for g in groups:
        x = s.loc[s[by].astype(str) == g, "last"].dropna().to_numpy()
        if not len(x):
            continue
        y = stats.performance_profile(x, taus)
        low, high = stats.performance_profile_band(x, taus, level=level, reps=reps, seed=seed)
        fig.add_trace(go.Scatter(x=np.r_[taus, taus[::-1]], y=np.r_[high, low[::-1]], fill="toself", hoverinfo="skip", mode="lines",
                                 fillcolor=_rgba(color[g], 0.15), line={"width": 0}, showlegend=False))  # fmt: skip
        fig.add_trace(go.Scatter(x=taus, y=y, name=g, line={"color": color[g], "shape": "hv"}))
    fig.update_layout(title=f"{data.title}: performance profile of Last {metric}{shown}", xaxis_title=f"threshold τ on {metric}",
                      yaxis_title="fraction of runs > τ", template="plotly_white", height=420)  # fmt: skip
    return fig


# -- tuning studies ----------------------------------------------------------------------------------------------------


def trials_table(data: Data, mlflow_url: str | None = None) -> pd.DataFrame:
    """``number, state, value, params..., runs, links``: one row per trial of the study (Optuna's record), each with
    its MLflow run ids and, given the MLflow UI's base URL, links to them."""
    study = data.study
    if study is None:
        return pd.DataFrame(columns=["number", "state", "value", "runs"])
    rows = []
    for t in study.get_trials(deepcopy=False):
        ids = list(t.user_attrs.get("mlflow_run_ids") or [])
        row = {"number": t.number, "state": t.state.name, "value": t.value, **{f"params.{k}": v for k, v in t.params.items()},
               "runs": ",".join(ids)}  # fmt: skip
        if mlflow_url:
            row["links"] = " ".join(run_url(mlflow_url, r) for r in ids)
        rows.append(row)
    return pd.DataFrame(rows)


def run_url(base: str, run_id: str) -> str:
    """A run's page in the MLflow UI (its direct-run route redirects to the run within its experiment)."""
    return f"{base.rstrip('/')}/#/runs/{run_id}"


def study_figures(data: Data) -> list[tuple[str, go.Figure]]:
    """Optuna's own plotly figures of the study: optimization history, parameter importances (2+ complete trials),
    a slice per parameter and a contour of the first two parameters (beta and the clip epsilons when searched)."""
    import warnings

    import optuna.visualization as ov
    from optuna.trial import TrialState

    study = data.study
    if study is None:
        return []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state is TrialState.COMPLETE]
    params = sorted({k for t in complete for k in t.params}, key=lambda k: (not k.endswith("beta"), "clip" not in k, k))
    out: list[tuple[str, go.Figure]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if complete:
            out.append(("optimization_history", ov.plot_optimization_history(study)))
        if len(complete) >= 2 and params:
            try:
                out.append(("param_importances", ov.plot_param_importances(study)))
            except (RuntimeError, ValueError):  # fANOVA needs distinct values
                pass
        if complete and params:
            out.append(("slice", ov.plot_slice(study, params=params[:4])))
        if len(complete) >= 3 and len(params) >= 2:
            out.append(("contour", ov.plot_contour(study, params=params[:2])))
    for _name, f in out:
        f.update_layout(template="plotly_white", height=max(420, f.layout.height or 0))
    return out
