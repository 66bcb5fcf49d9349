"""Study files (rpg_core/tuning.py): validation before any compute, the search space, how a curve becomes a value,
study names and storage. No model, no server."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from rpg_core.tuning import (
    CurveReduce,
    Goal,
    Objective,
    StudyError,
    active_dims,
    cells,
    curve_value,
    defaults,
    load_study,
    open_storage,
    study_name,
    suggest,
    trial_config,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"name": "t", "preset": "rpg_reinforce_urkl",
         "base": {"model.name": "tiny", "train.steps": 6, "algorithm.mini_batches": 2},
         "search": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}},
         "objective": {"metric": "eval/acc_strict"}, "budget": {"trials": 3}}  # fmt: skip


def write(tmp_path: Path, **changes) -> Path:
    spec = {**SMOKE, **changes}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("tune_*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_load_and_their_cells_validate(path):
    study = load_study(path)
    found, dropped = cells(study)
    assert found and not dropped
    for cell in found:
        assert study_name(study, cell).startswith(study.name + "-")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-5}}}, "search.optim.lr: "),
        ({"search": {"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log: low=0.0 must be > 0"),
        ({"search": {"optim.lr": {"type": "floaty", "low": 0, "high": 1}}}, "search.optim.lr.type"),
        ({"search": {"objective.clip": {"type": "categorical"}}}, "categorical: needs `choices`"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 1}}}, "search.lr: a search dimension is a dotted"),
        ({"search": {"train.seed": {"type": "int", "low": 0, "high": 3}}}, "the seeds are set by `seeds:`"),
        ({"search": {}}, "search: "),
        ({"objective": {"metric": "eval/acc"}}, "objective.metric: metric 'eval/acc' is not declared"),
        ({"objective": {"metric": "eval/acc_strict", "direction": "up"}}, "objective.direction"),
        ({"budget": {}}, "budget: set trials and/or gpu_hours"),
        ({"sampler": "annealing"}, "sampler.kind"),
        ({"pruner": {"kind": "median", "warmup": 3}}, "pruner.warmup: Extra inputs are not permitted; allowed: kind, warmup_steps, startup_trials"),
        ({"sampler": "brute_force"}, "brute_force needs a finite space; ['optim.lr'] are continuous"),
        ({"grid": {"optim.lr": [1e-4]}}, "search.optim.lr: also a grid axis"),
        ({"search": {"objective.clip_c": {"type": "float", "low": 2, "high": 9, "when": {"objective.beta": 1}},
                     "objective.beta": {"type": "float", "low": 0.1, "high": 1}}}, "not a later one"),
        ({"search": {"optim.lrate": {"type": "float", "low": 0.1, "high": 1}}},
         "search.optim.lrate: 'optim.lrate' is not a config field; allowed here: lr, weight_decay"),
        ({"search": {"objective.clip_c": {"type": "float", "low": 2, "high": 9, "when": {"objectives.clip": "dual"}}}},
         "search.objective.clip_c.when.objectives.clip: 'objectives' is not a config field"),
        ({"budgets": {"trials": 2}}, "budgets: Extra inputs are not permitted; allowed: name, description, config"),
    ],
)
def test_bad_study_files_are_refused_naming_the_field(tmp_path, changes, message):
    with pytest.raises(StudyError, match="study.yaml: ") as e:
        load_study(write(tmp_path, **changes))
    assert message in str(e.value), str(e.value)


def test_a_sweep_file_is_not_a_study(tmp_path):
    with pytest.raises(StudyError, match="search: missing; a study file is a sweep file with a `search:` section"):
        load_study(ROOT / "sweeps" / "smoke.yaml")


@pytest.mark.parametrize(
    ("reduce", "k", "direction", "expected"),
    [
        # curve (steps out of order on purpose): step 0: 0.1, 3: 0.5, 6: 0.3, 9: 0.4
        (CurveReduce.LAST_K, 3, Goal.MAXIMIZE, (0.5 + 0.3 + 0.4) / 3),  # the last three evaluations: 0.4
        (CurveReduce.LAST_K, 10, Goal.MAXIMIZE, (0.1 + 0.5 + 0.3 + 0.4) / 4),  # k longer than the curve: all of it
        (CurveReduce.LAST, 3, Goal.MAXIMIZE, 0.4),
        (CurveReduce.BEST, 3, Goal.MAXIMIZE, 0.5),
        (CurveReduce.BEST, 3, Goal.MINIMIZE, 0.1),
    ],
)
def test_curve_value_worked_examples(reduce, k, direction, expected):
    curve = [(6, 0.3), (0, 0.1), (9, 0.4), (3, 0.5)]
    obj = Objective(metric="eval/acc_strict", reduce=reduce, k=k, direction=direction)
    assert curve_value(curve, obj) == pytest.approx(expected, abs=1e-12)


def test_curve_value_of_nothing_is_none_and_a_nan_stays_nan():
    obj = Objective(metric="eval/acc_strict")
    assert curve_value([], obj) is None
    assert math.isnan(curve_value([(1, 0.5), (2, math.nan)], obj))
    assert math.isnan(curve_value([(1, 0.5), (2, math.nan)], Objective(metric="eval/acc_strict", reduce="best")))


def test_conditions_sample_a_field_only_when_they_hold(tmp_path):
    """clip_c is searched only under the dual clip; a trial with ppo never sets it (and its config keeps the
    default), one with dual always does."""
    p = write(tmp_path, search={
        "objective.clip": {"type": "categorical", "choices": ["ppo", "dual"]},
        "objective.clip_c": {"type": "float", "low": 2, "high": 9, "when": {"objective.clip": "dual"}},
    }, sampler="random")  # fmt: skip
    study = load_study(p)
    cell = cells(study)[0][0]
    s = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        params = suggest(s.ask(), study, cell)
        seen.add(params["objective.clip"])
        assert ("objective.clip_c" in params) == (params["objective.clip"] == "dual"), params
        cfg = trial_config(study, cell, params, seed=0)
        assert cfg.objective.clip.value == params["objective.clip"]
        if "objective.clip_c" in params:
            assert cfg.objective.clip_c == params["objective.clip_c"]
    assert seen == {"ppo", "dual"}
    base = cell.config.model_dump(mode="json")
    assert active_dims(study, {"objective.clip": "ppo"}, base) == ["objective.clip"]


def test_defaults_are_the_base_configs_own_values(tmp_path):
    p = write(tmp_path, base={**SMOKE["base"], "optim.lr": 3e-4, "objective.beta": 0.02},
              search={"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                      "objective.beta": {"type": "float", "low": 1e-3, "high": 1e-1}})  # fmt: skip
    study = load_study(p)
    assert defaults(study, cells(study)[0][0]) == {"optim.lr": 3e-4, "objective.beta": 0.02}
    p = write(tmp_path, base={**SMOKE["base"], "optim.lr": 0.5})  # outside the dimension: nothing to enqueue
    study = load_study(p)
    assert defaults(study, cells(study)[0][0]) is None


def test_a_point_the_config_rejects_raises_before_any_compute(tmp_path):
    from rpg_core.config import RunConfigError

    p = write(tmp_path, search={"objective.clip_c": {"type": "float", "low": 0.5, "high": 9}})
    study = load_study(p)
    with pytest.raises(RunConfigError, match="clip_c"):
        trial_config(study, cells(study)[0][0], {"objective.clip_c": 0.7}, seed=0)


def test_the_study_name_follows_the_file_and_its_overrides_not_its_budget(tmp_path):
    p = write(tmp_path)
    a = load_study(p)
    name = study_name(a, cells(a)[0][0])
    b = load_study(write(tmp_path, budget={"trials": 50}))
    assert study_name(b, cells(b)[0][0]) == name
    c = load_study(write(tmp_path), overrides=["train.steps=7"])
    assert study_name(c, cells(c)[0][0]) != name
    d = load_study(write(tmp_path), seeds=[0, 1])
    assert study_name(d, cells(d)[0][0]) != name


def test_grid_axes_make_one_study_per_cell(tmp_path):
    p = write(tmp_path, grid={"objective.direction": ["forward", "reverse"]})
    study = load_study(p)
    found, _ = cells(study)
    names = [study_name(study, c) for c in found]
    assert [c.axes for c in found] == [{"objective.direction": "forward"}, {"objective.direction": "reverse"}]
    assert names[0].endswith("-forward") and names[1].endswith("-reverse") and names[0][:-8] == names[1][:-8]


def test_storage_is_a_journal_file_by_default_and_sqlite_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RPG_OPTUNA_STORAGE", str(tmp_path / "j" / "optuna.journal"))
    s = open_storage()
    optuna.create_study(study_name="x", storage=s)
    assert (tmp_path / "j" / "optuna.journal").is_file()
    with pytest.raises(StudyError, match="SQLite locks under several writers"):
        open_storage(f"sqlite:///{tmp_path}/o.db")
    with pytest.raises(StudyError, match="allowed: a journal file path"):
        open_storage("redis://localhost")


def test_a_study_of_kl_settings_where_the_kl_cannot_act_is_warned_naming_the_fix():
    """The README demo's single update per rollout with the reference refreshed every step: pi_theta = pi_ref =
    pi_old when the gradient is taken, so beta cannot matter; tune_urkl.yaml's two mini-batches make it act."""
    from flows.tuner import study_warnings

    study = load_study(ROOT / "sweeps" / "tune_urkl.yaml")
    assert study_warnings(study, cells(study)[0]) == []
    inert = load_study(ROOT / "sweeps" / "tune_urkl.yaml", overrides=["algorithm.mini_batches=1"])
    (line,) = study_warnings(inert, cells(inert)[0])
    assert "searches or sets KL settings (objective.beta) but the KL term is identically zero" in line
    assert "set algorithm.mini_batches >= 2" in line


@pytest.mark.parametrize("kind", ["tpe", "gp", "cmaes", "random", "brute_force"])
def test_every_sampler_asks_points_inside_the_space(tmp_path, kind):
    """Each sampler a study file may name is installed and samples the space (a finite one for brute force)."""
    from rpg_core.tuning import make_sampler

    search = {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": kind != "brute_force",
                           **({"step": 1e-3} if kind == "brute_force" else {})},
              "algorithm.epochs": {"type": "int", "low": 1, "high": 3}}  # fmt: skip
    study = load_study(write(tmp_path, search=search, sampler=kind))
    cell = cells(study)[0][0]
    s = optuna.create_study(sampler=make_sampler(study.sampler, study))
    for i in range(4):
        t = s.ask()
        params = suggest(t, study, cell)
        assert 1e-5 <= params["optim.lr"] <= 1e-2 and params["algorithm.epochs"] in (1, 2, 3)
        s.tell(t, float(i))
