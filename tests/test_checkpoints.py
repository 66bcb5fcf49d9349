"""The checkpoint layout (rpg_core.checkpoints): atomic write, COMPLETE marker, latest complete, pruning, reading."""

from __future__ import annotations

import pytest
import torch

from rpg_core import checkpoints as ck

pytestmark = pytest.mark.unit


def _write(run_dir, step, keep=2):
    return ck.write(run_dir, step, model={"w": torch.full((2,), float(step))}, optimizer={"state": {}},
                    reference=None, state={"step": step, "run_id": "r"}, config_yaml=f"step: {step}\n", keep=keep)  # fmt: skip


def test_write_list_latest_prune(tmp_path):
    assert ck.complete(tmp_path) == [] and ck.latest(tmp_path) is None
    paths = [_write(tmp_path, s) for s in (1, 2, 3)]
    assert paths[-1] == tmp_path / "checkpoints" / "step_000003"
    assert ck.complete(tmp_path) == paths[1:]  # keep=2: step 1 pruned
    assert sorted(p.name for p in paths[-1].iterdir()) == ["COMPLETE", "config.yaml", "model.pt", "optimizer.pt",
                                                            "state.json"]  # no reference when None  # fmt: skip
    assert (tmp_path / "config.yaml").read_text() == "step: 3\n"
    # A folder without the marker (a write interrupted before os.replace cannot leave one, but a copy could) and a
    # leftover temporary folder are not checkpoints.
    (tmp_path / "checkpoints" / "step_000009").mkdir()
    (tmp_path / "checkpoints" / ".tmp_step_000010").mkdir()
    assert ck.latest(tmp_path) == paths[-1]
    assert ck.read_state(paths[-1]) == {"step": 3, "run_id": "r"}
    assert ck.is_checkpoint(paths[-1]) and not ck.is_checkpoint(tmp_path / "checkpoints" / "step_000009")
    assert torch.equal(ck.load_tensors(paths[-1], ck.MODEL)["w"], torch.full((2,), 3.0))
    assert ck.load_tensors(paths[-1], ck.REFERENCE) is None
    _write(tmp_path, 3)  # rewriting a step replaces it
    assert ck.complete(tmp_path) == paths[1:]


def test_python_rng_state_round_trips_through_json():
    import json
    import random

    state = random.getstate()
    assert ck.rng_from_json(json.loads(json.dumps(ck.rng_to_json(state)))) == state


def test_one_process_holds_a_run_dir(tmp_path):
    """checkpoints.hold: the first holder writes "<pid> <host>"; a second open of the lock (another process, or this
    one again: flock is per open file) is refused naming the holder; closing (or dying) releases it."""
    run = tmp_path / "runs" / "k-s0"
    first = ck.hold(run, "123 host-a")
    assert (run / ck.LOCK).read_text() == "123 host-a"
    with pytest.raises(ck.RunDirBusy, match=r"'.*k-s0' is being trained by pid 123 on host host-a \(lock .*LOCK\)"):
        ck.hold(run, "456 host-b")
    first.close()
    again = ck.hold(run, "456 host-b")
    assert (run / ck.LOCK).read_text() == "456 host-b"
    again.close()
    with pytest.raises(OSError):  # a run dir that cannot be made: the caller says which field
        ck.hold(tmp_path / "runs" / "k-s0" / ck.LOCK / "x", "1 h")


@pytest.mark.subprocess
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """The kernel drops the lock with its process: a SIGKILLed trainer's run dir is free at once."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from pathlib import Path; from rpg_core import checkpoints as ck; "
            "f = ck.hold(Path(sys.argv[1]), 'child h'); print('held', flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ck.RunDirBusy, match="pid child on host h"):
            ck.hold(tmp_path, "me h")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        t0 = time.monotonic()
        ck.hold(tmp_path, "me h").close()  # no wait, no clean-up needed
        assert time.monotonic() - t0 < 1
    finally:
        child.kill()


# -- verified checkpoints: the manifest in COMPLETE, verify, the newest good one, pruning that keeps a good one ------


def _damage(f, how: str) -> None:
    """Damage one file as a crash or a disk would: cut it short, empty it, or flip a byte in place (same size)."""
    data = f.read_bytes()
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "flip":
        i = len(data) // 2
        f.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:
        raise ValueError(how)


def test_complete_holds_a_manifest_of_every_file(tmp_path):
    """COMPLETE, written last, lists every other file of the checkpoint with its size and sha256 (what
    `sha256sum` prints); verify finds it good; reading it needs no torch."""
    import hashlib
    import json

    path = _write(tmp_path, 1)
    doc = json.loads((path / "COMPLETE").read_text())
    assert doc["format"] == 1
    files = sorted(p for p in path.iterdir() if p.name != "COMPLETE")
    assert sorted(doc["files"]) == [p.name for p in files] == ["config.yaml", "model.pt", "optimizer.pt", "state.json"]
    for p in files:
        assert doc["files"][p.name] == {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    assert ck.read_manifest(path) == doc["files"]
    assert ck.verify(path) is None and ck.verify(path, checksums=False) is None
    assert ck.latest_good(tmp_path) == (path, [])


def test_verify_names_the_file_and_what_is_wrong(tmp_path):
    """Each damage, one at a time on a fresh checkpoint, and verify's reason (None: good)."""
    import json

    size = lambda name: (_write(tmp_path / "probe", 1) / name).stat().st_size  # noqa: E731
    cases = [
        # (file, damage, reason; checksums=False: the sizes only)
        ("model.pt", "truncate", f"model.pt: {size('model.pt') // 2} bytes, expected {size('model.pt')}", None),
        ("optimizer.pt", "flip", "optimizer.pt: sha256 ", "good without checksums"),
        ("state.json", "empty", f"state.json: 0 bytes, expected {size('state.json')}", None),
        ("config.yaml", "delete", "config.yaml missing", None),
        ("COMPLETE", "delete", "COMPLETE missing", None),
        ("COMPLETE", "empty", "COMPLETE: empty (no manifest)", None),
        ("COMPLETE", "truncate", "COMPLETE: not a valid manifest (not JSON: ", None),
    ]
    for i, (name, how, reason, quick) in enumerate(cases):
        run = tmp_path / f"case{i}"
        path = _write(run, 1)
        if how == "delete":
            (path / name).unlink()
        else:
            _damage(path / name, how)
        got = ck.verify(path)
        assert got is not None and got.startswith(reason), (name, how, got)
        assert "changed since it was written" in got if how == "flip" else True
        if quick == "good without checksums":
            assert ck.verify(path, checksums=False) is None
        else:
            assert ck.verify(path, checksums=False) == got
    # Two damaged files: both named, in one line.
    path = _write(tmp_path / "two", 1)
    _damage(path / "model.pt", "empty")
    (path / "state.json").unlink()
    assert ck.verify(path) == f"model.pt: 0 bytes, expected {size('model.pt')}; state.json missing"
    # A manifest that leaves out a file the trainer needs.
    path = _write(tmp_path / "short", 1)
    doc = json.loads((path / "COMPLETE").read_text())
    del doc["files"]["optimizer.pt"]
    (path / "COMPLETE").write_text(json.dumps(doc))
    assert ck.verify(path) == "optimizer.pt: not in the manifest"
    assert ck.verify(tmp_path / "nowhere") == "no such folder"


def test_a_checkpoint_from_before_manifests_is_verified_as_far_as_it_can_be(tmp_path):
    """COMPLETE = "ok" (written before manifests): the files are there, each .pt a whole zip archive (torch's format
    ends with its directory: a file cut short loses it), state.json is a loop state of the folder's step,
    config.yaml a YAML mapping. A byte flipped in a tensor cannot be seen: nothing recorded a checksum."""
    def legacy(name):
        path = _write(tmp_path / name, 1)
        (path / "COMPLETE").write_text("ok\n")
        return path

    assert ck.read_manifest(legacy("good")) is None and ck.verify(legacy("good")) is None
    cases = [
        ("model.pt", lambda f: _damage(f, "truncate"), "model.pt: not a whole torch archive (cut short or corrupt)"),
        ("optimizer.pt", lambda f: _damage(f, "empty"), "optimizer.pt: empty"),
        ("optimizer.pt", lambda f: f.unlink(), "optimizer.pt missing"),
        ("state.json", lambda f: _damage(f, "empty"), "state.json: empty"),
        ("state.json", lambda f: f.write_text("{"), "state.json: not valid JSON (Expecting property name"),
        ("state.json", lambda f: f.write_text("[1]"), "state.json: not a loop state (a JSON object with an integer step)"),
        ("state.json", lambda f: f.write_text('{"step": 7}'), "state.json: step 7, but the folder is step_000001"),
        ("config.yaml", lambda f: f.write_text("a: [1"), "config.yaml: not valid YAML ("),
        ("config.yaml", lambda f: f.write_text("just text"), "config.yaml: not a config (a YAML mapping)"),
        ("model.pt", lambda f: _damage(f, "flip"), None),  # not detectable without a checksum
    ]
    for i, (name, damage, reason) in enumerate(cases):
        path = legacy(f"case{i}")
        damage(path / name)
        got = ck.verify(path)
        assert (got is None) if reason is None else (got is not None and got.startswith(reason)), (i, got)


def test_latest_good_walks_newest_first_and_says_what_it_skipped(tmp_path):
    paths = [_write(tmp_path, s, keep=5) for s in (1, 2, 3, 4)]
    _damage(paths[3] / "model.pt", "truncate")
    _damage(paths[2] / "state.json", "flip")  # its size unchanged: the checksum sees it
    (tmp_path / "checkpoints" / "step_000005").mkdir()  # a folder without COMPLETE (a copy cut short)
    good, skipped = ck.latest_good(tmp_path)
    assert good == paths[1]
    assert [(p.name, r.split(":")[0]) for p, r in skipped] == [
        ("step_000005", "COMPLETE missing"), ("step_000004", "model.pt"), ("step_000003", "state.json")]  # fmt: skip
    assert ck.latest(tmp_path) == paths[3]  # latest: the newest with COMPLETE, unverified, as before
    for p in paths[:2]:
        _damage(p / "optimizer.pt", "flip")
    good, skipped = ck.latest_good(tmp_path)
    assert good is None and len(skipped) == 5
    assert ck.latest_good(tmp_path / "empty") == (None, [])


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    """keep=1: each write deletes the older ones, unless the ones it keeps are all bad (sizes, the manifest and the
    two texts checked, no checksums): then the newest good older one stays. Rewriting a step moves the old one aside
    first; what a killed write or deletion left (.tmp_*, .old_*) is cleared by the next write."""
    s1 = _write(tmp_path, 1, keep=1)
    s2 = _write(tmp_path, 2, keep=1)
    assert ck.complete(tmp_path) == [s2] and not s1.exists()
    s3 = _write(tmp_path, 3, keep=5)
    _damage(s3 / "model.pt", "truncate")  # what a crash of the machine may leave behind COMPLETE
    assert ck.prune(tmp_path, 1) == []  # the kept one (s3) is bad: s2, the newest good one, stays
    assert ck.complete(tmp_path) == [s2, s3]
    s4 = _write(tmp_path, 4, keep=1)  # good: the older ones go
    assert ck.complete(tmp_path) == [s4]
    s5 = _write(tmp_path, 5, keep=5)
    _damage(s4 / "state.json", "empty")
    _damage(s5 / "optimizer.pt", "empty")
    assert ck.prune(tmp_path, 1) == [s4]  # nothing good anywhere: nothing to keep a bad old one for
    # leftovers of a killed write (.tmp_) and of a killed deletion (.old_) go with the next write
    folder = tmp_path / "checkpoints"
    (folder / ".tmp_step_000011").mkdir()
    (folder / ".old_step_000003").mkdir()
    assert _write(tmp_path, 5, keep=1) == s5 and ck.verify(s5) is None  # rewriting a step replaces it whole
    assert sorted(p.name for p in folder.iterdir()) == ["step_000005"]


def test_verify_needs_no_torch(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, 1)
    code = ("import sys; from rpg_core import checkpoints as ck; assert ck.verify(sys.argv[1]) is None; "
            "assert ck.latest_good(sys.argv[2])[0] is not None; assert 'torch' not in sys.modules, 'torch'")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- the trainer resumes from the newest good checkpoint (the tiny model, in process and through `rpg train`) -------

TINY = ["model.name=tiny", "data.level=add1", "data.n_train=64", "data.n_eval=4", "rollout.prompts_per_step=2",
        "rollout.n=4", "rollout.max_new_tokens=8", "algorithm.micro_batch_size=4", "optim.lr=1e-3",
        "optim.warmup_steps=0", "train.log_samples=0", "train.eval_every=0", "reward.dynamic_sampling=false",
        "train.checkpoint_every=1"]  # fmt: skip
WALL_CLOCK = ("time/", "perf/")  # measured, not computed


def _tiny(base, steps: int, keep: int):
    from rpg_core.config import load_run_config

    return load_run_config(preset="rpg_reinforce_urkl", overrides=[
        *TINY, f"train.steps={steps}", f"train.keep_checkpoints={keep}", f"train.output_dir={base / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{base / 'mlflow.db'}"])  # fmt: skip


def _computed(history):
    return [{k: v for k, v in h.items() if not k.startswith(WALL_CLOCK)} for h in history]


@pytest.mark.integration
def test_the_trainer_resumes_from_the_newest_good_checkpoint(tmp_path, capsys):
    """Four steps, a checkpoint each. Damaged newest first, one more each time: model.pt cut short (step 4), state.json
    emptied (step 3), a model.pt that passes verification but torch cannot load (step 2): each resume says which it
    skipped and why, one line each, and resumes from the next one down. Trained on from step 1, the run ends with
    the uninterrupted run's metrics, its bad checkpoints rewritten whole."""
    import hashlib
    import json

    from rpg_core.trainer import Trainer

    cfg = _tiny(tmp_path, steps=4, keep=4)
    full = Trainer(cfg).fit()
    ckpt = [ck.checkpoint_dir(full.run_dir, s) for s in (1, 2, 3, 4)]
    capsys.readouterr()

    def resume(expect_step: int, skipped: list[str]):
        t = Trainer(cfg)
        out = capsys.readouterr().out
        t.tracker.finish("KILLED")
        assert t.step == expect_step and t.run_id == full.run_id
        lines = [ln for ln in out.splitlines() if ln.startswith("skipped checkpoint ")]
        assert lines == skipped, out
        assert f"resumed {cfg.run_key()} from {ckpt[expect_step - 1]} (step {expect_step}, " in out
        return t

    model_size, state_size = (ckpt[3] / "model.pt").stat().st_size, (ckpt[2] / "state.json").stat().st_size
    _damage(ckpt[3] / "model.pt", "truncate")
    why4 = f"skipped checkpoint {ckpt[3]}: model.pt: {model_size // 2} bytes, expected {model_size}"
    resume(3, [why4])
    _damage(ckpt[2] / "state.json", "empty")
    why3 = f"skipped checkpoint {ckpt[2]}: state.json: 0 bytes, expected {state_size}"
    resume(2, [why4, why3])
    # step 2: model.pt replaced by bytes torch cannot read, the manifest rewritten to match (so verification passes)
    junk = b"not a torch archive" * 100
    (ckpt[1] / "model.pt").write_bytes(junk)
    doc = json.loads((ckpt[1] / "COMPLETE").read_text())
    doc["files"]["model.pt"] = {"bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    (ckpt[1] / "COMPLETE").write_text(json.dumps(doc))
    assert ck.verify(ckpt[1]) is None
    t = Trainer(cfg)
    out = capsys.readouterr().out
    assert t.step == 1 and f"skipped checkpoint {ckpt[1]}: cannot be loaded (" in out, out
    res = t.fit()
    assert res.step == 4 and res.run_id == full.run_id
    assert _computed(res.history) == _computed(full.history)
    assert all(ck.verify(p) is None for p in ckpt)  # steps 2-4 written again, whole


@pytest.mark.integration
@pytest.mark.subprocess
def test_rpg_train_refuses_when_no_checkpoint_is_good(tmp_path):
    """Every checkpoint bad: `rpg train` exits 2 with one line naming each checkpoint, file and reason (and a way
    out), no traceback; the skipped ones are said on stdout."""
    import os
    import subprocess
    import sys

    from rpg_core.trainer import Trainer

    cfg = _tiny(tmp_path, steps=2, keep=2)
    res = Trainer(cfg).fit()
    s1, s2 = ck.checkpoint_dir(res.run_dir, 1), ck.checkpoint_dir(res.run_dir, 2)
    _damage(s2 / "model.pt", "truncate")
    _damage(s1 / "state.json", "empty")
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RPG_FAULT"}
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(tmp_path / "run.yaml")],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("rpg train:")]
    assert line.startswith(f"rpg train: no good checkpoint to resume run {cfg.run_key()} from: {s2} (model.pt: ")
    assert f"; {s1} (state.json: 0 bytes, expected " in line and line.endswith("(rpg train --fresh)")
    assert f"skipped checkpoint {s2}: model.pt: " in r.stdout and f"skipped checkpoint {s1}: state.json: " in r.stdout


@pytest.mark.system
@pytest.mark.subprocess
def test_killed_mid_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    """`rpg train` SIGKILLed inside step 2's checkpoint write (RPG_FAULT=checkpoint_write@2: the weights written, the
    loop state and COMPLETE not): no step_000002, only its temporary folder. The same command resumes from step 1
    and ends with exactly an uninterrupted run's metrics and weights; the leftover is cleared."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    def train(cfg_file, fault=None):
        env = {k: v for k, v in os.environ.items() if k != "RPG_FAULT"} | {"PYTHONHASHSEED": "0"}
        env |= {"RPG_FAULT": fault} if fault else {}
        return subprocess.run([sys.executable, "-m", "rpg_core.cli", "train", "--config", str(cfg_file)],
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip

    a, b = _tiny(tmp_path / "a", steps=3, keep=2), _tiny(tmp_path / "b", steps=3, keep=2)
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(a.to_yaml())
    fb.write_text(b.to_yaml())
    r = train(fa)
    assert r.returncode == 0, r.stdout + r.stderr
    r = train(fb, "checkpoint_write@2")
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    folder = tmp_path / "b" / "runs" / b.run_key() / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".tmp_step_000002", "step_000001"]
    assert sorted(p.name for p in (folder / ".tmp_step_000002").iterdir()) == ["model.pt", "optimizer.pt"]
    r = train(fb)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed {b.run_key()} from {folder / 'step_000001'} (step 1, " in r.stdout
    assert "skipped checkpoint" not in r.stdout  # the cut write never became a checkpoint: nothing to skip
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002", "step_000003"]
    final = lambda cfg: ck.checkpoint_dir(tmp_path / cfg / "runs" / a.run_key(), 3)  # noqa: E731
    assert _computed(ck.read_state(final("a"))["history"]) == _computed(ck.read_state(final("b"))["history"])
    wa, wb = (torch.load(final(x) / "model.pt", weights_only=True) for x in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
