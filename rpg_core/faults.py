"""Named points where a test can kill the training process, to prove that a crash there loses nothing.

``RPG_FAULT=<point>@<step>`` (comma-separated for several) makes the process SIGKILL itself when it reaches
``point`` at ``step``: no clean-up, no ``finally``, no flush, as the kernel's OOM killer or a power cut would.
Unset (always, outside the reliability tests), ``point()`` is one dictionary lookup. The points:

    step_start        before a step's rollout
    eval              in the middle of an evaluation (after the held-out problems were generated)
    after_log         the step's metrics handed to the tracker, before its checkpoint
    checkpoint_write  inside a checkpoint write: the weights written, the loop state and COMPLETE not yet
    after_checkpoint  the checkpoint complete, before the next step
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "point"]

POINTS = ("step_start", "eval", "after_log", "checkpoint_write", "after_checkpoint")
ENV = "RPG_FAULT"


def _armed() -> set[tuple[str, int]]:
    out = set()
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        name, _, step = item.partition("@")
        if name not in POINTS or not step.lstrip("-").isdigit():
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: {item!r} is not <point>@<step>; points: {', '.join(POINTS)}")
        out.add((name, int(step)))
    return out


_ARMED = _armed()


def point(name: str, step: int) -> None:
    """SIGKILL this process if ``RPG_FAULT`` names ``name@step``."""
    if _ARMED and (name, step) in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
