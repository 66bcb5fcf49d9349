"""The sampler-trainer mismatch correction (issue #18): TIS and MIS weights and the mismatch metrics, by hand.

Every expected number is worked out in a comment from the papers' formulas (Yao et al. 2025 for TIS, Liu et al.
2025 for MIS; k3 as in test_hand_values.py); none is produced by calling the library. The batch: two responses of
three tokens, the second with one padded token, probabilities chosen so that every ratio rho = pi_old/pi_sampler
is a round number:

    response 0: pi_old = [0.3, 0.6, 0.1], pi_sampler = [0.2, 0.2, 0.4]  ->  rho = [1.5, 3, 0.25]
    response 1: pi_old = [0.8, 0.3, pad], pi_sampler = [0.2, 0.2, pad]  ->  rho = [4, 1.5, pad]

    log rho: ln 1.5 = 0.4054651081081644, ln 3 = 1.0986122886681098, ln 4 = 1.3862943611198906 (ln 0.25 = -ln 4)

The padded token has pi_old = 1 and pi_sampler = 1e-3 (rho = 1000): counted anywhere, it would change a number.
Settings: cap C = 2, band [0.5, 2] (the defaults). 5 valid tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpg_core.objectives import (
    CorrectionConfig,
    CorrectionConfigError,
    CorrectionLevel,
    RolloutCorrection,
    correction_weights,
    mismatch_metrics,
)

pytestmark = pytest.mark.unit

F64 = torch.float64
L = math.log
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
OLD = torch.tensor([[L(0.3), L(0.6), L(0.1)], [L(0.8), L(0.3), 0.0]], dtype=F64)
SAMPLER = torch.tensor([[L(0.2), L(0.2), L(0.4)], [L(0.2), L(0.2), L(1e-3)]], dtype=F64)
LOG_RHO = torch.tensor([[L(1.5), L(3.0), -L(4.0)], [L(4.0), L(1.5), 0.0]], dtype=F64)  # OLD - SAMPLER, 0 at pad


def cfg(mode: str, level: str = "token", **kw) -> CorrectionConfig:
    return CorrectionConfig(mode=mode, level=level, **kw)


def close(actual: torch.Tensor, expected, *, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# =====================================================================================================================
# 1. The four weightings by hand
# =====================================================================================================================

# (mode, level, expected weights, expected corrected tokens)
HAND = [
    # TIS token, w = min(rho, 2):
    #   response 0: min(1.5, 2) = 1.5, min(3, 2) = 2 (truncated), min(0.25, 2) = 0.25
    #   response 1: min(4, 2) = 2 (truncated), min(1.5, 2) = 1.5, pad -> 0
    ("tis", "token", [[1.5, 2.0, 0.25], [2.0, 1.5, 0.0]], [[0, 1, 0], [1, 0, 0]]),
    # TIS sequence, w = min(prod rho, 2) on every token of the response:
    #   response 0: 1.5 * 3 * 0.25 = 1.125 < 2, kept
    #   response 1: 4 * 1.5 = 6 > 2 -> 2 on both valid tokens (truncated); with the pad counted it would be 6000
    ("tis", "sequence", [[1.125, 1.125, 1.125], [2.0, 2.0, 0.0]], [[0, 0, 0], [1, 1, 0]]),
    # MIS token, w = rho inside [0.5, 2], else 0:
    #   response 0: 1.5 inside -> 1.5; 3 > 2 -> 0 (masked); 0.25 < 0.5 -> 0 (masked)
    #   response 1: 4 > 2 -> 0 (masked); 1.5 -> 1.5; pad -> 0 (padding, not counted as masked)
    ("mis", "token", [[1.5, 0.0, 0.0], [0.0, 1.5, 0.0]], [[0, 1, 1], [1, 0, 0]]),
    # MIS sequence, the geometric mean g = (prod rho)^(1/|y|), w = g inside [0.5, 2], else 0:
    #   response 0: g = 1.125^(1/3) = 9^(1/3) / 2 = 2.080083823051904 / 2 = 1.040041911525952, inside -> kept
    #   response 1: g = 6^(1/2) = 2.449489742783178 > 2 -> 0 on both valid tokens (masked)
    #   (the divisor |y| = valid tokens only is checked in test_sequence_level_uses_only_valid_tokens)
    ("mis", "sequence", [[1.040041911525952] * 3, [0.0, 0.0, 0.0]], [[0, 0, 0], [1, 1, 0]]),
]


@pytest.mark.parametrize(("mode", "level", "weights", "corrected"), HAND, ids=[f"{m}-{lv}" for m, lv, *_ in HAND])
def test_weights_by_hand(mode, level, weights, corrected):
    out = correction_weights(cfg(mode, level), OLD, SAMPLER, MASK)
    close(out.weights, weights)
    assert out.corrected.tolist() == [[bool(c) for c in row] for row in corrected]
    n = sum(map(sum, corrected))
    assert out.n_corrected == n
    assert out.share_corrected == n / 5  # TIS token 2/5, TIS seq 2/5, MIS token 3/5, MIS seq 2/5
    assert out.weights.dtype == F64 and not out.weights.requires_grad


def test_sequence_level_uses_only_valid_tokens():
    # Three responses of 2 valid tokens and 2 pads (pad rho = 1000 and 1e-3, or 1000 and 1):
    #   a: rho = [4, 1/4]:  product 1         -> TIS min(1, 2) = 1;  geometric mean 1^(1/2) = 1 -> MIS w = 1
    #   b: rho = [4, 4]:    product 16        -> TIS 2 (truncated);  g = 16^(1/2) = 4 > 2       -> MIS 0 (masked)
    #   c: rho = [1.5, 2.4]: product 3.6      -> TIS 2 (truncated);  g = 3.6^(1/2) = 1.8973665961010275 -> kept
    # c checks the divisor: over T = 4 it would be 3.6^(1/4) = 1.3774493079968597, with the pads counted
    # 3600^(1/4) = 7.745966692414834 (masked).
    old = torch.tensor([[L(4.0), -L(4.0), 0.0, 0.0], [L(4.0), L(4.0), 0.0, 0.0], [L(1.5), L(2.4), 0.0, 0.0]], dtype=F64)
    sampler = torch.tensor([[0.0, 0.0, -L(1000.0), L(1000.0)]] + [[0.0, 0.0, -L(1000.0), 0.0]] * 2, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    mis = correction_weights(cfg("mis", "sequence"), old, sampler, mask)
    g = 1.8973665961010275
    close(mis.weights, [[1.0, 1.0, 0, 0], [0, 0, 0, 0], [g, g, 0, 0]])
    assert mis.n_corrected == 2 and mis.share_corrected == 2 / 6
    tis = correction_weights(cfg("tis", "sequence"), old, sampler, mask)
    close(tis.weights, [[1.0, 1.0, 0, 0], [2.0, 2.0, 0, 0], [2.0, 2.0, 0, 0]])
    assert tis.n_corrected == 4


def test_none_gives_ones_on_every_valid_token():
    # mode none: w = 1 on every valid token, nothing corrected, whatever the ratios (rho = 3, 0.25, 4 here)
    full = torch.ones(2, 3, dtype=torch.bool)
    out = correction_weights(CorrectionConfig(), OLD, SAMPLER, full)
    close(out.weights, [[1.0] * 3] * 2)
    assert out.n_corrected == 0 and out.share_corrected == 0.0 and not out.corrected.any()
    close(correction_weights(CorrectionConfig(), OLD, SAMPLER, MASK).weights, [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(("mode", "level", "weights", "corrected"), HAND, ids=[f"{m}-{lv}" for m, lv, *_ in HAND])
def test_padding_never_matters(mode, level, weights, corrected):
    # NaN, +-inf or float mask at the padded position: the same weights as the hand values above
    for pad_old, pad_sampler in ((float("nan"), float("nan")), (0.0, float("-inf")), (float("inf"), 0.0)):
        old, sampler = OLD.clone(), SAMPLER.clone()
        old[1, 2], sampler[1, 2] = pad_old, pad_sampler
        out = correction_weights(cfg(mode, level), old, sampler, MASK.double())
        close(out.weights, weights)
        assert out.n_corrected == sum(map(sum, corrected))


def test_low_precision_inputs_are_computed_in_float32():
    out = correction_weights(cfg("tis"), OLD.bfloat16(), SAMPLER.float(), MASK)
    assert out.weights.dtype == torch.float32
    # bf16 rounds log pi_old (8 bits of mantissa): rho differs from the hand values by < 1 %
    close(out.weights, [[1.5, 2.0, 0.25], [2.0, 1.5, 0.0]], rtol=1e-2, atol=0.0)


def test_extreme_ratios_stay_finite():
    # log rho = +-1000 per token (rho overflows float32 and float64 if exponentiated):
    #   TIS token: min(e^1000, 2) = 2, min(e^-1000, 2) = e^-1000 = 0 (underflow, exact enough)
    #   TIS sequence: sum = 1000 - 1000 + 1000 = 1000 -> 2 on every token
    #   MIS token: both outside [0.5, 2] -> 0;  MIS sequence: g = e^(1000/3) > 2 -> 0
    old = torch.tensor([[1000.0, -1000.0, 1000.0]])
    sampler = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    close(correction_weights(cfg("tis"), old, sampler, mask).weights, [[2.0, 0.0, 2.0]])
    close(correction_weights(cfg("tis", "sequence"), old, sampler, mask).weights, [[2.0, 2.0, 2.0]])
    close(correction_weights(cfg("mis"), old, sampler, mask).weights, [[0.0, 0.0, 0.0]])
    close(correction_weights(cfg("mis", "sequence"), old, sampler, mask).weights, [[0.0, 0.0, 0.0]])
    m = mismatch_metrics(old, sampler, mask)
    # k3 with log rho clamped to +-20: (e^20 - 1 - 20) * 2 + (e^-20 - 1 + 20), over 3 tokens
    #   e^20 = 485165195.4097903; 2 * 485165174.4097903 + 19.000000002061153 = 970330367.8195806; / 3
    assert math.isfinite(m.kl_k3)
    assert m.kl_k3 == pytest.approx(970330367.8195806 / 3, rel=1e-12)
    assert m.mean_abs_logp_diff == 1000.0 and m.share_outside == 1.0


def test_bad_shapes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="sampler_logp"):
        correction_weights(cfg("tis"), OLD, SAMPLER[:, :2], MASK)
    with pytest.raises(ValueError, match="mask"):
        correction_weights(cfg("tis"), OLD, SAMPLER, MASK[0])
    with pytest.raises(ValueError, match="trainer_old_logp"):
        mismatch_metrics(OLD[0], SAMPLER[0], MASK[0])


# =====================================================================================================================
# 2. The mismatch metrics by hand
# =====================================================================================================================


def test_mismatch_metrics_by_hand():
    # over the 5 valid tokens, rho = [1.5, 3, 0.25, 4, 1.5]:
    # mean |log pi_trainer - log pi_sampler| = (ln 1.5 + ln 3 + ln 4 + ln 4 + ln 1.5) / 5
    #   = (0.4054651081081644 * 2 + 1.0986122886681098 + 1.3862943611198906 * 2) / 5 = 4.68213122712422 / 5
    #   = 0.936426245424844
    # k3 = (rho - 1) - ln rho:
    #   1.5 : 0.5 - 0.4054651081081644 = 0.0945348918918356 (twice)
    #   3   : 2 - 1.0986122886681098 = 0.9013877113318902
    #   0.25: -0.75 + 1.3862943611198906 = 0.6362943611198906
    #   4   : 3 - 1.3862943611198906 = 1.6137056388801094
    #   sum = 3.3404574951155617, mean = 0.6680914990231124
    # outside [0.5, 2]: 3, 0.25, 4 -> 3 / 5 = 0.6
    # (the pad, rho = 1000, would add |ln 1000| = 6.9 and k3 = 992.1 if counted)
    m = mismatch_metrics(OLD, SAMPLER, MASK)
    assert m.mean_abs_logp_diff == pytest.approx(0.936426245424844, rel=1e-12)
    assert m.kl_k3 == pytest.approx(0.6680914990231124, rel=1e-12)
    assert m.share_outside == 0.6
    assert m.n_tokens == 5
    assert all(isinstance(v, float) for v in (m.mean_abs_logp_diff, m.kl_k3, m.share_outside))


def test_mismatch_metrics_identical_policies_and_no_tokens():
    # same log-probs: |diff| = 0, k3(0) = 0, rho = 1 inside the band
    m = mismatch_metrics(OLD, OLD.clone(), MASK)
    assert (m.mean_abs_logp_diff, m.kl_k3, m.share_outside, m.n_tokens) == (0.0, 0.0, 0.0, 5)
    # no valid token: every mean is 0.0 by convention, and n_tokens says so
    assert mismatch_metrics(OLD, SAMPLER, torch.zeros(2, 3)).n_tokens == 0
    assert mismatch_metrics(OLD, SAMPLER, torch.zeros(2, 3)).kl_k3 == 0.0
    out = correction_weights(cfg("mis"), OLD, SAMPLER, torch.zeros(2, 3))
    assert out.share_corrected == 0.0 and not out.weights.any()


def test_band_edges_are_inside_and_the_cap_is_not_a_truncation():
    # rho exactly 2 (ln 2 as a float, exp of it rounds to 2.0): TIS min(2, 2) = 2, not counted as truncated;
    # MIS keeps [0.5, 2] closed: rho = 0.5 and 2 are kept with w = rho (verl: >= lower and <= upper)
    old = torch.tensor([[L(2.0), -L(2.0)]], dtype=F64)
    zeros = torch.zeros(1, 2, dtype=F64)
    tis = correction_weights(cfg("tis"), old, zeros, torch.ones(1, 2))
    close(tis.weights, [[2.0, 0.5]])
    assert tis.n_corrected == 0
    mis = correction_weights(cfg("mis"), old, zeros, torch.ones(1, 2))
    close(mis.weights, [[2.0, 0.5]])
    assert mis.n_corrected == 0
    assert mismatch_metrics(old, zeros, torch.ones(1, 2)).share_outside == 0.0


# =====================================================================================================================
# 3. Detached weights: the REINFORCE gradient with the weight is exactly w * A * (onehot - softmax)
# =====================================================================================================================


@pytest.mark.parametrize(("mode", "level", "weights", "corrected"), HAND, ids=[f"{m}-{lv}" for m, lv, *_ in HAND])
def test_weighted_reinforce_gradient_is_closed_form(mode, level, weights, corrected):
    """L = sum_valid -w * A * log pi(y_t), w detached. d log softmax(z)_y / dz = onehot(y) - softmax(z), so
    dL/dz_t = -w_t * A * (onehot(y_t) - softmax(z_t)) on valid tokens and 0 on the pad. The trainer's old log-probs
    are the graph-carrying log pi itself: any gradient through w would add a term and fail the comparison."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([[0, 3, 1], [2, 2, 0]])
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]  # [2, 3], with the graph
    sampler = logp.detach() - LOG_RHO  # so that log pi_old - log pi_sampler = LOG_RHO, the hand ratios
    out = correction_weights(cfg(mode, level), logp, sampler, MASK)
    assert not out.weights.requires_grad and out.weights.grad_fn is None
    close(out.weights, weights, rtol=1e-10, atol=1e-12)
    adv = torch.tensor([[1.0], [-0.5]], dtype=F64)
    loss = torch.where(MASK, -out.weights * adv * logp, 0.0).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    w = torch.tensor(weights, dtype=F64)  # the hand weights, not the library's
    onehot = torch.nn.functional.one_hot(y, 4).to(F64)
    expected = (-w * adv * MASK)[..., None] * (onehot - torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
    assert grad[1, 2].abs().max() == 0.0  # the pad gets no gradient
    if mode == "mis":
        assert grad[out.corrected].abs().max() == 0.0  # masked tokens get none either


# =====================================================================================================================
# 4. The settings
# =====================================================================================================================


def test_settings_defaults_and_plain_strings():
    c = CorrectionConfig()
    assert (c.mode, c.level, c.cap, c.lower, c.upper) == (RolloutCorrection.NONE, CorrectionLevel.TOKEN, 2.0, 0.5, 2.0)
    c = CorrectionConfig.parse({"mode": "mis", "level": "sequence", "lower": 0.8, "upper": 1.25})
    assert c.mode is RolloutCorrection.MIS and c.level is CorrectionLevel.SEQUENCE
    with pytest.raises(Exception):  # frozen
        c.cap = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"cap": 1.0}, "cap must be a finite number > 1"),
        ({"cap": 0.5}, "cap must be a finite number > 1"),
        ({"cap": float("inf")}, "cap must be a finite number > 1"),
        ({"cap": float("nan")}, "cap must be a finite number > 1"),
        ({"lower": 0.0}, r"lower must be in \(0, 1\)"),
        ({"lower": -0.5}, r"lower must be in \(0, 1\)"),
        ({"lower": 1.0}, r"lower must be in \(0, 1\)"),
        ({"lower": float("nan")}, r"lower must be in \(0, 1\)"),
        ({"upper": 1.0}, "upper must be a finite number > 1"),
        ({"upper": 0.9}, "upper must be a finite number > 1"),
        ({"upper": float("inf")}, "upper must be a finite number > 1"),
        ({"mode": "clip"}, "mode: Input should be 'none', 'tis' or 'mis'"),
        ({"level": "geometric"}, "level: Input should be 'token' or 'sequence'"),
        ({"threshold": 2.0}, "threshold: unknown field; allowed fields: mode, level, cap, lower, upper"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kw, says):
    with pytest.raises(CorrectionConfigError, match=says):
        CorrectionConfig(**kw)
    with pytest.raises(ValueError, match=says):  # the parse door too, and it is a ValueError
        CorrectionConfig.parse(kw)


def test_canonical_resets_what_has_no_effect():
    # none ignores everything; TIS ignores the band; MIS ignores the cap
    assert CorrectionConfig(level="sequence", cap=3.0, lower=0.1).canonical() == CorrectionConfig()
    assert cfg("tis", cap=3.0, lower=0.1).canonical() == cfg("tis", cap=3.0)
    assert cfg("mis", "sequence", cap=3.0, upper=4.0).canonical() == cfg("mis", "sequence", upper=4.0)


def test_settings_import_without_torch():
    # the enums and settings live in objectives/config.py, which the CLI validates before torch loads (#17)
    import subprocess
    import sys

    code = (
        "import sys; from rpg_core.objectives import CorrectionConfig, RolloutCorrection, CorrectionLevel; "
        "CorrectionConfig(mode='tis'); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
