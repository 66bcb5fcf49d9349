"""What the Prefect flows orchestrate, without Prefect: which runs already finished (by config key, in MLflow), a
pool of GPUs handed out one per training process, and one training run as its own process.

Every training run is a separate ``rpg train --config FILE`` process: GPU memory is isolated, a crash takes down only
its run, and ``CUDA_VISIBLE_DEVICES`` pins it to the GPU it was given. Re-running a config resumes from its last
checkpoint into the same MLflow run (the trainer's resume), so a retry or a re-run completes only what is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from rpg_core.config import RunConfig
from rpg_core.config import run_key as run_key_of
from rpg_core.runs import RunStatus, find_runs
from rpg_core.tracking import PRUNED_EXIT, RunKind

__all__ = ["GpuPool", "TrainOutcome", "finished_runs", "gpus_of", "host_slug", "run_training", "stop_all"]


def finished_runs(tracking_uri: str, experiment: str) -> dict[str, str]:
    """run key (config key and seed, ``RunConfig.run_key()``) -> run id of the newest FINISHED training run of each in
    ``experiment`` (none if it does not exist yet): a sweep dedupes by key and seed."""
    done = find_runs(kind=RunKind.TRAIN, experiments=experiment, status=RunStatus.FINISHED, tracking_uri=tracking_uri)
    done = done[done["config_key"].notna() & done["seed"].notna()]
    keys = [run_key_of(k, int(s)) for k, s in zip(done["config_key"], done["seed"], strict=True)]
    return dict(zip(keys[::-1], done["run_id"][::-1], strict=True))  # newest first: the newest wins


def host_slug(host: str) -> str:
    """A machine's name as Prefect names take it (its GPU limit ``rpg-gpu-<slug>``, its queue ``gpu-<slug>``); the same
    rule as infra/team/worker.sh's."""
    return re.sub(r"[^a-z0-9-]+", "-", host.lower()).strip("-") or "host"


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


def local_devices(gpus: str, concurrency: int | None) -> tuple[list[str], int]:
    """This machine's devices for ``gpus`` and the runs at once: ``concurrency``, else one per device (1 on CPU).
    More runs at once than devices is refused before any compute (the extra ones would only wait for a device)."""
    devices = gpus_of(gpus)
    concurrency = concurrency or max(1, len(devices))
    if devices and concurrency > len(devices):
        raise ValueError(f"concurrency={concurrency} exceeds the {len(devices)} GPUs in gpus={','.join(devices)!r}; "
                         f"allowed: 1..{len(devices)}")  # fmt: skip
    return devices, concurrency


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
    key: str  # the run key (RunConfig.run_key(): config key and seed)
    returncode: int
    run_id: str | None  # the MLflow run (from the run's checkpoint state)
    step: int  # the last checkpointed step
    seconds: float
    log: Path
    gpu: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def pruned(self) -> bool:
        """Stopped on a coordinator's request (``rpg_core.tracking.request_stop``, a tuner's pruning): neither done
        (``ok`` is False) nor failed, and not to be retried (a retry would resume and train on)."""
        return self.returncode == PRUNED_EXIT


def _checkpoint_state(cfg: RunConfig, cwd: Path) -> dict:
    from rpg_core import checkpoints

    ckpt = checkpoints.latest_good(cwd / cfg.train.output_dir / cfg.run_key(), checksums=False)[0]
    return checkpoints.read_state(ckpt) if ckpt is not None else {}


# -- the training processes of this process: stopped together on a cancel -----------------------------------------

STOP_GRACE_S = 20.0  # SIGINT, then this long for the trainer to end its MLflow run as KILLED, then SIGKILL
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when the thread that started it dies (Linux
    ``PR_SET_PDEATHSIG``): a SIGKILLed coordinator leaves no training process behind. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent: the child only calls it

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1

    return preexec


_PREEXEC = _die_with_parent()


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT (the trainer ends its run KILLED, its last checkpoint stays), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def stop_all(grace_s: float = STOP_GRACE_S) -> int:
    """Stop every training process this process started and that is still running (a cancelled sweep); returns
    how many were running."""
    with _LIVE_LOCK:
        live = [p for p in _LIVE if p.poll() is None]
    threads = [threading.Thread(target=_stop, args=(p, grace_s)) for p in live]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(live)


def run_training(cfg: RunConfig, *, workdir: str | Path, gpu: str = "", fresh: bool = False,
                 timeout_s: float | None = None, cwd: str | Path | None = None,
                 on_progress: Callable[[str], None] | None = None) -> TrainOutcome:  # fmt: skip
    """``rpg train --config <workdir>/configs/<run key>.yaml`` in its own process, output to
    ``<workdir>/logs/<run key>.log`` (appended, so retries and resumes keep one history), ``CUDA_VISIBLE_DEVICES=gpu``.
    An exception in the waiting thread (a cancel: Prefect's TerminationSignal, KeyboardInterrupt) stops the process
    gracefully before it propagates; a SIGKILLed caller takes the process with it (``PR_SET_PDEATHSIG``).
    ``on_progress`` gets each progress line the run prints while it trains (``step 3/8 | reward +0.250 | acc ...``,
    resumes, the end): the flows send them to the Prefect run's log."""
    workdir = Path(workdir)
    key = cfg.run_key()
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    path = workdir / "configs" / f"{key}.yaml"
    path.write_text(cfg.to_yaml())
    log = workdir / "logs" / f"{key}.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rpg_core.cli", "train", "--config", str(path), *(["--fresh"] if fresh else [])]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} t={time.time():.3f} {' '.join(cmd)} "
                f"(CUDA_VISIBLE_DEVICES={gpu!r})\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=_PREEXEC)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        tail = _ProgressTail(log, on_progress)
        try:
            rc = _wait(proc, timeout_s, tail)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = -9
            f.write(f"=== stopped after {timeout_s} s\n")
        except BaseException:  # cancelled: stop the run (it keeps its last checkpoint), then let the cancel go on
            _stop(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
            tail.poll()
            f.write(f"=== end t={time.time():.3f} rc={proc.returncode}\n")
    state = _checkpoint_state(cfg, Path(cwd) if cwd else Path.cwd())
    return TrainOutcome(key, rc, state.get("run_id"), int(state.get("step", 0)), time.perf_counter() - t0, log, gpu)


# What a run prints that says how it is doing (rpg_core/trainer.py: one line per step, a resume, the end); tqdm's bar
# redraws (carriage returns) are not.
PROGRESS_LINE = re.compile(r"^(step \d+/\d+( \|.*)?|resumed .*|done: .*|stopped .*)$")


class _ProgressTail:
    """Follows a run's log from where it is now and hands each new progress line to ``on_progress`` (none: a no-op)."""

    def __init__(self, log: Path, on_progress: Callable[[str], None] | None):
        self.log, self.on_progress = log, on_progress
        self.offset = log.stat().st_size if log.exists() else 0
        self.partial = ""

    def poll(self) -> None:
        if self.on_progress is None:
            return
        with self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        text = self.partial + chunk.decode("utf-8", errors="replace")
        *pieces, self.partial = re.split(r"[\r\n]", text)
        for piece in pieces:
            line = piece.strip()
            if PROGRESS_LINE.match(line):
                with contextlib.suppress(Exception):  # a logging hiccup never stops a run
                    self.on_progress(line)


def _wait(proc: subprocess.Popen, timeout_s: float | None, tail: _ProgressTail, poll_s: float = 1.0) -> int:
    """``proc.wait(timeout_s)``, passing its progress lines on every ``poll_s`` meanwhile."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            tail.poll()
            if deadline is not None and time.monotonic() >= deadline:
                raise
