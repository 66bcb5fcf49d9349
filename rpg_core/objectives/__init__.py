"""rpg_core.objectives: every KL design choice as a gradient-exact policy loss (pure tensor code, no model).

Public API: ``ObjectiveConfig`` (+ enums), ``policy_loss`` -> ``LossOutput``, the KL estimators ``k1/k2/k3``,
``compute_advantages`` (+ ``AdvantageEstimator``), ``aggregate`` (+ ``Normaliser`` for a loss computed in pieces),
``shape_rewards`` (overlong, KL in the reward), and the paper's 12 methods in ``PRESETS``.
See docs/objectives.md for the paper-name -> config table.
"""

from .advantages import ADVANTAGE_REGISTRY, AdvantageEstimator, compute_advantages, masked_whiten
from .aggregation import Normaliser, aggregate, normaliser_count, share_of_loss
from .clipping import clip_ratio
from .config import (
    Aggregation,
    Clip,
    Direction,
    Estimator,
    Form,
    ObjectiveConfig,
    ObjectiveConfigError,
    ReferenceMode,
)
from .estimators import k1, k2, k3, kl_estimator, rpg_divergence
from .losses import LOSS_REGISTRY, LossInputError, LossOutput, policy_loss, register_loss, reward_kl_penalty
from .presets import PRESETS, MethodPreset, get_preset
from .shaping import Overlong, ShapedRewards, kl_in_reward, shape_rewards

__all__ = [
    "ADVANTAGE_REGISTRY",
    "LOSS_REGISTRY",
    "PRESETS",
    "AdvantageEstimator",
    "Aggregation",
    "Clip",
    "Direction",
    "Estimator",
    "Form",
    "LossInputError",
    "LossOutput",
    "MethodPreset",
    "Normaliser",
    "Overlong",
    "ObjectiveConfig",
    "ObjectiveConfigError",
    "ReferenceMode",
    "ShapedRewards",
    "aggregate",
    "clip_ratio",
    "compute_advantages",
    "get_preset",
    "k1",
    "k2",
    "k3",
    "kl_in_reward",
    "kl_estimator",
    "masked_whiten",
    "normaliser_count",
    "policy_loss",
    "register_loss",
    "reward_kl_penalty",
    "rpg_divergence",
    "shape_rewards",
    "share_of_loss",
]
