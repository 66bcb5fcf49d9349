"""Tidy frames for the comparisons: what a sweep, a set of runs or a tuning study holds, read through the read API
(``rpg_core.runs``: batched searches and histories) and nothing else.

* ``Data.runs``: one row per training run: ``run_id, name, status, seed`` (int), ``group`` (the config key, which the
  seeds of one configuration share), ``label`` (what the configuration is, in the paper's words: the method, or the
  design axes that differ within the selection, e.g. ``RKL-k3``), the design axes (``AXES``), ``trial`` (a study's
  trial number, else NA), then one column per metric with its final value (as the read API gives it).
* ``Data.history``: the long frame ``run_id, key, step, value, timestamp`` at full resolution, plus ``wall_s``
  (seconds since the run's first point) and ``tokens`` (cumulative prompt + response tokens at that step, from
  ``perf/tokens_per_s x time/step``; NaN where the run logged no throughput).
* ``summary(data, metric)``: per run its Last (value at the last step it was logged), Best (the best over steps:
  the paper's Best for evaluation metrics, spec §8) and mean over the run.
* ``problem_scores(data)``: the per-problem evaluation tables (``eval/step_NNNNNN/<bench>_problems.json``: the
  held-out problems of the trainer, or a benchmark's) at each run's last evaluation: the input of paired comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rpg_core import metrics as schema
from rpg_core import runs as read
from rpg_core.tracking import RunKind

__all__ = ["AXES", "PANEL", "Data", "load", "problem_scores", "summary"]

# The design axes a comparison groups by (tags written by RunConfig.axis_tags), in the order a label names them.
AXES = ("method", "divergence", "form", "estimator", "kl_is_weight", "clip", "agg", "beta", "advantage", "reference",
        "direction", "normalized", "preset", "model", "task")  # fmt: skip
# The paper panel's metrics (spec §8 and the training curves of its figures), in the order they are drawn; the
# benchmark Mean@k metrics a selection has are put first.
PANEL = ("eval/acc_strict", "reward/mean", "acc/strict", "actor/entropy", "response_length/mean",
         "response_length/clip_frac", "actor/kl_k1", "actor/kl_k2", "actor/kl_k3", "actor/clipfrac",
         "actor/clipfrac_dual", "actor/grad_norm")  # fmt: skip
_TOKENS_KEYS = ("perf/tokens_per_s", "time/step")
_VIEW_EXTRA = ("actor/kl_value", "actor/loss", "eval/best_acc_strict", "actor/clipfrac_high", "actor/clipfrac_low")
_STUDY_TAG, _TRIAL_TAG = "rpg.study", "rpg.trial"  # flows.tuner's tags (dashboards does not import flows)
_MEAN_AT_K = re.compile(r"^eval/(?P<bench>[^/]+)/mean_at_(?P<k>\d+)$")


@dataclass
class Data:
    """A selection's runs, histories and parent (the sweep's or study's MLflow run), ready for dashboards.views."""

    title: str
    kind: str  # "sweep" | "runs" | "study"
    runs: pd.DataFrame
    history: pd.DataFrame
    parent: pd.Series | None = None
    study: Any = None  # an optuna.Study for a study selection
    tracking_uri: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """The declared metrics the histories hold: Mean@k benchmarks first, then PANEL's order, then the rest."""
        keys = set(self.history["key"].unique())
        declared = [k for k in keys if _declared(k)]
        bench = sorted(k for k in declared if _MEAN_AT_K.match(k))
        panel = [k for k in PANEL if k in keys]
        rest = sorted(set(declared) - set(bench) - set(panel))
        return [*bench, *panel, *rest]

    @property
    def headline(self) -> str:
        """The metric a table ranks by: the first benchmark's Mean@k (spec §8), else held-out strict accuracy, else
        the training reward."""
        for k in self.metrics:
            if _MEAN_AT_K.match(k):
                return k
        for k in ("eval/acc_strict", "acc/strict", "reward/mean"):
            if k in set(self.history["key"]):
                return k
        return self.metrics[0] if self.metrics else "reward/mean"

    @property
    def varying_axes(self) -> list[str]:
        """The design axes whose value differs between the selection's configurations."""
        return [a for a in AXES if a in self.runs and self.runs[a].nunique(dropna=False) > 1]

    def groups(self, by: str = "label") -> list[str]:
        """The values of ``by``, sorted with numbers compared as numbers (``s2`` before ``s10``): the same order on
        every page, so a group keeps its colour."""
        if by not in self.runs:
            raise ValueError(f"by: {by!r} is not a column of the runs; allowed: label, group, seed, {', '.join(AXES)}")
        return sorted(self.runs[by].dropna().astype(str).unique(), key=_natural)


def load(
    *,
    sweep: str | None = None,
    runs: Sequence[str] | None = None,
    study: str | None = None,
    keys: Sequence[str] | str | None = None,
    extra: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> Data:
    """The training runs of one sweep (its tag ``sweep``), of the given run ids, or of one tuning study (tag
    ``rpg.study``), with their histories of ``keys`` (None: what the views draw, ``PANEL``, every benchmark's Mean@k
    and the KL values, plus ``extra``; ``"all"``: every metric they logged). Exactly one selection. Raises ValueError naming the
    selection when it matches no training run."""
    chosen = [n for n, v in (("sweep", sweep), ("runs", runs), ("study", study)) if v]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of sweep, runs, study (got {', '.join(chosen) or 'none'})")
    parent = None
    ostudy = None
    notes: list[str] = []
    if sweep:
        frame = read.find_runs(kind=RunKind.TRAIN, sweep=sweep, tracking_uri=tracking_uri)
        parents = read.find_runs(kind=RunKind.SWEEP, sweep=sweep, tracking_uri=tracking_uri, limit=1)
        parent = parents.iloc[0] if len(parents) else None
        title, kind = f"sweep {sweep}", "sweep"
        if frame.empty:
            known = read.find_runs(kind=RunKind.SWEEP, tracking_uri=tracking_uri)["sweep"].dropna().unique()
            raise ValueError(f"sweep: no training runs tagged sweep={sweep!r} in {tracking_uri or 'the default store'}; "
                             f"sweeps there: {', '.join(sorted(known)) or 'none'}")  # fmt: skip
    elif runs:
        ids = [r.strip() for r in runs if r.strip()]
        frame = read.get_runs(ids, tracking_uri=tracking_uri)
        missing = [r for r in ids if r not in set(frame["run_id"])]
        if missing:
            raise ValueError(f"runs: no such run(s): {', '.join(missing)}")
        frame = frame[frame["kind"] == RunKind.TRAIN.value].reset_index(drop=True)
        if frame.empty:
            raise ValueError("runs: none of these is a training run")
        title, kind = f"{len(frame)} runs", "runs"
    else:
        frame = read.find_runs(kind=RunKind.TRAIN, tags={_STUDY_TAG: study}, tracking_uri=tracking_uri)
        parents = read.find_runs(kind=RunKind.TUNE, tags={_STUDY_TAG: study}, tracking_uri=tracking_uri, limit=1)
        parent = parents.iloc[0] if len(parents) else None
        title, kind = f"study {study}", "study"
        if frame.empty and parent is None:
            tunes = read.find_runs(kind=RunKind.TUNE, tracking_uri=tracking_uri)
            known = sorted({read.run_tags(r, tracking_uri=tracking_uri).get(_STUDY_TAG, "") for r in tunes["run_id"]} - {""})
            raise ValueError(f"study: no tuning study {study!r} in {tracking_uri or 'the default store'}; "
                             f"studies there: {', '.join(known) or 'none'}")  # fmt: skip
        ostudy = _optuna_study(study, parent, tracking_uri, notes)
        frame = _study_runs(ostudy, frame, tracking_uri)
    frame = _tidy(frame)
    if keys is None:  # what the views draw: the panel, every benchmark's Mean@k, the KL estimates
        logged = [c.removeprefix("metrics.") for c in frame.columns if frame[c].dtype.kind == "f" and c != "seed"]
        keys = [k for k in logged if k in PANEL or k in _VIEW_EXTRA or _MEAN_AT_K.match(k) or k in extra]
    wanted = None if keys == "all" else [*keys, *_TOKENS_KEYS]
    hist = _with_time_and_tokens(read.histories(frame, wanted, tracking_uri=tracking_uri))
    if keys != "all":
        hist = hist[hist["key"].isin(set(keys))].reset_index(drop=True)
    failed = frame[frame["status"] == "FAILED"]
    if len(failed):
        notes.append(f"{len(failed)} failed run(s): {', '.join(failed['label'] + ' s' + failed['seed'].astype(str))}")
    return Data(title, kind, frame, hist, parent, ostudy, tracking_uri, notes)


def summary(data: Data, metric: str) -> pd.DataFrame:
    """Per run: ``run_id, group, label, seed, status, last, best, mean, last_step, n_points`` of ``metric``. Best is
    the maximum over logged steps (the minimum for a metric that is better low: none of the compared ones is, so
    maximum throughout), as the paper's Best (spec §8); runs that never logged it get NaN."""
    h = data.history[data.history["key"] == metric].sort_values(["run_id", "step", "timestamp"])
    last = h.groupby("run_id").tail(1).set_index("run_id")
    agg = h.groupby("run_id")["value"].agg(["max", "mean", "count"])
    out = data.runs[["run_id", "group", "label", "seed", "status", *data.varying_axes]].copy()
    out["last"] = out["run_id"].map(last["value"])
    out["last_step"] = out["run_id"].map(last["step"])
    out["best"] = out["run_id"].map(agg["max"])
    out["mean"] = out["run_id"].map(agg["mean"])
    out["n_points"] = out["run_id"].map(agg["count"]).fillna(0).astype(int)
    return out.reset_index(drop=True)


def problem_scores(data: Data, bench: str | None = None) -> pd.DataFrame:
    """``run_id, group, label, seed, bench, problem, score, step``: each run's per-problem scores at its last
    evaluation (``score``: the problem's Mean@k for a benchmark table, 0/1 correctness for the held-out table).
    ``bench``: one benchmark name (``heldout`` for the trainer's held-out problems); None: every one found."""
    rows = []
    for run in data.runs.itertuples():
        steps = sorted(p.rsplit("/", 1)[-1] for p in read.list_artifacts(run.run_id, "eval", tracking_uri=data.tracking_uri)
                       if re.fullmatch(r"step_\d{6}", p.rsplit("/", 1)[-1]))  # fmt: skip
        if not steps:
            continue
        folder = f"eval/{steps[-1]}"
        for path in read.list_artifacts(run.run_id, folder, tracking_uri=data.tracking_uri):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith("_problems.json"):
                continue
            b = name.removesuffix("_problems.json")
            if bench is not None and b != bench:
                continue
            table = read.load_table(run.run_id, path, tracking_uri=data.tracking_uri)
            if table is None or table.empty:
                continue
            score_col = "correct" if b == "heldout" else next((c for c in table if c.startswith("mean@")), "correct")
            for pid, score in zip(table["id"].astype(str), table[score_col].astype(float)):
                rows.append((run.run_id, run.group, run.label, run.seed, b, pid, score, int(steps[-1][5:])))
    return pd.DataFrame(rows, columns=["run_id", "group", "label", "seed", "bench", "problem", "score", "step"])


# -- internals ---------------------------------------------------------------------------------------------------------


def _declared(key: str) -> bool:
    try:
        schema.lookup(key)
    except schema.UndeclaredMetric:
        return False
    return True


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


_AXIS_WORDS = {
    "kl_is_weight": {"true": "IS", "false": "no-IS"},
    "clip": {"none": "no clip", "ppo": "PPO clip", "dual": "dual clip"},
    "normalized": {"true": "normalized", "false": "unnormalized"},
}


def _axis_word(axis: str, value: str) -> str:
    if axis == "beta":
        return f"β={value}"
    return _AXIS_WORDS.get(axis, {}).get(value, value)


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``seed`` (int), ``trial`` and ``label``; drop the read API's bookkeeping columns a comparison never uses."""
    frame = frame.copy()
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    frame["group"] = frame["group"].fillna(frame["config_key"]).fillna(frame["run_id"].str[:12])
    if "trial" not in frame:
        frame["trial"] = pd.Series(pd.NA, index=frame.index, dtype="Int64")
    frame["label"] = _labels(frame)
    return frame


def _labels(frame: pd.DataFrame) -> pd.Series:
    """What each configuration is, in the paper's words. A named method (a preset left as is) is its name; custom
    configurations are named by the axes that vary within the selection (divergence first: FKL/UFKL/RKL/URKL, spec
    §2), e.g. ``URKL-k3-dual clip``. Distinct configurations always get distinct labels (the config key is added
    when the axes shown do not tell them apart)."""
    groups = frame.drop_duplicates("group")
    shown = [a for a in AXES if a in groups and groups[a].nunique(dropna=False) > 1 and a not in ("direction", "normalized")]
    if "divergence" not in shown and any(groups[a].nunique(dropna=False) > 1 for a in ("direction", "normalized") if a in groups):
        shown.insert(0, "divergence")  # direction x normalization is the divergence's name
    names: dict[str, str] = {}
    for row in groups.itertuples():
        method = getattr(row, "method", None)
        parts = [_axis_word(a, str(getattr(row, a))) for a in shown if a != "method" and not pd.isna(getattr(row, a))]
        if method and method != "custom" and "method" in shown:
            parts.insert(0, method)
        if not parts:
            parts = [method if method and method != "custom" else str(getattr(row, "divergence", "") or row.group)]
        names[row.group] = "-".join(parts)
    counts = pd.Series(list(names.values())).value_counts()
    names = {g: (n if counts[n] == 1 else f"{n} [{g[:6]}]") for g, n in names.items()}
    return frame["group"].map(names)


def _with_time_and_tokens(hist: pd.DataFrame) -> pd.DataFrame:
    """Add ``wall_s`` and ``tokens``, then drop the helper keys (tokens per second and step time) unless asked for."""
    hist = hist.copy()
    start = hist.groupby("run_id")["timestamp"].transform("min")
    hist["wall_s"] = (hist["timestamp"] - start) / 1000.0
    tps = hist[hist["key"] == "perf/tokens_per_s"].drop_duplicates(["run_id", "step"], keep="last")
    dur = hist[hist["key"] == "time/step"].drop_duplicates(["run_id", "step"], keep="last")
    both = tps.merge(dur, on=["run_id", "step"], suffixes=("_tps", "_dur"))
    if both.empty:
        hist["tokens"] = np.nan
        return hist
    both = both.sort_values(["run_id", "step"])
    both["tokens"] = (both["value_tps"] * both["value_dur"]).groupby(both["run_id"]).cumsum()
    per_run = {rid: g.set_index("step")["tokens"] for rid, g in both.groupby("run_id")}

    def tokens_at(rid: str, steps: pd.Series) -> np.ndarray:
        s = per_run.get(rid)
        if s is None:
            return np.full(len(steps), np.nan)
        # the tokens seen before a step's point: the cumulative count at the latest step <= it (0 before step 1)
        idx = np.searchsorted(s.index.to_numpy(), steps.to_numpy(), side="right") - 1
        vals = s.to_numpy()
        return np.where(idx >= 0, vals[np.clip(idx, 0, None)], 0.0)

    hist["tokens"] = np.concatenate([tokens_at(rid, g["step"]) for rid, g in hist.groupby("run_id", sort=False)]) \
        if len(hist) else np.array([])  # fmt: skip
    return hist


def _optuna_study(name: str, parent: pd.Series | None, tracking_uri: str | None, notes: list[str]) -> Any:
    """The Optuna study ``name`` in the storage its parent run records (tag ``rpg.optuna_storage``), else in the
    default storage (rpg_core.tuning); None, with a note, when it cannot be opened."""
    import optuna

    from rpg_core.tuning import open_storage

    url = read.run_tags(parent["run_id"], tracking_uri=tracking_uri).get("rpg.optuna_storage") if parent is not None else None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except Exception as e:  # a missing journal or an unreachable database must not stop the runs' report
        notes.append(f"study {name!r}: its Optuna storage {url or '(default)'} could not be read ({e}); trials from MLflow only")
        return None


def _study_runs(study: Any, frame: pd.DataFrame, tracking_uri: str | None) -> pd.DataFrame:
    """The study's training runs: those tagged with it, and those its trials reused (user attribute
    ``mlflow_run_ids``), each with its trial number in ``trial``."""
    trial_of: dict[str, int] = {}
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            for rid in t.user_attrs.get("mlflow_run_ids") or []:
                trial_of.setdefault(rid, t.number)
    extra = [r for r in trial_of if r not in set(frame["run_id"])]
    if extra:
        more = read.get_runs(extra, tracking_uri=tracking_uri)
        frame = pd.concat([frame, more[more["kind"] == RunKind.TRAIN.value]], ignore_index=True)
    return frame.assign(trial=frame["run_id"].map(trial_of).astype("Int64"))
