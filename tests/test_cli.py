"""The main job, run as a user runs it: the installed `rpg` command in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]


def run_rpg(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("rpg") or shutil.which("rpg", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [exe, *args] if exe else [sys.executable, "-m", "rpg_core.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_rpg_design_checks_every_rpg_loss_and_flags_grpo():
    res = run_rpg("design")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "all RPG-form losses are gradient-exact" in out
    assert "61 distinct losses" in out
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.split()[:1] in (["differentiable"],
            ["reinforce"], ["penalty"], ["reward"])}  # fmt: skip
    assert len(rows) == 21
    for form in ("differentiable", "reinforce"):
        for div in ("FKL", "RKL", "UFKL", "URKL"):
            assert rows[(form, div)].count(f"{div} ok") == 3  # exact under every clip
    grpo = rows[("penalty", "k3-reverse")]
    assert "no exact J" in grpo and "forward" in grpo and "low_var_kl" in grpo
    assert "URKL = ok" in rows[("penalty", "k3-reverse*w")]  # the corrected GRPO KL is Table 1's URKL
    assert "iter." in rows[("penalty", "k3-forward")]  # the code's rpg_ufkl: exact only with pi_ref = pi_old
    for preset in ("grpo", "dapo", "reinforce_pp_baseline", "rpg_reinforce_urkl"):
        assert f"\n{preset} " in out


@pytest.mark.parametrize("args", [("design", "--beta", "0"), ("nonsense",)])
def test_rpg_rejects_bad_arguments(args):
    res = run_rpg(*args)
    assert res.returncode == 2 and res.stderr


def test_rpg_presets_lists_the_codes_differences():
    res = run_rpg("presets", "rpg_reinforce_urkl")
    assert res.returncode == 0
    assert "5e-7" in res.stdout and "never calls compute_policy_loss_reinforce" in res.stdout
