"""rpg_core.objectives: every KL design choice as a gradient-exact policy loss (pure tensor code, no model).

Public API: ``ObjectiveConfig`` (+ enums), ``policy_loss`` -> ``LossOutput``, the KL estimators ``k1/k2/k3``,
``compute_advantages`` (+ ``AdvantageEstimator``), ``aggregate`` (+ ``Normaliser`` for a loss computed in pieces),
``shape_rewards`` (overlong, KL in the reward), and the paper's 12 methods in ``PRESETS``.
See docs/objectives.md for the paper-name -> config table.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The config side (enums, ObjectiveConfig, the presets) needs no torch: a config is validated, and a bad value
# refused, before torch is imported (issue #17). The tensor code is imported on first use (PEP 562).
from .config import (
    AdvantageEstimator,
    Aggregation,
    Clip,
    CorrectionConfig,
    CorrectionConfigError,
    CorrectionLevel,
    Direction,
    Estimator,
    Form,
    ObjectiveConfig,
    ObjectiveConfigError,
    ReferenceMode,
    RolloutCorrection,
)
from .presets import PRESETS, MethodPreset, get_preset

_LAZY = {  # name -> the submodule (imports torch) that defines it
    **dict.fromkeys(("ADVANTAGE_REGISTRY", "compute_advantages", "masked_whiten"), "advantages"),
    **dict.fromkeys(("Normaliser", "aggregate", "normaliser_count", "share_of_loss"), "aggregation"),
    "clip_ratio": "clipping",
    **dict.fromkeys(("CorrectionWeights", "MismatchMetrics", "correction_weights", "mismatch_metrics"), "correction"),
    **dict.fromkeys(("k1", "k2", "k3", "kl_estimator", "rpg_divergence"), "estimators"),
    **dict.fromkeys(("LOSS_REGISTRY", "LossInputError", "LossOutput", "policy_loss", "register_loss",
                     "reward_kl_penalty"), "losses"),  # fmt: skip
    **dict.fromkeys(("Overlong", "ShapedRewards", "kl_in_reward", "shape_rewards"), "shaping"),
}

if TYPE_CHECKING:
    from .advantages import ADVANTAGE_REGISTRY, compute_advantages, masked_whiten
    from .aggregation import Normaliser, aggregate, normaliser_count, share_of_loss
    from .clipping import clip_ratio
    from .correction import CorrectionWeights, MismatchMetrics, correction_weights, mismatch_metrics
    from .estimators import k1, k2, k3, kl_estimator, rpg_divergence
    from .losses import LOSS_REGISTRY, LossInputError, LossOutput, policy_loss, register_loss, reward_kl_penalty
    from .shaping import Overlong, ShapedRewards, kl_in_reward, shape_rewards


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADVANTAGE_REGISTRY",
    "LOSS_REGISTRY",
    "PRESETS",
    "AdvantageEstimator",
    "Aggregation",
    "Clip",
    "CorrectionConfig",
    "CorrectionConfigError",
    "CorrectionLevel",
    "CorrectionWeights",
    "Direction",
    "Estimator",
    "Form",
    "LossInputError",
    "LossOutput",
    "MethodPreset",
    "MismatchMetrics",
    "Normaliser",
    "Overlong",
    "ObjectiveConfig",
    "ObjectiveConfigError",
    "ReferenceMode",
    "RolloutCorrection",
    "ShapedRewards",
    "aggregate",
    "clip_ratio",
    "compute_advantages",
    "correction_weights",
    "get_preset",
    "k1",
    "k2",
    "k3",
    "kl_in_reward",
    "kl_estimator",
    "masked_whiten",
    "mismatch_metrics",
    "normaliser_count",
    "policy_loss",
    "register_loss",
    "reward_kl_penalty",
    "rpg_divergence",
    "shape_rewards",
    "share_of_loss",
]
