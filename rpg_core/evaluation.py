"""Evaluation at the paper's protocol (spec §8): AIME 2024, AIME 2025 and AMC 2023 at Mean@k (+ GSM8K, MATH-500).

One problem = one prompt (the paper's single user turn through the model's chat template, left-truncated to
``max_prompt_tokens``), ``k`` samples at temperature 1.0 / top-p 1.0 / no top-k, scored by the paper's answer rule
(the last "Answer:" line of the last 300 characters, math_dapo). Per benchmark:

Metric names follow the paper with '@' spelled ``_at_`` (MLflow allows no '@'): ``aime24/mean_at_32`` is Mean@32.

* **Mean@k** (the paper's metric, DAPO's): the mean over problems of the share of the k samples that are correct;
  ``mean_at_k_se`` is its standard error from sampling (problems fixed): sqrt(sum_i s_i^2 / k) / N with s_i^2 the
  unbiased variance of problem i's k outcomes.
* **Pass@j** for j = 1, 2, 4, ..., k: the unbiased estimator of Chen et al. (2021), 1 - C(k-c, j) / C(k, j),
  averaged over problems. ``pass_at_1`` equals ``mean_at_k``.
* **Maj@k**: majority vote over the k normalised predictions ("[INVALID]" does not vote; ties go to the answer
  seen first); correct when the voted answer is.
* **best@k**: verl's ``best@k/mean`` (a bootstrap of the max over k draws with replacement, 1000 resamples,
  seed 42), which is what the paper's Fig. 7 calls "Pass@32"; reported for comparison with it.
* ``format`` (share of samples with an "Answer:" line), ``response_length`` (tokens), ``truncated`` (share that hit
  the token budget without EOS).

AMC23 is also reported on its uncontaminated subset ``amc23_clean`` (``dapo_10gram_overlap < 0.5``: the 14 of 40
problems that do not overlap DAPO-Math-17k, ../shared/data/README.md).

Benchmarks load from a local folder (``data_dir``, ``$RPG_EVAL_DATA``, or the development copy found by
``rpg_core.data.shared_data_dir``) or else from the Hugging Face Hub.

Sampling is seeded per generate call from (seed, benchmark, call index), so results are reproducible for a given
seed and ``batch_size``, and independent of how many processes share the work (calls are dealt round-robin).
"""

from __future__ import annotations

import math
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rpg_core import checkpoints
from rpg_core import data as data_mod
from rpg_core import metrics as metrics_mod
from rpg_core import rewards as rewards_mod
from rpg_core.benchmarks import BENCHMARKS, Benchmark, BenchmarkName, check_benchmark
from rpg_core.benchmarks import known_benchmarks as _known
from rpg_core.config import EvalConfig, GeneratorKind, RolloutConfig, RunConfig
from rpg_core.rollout import Generator, SamplingParams, make_generator, mix_seed, preflight

__all__ = [
    "BENCHMARKS",
    "PAPER_MAX_NEW_TOKENS",
    "Benchmark",
    "BenchmarkName",
    "BenchmarkResult",
    "EvalResult",
    "EvalTarget",
    "LoadedBenchmark",
    "ProblemResult",
    "best_at_k_bootstrap",
    "check_benchmark",
    "evaluate",
    "load_benchmark",
    "log_eval",
    "majority_vote",
    "pass_at_k",
    "resolve_target",
    "summarize",
]

PAPER_MAX_NEW_TOKENS = 2048  # max_response_length in the paper's scripts (spec §7.1, §8)
CONTAMINATION_FIELD = "dapo_10gram_overlap"
CLEAN_BELOW = 0.5  # ../shared/data/README.md: report AMC23 also on the rows below this overlap
CLEAN_SUFFIX = "_clean"


def _data_dirs(data_dir: str | None) -> list[Path]:
    if data_dir:
        return [Path(data_dir).expanduser()]
    env = os.environ.get("RPG_EVAL_DATA")
    if env:
        return [Path(env).expanduser()]
    shared = data_mod.shared_data_dir()
    return [shared] if shared else []


@dataclass(frozen=True)
class LoadedBenchmark:
    benchmark: Benchmark
    problems: list[data_mod.Problem]
    source: str  # the file or Hub dataset it was read from


def load_benchmark(spec: str, *, data_dir: str | None = None, limit: int | None = None) -> LoadedBenchmark:
    """A benchmark's problems: ``spec`` is a name (see BenchmarkName) or a .jsonl/.parquet file (a custom benchmark
    named after the file, scored with the paper's rule). A name reads ``<data_dir>/<file>`` when present (an
    explicit ``data_dir`` must hold it), else the Hub dataset."""
    check_benchmark(spec)
    if spec not in _known():
        path = Path(spec).expanduser()
        bench = Benchmark(path.stem, str(path), None)
        return LoadedBenchmark(bench, data_mod.load_problems(str(path), limit=limit), str(path))
    bench = BENCHMARKS[BenchmarkName(spec)]
    for d in _data_dirs(data_dir):
        path = d / bench.file
        if path.is_file():
            return LoadedBenchmark(bench, data_mod.load_problems(str(path), limit=limit), str(path))
    if data_dir:
        raise ValueError(f"evaluation.data_dir: {data_dir!r} has no {bench.file} for benchmark {spec!r}")
    problems = data_mod.load_problems(bench.hub, split=bench.hub_split, hub_subdir=bench.hub_subdir, limit=limit)
    return LoadedBenchmark(bench, problems, f"hf://datasets/{bench.hub}")


# -- metrics ---------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(preds: Sequence[str], accs: Sequence[bool]) -> tuple[str, bool]:
    """(voted prediction, whether it is correct). INVALID does not vote; ties go to the prediction seen first;
    no valid prediction: (INVALID, False)."""
    counts = Counter(p for p in preds if p != rewards_mod.INVALID)
    if not counts:
        return rewards_mod.INVALID, False
    top = max(counts.values())
    voted = next(p for p in preds if counts.get(p) == top)  # first seen among the most frequent
    return voted, bool(next(a for p, a in zip(preds, accs, strict=True) if p == voted))


def best_at_k_bootstrap(values: Sequence[float], k: int, *, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """verl's ``best@k/mean`` (trainer/ppo/metric_utils.bootstrap_metric with np.max), reproduced draw for draw:
    the mean over ``n_bootstrap`` resamples of k values drawn with replacement of their max."""
    import numpy as np

    state = np.random.get_state()  # verl seeds the global NumPy RNG per problem; saved and restored here
    try:
        np.random.seed(seed)
        arr = np.asarray(values, dtype=float)
        best = [float(np.max(arr[np.random.choice(len(arr), size=k, replace=True)])) for _ in range(n_bootstrap)]
    finally:
        np.random.set_state(state)
    return float(np.mean(best))


def at(metric: str, k: int) -> str:
    """Metric names: ``mean_at_32`` for Mean@32 (MLflow metric names cannot contain '@')."""
    return f"{metric}_at_{k}"


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... below k, then k."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return [*out, k]


@dataclass(frozen=True)
class ProblemResult:
    id: str
    answer: str
    k: int
    correct: int
    mean_acc: float
    pass_at: dict[int, float]
    maj_pred: str
    maj_correct: bool
    format_rate: float
    response_length: float
    truncated: float
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One row of the per-problem table artifact."""
        r: dict[str, Any] = {"id": self.id, "answer": self.answer, "k": self.k, "correct": self.correct,
                             at("mean", self.k): self.mean_acc}  # fmt: skip
        r.update({at("pass", j): v for j, v in self.pass_at.items()})
        r.update(maj_pred=self.maj_pred, maj_correct=self.maj_correct, format=self.format_rate,
                 response_length=self.response_length, truncated=self.truncated)  # fmt: skip
        for key in (CONTAMINATION_FIELD, "source", "contest", "level", "subject"):
            if key in self.meta:
                r[key] = self.meta[key]
        return r


@dataclass
class BenchmarkResult:
    name: str
    k: int
    metrics: dict[str, float]
    problems: list[ProblemResult]
    samples: list[dict[str, Any]]  # one per sample: problem_id, sample, response, tokens, finished, pred, acc
    source: str = ""
    rule: str = ""


def summarize(name: str, problems: Sequence[data_mod.Problem], samples: Sequence[dict[str, Any]], k: int,
              *, source: str = "", rule: str = "") -> BenchmarkResult:  # fmt: skip
    """Per-problem results and the benchmark's metrics from scored samples (every problem must have k)."""
    by_id: dict[str, list[dict[str, Any]]] = {p.id: [] for p in problems}
    for s in samples:
        by_id[s["problem_id"]].append(s)
    results: list[ProblemResult] = []
    ks = pass_ks(k)
    for p in problems:
        rows = sorted(by_id[p.id], key=lambda s: s["sample"])
        if len(rows) != k:
            raise RuntimeError(f"{name}/{p.id}: {len(rows)} samples, expected k={k}")
        accs = [bool(s["acc"]) for s in rows]
        c = sum(accs)
        pred, maj_ok = majority_vote([s["pred"] for s in rows], accs)
        results.append(ProblemResult(
            id=p.id, answer=p.answer, k=k, correct=c, mean_acc=c / k, pass_at={j: pass_at_k(k, c, j) for j in ks},
            maj_pred=pred, maj_correct=maj_ok,
            format_rate=sum(s["pred"] != rewards_mod.INVALID for s in rows) / k,
            response_length=sum(s["tokens"] for s in rows) / k,
            truncated=sum(not s["finished"] for s in rows) / k, meta=dict(p.meta),
        ))  # fmt: skip
    n = max(1, len(results))
    m: dict[str, float] = {"n_problems": float(len(results)), at("mean", k): sum(r.mean_acc for r in results) / n}
    if k > 1:  # sampling standard error of Mean@k with the problems held fixed
        var = sum(r.correct * (k - r.correct) / (k * (k - 1)) for r in results)
        m[at("mean", k) + "_se"] = math.sqrt(var / k) / n
    for j in ks:
        m[at("pass", j)] = sum(r.pass_at[j] for r in results) / n
    m[at("maj", k)] = sum(r.maj_correct for r in results) / n
    accs_by_problem = [[float(s["acc"]) for s in sorted(by_id[p.id], key=lambda s: s["sample"])] for p in problems]
    m[at("best", k)] = sum(best_at_k_bootstrap(a, k) for a in accs_by_problem) / n if results else 0.0
    m["format"] = sum(r.format_rate for r in results) / n
    m["response_length"] = sum(r.response_length for r in results) / n
    m["truncated"] = sum(r.truncated for r in results) / n
    return BenchmarkResult(name, k, m, results, list(samples), source, rule)


@dataclass
class EvalResult:
    results: dict[str, BenchmarkResult]  # by name, "<name>_clean" subsets included
    settings: dict[str, Any]
    model: str
    seconds: float
    n_samples: int
    n_tokens: int

    @property
    def samples_per_s(self) -> float:
        return self.n_samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else 0.0

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix}{benchmark}/{metric}`` dict (MLflow metric names)."""
        out = {f"{prefix}{name}/{k}": v for name, r in self.results.items() for k, v in r.metrics.items()}
        out[f"{prefix}perf/samples_per_s"] = self.samples_per_s
        out[f"{prefix}perf/tokens_per_s"] = self.tokens_per_s
        out[f"{prefix}perf/seconds"] = self.seconds
        return out

    def table(self) -> str:
        """The results as a fixed-width text table (one row per benchmark and subset)."""
        k = self.settings["k"]
        ks = [j for j in pass_ks(k) if j in (1, k)] if k > 1 else [1]
        head = ["benchmark", "problems", f"Mean@{k}", *(f"Pass@{j}" for j in ks if j != 1), f"Maj@{k}",
                "format", "tokens", "truncated"]  # fmt: skip
        rows = []
        for name, r in self.results.items():
            m = r.metrics
            se = m.get(at("mean", k) + "_se")
            mean = f"{100 * m[at('mean', k)]:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
            rows.append([name, str(int(m["n_problems"])), mean, *(f"{100 * m[at('pass', j)]:.1f}" for j in ks if j != 1),
                         f"{100 * m[at('maj', k)]:.1f}", f"{100 * m['format']:.0f}%", f"{m['response_length']:.0f}",
                         f"{100 * m['truncated']:.0f}%"])  # fmt: skip
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
        out.append(f"{self.n_samples} samples, {self.n_tokens} tokens in {self.seconds:.1f} s: "
                   f"{self.samples_per_s:.2f} samples/s, {self.tokens_per_s:.1f} tokens/s (accuracies in %)")  # fmt: skip
        return "\n".join(out)

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "metrics": self.metrics(),
                "sources": {n: r.source for n, r in self.results.items()}}  # fmt: skip


# -- running -----------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, problem: data_mod.Problem, template: str, max_prompt_tokens: int) -> list[int]:
    """The paper's prompt (spec §8): one user turn through the chat template, left-truncated."""
    text = data_mod.render_prompt(tokenizer, data_mod.build_messages(problem, template))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]


def _calls(n_problems: int, k: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Generate calls: lists of (problem index, samples) units. k <= batch_size: batch_size // k whole problems per
    call; k > batch_size: a problem's k samples split into draws of at most batch_size (one prefill each)."""
    draw = min(k, batch_size)
    units = [(i, n) for i in range(n_problems) for n in [draw] * (k // draw) + ([k % draw] if k % draw else [])]
    calls: list[list[tuple[int, int]]] = []
    for u in units:
        last = calls[-1] if calls else None
        if last and last[0][1] == u[1] and (len(last) + 1) * u[1] <= batch_size:
            last.append(u)
        else:
            calls.append([u])
    return calls


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    benchmarks: Sequence[LoadedBenchmark],
    settings: EvalConfig,
    *,
    max_new_tokens: int,
    autocast: torch.dtype | None = None,
    generator: Generator | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
    progress: bool = True,
    model_label: str = "",
) -> EvalResult:
    """Sample ``settings.k`` responses per problem of each benchmark, score them and compute the metrics. With
    ``world > 1`` each rank generates every ``world``-th call and ``gather`` (e.g. accelerate's gather_object)
    collects the samples. ``generator``: the engine to sample with (the trainer passes its own); by default the
    prefix engine on ``model`` with ``settings.batch_size`` (``rollout.make_generator``). Each call's seed travels
    in its ``SamplingParams``: the torch RNG is never touched."""
    from tqdm.auto import tqdm

    k = settings.k
    params = SamplingParams(k, settings.temperature, settings.top_p, settings.top_k, max_new_tokens)
    gen = generator if generator is not None else make_generator(
        GeneratorKind.PREFIX, model, tokenizer, batch_size=settings.batch_size, autocast=autocast
    )
    eos = tokenizer.eos_token_id
    plans = [(lb, _calls(len(lb.problems), k, settings.batch_size)) for lb in benchmarks]
    total = sum(n for _, calls in plans for i, c in enumerate(calls) if i % world == rank for _, n in c)
    rule_of = {lb.benchmark.name: rewards_mod.AnswerRule(settings.rule or lb.benchmark.rule) for lb in benchmarks}
    scorer = rewards_mod.MathVerifyScorer() if rewards_mod.AnswerRule.MATH_VERIFY in rule_of.values() else None
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress, dynamic_ncols=True)
    t0, n_tokens, results = time.perf_counter(), 0, {}
    try:
        for lb, calls in plans:
            name, rule = lb.benchmark.name, rule_of[lb.benchmark.name]
            ids = [prompt_ids(tokenizer, p, settings.template, settings.max_prompt_tokens) for p in lb.problems]
            bench_seed = zlib.crc32(name.encode())
            drawn = [0] * len(lb.problems)  # samples drawn so far per problem (sample indices)
            local: list[dict[str, Any]] = []
            for c, call in enumerate(calls):
                n = call[0][1]
                if c % world != rank:
                    for i, _ in call:
                        drawn[i] += n
                    continue
                bar.set_postfix_str(f"{name} {lb.problems[call[0][0]].id}", refresh=False)
                seed = mix_seed(settings.seed, bench_seed, c)
                outs = gen.generate([ids[i] for i, _ in call], replace(params, n=n, seed=seed))
                texts, gts, recs = [], [], []
                for (i, _), rows in zip(call, outs, strict=True):
                    for row in rows:
                        recs.append({"problem_id": lb.problems[i].id, "sample": drawn[i], "tokens": len(row),
                                     "finished": bool(row) and row[-1] == eos})  # fmt: skip
                        texts.append(tokenizer.decode(row, skip_special_tokens=True))
                        gts.append(lb.problems[i].answer)
                        drawn[i] += 1
                        n_tokens += len(row)
                for rec, text, sc in zip(recs, texts, rewards_mod.score_responses(rule, texts, gts, scorer=scorer), strict=True):
                    rec.update(response=text, pred=sc.pred, acc=bool(sc.acc))
                local += recs
                bar.update(len(recs))
                bar.set_postfix_str(f"{name} {n_tokens / max(1e-9, time.perf_counter() - t0):.0f} tok/s", refresh=False)
            samples = [s for part in gather([local]) for s in part] if gather and world > 1 else local
            res = summarize(name, lb.problems, samples, k, source=lb.source, rule=rule.value)
            results[name] = res
            if lb.benchmark.report_clean and lb.problems and all(CONTAMINATION_FIELD in p.meta for p in lb.problems):
                clean = [p for p in lb.problems if float(p.meta[CONTAMINATION_FIELD]) < CLEAN_BELOW]
                ids_clean = {p.id for p in clean}
                sub = [s for s in samples if s["problem_id"] in ids_clean]
                results[name + CLEAN_SUFFIX] = summarize(name + CLEAN_SUFFIX, clean, sub, k, source=lb.source,
                                                         rule=rule.value)  # fmt: skip
    finally:
        bar.close()
        if scorer is not None:
            scorer.close()
    seconds = time.perf_counter() - t0
    if gather and world > 1:
        n_tokens = sum(gather([n_tokens]))
    n_samples = sum(len(r.samples) for n, r in results.items() if not n.endswith(CLEAN_SUFFIX))
    s = settings.model_dump(mode="json")
    s["max_new_tokens"] = max_new_tokens
    s["rules"] = {n: r.value for n, r in rule_of.items()}
    return EvalResult(results, s, model_label, seconds, n_samples, n_tokens)


# -- MLflow ------------------------------------------------------------------------------------------------------------


def is_headline(metric: str) -> bool:
    """Metrics that get a "Best" (declared ``best_last`` in rpg_core.metrics: the accuracies mean/pass/maj/best at
    k; not standard errors or lengths)."""
    return metrics_mod.best_last(metric)


def update_best(best: dict[str, list[float]], metrics: dict[str, float], step: int) -> dict[str, float]:
    """Track the paper's "Best" (spec §8: the maximum over all evaluations so far, step 0 included; the first step
    reaching it on ties) in ``best`` (metric -> [value, step], updated in place) for the headline metrics of
    ``metrics``; returns ``best/<metric>`` values to log. "Last" is the metric itself at the final step."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not is_headline(name):
            continue
        cur = best.get(name)
        if cur is None or value > cur[0]:
            best[name] = cur = [float(value), float(step)]
        out["best/" + name.removeprefix("eval/")] = cur[0]
    return out


def best_last(best: dict[str, list[float]], last: dict[str, float], step: int) -> dict[str, dict[str, float]]:
    """The Best/Last table (``eval/best_last.json``): per metric its last value and step, best value and step."""
    return {
        name.removeprefix("eval/"): {"last": last[name], "last_step": step, "best": b, "best_step": int(s)}
        for name, (b, s) in best.items()
        if name in last
    }


def log_eval(tracker: Any, result: EvalResult, *, step: int, prefix: str = "eval/", log_samples: int = 4,
             metrics: bool = True) -> None:  # fmt: skip
    """Metrics ``{prefix}{benchmark}/{metric}`` at ``step`` (unless ``metrics=False``); per benchmark a per-problem table
    (``{prefix}step_NNNNNN/{benchmark}_problems.json``) and the first ``log_samples`` responses of every problem
    (``..._samples.json``); the settings and metrics as ``{prefix}step_NNNNNN/summary.json``."""
    if metrics:
        tracker.log_metrics(result.metrics(prefix), step=step)
    folder = f"{prefix}step_{step:06d}/"
    for name, r in result.results.items():
        tracker.log_table([p.row() for p in r.problems], f"{folder}{name}_problems.json")
        if log_samples and not name.endswith(CLEAN_SUFFIX):
            kept = [s for s in r.samples if s["sample"] < log_samples]
            kept.sort(key=lambda s: (s["problem_id"], s["sample"]))
            tracker.log_table(kept, f"{folder}{name}_samples.json")
    tracker.log_dict(result.summary(), f"{folder}summary.json")


# -- what to evaluate: a model name, a checkpoint, a run folder or an MLflow run id ---------------------------------------

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class EvalTarget:
    label: str  # what the user passed
    base: str  # the model name load_model / load_tokenizer understand
    checkpoint: Path | None = None  # a trainer checkpoint whose model.pt replaces the base weights
    run_id: str | None = None  # the MLflow training run the checkpoint belongs to
    step: int | None = None
    run_config: RunConfig | None = None

    def describe(self) -> str:
        if self.checkpoint is None:
            return self.base
        return f"{self.base} @ step {self.step} ({self.checkpoint})"


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint that passes ``checkpoints.verify`` (the one a resume would use)."""
    return checkpoints.latest_good(run_dir)[0]


def _checkpoint_target(label: str, ckpt: Path) -> EvalTarget:
    state = checkpoints.read_state(ckpt)
    cfg = checkpoints.read_config(ckpt)
    return EvalTarget(label, cfg.model.name, ckpt, state.get("run_id"), int(state["step"]), cfg)


def resolve_target(spec: str, *, tracking_uri: str | None = None) -> EvalTarget:
    """``spec``: a trainer checkpoint folder (``.../checkpoints/step_NNNNNN``), a run folder (its latest
    checkpoint), an MLflow run id (its ``run_dir`` tag, then the latest checkpoint), a model folder, a Hub id,
    ``smollm2-135m`` or ``tiny``. Checkpoints carry their MLflow run id, so the evaluation logs into that run."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if checkpoints.is_checkpoint(path):
            return _checkpoint_target(spec, path)
        if (path / checkpoints.FOLDER).is_dir():
            ckpt = _latest_checkpoint(path)
            if ckpt is None:
                raise ValueError(f"--model {spec!r}: a run folder without a complete checkpoint")
            return _checkpoint_target(spec, ckpt)
        return EvalTarget(spec, str(path))
    if _RUN_ID.match(spec):
        from rpg_core.runs import get_run
        from rpg_core.tracking import RunKind, default_tracking_uri

        uri = tracking_uri or default_tracking_uri()
        run = get_run(spec, tracking_uri=uri)
        if run is None:
            raise ValueError(f"--model {spec!r} looks like an MLflow run id but {uri} has no such run")
        if run["kind"] != RunKind.TRAIN or run.isna()["run_dir"]:
            raise ValueError(f"--model {spec!r}: MLflow run is a {run['kind']} run, not a training run (no run_dir)")
        run_dir = run["run_dir"]
        ckpt = _latest_checkpoint(Path(run_dir))
        if ckpt is None:
            raise ValueError(f"--model {spec!r}: no complete checkpoint under {run_dir}/checkpoints")
        target = _checkpoint_target(spec, ckpt)
        return EvalTarget(spec, target.base, ckpt, spec, target.step, target.run_config)
    return EvalTarget(spec, spec)


def load_target(target: EvalTarget, *, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """The model in eval mode: the base model, with the checkpoint's weights when there is one."""
    from rpg_core.models import load_model

    model = load_model(target.base, dtype=torch.float32, device="cpu", seed=seed)
    if target.checkpoint is not None:
        model.load_state_dict(checkpoints.load_tensors(target.checkpoint, checkpoints.MODEL))
    model.config.use_cache = True
    return model.to(device).eval()


def max_new_tokens_for(target: EvalTarget, settings: EvalConfig) -> int:
    """The response budget: the setting, else the training run's own (the paper evaluates at
    max_response_length), else the paper's 2048."""
    if settings.max_new_tokens is not None:
        return settings.max_new_tokens
    if target.run_config is not None:
        return target.run_config.rollout.max_new_tokens
    return PAPER_MAX_NEW_TOKENS


def problem_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    return [p.row() for p in result.problems]


def as_dict(result: EvalResult) -> dict[str, Any]:
    """Everything, JSON-ready (``rpg eval --output``)."""
    return {**result.summary(), "problems": {n: problem_rows(r) for n, r in result.results.items()},
            "seconds": result.seconds, "n_samples": result.n_samples, "n_tokens": result.n_tokens,
            "samples": {n: r.samples for n, r in result.results.items() if not n.endswith(CLEAN_SUFFIX)}}  # fmt: skip



# -- one evaluation, end to end (``rpg eval``, the flows) ------------------------------------------------------------

EVAL_EXPERIMENT = "rpg-eval"  # where evaluations of models that are not training checkpoints are recorded


@dataclass
class EvalRun:
    result: EvalResult
    target: EvalTarget
    run_id: str | None  # the MLflow run the results went to
    into_training_run: bool  # True when logged into the checkpoint's own training run


def run_eval(
    spec: str,
    settings: EvalConfig,
    *,
    precision: str = "fp32",
    device: str = "auto",
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str = EVAL_EXPERIMENT,
    new_run: bool = False,
    progress: bool = True,
    engine: RolloutConfig | None = None,
) -> EvalRun:
    """Resolve ``spec`` (see resolve_target), load the benchmarks (before the model, so bad data fails first),
    evaluate, and record it in MLflow: into the training run's own run at the checkpoint's step when ``spec`` is
    a checkpoint of a finished run (unless ``new_run``), else into a new run of ``experiment``. ``engine``: the
    sampling engine's settings (``generator``; for vllm its KV cache), default the prefix engine; what the engine
    cannot run here (vLLM not installed: ``rollout.VLLMMissing``) is refused first, before anything loads."""
    from rpg_core.config import Precision
    from rpg_core.models import load_tokenizer

    engine = engine if engine is not None else RolloutConfig()
    preflight(engine)
    settings.check("evaluation")
    if engine.generator is GeneratorKind.VLLM and settings.temperature == 0 and settings.k > 1:
        raise ValueError(f"engine vllm with temperature 0 takes k=1 (got k={settings.k}): vLLM refuses several "
                         "greedy samples of a prompt (they would all be the same)")  # fmt: skip
    if not settings.benchmarks:
        raise ValueError(f"benchmarks: none given; allowed: {_known()} or a .jsonl/.parquet file")
    prec = Precision(precision)
    target = resolve_target(spec, tracking_uri=tracking_uri)
    loaded = [load_benchmark(b, data_dir=settings.data_dir, limit=settings.limit) for b in settings.benchmarks]
    max_new = max_new_tokens_for(target, settings)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    tok = load_tokenizer(target.base)
    model = load_target(target, device=dev, seed=settings.seed)
    autocast = torch.bfloat16 if prec is Precision.BF16 else None
    gen = make_generator(engine.generator, model, tok, batch_size=settings.batch_size, autocast=autocast,
                         rollout=engine, max_len=settings.max_prompt_tokens + max_new)  # fmt: skip
    result = evaluate(model, tok, loaded, settings, max_new_tokens=max_new, autocast=autocast, generator=gen,
                      progress=progress, model_label=target.describe())  # fmt: skip
    result.settings.update(precision=prec.value, device=dev, engine=engine.generator.value)
    if engine.generator is GeneratorKind.VLLM:
        result.settings["vllm_kv_cache_gib"] = engine.vllm_kv_cache_gib
    if not tracking:
        return EvalRun(result, target, None, False)
    try:
        return _record(result, target, settings, tracking_uri, experiment, new_run)
    except Exception:  # never lose a finished evaluation to a tracking failure
        import json

        keep = Path(".rpg") / "evals" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(json.dumps(as_dict(result), indent=1, default=str))
        print(f"rpg eval: recording in MLflow failed; the results are saved in {keep}", flush=True)
        raise


def _record(result: EvalResult, target: EvalTarget, settings: EvalConfig, tracking_uri: str | None,
            experiment: str, new_run: bool) -> EvalRun:  # fmt: skip
    from rpg_core.runs import get_run
    from rpg_core.tracking import RunKind, Tracker, default_tracking_uri, flatten_params

    uri = tracking_uri or default_tracking_uri()
    step = target.step or 0
    if target.run_id and not new_run:
        run = get_run(target.run_id, tracking_uri=uri)
        if run is None:  # the checkpoint's run lives in another store
            status, stage = "not in this store", uri
        else:
            status, stage = run["status"], run["lifecycle"]
        if run is not None and stage == "active" and status in ("FINISHED", "FAILED", "KILLED"):
            tracker = Tracker(experiment=run["experiment"], run_id=target.run_id, tracking_uri=uri)
            try:
                log_eval(tracker, result, step=step, log_samples=settings.log_samples)
            finally:
                tracker.finish(status=status)  # leave the training run as it was
            return EvalRun(result, target, target.run_id, True)
        print(f"rpg eval: training run {target.run_id} is {status} ({stage}); "
              "recording this evaluation in a new run", flush=True)  # fmt: skip
    params = flatten_params({"model": target.base, "checkpoint": str(target.checkpoint or ""),
                             "evaluation": result.settings})  # fmt: skip
    tags = {"rpg.model": target.label, "benchmarks": ",".join(settings.benchmarks)}
    if target.run_id:
        tags["rpg.eval_of"] = target.run_id
    name = f"eval-{Path(target.base).name if target.checkpoint is None else target.run_id or target.base}"
    tracker = Tracker(experiment=experiment, run_name=name, params=params, tags=tags, tracking_uri=uri,
                      kind=RunKind.EVAL)
    try:
        log_eval(tracker, result, step=step, log_samples=settings.log_samples)
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    tracker.finish()
    return EvalRun(result, target, tracker.run_id, False)
