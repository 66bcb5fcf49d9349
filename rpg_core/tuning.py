"""Tuning studies: a sweep file plus a ``search:`` section, validated before any compute; what the Optuna study is
made of (its name, storage, sampler, pruner, search space); and how a learning curve becomes the trial's value.
The coordinator that runs a study (ask/tell, trials dispatched as training runs, pruning) is ``flows/tuner.py``; the
trainer knows nothing of Optuna.

A study file (``sweeps/tune_*.yaml``)::

    name: tune_urkl
    config: ../configs/demo_add2_urkl.yaml     # as in a sweep: config, preset, base, grid, exclude, seeds
    base: {algorithm.mini_batches: 2}
    seeds: [0, 1]                              # every trial trains once per seed; its value is the mean over seeds
    search:                                    # any dotted config field
      optim.lr: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}
      objective.beta: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
      objective.clip: {type: categorical, choices: [ppo, dual]}
      objective.clip_c: {type: float, low: 2, high: 10, when: {objective.clip: dual}}   # only sampled for dual
    objective: {metric: eval/acc_strict, direction: maximize, reduce: last_k, k: 3}
    budget: {trials: 16, gpu_hours: 2}         # whichever comes first (a trial counts once it is asked)
    sampler: tpe                               # tpe | gp | cmaes | random | brute_force (or {kind: tpe, seed: 0})
    pruner: median                             # median | hyperband | wilcoxon | none (or {kind: median, ...})
    enqueue_defaults: true                     # the base config's own values are the first trial
    enqueue: [{optim.lr: 3.0e-5}]              # then these points, in order

Grid axes stay fixed within a study: each grid cell is its own study (``<study name>-<cell>``). A point the config
rejects (e.g. ``objective.clip_c`` <= 1) is told to Optuna as a failed trial marked ``infeasible``, without compute.
The value of a curve is the mean of its last ``k`` evaluations by default; ``best`` (the maximum over evaluations)
is biased upward by the noise of each evaluation and is not the default (spec §8 reports both Best and Last).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rpg_core import metrics as metrics_mod
from rpg_core.config import RunConfig, RunConfigError, deep_merge, load_run_config, parse_overrides, read_yaml_mapping
from rpg_core.sweeps import PRESET_AXIS, SEED_FIELD, Sweep, SweepError, _nested, expand

__all__ = [
    "DEFAULT_STORAGE",
    "STORAGE_ENV",
    "Cell",
    "CurveReduce",
    "DimKind",
    "Dimension",
    "Goal",
    "PrunerKind",
    "SamplerKind",
    "Study",
    "StudyError",
    "cells",
    "active_dims",
    "curve_value",
    "defaults",
    "load_study",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "study_name",
    "suggest",
    "trial_config",
]

STORAGE_ENV = "RPG_OPTUNA_STORAGE"  # infra/stack.py exports it (a journal file, or the head node's Postgres)
DASHBOARD_ENV = "RPG_OPTUNA_DASHBOARD_URL"  # infra/stack.py exports it: the link the study's MLflow run carries
DEFAULT_STORAGE = ".rpg/optuna.journal"


class StudyError(SweepError):
    """A bad study file; the message names the field."""


class DimKind(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    CATEGORICAL = "categorical"


class Goal(enum.StrEnum):
    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class CurveReduce(enum.StrEnum):
    """How a learning curve (the objective metric over steps) becomes one number."""

    LAST_K = "last_k"  # the mean of the last k evaluations: the default (Last, less noisy)
    LAST = "last"  # the final evaluation (the paper's Last, spec §8)
    BEST = "best"  # the best evaluation (the paper's Best): biased upward by evaluation noise


class SamplerKind(enum.StrEnum):
    TPE = "tpe"
    GP = "gp"
    CMAES = "cmaes"
    RANDOM = "random"
    BRUTE_FORCE = "brute_force"


class PrunerKind(enum.StrEnum):
    MEDIAN = "median"
    HYPERBAND = "hyperband"
    WILCOXON = "wilcoxon"
    NONE = "none"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # no inf or nan where a float goes


class Dimension(_Spec):
    type: DimKind = Field(description="float | int | categorical")
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample on a log scale (float, int)")
    step: float | None = Field(None, gt=0, description="a grid step (float, int)")
    choices: list[Any] | None = Field(None, description="categorical values")
    when: dict[str, Any] = Field(default_factory=dict, description="sampled only when these fields have these "
                                 "values (a value or a list of values): earlier search fields or config fields")  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> Dimension:
        if self.type is DimKind.CATEGORICAL:
            if not self.choices:
                raise ValueError("categorical: needs `choices` (a non-empty list)")
            if len({json.dumps(c, sort_keys=True) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical: low/high/log/step do not apply; use choices")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type.value}: choices apply to categorical only; use low/high")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type.value}: needs `low` and `high`")
        if not math.isfinite(self.low) or not math.isfinite(self.high) or self.low >= self.high:
            raise ValueError(f"low={self.low} must be finite and below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: low={self.low} must be > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna)")
        if self.type is DimKind.INT and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int: low={self.low} and high={self.high} must be integers")
        return self

    def distribution(self) -> Any:
        import optuna.distributions as d

        if self.type is DimKind.CATEGORICAL:
            return d.CategoricalDistribution(list(self.choices or []))
        if self.type is DimKind.INT:
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))  # type: ignore[arg-type]
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)  # type: ignore[arg-type]

    def parse(self, text: Any) -> Any:
        """A value as MLflow stored it (a string param) -> the dimension's type (None: not one of its values)."""
        try:
            if self.type is DimKind.CATEGORICAL:
                by_text = {_text(c): c for c in self.choices or []}
                return by_text.get(_text(text))
            v = int(float(text)) if self.type is DimKind.INT else float(text)
        except (TypeError, ValueError):
            return None
        return v if self.distribution()._contains(self.distribution().to_internal_repr(v)) else None

    @property
    def finite(self) -> bool:
        return self.type is not DimKind.FLOAT or self.step is not None


def _text(v: Any) -> str:
    """How a categorical value compares with an MLflow param string (bools as MLflow writes them: True/False)."""
    if isinstance(v, enum.Enum):
        v = v.value
    return str(v).lower() if isinstance(v, bool) else str(v)


class Objective(_Spec):
    metric: str = Field("eval/acc_strict", description="any logged metric, e.g. eval/aime24/mean_at_32")
    direction: Goal = Goal.MAXIMIZE
    reduce: CurveReduce = CurveReduce.LAST_K
    k: int = Field(3, ge=1, description="last_k: how many of the last evaluations are averaged")

    @field_validator("metric")
    @classmethod
    def _declared(cls, name: str) -> str:
        try:
            metrics_mod.lookup(name)
        except metrics_mod.UndeclaredMetric as e:
            raise ValueError(f"{e.args[0]}; e.g. eval/acc_strict, eval/aime24/mean_at_32, reward/mean") from None
        return name


class Budget(_Spec):
    trials: int | None = Field(None, ge=1, description="trials asked (running ones count)")
    gpu_hours: float | None = Field(None, gt=0, description="device-hours of the study's runs (running ones count)")

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.trials is None and self.gpu_hours is None:
            raise ValueError("set trials and/or gpu_hours")
        return self


class SamplerSpec(_Spec):
    kind: SamplerKind = SamplerKind.TPE
    seed: int = 0


class PrunerSpec(_Spec):
    kind: PrunerKind = PrunerKind.MEDIAN
    warmup_steps: int | None = Field(None, ge=0, description="no pruning before this step; default a third of "
                                     "train.steps (RL curves are noisy early)")  # fmt: skip
    startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")


def _kind_shorthand(value: Any) -> Any:
    return {"kind": value} if isinstance(value, str) else value


class Study(Sweep):
    search: dict[str, Dimension] = Field(min_length=1, description="dotted config field -> dimension")
    objective: Objective = Objective()
    budget: Budget = Budget(trials=8)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    enqueue_defaults: bool = Field(False, description="the base config's own values are the first trial")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="points tried first, in order "
                                          "(after the defaults): {search field: value}")  # fmt: skip
    trial_retries: int = Field(2, ge=0, le=10, description="a trial lost with no checkpoint is asked again this often")

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:  # `sampler: tpe` is `sampler: {kind: tpe}`
        return _kind_shorthand(value)

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        names = list(self.search)
        for i, (name, dim) in enumerate(self.search.items()):
            if "." not in name or name == PRESET_AXIS:
                raise StudyError(f"search.{name}: a search dimension is a dotted config field (e.g. optim.lr)")
            if name == SEED_FIELD:
                raise StudyError(f"search.{name}: the seeds are set by `seeds:` (each trial trains every seed)")
            if name in self.grid:
                raise StudyError(f"search.{name}: also a grid axis; a field is either searched or fixed per cell")
            _check_field(name, f"search.{name}")
            for cond in dim.when:
                if cond in names[i:]:
                    raise StudyError(f"search.{name}.when.{cond}: a condition may name an earlier search field or a "
                                     f"config field, not {'itself' if cond == name else 'a later one'}")  # fmt: skip
                if "." not in cond:
                    raise StudyError(f"search.{name}.when.{cond}: a dotted config field (e.g. objective.clip)")
                _check_field(cond, f"search.{name}.when.{cond}")
        for i, point in enumerate(self.enqueue):
            for name, value in point.items():
                if name not in self.search:
                    raise StudyError(f"enqueue[{i}].{name}: not a search field; search fields: {names}")
                if self.search[name].parse(value) is None:
                    raise StudyError(f"enqueue[{i}].{name}: {value!r} lies outside its dimension")
        if self.sampler.kind is SamplerKind.BRUTE_FORCE:
            cont = [n for n, d in self.search.items() if not d.finite]
            if cont:
                raise StudyError(f"sampler: brute_force needs a finite space; {cont} are continuous (give them a "
                                 "step, or make them categorical)")  # fmt: skip
        if self.sampler.kind is SamplerKind.CMAES and any(d.when for d in self.search.values()):
            raise StudyError("sampler: cmaes samples a fixed space; drop the `when` conditions or use tpe")


def _check_field(dotted: str, where: str) -> None:
    """A dotted path must name a field of the run config (``optim.lr``), else the error lists the section's fields."""
    model: Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            known = ", ".join(fields) if fields else "(not a section)"
            raise StudyError(f"{where}: {'.'.join(parts[: i + 1])!r} is not a config field; allowed here: {known}")
        model = fields[part].annotation


def load_study(path: str | Path, overrides: list[str] | None = None, seeds: list[int] | None = None) -> Study:
    """A study file, validated (errors name the file and the field); ``overrides`` are added to its ``base``."""
    p = Path(path)
    raw = read_yaml_mapping(p, "study file", StudyError)
    if "search" not in raw:
        raise StudyError(f"{p.name}: search: missing; a study file is a sweep file with a `search:` section "
                         "(for a plain grid use `rpg sweep`)")  # fmt: skip
    try:
        if overrides:
            raw["base"] = deep_merge(_nested(raw.get("base") or {}), parse_overrides(overrides))
    except RunConfigError as e:
        raise StudyError(f"{p.name}: {e}") from None
    if seeds:
        raw["seeds"] = list(seeds)
    try:
        return Study(**raw, root=p.resolve().parent)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "study"
        allowed = ""
        if err["type"] == "extra_forbidden":
            model = _model_at(err["loc"])
            allowed = f"; allowed: {', '.join(f for f in model.model_fields if f != 'root')}"
        elif err["type"] == "enum":
            allowed = f"; allowed: {err.get('ctx', {}).get('expected', '')}"
        msg = err["msg"].removeprefix("Value error, ")
        raise StudyError(f"{p.name}: {where}: {msg}{allowed}") from None
    except SweepError as e:
        raise StudyError(f"{p.name}: {e}") from None


def _model_at(loc: Sequence[Any]) -> type[BaseModel]:
    """The model an extra field was found in (for the list of allowed fields)."""
    top = {"objective": Objective, "budget": Budget, "sampler": SamplerSpec, "pruner": PrunerSpec}
    if len(loc) >= 2 and loc[0] in top:
        return top[loc[0]]
    if len(loc) >= 3 and loc[0] == "search":
        return Dimension
    return Study


@dataclass(frozen=True)
class Cell:
    """One grid cell of a study (the whole study when it has no grid): its own Optuna study."""

    label: str  # "" without a grid, else "axis=value,..."
    axes: dict[str, str]
    preset: str | None
    overrides: dict[str, Any]  # nested: base + the cell's axes (no seed)
    config: RunConfig  # the cell's base config (first seed), the defaults the search starts from


def cells(study: Study) -> tuple[list[Cell], list[str]]:
    """The study's grid cells (seed-free), validated as ``rpg sweep expand`` validates runs; returns the cells and
    the reasons of dropped combinations."""
    plain = Sweep(**{f: getattr(study, f) for f in Sweep.model_fields if f != "seeds"}, seeds=[study.seeds[0]])
    exp = expand(plain)
    out = []
    for r in exp.runs:
        over = {k: v for k, v in r.overrides.items() if k != PRESET_AXIS}
        over["train"] = {k: v for k, v in over.get("train", {}).items() if k != "seed"}
        label = ",".join(f"{a}={v}" for a, v in r.axes.items())
        out.append(Cell(label, dict(r.axes), r.overrides.get(PRESET_AXIS, study.preset),
                        deep_merge(_nested(study.base), over), r.config))  # fmt: skip
    dropped = [f"{','.join(f'{a}={v}' for a, v in d.axes.items())}: {d.reason}" for d in exp.dropped]
    if not out:
        raise StudyError(f"{study.name}: no valid grid cell" + (f" ({dropped[0]})" if dropped else ""))
    return out, dropped


def study_name(study: Study, cell: Cell) -> str:
    """``<name>-<hash>[-<cell>]``: the same study file with the same overrides (and grid cell) is the same study,
    whatever its budget; a changed base, search space, objective or seeds is another study."""
    config_text = (study.root / study.config).read_text() if study.config else ""
    ident = {"config": config_text, "preset": study.preset, "base": _nested(study.base), "seeds": study.seeds,
             "grid": study.grid, "exclude": study.exclude,
             "search": {k: v.model_dump(mode="json") for k, v in study.search.items()},
             "objective": study.objective.model_dump(mode="json")}  # fmt: skip
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
    suffix = "-" + "-".join(v for v in cell.axes.values()) if cell.axes else ""
    return f"{study.name}-{digest}{suffix}"


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _holds(when: Mapping[str, Any], params: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    for name, wanted in when.items():
        have = params[name] if name in params else _lookup(base, name)
        options = wanted if isinstance(wanted, list) else [wanted]
        if _text(have) not in {_text(w) for w in options}:
            return False
    return True


def active_dims(study: Study, params: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """The dimensions a point sets: every one whose condition holds (conditions see earlier fields)."""
    out: list[str] = []
    seen: dict[str, Any] = {}
    for name, dim in study.search.items():
        if _holds(dim.when, seen, base):
            out.append(name)
            if name in params:
                seen[name] = params[name]
    return out


def suggest(trial: Any, study: Study, cell: Cell) -> dict[str, Any]:
    """Sample a point on an Optuna trial (define-by-run: a dimension whose ``when`` fails is not sampled)."""
    base = cell.config.model_dump(mode="json")
    params: dict[str, Any] = {}
    for name, dim in study.search.items():
        if not _holds(dim.when, params, base):
            continue
        if dim.type is DimKind.CATEGORICAL:
            params[name] = trial.suggest_categorical(name, list(dim.choices or []))
        elif dim.type is DimKind.INT:
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))  # type: ignore[arg-type]
        else:
            params[name] = trial.suggest_float(name, float(dim.low), float(dim.high), log=dim.log, step=dim.step)  # type: ignore[arg-type]
    return params


def defaults(study: Study, cell: Cell) -> dict[str, Any] | None:
    """The cell's base config's own values of the search fields (None: one lies outside its dimension)."""
    base = cell.config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name in active_dims(study, {n: _lookup(base, n) for n in study.search}, base):
        v = study.search[name].parse(_lookup(base, name))
        if v is None:
            return None
        out[name] = v
    return out


def trial_config(study: Study, cell: Cell, params: Mapping[str, Any], seed: int) -> RunConfig:
    """The run config of one trial and seed (raises RunConfigError for a point the config rejects)."""
    config_path = (study.root / study.config) if study.config else None
    over = deep_merge(cell.overrides, _nested(dict(params)))
    over = deep_merge(over, {"train": {"seed": seed}})
    return load_run_config(config_path, preset=cell.preset, overrides=over)


def curve_value(points: Sequence[tuple[int, float]], objective: Objective) -> float | None:
    """The objective's value of one learning curve ``[(step, value), ...]`` (None: no point). NaN stays NaN."""
    if not points:
        return None
    values = [v for _, v in sorted(points)]
    if objective.reduce is CurveReduce.LAST:
        return values[-1]
    if objective.reduce is CurveReduce.BEST:
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values) if objective.direction is Goal.MAXIMIZE else min(values)
    tail = values[-objective.k :]
    return sum(tail) / len(tail)


def make_sampler(spec: SamplerSpec, study: Study) -> Any:
    import optuna

    k = spec.kind
    if k is SamplerKind.TPE:  # parallel trials: a running point counts as a bad result (constant liar)
        import warnings

        with warnings.catch_warnings():  # multivariate/group/constant_liar are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True, constant_liar=True)
    if k is SamplerKind.GP:
        return optuna.samplers.GPSampler(seed=spec.seed)
    if k is SamplerKind.CMAES:
        return optuna.samplers.CmaEsSampler(seed=spec.seed)
    if k is SamplerKind.RANDOM:
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.BruteForceSampler(seed=spec.seed)


def warmup_steps(spec: PrunerSpec, steps: int) -> int:
    return spec.warmup_steps if spec.warmup_steps is not None else max(1, steps // 3)


def make_pruner(spec: PrunerSpec, steps: int, enabled: bool = True) -> Any:
    import optuna

    warm = warmup_steps(spec, steps)
    if not enabled or spec.kind is PrunerKind.NONE:
        return optuna.pruners.NopPruner()
    if spec.kind is PrunerKind.MEDIAN:
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=warm)
    if spec.kind is PrunerKind.HYPERBAND:
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warm), max_resource=steps)
    return optuna.pruners.WilcoxonPruner(n_startup_steps=warm)


def storage_url(url: str | None = None) -> str:
    """The study storage: ``url``, else ``$RPG_OPTUNA_STORAGE`` (the stack's), else ``.rpg/optuna.journal``."""
    return url or os.environ.get(STORAGE_ENV, "").strip() or DEFAULT_STORAGE


def open_storage(url: str | None = None) -> Any:
    """A journal file (one machine, several processes: file lock) or an RDB URL (``postgresql+psycopg://...``: a
    team's head node). SQLite is refused: it locks under several writers (optuna-dashboard, a second study)."""
    import optuna

    target = storage_url(url)
    if target.startswith("sqlite"):
        raise StudyError(f"storage {target!r}: SQLite locks under several writers; use a journal file (a path, e.g. "
                         f"{DEFAULT_STORAGE}) or postgresql+psycopg://...")  # fmt: skip
    if "://" in target:
        if not target.startswith(("postgresql", "mysql")):
            raise StudyError(f"storage {target!r}: allowed: a journal file path, postgresql+psycopg://..., mysql://...")
        return optuna.storages.RDBStorage(target, engine_kwargs={"pool_pre_ping": True})
    from optuna.storages.journal import JournalFileBackend

    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
