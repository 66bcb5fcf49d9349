"""rollout.correction in training (#18): the config, and the update's loss and gradient under TIS and MIS.

Runs in the main venv (no vLLM): the update is driven with given engine log-probs, and the trainer with a replay
engine, a test double of ``rollout.SyncedGenerator`` (the protocol vLLM's engine implements) that replays fixed
samples and reports the trained model's log-probs shifted by fixed offsets as its own. vLLM itself in training:
tests/test_vllm.py.

Notation: rho = pi_old / pi_sampler per token (the trainer's recomputed log-prob minus the engine's), A the
advantage, w the correction's weight: TIS w = min(rho, C), MIS w = rho inside [lower, upper] else 0; at the
sequence level rho is the response's product (TIS) or geometric mean (MIS). With one optimizer step per rollout
(pi_theta = pi_old, policy ratio 1) RPG-REINFORCE-URKL's per-token loss is (-w A + beta log r) log pi_theta with
log r = log pi_old - log pi_ref detached (URKL f'(r) = log r): the weight is on the policy-gradient term only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import zlib
from pathlib import Path

import pytest
import torch
import yaml

import tiny_run
from rpg_core import models
from rpg_core.config import RunConfig, RunConfigError, load_run_config
from rpg_core.objectives import compute_advantages
from rpg_core.rollout import SamplingParams, batched_logprobs, build_batch, token_logprobs
from rpg_core.update import UpdateBatch, update

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DEMO_KEY = "a0df54342e7d"  # configs/demo_add2_urkl.yaml (tests/test_run_config.py pins it too)

TINY = [*tiny_run.TINY, "train.log_samples=0", "tracking.enabled=false"]


def tiny_cfg(tmp_path: Path, *extra: str, steps: int = 2) -> RunConfig:
    return load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, f"train.steps={steps}", f"train.output_dir={tmp_path / 'runs'}", *extra])  # fmt: skip


# -- the config -------------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("engine", ["prefix", "hf"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_a_correction_needs_an_engine_with_its_own_weights(engine, mode, tmp_path):
    with pytest.raises(RunConfigError) as e:
        load_run_config(overrides=[f"rollout.generator={engine}", f"rollout.correction.mode={mode}"])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"rollout.correction.mode={mode} applies to rollout.generator: vllm only (it is {engine}" in msg
    assert "allowed here: none" in msg
    # the same from YAML (the engine left at its default, prefix)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"rollout": {"correction": {"mode": mode}}}))
    with pytest.raises(RunConfigError, match=r"rollout\.correction\.mode=.* vllm only \(it is prefix"):
        load_run_config(f)
    f.write_text(yaml.safe_dump({"rollout": {"generator": "vllm", "correction": {"mode": mode, "level": "sequence"}}}))
    c = load_run_config(f).rollout.correction
    assert (c.mode.value, c.level.value) == (mode, "sequence")
    plain = load_run_config(overrides=[f"rollout.generator={engine}"])
    assert plain.with_overrides(["rollout.correction.mode=none"]).key() == plain.key()  # none is allowed, key kept


@pytest.mark.unit
@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.correction.mode=both", "rollout.correction.mode: Input should be 'none', 'tis' or 'mis' (got 'both')"),
        ("rollout.correction.cap=1", "rollout.correction.cap must be a finite number > 1 (the TIS cap C), got 1.0"),
        ("rollout.correction.lower=2", "rollout.correction.lower must be in (0, 1)"),
        ("rollout.correction.clip=2", "rollout.correction.clip: unknown field; allowed fields: mode, level, cap, lower, "
                                      "upper"),
    ],
)
def test_bad_correction_values_are_one_line_naming_the_field(override, expected):
    with pytest.raises(RunConfigError) as e:
        load_run_config(overrides=["rollout.generator=vllm", override])
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.unit
def test_default_runs_keep_their_config_keys():
    demo = load_run_config(ROOT / "configs" / "demo_add2_urkl.yaml")
    assert demo.key() == DEMO_KEY
    assert demo.with_overrides(["rollout.correction.mode=none"]).key() == DEMO_KEY
    assert "correction" not in demo.model_dump()["rollout"] and "correction:" not in demo.to_yaml()
    vllm = demo.with_overrides(["rollout.generator=vllm"])
    assert "correction" not in vllm.model_dump()["rollout"]
    # fields without effect leave the key alone: none's cap, tis's band, mis's cap
    assert vllm.with_overrides(["rollout.correction.mode=none", "rollout.correction.cap=3"]).key() == vllm.key()
    tis = vllm.with_overrides(["rollout.correction.mode=tis"])
    mis = vllm.with_overrides(["rollout.correction.mode=mis"])
    assert len({vllm.key(), tis.key(), mis.key(), tis.with_overrides(["rollout.correction.cap=3"]).key(),
                tis.with_overrides(["rollout.correction.level=sequence"]).key()}) == 5  # fmt: skip
    assert tis.with_overrides(["rollout.correction.lower=0.3"]).key() == tis.key()
    assert mis.with_overrides(["rollout.correction.cap=5"]).key() == mis.key()
    # a round trip through YAML keeps the correction and the key
    back = RunConfig.from_dict(yaml.safe_load(tis.to_yaml()))
    assert back.rollout.correction == tis.rollout.correction and back.key() == tis.key()


# -- the update with given engine log-probs ---------------------------------------------------------------------------

# engine log-prob = trainer's + offset, so log rho = -offset: per position t, plus a shift per row (rows 3 and 6
# leave the MIS band at the sequence level too). rho at t: e^0=1, e^1=2.72 (> 2), e^-.25=.78, e^-1=.37 (< .5),
# e^.3=1.35, e^1.5=4.48 (> 2), e^-.9=.41 (< .5), e^-.1=.90
OFFSETS = torch.tensor([0.0, -1.0, 0.25, 1.0, -0.3, -1.5, 0.9, 0.1])
ROW_SHIFT = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.9, 0.0])
REWARDS = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0])  # two groups of 4, mixed


def _responses(prompt: list[int], n: int, max_new: int) -> list[list[int]]:
    """Fixed responses of lengths 5..8 (so padding is exercised), a function of the prompt only."""
    seed = zlib.crc32(bytes(str(list(prompt)), "ascii"))
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (min(max_new, 5 + i % 4),), generator=g).tolist() for i in range(n)]


class RecordingBackend:
    """The update's Backend on one process: records each backward's loss and the gradient before clipping."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.grads: list[list[torch.Tensor]] = []

    def backward(self, loss):
        self.losses.append(loss.detach().clone())
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        params = list(parameters)
        self.grads.append([p.grad.detach().clone() for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _expected_weights(rho: torch.Tensor, mask: torch.Tensor, mode: str, level: str) -> torch.Tensor:
    """w per token in float64 from rho = pi_old/pi_sampler (defaults: C = 2, band [0.5, 2]); 0 on padding."""
    m = mask.double()
    if level == "sequence":
        log_rho = torch.where(mask, rho.log(), 0.0).sum(-1, keepdim=True)
        if mode == "mis":
            log_rho = log_rho / m.sum(-1, keepdim=True)  # the geometric mean
        rho = log_rho.exp().expand_as(m)
    if mode == "tis":
        w = rho.clamp(max=2.0)
    elif mode == "mis":
        w = torch.where((rho >= 0.5) & (rho <= 2.0), rho, 0.0)
    else:
        w = torch.ones_like(rho)
    return w * m


def _update_case(tokenizer, mode: str, level: str = "token", *, offsets: bool = True):
    """One update (one micro-batch, one optimizer step) of the trainer's inputs with the engine's log-probs set to
    the trainer's pi_old + offsets (or pi_old itself): returns the recorded loss and gradient, and what they
    should be, computed in float64 from the same inputs."""
    from rpg_core.trainer import corrected_advantages

    cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, "rollout.generator=vllm", f"rollout.correction.mode={mode}", f"rollout.correction.level={level}",
        "objective.beta=0.5", "objective.agg=token-mean", "algorithm.reference=fixed", "algorithm.micro_batch_size=8",
        "optim.grad_clip=null"])  # fmt: skip
    model, ref_model = models.tiny_model(0), models.tiny_model(1)
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Answer: 7")["input_ids"]]
    rows = [(p, r) for p in prompts for r in _responses(p, 4, 8)]
    batch = build_batch([p for p, _ in rows], [r for _, r in rows], [0] * 4 + [1] * 4, tokenizer.pad_token_id)
    mask = batch.response_mask
    old = batched_logprobs(model, batch, 8)
    ref = batched_logprobs(ref_model, batch, 8)
    engine = torch.where(mask, old + OFFSETS[None, : mask.shape[1]] + ROW_SHIFT[:, None], 0.0) if offsets else old
    adv = compute_advantages(cfg.algorithm.advantage, REWARDS, batch.group_ids, mask)
    pg_adv, corr_m = corrected_advantages(cfg.rollout.correction, adv, old, engine, mask)

    rec = RecordingBackend()
    theta = copy.deepcopy(model)  # before the optimizer step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = update(model, opt, cfg, UpdateBatch(batch, mask, pg_adv, None, ref), step=0, backend=rec)
    assert len(rec.losses) == 1 and len(rec.grads) == 1 and out["actor/clipfrac"] == 0.0  # policy ratio 1

    # float64, from the same inputs: (-w A + beta log r) log pi_theta over the valid tokens / N
    m64 = theta.double()
    logp, _ = token_logprobs(m64, batch)
    rho = (old.double() - engine.double()).exp()
    w = _expected_weights(rho, mask, mode, level)
    log_r = logp.detach() - ref.double()
    per_token = (-(w * adv.double()) + cfg.objective.beta * log_r) * logp
    loss = torch.where(mask, per_token, 0.0).sum() / mask.sum()
    loss.backward()
    corrected = {"tis": rho > 2.0, "mis": (rho < 0.5) | (rho > 2.0), "none": torch.zeros_like(mask)}[mode] & mask
    if level == "sequence":
        corrected = (w == 0) & mask if mode == "mis" else (w == 2.0) & mask
    return {
        "loss": rec.losses[0], "grads": rec.grads[0], "pg_adv": pg_adv, "adv": adv, "metrics": corr_m,
        "want_loss": loss.detach(), "atol": 1e-6 * float(torch.where(mask, per_token.detach(), 0.0).abs().sum() / mask.sum()),
        "want_grads": [p.grad for p in m64.parameters()],
        "want_share": float(corrected.sum()) / float(mask.sum()), "n_corrected": int(corrected.sum()),
    }  # fmt: skip


@pytest.mark.parametrize("mode, level", [("tis", "token"), ("mis", "token"), ("tis", "sequence"), ("mis", "sequence")])
def test_the_update_with_a_correction_is_the_hand_weighted_loss(tokenizer, mode, level):
    got = _update_case(tokenizer, mode, level)
    assert got["n_corrected"] > 0 and got["want_share"] < 1  # the case truncates/masks some tokens, not all
    assert got["metrics"] == {"rollout/correction_share": pytest.approx(got["want_share"], abs=1e-12)}
    # the loss is a mean of terms ~10 (log pi ~ -10.8) that largely cancel: float32 vs float64 to 1e-6 of the terms
    torch.testing.assert_close(got["loss"].double(), got["want_loss"], rtol=0, atol=got["atol"])
    grads, want = got["grads"], got["want_grads"]
    assert len(grads) == len(want)
    scale = max(float(g.abs().max()) for g in want)
    for g, e in zip(grads, want, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5 * scale)
    # and the correction made a difference the tolerance would see: the uncorrected loss is elsewhere
    plain = _update_case(tokenizer, "none")
    assert abs(float(plain["loss"]) - float(got["loss"])) > 1e3 * got["atol"]


def test_no_correction_and_weights_of_one_are_bit_identical(tokenizer):
    none = _update_case(tokenizer, "none")
    assert none["pg_adv"] is none["adv"] and none["metrics"] == {}  # today's path: A itself, no metric
    # TIS with the engine's log-probs equal to the trainer's: every weight is exactly 1, A * 1 is A
    ones = _update_case(tokenizer, "tis", offsets=False)
    assert torch.equal(ones["pg_adv"], ones["adv"]) and ones["metrics"] == {"rollout/correction_share": 0.0}
    assert torch.equal(ones["loss"], none["loss"])
    assert all(torch.equal(a, b) for a, b in zip(ones["grads"], none["grads"], strict=True))
    torch.testing.assert_close(none["loss"].double(), none["want_loss"], rtol=0, atol=none["atol"])


# -- the trainer with a replay engine ---------------------------------------------------------------------------------


class ReplayEngine:
    """A replay engine: a test double of ``rollout.SyncedGenerator`` (vLLM cannot run in the main venv). It samples
    the fixed ``_responses`` of each prompt and reports as its log-probs the model's own plus OFFSETS (+ ROW_SHIFT
    by row within the call), so rho = pi_old/pi_sampler is known; its weights are the trainer's (check: 0)."""

    def __init__(self, model, tokenizer, **kwargs):
        self.model, self.tok = model, tokenizer

    def load_weights(self, model):
        self.model = model

    def generate(self, prompts, params: SamplingParams, *, batch_size=None):
        return [_responses(list(p), params.n, params.max_new_tokens) for p in prompts]

    def generate_logprobs(self, prompts, params: SamplingParams, *, batch_size=None):
        samples = self.generate(prompts, params)
        flat = [(list(p), r) for p, group in zip(prompts, samples) for r in group]
        gids = [g for g, group in enumerate(samples) for _ in group]
        batch = build_batch([p for p, _ in flat], [r for _, r in flat], gids, self.tok.pad_token_id)
        with torch.no_grad():
            lp = token_logprobs(self.model, batch)[0]
        rows = [(lp[i, : len(r)] + OFFSETS[: len(r)] + ROW_SHIFT[i % len(ROW_SHIFT)]).tolist()
                for i, (_, r) in enumerate(flat)]  # fmt: skip
        n = params.n
        return samples, [rows[g * n : (g + 1) * n] for g in range(len(prompts))]

    def check(self, model, prompts, responses, tokens=None):
        return 0.0

    def sleep(self):
        pass


def _coin_rewards(monkeypatch):
    """+1 or -1 by a checksum of the text, so a random model's groups are mixed (as tests/test_vllm.py)."""
    from rpg_core import rewards
    from rpg_core import trainer as trainer_mod

    def score(rule, texts, answers, **kw):
        return [rewards.Score(1.0 if zlib.crc32(t.encode()) % 2 else -1.0, bool(zlib.crc32(t.encode()) % 2), "0")
                for t in texts]  # fmt: skip

    monkeypatch.setattr(trainer_mod.rewards_mod, "score_responses", score)


def _replay_trainer(monkeypatch, cfg):
    from rpg_core import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "preflight", lambda *a, **k: None)  # no vLLM here: the replay engine instead
    monkeypatch.setattr(trainer_mod, "make_generator", lambda kind, model, tok, **k: ReplayEngine(model, tok))
    return trainer_mod.Trainer(cfg)


def test_training_with_tis_weights_the_advantages_and_logs_the_share(tmp_path, monkeypatch):
    from rpg_core import trainer as trainer_mod

    _coin_rewards(monkeypatch)
    seen = []
    real_adv, real_update = trainer_mod.compute_advantages, trainer_mod.update

    def spy_adv(*a, **k):
        seen.append({"adv": real_adv(*a, **k)})
        return seen[-1]["adv"]

    def spy_update(model, opt, cfg, data, **k):
        seen[-1]["data"] = data
        return real_update(model, opt, cfg, data, **k)

    monkeypatch.setattr(trainer_mod, "compute_advantages", spy_adv)
    monkeypatch.setattr(trainer_mod, "update", spy_update)
    cfg = tiny_cfg(tmp_path, "rollout.generator=vllm", "rollout.correction.mode=tis")
    res = _replay_trainer(monkeypatch, cfg).fit()
    assert res.step == 2 and len(seen) == 2
    for m, s in zip(res.history, seen, strict=True):
        mask = s["data"].mask
        t = mask.shape[1]
        rho = torch.exp(-(OFFSETS[None, :t] + ROW_SHIFT[:, None])).double()  # log rho = -offset, by construction
        want_w = _expected_weights(rho, mask, "tis", "token")
        assert float(s["adv"].abs().sum()) > 0
        torch.testing.assert_close(s["data"].advantages.double(), s["adv"].double() * want_w, rtol=1e-5, atol=1e-7)
        share = float(((rho > 2.0) & mask).sum()) / float(mask.sum())  # offsets -1, -1.5 and row 3's shift
        assert m["rollout/correction_share"] == pytest.approx(share, abs=1e-12) and share > 0
        lr = torch.where(mask, -(OFFSETS[None, :t] + ROW_SHIFT[:, None]), 0.0).double()
        assert m["rollout/mismatch_abs_logp_diff"] == pytest.approx(float(lr.abs().sum() / mask.sum()), rel=1e-5)
        assert m["rollout/mismatch_kl_k3"] == pytest.approx(float((lr.exp() - 1 - lr).sum() / mask.sum()), rel=1e-5)
        outside = float((((lr < math.log(0.5)) | (lr > math.log(2.0))) & mask).sum()) / float(mask.sum())
        assert m["rollout/mismatch_share_outside"] == pytest.approx(outside, abs=1e-12)
        assert m["rollout/sync_logp_abs_diff"] == 0.0
        assert all(math.isfinite(m[k]) for k in ("actor/loss", "actor/grad_norm"))


def test_no_correction_trains_exactly_as_the_prefix_engine_on_the_same_samples(tmp_path, monkeypatch):
    """A vllm run (replayed) without correction updates exactly as the built-in engine on the same tokens."""
    from rpg_core.rollout import PrefixSharingGenerator
    from rpg_core.trainer import Trainer

    _coin_rewards(monkeypatch)
    synced = _replay_trainer(monkeypatch, tiny_cfg(tmp_path / "v", "rollout.generator=vllm")).fit()
    assert "rollout/correction_share" not in synced.history[0] and "rollout/mismatch_kl_k3" in synced.history[0]
    monkeypatch.undo()
    _coin_rewards(monkeypatch)
    monkeypatch.setattr(PrefixSharingGenerator, "generate", ReplayEngine.generate)
    plain = Trainer(tiny_cfg(tmp_path / "p")).fit()
    keys = [k for k in plain.history[0] if k.startswith(("actor/", "reward/", "adv/", "acc/", "response_length/"))]
    assert "actor/loss" in keys and plain.history[0]["actor/grad_norm"] > 0
    for mv, mp in zip(synced.history, plain.history, strict=True):
        assert {k: mv[k] for k in keys} == {k: mp[k] for k in keys}  # bit-identical
