"""What the Prefect flows orchestrate, without Prefect: which runs already finished (by config key, in MLflow), a
pool of GPUs handed out one per training process, and one training run as its own process.

Every training run is a separate ``rpg train --config FILE`` process: GPU memory is isolated, a crash takes down only
its run, and ``CUDA_VISIBLE_DEVICES`` pins it to the GPU it was given. Re-running a config resumes from its last
checkpoint into the same MLflow run (the trainer's resume), so a retry or a re-run completes only what is missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from rpg_core.config import RunConfig
from rpg_core.runs import RunStatus, find_runs
from rpg_core.tracking import RunKind

__all__ = ["GpuPool", "TrainOutcome", "finished_runs", "gpus_of", "run_training"]


def finished_runs(tracking_uri: str, experiment: str) -> dict[str, str]:
    """config key -> run id of the newest FINISHED training run of each key in ``experiment`` (none if it does not
    exist yet)."""
    done = find_runs(kind=RunKind.TRAIN, experiments=experiment, status=RunStatus.FINISHED, tracking_uri=tracking_uri)
    done = done[done["config_key"].notna()]
    return dict(zip(done["config_key"][::-1], done["run_id"][::-1], strict=True))  # newest first: the newest wins


def gpus_of(spec: str) -> list[str]:
    """The devices a flow's ``gpus`` field names: ``"0,1"`` those; ``"cpu"`` none (CPU); ``""`` this machine's, from
    ``$RPG_GPUS`` (infra/team/worker.sh sets it from ``nvidia-smi`` for the flow runs it starts), none if unset.
    A sweep pressed in the UI of a team's server does not know which machine will run it: "" means "its GPUs"."""
    spec = spec.strip()
    if spec.lower() == "cpu":
        return []
    field = "gpus"
    if not spec:
        field, spec = "RPG_GPUS", os.environ.get("RPG_GPUS", "")
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    bad = [d for d in devices if not d.isdigit()]
    if bad:
        raise ValueError(f"{field}={spec!r}: {bad[0]!r} is not a CUDA device index; allowed: 'cpu', '', e.g. '0,1,2,3'")
    return devices


class GpuPool:
    """Hands out one device per training process. ``devices`` are CUDA ids ("0", "1", ...); an empty list means CPU
    (``acquire`` yields ""). Exclusive across threads and processes through one lock file per device in
    ``lock_dir``, so several sweeps on one machine never share a GPU."""

    def __init__(self, devices: Sequence[str], lock_dir: str | Path):
        self.devices = [str(d).strip() for d in devices if str(d).strip()]
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"gpus: {list(devices)} lists a device twice")
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.Lock()
        self._held: set[str] = set()

    @classmethod
    def parse(cls, spec: str, lock_dir: str | Path) -> GpuPool:
        """``"0,1,2,3"`` -> four GPUs; ``""`` -> this machine's (``$RPG_GPUS``); ``"cpu"`` -> CPU (see ``gpus_of``)."""
        return cls(gpus_of(spec), lock_dir)

    @contextlib.contextmanager
    def acquire(self, poll_s: float = 0.2, timeout_s: float | None = None) -> Iterator[str]:
        if not self.devices:
            yield ""
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for dev in self.devices:
                with self._local:
                    if dev in self._held:
                        continue
                    lock = FileLock(str(self.lock_dir / f"gpu-{dev}.lock"))
                    try:
                        lock.acquire(timeout=0)
                    except Timeout:
                        continue
                    self._held.add(dev)
                try:
                    yield dev
                finally:
                    lock.release()
                    with self._local:
                        self._held.discard(dev)
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no free GPU among {self.devices} within {timeout_s} s")
            time.sleep(poll_s)


@dataclass(frozen=True)
class TrainOutcome:
    key: str
    returncode: int
    run_id: str | None  # the MLflow run (from the run's checkpoint state)
    step: int  # the last checkpointed step
    seconds: float
    log: Path
    gpu: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _checkpoint_state(cfg: RunConfig, cwd: Path) -> dict:
    from rpg_core import checkpoints

    ckpt = checkpoints.latest(cwd / cfg.train.output_dir / cfg.key())
    return checkpoints.read_state(ckpt) if ckpt is not None else {}


def run_training(cfg: RunConfig, *, workdir: str | Path, gpu: str = "", fresh: bool = False,
                 timeout_s: float | None = None, cwd: str | Path | None = None) -> TrainOutcome:  # fmt: skip
    """``rpg train --config <workdir>/configs/<key>.yaml`` in its own process, output to
    ``<workdir>/logs/<key>.log`` (appended, so retries and resumes keep one history), ``CUDA_VISIBLE_DEVICES=gpu``."""
    workdir = Path(workdir)
    key = cfg.key()
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    path = workdir / "configs" / f"{key}.yaml"
    path.write_text(cfg.to_yaml())
    log = workdir / "logs" / f"{key}.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rpg_core.cli", "train", "--config", str(path), *(["--fresh"] if fresh else [])]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)} (CUDA_VISIBLE_DEVICES={gpu!r})\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -9
            f.write(f"=== killed after {timeout_s} s\n")
    state = _checkpoint_state(cfg, Path(cwd) if cwd else Path.cwd())
    return TrainOutcome(key, rc, state.get("run_id"), int(state.get("step", 0)), time.perf_counter() - t0, log, gpu)
