"""The checkpoint layout, in one place: write (atomically), list, find the latest complete one, read, prune.

    <run_dir>/config.yaml                    the run's config (rewritten at every save)
    <run_dir>/checkpoints/step_NNNNNN/       one checkpoint per saved step (6-digit, zero-padded)
        model.pt                             the policy's state dict
        optimizer.pt                         the optimizer's state dict
        ref_model.pt                         the lagged reference's state dict (iterative reference only)
        state.json                           the loop state (step, cursor, run_id, run_key, history, ...)
        config.yaml                          the run's config
        COMPLETE                             written last: a folder without it is not a checkpoint

A checkpoint is written into ``.tmp_step_NNNNNN`` and moved into place with ``os.replace``, so a run killed at
any moment leaves either the previous checkpoints or the new complete one (the trainer resumes from the latest).
Reading the layout and the loop state needs no torch (flows and plots may use it); only the tensors do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG",
    "FOLDER",
    "MARKER",
    "MODEL",
    "OPTIMIZER",
    "REFERENCE",
    "STATE",
    "checkpoint_dir",
    "complete",
    "is_checkpoint",
    "latest",
    "load_tensors",
    "read_config",
    "read_state",
    "rng_from_json",
    "rng_to_json",
    "write",
]

FOLDER = "checkpoints"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
REFERENCE = "ref_model.pt"
STATE = "state.json"
CONFIG = "config.yaml"
MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step_NNNNNN``."""
    return Path(run_dir) / FOLDER / f"step_{step:06d}"


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those with the ``COMPLETE`` marker), oldest first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / MARKER).exists())


def latest(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, or None."""
    ckpts = complete(run_dir)
    return ckpts[-1] if ckpts else None


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder itself (it holds the loop state and the weights)."""
    return (Path(path) / STATE).is_file() and (Path(path) / MODEL).is_file()


def write(
    run_dir: Path,
    step: int,
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    reference: dict[str, Any] | None,
    state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep`` complete ones."""
    import torch

    path = checkpoint_dir(run_dir, step)
    tmp = path.parent / f".tmp_{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model, tmp / MODEL)
    torch.save(optimizer, tmp / OPTIMIZER)
    if reference is not None:
        torch.save(reference, tmp / REFERENCE)
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    (tmp / CONFIG).write_text(config_yaml)
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    (Path(run_dir) / CONFIG).write_text(config_yaml)
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The loop state (``state.json``) of the checkpoint at ``path``."""
    return json.loads((Path(path) / STATE).read_text())


def read_config(path: Path):
    """The ``RunConfig`` the checkpoint at ``path`` was trained with."""
    import yaml

    from rpg_core.config import RunConfig

    return RunConfig.from_dict(yaml.safe_load((Path(path) / CONFIG).read_text()))


def load_tensors(path: Path, name: str, map_location: Any = "cpu") -> dict[str, Any] | None:
    """A state dict of the checkpoint at ``path`` (``MODEL``, ``OPTIMIZER`` or ``REFERENCE``); None if absent."""
    import torch

    f = Path(path) / name
    return torch.load(f, map_location=map_location, weights_only=True) if f.exists() else None


def rng_to_json(state: Any) -> Any:
    """Python's ``random.getstate()`` as JSON (tuples become lists)."""
    return [state[0], list(state[1]), state[2]]


def rng_from_json(state: Any) -> Any:
    return (state[0], tuple(state[1]), state[2])
