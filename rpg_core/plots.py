"""Curves of a training run, read from its MLflow run (the system of record): ``rpg plot RUN_DIR_OR_ID``."""

from __future__ import annotations

from pathlib import Path

from rpg_core import checkpoints

__all__ = ["plot_run", "resolve_run_id"]

CURVES = (
    ("eval/acc_strict", "held-out accuracy, paper Answer rule (1 sample/problem)", "-o"),
    ("eval/acc_lenient", "held-out accuracy, lenient (last integer)", "--o"),
    ("acc/sampled", "training samples, paper rule (all groups drawn)", ":s"),
)


def resolve_run_id(run: str) -> str:
    """A run directory (its newest checkpoint records the MLflow run id) or a run id."""
    p = Path(run)
    if p.is_dir():
        ckpt = checkpoints.latest_good(p, checksums=False)[0]
        if ckpt is None:
            raise ValueError(f"{run}: no complete checkpoint under {p / checkpoints.FOLDER}")
        return checkpoints.read_state(ckpt)["run_id"]
    return run


def plot_run(run: str, out: str | Path, *, tracking_uri: str | None = None, title: str | None = None) -> dict:
    """Plot the accuracy curves of ``run`` into ``out`` (PNG); returns {metric: [(step, value), ...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rpg_core.runs import get_run, histories

    run_id = resolve_run_id(run)
    info = get_run(run_id, tracking_uri=tracking_uri)
    if info is None:
        raise ValueError(f"{run}: no MLflow run {run_id} in {tracking_uri or 'the default store'}")
    points = histories([run_id], [key for key, _, _ in CURVES], tracking_uri=tracking_uri)
    curves = {}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label, style in CURVES:
        h = points[points["key"] == key]
        hist = sorted(zip(h["step"].tolist(), h["value"].tolist(), strict=True))
        if hist:
            curves[key] = hist
            ax.plot([s for s, _ in hist], [v for _, v in hist], style, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    axes = {a: "" if info.isna()[a] else info[a] for a in ("method", "model", "task")}
    ax.set_title(title or f"{axes['method']} on {axes['model']}, {axes['task']}", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return curves
