"""ObjectiveConfig: every KL design axis as an explicit enum in one frozen, typed config.

Ground truth: ``rpg-spec.md`` §2-§6 (formulas) and §10.1 (the axes). The config only describes a loss; it never
touches a model. ``policy_loss`` (losses.py) is the one door that turns it into numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AdvantageEstimator",
    "Aggregation",
    "Clip",
    "CorrectionConfig",
    "CorrectionConfigError",
    "CorrectionLevel",
    "Direction",
    "Estimator",
    "Form",
    "ObjectiveConfig",
    "ObjectiveConfigError",
    "ReferenceMode",
    "RolloutCorrection",
]


class AdvantageEstimator(StrEnum):
    """How a response's reward becomes its advantage (the functions: advantages.py's ``ADVANTAGE_REGISTRY``)."""

    RPG = "rpg"  # R - group mean (own reward included), no std (spec §4.5; the code's `rpg`)
    BATCH_MEAN = "batch_mean"  # R - batch mean (Algorithm 1/2 text; the code's unused `rpg_batchmean`)
    GRPO = "grpo"  # (R - group mean) / (unbiased group std + 1e-6) (spec §6.1)
    RLOO = "rloo"  # R - mean of the other responses to the same prompt
    REINFORCE_PP = "reinforce_pp"  # return-to-go whitened over all valid tokens of the batch (spec §6.3)
    REINFORCE_PP_BASELINE = "reinforce_pp_baseline"  # (R - group mean) broadcast, then batch token whitening


class Form(StrEnum):
    """How the KL regulariser enters the loss."""

    DIFFERENTIABLE = "differentiable"  # Tables 1 and 4: fully differentiable surrogates (Algorithm 1 when clipped)
    REINFORCE = "reinforce"  # Table 2 / App. F: SG(weight) * log-prob (Algorithm 2 when clipped)
    PENALTY = "penalty"  # GRPO/verl family: PPO policy term + beta * KL estimator per token (spec §3.2, §6.4)
    REWARD = "reward"  # KL estimator subtracted from the reward before the advantage (spec §6.4)

    @property
    def is_rpg(self) -> bool:
        """The RPG forms derive the KL term from (direction, normalized); the estimator is implied."""
        return self in (Form.DIFFERENTIABLE, Form.REINFORCE)


class Direction(StrEnum):
    """Forward = KL(pi_ref || pi_theta) (mass-covering); reverse = KL(pi_theta || pi_ref) (mode-seeking). Spec §1."""

    FORWARD = "forward"
    REVERSE = "reverse"


class Estimator(StrEnum):
    """Schulman's per-sample KL estimators (spec §3.1). Used by the penalty and reward forms."""

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


class Clip(StrEnum):
    """Ratio clipping. ``dual`` is PPO clip plus the dual clip bound ``c`` for negative advantages (RPG-Style Clip)."""

    NONE = "none"
    PPO = "ppo"
    DUAL = "dual"


class Aggregation(StrEnum):
    """How per-token losses become one scalar (verl's ``loss_agg_mode``, spec §2.8)."""

    TOKEN_MEAN = "token-mean"  # DAPO token-level loss: sum over valid tokens / number of valid tokens
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"  # mean over sequences of the per-sequence token sum
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"  # GRPO's (1/G) sum_i (1/|o_i|) sum_t
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"  # Dr. GRPO: total token sum / a constant horizon


class ReferenceMode(StrEnum):
    """Which policy the KL regularises toward (spec §5): the sampler refreshed every step, or the initial model."""

    ITERATIVE = "iterative"
    FIXED = "fixed"


class ObjectiveConfigError(ValueError):
    """A bad objective configuration; the message names the field and the allowed values."""


class ObjectiveConfig(BaseModel):
    """One point of the KL design space. Frozen; string enums accept their values as plain strings.

    The defaults are RPG-REINFORCE-URKL with RPG-Style Clip at the paper's hyperparameters (spec §6, §7.2).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    form: Form = Field(Form.REINFORCE, description="How the KL enters: differentiable | reinforce | penalty | reward")
    direction: Direction = Field(Direction.REVERSE, description="KL direction: forward KL(ref||theta) | reverse")
    normalized: bool = Field(False, description="RPG forms: normalized KL (FKL/RKL) or unnormalized UKL (UFKL/URKL)")
    estimator: Estimator = Field(Estimator.K3, description="penalty/reward forms: per-token KL estimator k1 | k2 | k3")
    kl_is_weight: bool = Field(
        False, description="penalty form: multiply the KL estimator by w = pi_theta/pi_old (the paper's GRPO fix)"
    )
    clip: Clip = Field(Clip.DUAL, description="ratio clipping: none | ppo | dual (RPG-Style Clip)")
    eps_low: float = Field(0.2, description="clip lower epsilon: w is clipped below at 1 - eps_low")
    eps_high: float = Field(0.28, description="clip upper epsilon: w is clipped above at 1 + eps_high")
    clip_c: float = Field(10.0, description="dual-clip bound c > 1 for negative advantages")
    beta: float = Field(1e-4, description="KL coefficient beta >= 0")
    agg: Aggregation = Field(Aggregation.TOKEN_MEAN, description="loss aggregation mode")
    agg_norm_len: int | None = Field(
        None, description="seq-mean-token-sum-norm: constant divisor (e.g. max new tokens); default: the padded T"
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ObjectiveConfigError(_format_validation_error(e)) from None

    # -- validation: every error names the field and what is allowed -----------------------------------------

    @field_validator("beta", "eps_low", "eps_high", "clip_c")
    @classmethod
    def _finite(cls, v: float, info: Any) -> float:
        if not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if not 0 < self.eps_low < 1:
            raise ValueError(f"eps_low must be in (0, 1), got {self.eps_low!r}")
        if not self.eps_high > 0:
            raise ValueError(f"eps_high must be > 0, got {self.eps_high!r}")
        if not self.clip_c > 1:
            raise ValueError(f"clip_c must be > 1 (dual-clip bound, spec §4.1), got {self.clip_c!r}")
        if self.agg_norm_len is not None and self.agg_norm_len <= 0:
            raise ValueError(f"agg_norm_len must be a positive integer or null, got {self.agg_norm_len!r}")
        if self.form is Form.PENALTY and self.kl_is_weight and self.direction is Direction.FORWARD and self.beta > 0:
            raise ValueError(
                "kl_is_weight=True requires direction='reverse' for form='penalty': the weight w = pi_theta/pi_old "
                "re-weights samples from pi_old to pi_theta, the distribution only the reverse KL is an expectation "
                "under (spec §3.2); allowed: direction='reverse' with kl_is_weight=True, or kl_is_weight=False"
            )
        return self

    @classmethod
    def parse(cls, data: dict[str, Any] | ObjectiveConfig) -> ObjectiveConfig:
        """Validate a plain mapping (YAML, CLI, Prefect form) into a config, raising ObjectiveConfigError."""
        if isinstance(data, ObjectiveConfig):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ObjectiveConfigError(_format_validation_error(e)) from None

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> ObjectiveConfig:
        """A copy with ``update`` applied, validated like any other config (pydantic's own copy skips that)."""
        return type(self).parse({**self.model_dump(), **(update or {})})

    # -- identity ---------------------------------------------------------------------------------------------

    def canonical(self) -> ObjectiveConfig:
        """The same loss with every field that has no effect reset to its default.

        Two configs with equal canonical forms compute the same loss values and gradients, so they share a key.
        """
        d = self.model_dump()
        defaults = {name: f.default for name, f in type(self).model_fields.items()}

        def reset(*names: str) -> None:
            for n in names:
                d[n] = defaults[n]

        form = self.form
        if self.beta == 0:
            # Without a KL term, differentiable/penalty/reward all reduce to the clipped policy term -w*A
            # (same value, same gradient); reinforce keeps its own loss values (SG(w*A)*(-logp)).
            reset("direction", "normalized", "estimator", "kl_is_weight")
            if form is not Form.REINFORCE:
                d["form"] = form = Form.PENALTY
        if form.is_rpg:
            reset("estimator", "kl_is_weight")  # implied by (direction, normalized); w is inherent
        else:
            reset("normalized")  # the estimator is explicit
            if form is Form.REWARD:
                reset("kl_is_weight")  # computed at rollout time, where pi_theta = pi_old, so w = 1
            if d["estimator"] == Estimator.K2 and not d["kl_is_weight"]:
                reset("direction")  # k2 = (log r)^2 / 2 is symmetric in r <-> 1/r
        if (
            form is Form.PENALTY
            and self.clip is Clip.NONE
            and d["kl_is_weight"]
            and d["estimator"] in (Estimator.K1, Estimator.K3)
        ):
            # Unclipped, the corrected penalties ARE Tables 4 and 1: beta*w*k1(rev) = beta*w*log r (RKL) and
            # beta*w*k3(rev) = beta*(w log r - w + s) (URKL), for any reference. Name them after the paper.
            d.update(form=Form.DIFFERENTIABLE, normalized=d["estimator"] == Estimator.K1)
            reset("estimator", "kl_is_weight")
        if self.clip is Clip.NONE:
            reset("eps_low", "eps_high", "clip_c")
        elif self.clip is Clip.PPO:
            reset("clip_c")
        if self.agg is not Aggregation.SEQ_MEAN_TOKEN_SUM_NORM:
            reset("agg_norm_len")
        return type(self).model_validate(d)

    def key(self) -> str:
        """Stable content hash (12 hex chars) of the canonical config; equal for configs computing the same loss."""
        payload = {"schema": "rpg.objective/v1", **self.canonical().model_dump(mode="json")}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def divergence_name(self) -> str:
        """The paper's name of the regulariser (FKL/RKL/UFKL/URKL for RPG forms, e.g. 'k3-reverse*w' otherwise)."""
        if self.beta == 0:
            return "none"
        if self.form.is_rpg:
            return ("" if self.normalized else "U") + ("FKL" if self.direction is Direction.FORWARD else "RKL")
        weight = "*w" if self.kl_is_weight and self.form is Form.PENALTY else ""
        return f"{self.estimator.value}-{self.direction.value}{weight}"

    def summary(self) -> str:
        c = self.canonical()
        clip = c.clip.value if c.clip is Clip.NONE else f"{c.clip.value}({c.eps_low},{c.eps_high}" + (
            f",c={c.clip_c})" if c.clip is Clip.DUAL else ")"
        )
        return f"{c.form.value}/{c.divergence_name}/beta={c.beta:g}/clip={clip}/{c.agg.value}"


def _format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "objective"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(ObjectiveConfig.model_fields)
            msg = f"unknown field; allowed fields: {allowed}"
        lines.append(f"{loc}: {msg} (got {err.get('input')!r})" if loc != "objective" else msg)
    return "invalid objective config: " + "; ".join(lines)


# -- the sampler-trainer mismatch correction (issue #18; the tensor code: correction.py) -------------------------


class RolloutCorrection(StrEnum):
    """How the trainer corrects for rollouts sampled by an engine (vLLM) whose log-probs differ from its own."""

    NONE = "none"  # no correction: every valid token has weight 1
    TIS = "tis"  # truncated IS, w = min(pi_old/pi_sampler, cap) (Yao et al. 2025; verl rollout_is_mode=truncate)
    MIS = "mis"  # masked IS, w = ratio inside [lower, upper], 0 outside (Liu et al. 2025; verl rollout_is_mode=mask)


class CorrectionLevel(StrEnum):
    """Where the ratio pi_old/pi_sampler is taken: per token, or once per response (broadcast to its tokens)."""

    TOKEN = "token"
    SEQUENCE = "sequence"  # TIS: the product of the token ratios; MIS: their geometric mean (verl `geometric`)


class CorrectionConfigError(ValueError):
    """A bad rollout-correction configuration; the message names the field and the allowed range."""


class CorrectionConfig(BaseModel):
    """The sampler-trainer mismatch correction. Frozen; the enums accept their values as plain strings.

    The defaults are the peers': cap C = 2 (Yao et al. 2025), band [0.5, 2] (verl: lower = 1/upper).
    """

    # inf and nan reach _check, whose messages give the allowed range
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=True)

    mode: RolloutCorrection = Field(RolloutCorrection.NONE, description="mismatch correction: none | tis | mis")
    level: CorrectionLevel = Field(CorrectionLevel.TOKEN, description="ratio per token or per sequence")
    cap: float = Field(2.0, description="tis: the truncation cap C > 1, w = min(ratio, C)")
    lower: float = Field(0.5, description="mis: tokens/sequences with ratio < lower (0 < lower < 1) are masked out")
    upper: float = Field(2.0, description="mis: tokens/sequences with ratio > upper (upper > 1) are masked out")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise CorrectionConfigError(_format_correction_error(e)) from None

    @model_validator(mode="after")
    def _check(self) -> CorrectionConfig:
        if not (math.isfinite(self.cap) and self.cap > 1):
            raise ValueError(f"cap must be a finite number > 1 (the TIS cap C), got {self.cap!r}")
        if not 0 < self.lower < 1:
            raise ValueError(f"lower must be in (0, 1) (the MIS band is [lower, upper] around 1), got {self.lower!r}")
        if not (math.isfinite(self.upper) and self.upper > 1):
            raise ValueError(f"upper must be a finite number > 1 (the MIS band is [lower, upper] around 1), "
                             f"got {self.upper!r}")  # fmt: skip
        return self

    @classmethod
    def parse(cls, data: dict[str, Any] | CorrectionConfig) -> CorrectionConfig:
        """Validate a plain mapping (YAML, CLI, Prefect form) into a config, raising CorrectionConfigError."""
        if isinstance(data, CorrectionConfig):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise CorrectionConfigError(_format_correction_error(e)) from None

    def canonical(self) -> CorrectionConfig:
        """The same correction with every field that has no effect reset to its default (for keys)."""
        d = self.model_dump()
        defaults = {name: f.default for name, f in type(self).model_fields.items()}
        unused = {
            RolloutCorrection.NONE: ("level", "cap", "lower", "upper"),
            RolloutCorrection.TIS: ("lower", "upper"),
            RolloutCorrection.MIS: ("cap",),
        }[self.mode]
        d.update({n: defaults[n] for n in unused})
        return type(self).model_validate(d)


def _format_correction_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; allowed fields: " + ", ".join(CorrectionConfig.model_fields)
        lines.append(f"{loc}: {msg} (got {err.get('input')!r})" if loc else msg)
    return "invalid rollout correction config: " + "; ".join(lines)
