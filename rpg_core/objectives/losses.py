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

from .aggregation import Normaliser, aggregate, share_of_loss
from .clipping import ClipResult, clip_ratio
from .config import Clip, Form, ObjectiveConfig, ObjectiveConfigError
from .estimators import kl_estimator_from_log_ratio, rpg_divergence

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
    """Validated per-token inputs in the compute dtype (float32 or wider), each computed once.

    Log-ratios are exactly 0 where ``mask`` is 0, so there w = r = s = 1 and every KL term and f(r) is 0: padding
    contributes nothing to any sum, and NaN/inf in padded positions never reach a value or a gradient.
    """

    logp: Tensor  # [B, T] log pi_theta (carries the gradient; raw where mask is 0)
    log_w: Tensor  # [B, T] log(pi_theta/pi_old), with gradient, 0 where mask is 0
    w: Tensor  # [B, T] exp(log_w), with gradient
    log_r: Tensor  # [B, T] log(pi_theta/pi_ref), with gradient; log_w itself in iterative mode
    log_s: Tensor | None  # [B, T] log(pi_ref/pi_old), no gradient; None in iterative mode (s = 1)
    advantages: Tensor  # [B, 1] (broadcast) or [B, T], no gradient, 0 where mask is 0
    mask: Tensor  # [B, T] bool
    lengths: Tensor  # [B] valid tokens per sequence
    n_tokens: Tensor  # 0-d, valid tokens in all



@dataclass(frozen=True)
class FormResult:
    """What a form's loss function returns: the per-token loss and the pieces the metrics report."""

    per_token: Tensor  # [B, T], with the gradient
    clip: ClipResult
    kl: Tensor | None = None  # KL part of per_token (beta included, 0 where masked), when the form separates it


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


def _rpg_terms(cfg: ObjectiveConfig, x: LossInputs) -> tuple[Tensor, Tensor]:
    """(A' = A - beta f'(r), f'(r)) for the RPG forms, both detached."""
    if cfg.beta == 0:
        return x.advantages, torch.zeros((), dtype=x.w.dtype)
    fp = rpg_divergence(cfg.direction, cfg.normalized).f_prime(x.log_r.detach())
    return torch.add(x.advantages, fp, alpha=-cfg.beta), fp


def _s_times(x: LossInputs, t: Tensor) -> Tensor:
    return t if x.log_s is None else torch.exp(x.log_s) * t


@register_loss(Form.DIFFERENTIABLE)
def differentiable_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """Tables 1 and 4 (unclipped); Algorithm 1 with SG(A') when clipped (spec §2.3, §4.3)."""
    reg_adv, _ = _rpg_terms(cfg, x)
    if cfg.clip is Clip.NONE:
        # l = -w A + beta * s * f(r): e.g. URKL  -w A + beta (w log w - w + 1),  UFKL  -w A + beta (w - log w - 1)
        pg = -x.w * x.advantages
        if cfg.beta == 0:
            return FormResult(pg, clip_ratio(cfg, x.w, reg_adv))
        kl = cfg.beta * _s_times(x, rpg_divergence(cfg.direction, cfg.normalized).f(x.log_r))
        return FormResult(pg + kl, clip_ratio(cfg, x.w, reg_adv), kl=kl)
    # Algorithm 1: L = max(-w A', -clip(w) A'), and min(., -c A') for A' < 0, with A' stop-gradiented (spec §4.3:
    # differentiating through A' gives the wrong gradient). d/dtheta = -w A' dlog pi = -Weight dlog pi.
    clip = clip_ratio(cfg, x.w, reg_adv)
    return FormResult(-clip.ratio * reg_adv, clip)


@register_loss(Form.REINFORCE)
def reinforce_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """Table 2 / App. F (unclipped); Algorithm 2, RPG-REINFORCE with RPG-Style Clip, when clipped (spec §2.4, §4.4)."""
    w = x.w.detach()
    reg_adv, fp = _rpg_terms(cfg, x)
    # Branch on the sign of A' = psi / l (Algorithm 2); the released code branches on A (spec §4.6).
    clip = clip_ratio(cfg, w, reg_adv)
    # C = -beta w f'(r) is Algorithm 2's KL component; Weight = A w + C. Where clipped, w -> bound (A b + C, constant).
    minus_weight = torch.mul(x.advantages, clip.ratio).neg_()  # -(A m + C), all detached
    if cfg.beta:
        minus_weight.addcmul_(w, fp, value=cfg.beta)  # -C = +beta w f'(r)
    logp = x.logp if clip.clipped is None else torch.where(clip.clipped, x.logp.detach(), x.logp)
    return FormResult(minus_weight * logp, clip)


def _clipped_pg(cfg: ObjectiveConfig, x: LossInputs) -> tuple[Tensor, ClipResult]:
    """The PPO / dual-clip policy term -clip(w) A on the reward advantage (verl ``compute_policy_loss``, spec §7.3)."""
    clip = clip_ratio(cfg, x.w, x.advantages)
    return -clip.ratio * x.advantages, clip


@register_loss(Form.PENALTY)
def penalty_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """GRPO/verl family: clipped policy term + beta * [w *] k(direction) per token, outside the clip (spec §3.2)."""
    pg, clip = _clipped_pg(cfg, x)
    if cfg.beta == 0:
        return FormResult(pg, clip)
    kappa = kl_estimator_from_log_ratio(cfg.estimator, cfg.direction, x.log_r)
    if cfg.kl_is_weight:  # the corrected off-policy estimator E_old[w k3(ref/theta)] = UKL(theta||ref) (spec §3.2)
        kappa = x.w * kappa
    kl = cfg.beta * kappa
    return FormResult(pg + kl, clip, kl=kl)


@register_loss(Form.REWARD)
def reward_form_loss(cfg: ObjectiveConfig, x: LossInputs) -> FormResult:
    """KL in the reward: the KL was already subtracted upstream (``reward_kl_penalty``); only the policy term here."""
    pg, clip = _clipped_pg(cfg, x)
    return FormResult(pg, clip)


# -- the public entry points ---------------------------------------------------------------------------------


def policy_loss(
    cfg: ObjectiveConfig,
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    normaliser: Normaliser | None = None,
) -> LossOutput:
    """The policy loss of ``cfg`` on per-token log-probs ``[B, T]``.

    logp: log pi_theta of the sampled tokens (with gradient; need not be normalized). old_logp: the sampler's.
    ref_logp: the reference's; ``None`` or ``old_logp`` itself means iterative mode (pi_ref = pi_old, spec §5).
    advantages: ``[B]`` (broadcast to tokens) or ``[B, T]``. mask: 0/1 (bool, int or float), 1 on response tokens.
    normaliser: when these rows are one piece of a larger mini-batch (micro-batches, processes), its global
    normaliser; ``loss`` is then this piece's share of the mini-batch's loss (``aggregation.share_of_loss``), the
    one to backpropagate. The metrics (``metrics["loss"]`` included) always describe these rows on their own.
    Any float dtype; computed in at least float32. Returns the loss, the per-token loss and metrics.
    """
    x = _prepare(cfg, logp, old_logp, ref_logp, advantages, mask)
    res = LOSS_REGISTRY[cfg.form](cfg, x)
    per_token = torch.where(x.mask, res.per_token, 0.0)
    own = aggregate(per_token, x.mask, cfg.agg, cfg.agg_norm_len, n_tokens=x.n_tokens)
    metrics = _metrics(cfg, x, res, own)
    loss = own if normaliser is None else share_of_loss(per_token, x.mask, cfg.agg, normaliser)
    return LossOutput(loss=loss, per_token=per_token, metrics=metrics)


def reward_kl_penalty(cfg: ObjectiveConfig, old_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``beta * k(direction)`` to subtract from the token-level rewards (form='reward', spec §6.4).

    Evaluated at rollout time, where pi_theta = pi_old, so it has no gradient and no importance weight.
    """
    if cfg.form is not Form.REWARD:
        raise ObjectiveConfigError(
            f"reward_kl_penalty needs form='reward', got form={cfg.form.value!r}; the other forms put the KL in the loss"
        )
    old_logp = old_logp.detach()
    x = _prepare(cfg, old_logp, old_logp, ref_logp, torch.zeros_like(old_logp[:, 0]), mask, force_ref=True)
    if cfg.beta == 0:
        return torch.zeros_like(x.log_w)
    return cfg.beta * kl_estimator_from_log_ratio(cfg.estimator, cfg.direction, x.log_r)  # 0 where masked


# -- validation and metrics ----------------------------------------------------------------------------------


def _prepare(
    cfg: ObjectiveConfig,
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    force_ref: bool = False,
) -> LossInputs:
    if not isinstance(cfg, ObjectiveConfig):
        raise TypeError(f"cfg must be an ObjectiveConfig, got {type(cfg).__name__}")
    iterative = (ref_logp is None or ref_logp is old_logp) and not force_ref
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
    mask = mask.to(logp.device)
    if mask.dtype == torch.bool:
        mask_b, not_binary = mask, None
    elif mask.is_floating_point():
        mask_b = mask != 0
        not_binary = (mask_b & (mask != 1)).any()
    else:  # integer: 0/1 iff min >= 0 and max <= 1, one pass
        lo, hi = torch.aminmax(mask)
        mask_b, not_binary = mask != 0, (lo < 0) | (hi > 1)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dtype)
    old = old_logp.detach().to(dtype)
    # Log-ratios at valid positions; 0 (w = 1) elsewhere. A NaN/inf at a valid position makes the sum non-finite,
    # so one reduction checks both inputs; the exact culprit is looked up only when it fires.
    log_w = torch.where(mask_b, lp - old, 0.0)
    log_r, log_s = log_w, None
    if not iterative:
        ref = ref_logp.detach().to(dtype)
        log_r = torch.where(mask_b, lp - ref, 0.0)
        log_s = torch.where(mask_b, ref - old, 0.0)
    adv = advantages.detach().to(dtype)
    adv = adv[:, None] if adv.dim() == 1 else torch.where(mask_b, adv, 0.0)
    lengths = mask_b.sum(-1)

    # One host sync for every check.
    adv_valid = torch.where(lengths[:, None] > 0, adv, 0.0) if adv.shape[1] == 1 else adv  # skip all-padding rows
    checks = [lengths.sum() == 0, torch.isfinite(log_w.sum()), torch.isfinite(adv_valid.sum())]
    if log_s is not None:
        checks.append(torch.isfinite(log_s.sum()))
    if not_binary is not None:
        checks.append(not_binary)
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise LossInputError("mask has no valid token (all zeros): nothing to compute a loss over")
    if not_binary is not None and flags[-1]:
        raise LossInputError(f"mask must be 0/1 (bool, int or float), got values {mask.unique().tolist()[:8]}")
    if not all(flags[1 : 4 if log_s is not None else 3]):
        tensors = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages}
        for name, t in tensors.items():
            t = t.detach()
            bad = ~torch.isfinite(t if t.dim() == 2 else t[:, None].expand_as(mask_b)) & mask_b
            if bad.any():
                raise LossInputError(
                    f"{name} has {int(bad.sum())} NaN/inf value(s) at valid (mask=1) positions, "
                    f"first at {bad.nonzero()[0].tolist()}"
                )
        raise LossInputError("log-probabilities overflow: differences of valid log-probs are not finite")

    return LossInputs(
        logp=lp,
        log_w=log_w,
        w=torch.exp(log_w),
        log_r=log_r,
        log_s=log_s,
        advantages=adv,
        mask=mask_b,
        lengths=lengths,
        n_tokens=lengths.sum(),
    )


@torch.no_grad()
def _metrics(cfg: ObjectiveConfig, x: LossInputs, res: FormResult, loss: Tensor) -> dict[str, float]:
    """Token means over valid positions. Padding has log-ratio 0 there, so w = 1 and every KL estimate and f(r) is 0:
    plain sums need no mask, except for w (corrected by the number of padded positions)."""
    n = x.n_tokens.to(x.w.dtype)
    n_pad = x.mask.numel() - n
    log_w, w = x.log_w.detach(), x.w.detach()
    log_r = x.log_r.detach()
    inv_r = torch.exp(-log_r) if x.log_s is not None else torch.reciprocal(w)  # pi_ref/pi_theta
    sum_log_r = log_r.sum()
    adv_sum = (x.advantages[:, 0] * x.lengths).sum() if x.advantages.shape[1] == 1 else x.advantages.sum()
    vals: dict[str, Tensor] = {
        "loss": loss.detach(),
        "ratio_mean": (w.sum() - n_pad) / n,
        # KL(pi_theta || pi_ref) estimated from log(pi_ref/pi_theta) = -log_r (spec §3.1)
        "kl_k1": sum_log_r / n,
        "kl_k2": 0.5 * torch.dot(log_r.flatten(), log_r.flatten()) / n,
        "kl_k3": (inv_r.sum() - n_pad - n + sum_log_r) / n,
        "adv_mean": adv_sum / n,
        "n_tokens": n,
    }
    clip = res.clip
    if clip.clipped is not None:  # padding is never clipped (w = 1 lies inside every clip range)
        high, low, dual = clip.counts()
        vals |= {"clipfrac": (high + low + dual) / n, "clipfrac_high": high / n, "clipfrac_low": low / n,
                 "clipfrac_dual": dual / n}  # fmt: skip
    if res.kl is not None:  # the forms that compute the KL term separately (never recomputed here)
        kl_loss = aggregate(res.kl.detach(), x.mask, cfg.agg, cfg.agg_norm_len, n_tokens=x.n_tokens)
        vals |= {"kl_loss": kl_loss, "pg_loss": loss.detach() - kl_loss}  # aggregation is linear
        vals["kl_value"] = res.kl.detach().sum() / (cfg.beta * n)  # the KL term's mean value, beta excluded
    # Extremes of w in one pass: padding has log w = 0 exactly, so a max > 0 (a min < 0) is a valid token's; only
    # when every valid w lies on one side of 1 is the exact masked pass needed.
    lw_min, lw_max = torch.aminmax(log_w)
    vals |= {"ratio_max": torch.exp(lw_max), "ratio_min": torch.exp(lw_min)}
    names = list(vals)
    numbers = torch.stack([v.to(w.dtype) for v in vals.values()]).tolist()
    out = dict(zip(names, numbers, strict=True))
    if n_pad > 0 and 1.0 in (out["ratio_max"], out["ratio_min"]):
        valid = log_w[x.mask]
        out["ratio_max"], out["ratio_min"] = float(valid.max().exp()), float(valid.min().exp())
    return out
