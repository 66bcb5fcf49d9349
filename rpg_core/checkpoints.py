"""The checkpoint layout, in one place: write (atomically), list, find the latest complete one, read, prune.

    <run_dir>/config.yaml                    the run's config (rewritten at every save)
    <run_dir>/LOCK                           held (an OS file lock) by the one process training the run: "<pid> <host>"
    <run_dir>/MLFLOW_RUN                     the run's MLflow run id, written when the run is created: an attempt
                                             killed before its first checkpoint is resumed in the same MLflow run
    <run_dir>/checkpoints/step_NNNNNN/       one checkpoint per saved step (6-digit, zero-padded)
        model.pt                             the policy's state dict
        optimizer.pt                         the optimizer's state dict
        ref_model.pt                         the lagged reference's state dict (iterative reference only)
        state.json                           the loop state (step, cursor, run_id, run_key, history, ...)
        config.yaml                          the run's config
        COMPLETE                             written last: a folder without it is not a checkpoint. It holds the
                                             manifest, JSON: {"format": 1, "files": {name: {"bytes", "sha256"}}}
                                             for every other file (checkpoints written before it existed: "ok")

A checkpoint is written into ``.tmp_step_NNNNNN`` and moved into place with ``os.replace``, so a run killed at
any moment leaves either the previous checkpoints or the new complete one. What a crash of the machine or a
disk can still do (a file cut short or emptied behind a ``COMPLETE`` that reached the disk first, a copy cut
short), ``verify`` finds: it checks every file against the manifest (present, its size, its sha256) and that
``state.json`` and ``config.yaml`` parse. ``good_first`` walks the checkpoints newest first with the verdict on
each; the trainer resumes from the newest good one and says which newer ones it skipped and why. A checkpoint
written before manifests existed is verified as far as it can be: its files are present, ``state.json`` and
``config.yaml`` parse, and each ``.pt`` file is a whole zip archive (torch's format ends with its directory, so
a file cut short is caught); sizes and checksums it never recorded cannot be checked.
Reading the layout, the loop state and verifying need no torch (flows and plots may use them); only the tensors do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rpg_core import faults

__all__ = [
    "CONFIG",
    "CheckpointWriteError",
    "LOCK",
    "RUN_ID",
    "RunDirBusy",
    "held_by",
    "hold",
    "keep",
    "release",
    "FOLDER",
    "MARKER",
    "MODEL",
    "OPTIMIZER",
    "REFERENCE",
    "STATE",
    "checkpoint_dir",
    "complete",
    "good_first",
    "is_checkpoint",
    "latest",
    "latest_good",
    "load_tensors",
    "prune",
    "read_config",
    "read_manifest",
    "read_state",
    "rng_from_json",
    "rng_to_json",
    "verify",
    "write",
]

FOLDER = "checkpoints"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
REFERENCE = "ref_model.pt"
STATE = "state.json"
CONFIG = "config.yaml"
MARKER = "COMPLETE"
LOCK = "LOCK"
RUN_ID = "MLFLOW_RUN"
MANIFEST_FORMAT = 1
LEGACY_MARKER = "ok"  # what COMPLETE held before it held the manifest


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock (it trains this run)."""


def hold(run_dir: Path, holder: str) -> Any:
    """Take the run directory's lock for this process (creating the directory; an unwritable one raises OSError) and
    return the open lock file: keep it open as long as the run trains. An OS lock (``flock``), so the kernel releases
    it when the process dies, however it dies (a SIGKILL never leaves it stuck). Raises RunDirBusy naming the
    holder ("<pid> <host>") when another process trains the run (or this one, through another open: ``keep``)."""
    import fcntl

    key = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "unknown"
        f.close()
        pid, _, host = who.partition(" ")
        raise RunDirBusy(f"run directory {str(run_dir)!r} is being trained by pid {pid} on host {host or '?'} "
                         f"(lock {run_dir / LOCK}); wait for it, stop it, or train another config or seed") from None  # fmt: skip
    f.seek(0)
    f.truncate()
    f.write(holder)
    f.flush()
    _HELD[key] = f
    return f


_HELD: dict[Path, Any] = {}  # run dir -> the lock file this process holds open


def keep(run_dir: Path, holder: str) -> Any:
    """The run directory's lock for this process: the one it holds already (``rpg train`` takes it before loading
    anything, then its Trainer asks again), else ``hold``."""
    f = _HELD.get(Path(run_dir).resolve())
    return f if f is not None and not f.closed else hold(run_dir, holder)


def release(run_dir: Path, handle: Any = None) -> None:
    """Let go of the run directory's lock if this process holds it (a run that ended; the process may go on); with
    ``handle``, only if that is the open it holds (a Trainer garbage-collected after another took the lock again)."""
    key = Path(run_dir).resolve()
    if handle is not None and _HELD.get(key) is not handle:
        return
    f = _HELD.pop(key, None)
    if f is not None and not f.closed:
        f.close()  # closing the file drops the flock


def held_by(run_dir: Path) -> str | None:
    """Who holds the run directory's lock ("<pid> <host>"), or None when no live process does (no lock file, or a
    lock its holder's death released). Probes with a shared, non-blocking flock, released at once; only meaningful
    on the machine whose disk holds ``run_dir`` (flock does not reach across machines on most network filesystems)."""
    import fcntl

    f = Path(run_dir) / LOCK
    try:
        fh = open(f)  # noqa: SIM115
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "unknown"
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


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
    """The run's newest complete checkpoint, or None (not verified: ``latest_good`` verifies)."""
    ckpts = complete(run_dir)
    return ckpts[-1] if ckpts else None


def good_first(run_dir: Path, *, checksums: bool = True) -> Iterator[tuple[Path, str | None]]:
    """The run's checkpoint folders (``step_*``, with or without ``COMPLETE``), newest first, each with its verdict
    (``verify``: None when good, else the reason), verified one at a time as the caller asks for them: a caller
    that stops at the first good one verifies nothing older."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return
    for path in sorted((p for p in folder.glob("step_*") if p.is_dir()), key=_step_order, reverse=True):
        yield path, verify(path, checksums=checksums)


def latest_good(run_dir: Path, *, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The run's newest checkpoint that passes ``verify`` (None if none does), and the newer ones it skipped, each
    with its reason, newest first."""
    skipped: list[tuple[Path, str]] = []
    for path, reason in good_first(run_dir, checksums=checksums):
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def read_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest ``COMPLETE`` holds: file name -> {"bytes": size, "sha256": hex digest}; None for a checkpoint
    written before manifests existed (its ``COMPLETE`` says "ok"). Raises FileNotFoundError without ``COMPLETE``,
    ValueError (saying what is wrong) when it holds neither, OSError when it cannot be read."""
    text = (Path(path) / MARKER).read_text(errors="replace")
    if text.strip() == LEGACY_MARKER:
        return None
    if not text.strip():
        raise ValueError("empty (no manifest)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a valid manifest (not JSON: {e})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
        for r in files.values()
    )
    if not ok:
        raise ValueError('not a valid manifest (expected {"format": 1, "files": {name: {"bytes", "sha256"}}})')
    return files


def verify(path: Path, *, checksums: bool = True) -> str | None:
    """None if the checkpoint at ``path`` is good, else what is wrong with it, every file's problem joined by "; "
    (e.g. "model.pt: 1234 bytes, expected 5678", "state.json: not valid JSON (...)", "COMPLETE missing"). Checks
    ``COMPLETE`` and its manifest, that every file it lists is there with its recorded size and (``checksums``: the
    whole checkpoint is read, ~0.4 s per 540 MB) its sha256, that ``model.pt``, ``optimizer.pt``, ``state.json``
    and ``config.yaml`` are among them, and that ``state.json`` (a JSON object whose step is the folder's) and
    ``config.yaml`` (a YAML mapping) parse. A checkpoint written before manifests existed: its files are present,
    the ``.pt`` files whole zip archives, the two texts parse (nothing recorded its sizes or checksums). Needs no
    torch."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return f"{MARKER} missing" if path.is_dir() else "no such folder"
    except ValueError as e:
        return f"{MARKER}: {e}"
    except OSError as e:
        return f"{MARKER}: unreadable ({e.strerror or e})"
    problems: dict[str, str] = {}
    required = [MODEL, OPTIMIZER, STATE, CONFIG]
    if manifest is None:  # older than manifests: what can be checked without them
        for name in [*required, *([REFERENCE] if (path / REFERENCE).exists() else [])]:
            f = path / name
            if not f.is_file():
                problems[name] = f"{name} missing"
            elif f.stat().st_size == 0:
                problems[name] = f"{name}: empty"
            elif name.endswith(".pt") and not _whole_zip(f):
                problems[name] = f"{name}: not a whole torch archive (cut short or corrupt)"
    else:
        for name in required:
            if name not in manifest:
                problems[name] = f"{name}: not in the manifest"
        for name, rec in manifest.items():
            p = _check_file(path / name, rec, checksums)
            if p:
                problems[name] = p
    for name, check in ((STATE, _check_state), (CONFIG, _check_config)):
        if name not in problems:
            p = check(path)
            if p:
                problems[name] = p
    return "; ".join(problems.values()) or None


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
    """Write the checkpoint of ``step`` atomically, its manifest (each file's size and sha256) in ``COMPLETE``,
    written last; then delete all but the newest ``keep`` complete ones (``prune``)."""
    import torch

    path = checkpoint_dir(run_dir, step)
    tmp = path.parent / f".tmp_{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        torch.save(model, tmp / MODEL)
        torch.save(optimizer, tmp / OPTIMIZER)
        if reference is not None:
            torch.save(reference, tmp / REFERENCE)
        faults.point("checkpoint_write", step)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        (tmp / CONFIG).write_text(config_yaml)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
    except Exception as e:  # a full disk, a quota, an unwritable folder: said in one line, nothing half-written left
        raise _write_failed(run_dir, step, tmp, e) from e
    if path.exists():  # a step written again: the old one moves aside first, so a kill never leaves half of it
        _discard(path, now=False)
    os.replace(tmp, path)
    prune(run_dir, keep)
    (Path(run_dir) / CONFIG).write_text(config_yaml)
    return path


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, ...): the message names the step, the folder, the
    cause and the checkpoint that is kept."""


def _write_failed(run_dir: Path, step: int, tmp: Path, e: Exception) -> CheckpointWriteError:
    """Remove the half-written ``tmp`` and say what happened. torch reports a full disk as a bare "file write
    failed": a folder with (almost) no space left before the clean-up is called what it is."""
    import errno

    try:
        free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else run_dir).free
    except OSError:
        free = None
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and e.errno is not None:
        cause = os.strerror(e.errno)
    elif free is not None and free < 1 << 20:
        cause = os.strerror(errno.ENOSPC)
    else:
        cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    if free is not None:
        cause += f", {free / 2**20:.0f} MiB free" if free >= 1 << 20 else f", {free // 1024} KiB free"
    prev = latest(run_dir)
    kept = f"the checkpoint of step {int(prev.name.removeprefix('step_'))} is kept" if prev else "no earlier checkpoint"
    return CheckpointWriteError(f"checkpoint of step {step} not written to {Path(run_dir) / FOLDER} ({cause}); {kept}; "
                                "make room (or set train.output_dir elsewhere) and run it again to resume")  # fmt: skip


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, except that when none of those passes ``verify``
    without checksums (its manifest, every file at its recorded size, ``state.json`` and ``config.yaml`` parse)
    the newest older one that does stays too: pruning never deletes the last good checkpoint. Also clears what
    killed writes and deletions left (``.tmp_*``, ``.old_*``: one process writes a run). Returns the deleted ones."""
    ckpts = complete(run_dir)
    kept = ckpts[-keep:]
    if not any(verify(p, checksums=False) is None for p in reversed(kept)):
        kept += [p for p in reversed(ckpts[:-keep]) if verify(p, checksums=False) is None][:1]
    gone = [p for p in ckpts if p not in kept]
    for p in gone:
        _discard(p)
    folder = Path(run_dir) / FOLDER
    for stale in [*folder.glob(".tmp_step_*"), *folder.glob(".old_step_*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return gone


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


# -- helpers ----------------------------------------------------------------------------------------------------


def _step_order(path: Path) -> tuple[int, str]:
    digits = path.name.removeprefix("step_")
    return (int(digits) if digits.isdigit() else -1, path.name)


def _discard(path: Path, *, now: bool = True) -> None:
    """Move a checkpoint aside (``.old_step_NNNNNN``) in one rename, then delete it (``now``; else ``prune``
    does): a kill mid-deletion leaves no half checkpoint under its own name."""
    trash = path.parent / f".old_{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    if now:
        shutil.rmtree(trash, ignore_errors=True)


def _sha256(f: Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_file(f: Path, rec: dict[str, Any], checksums: bool) -> str | None:
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return f"{f.name} missing"
    except OSError as e:
        return f"{f.name}: unreadable ({e.strerror or e})"
    if size != rec["bytes"]:
        return f"{f.name}: {size} bytes, expected {rec['bytes']}"
    if checksums:
        try:
            digest = _sha256(f)
        except OSError as e:
            return f"{f.name}: unreadable ({e.strerror or e})"
        if digest != rec["sha256"]:
            return f"{f.name}: sha256 {digest[:12]}..., expected {rec['sha256'][:12]}... (changed since it was written)"
    return None


def _whole_zip(f: Path) -> bool:
    """A torch.save file (a zip archive) that still ends with its central directory: not cut short."""
    try:
        with zipfile.ZipFile(f) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _check_state(path: Path) -> str | None:
    try:
        text = (path / STATE).read_text()
    except FileNotFoundError:
        return f"{STATE} missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{STATE}: unreadable ({getattr(e, 'strerror', None) or e})"
    if not text.strip():
        return f"{STATE}: empty"
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        return f"{STATE}: not valid JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE}: not a loop state (a JSON object with an integer step)"
    step = _step_order(path)[0]
    if step >= 0 and state["step"] != step:
        return f"{STATE}: step {state['step']}, but the folder is {path.name}"
    return None


def _check_config(path: Path) -> str | None:
    import yaml

    try:
        doc = yaml.safe_load((path / CONFIG).read_text())
    except FileNotFoundError:
        return f"{CONFIG} missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{CONFIG}: unreadable ({getattr(e, 'strerror', None) or e})"
    except yaml.YAMLError as e:
        return f"{CONFIG}: not valid YAML ({' '.join(str(e).split())})"
    return None if isinstance(doc, dict) else f"{CONFIG}: not a config (a YAML mapping)"
