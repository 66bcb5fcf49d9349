"""``policy_loss``: the one door into the math. One small function per form, chosen from a registry.

Token-level instantiation (spec §2.8): every sequence-level formula is applied per token with the per-token
ratio w_t = pi_theta(y_t|h_t) / pi_old(y_t|h_t); the outcome advantage is broadcast to all response tokens.

Notation used below (all per token; the f-divergence view is derived in estimators.py):
    w = pi_theta/pi_old   (importance weight; gradients flow through it)
    r = pi_theta/pi_ref   (ratio to the regulariser's reference)
    s = pi_ref/pi_old     (no gradient; exactly 1 in iterative mode, where pi_ref = pi_old)
    A                     the advantage given by the caller (e.g. R - b)
    A' = A - beta f'(r)   the regularised advantage (spec §4.2), always stop-gradiented
    Weight = w * A'       the exact per-sample gradient weight, dJ = E_old[Weight * dlog pi_theta] (spec §2.2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .aggregation import aggregate
from .clipping import ClipResult, clip_ratio
from .config import Clip, Form, ObjectiveConfig, ObjectiveConfigError
from .estimators import k1, k2, k3, kl_estimator, rpg_divergence

__all__ = [
    "LOSS_REGISTRY",
    "LossInputs",
    "LossInputError",
    "LossOutput",
    "FormResult",
    "policy_loss",
    "register_loss",
    "reward_kl_penalty",
]


class LossInputError(ValueError):
    """Bad tensors given to ``policy_loss``; the message names the argument."""


@dataclass(frozen=True)
class LossInputs:
    """Validated per-token inputs in the compute dtype, zeroed where ``mask`` is 0 (so w = 1 there)."""

    logp: Tensor  # [B, T] log pi_theta, carries the gradient
    old_logp: Tensor  # [B, T] log pi_old (detached)
    ref_logp: Tensor  # [B, T] log pi_ref (detached); the same values as old_logp in iterative mode
    advantages: Tensor  # [B, T] (detached)
    mask: Tensor  # [B, T] bool
    iterative: bool  # pi_ref is pi_old: s = 1, r = w

    @property
    def log_w(self) -> Tensor:
        return self.logp - self.old_logp

    @property
    def log_r(self) -> Tensor:
        return self.log_w if self.iterative else self.logp - self.ref_logp


@dataclass(frozen=True)
class FormResult:
    """What a form's loss function returns: the per-token loss and the pieces the metrics report."""

    per_token: Tensor  # [B, T], with the gradient
    clip: ClipResult
    pg: Tensor | None = None  # policy-gradient part of per_token, when the form separates it
    kl: Tensor | None = None  # KL part of per_token (beta included), when the form separates it
    kl_value: Tensor | None = None  # the divergence estimate per token, beta excluded
    reg_adv: Tensor | None = None  # A' for the RPG forms


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar, aggregated by cfg.agg
    per_token: Tensor  # [B, T], unaggregated, zero where mask is 0
    metrics: dict[str, float]


LossFn = Callable[[ObjectiveConfig, LossInputs], FormResult]
LOSS_REGISTRY: dict[Form, LossFn] = {}


def register_loss(form: Form) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if form in LOSS_REGISTRY:
            raise ValueError(f"a loss is already registered for form={form.value!r}")
        LOSS_REGISTRY[form] = fn
        return fn

    return deco


# -- the four forms ------------------------------------------------------------------------------------------


def _rpg_terms(cfg: ObjectiveConfig, x: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(A', beta*f'(r), s*f(r)) for the RPG forms; A' and the value are detached."""
    div = rpg_divergence(cfg.direction, cfg.normalized)
    if cfg.beta == 0:
        zero = torch.zeros_like(x.advantages)
        return x.advantages, zero, zero
    log_r = x.log_r.detach()
    beta_fp = cfg.beta * div.f_prime(log_r)
    value = div.f(log_r) if x.iterative else torch.exp(x.ref_logp - x.old_logp) * div.f(log_r)
    return x.advantages - beta_fp, beta_fp, value


@register_loss(Form.DIFFERENTIABLE)
def differentiable_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """Tables 1 and 4 (unclipped); Algorithm 1 with SG(A') when clipped (spec §2.3, §4.3)."""
    w = torch.exp(x.log_w)
    reg_adv, _, value = _rpg_terms(cfg, x)
    if cfg.clip is Clip.NONE:
        # l = -w A + beta * s * f(r): e.g. URKL  -w A + beta (w log w - w + 1),  UFKL  -w A + beta (w - log w - 1)
        pg = -w * x.advantages
        if cfg.beta == 0:
            return FormResult(pg, clip_ratio(cfg, w, x.advantages >= 0), pg=pg, reg_adv=reg_adv)
        div = rpg_divergence(cfg.direction, cfg.normalized)
        s_f = div.f(x.log_r) if x.iterative else torch.exp(x.ref_logp - x.old_logp) * div.f(x.log_r)
        kl = cfg.beta * s_f
        return FormResult(pg + kl, clip_ratio(cfg, w, reg_adv >= 0), pg=pg, kl=kl, kl_value=value, reg_adv=reg_adv)
    # Algorithm 1: L = max(-w A', -clip(w) A'), and min(., -c A') for A' < 0, with A' stop-gradiented (spec §4.3:
    # differentiating through A' gives the wrong gradient). d/dtheta = -w A' dlog pi = -Weight dlog pi.
    clip = clip_ratio(cfg, w, reg_adv >= 0)
    return FormResult(-clip.ratio * reg_adv, clip, kl_value=value, reg_adv=reg_adv)


@register_loss(Form.REINFORCE)
def reinforce_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """Table 2 / App. F (unclipped); Algorithm 2, RPG-REINFORCE with RPG-Style Clip, when clipped (spec §2.4, §4.4)."""
    w = torch.exp(x.log_w.detach())
    reg_adv, beta_fp, value = _rpg_terms(cfg, x)
    # Branch on the sign of A' = psi / l (Algorithm 2); the released code branches on A (spec §4.6).
    clip = clip_ratio(cfg, w, reg_adv >= 0)
    # C = -beta w f'(r) is Algorithm 2's KL component; Weight = A w + C. Where clipped, w -> bound (A b + C, constant).
    weight = x.advantages * clip.ratio - w * beta_fp
    logp = x.logp if clip.clipped is None else torch.where(clip.clipped, x.logp.detach(), x.logp)
    return FormResult(-weight * logp, clip, kl_value=value, reg_adv=reg_adv)


def _clipped_pg(cfg: ObjectiveConfig, x: LossInputs) -> tuple[Tensor, ClipResult]:
    """The PPO / dual-clip policy term -clip(w) A on the reward advantage (verl ``compute_policy_loss``, spec §7.3)."""
    clip = clip_ratio(cfg, torch.exp(x.log_w), x.advantages >= 0)
    return -clip.ratio * x.advantages, clip


@register_loss(Form.PENALTY)
def penalty_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """GRPO/verl family: clipped policy term + beta * [w *] k(direction) per token, outside the clip (spec §3.2)."""
    pg, clip = _clipped_pg(cfg, x)
    if cfg.beta == 0:
        return FormResult(pg, clip, pg=pg)
    kappa = kl_estimator(cfg.estimator, cfg.direction, x.logp, x.ref_logp)
    value = kappa.detach()
    if cfg.kl_is_weight:  # the corrected off-policy estimator E_old[w k3(ref/theta)] = UKL(theta||ref) (spec §3.2)
        kappa = torch.exp(x.log_w) * kappa
    kl = cfg.beta * kappa
    return FormResult(pg + kl, clip, pg=pg, kl=kl, kl_value=value)


@register_loss(Form.REWARD)
def reward_form_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """KL in the reward: the KL was already subtracted upstream (``reward_kl_penalty``); only the policy term here."""
    pg, clip = _clipped_pg(cfg, x)
    value = kl_estimator(cfg.estimator, cfg.direction, x.logp.detach(), x.ref_logp) if cfg.beta > 0 else None
    return FormResult(pg, clip, pg=pg, kl_value=value)


# -- the public entry points ---------------------------------------------------------------------------------


def policy_loss(
    cfg: ObjectiveConfig,
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
) -> LossOutput:
    """The policy loss of ``cfg`` on per-token log-probs ``[B, T]``.

    logp: log pi_theta of the sampled tokens (with gradient; need not be normalized). old_logp: the sampler's.
    ref_logp: the reference's; ``None`` or ``old_logp`` itself means iterative mode (pi_ref = pi_old, spec §5).
    advantages: ``[B]`` (broadcast to tokens) or ``[B, T]``. mask: 0/1 (bool, int or float), 1 on response tokens.
    Any float dtype; computed in at least float32. Returns the aggregated loss, the per-token loss and metrics.
    """
    x = _prepare(cfg, logp, old_logp, ref_logp, advantages, mask)
    res = LOSS_REGISTRY[cfg.form](cfg, x)
    per_token = torch.where(x.mask, res.per_token, 0.0)
    loss = aggregate(per_token, x.mask, cfg.agg, cfg.agg_norm_len)
    return LossOutput(loss=loss, per_token=per_token, metrics=_metrics(cfg, x, res, loss))


def reward_kl_penalty(cfg: ObjectiveConfig, old_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``beta * k(direction)`` to subtract from the token-level rewards (form='reward', spec §6.4).

    Evaluated at rollout time, where pi_theta = pi_old, so it has no gradient and no importance weight.
    """
    if cfg.form is not Form.REWARD:
        raise ObjectiveConfigError(
            f"reward_kl_penalty needs form='reward', got form={cfg.form.value!r}; the other forms put the KL in the loss"
        )
    x = _prepare(cfg, old_logp, old_logp, ref_logp, torch.zeros_like(old_logp[:, 0]), mask)
    if cfg.beta == 0:
        return torch.zeros_like(x.logp)
    kappa = kl_estimator(cfg.estimator, cfg.direction, x.old_logp, x.ref_logp)
    return torch.where(x.mask, cfg.beta * kappa, 0.0)


# -- validation and metrics ----------------------------------------------------------------------------------


def _prepare(
    cfg: ObjectiveConfig, logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor
) -> LossInputs:
    if not isinstance(cfg, ObjectiveConfig):
        raise TypeError(f"cfg must be an ObjectiveConfig, got {type(cfg).__name__}")
    iterative = ref_logp is None or ref_logp is old_logp
    ref_logp = old_logp if ref_logp is None else ref_logp
    named = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise LossInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise LossInputError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    for name in ("old_logp", "ref_logp", "mask"):
        if named[name].shape != logp.shape:
            raise LossInputError(f"{name} has shape {tuple(named[name].shape)}, expected logp's {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise LossInputError(
            f"advantages has shape {tuple(advantages.shape)}, expected [B]={tuple(logp.shape[:1])} "
            f"or [B, T]={tuple(logp.shape)}"
        )
    for name in ("logp", "old_logp", "ref_logp", "advantages"):
        if not named[name].is_floating_point():
            raise LossInputError(f"{name} must be a floating-point tensor, got dtype {named[name].dtype}")
        if named[name].device != logp.device:
            raise LossInputError(f"{name} is on {named[name].device}, logp on {logp.device}")
    if mask.dtype == torch.bool:
        mask_b, not_binary = mask, torch.zeros((), dtype=torch.bool, device=mask.device)
    else:
        mask_b = mask != 0
        not_binary = (mask_b & (mask != 1)).any()
    mask_b = mask_b.to(logp.device)
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages

    # One host sync for every check: empty mask, non-binary mask, non-finite values at valid positions.
    tensors = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": adv}
    flags = torch.stack(
        [~mask_b.any(), not_binary.to(mask_b.device)] + [(~torch.isfinite(t) & mask_b).any() for t in tensors.values()]
    ).tolist()
    if flags[0]:
        raise LossInputError("mask has no valid token (all zeros): nothing to compute a loss over")
    if flags[1]:
        raise LossInputError(f"mask must be 0/1 (bool, int or float), got values {mask.unique().tolist()[:8]}")
    for (name, t), bad in zip(tensors.items(), flags[2:], strict=True):
        if bad:
            n = int((~torch.isfinite(t) & mask_b).sum())
            first = (~torch.isfinite(t) & mask_b).nonzero()[0].tolist()
            raise LossInputError(f"{name} has {n} NaN/inf value(s) at valid (mask=1) positions, first at {first}")

    dtype = torch.promote_types(logp.dtype, torch.float32)

    def clean(t: Tensor, detach: bool) -> Tensor:
        t = t.detach() if detach else t
        return torch.where(mask_b, t.to(dtype), 0.0)

    old = clean(old_logp, True)
    return LossInputs(
        logp=clean(logp, False),
        old_logp=old,
        ref_logp=old if iterative else clean(ref_logp, True),
        advantages=clean(adv, True),
        mask=mask_b,
        iterative=iterative,
    )


@torch.no_grad()
def _metrics(cfg: ObjectiveConfig, x: LossInputs, res: FormResult, loss: Tensor) -> dict[str, float]:
    m = x.mask.to(x.logp.dtype)
    n = m.sum()

    def mean(t: Tensor) -> Tensor:
        return (t * m).sum() / n

    log_w = x.log_w.detach()
    w = torch.exp(log_w)
    log_ref = x.ref_logp - x.logp.detach()  # log(pi_ref/pi_theta): k_i(log_ref) estimate KL(pi_theta || pi_ref)
    vals: dict[str, Tensor] = {
        "loss": loss.detach(),
        "ratio_mean": mean(w),
        "ratio_max": w.masked_fill(~x.mask, float("-inf")).max(),
        "ratio_min": w.masked_fill(~x.mask, float("inf")).min(),
        "kl_k1": mean(k1(log_ref)),
        "kl_k2": mean(k2(log_ref)),
        "kl_k3": mean(k3(log_ref)),
        "adv_mean": mean(x.advantages),
        "n_tokens": n,
    }
    clip = res.clip
    if clip.clipped is not None:
        vals["clipfrac"] = mean(clip.clipped)
        vals["clipfrac_high"] = mean(clip.high)
        vals["clipfrac_low"] = mean(clip.low)
        vals["clipfrac_dual"] = mean(clip.dual) if clip.dual is not None else torch.zeros_like(n)
    if res.reg_adv is not None:
        vals["reg_adv_mean"] = mean(res.reg_adv)
    if res.pg is not None:
        vals["pg_loss"] = aggregate(torch.where(x.mask, res.pg.detach(), 0.0), x.mask, cfg.agg, cfg.agg_norm_len)
    if res.kl is not None:
        vals["kl_loss"] = aggregate(torch.where(x.mask, res.kl.detach(), 0.0), x.mask, cfg.agg, cfg.agg_norm_len)
    if res.kl_value is not None:
        vals["kl_value"] = mean(res.kl_value)
    names = list(vals)
    numbers = torch.stack([v.to(x.logp.dtype) for v in vals.values()]).tolist()
    return dict(zip(names, numbers, strict=True))
