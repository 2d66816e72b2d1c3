"""Checkpoints are atomic: resume only ever sees complete ones."""

from __future__ import annotations

import json
import random

import pytest
import torch

from t2i.errors import StorageError
from t2i.train.checkpoint import Checkpoints, load_training_state, save_training_state


def _write(value):
    def write(folder):
        (folder / "w.txt").write_text(str(value))
        return {"value": value}

    return write


def test_save_and_latest(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    assert ck.latest() is None and ck.resolve("latest") is None
    for step in (10, 20, 30):
        ck.save(step, _write(step))
    assert [s for s, _ in ck.all()] == [20, 30]  # pruned to the newest two
    assert json.loads((ck.latest() / "state.json").read_text()) == {"step": 30, "value": 30}


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path):
    ck = Checkpoints(tmp_path, keep=1)
    ck.save(1, _write(1))

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="step 2 .*No space left on device; the previous checkpoint "
                                           r"\(step-00000001\) is intact"):
        ck.save(2, broken)
    assert [s for s, _ in ck.all()] == [1]
    assert (ck.latest() / "w.txt").read_text() == "1"
    assert not list(tmp_path.glob(".tmp-*")), "the partial write is removed"


def test_folder_without_state_is_never_picked(tmp_path):
    ck = Checkpoints(tmp_path)
    ck.save(5, _write(5))
    (tmp_path / "step-00000009").mkdir()  # e.g. a copy cut short: no state.json
    (tmp_path / "step-00000009" / "w.txt").write_text("partial")
    assert ck.latest().name == "step-00000005"


def test_stale_temp_of_a_dead_process_is_cleaned(tmp_path):
    ck = Checkpoints(tmp_path)
    stale = tmp_path / ".tmp-step-00000003-999999999"
    stale.mkdir()
    ck.save(4, _write(4))
    assert not stale.exists()


def test_training_state_round_trip_restores_rng_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    ck = Checkpoints(tmp_path)
    path = ck.save(1, lambda d: save_training_state(d, {"m": model}, opt, sched))
    expected = (torch.rand(3), random.random())

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    torch.manual_seed(123)
    state, _ = load_training_state(path, {"m": model2}, opt2, sched2)
    assert state["step"] == 1
    torch.testing.assert_close(model2.weight, model.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert sched2.last_epoch == sched.last_epoch
    got = (torch.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    assert got[1] == expected[1]
