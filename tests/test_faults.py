"""Faults during training and generation: kill -9 at random moments, a full disk, hostile checkpoints,
two processes writing into one folder. Nothing the user had may be lost.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import one_line
from t2i import metadata
from t2i.errors import StorageError
from t2i.train import lora
from t2i.train.checkpoint import STATE_FILE, Checkpoints
from test_loading import _Payload  # noqa: F401  (the pickle that writes a marker file when loaded)
from test_train_lora import REPO, _args, _cfg, _weights, data  # noqa: F401  (`data` is a fixture)

KILL_TRIALS = 20

# Loaded by the trainer subprocess through PYTHONPATH: each checkpoint write pauses after its files and
# before state.json and the rename that complete it, so random kills often land inside a write.
SLOW_WRITES = """
import time
import t2i.train.checkpoint as c
_save = c.save_training_state
def save_training_state(*args, **kwargs):
    extras = _save(*args, **kwargs)
    time.sleep(0.2)
    return extras
c.save_training_state = save_training_state
"""


def _assert_complete(path: Path, step: int) -> None:
    """A checkpoint folder that resume would pick: state.json says its step, every file loads."""
    state = json.loads((path / STATE_FILE).read_text())
    assert state["step"] == step
    for f in path.glob("*.safetensors"):
        load_file(str(f))
    for f in path.glob("*.pt"):
        torch.load(f, weights_only=True)


def _steps_logged(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if '"step"' in line) if log.is_file() else 0


def test_twenty_random_kill_9s_never_lose_a_checkpoint_and_end_where_a_straight_run_ends(tiny_sd, data, tmp_path):
    rng = random.Random(1128)
    out = tmp_path / "out"
    cfg = _cfg(tiny_sd, data, out, steps=100_000, checkpoint_every=1)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_WRITES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    ckpts, log = Checkpoints(out / "checkpoints"), out / "train_log.jsonl"
    newest, inside_a_write = 0, 0
    for trial in range(KILL_TRIALS):
        before = _steps_logged(log)
        proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", "train", "lora", *_args(cfg),
                                 *(["--resume", "latest"] if trial else [])], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.time() + 120
        while _steps_logged(log) <= before:  # training again (the first step after start or resume is logged)
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < end, "no training step within 120 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment: a step, or a checkpoint write
        proc.kill()
        proc.communicate()
        inside_a_write += any((out / "checkpoints").glob(".tmp-step-*"))
        found = ckpts.all()
        if not found:  # killed before the very first checkpoint was complete: nothing to lose yet
            assert newest == 0, f"trial {trial}: the checkpoints are gone"
            continue
        step, path = found[-1]
        assert step >= newest, f"trial {trial}: the newest checkpoint went back from {newest} to {step}"
        _assert_complete(path, step)
        newest = step
    assert inside_a_write >= 3, f"only {inside_a_write} of {KILL_TRIALS} kills landed inside a checkpoint write"
    total = newest + 2  # finish two steps past the last checkpoint, then compare with one straight run
    lora.run(None, {**cfg, "steps": total}, resume="latest")
    assert not list((out / "checkpoints").glob(".tmp-step-*"))  # the dead processes' half-writes are cleaned up
    lora.run(None, {**cfg, "steps": total, "output": str(tmp_path / "straight")})
    straight, resumed = _weights(tmp_path / "straight" / "lora.safetensors"), _weights(out / "lora.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(run_cli, tiny_sd, data, tmp_path, monkeypatch):
    import t2i.train.checkpoint as checkpoint

    out = tmp_path / "out"
    real, calls = checkpoint.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint (step 2) is written whole, the second runs out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    cfg = _cfg(tiny_sd, data, out, steps=6, checkpoint_every=2)
    code, _, stderr = run_cli("train", "lora", *_args(cfg))
    assert code == 2
    line = one_line(stderr.split("\r")[-1].strip().splitlines()[-1] + "\n")
    assert "could not write checkpoint step 4" in line and "No space left on device" in line
    assert "the previous checkpoint (step-00000002) is intact" in line
    (step, path), = Checkpoints(out / "checkpoints").all()
    assert step == 2
    _assert_complete(path, 2)
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    monkeypatch.setattr(checkpoint, "save_file", real)  # space again: the run continues from step 2
    lora.run(None, cfg, resume="latest")
    assert (out / "lora.safetensors").is_file()


def test_a_full_disk_never_damages_an_existing_lora_file(tmp_path, monkeypatch):
    import safetensors.torch

    from t2i import lora_format

    path = tmp_path / "style.safetensors"
    sd = {"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)}
    lora_format.save_lora(path, sd, {"t2i.rank": "2"})
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(StorageError, match="No space left on device; the existing file is unchanged"):
        lora_format.save_lora(path, {k: v * 2 for k, v in sd.items()}, {"t2i.rank": "2"}, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]  # no temporary file left behind


@pytest.fixture(scope="module")
def finished(tiny_sd, data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("finished") / "out"
    cfg = _cfg(tiny_sd, data, out, steps=2, checkpoint_every=2)
    lora.run(None, cfg)
    return out, cfg


@pytest.mark.parametrize("damage, words", [
    ("optimizer.pt:pickle", "optimizer.pt is damaged"),
    ("lr_scheduler.pt:truncate", "lr_scheduler.pt is damaged"),
    ("rng_and_tensors.safetensors:truncate", "truncated"),
    ("rng_and_tensors.safetensors:html", "not a valid safetensors"),
    ("rng_and_tensors.safetensors:lfs", "git lfs"),
    ("state.json:garbage", "state.json is damaged"),
])
def test_a_damaged_or_hostile_checkpoint_is_refused_in_one_line(run_cli, finished, tmp_path, damage, words):
    import pickle
    import shutil

    from test_loading import BROKEN

    out = Path(shutil.copytree(finished[0], tmp_path / "out"))
    (_, path), = Checkpoints(out / "checkpoints").all()
    name, kind = damage.split(":")
    marker, target = tmp_path / "PWNED", path / name
    assert target.is_file()
    if kind == "pickle":
        target.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    elif kind == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif kind == "garbage":
        target.write_text("{not json")
    else:
        target.write_bytes(BROKEN[kind][0])
    cfg = {**finished[1], "output": str(out), "steps": 4}
    code, _, stderr = run_cli("train", "lora", *_args(cfg), "--resume", path)
    assert code == 2
    line = one_line(stderr.strip().splitlines()[-1] + "\n")
    assert "cannot be resumed" in line and words in line.lower(), line
    assert not marker.exists()


def test_two_generate_processes_writing_into_one_folder_never_overwrite_each_other(tiny_sd, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "t2i.cli", "generate", f"prompt {seed}", "--model", str(tiny_sd),
                               "--steps", "1", "--batch", "3", "--seed", str(seed), "--out", str(out), "-q"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (100, 200)]
    printed = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        printed += stdout.split()
    files = sorted(out.glob("*.png"))
    assert len(files) == 6 and sorted(map(str, files)) == sorted(printed)  # six distinct names, all announced
    for f in files:
        _, s = metadata.read(f)
        assert f.name.endswith(f"-{s.seed}.png") and s.prompt == f"prompt {s.seed - s.batch_index}"
    assert sorted(metadata.read(f)[1].seed for f in files) == [100, 101, 102, 200, 201, 202]
