"""The metric schema: every metric the platform logs, its cross-process reduction and whether it gets Best/Last.

Nothing dispatches on a metric's name: the trainer reduces its step metrics over processes with ``reduction``,
the evaluation tracks the paper's "Best" (spec §8) for the metrics declared ``best_last``. A name is either
declared exactly or matches a declared template, whose fields are ``{bench}`` (a benchmark name, one path part)
and ``{k}`` (an integer). Looking up an undeclared name raises ``UndeclaredMetric``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

__all__ = [
    "SCHEMA",
    "Family",
    "Metric",
    "Reduce",
    "UndeclaredMetric",
    "best_last",
    "lookup",
    "reduction",
]


class Reduce(StrEnum):
    """How a value computed on each process becomes the logged value under DDP."""

    MEAN = "mean"  # the average over processes (every process holds an equal share of the batch)
    MAX = "max"  # the largest (extremes; wall times: the slowest process sets the step's time)
    MIN = "min"
    SUM = "sum"  # the total (throughputs: every process's tokens count)


class Family(StrEnum):
    TRAINING = "training"  # Trainer.train_step, one value per step
    LOSS = "loss"  # policy_loss's metrics and the update's, under actor/
    # an engine with its own weights (rollout.generator: vllm, docs/vllm.md): its weight sync and the sampler-trainer
    # mismatch, one value per step of Trainer.train_step
    ROLLOUT = "rollout"
    EVALUATION = "evaluation"  # the held-out evaluation and the benchmarks (rpg_core.evaluation), under eval/ and best/
    SWEEP = "sweep"  # a sweep's parent run (flows)
    NIGHTLY = "nightly"  # the nightly evaluation's run (flows)
    TUNING = "tuning"  # a study's parent run (the tuner)


class UndeclaredMetric(KeyError):
    """A metric name that the schema does not declare (add it to ``SCHEMA``)."""


@dataclass(frozen=True)
class Metric:
    name: str  # the exact name, or a template with {bench} / {k} fields
    family: Family
    reduce: Reduce = Reduce.MEAN
    best_last: bool = False  # reported as the paper does: its best over evaluations and its last value (spec §8)
    doc: str = ""


MEAN_AT_K = "eval/{bench}/mean_at_{k}"  # the paper's headline (spec §8): summaries pick it by this declaration


def _m(family: Family, name: str, reduce: Reduce = Reduce.MEAN, best_last: bool = False, doc: str = "") -> Metric:
    return Metric(name, family, reduce, best_last, doc)


T, L, E = Family.TRAINING, Family.LOSS, Family.EVALUATION
SCHEMA: tuple[Metric, ...] = (
    # -- training: one value per step (Trainer.train_step) ---------------------------------------------------------
    _m(T, "lr", doc="the learning rate of this step's updates"),
    _m(T, "ds/rounds", doc="generation rounds this step (dynamic sampling draws again until enough groups are kept)"),
    _m(T, "ds/groups_mixed", doc="fraction of sampled groups with mixed accuracy (what DAPO's filter keeps)"),
    _m(T, "ds/kept_groups", doc="groups trained on per process"),
    _m(T, "acc/sampled", doc="accuracy of every sample drawn, before the group filter"),
    _m(T, "acc/strict", doc="accuracy of the trained samples under the run's reward rule"),
    _m(T, "acc/lenient", doc="accuracy of the trained samples under the lenient rule (last integer)"),
    _m(T, "acc/format", doc="fraction of trained samples with an extractable answer"),
    _m(T, "reward/mean", doc="sequence reward after overlong shaping (before KL-in-reward)"),
    _m(T, "reward/std"),
    _m(T, "response_length/mean"),
    _m(T, "response_length/max", Reduce.MAX),
    _m(T, "response_length/clip_frac", doc="fraction of responses that hit max_new_tokens"),
    _m(T, "adv/abs_mean", doc="mean |A| over response tokens"),
    _m(T, "time/rollout", Reduce.MAX, doc="seconds sampling and scoring"),
    _m(T, "time/logprob", Reduce.MAX, doc="seconds recomputing log pi_old, log pi_ref and the advantages"),
    _m(T, "time/update", Reduce.MAX, doc="seconds of the K epochs of mini-batch updates"),
    _m(T, "time/step", Reduce.MAX),
    _m(T, "perf/tokens_per_s", Reduce.SUM, doc="prompt + response tokens per second, all processes together"),
    _m(T, "perf/gen_tokens_per_s", Reduce.SUM, doc="sampled tokens per second of rollout, all processes together"),
    # -- loss: policy_loss's metrics (token means, spec §3.1 estimators) and the update's ----------------------------
    _m(L, "actor/loss", doc="the aggregated policy loss"),
    _m(L, "actor/pg_loss"),
    _m(L, "actor/kl_loss", doc="the KL term of the loss (forms with a separate KL term)"),
    _m(L, "actor/kl_value", doc="the KL term's mean value, beta excluded"),
    _m(L, "actor/kl_k1", doc="KL(pi_theta || pi_ref) estimates, spec §3.1"),
    _m(L, "actor/kl_k2"),
    _m(L, "actor/kl_k3"),
    _m(L, "actor/ratio_mean", doc="w = pi_theta / pi_old"),
    _m(L, "actor/ratio_max", Reduce.MAX),
    _m(L, "actor/ratio_min", Reduce.MIN),
    _m(L, "actor/adv_mean"),
    _m(L, "actor/clipfrac"),
    _m(L, "actor/clipfrac_high"),
    _m(L, "actor/clipfrac_low"),
    _m(L, "actor/clipfrac_dual"),
    _m(L, "actor/grad_norm", doc="mean over the step's optimizer steps, before clipping"),
    _m(L, "actor/entropy", doc="token entropy of pi_theta in the first epoch"),
    _m(L, "actor/updates", doc="optimizer steps this training step (epochs x mini_batches)"),
    # -- rollout: an engine with its own weights (vLLM); objectives/correction.py's mismatch, pi_trainer/pi_sampler ----
    _m(Family.ROLLOUT, "rollout/sync_logp_abs_diff", Reduce.MAX,
       doc="mean |engine - trainer| log-prob of a few sampled tokens after the weight sync (rollout.vllm_sync_tolerance)"),
    _m(Family.ROLLOUT, "rollout/mismatch_abs_logp_diff", doc="mean |log pi_trainer - log pi_sampler| of the step's tokens"),
    _m(Family.ROLLOUT, "rollout/mismatch_kl_k3", doc="k3 estimate of KL(pi_sampler || pi_trainer) over the step's tokens"),
    _m(Family.ROLLOUT, "rollout/mismatch_share_outside", doc="share of tokens with pi_trainer/pi_sampler outside [0.5, 2]"),
    _m(Family.ROLLOUT, "rollout/correction_share",
       doc="rollout.correction: share of the step's tokens whose weight was truncated (tis) or masked (mis)"),
    _m(Family.ROLLOUT, "time/sync", Reduce.MAX, doc="seconds of the weight sync and its check"),
    # -- evaluation: held-out problems (trainer.heldout_eval) and benchmarks (rpg_core.evaluation) ------------------
    _m(E, "eval/acc_strict", doc="held-out accuracy, the paper's rule; its Best is eval/best_acc_strict"),
    _m(E, "eval/acc_lenient"),
    _m(E, "eval/format"),
    _m(E, "eval/response_length"),
    _m(E, "eval/best_acc_strict", Reduce.MAX, doc="the best eval/acc_strict so far, step 0 included"),
    _m(E, "eval/{bench}/n_problems"),
    _m(E, MEAN_AT_K, best_last=True, doc="Mean@k (spec §8)"),
    _m(E, "eval/{bench}/mean_at_{k}_se", doc="the standard error of Mean@k"),
    _m(E, "eval/{bench}/pass_at_{k}", best_last=True, doc="Pass@k, the unbiased estimator"),
    _m(E, "eval/{bench}/maj_at_{k}", best_last=True, doc="Maj@k"),
    _m(E, "eval/{bench}/best_at_{k}", best_last=True, doc="Best@k, bootstrapped"),
    _m(E, "eval/{bench}/format"),
    _m(E, "eval/{bench}/response_length"),
    _m(E, "eval/{bench}/truncated"),
    _m(E, "eval/perf/seconds", Reduce.MAX),
    _m(E, "eval/perf/samples_per_s", Reduce.SUM),
    _m(E, "eval/perf/tokens_per_s", Reduce.SUM),
    _m(E, "best/{bench}/mean_at_{k}", Reduce.MAX, doc="the Best of eval/{bench}/mean_at_{k} so far"),
    _m(E, "best/{bench}/pass_at_{k}", Reduce.MAX),
    _m(E, "best/{bench}/maj_at_{k}", Reduce.MAX),
    _m(E, "best/{bench}/best_at_{k}", Reduce.MAX),
    # -- sweep, nightly evaluation, tuning (their parent runs) ------------------------------------------------------
    _m(Family.SWEEP, "runs_finished", Reduce.SUM),
    _m(Family.SWEEP, "runs_failed", Reduce.SUM),
    _m(Family.SWEEP, "seconds", Reduce.MAX),
    _m(Family.NIGHTLY, "evaluated", Reduce.SUM, doc="models evaluated"),
    _m(Family.NIGHTLY, "failed", Reduce.SUM),
    _m(Family.TUNING, "tune/best_value", Reduce.MAX, best_last=True, doc="the study's best objective value so far"),
    _m(Family.TUNING, "tune/trials_complete", Reduce.SUM),
    _m(Family.TUNING, "tune/trials_pruned", Reduce.SUM),
)
del T, L, E

_FIELDS = {"bench": r"[^/]+", "k": r"\d+"}
_EXACT = {m.name: m for m in SCHEMA if "{" not in m.name}
_TEMPLATES = [
    (re.compile("".join(_FIELDS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in re.split(r"(\{\w+\})", m.name))
                + r"\Z"), m)
    for m in SCHEMA if "{" in m.name
]  # fmt: skip
assert len(_EXACT) + len(_TEMPLATES) == len(SCHEMA), "a metric is declared twice"


@cache
def lookup(name: str) -> Metric:
    """The declaration of ``name`` (exact, else the one template it matches)."""
    if name in _EXACT:
        return _EXACT[name]
    found = [m for rx, m in _TEMPLATES if rx.match(name)]
    if len(found) != 1:
        raise UndeclaredMetric(
            f"metric {name!r} is not declared in rpg_core.metrics.SCHEMA" if not found
            else f"metric {name!r} matches several templates: {[m.name for m in found]}"
        )  # fmt: skip
    return found[0]


def reduction(name: str) -> Reduce:
    return lookup(name).reduce


def best_last(name: str) -> bool:
    return lookup(name).best_last
