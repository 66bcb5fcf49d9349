"""`rpg eval --engine vllm` (rpg_core/evaluation.py's run_eval with a vLLM engine, #18): greedy evaluation with the vLLM
engine gives the prefix engine's responses, scores and metrics, problem for problem and sample for sample.

Needs vLLM, which `make install` puts in the project's venv (docs/vllm.md):

    .venv/bin/python -m pytest -q tests/test_vllm_eval.py

Skipped without it (`make test` and CI require it: RPG_REQUIRE_VLLM=1). The refusals and the missing-vLLM error are
tested in tests/test_evaluation.py and tests/test_cli.py, which hide vLLM and run everywhere. The model is tests/test_vllm.py's tiny random Qwen2 with 2 heads of 64
(vLLM's CPU attention rejects the suite's usual tiny model, head size 16), saved to a folder as a user's model is.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rpg_core.config import EvalConfig, GeneratorKind, RolloutConfig
from rpg_core.evaluation import run_eval

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this venv: `make install` installs it",
    ),
]

SCALE = 5.0
PROBLEMS = ["What is 2 + 3?", "What is 17 + 25?", "Compute 9 * 8.", "How many primes are below 20?", "Hi there"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The tiny head-size-64 Qwen2, written as a Hugging Face folder (config, weights, the SmolLM2 tokenizer). Its
    weights (norms aside) are scaled up 5x: at the initial scale every greedy response is the same run of newlines
    (the tied embedding echoes the prompt's last token), which would make the comparison vacuous."""
    from test_vllm import vllm_tiny_model

    path = tmp_path_factory.mktemp("vllm-eval") / "model"
    model = vllm_tiny_model(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(SCALE)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _bench(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": str(i)}) + "\n"
                            for i, p in enumerate(PROBLEMS)))  # fmt: skip
    return str(path)


def test_greedy_eval_with_vllm_equals_the_prefix_engine(model_dir, tmp_path):
    """temperature 0 (k=1: vLLM refuses several greedy samples of a prompt), 16 new tokens, paper template and rule:
    every sample's response text, token count, EOS flag, prediction and verdict, every problem row and every
    (non-timing) metric are the same with either engine."""
    torch.set_num_threads(2)
    s = EvalConfig(benchmarks=[_bench(tmp_path)], k=1, temperature=0.0, max_new_tokens=16, batch_size=4)
    prefix = run_eval(str(model_dir), s, tracking=False, device="cpu", progress=False)
    vllm = run_eval(str(model_dir), s, tracking=False, device="cpu", progress=False,
                    engine=RolloutConfig(generator=GeneratorKind.VLLM, vllm_kv_cache_gib=0.25))  # fmt: skip

    def rows(run):
        keys = ("problem_id", "sample", "response", "tokens", "finished", "pred", "acc")
        return sorted(tuple(x[k] for k in keys) for x in run.result.results["toy"].samples)

    a, b = rows(prefix), rows(vllm)
    assert len(a) == len(PROBLEMS) and a == b
    # the comparison can fail: real, different responses per problem
    assert len({r[2] for r in a}) == len(PROBLEMS) and all(r[3] > 0 for r in a)
    assert [p.row() for p in prefix.result.results["toy"].problems] == [p.row() for p in vllm.result.results["toy"].problems]
    scores = lambda run: {k: v for k, v in run.result.metrics().items() if not k.startswith("perf/")}  # noqa: E731
    assert scores(prefix) == scores(vllm)
    assert prefix.result.n_tokens == vllm.result.n_tokens == sum(r[3] for r in a)
    assert (prefix.result.settings["engine"], vllm.result.settings["engine"]) == ("prefix", "vllm")
    assert vllm.result.settings["vllm_kv_cache_gib"] == 0.25
