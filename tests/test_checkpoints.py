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
