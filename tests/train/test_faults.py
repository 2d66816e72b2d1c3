"""Faults during training and generation: kill -9 at random moments, a full disk at each write, two
processes writing into one folder. Nothing the user had may be lost.

(Damaged and hostile checkpoints given to `--resume` are in test_hostile_files.py; an image that
breaks mid-epoch is in test_train_lora.py.)
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import REPO, lora_args as _args, lora_cfg as _cfg, weights as _weights
from t2i import metadata
from t2i.train import lora, loop
from t2i.train.checkpoint import Checkpoints, read_training_state

KILL_TRIALS = 20


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

# Each trainer is a fork of this process, which has paid for the imports once (9 s a start on a busy
# 2-core machine, 20 times over). Each checkpoint write is slowed before each of its files and after the
# last (before state.json and the rename that complete it), so random kills often land inside a write.
ZYGOTE = """
import json, os, sys, time, traceback
import accelerate, peft, torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
import t2i.cli
from t2i.pipelines import Text2Image
from t2i.train import checkpoint, loop

def slow(write, before, after=0.0):
    def call(*args, **kwargs):
        time.sleep(before)
        out = write(*args, **kwargs)
        time.sleep(after)
        return out
    return call
checkpoint.save_file = slow(checkpoint.save_file, 0.05)
torch.save = slow(torch.save, 0.05)
loop.save_training_state = slow(loop.save_training_state, 0.0, 0.1)

for line in sys.stdin:  # [argv, log file] -> prints the trainer's pid, then how it ended
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = t2i.cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _step_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if '"step"' in line] if log.is_file() else []


def _error_line(stderr: str) -> str:
    """The one `t2i: error:` line, last on stderr after the progress notes; no traceback."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert [line for line in lines if line.startswith("t2i: error:")] == lines[-1:], stderr
    return lines[-1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the trainers are forked from a process that has imported torch")
def test_twenty_random_kill_9s_never_lose_a_checkpoint_and_end_where_a_straight_run_ends(tiny_sd, data, tmp_path):
    """After each kill the newest checkpoint is complete and never older; each resume starts from it."""
    rng = random.Random(1128)
    out = tmp_path / "out"
    cfg = _cfg(tiny_sd, data, out, steps=100_000, checkpoint_every=1)
    ckpts, log = Checkpoints(out / "checkpoints"), out / "train_log.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    newest, inside_a_write = 0, 0
    try:
        for trial in range(KILL_TRIALS):
            before, trial_log = len(_step_lines(log)), tmp_path / f"trial-{trial}.log"
            newest_path = ckpts.latest()
            argv = ["train", "lora", *_args(cfg), *(["--resume", "latest"] if trial else [])]
            zygote.stdin.write(json.dumps([argv, str(trial_log)]) + "\n")
            zygote.stdin.flush()
            pid, end = int(zygote.stdout.readline()), time.time() + 120
            while len(_step_lines(log)) <= before:  # training again (the first step after a start is logged)
                ended = select.select([zygote.stdout], [], [], 0.02)[0]
                assert not ended, f"trial {trial}: the trainer ended by itself:\n{trial_log.read_text()[-2000:]}"
                assert time.time() < end, f"trial {trial}: no training step within 120 s"
            first = int(re.search(r'"step": (\d+)', _step_lines(log)[before]).group(1))
            assert first == newest + 1, f"trial {trial}: resumed at step {first - 1}, the newest checkpoint is {newest}"
            if newest_path is not None:
                assert f"resumed from {newest_path} at step {newest}" in trial_log.read_text()
            time.sleep(rng.uniform(0.0, 0.5))  # a random moment: a step, or a checkpoint write
            os.kill(pid, signal.SIGKILL)
            assert int(zygote.stdout.readline()) == -signal.SIGKILL
            inside_a_write += any((out / "checkpoints").glob(".tmp-step-*"))
            found = ckpts.all()
            if not found:  # killed before the very first checkpoint was complete: nothing to lose yet
                assert newest == 0, f"trial {trial}: the checkpoints are gone"
                continue
            step = found[-1][0]
            assert step >= newest, f"trial {trial}: the newest checkpoint went back from {newest} to {step}"
            for saved, path in found:  # each one resume could pick is complete: every file vetted and read
                assert read_training_state(path).state["step"] == saved, f"trial {trial}: {path}"
            newest = step
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    assert inside_a_write >= 3, f"only {inside_a_write} of {KILL_TRIALS} kills landed inside a checkpoint write"
    total = newest + 2  # finish two steps past the last checkpoint, then compare with one straight run
    lora.run(None, {**cfg, "steps": total}, resume="latest")
    assert not list((out / "checkpoints").glob(".tmp-step-*"))  # the dead processes' half-writes are cleaned up
    lora.run(None, {**cfg, "steps": total, "output": str(tmp_path / "straight")})
    straight, resumed = _weights(tmp_path / "straight" / "lora.safetensors"), _weights(out / "lora.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def straight_6(tiny_sd, data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The LoRA of an uninterrupted 6-step run, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("straight") / "out"
    return _weights(lora.run(None, _cfg(tiny_sd, data, out, steps=6, checkpoint_every=2)))


def _full_disk_at(where: str, monkeypatch) -> None:
    """Make one write run out of space: a part of checkpoint step 4, or the log record of step 3."""
    import t2i.train.checkpoint as checkpoint

    armed = {"on": False}
    real_save = Checkpoints.save

    def save(self, step, write):
        armed["on"] = step == 4
        try:
            return real_save(self, step, write)
        finally:
            armed["on"] = False

    def failing(real, when=lambda *a, **k: armed["on"]):
        def call(*args, **kwargs):
            if when(*args, **kwargs):
                raise _enospc()
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(Checkpoints, "save", save)
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", failing(checkpoint.save_file))
    elif where == "optimizer state":
        monkeypatch.setattr(torch, "save", failing(torch.save))
    elif where == "state.json":
        monkeypatch.setattr(pathlib.Path, "write_text", failing(
            pathlib.Path.write_text, lambda self, *a, **k: armed["on"] and self.name == "state.json"))
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", failing(os.fsync))
    else:  # the training log: its third record (step 3) finds the disk full
        opened = {"log": 0}

        def log_full(file, *args, **kwargs):
            opened["log"] += Path(file).name == "train_log.jsonl"
            return failing(open, lambda *a, **k: opened["log"] == 3)(file, *args, **kwargs)

        monkeypatch.setattr(loop, "open", log_full, raising=False)  # shadows the builtin in train/loop.py only


@pytest.mark.parametrize("where", ["weights", "optimizer state", "state.json", "fsync", "training log"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(run_cli, tiny_sd, data, straight_6, tmp_path,
                                                               monkeypatch, where):
    """One line, exit 2, the checkpoint of step 2 intact and nothing partial picked; then the run resumes
    from it and ends with the weights of an uninterrupted run."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_sd, data, out, steps=6, checkpoint_every=2)
    _full_disk_at(where, monkeypatch)
    code, stdout, stderr = run_cli("train", "lora", *_args(cfg))
    assert code == 2 and stdout == ""
    line = _error_line(stderr)
    assert "No space left on device" in line, line
    if where == "training log":
        assert "the newest checkpoint (step-00000002) is intact" in line, line
    else:
        assert "could not write checkpoint step 4" in line, line
        assert "the previous checkpoint (step-00000002) is intact" in line, line
    assert "--resume latest" in line
    (step, path), = Checkpoints(out / "checkpoints").all()
    assert step == 2 and read_training_state(path).state["step"] == 2
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    monkeypatch.undo()  # space again: the run continues from step 2
    resumed = _weights(lora.run(None, cfg, resume="latest"))
    for k in straight_6:
        torch.testing.assert_close(resumed[k], straight_6[k], rtol=0, atol=1e-6)


def test_a_full_disk_never_damages_an_existing_lora_file(run_cli, finished, tmp_path, monkeypatch):
    """Continuing a finished run replaces its lora.safetensors; out of space, the old one stays byte for byte."""
    import shutil

    import safetensors.torch

    out = Path(shutil.copytree(finished[0], tmp_path / "out"))
    before = (out / "lora.safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise _enospc()

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # the LoRA writer's; checkpoints hold their own
    args = _args({**finished[1], "output": str(out), "steps": 4})
    code, _, stderr = run_cli("train", "lora", *args, "--resume", "latest")
    assert code == 2
    line = _error_line(stderr)
    assert "lora.safetensors: No space left on device; the existing file is unchanged" in line, line
    assert (out / "lora.safetensors").read_bytes() == before
    assert not list(out.glob(".lora.safetensors*"))  # no temporary file left behind
    assert [s for s, _ in Checkpoints(out / "checkpoints").all()] == [2, 4]  # the new steps are kept, too
    monkeypatch.undo()
    code, stdout, _ = run_cli("train", "lora", *args, "--resume", "latest")
    assert code == 0 and stdout.strip() == str(out / "lora.safetensors")
    assert (out / "lora.safetensors").read_bytes() != before


def test_a_full_disk_while_saving_images_writes_nothing_and_keeps_what_was_there(run_cli, tiny_sd, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "images"
    code, stdout, _ = run_cli("generate", "a", "--model", tiny_sd, "--steps", "1", "--out", out, "-q")
    assert code == 0
    (kept,) = [Path(p) for p in stdout.split()]
    before = kept.read_bytes()

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise _enospc()

    monkeypatch.setattr(Image.Image, "save", full_disk)
    for extra, words in ((["--out", out], "nothing was written"),
                         (["--out", kept, "--overwrite"], "the existing file is unchanged")):
        code, stdout, stderr = run_cli("generate", "b", "--model", tiny_sd, "--steps", "1", "-q", *extra)
        assert code == 2 and stdout == ""
        line = _error_line(stderr)
        assert "No space left on device" in line and words in line, line
    assert sorted(p.name for p in out.iterdir()) == [kept.name]  # no partial or temporary file
    assert kept.read_bytes() == before


# Loaded by both generate processes through PYTHONPATH: each picks its first number, then waits for the
# other to have picked its own, so both try the same numbers at the same moment.
SAME_MOMENT = """
import os, time
from pathlib import Path
import t2i.output as o
_next = o.next_number
def next_number(folder):
    n = _next(folder)
    gate = Path(os.environ["T2I_TEST_GATE"])
    (gate / str(os.getpid())).touch()
    end = time.time() + 120
    while len(list(gate.iterdir())) < 2 and time.time() < end:
        time.sleep(0.01)
    return n
o.next_number = next_number
"""


def test_two_generate_processes_writing_into_one_folder_never_overwrite_each_other(tiny_sd, tmp_path):
    """Six images, six names and six numbers, each PNG with its own process's metadata, even when both
    processes pick the same numbers at the same moment."""
    out, gate, hook = tmp_path / "shared", tmp_path / "gate", tmp_path / "hook"
    gate.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SAME_MOMENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "T2I_TEST_GATE": str(gate),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "t2i.cli", "generate", f"prompt {seed}", "--model", str(tiny_sd),
                               "--steps", "1", "--batch", "3", "--seed", str(seed), "--out", str(out), "-q"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (100, 200)]
    printed = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        printed += stdout.split()
    assert len(list(gate.iterdir())) == 2  # both really picked their numbers before either wrote
    files = sorted(out.iterdir())
    assert len(files) == 6 and sorted(map(str, files)) == sorted(printed)  # six names, all announced, no leftovers
    assert len({f.name.split("-")[0] for f in files}) == 6  # six numbers
    for f in files:
        with Image.open(f) as im:
            im.verify()
        _, s = metadata.read(f)
        assert f.name.endswith(f"-{s.seed}.png") and s.prompt == f"prompt {s.seed - s.batch_index}"
    assert sorted(metadata.read(f)[1].seed for f in files) == [100, 101, 102, 200, 201, 202]
