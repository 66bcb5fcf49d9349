"""A coordinator's progress in the Prefect UI while it runs: a progress bar artifact and a Markdown table of its runs
(state, machine, device, MLflow link, headline metric), both under fixed keys, updated whenever a run changes state
(each update is a new version of the keyed artifact; the UI shows the newest)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd

from flows.dispatch import RunState, Ticket
from rpg_core.runs import get_runs
from rpg_core.tracking import Tracker

__all__ = ["Progress", "mlflow_link"]

HEADLINE = ("eval/acc_strict", "acc/strict", "reward/mean")  # the first one a run has is its headline metric
# How a state reads on the board: a queued run is waiting for a GPU slot (or a pool worker), not running
SHOWN = {RunState.QUEUED: "waiting for a GPU slot"}


def shown(state: RunState) -> str:
    return SHOWN.get(state, state.value)


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the store is a tracking server (``http(s)://``), else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    from rpg_core.mlflow_view import run_fragment

    return f"{tracking_uri.rstrip('/')}/{run_fragment(experiment_id, run_id)}"


def headline(tracking_uri: str, run_ids: Sequence[str]) -> dict[str, tuple[str, float]]:
    """run id -> (metric name, final value) of the first of ``HEADLINE`` it logged (one search)."""
    if not run_ids:
        return {}
    final = get_runs(list(run_ids), tracking_uri=tracking_uri).set_index("run_id")
    out = {}
    for rid in final.index:
        for name in HEADLINE:
            if name in final.columns and not pd.isna(value := final.at[rid, name]):
                out[rid] = (name, float(value))
                break
    return out


class Progress:
    """The artifacts of one coordinator run (``key``: lower-case letters, digits and dashes)."""

    def __init__(self, key: str, title: str, parent: Tracker, *, skipped: int = 0):
        self.key, self.title, self.parent, self.skipped = key, title, parent, skipped
        self._bar: Any = None
        self.t0 = time.time()

    def update(self, tickets: Sequence[Ticket]) -> str:
        """Write the artifacts for the tickets' current states; returns the Markdown."""
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

        counts = Counter(t.state for t in tickets)
        done = sum(counts[s] for s in RunState if s.terminal)
        fraction = 100.0 * done / max(1, len(tickets))
        if self._bar is None:
            self._bar = create_progress_artifact(fraction, key=f"{self.key}-progress", description=self.title)
        else:
            update_progress_artifact(self._bar, fraction)
        md = self.markdown(tickets, counts)
        create_markdown_artifact(md, key=f"{self.key}-runs", description=self.title)
        return md

    def markdown(self, tickets: Sequence[Ticket], counts: Counter | None = None) -> str:
        counts = counts if counts is not None else Counter(t.state for t in tickets)
        uri, exp = self.parent.tracking_uri, self.parent.experiment_id
        finished = [t.run_id for t in tickets if t.run_id and t.state is RunState.FINISHED]
        metrics = headline(uri, finished)
        parts = ", ".join(f"{counts[s]} {shown(s)}" for s in RunState if counts[s])
        lines = [
            f"### {self.title}",
            f"{len(tickets)} runs: {parts or 'none'}"
            + (f"; {self.skipped} already finished earlier (skipped)" if self.skipped else "")
            + f"; {time.time() - self.t0:.0f} s",
            "",
            "| # | run | state | host | device | MLflow run | metric | s |",
            "|---:|---|---|---|---|---|---|---:|",
        ]
        for t in tickets:
            link = mlflow_link(uri, exp, t.run_id) if t.run_id else None
            run = f"[{t.run_id[:8]}]({link})" if link else (t.run_id[:8] if t.run_id else "")
            m = metrics.get(t.run_id or "")
            state = shown(t.state) + (f": {t.message[:80]}" if t.message and t.state is RunState.FAILED else "")
            seconds = f"{t.seconds:.0f}" if t.seconds is not None else ""
            name = t.name or t.run_key
            lines.append(f"| {t.index} | `{name}` | {state} | {t.host} | {t.gpu} | {run} | "
                         f"{f'{m[0]} {m[1]:.3f}' if m else ''} | {seconds} |")  # fmt: skip
        parent = mlflow_link(uri, exp, self.parent.run_id)
        lines += ["", f"Parent MLflow run: {f'[{self.parent.run_id}]({parent})' if parent else self.parent.run_id}"]
        return "\n".join(lines)
