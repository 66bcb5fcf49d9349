"""The trainer on the tiny model: a full run into a real MLflow store, exact resume after a SIGKILL, the NaN guard,
exact gradient accumulation, log-probs consistent with generate, every reference mode and DAPO technique."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import scoring_task
import tiny_run
from rpg_core.config import load_run_config
from rpg_core.objectives import policy_loss
from rpg_core.rollout import HFGenerator, SamplingParams, build_batch, token_logprobs
from rpg_core.trainer import NonFiniteError, Trainer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

TINY = [*tiny_run.TINY, "train.log_samples=2"]


def tiny_cfg(tmp_path: Path, *extra: str, steps: int = 2):
    return load_run_config(
        preset="rpg_reinforce_urkl",
        overrides=[
            *TINY,
            f"train.steps={steps}",
            f"train.output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


def _mlflow_run(cfg, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.tracking.tracking_uri).get_run(run_id)


def test_tiny_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("RPG_HOST", "bench-07")
    cfg = tiny_cfg(tmp_path, "train.eval_every=1", "algorithm.epochs=2", "algorithm.mini_batches=2", "train.device=cpu")
    res = Trainer(cfg).fit()
    assert res.run_dir == tmp_path / "runs" / f"{cfg.key()}-s0" == tmp_path / "runs" / cfg.run_key()
    assert res.step == 2 and len(res.history) == 2
    m = res.history[-1]
    for k in ("reward/mean", "acc/strict", "actor/kl_k3", "actor/ratio_mean", "actor/clipfrac", "actor/entropy",
              "actor/grad_norm", "lr", "perf/tokens_per_s", "time/step", "response_length/mean", "eval/acc_strict"):  # fmt: skip
        assert k in m and math.isfinite(m[k]), k
    assert m["actor/updates"] == 4  # 2 epochs x 2 mini-batches
    # 2 epochs x 2 mini-batches: after the first optimizer step the ratio moves off 1 (pi_old recomputed).
    assert m["actor/ratio_max"] > 1.0 or m["actor/ratio_min"] < 1.0
    ckpt = res.run_dir / "checkpoints" / "step_000002"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "model.pt").exists()
    run = _mlflow_run(cfg, res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config_key"] == cfg.key() and run.data.params["objective.form"] == "reinforce"
    assert run.data.tags["divergence"] == "URKL" and run.data.tags["method"] == "rpg_reinforce_urkl"
    # the group (the config key, shared by the seeds), the machine ($RPG_HOST) and the device it trained on
    assert (run.data.tags["rpg.group"], run.data.tags["config_key"], run.data.tags["seed"]) == (cfg.key(), cfg.key(), "0")
    assert (run.data.tags["rpg.host"], run.data.tags["rpg.gpu"]) == ("bench-07", "cpu")
    assert run.data.tags["rpg.checkpoint_step"] == "2"  # where a resume finds its checkpoint: step 2 on bench-07
    assert run.info.run_name == "rpg_reinforce_urkl-s0"  # RunConfig.design_name(), the seed
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["run_key"], state["config_key"], state["seed"]) == (cfg.run_key(), cfg.key(), 0)
    assert run.data.metrics["acc/strict"] == pytest.approx(m["acc/strict"])
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(res.run_id)}
    assert "config.yaml" in arts and "samples" in arts


def _run_cli(cfg_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "rpg_core.cli", "train", "--config", str(cfg_path), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )  # fmt: skip


def _write(cfg, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


@pytest.mark.system
@pytest.mark.subprocess
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """A run killed with SIGKILL mid-way and restarted with the same command ends with exactly the metrics and the
    weights of an uninterrupted run, in the same MLflow run."""
    steps = 5
    a = tiny_cfg(tmp_path / "a", "train.checkpoint_every=1", "algorithm.epochs=2", steps=steps)
    b = tiny_cfg(tmp_path / "b", "train.checkpoint_every=1", "algorithm.epochs=2", steps=steps)
    assert a.run_key() == b.run_key()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa, pb = _write(a, tmp_path / "a.yaml"), _write(b, tmp_path / "b.yaml")
    # Uninterrupted.
    full = _run_cli(pa)
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out
    # Killed once step 2's checkpoint is complete, then resumed.
    proc = _run_cli(pb)
    marker = Path(b.train.output_dir) / b.run_key() / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run_dir = Path(b.train.output_dir) / b.run_key()
    state = json.loads(sorted((run_dir / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text())
    assert state["step"] < steps, "the kill came too late to test anything"
    killed_run_id = state["run_id"]
    resumed = _run_cli(pb)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed {b.run_key()} " in out
    final = lambda cfg: Path(cfg.train.output_dir) / cfg.run_key() / "checkpoints" / f"step_{steps:06d}"  # noqa: E731
    sa = json.loads((final(a) / "state.json").read_text())
    sb = json.loads((final(b) / "state.json").read_text())
    assert sb["run_id"] == killed_run_id  # the same MLflow run continued
    assert len(sa["history"]) == len(sb["history"]) == steps
    for ha, hb in zip(sa["history"], sb["history"], strict=True):
        for k in ha:
            if k.startswith(("time/", "perf/")):
                continue
            assert ha[k] == hb[k], (ha["step"], k, ha[k], hb[k])
    wa = torch.load(final(a) / "model.pt", weights_only=True)
    wb = torch.load(final(b) / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _mlflow_run(b, killed_run_id).info.status == "FINISHED"


def test_a_checkpoint_of_another_seed_is_refused(tmp_path, monkeypatch):
    """Seed 1 of a config shares seed 0's config key but not its run: a checkpoint of seed 0 copied into seed 1's
    folder is refused, naming both runs, instead of silently continuing seed 0's weights and data order. A resume on
    another machine re-records the machine it now runs on."""
    import shutil

    monkeypatch.setenv("RPG_HOST", "first-host")
    s0 = tiny_cfg(tmp_path, "train.device=cpu", steps=1)
    s1 = s0.with_overrides(["train.seed=1"])
    assert s1.key() == s0.key() and s1.run_key() != s0.run_key()
    res = Trainer(s0).fit()
    shutil.copytree(res.run_dir, Path(s1.train.output_dir) / s1.run_key())
    with pytest.raises(ValueError) as e:
        Trainer(s1)
    msg = str(e.value)
    assert f"belongs to run {s0.run_key()}, not to this run {s1.run_key()}" in msg and "--fresh" in msg
    # seed 0 itself resumes from it (a finished run: nothing left to train) and records its new machine
    monkeypatch.setenv("RPG_HOST", "second-host")
    again = Trainer(s0)
    assert again.step == 1 and again.run_id == res.run_id
    again.fit()
    tags = _mlflow_run(s0, res.run_id).data.tags
    assert (tags["rpg.host"], tags["rpg.resumes"], tags["rpg.group"]) == ("second-host", "1", s0.key())


@pytest.mark.unit
def test_device_label(monkeypatch):
    from rpg_core.trainer import device_label

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"NVIDIA H200 #{i}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_label("cpu") == device_label(torch.device("cpu")) == "cpu"
    assert (device_label("cuda:1"), device_label("cuda")) == ("cuda:1 NVIDIA H200 #1", "cuda:0 NVIDIA H200 #0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a GPU pool's pick: the machine's index, not the process's
    assert (device_label("cuda:0"), device_label("cuda:1")) == ("cuda:3 NVIDIA H200 #0", "cuda:5 NVIDIA H200 #1")


class _PoisonedLoss(Trainer):
    """Makes the loss the update backpropagates NaN from the given step on (the guard itself is under test, not the
    poisoning)."""

    poison_at = 2

    def train_step(self):
        from unittest import mock

        from rpg_core import update

        def nan_loss(*args, **kw):
            out = policy_loss(*args, **kw)
            return dataclasses.replace(out, loss=out.loss * float("nan"))

        with mock.patch.object(update, "policy_loss", nan_loss if self.step + 1 >= self.poison_at else policy_loss):
            return super().train_step()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.checkpoint_every=1", steps=4)
    tr = _PoisonedLoss(cfg)
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        tr.fit()
    ckpts = sorted(p.name for p in (tr.ckpt_dir).glob("step_*"))
    assert ckpts == ["step_000001"]
    run = _mlflow_run(cfg, tr.run_id)
    assert run.info.status == "FAILED" and "loss is nan" in run.data.tags["error"]


def test_nan_gradient_stops(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.checkpoint_every=1", steps=2)
    tr = Trainer(cfg)
    p = next(tr.model.parameters())
    p.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    # inf times the gradient's zero entries (embedding rows of tokens not in the batch) is nan: the norm is nan.
    with pytest.raises(NonFiniteError, match="step 0: the gradient norm is nan"):
        tr.fit()
    # The guard stops before the optimizer step of step 0: no step is recorded, no weight moved (AdamW's weight
    # decay alone would have changed every matrix), nothing was saved, the MLflow run is marked FAILED.
    assert tr.step == 0 and tr.history == []
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert not tr.ckpt_dir.exists()
    run = _mlflow_run(cfg, tr.run_id)
    assert run.info.status == "FAILED" and "gradient norm is nan" in run.data.tags["error"]


class _ParityReward(Trainer):
    """A random tiny model never answers right; reward the parity of the response's token-id sum instead, so the
    advantages are non-zero and the gradient has something to check."""

    def _rollout(self):
        from rpg_core.rewards import Score

        ro = super()._rollout()
        scores = [Score(1.0, True, "") if sum(r) % 2 else Score(-1.0, False, "") for r in ro.responses]
        return dataclasses.replace(ro, scores=scores)


def test_micro_batch_accumulation_is_exact(tmp_path):
    """The accumulated gradient is the mini-batch loss's gradient whatever the micro-batch size (token-mean and
    seq-mean-token-mean normalise by the mini-batch's totals, not per micro-batch)."""
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        norms = []
        for mbs in (1, 3, 8):
            cfg = tiny_cfg(tmp_path / f"{agg}{mbs}", f"algorithm.micro_batch_size={mbs}", f"objective.agg={agg}",
                           "tracking.enabled=false", steps=1)  # fmt: skip
            norms.append(_ParityReward(cfg).fit().history[0]["actor/grad_norm"])
        assert norms[0] > 0
        assert norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[2] == pytest.approx(norms[0], rel=1e-4), agg


def _scoring_cfg(tmp_path: Path, *extra: str, steps: int = 2):
    """tiny_cfg on the task where the random tiny model scores now and then (tests/scoring_task.py): 2 prompts x 8
    samples, so some groups have mixed rewards and the advantages are non-zero."""
    source = scoring_task.write_zero_task(tmp_path / "data")
    return tiny_cfg(tmp_path, *scoring_task.overrides(source), "rollout.n=8", "algorithm.micro_batch_size=8",
                    "tracking.enabled=false", *extra, steps=steps)  # fmt: skip


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


DESIGN_POINTS = {
    "fixed-ref": ["algorithm.reference=fixed", "objective.beta=0.1", "algorithm.epochs=2"],
    "lagged-ref": ["algorithm.ref_refresh_every=2", "objective.beta=0.1"],
    "kl-in-reward": ["objective.form=reward", "objective.beta=0.1", "algorithm.advantage=reinforce_pp"],
    "grpo-overlong": ["objective.form=penalty", "objective.estimator=k3", "algorithm.advantage=grpo",
                      "reward.overlong_shaping=true"],
    "dynamic-sampling": ["reward.dynamic_sampling=true", "reward.max_gen_rounds=3"],
    "bf16": ["model.precision=bf16"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(DESIGN_POINTS))
def test_design_points_update(tmp_path, name):
    """Each design point on the scoring task: it trains on non-zero advantages, makes the optimizer steps it
    should, and its reference / KL / reward behave as the design point says."""
    extra = DESIGN_POINTS[name]
    cfg = _scoring_cfg(tmp_path, *extra)
    tr = Trainer(cfg)
    assert (tr.ref_model is not None) == (name in ("fixed-ref", "lagged-ref"))
    hist = tr.fit().history
    assert len(hist) == 2
    for m in hist:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["actor/updates"] == cfg.algorithm.epochs * cfg.algorithm.mini_batches
        assert m["response_length/mean"] == 8  # the random model never emits EOS in 8 tokens
    # Some group has mixed rewards, so the policy-gradient term is non-zero: a non-zero advantage and gradient.
    assert any(m["reward/std"] > 0 and m["adv/abs_mean"] > 0 and m["actor/grad_norm"] > 0 for m in hist), hist
    single = cfg.algorithm.epochs * cfg.algorithm.mini_batches == 1
    for m in hist:
        if single:  # the update runs at theta = theta_old: w = 1 exactly (spec §5)
            assert m["actor/ratio_max"] == m["actor/ratio_min"] == 1.0
        if not cfg.reward.overlong_shaping:  # reward = +1 / -1
            assert m["reward/mean"] == pytest.approx(2 * m["acc/strict"] - 1, abs=1e-6)
    if name == "fixed-ref":
        # The second epoch runs at theta != theta_old, and pi_ref stays the initial model: KL > 0 from step 1.
        assert hist[0]["actor/ratio_max"] > 1.0 or hist[0]["actor/ratio_min"] < 1.0
        assert hist[0]["actor/kl_k3"] > 0 and hist[1]["actor/kl_k3"] > hist[0]["actor/kl_k3"]
    elif name == "lagged-ref":
        # Step 1: pi_ref = the initial model = pi_theta, so the KL is 0; it is refreshed only after step 2, so at
        # step 2 pi_theta (moved by step 1's update) differs from it.
        assert hist[0]["actor/kl_k3"] == pytest.approx(0, abs=1e-7) and hist[1]["actor/kl_k3"] > 1e-4
    elif name == "kl-in-reward":
        # REINFORCE++ whitens the returns over the batch's valid tokens: mean 0 (the one update sees the batch).
        # The in-reward KL itself is 0 here (iterative reference refreshed every step: pi_ref = pi_old); this
        # point checks the token-level reward path, not the KL's size.
        for m in hist:
            assert m["actor/adv_mean"] == pytest.approx(0, abs=1e-6)
            assert "actor/kl_loss" not in m  # the KL went into the reward, not the loss
    elif name == "grpo-overlong":
        # Every response has max_new_tokens = 8 tokens: DAPO's penalty is -(8 - (8 - 2)) / 2 * 1.0 = -1 on each
        # (buffer 8 // 4 = 2), so reward = (+1 | -1) - 1.
        for m in hist:
            assert m["reward/mean"] == pytest.approx(2 * m["acc/strict"] - 2, abs=1e-6)
    elif name == "dynamic-sampling":
        # Only groups with mixed accuracy are trained on.
        for m in hist:
            assert m["ds/kept_groups"] >= 1 and m["ds/groups_mixed"] > 0 and m["reward/std"] > 0


def test_dynamic_sampling_without_a_mixed_group_does_not_update(tmp_path):
    """On the arithmetic task the random model gets every answer wrong: no group is mixed, none is kept after
    max_gen_rounds rounds, and the step makes no optimizer step at all (not even AdamW's weight decay)."""
    cfg = tiny_cfg(tmp_path, "tracking.enabled=false", "reward.dynamic_sampling=true", "reward.max_gen_rounds=2")
    tr = Trainer(cfg)
    before = _weights(tr)
    hist = tr.fit().history
    assert len(hist) == 2
    for m in hist:
        assert m["ds/kept_groups"] == 0 and m["ds/rounds"] == 2 and m["ds/groups_mixed"] == 0
        assert m["acc/sampled"] == 0
        assert not any(k.startswith("actor/") for k in m), m
    after = _weights(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_logprobs_match_generate(tokenizer, tiny_model_factory):
    """Recomputed log-probs (left-padded prompts, right-padded responses, positions from the mask) equal the
    log-softmax of the logits generate() sampled from."""
    model = tiny_model_factory(0).double()
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Hi")["input_ids"]]
    gen = HFGenerator(model, tokenizer, batch_size=8)
    torch.manual_seed(0)
    out = gen.generate(prompts, SamplingParams(n=2, max_new_tokens=6))
    responses = [r for group in out for r in group]
    batch = build_batch([prompts[i // 2] for i in range(4)], responses, [0, 0, 1, 1], tokenizer.pad_token_id)
    logp, ent = token_logprobs(model, batch, with_entropy=True)
    # Reference: one unpadded forward pass per sequence.
    for i, r in enumerate(responses):
        ids = torch.tensor([prompts[i // 2] + r])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[i // 2]) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, : len(r)], ref, atol=1e-9), i
        assert torch.all(logp[i, len(r) :] == 0)
    assert torch.all(ent[batch.response_mask] > 0)


@pytest.mark.subprocess
def test_cli_rejects_bad_config_before_compute(tmp_path):
    env = {**os.environ}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "rpg_core.cli", "train", "--preset", "rpg_reinforce_urkl", "--set", "optim.lrr=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "weight_decay" in r.stderr
    assert time.perf_counter() - t0 < 60
    r = subprocess.run(
        [sys.executable, "-m", "rpg_core.cli", "train", "--preset", "grpo", "--model", "tiny", "--print-config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["model"]["name"] == "tiny" and printed["algorithm"]["advantage"] == "grpo"


def test_shared_prefix_logprobs_and_gradients_are_exact(tokenizer, tiny_model_factory):
    """One prompt pass shared by its group gives the plain pass's log-probs and parameter gradients."""
    model = tiny_model_factory(1).double()
    prompts = [tokenizer("What is 12 + 30?")["input_ids"], tokenizer("Compute 7 times 8, please")["input_ids"]]
    responses = [[11, 12, 13, 2], [14, 15], [16, 17, 18, 19, 20], [21]]
    batch = build_batch([prompts[i // 2] for i in range(4)], responses, [5, 5, 9, 9], tokenizer.pad_token_id)
    weights = torch.randn(batch.response_mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for shared in (False, True):
        model.zero_grad()
        logp, _ = token_logprobs(model, batch, shared_prefix=shared)
        (logp * weights).sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp0, g0), (lp1, g1) = grads
    assert torch.allclose(lp0, lp1, atol=1e-10)
    # float64 model; some kernels (softmax in attention, RoPE tables) keep float32 internals, hence 1e-6 relative.
    for a, b in zip(g0, g1, strict=True):
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()) + 1e-12
    assert sum(float(g.abs().sum()) for g in g0) > 0


@pytest.mark.embedded
def test_embedded_default_one_step(tmp_path, embedded_default_dir):
    """The embedded default SmolLM2-135M end to end: the one-shot paper prompt makes it write "Answer:" lines."""
    cfg = load_run_config(
        "configs/demo_add2_urkl.yaml" if (ROOT / "configs/demo_add2_urkl.yaml").exists() else None,
        overrides=[
            "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=24", "reward.dynamic_sampling=false",
            "train.steps=1", "train.eval_every=0", f"train.output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )  # fmt: skip
    assert cfg.model.name == "smollm2-135m"
    res = Trainer(cfg).fit()
    m = res.history[0]
    assert m["acc/format"] > 0  # at least one of 8 samples writes the paper's Answer line
    # One update with the reference refreshed every step: w = r = 1, so the KL term's gradient vanishes and the
    # gradient is non-zero exactly when some advantage is (a group with mixed rewards).
    assert m["actor/ratio_max"] == m["actor/ratio_min"] == 1.0 and m["actor/updates"] == 1
    assert (m["actor/grad_norm"] > 0) == (m["adv/abs_mean"] > 0) == (m["reward/std"] > 0)
    assert _mlflow_run(cfg, res.run_id).info.status == "FINISHED"


def test_prefix_sharing_generator_matches_hf_greedy(tokenizer, tiny_model_factory):
    """Greedy decoding from one shared prompt prefill (rows dropped at EOS) gives HF generate's tokens."""
    from rpg_core.rollout import PrefixSharingGenerator

    model = tiny_model_factory(3).double()
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Hi")["input_ids"], tokenizer("a b c d e f")["input_ids"]]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    ours = PrefixSharingGenerator(model, tokenizer, batch_size=4).generate(prompts, params)
    hf = HFGenerator(model, tokenizer, batch_size=4).generate(prompts, params)
    assert ours == hf
    assert [len(g) for g in ours] == [2, 2, 2]


@pytest.mark.unit
def test_sample_next_follows_softmax_topk_topp():
    from rpg_core.rollout import sample_next

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    counts = torch.bincount(sample_next(logits, SamplingParams(temperature=1.0)), minlength=4).float() / 40000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)  # ~4 sigma
    # temperature 2: p ~ sqrt(p), renormalised
    t2 = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    counts = torch.bincount(sample_next(logits, SamplingParams(temperature=2.0)), minlength=4).float() / 40000
    assert torch.allclose(counts, t2 / t2.sum(), atol=0.01)
    # top-k 2: only the two most likely, renormalised 0.5:0.3
    counts = torch.bincount(sample_next(logits, SamplingParams(top_k=2)), minlength=4).float() / 40000
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 0.625) < 0.01
    # top-p 0.8: the smallest prefix reaching 0.8 is {0.5, 0.3}; top-p 0.81 adds 0.15
    assert set(sample_next(logits, SamplingParams(top_p=0.8)).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingParams(top_p=0.81)).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, SamplingParams(temperature=0)).tolist()) == {0}


def test_run_nests_under_a_parent_run_with_extra_tags(tmp_path):
    """tracking.parent_run_id / tracking.tags (what a sweep sets): the run is an MLflow child of the parent, carries
    the tags, and its config key is unchanged (tracking is bookkeeping)."""
    from mlflow.tracking import MlflowClient

    from rpg_core.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(ensure_experiment(uri, "rpg"), run_name="sweep-parent").info.run_id
    cfg = tiny_cfg(tmp_path, f"tracking.parent_run_id={parent}", "tracking.tags={sweep: smoke}", steps=1)
    assert cfg.key() == tiny_cfg(tmp_path, steps=1).key()
    res = Trainer(cfg).fit()
    tags = _mlflow_run(cfg, res.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["sweep"] == "smoke"
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in children] == [res.run_id]
