"""The metric schema (rpg_core.metrics): every metric a run logs is declared, reductions over processes follow the
declarations (the values the name rules gave before the schema), Best/Last only for the declared headline metrics."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from rpg_core import metrics
from rpg_core.evaluation import is_headline
from rpg_core.metrics import Reduce, UndeclaredMetric

pytestmark = pytest.mark.unit


def test_lookup_exact_and_templates():
    assert metrics.lookup("actor/ratio_max").reduce is Reduce.MAX
    assert metrics.lookup("eval/aime24/mean_at_32").name == "eval/{bench}/mean_at_{k}"
    assert metrics.lookup("eval/aime24/mean_at_32_se").name == "eval/{bench}/mean_at_{k}_se"
    assert metrics.lookup("eval/amc23_clean/pass_at_4").best_last
    assert metrics.lookup("eval/perf/seconds").name == "eval/perf/seconds"  # exact before templates
    for bad in ("actor/ratio_maxx", "eval/a/b/mean_at_4", "eval/aime24/mean_at_k", "time/anything", "step"):
        with pytest.raises(UndeclaredMetric):
            metrics.lookup(bad)
    assert {m.family for m in metrics.SCHEMA} == set(metrics.Family)


def test_reductions_are_the_former_name_rules():
    """Before the schema the trainer reduced ``*_max``, ``*/max`` and ``time/*`` by MAX, ``*_min`` by MIN,
    ``perf/*`` by mean x world (SUM) and everything else by MEAN: every declared training/loss metric keeps that."""

    def former(k: str) -> Reduce:
        if k.endswith("_max") or k.endswith("/max") or k.startswith("time/"):
            return Reduce.MAX
        if k.endswith("_min"):
            return Reduce.MIN
        return Reduce.SUM if k.startswith("perf/") else Reduce.MEAN

    trained = [m for m in metrics.SCHEMA if m.family in (metrics.Family.TRAINING, metrics.Family.LOSS)]
    assert len(trained) == 38
    for m in trained:
        assert m.reduce is former(m.name), m.name


def test_is_headline_is_the_former_pattern():
    former = re.compile(r"/(mean|pass|maj|best)_at_\d+$")
    names = ["eval/aime24/mean_at_32", "eval/aime24/mean_at_32_se", "eval/aime24/pass_at_1", "eval/x_clean/maj_at_8",
             "eval/toy/best_at_2", "eval/toy/format", "eval/toy/response_length", "eval/toy/truncated",
             "eval/toy/n_problems", "eval/perf/seconds", "eval/perf/tokens_per_s", "eval/perf/samples_per_s"]  # fmt: skip
    assert [is_headline(n) for n in names] == [bool(former.search(n)) for n in names]
    assert sum(is_headline(n) for n in names) == 4  # mean, pass, maj and best at k


def test_reduce_metrics_over_two_processes():
    """Trainer._reduce_metrics with a stand-in all-reduce over two processes' values (hand-computed results)."""
    from rpg_core.trainer import Trainer

    other = {"acc/strict": 0.5, "actor/ratio_max": 1.5, "actor/ratio_min": 0.75, "time/step": 3.0,
             "perf/tokens_per_s": 100.0, "response_length/max": 7.0}  # fmt: skip
    mine = {"acc/strict": 0.25, "actor/ratio_max": 1.25, "actor/ratio_min": 0.5, "time/step": 4.0,
            "perf/tokens_per_s": 50.0, "response_length/max": 9.0}  # fmt: skip
    theirs = torch.tensor([other[k] for k in sorted(other)], dtype=torch.float64)

    def all_reduce(t, op):
        return {"sum": t + theirs, "max": torch.maximum(t, theirs), "min": torch.minimum(t, theirs)}[op]

    stub = types.SimpleNamespace(world=2, _allreduce=all_reduce)
    out = Trainer._reduce_metrics(stub, mine)
    assert out == {"acc/strict": 0.375, "actor/ratio_max": 1.5, "actor/ratio_min": 0.5, "time/step": 4.0,
                   "perf/tokens_per_s": 150.0, "response_length/max": 9.0}  # fmt: skip
    with pytest.raises(UndeclaredMetric):
        Trainer._reduce_metrics(stub, {"acc/unknown": 1.0})


@pytest.mark.integration
def test_every_metric_a_tiny_run_logs_is_declared(tmp_path):
    """A tiny run with every family of training metrics (KL term in the loss, clipping, a fixed reference, the
    held-out and a benchmark evaluation with Best/Last): each name it logs to MLflow is declared."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import tiny_cfg

    from rpg_core.tracking import Tracker
    from rpg_core.trainer import Trainer

    toy = tmp_path / "toy.jsonl"
    toy.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"{i} + {i}?", "answer": str(2 * i)}) + "\n"
                           for i in range(2)))  # fmt: skip
    cfg = tiny_cfg(tmp_path, "train.eval_every=1", "objective.form=penalty", "objective.beta=0.1",
                   "algorithm.reference=fixed", "algorithm.epochs=2", f"evaluation.benchmarks=[{toy}]",
                   "evaluation.k=2", steps=1)  # fmt: skip
    logged: set[str] = set()
    real = Tracker.log_metrics

    def spy(self, m, step=None):
        logged.update(m)
        return real(self, m, step=step)

    with mock.patch.object(Tracker, "log_metrics", spy):
        res = Trainer(cfg).fit()
    assert {"actor/kl_loss", "actor/clipfrac", "eval/acc_strict", "eval/toy/mean_at_2", "best/toy/mean_at_2",
            "perf/tokens_per_s", "time/step", "lr"} <= logged  # fmt: skip
    assert set(res.history[-1]) - {"step"} <= logged
    for name in sorted(logged):
        metrics.lookup(name)  # raises UndeclaredMetric
