"""Sweep files: expansion (grid x seeds, exclusions, bundle and preset axes), invalid combinations dropped with their
reason, duplicates collapsed by run key (config key and seed), the shipped sweeps, and `rpg sweep expand`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rpg_core.cli import design_space
from rpg_core.objectives import PRESETS
from rpg_core.sweeps import SweepError, expand, load_sweep

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_smoke_sweep():
    exp = expand(load_sweep(ROOT / "sweeps" / "smoke.yaml"))
    assert [r.axes for r in exp.runs] == [
        {"objective.direction": d, "objective.normalized": n} for d in ("forward", "reverse") for n in ("true", "false")
    ]
    assert not exp.dropped and len({r.key for r in exp.runs}) == 4
    for r in exp.runs:
        c = r.config
        assert (c.model.name, c.train.steps, c.objective.form.value, c.objective.beta) == ("tiny", 2, "reinforce", 0.05)
        assert c.objective.direction.value == r.axes["objective.direction"]
        assert (r.key, r.run_key) == (c.key(), c.run_key()) and r.overrides["preset"] == "rpg_reinforce_urkl"


def test_quick_sweep_is_the_four_divergences_on_the_embedded_model_with_the_kl_acting():
    """The sweep the README points a new user to: FKL / UFKL / RKL / URKL of RPG-REINFORCE on SmolLM2-135M, single-digit
    addition, held-out accuracy every step, and settings under which the KL term changes the update (a fixed
    reference, two mini-batches): four curves that part, unlike the smoke sweep's untrained tiny model."""
    exp = expand(load_sweep(ROOT / "sweeps" / "quick.yaml"))
    assert [r.run_name("quick") for r in exp.runs] == [
        "quick/rpg_reinforce-FKL-dual-s0", "quick/rpg_reinforce-UFKL-dual-s0",
        "quick/rpg_reinforce-RKL-dual-s0", "quick/rpg_reinforce-URKL-dual-s0",
    ]  # fmt: skip
    for r in exp.runs:
        c = r.config
        assert (c.model.name, c.data.level, c.train.steps, c.train.eval_every) == ("smollm2-135m", "add1", 4, 1)
        assert c.kl_inert_reason() is None and c.algorithm.mini_batches == 2 and c.objective.beta == 0.1
        assert c.rollout.prompts_per_step * c.rollout.n == 16 and c.data.n_eval == 32


def test_kl_design_sweep_is_the_design_space():
    """Every distinct loss of `rpg design` once: 21 KL terms x 3 clips less the merges = 61 runs. The 18 invalid
    combinations are the penalty form's forward KL used as an importance weight (2 normalizations x 3 estimators x
    3 clips), rejected by the objective with its reason."""
    exp = expand(load_sweep(ROOT / "sweeps" / "kl_design.yaml"))
    assert len(exp.runs) == 61 == len({r.key for r in exp.runs})
    invalid = [d for d in exp.dropped if d.reason.startswith("invalid")]
    assert len(invalid) == 18 and exp.combinations == 4 * 2 * 2 * 3 * 2 * 3
    assert all(d.axes["objective.form"] == "penalty" and d.axes["objective.direction"] == "forward"
               and d.axes["objective.kl_is_weight"] == "true" for d in invalid)  # fmt: skip
    assert "requires direction='reverse'" in invalid[0].reason
    terms = {cfg.key() for cfg in design_space(0.05)}  # one per KL term at clip=dual
    dual = {r.config.objective.canonical().key() for r in exp.runs if r.config.objective.clip.value == "dual"}
    assert dual == terms
    assert all(r.config.model.name == "smollm2-135m" and r.config.data.level == "add2" for r in exp.runs)


def test_paper_sweep_has_the_12_methods_at_paper_settings():
    exp = expand(load_sweep(ROOT / "sweeps" / "paper.yaml"))
    assert [r.config.method_name() for r in exp.runs] == list(PRESETS)
    for r in exp.runs:
        c = r.config
        assert (c.rollout.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens, c.train.steps) == (512, 16, 2048, 400)
        assert c.evaluation.benchmarks == ["aime24", "aime25", "amc23"] and c.evaluation.k == 32
        assert c.optim.lr == PRESETS[r.axes["preset"]].lr  # each method at its own preset lr (spec §7.2)


def test_bundles_exclusions_seeds_and_duplicates(tmp_path):
    path = _write(tmp_path, """
name: t
preset: rpg_reinforce_urkl
base: {model.name: tiny, train.steps: 3}
grid:
  objective.clip: [none, dual]
  variant:
    - {label: slow, optim.lr: 1.0e-6}
    - {label: fast, optim.lr: 1.0e-4, algorithm.mini_batches: 2}
exclude:
  - {objective.clip: none, variant: fast}
seeds: [1, 2]
""")
    exp = expand(load_sweep(path))
    assert [(r.seed, r.axes["objective.clip"], r.axes["variant"]) for r in exp.runs] == [
        (s, c, v) for s in (1, 2) for c, v in (("none", "slow"), ("dual", "slow"), ("dual", "fast"))
    ]
    fast = exp.runs[2].config
    assert (fast.optim.lr, fast.algorithm.mini_batches, fast.train.seed, fast.train.steps) == (1e-4, 2, 1, 3)
    assert exp.combinations == 6  # excluded combinations are not counted
    # Two spellings of one run: the form ignores the estimator, so both collapse to one key.
    path = _write(tmp_path, """
name: d
base: {model.name: tiny}
grid:
  objective.form: [differentiable]
  objective.estimator: [k1, k3]
""")
    exp = expand(load_sweep(path))
    assert len(exp.runs) == 1 and exp.dropped[0].reason == f"duplicate of run #1 (same run key {exp.runs[0].run_key})"
    # --set overrides reach every run
    exp = expand(load_sweep(ROOT / "sweeps" / "smoke.yaml", overrides=["train.steps=5"]))
    assert {r.config.train.steps for r in exp.runs} == {5}


def test_seeds_multiply_every_configuration(tmp_path):
    """seeds [0, 1] over 3 configurations: 6 runs; the seeds of one configuration share its config key (the MLflow
    group) and differ in their run key. Duplicate spellings collapse per seed, not across seeds."""
    path = _write(tmp_path, """
name: s
preset: rpg_reinforce_urkl
base: {model.name: tiny}
grid:
  objective.beta: [0.01, 0.1, 1.0]
  objective.estimator: [k1, k3]   # ignored by the RPG form: each second spelling is a duplicate
seeds: [0, 1]
""")
    exp = expand(load_sweep(path))
    assert len(exp.runs) == 6 and len(exp.dropped) == 6
    assert [(r.seed, r.axes["objective.beta"]) for r in exp.runs] == [(s, b) for s in (0, 1) for b in ("0.01", "0.1", "1.0")]
    by_seed = {s: [r for r in exp.runs if r.seed == s] for s in (0, 1)}
    assert [r.key for r in by_seed[0]] == [r.key for r in by_seed[1]] and len({r.key for r in exp.runs}) == 3
    assert len({r.run_key for r in exp.runs}) == 6
    assert all(r.run_key == f"{r.key}-s{r.seed}" == r.config.run_key() and r.config.train.seed == r.seed
               for r in exp.runs)  # fmt: skip
    assert [d.reason for d in exp.dropped] == [f"duplicate of run #{r.index} (same run key {r.run_key})" for r in exp.runs]
    rows = exp.as_dicts()
    assert [(x["key"], x["seed"], x["run_key"]) for x in rows] == [(r.key, r.seed, r.run_key) for r in exp.runs]
    lines = exp.table().splitlines()
    assert lines[0].split()[:3] == ["#", "key", "seed"] and lines[2].split()[:3] == ["1", exp.runs[0].key, "0"]
    assert lines[5].split()[:3] == ["4", exp.runs[0].key, "1"]


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ngrids: {}\n", r"grids: Extra inputs are not permitted; allowed: name, description, config"),
    ("name: x\ngrid: {lr: [1, 2]}\n", r"grid.lr: an axis is a dotted config field"),
    ("name: x\ngrid: {objective.beta: []}\n", r"grid.objective.beta: an axis needs at least one value"),
    ("name: x\ngrid: {v: [{optim.lr: 1}]}\n", r"grid.v: every bundle needs a 'label' string"),
    ("name: x\ngrid: {objective.beta: [0.1]}\nexclude: [{objective.clip: none}]\n", r"exclude\[0\].objective.clip: not a grid axis"),
    ("name: x\ngrid: {objective.beta: [0.1]}\nexclude: [{objective.beta: 0.2}]\n", r"exclude\[0\].objective.beta: 0.2 is not one of"),
    ("name: x\nseeds: [1, 1]\n", r"seeds: \[1, 1\] repeat"),
    ("name: x\nbase: {train.seed: 3}\n", r"base.train.seed: the seeds are set by `seeds:`"),
    ("name: x\nbase: {train: {seed: 3}}\n", r"base.train.seed: the seeds are set by `seeds:`"),
    ("name: x\ngrid: {train.seed: [1, 2]}\n", r"grid.train.seed: sets train.seed; the seeds are set by `seeds:`"),
    ("name: x\ngrid: {v: [{label: a, train.seed: 1}]}\n", r"grid.v: sets train.seed"),
    ("name: x\nconfig: nope.yaml\n", r"config: '.*nope.yaml' does not exist"),
])  # fmt: skip
def test_bad_sweep_files_name_the_field(tmp_path, text, message):
    with pytest.raises(SweepError, match=message):
        expand(load_sweep(_write(tmp_path, text)))


def test_invalid_values_are_dropped_with_the_config_error(tmp_path):
    exp = expand(load_sweep(_write(tmp_path, "name: x\ngrid: {objective.clip: [dual, triple]}\n")))
    assert len(exp.runs) == 1 and "objective.clip" in exp.dropped[0].reason and "triple" in exp.dropped[0].reason


@pytest.mark.integration
@pytest.mark.subprocess
def test_rpg_sweep_expand_cli():
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "sweeps/smoke.yaml", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sweep"] == "smoke" and [x["index"] for x in out["runs"]] == [1, 2, 3, 4]
    assert out["runs"] == [dict(x, method="custom") for x in out["runs"]]  # the KL terms differ from the preset's
    assert all(x["run_key"] == f"{x['key']}-s{x['seed']}" and x["seed"] == 0 for x in out["runs"])
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "sweeps/kl_design.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "kl_design: 61 runs from 288 combinations (18 invalid, 209 duplicates dropped)" in r.stdout
    # --seeds (the sweep flow's form field `seeds`) replaces the file's seeds: every configuration once per seed
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "sweeps/smoke.yaml", "--json",
                        "--seeds", "3,7"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    seeded = json.loads(r.stdout)["runs"]
    assert [x["seed"] for x in seeded] == [3] * 4 + [7] * 4
    assert [x["key"] for x in seeded[:4]] == [x["key"] for x in seeded[4:]] == [x["key"] for x in out["runs"]]
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "sweeps/smoke.yaml", "--seeds", "0,x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--seeds '0,x': 'x' is not an integer" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "nope.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "sweep file 'nope.yaml' does not exist" in r.stderr
    # nothing would run (every combination invalid): the reasons, and exit 2 (it exited 0)
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "sweep", "expand", "sweeps/smoke.yaml", "--set",
                        "data.level=add9"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "'add9' is not allowed" in r.stdout
    assert ("rpg sweep expand: smoke: no valid run: 4 combinations, every one dropped; first: seed=0 "
            "objective.direction=forward, objective.normalized=true: invalid: ") in r.stderr


def test_kl_warnings_when_the_sweep_sets_kl_settings_the_runs_cannot_feel(tmp_path, capsys):
    """A beta sweep on the README demo (one update per rollout, reference refreshed every step: the KL term is 0)
    warns, naming the runs and the fix; with two mini-batches it does not, nor does a sweep that sets no KL setting.
    `rpg sweep expand` prints the warnings to stderr (and in --json) and still succeeds."""
    from rpg_core.cli import main
    from rpg_core.sweeps import kl_settings_set, kl_warnings

    demo = ROOT / "configs" / "demo_add2_urkl.yaml"
    path = tmp_path / "beta.yaml"
    path.write_text(f"name: beta\nconfig: {demo}\ngrid:\n  objective.beta: [1.0e-4, 1.0e-3]\n")
    exp = expand(load_sweep(path))
    warnings = kl_warnings(exp.sweep, exp)
    assert len(warnings) == 1
    assert warnings[0].startswith("sweep beta: 2 of 2 runs (#1, #2) set KL settings (objective.beta) but the KL term "
                                  "is identically zero: one optimizer update per rollout")  # fmt: skip
    assert "set algorithm.mini_batches >= 2" in warnings[0]
    two = expand(load_sweep(path, overrides=["algorithm.mini_batches=2"]))
    assert kl_warnings(two.sweep, two) == []
    (tmp_path / "lr.yaml").write_text(f"name: lr\nconfig: {demo}\ngrid:\n  optim.lr: [1.0e-5, 4.0e-5]\n")
    lr = expand(load_sweep(tmp_path / "lr.yaml"))
    assert kl_settings_set(lr.sweep) == [] and kl_warnings(lr.sweep, lr) == []
    # a preset axis sets the objective and the reference; a bundle its own fields
    methods = load_sweep(_write(tmp_path, f"""
name: m
config: {demo}
grid:
  preset: [rpg_reinforce_urkl, rpg_reinforce_fkl]
  v: [{{label: a, optim.lr: 1.0e-5}}, {{label: b, objective.estimator: k1}}]
"""))
    assert kl_settings_set(methods) == ["objective.beta", "objective.form", "objective.direction",
                                        "objective.normalized", "objective.estimator", "objective.kl_is_weight",
                                        "algorithm.reference"]  # fmt: skip
    exp_m = expand(methods)
    assert [w.split(" but ")[0] for w in kl_warnings(methods, exp_m)] == [
        "sweep m: 2 of 4 runs (#1, #2) set KL settings (" + ", ".join(kl_settings_set(methods)) + ")",  # URKL
        "sweep m: 2 of 4 runs (#3, #4) set KL settings (" + ", ".join(kl_settings_set(methods)) + ")",  # FKL: noise
    ]
    assert main(["sweep", "expand", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["warnings"] == warnings and err == f"rpg sweep expand: warning: {warnings[0]}\n"
    assert main(["sweep", "expand", str(path), "--set", "algorithm.mini_batches=2"]) == 0
    assert capsys.readouterr().err == ""


def test_kl_warnings_of_the_shipped_sweeps():
    """smoke, quick (two mini-batches) and paper (16) do not warn. kl_design does, for its 15 reward-form runs: the KL in the
    reward is taken between pi_old and pi_ref at rollout time, 0 with the iterative reference it uses, whatever
    algorithm.mini_batches is."""
    from rpg_core.sweeps import kl_warnings

    found = {}
    for name in ("smoke", "quick", "paper", "kl_design"):
        exp = expand(load_sweep(ROOT / "sweeps" / f"{name}.yaml"))
        found[name] = kl_warnings(exp.sweep, exp)
        inert = [r for r in exp.runs if r.config.kl_inert_reason()]
        assert len(inert) == (15 if name == "kl_design" else 0)
        assert all(r.config.objective.form.value == "reward" for r in inert)
    assert found["smoke"] == found["quick"] == found["paper"] == [] and len(found["kl_design"]) == 1
    assert found["kl_design"][0].startswith("sweep kl_design: 15 of 61 runs (#47, #48,")
    assert "objective.form=reward" in found["kl_design"][0]


def test_run_names_say_what_each_run_is(tmp_path):
    """MLflow and Prefect name a sweep's runs ``<sweep>/<design>[-<axis>=<value>]-s<seed>``: the preset when the run
    still is one, else form-divergence-clip; grid axes the design does not say (here lr) are appended."""
    smoke = expand(load_sweep("sweeps/smoke.yaml"))
    assert [r.run_name("smoke") for r in smoke.runs] == [
        "smoke/rpg_reinforce-FKL-dual-s0", "smoke/rpg_reinforce-UFKL-dual-s0",
        "smoke/rpg_reinforce-RKL-dual-s0", "smoke/rpg_reinforce-URKL-dual-s0",
    ]  # fmt: skip
    paper = expand(load_sweep("sweeps/paper.yaml"))
    assert {r.run_name("paper").split("/")[1].removesuffix("-s0") for r in paper.runs} == set(PRESETS)
    f = tmp_path / "s.yaml"
    f.write_text("name: lrs\npreset: grpo\nbase: {model.name: tiny}\ngrid:\n  optim.lr: [1.0e-5, 1.0e-4]\n"
                 "  objective.clip: [ppo, none]\nseeds: [3]\n")  # fmt: skip
    names = [r.run_name("lrs") for r in expand(load_sweep(f)).runs]
    assert names == ["lrs/grpo-lr=1e-05-s3", "lrs/penalty-k3-reverse-noclip-lr=1e-05-s3", "lrs/grpo-lr=0.0001-s3",
                     "lrs/penalty-k3-reverse-noclip-lr=0.0001-s3"]  # fmt: skip
