"""The paper's 12 methods as named presets (spec §6, §7.2, §10.1).

Where paper and released code disagree the preset follows the paper; ``code_differences`` records the code's
value so a run can be reproduced either way.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .config import AdvantageEstimator, Aggregation, Clip, Direction, Estimator, Form, ObjectiveConfig, ReferenceMode

__all__ = ["PRESETS", "MethodPreset", "get_preset"]


class MethodPreset(BaseModel):
    """A method: its objective plus the algorithm-level choices the paper fixes for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    paper_name: str
    objective: ObjectiveConfig
    advantage: AdvantageEstimator
    reference: ReferenceMode
    lr: float
    dynamic_sampling: bool = Field(description="DAPO group filter: keep prompts whose accuracies are not all equal")
    overlong_shaping: bool = Field(description="DAPO overlong reward shaping (buffer 512, factor 1.0 at 2K)")
    code_differences: tuple[str, ...] = ()


# Shared by every RPG / RPG-REINFORCE variant and by DAPO, REINFORCE++ (spec §7.1, §7.2).
_RPG_CLIP = dict(clip=Clip.DUAL, eps_low=0.2, eps_high=0.28, clip_c=10.0, agg=Aggregation.TOKEN_MEAN)
_C_NOTE = "dual-clip c is not given in the paper; the code uses clip_ratio_c=10.0 (used here)"


def _rpg(form: Form, direction: Direction, normalized: bool) -> MethodPreset:
    reinforce = form is Form.REINFORCE
    div = ("" if normalized else "U") + ("FKL" if direction is Direction.FORWARD else "RKL")
    notes = [_C_NOTE]
    if reinforce:
        notes += [
            "lr: paper 1e-6, code 5e-7 for every RPG-REINFORCE script",
            "the released code never calls compute_policy_loss_reinforce: its RPG-REINFORCE runs are PPO dual-clip "
            "with no KL, identical for all four divergences (spec §7.3); this preset runs Algorithm 2 as written",
            "the code branches on the sign of A and evaluates C at the clipped w; Algorithm 2 (used here) branches "
            "on A' and uses the unclipped w, which keeps the gradient exactly -Weight * dlogp (spec §4.6)",
        ]
    else:
        notes += [
            "the code adds beta * kappa_X(w) outside the dual clip (no clip masking of the KL gradient, clamped to "
            "+-10); Algorithm 1 (used here) puts the KL inside the clipped regularised advantage (spec §7.3). "
            "The code's variant is form='penalty' with the estimator of docs/objectives.md",
        ]
    name = ("rpg_reinforce_" if reinforce else "rpg_") + div.lower()
    return MethodPreset(
        name=name,
        paper_name=("RPG-REINFORCE-" if reinforce else "RPG-") + div,
        objective=ObjectiveConfig(form=form, direction=direction, normalized=normalized, beta=1e-4, **_RPG_CLIP),
        advantage=AdvantageEstimator.RPG,
        reference=ReferenceMode.ITERATIVE,
        lr=1e-6,
        dynamic_sampling=True,
        overlong_shaping=True,
        code_differences=tuple(notes),
    )


def _build() -> dict[str, MethodPreset]:
    presets = [
        MethodPreset(
            name="grpo",
            paper_name="GRPO",
            objective=ObjectiveConfig(
                form=Form.PENALTY,
                direction=Direction.REVERSE,
                estimator=Estimator.K3,
                kl_is_weight=False,
                clip=Clip.PPO,
                eps_low=0.2,
                eps_high=0.2,
                beta=1e-4,
                agg=Aggregation.SEQ_MEAN_TOKEN_MEAN,
            ),
            advantage=AdvantageEstimator.GRPO,
            reference=ReferenceMode.FIXED,
            lr=1e-6,
            dynamic_sampling=False,
            overlong_shaping=False,
            code_differences=(
                "beta: paper 1e-4 (all methods), code kl_loss_coef=1e-3",
                "clip: paper §5 (0.2, 0.2) (used here), Appendix H (0.1, 0.1); code 0.2/0.2 plus dual clip c=10",
                "aggregation: paper per-sequence 1/|o_i| (seq-mean-token-mean, used here), code token-mean",
                "the code clamps the k3 value to [-10, 10] (zero gradient outside)",
            ),
        ),
        MethodPreset(
            name="dapo",
            paper_name="DAPO",
            objective=ObjectiveConfig(form=Form.PENALTY, beta=0.0, **_RPG_CLIP),
            advantage=AdvantageEstimator.GRPO,
            reference=ReferenceMode.ITERATIVE,
            lr=1e-6,
            dynamic_sampling=True,
            overlong_shaping=True,
            code_differences=(_C_NOTE, "no KL term, so no reference model is needed (reference mode is moot)"),
        ),
    ]
    for name, paper_name, adv in (
        ("reinforce_pp", "REINFORCE++", AdvantageEstimator.REINFORCE_PP),
        ("reinforce_pp_baseline", "REINFORCE++-Baseline", AdvantageEstimator.REINFORCE_PP_BASELINE),
    ):
        presets.append(
            MethodPreset(
                name=name,
                paper_name=paper_name,
                objective=ObjectiveConfig(
                    form=Form.PENALTY, direction=Direction.REVERSE, estimator=Estimator.K2, beta=1e-4, **_RPG_CLIP
                ),
                advantage=adv,
                reference=ReferenceMode.ITERATIVE,
                lr=1e-6,
                dynamic_sampling=True,
                overlong_shaping=True,
                code_differences=(
                    "KL estimator: paper k2 (used here), code k1 ('kl') as a loss term against pi_old, which pushes "
                    "away from pi_old (spec §6.3); reproduce with estimator=k1",
                    _C_NOTE,
                ),
            )
        )
    for form in (Form.DIFFERENTIABLE, Form.REINFORCE):
        for normalized in (True, False):
            for direction in (Direction.FORWARD, Direction.REVERSE):
                presets.append(_rpg(form, direction, normalized))
    return {p.name: p for p in presets}


PRESETS: dict[str, MethodPreset] = _build()


def get_preset(name: str) -> MethodPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset {name!r} is unknown; allowed: {sorted(PRESETS)}") from None
