"""RunConfig: YAML + preset + --set resolution, errors that name the field, the config key and the run key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpg_core.config import RunConfig, RunConfigError, load_run_config, parse_overrides, run_key
from rpg_core.data import ArithmeticLevel, PromptTemplate
from rpg_core.rewards import AnswerRule
from rpg_core.tracking import AXIS_TAGS

ROOT = Path(__file__).resolve().parents[1]
from rpg_core.objectives import PRESETS, AdvantageEstimator, Form, ReferenceMode

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_key_is_stable():
    a, b = RunConfig(), RunConfig.from_dict({})
    assert a == b and a.key() == b.key() and len(a.key()) == 12


def test_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 2.0e-5\nrollout:\n  n: 4\n")
    cfg = load_run_config(f, preset="grpo", overrides=["rollout.n=6", "objective.beta=0.01"])
    p = PRESETS["grpo"]
    assert cfg.algorithm.advantage is AdvantageEstimator.GRPO and cfg.algorithm.reference is ReferenceMode.FIXED
    assert cfg.objective.form is p.objective.form
    assert cfg.optim.lr == 2e-5  # the file beats the preset
    assert cfg.rollout.n == 6  # --set beats the file
    assert cfg.objective.beta == 0.01
    assert cfg.method_name() == "custom"  # beta changed: no longer the paper's GRPO
    assert load_run_config(preset="grpo").method_name() == "grpo"


def test_preset_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: rpg_reinforce_urkl\n")
    cfg = load_run_config(f)
    assert cfg.objective.form is Form.REINFORCE and cfg.optim.lr == PRESETS["rpg_reinforce_urkl"].lr
    assert cfg.reward.dynamic_sampling and cfg.axis_tags()["divergence"] == "URKL"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["optim.lrr=1"], ["optim.lrr", "unknown field", "lr", "weight_decay"]),
        (["bogus.x=1"], ["bogus", "unknown field", "rollout"]),
        (["objective.form=reinfroce"], ["objective.form", "'differentiable'", "'reinforce'"]),
        (["data.level=add9"], ["data.level", "add2"]),
        (["reward.rule=fuzzy"], ["reward.rule", "paper", "lenient"]),
        (["rollout.temperature=0"], ["rollout.temperature", "greater than 0"]),
        (["rollout.prompts_per_step=3", "rollout.n=3", "algorithm.mini_batches=2"], ["mini_batches", "9"]),
        (["data.task=dataset"], ["data.source"]),
        (["objective.clip_c=0.5"], ["clip_c", "> 1"]),
        (["optim.lr"], ["section.field=value"]),
        (["optim.lr=inf"], ["optim.lr", "finite number", "'inf'"]),  # not refused before: died in the optimizer
        (["objective.beta=nan"], ["objective.beta", "finite"]),
        (["rollout.temperature=-.inf"], ["rollout.temperature", "finite number"]),
        (["optim.betas=[.nan, 0.99]"], ["optim.betas.0", "finite number"]),
    ],
)
def test_bad_input_names_the_field(overrides, needles):
    with pytest.raises(RunConfigError) as e:
        load_run_config(overrides=overrides)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_no_float_field_takes_inf_or_nan():
    """Every float field of every section refuses inf and nan (pydantic's allow_inf_nan=False on the sections)."""
    import typing

    cfg = RunConfig()
    floats = [f"{s}.{f}" for s, sec in type(cfg).model_fields.items() if hasattr(getattr(cfg, s), "model_fields")
              for f, info in type(getattr(cfg, s)).model_fields.items()
              if info.annotation is float or (float in typing.get_args(info.annotation)
                                              and typing.get_origin(info.annotation) is not tuple)]  # fmt: skip
    assert len(floats) >= 15 and "optim.lr" in floats and "objective.beta" in floats
    for field in floats:
        for bad in ("inf", "nan"):
            with pytest.raises(RunConfigError, match=rf"{field}: .*finite"):
                load_run_config(overrides=[f"{field}={bad}"])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(RunConfigError, match="rpg_reinforce_urkl"):
        load_run_config(preset="rpg_urkl_typo")
    with pytest.raises(RunConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=1e-5", "a.c=true", "d=[1, 2]", "e=null"]) == {
        "a": {"b": 1e-5, "c": True},
        "d": [1, 2],
        "e": None,
    }


def test_key_ignores_bookkeeping_but_not_semantics():
    base = RunConfig()
    same = load_run_config(
        overrides=["train.output_dir=/elsewhere", "tracking.experiment=x", "train.checkpoint_every=3", "rollout.batch_size=7"]
    )
    assert same.key() == base.key() and same.run_key() == base.run_key()
    for o in ("optim.lr=1e-5", "rollout.n=4", "objective.direction=forward", "model.name=tiny"):
        assert load_run_config(overrides=[o]).key() != base.key(), o
    # Objective fields without effect do not change the key (canonical objective): estimator is implied for RPG.
    assert load_run_config(overrides=["objective.estimator=k1"]).key() == base.key()


def test_axis_tags_one_per_design_axis():
    tags = load_run_config(preset="rpg_fkl").axis_tags()
    assert tags["form"] == "differentiable" and tags["direction"] == "forward" and tags["normalized"] == "true"
    assert tags["divergence"] == "FKL" and tags["clip"] == "dual" and tags["method"] == "rpg_fkl"
    assert {"estimator", "advantage", "reference", "config_key", "objective_key"} <= set(tags)


def test_yaml_round_trip(tmp_path):
    cfg = load_run_config(preset="dapo", overrides=["model.name=tiny"])
    f = tmp_path / "r.yaml"
    f.write_text(cfg.to_yaml())
    assert load_run_config(f) == cfg


def test_with_overrides_is_validated_and_keeps_the_key():
    cfg = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    assert cfg.with_overrides({}).key() == cfg.key() == "a0df54342e7d"  # a round trip changes nothing
    tracked = cfg.with_overrides({"tracking.parent_run_id": "abc", "tracking": {"tags": {"sweep": "s"}}})
    assert (tracked.tracking.parent_run_id, tracked.tracking.tags, tracked.key()) == ("abc", {"sweep": "s"}, cfg.key())
    lr = cfg.with_overrides(["optim.lr=1e-5", "data.level=add1"])
    assert (lr.optim.lr, lr.data.level, cfg.optim.lr) == (1e-5, ArithmeticLevel.ADD1, 4e-5) and lr.key() != cfg.key()
    with pytest.raises(RunConfigError, match=r"data.level: 'add9' is not allowed; allowed: \['add1'"):
        cfg.with_overrides({"data": {"level": "add9"}})
    with pytest.raises(RunConfigError, match="train.steps"):
        cfg.with_overrides(["train.steps=0"])
    with pytest.raises(RunConfigError, match="preset: cannot change"):
        cfg.with_overrides({"preset": "grpo"})


def test_enum_fields_are_enums():
    cfg = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    assert cfg.data.level is ArithmeticLevel.ADD2 and cfg.data.template is PromptTemplate.PAPER_ONESHOT
    assert cfg.reward.rule is AnswerRule.PAPER and cfg.evaluation.template is PromptTemplate.PAPER
    assert cfg.evaluation.rule is None


def test_seeds_share_the_config_key_and_differ_in_the_run_key():
    """The config key leaves the seed out (the seeds of one configuration are one group); the run key adds it."""
    cfg = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    seed1 = cfg.with_overrides(["train.seed=1"])
    assert seed1.key() == cfg.key() and seed1.run_key() != cfg.run_key()
    assert (cfg.run_key(), seed1.run_key()) == (f"{cfg.key()}-s0", f"{cfg.key()}-s1")
    assert run_key(cfg.key(), 1) == seed1.run_key()
    other = cfg.with_overrides(["objective.beta=0.5"])
    assert other.key() != cfg.key() and other.run_key() != cfg.run_key()
    assert not hasattr(cfg, "group_key")  # one source of truth: the group is the config key
    assert list(cfg.axis_tags()) == list(AXIS_TAGS) and "group" not in AXIS_TAGS
    tags, tags1 = cfg.axis_tags(), seed1.axis_tags()
    assert (tags["config_key"], tags["seed"], tags1["config_key"], tags1["seed"]) == (cfg.key(), "0", cfg.key(), "1")
    assert {k: v for k, v in tags.items() if k != "seed"} == {k: v for k, v in tags1.items() if k != "seed"}
