"""Sweeps: a base run config, grid axes over any config field, excluded combinations and seeds, expanded into the
de-duplicated list of runs (``rpg sweep expand FILE``).

A sweep file (``sweeps/*.yaml``)::

    name: kl_design
    description: direction x normalization x form/estimator x clip on the embedded default
    config: ../configs/demo_add2_urkl.yaml   # optional base run config, relative to this file
    preset: rpg_reinforce_urkl               # optional (preset < config < base < axes, as for rpg train)
    base: {train.steps: 15}                  # overrides for every run: dotted or nested
    grid:                                    # the cartesian product of the axes, in this order
      objective.direction: [forward, reverse]        # an axis over one config field
      preset: [grpo, dapo]                           # the preset axis picks a paper method
      form_estimator:                                # a bundle axis: each value sets several fields
        - {label: reinforce-k3, objective.form: reinforce, objective.estimator: k3}
    exclude:                                 # a combination matching every entry of one item is dropped
      - {objective.direction: forward, form_estimator: reinforce-k3}
    seeds: [0, 1]                            # every combination runs once per seed (train.seed)

The seeds multiply every combination: the runs of one configuration share its config key (``RunConfig.key()``,
the seed left out; MLflow tags ``config_key`` and ``rpg.group``) and differ in their run key
(``RunConfig.run_key()``, ``<key>-s<seed>``). ``train.seed`` is set only by ``seeds`` (not by ``base`` or a grid
axis). Every combination is validated as ``rpg train`` would validate it: an invalid one is dropped with the config
error as its reason (e.g. the objective rejects a penalty-form forward KL as an importance weight). A combination
that computes the same run as an earlier one (same config key and seed; the objective is compared in canonical
form) is dropped as a duplicate of it.

``kl_warnings`` flags a sweep that sets KL settings (``config.KL_SETTINGS``: beta, direction, estimator, ...) for runs
whose KL term cannot act (``RunConfig.kl_inert_reason``, e.g. one update per rollout with pi_ref = pi_old): such a
comparison compares nothing. ``rpg sweep expand`` prints them; a tuner's study validation calls it too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rpg_core.config import (
    KL_SETTINGS,
    RunConfig,
    RunConfigError,
    deep_merge,
    load_run_config,
    parse_overrides,
    preset_dict,
    read_yaml_mapping,
    run_key,
)

__all__ = [
    "Dropped",
    "Expansion",
    "Sweep",
    "SweepError",
    "SweepRun",
    "expand",
    "kl_settings_set",
    "kl_warnings",
    "load_sweep",
]

PRESET_AXIS = "preset"
SEED_FIELD = "train.seed"  # set by `seeds` only
LABEL = "label"  # the name of a bundle value (what tables show and exclude entries match)


class SweepError(ValueError):
    """A bad sweep file; the message names the field."""


class Sweep(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # no inf or nan where a float goes

    name: str = Field(min_length=1, description="the sweep's name (MLflow parent run, Prefect parameters)")
    description: str = ""
    config: str | None = Field(None, description="base run config YAML, relative to the sweep file")
    preset: str | None = Field(None, description="paper method every run starts from (rpg presets)")
    base: dict[str, Any] = Field(default_factory=dict, description="overrides for every run (dotted or nested)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axis -> values, crossed in order")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="combinations to drop")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="train.seed values")
    root: Path = Field(Path("."), exclude=True, description="folder the config path is relative to")

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in grid.items():
            if not values:
                raise ValueError(f"grid.{axis}: an axis needs at least one value")
            bundles = [isinstance(v, dict) for v in values]
            if any(bundles) and not all(bundles):
                raise ValueError(f"grid.{axis}: mix of bundles (mappings) and plain values")
            if all(bundles):
                if "." in axis or axis == PRESET_AXIS:
                    raise ValueError(f"grid.{axis}: bundle values need a plain axis name (no dots, not 'preset')")
                labels = [v.get(LABEL) for v in values]
                if any(not isinstance(x, str) or not x for x in labels):
                    raise ValueError(f"grid.{axis}: every bundle needs a '{LABEL}' string")
                if len(set(labels)) != len(labels):
                    raise ValueError(f"grid.{axis}: bundle labels repeat: {labels}")
            elif "." not in axis and axis != PRESET_AXIS:
                raise ValueError(
                    f"grid.{axis}: an axis is a dotted config field (e.g. objective.beta), 'preset', or a bundle "
                    f"axis whose values are mappings with a '{LABEL}'"
                )
            elif len({_label(v) for v in values}) != len(values):
                raise ValueError(f"grid.{axis}: values repeat: {values}")
        return grid

    def model_post_init(self, _: Any) -> None:
        for i, item in enumerate(self.exclude):
            for axis, value in item.items():
                if axis not in self.grid:
                    raise SweepError(f"exclude[{i}].{axis}: not a grid axis; axes: {list(self.grid)}")
                if _label(value) not in {_label(v) for v in self.grid[axis]}:
                    raise SweepError(
                        f"exclude[{i}].{axis}: {value!r} is not one of its values {[_label(v) for v in self.grid[axis]]}"
                    )
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"seeds: {self.seeds} repeat")
        if _sets_seed(self.base):
            raise SweepError(f"base.{SEED_FIELD}: the seeds are set by `seeds:` (they multiply every combination)")
        for axis, values in self.grid.items():
            if axis == SEED_FIELD or any(isinstance(v, dict) and _sets_seed(v) for v in values):
                raise SweepError(f"grid.{axis}: sets {SEED_FIELD}; the seeds are set by `seeds:` (they multiply "
                                 "every combination)")  # fmt: skip


def _sets_seed(overrides: dict[str, Any]) -> bool:
    """Whether overrides (dotted or nested) set ``train.seed``."""
    train = _nested(overrides).get("train")
    return isinstance(train, dict) and "seed" in train


def _label(value: Any) -> str:
    """How an axis value is shown and matched: a bundle's label, else the YAML scalar as text."""
    if isinstance(value, dict):
        return str(value[LABEL])
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 1e-5} -> {"optim": {"lr": 1e-5}} (nested values pass through)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None, seeds: list[int] | None = None) -> Sweep:
    """A sweep file, validated; ``overrides`` (``section.field=value``) are added to its ``base``; ``seeds`` replace
    its ``seeds`` (a form's or the command line's choice)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep file", SweepError)
    if overrides:
        raw["base"] = deep_merge(_nested(raw.get("base") or {}), parse_overrides(overrides))
    if seeds:
        raw["seeds"] = list(seeds)
    try:
        return Sweep(**raw, root=p.resolve().parent)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "sweep"
        allowed = f"; allowed: {', '.join(f for f in Sweep.model_fields if f != 'root')}" if err["type"] == "extra_forbidden" else ""
        raise SweepError(f"{p.name}: {where}: {err['msg'].removeprefix('Value error, ')}{allowed}") from None


@dataclass(frozen=True)
class SweepRun:
    index: int  # 1-based position in the expansion
    key: str  # RunConfig.key(): the configuration, shared by its seeds (MLflow config_key and rpg.group)
    seed: int
    axes: dict[str, str]  # axis -> value label
    overrides: dict[str, Any]  # nested overrides applied on top of the base config (seed included)
    config: RunConfig

    @property
    def run_key(self) -> str:
        """RunConfig.run_key(), ``<key>-s<seed>``: the run's identity (its folder, its checkpoints)."""
        return run_key(self.key, self.seed)

    def run_name(self, sweep: str) -> str:
        """``<sweep>/<design>[-<axis>=<value>...]-s<seed>``: its MLflow run name and its Prefect task or flow run name,
        e.g. ``kl_design/rpg_reinforce-FKL-dual-s0``. The design is RunConfig.design_name(); the grid axes it does
        not already say (a learning rate, a beta) follow as ``<field>=<value>``, so the runs of a sweep get distinct
        names."""
        said = {"preset", *(f"objective.{f}" for f in ("form", "direction", "normalized", "estimator", "kl_is_weight",
                                                       "clip"))}  # fmt: skip
        extra = [f"{axis.rsplit('.', 1)[-1]}={value}" for axis, value in self.axes.items() if axis not in said]
        return f"{sweep}/" + "-".join([self.config.design_name(), *extra]) + f"-s{self.seed}"


@dataclass(frozen=True)
class Dropped:
    seed: int
    axes: dict[str, str]
    reason: str


@dataclass
class Expansion:
    sweep: Sweep
    runs: list[SweepRun] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def combinations(self) -> int:
        return len(self.runs) + len(self.dropped)

    def require_runs(self) -> Expansion:
        """Itself, or SweepError when no combination is a valid run (nothing would run: say why, not succeed)."""
        if self.runs:
            return self
        first = ""
        if self.dropped:
            d = self.dropped[0]
            first = f"; first: seed={d.seed} " + ", ".join(f"{a}={v}" for a, v in d.axes.items()) + f": {d.reason}"
        raise SweepError(f"{self.sweep.name}: no valid run: {self.combinations} combinations, every one dropped{first}")

    def table(self) -> str:
        axes = list(self.sweep.grid)
        head = ["#", "key", "seed", *axes, "method"]
        rows = [[str(r.index), r.key, str(r.seed), *(r.axes[a] for a in axes), r.config.method_name()] for r in self.runs]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        out = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        if self.dropped:
            out.append(f"\ndropped ({len(self.dropped)}):")
            for d in self.dropped:
                combo = ", ".join(f"{a}={v}" for a, v in d.axes.items())
                out.append(f"  seed={d.seed} {combo}: {d.reason}")
        invalid = sum(not d.reason.startswith("duplicate") for d in self.dropped)
        out.append(
            f"\n{self.sweep.name}: {len(self.runs)} runs from {self.combinations} combinations "
            f"({invalid} invalid, {len(self.dropped) - invalid} duplicates dropped)"
        )
        return "\n".join(out)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [{"index": r.index, "key": r.key, "seed": r.seed, "run_key": r.run_key, "axes": r.axes,
                 "overrides": r.overrides, "method": r.config.method_name()} for r in self.runs]  # fmt: skip


def _excluded(sweep: Sweep, labels: dict[str, str]) -> bool:
    return any(all(labels[a] == _label(v) for a, v in item.items()) for item in sweep.exclude)


def expand(sweep: Sweep) -> Expansion:
    """Every seed x combination of the grid (seeds outermost, axes in file order), excluded ones skipped,
    validated into a RunConfig (invalid: dropped with the error), de-duplicated by run key (config key and seed)."""
    config_path = (sweep.root / sweep.config) if sweep.config else None
    if config_path is not None and not config_path.is_file():
        raise SweepError(f"{sweep.name}: config: {str(config_path)!r} does not exist")
    base = _nested(sweep.base)
    axes = list(sweep.grid)
    out = Expansion(sweep)
    seen: dict[str, int] = {}
    for seed in sweep.seeds:
        for combo in itertools.product(*(sweep.grid[a] for a in axes)):
            labels = {a: _label(v) for a, v in zip(axes, combo, strict=True)}
            if _excluded(sweep, labels):
                continue
            over: dict[str, Any] = {}
            preset = sweep.preset
            for axis, value in zip(axes, combo, strict=True):
                if axis == PRESET_AXIS:
                    preset = str(value)
                elif isinstance(value, dict):
                    over = deep_merge(over, _nested({k: v for k, v in value.items() if k != LABEL}))
                else:
                    over = deep_merge(over, _nested({axis: value}))
            over = deep_merge(over, {"train": {"seed": seed}})
            try:
                cfg = load_run_config(config_path, preset=preset, overrides=deep_merge(base, over))
            except (RunConfigError, ValueError) as e:
                out.dropped.append(Dropped(seed, labels, f"invalid: {e}"))
                continue
            rk = cfg.run_key()
            if rk in seen:
                out.dropped.append(Dropped(seed, labels, f"duplicate of run #{seen[rk]} (same run key {rk})"))
                continue
            seen[rk] = len(out.runs) + 1
            if preset:
                over = {"preset": preset, **over}
            out.runs.append(SweepRun(len(out.runs) + 1, cfg.key(), seed, labels, over, cfg))
    return out


# -- KL settings that cannot act ---------------------------------------------------------------------------------


def _dotted(nested: dict[str, Any], prefix: str = "") -> list[str]:
    """{"optim": {"lr": 1}} (or dotted keys) -> ["optim.lr"]."""
    out: list[str] = []
    for key, value in _nested(nested).items():
        path = f"{prefix}{key}"
        out += _dotted(value, path + ".") if isinstance(value, dict) and value else [path]
    return out


def kl_settings_set(sweep: Sweep) -> list[str]:
    """The KL settings (``config.KL_SETTINGS``) the sweep's ``base`` or ``grid`` sets (a plain axis, a bundle's fields,
    a preset axis's objective and reference), in that order. The base config and ``preset:`` are not the sweep's
    choice and do not count."""
    fields = set(_dotted(sweep.base))
    for axis, values in sweep.grid.items():
        for value in values:
            if axis == PRESET_AXIS:
                try:
                    fields.update(_dotted(preset_dict(str(value))))
                except RunConfigError:  # an unknown preset: expand() drops it with the reason
                    pass
            elif isinstance(value, dict):
                fields.update(_dotted({k: v for k, v in value.items() if k != LABEL}))
            else:
                fields.add(axis)
    return [f for f in KL_SETTINGS if f in fields]


def kl_warnings(sweep: Sweep, expansion: Expansion) -> list[str]:
    """One line per reason why some of the sweep's runs cannot feel the KL settings the sweep sets
    (``RunConfig.kl_inert_reason``), naming the runs and the fix; [] when it sets none or every run's KL acts."""
    touched = kl_settings_set(sweep)
    if not touched:
        return []
    inert: dict[str, list[SweepRun]] = {}
    for r in expansion.runs:
        reason = r.config.kl_inert_reason()
        if reason is not None:
            inert.setdefault(reason, []).append(r)
    out = []
    for reason, runs in inert.items():
        shown = ", ".join(f"#{r.index}" for r in runs[:8]) + (", ..." if len(runs) > 8 else "")
        out.append(f"sweep {sweep.name}: {len(runs)} of {len(expansion.runs)} runs ({shown}) set KL settings "
                   f"({', '.join(touched)}) but {reason}")  # fmt: skip
    return out

