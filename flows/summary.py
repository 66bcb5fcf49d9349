"""The answer a sweep gives: its configurations ranked by the headline metric, mean and bootstrap CI over seeds, each
seed linked to its MLflow run. The sweep flow logs it to its parent MLflow run (``ranked.json``, a table; ``ranked.md``;
and the run's description, so the parent's page in the MLflow UI shows the ranking) and shows it as a Prefect
Markdown artifact; its last log line links to the comparison views.

It reads the runs through ``dashboards.data`` (the one way to read a sweep: the same selection, labels in the paper's
words and headline metric as ``rpg report`` and the live dashboard) and takes its interval from ``dashboards.stats``.

```python
ranking = rank("smoke", tracking_uri=uri)
print(ranking.markdown())         # | rank | configuration | eval/acc_strict (Last) | seeds | ...
ranking.log_to(parent)            # ranked.json, ranked.md, the parent's description
```
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dashboards import stats
from dashboards.data import load, summary
from rpg_core.tracking import Tracker

__all__ = ["Ranking", "comparison_links", "mlflow_base", "rank"]

NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (Markdown)
NOTE_ROWS = 20  # configurations in the description (all of them in ranked.md and ranked.json)


def mlflow_base(tracking_uri: str) -> str | None:
    """The MLflow UI's address for links: the tracking server itself (``http(s)://``), else None (a local store has no
    UI running: ``mlflow ui --backend-store-uri`` it)."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def run_link(base: str | None, run_id: str, text: str, experiment_id: str | None = None) -> str:
    """``[text](<base>/#/experiments/<eid>/runs/<id>?workflowType=machine_learning)`` (the run's page in the UI's
    "Model training" mode, ``mlflow_view.run_fragment``; ``<base>/#/runs/<id>`` without the experiment id), or
    ``text`` without a UI to link to."""
    if not base:
        return text
    from rpg_core.mlflow_view import run_fragment

    return f"[{text}]({base}/{run_fragment(experiment_id, run_id) if experiment_id else f'#/runs/{run_id}'})"


@dataclass(frozen=True)
class Ranking:
    """One row per configuration of a sweep, best first by the mean of its seeds' Last value of ``metric``."""

    sweep: str
    metric: str
    tracking_uri: str
    rows: list[dict[str, Any]]  # rank, configuration, axes..., mean, low, high, n, runs: [(seed, run_id, last, status)]
    axes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)  # run id -> experiment id (for the runs' links)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows and not math.isnan(self.rows[0]["mean"]) else None

    def headline(self) -> str:
        """One line: the best configuration and its estimate, e.g. ``URKL 0.312 [0.265, 0.359] (n=3 seeds)``."""
        b = self.best
        if b is None:
            return f"no run of sweep {self.sweep} logged {self.metric}"
        return f"best on {self.metric} (Last): {b['configuration']} {_estimate(b)}"

    def table(self) -> list[dict[str, Any]]:
        """Plain rows (JSON-ready) for ``ranked.json``: one per configuration."""
        out = []
        for r in self.rows:
            out.append({"rank": r["rank"], "configuration": r["configuration"], **{a: r[a] for a in self.axes},
                        "metric": self.metric, "mean": _num(r["mean"]), "ci_low": _num(r["low"]),
                        "ci_high": _num(r["high"]), "seeds": r["n"],
                        "runs": " ".join(f"s{s}:{rid}" for s, rid, _, _ in r["runs"])})  # fmt: skip
        return out

    def markdown(self, base: str | None = None, limit: int | None = None) -> str:
        """The ranking as a Markdown table whose seeds link to their MLflow runs (``base``: the MLflow UI; default:
        the tracking server, if it is one); ``limit``: the first so many configurations."""
        base = base if base is not None else mlflow_base(self.tracking_uri)
        axes = [a for a in self.axes if a not in ("seed",)]
        lines = [f"### sweep {self.sweep}: {self.headline()}", "",
                 f"Configurations ranked by the mean over seeds of the Last `{self.metric}`, with a 95 % bootstrap "
                 "interval over seeds (one seed: no interval).", "",
                 "| rank | configuration | " + "".join(f"{a} | " for a in axes) + f"{self.metric} | seeds (MLflow runs) |",
                 "|---:|---|" + "---|" * len(axes) + "---|---|"]  # fmt: skip
        for r in self.rows[:limit]:
            seeds = ", ".join(run_link(base, rid, f"s{s}" + ("" if math.isnan(v) else f" {v:.3f}"),
                                       self.experiments.get(rid)) +
                              ("" if status == "FINISHED" else f" ({status.lower()})")
                              for s, rid, v, status in r["runs"])  # fmt: skip
            lines.append(f"| {r['rank']} | **{r['configuration']}** | " + "".join(f"{r[a]} | " for a in axes)
                         + f"{_estimate(r)} | {seeds} |")  # fmt: skip
        if limit is not None and len(self.rows) > limit:
            lines.append(f"| | … {len(self.rows) - limit} more configurations in `ranked.md` | " + "| " * len(axes) + "| |")
        lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines).rstrip() + "\n"

    def log_to(self, parent: Tracker) -> None:
        """On the sweep's parent run: ``ranked.json`` (a table), ``ranked.md``, and the Markdown as the run's
        description (the MLflow UI shows it on the run's page)."""
        parent.log_table(self.table(), "ranked.json")
        parent.log_text(self.markdown(), "ranked.md")
        parent.set_tags({NOTE_TAG: self.markdown(limit=NOTE_ROWS)})  # a tag holds 8000 characters


def rank(sweep: str, *, tracking_uri: str, metric: str | None = None, level: float = 0.95, seed: int = 0) -> Ranking:
    """Rank the configurations of ``sweep`` (every training run tagged with it in ``tracking_uri``) by ``metric``
    (default: the headline, ``Data.headline``: a benchmark's Mean@k, else held-out strict accuracy, else the reward).
    Per configuration: the mean of its finished seeds' Last values and a percentile bootstrap CI over seeds
    (``stats.bootstrap_ci``); failed or unfinished seeds are listed but left out of the estimate."""
    data = load(sweep=sweep, tracking_uri=tracking_uri, keys=None if metric is None else [metric])
    metric = metric or data.headline
    per_run = summary(data, metric) if metric in set(data.history["key"]) else data.runs.assign(last=np.nan)
    axes = [a for a in data.varying_axes if a not in ("seed", "config_key", "objective_key")]
    rows = []
    for label, g in per_run.groupby("label", sort=False):
        g = g.sort_values("seed")
        ok = g[(g["status"] == "FINISHED") & g["last"].notna()]["last"].to_numpy(dtype=float)
        if len(ok):
            e = stats.bootstrap_ci(ok, "mean", level=level, seed=seed)
            mean, low, high = e.value, e.low, e.high
        else:
            mean = low = high = math.nan
        first = g.iloc[0]
        rows.append({"configuration": str(label), **{a: first.get(a) for a in axes}, "mean": mean, "low": low,
                     "high": high, "n": len(ok),
                     "runs": [(int(s) if not _isna(s) else "?", rid, float(v) if not _isna(v) else math.nan, str(st))
                              for s, rid, v, st in zip(g["seed"], g["run_id"], g["last"], g["status"], strict=True)]})  # fmt: skip
    rows.sort(key=lambda r: (math.isnan(r["mean"]), -r["mean"] if not math.isnan(r["mean"]) else 0.0, r["configuration"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    runs = data.runs
    experiments = dict(zip(runs["run_id"], runs["experiment_id"], strict=True)) if "experiment_id" in runs else {}
    return Ranking(sweep, metric, tracking_uri, rows, axes, list(data.notes), experiments)


def comparison_links(sweep: str, tracking_uri: str, mlflow_view: str | None = None) -> list[str]:
    """Where to compare the sweep's runs: the live dashboard (``$RPG_DASHBOARD_URL``, set by ``make up``), the MLflow
    UI (``mlflow_view``: the sweep's saved view, rpg_core.mlflow_view; else the tracking server), and the offline
    report command."""
    links = []
    dash = os.environ.get("RPG_DASHBOARD_URL", "").strip()
    if dash:
        links.append(f"dashboard {dash.rstrip('/')}/?sweep={sweep}")
    base = mlflow_view or mlflow_base(tracking_uri)
    if base:
        links.append(f"MLflow {base}")
    links.append(f"report: rpg report --sweep {sweep}")
    return links


def _estimate(r: dict[str, Any]) -> str:
    if r["n"] == 0 or math.isnan(r["mean"]):
        return "–"
    if r["n"] == 1:
        return f"{r['mean']:.3f} (n=1)"
    return f"{r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}] (n={r['n']})"


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def _isna(x: Any) -> bool:
    try:
        return bool(x is None or (isinstance(x, float) and math.isnan(x)) or (hasattr(x, "__class__") and str(x) == "<NA>"))
    except (TypeError, ValueError):
        return False
