"""A real MLflow store for the dashboard tests: the tiny model trained in this process, RPG-REINFORCE with forward
and reverse KL, three seeds each (6 runs of 2 steps, held-out evaluation at steps 0 and 2), children of a sweep's
parent run as the sweep flow makes them. About 1 to 2 minutes on 2 busy cores."""

from __future__ import annotations

from pathlib import Path

from rpg_core.config import load_run_config
from rpg_core.tracking import RunKind, Tracker

SWEEP = "dash"
SEEDS = (0, 1, 2)
DIRECTIONS = ("forward", "reverse")
TINY = [
    "model.name=tiny", "data.level=add1", "data.n_train=64", "data.n_eval=6", "rollout.prompts_per_step=2",
    "rollout.n=4", "rollout.max_new_tokens=8", "algorithm.micro_batch_size=4", "algorithm.mini_batches=2",
    "algorithm.reference=fixed", "objective.beta=0.1", "optim.lr=1e-3", "optim.warmup_steps=0", "train.log_samples=0",
    "reward.dynamic_sampling=false", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
]  # fmt: skip


def make_store(folder: Path) -> tuple[str, dict[str, str]]:
    """Train the runs into ``folder``/mlflow.db; returns the tracking URI and ``{"<direction>-s<seed>": run_id,
    "parent": run_id}``."""
    from rpg_core.trainer import Trainer

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    ids: dict[str, str] = {}
    parent = Tracker(run_name=f"sweep-{SWEEP}", tracking_uri=uri, kind=RunKind.SWEEP, tags={"sweep": SWEEP})
    ids["parent"] = parent.run_id
    for seed in SEEDS:
        for d in DIRECTIONS:
            cfg = load_run_config(preset="rpg_reinforce_urkl", overrides=[
                *TINY, f"objective.direction={d}", f"train.seed={seed}", f"train.output_dir={folder / 'runs'}",
                f"tracking.tracking_uri={uri}", f"tracking.parent_run_id={parent.run_id}",
            ])  # fmt: skip
            cfg = cfg.with_overrides({"tracking": {"tags": {"sweep": SWEEP}}})
            tr = Trainer(cfg)
            tr.fit()
            ids[f"{d}-s{seed}"] = tr.run_id
    parent.log_metrics({"runs_finished": float(len(SEEDS) * len(DIRECTIONS))})
    parent.finish()
    return uri, ids


_SHARED: dict[str, tuple[str, dict[str, str], Path]] = {}


def shared_store(tmp_path_factory) -> tuple[str, dict[str, str], Path]:
    """``(tracking_uri, ids, folder)`` of one store per test process, shared by every dashboard test module (it takes
    a minute or two to train). Tests must not write into it (copy the folder first)."""
    if "store" not in _SHARED:
        folder = tmp_path_factory.mktemp("dashstore")
        _SHARED["store"] = (*make_store(folder), folder)
    return _SHARED["store"]
