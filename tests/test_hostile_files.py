"""Hostile and broken files in every role a file can take: the model (a file, or the UNet, VAE or
text encoder weights of a model folder), a LoRA, a VAE given with `--vae`, a training checkpoint given to
`--resume`, and a textual-inversion embedding a prompt calls by name.

Each case: exit code 2, one line on stderr that names the problem, no traceback, and the marker
file that the pickle payloads would write never appears (also with --allow-pickle, which reads
pickles with torch.load(weights_only=True)). CASES_TRIED counts the (file, role) cases below.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BROKEN, REPO, lora_args as _args, one_line
from t2i.train.checkpoint import Checkpoints

KINDS = {  # kind -> (file suffix, words in the refusal)
    "pickle .ckpt": (".ckpt", "pickle"),
    "pickle .bin": (".bin", "pickle"),
    "pickle .pt": (".pt", "pickle"),
    "pickle .pth": (".pth", "pickle"),
    "pickle renamed .safetensors": (".safetensors", "pickle"),
    "truncated safetensors": (".safetensors", "truncated"),
    "git lfs pointer": (".safetensors", "git lfs"),
    "html page": (".safetensors", "not a valid safetensors"),
    "header claims 1 TiB": (".safetensors", "not a valid safetensors"),
    "tensor past the end": (".safetensors", "truncated"),
}
ZIPPED = {".ckpt", ".pt"}  # written by torch.save as real ones are; the other pickles are raw pickle streams
FOLDER_ROLES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
ROLES = ["model", *FOLDER_ROLES, "lora", "vae-override", "checkpoint", "embedding"]  # vae-override: --vae FILE
# A checkpoint is read by fixed names (optimizer.pt, lr_scheduler.pt, rng_and_tensors.safetensors): a .ckpt,
# .bin or .pth in it is never opened, so those three kinds make no sense in the checkpoint role.
CASES = [(kind, role) for kind in KINDS for role in ROLES
         if not (role == "checkpoint" and KINDS[kind][0] in (".ckpt", ".bin", ".pth"))]
FOLDER_CASES = [f"{part} config {what}" for part in FOLDER_ROLES for what in ("missing", "malformed", "not an object")]
FOLDER_CASES += ["model_index malformed", "model_index not an object"]
BROKEN_CHECKPOINTS = {  # damage -> words in the refusal
    "state.json not JSON": "state.json is damaged",
    "state.json without a step": "state.json is damaged",
    "lr_scheduler.pt truncated": "lr_scheduler.pt is damaged",
    "optimizer.pt missing": "optimizer.pt is missing",
}
# each matrix case with and without --allow-pickle, the broken folders and checkpoints, and the real process's two
CASES_TRIED = 2 * len(CASES) + len(FOLDER_CASES) + len(BROKEN_CHECKPOINTS) + 2


def _write(kind: str, path: Path, evil, tiny_sd: Path) -> None:
    """Write a file of this kind at `path` (replacing what is there)."""
    suffix = KINDS[kind][0]
    if kind.startswith("pickle"):
        evil(str(path), zip_format=suffix in ZIPPED)
        return
    if kind == "truncated safetensors":
        content = (tiny_sd / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
        content = content[: len(content) // 2]
    elif kind == "git lfs pointer":
        content = BROKEN["lfs"][0]
    elif kind == "html page":
        content = BROKEN["html"][0]
    elif kind == "header claims 1 TiB":
        content = struct.pack("<Q", 2**40) + b"{}"
    else:  # a valid header whose only tensor lies 4 TiB past the end of the file
        header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}})
        content = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16
    path.write_bytes(content)


def _resume_args(finished, tmp_path) -> tuple[Path, list]:
    """A copy of the finished run, and the arguments that resume its checkpoint for two more steps."""
    out = Path(shutil.copytree(finished[0], tmp_path / "run"))
    (_, path), = Checkpoints(out / "checkpoints").all()
    return path, ["train", "lora", *_args({**finished[1], "output": str(out), "steps": 4}), "--resume", path]


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "allow-pickle"])
@pytest.mark.parametrize("kind, role", CASES, ids=[f"{k}-as-{r}" for k, r in CASES])
def test_hostile_file_is_refused_in_one_line_and_runs_nothing(run_cli, evil, marker, tiny_sd, sd_copy, finished,
                                                              tmp_path, kind, role, allow_pickle):
    suffix, words = KINDS[kind]
    out = tmp_path / "out"
    args = ["generate", "a", "--steps", "1", "--out", out, "-q"]
    if role == "model":
        _write(kind, tmp_path / f"x{suffix}", evil, tiny_sd)
        args += ["--model", tmp_path / f"x{suffix}"]
    elif role in FOLDER_ROLES:
        for weights in (sd_copy / role).glob("*.safetensors"):
            weights.unlink()
        name = "pytorch_model" if role == "text_encoder" and suffix != ".safetensors" else FOLDER_ROLES[role]
        _write(kind, sd_copy / role / f"{name}{suffix}", evil, tiny_sd)
        args += ["--model", sd_copy]
    elif role == "lora":
        _write(kind, tmp_path / f"x{suffix}", evil, tiny_sd)
        args += ["--model", tiny_sd, "--lora", tmp_path / f"x{suffix}"]
    elif role == "vae-override":
        _write(kind, tmp_path / f"x{suffix}", evil, tiny_sd)
        args += ["--model", tiny_sd, "--vae", tmp_path / f"x{suffix}"]
    elif role == "embedding":  # called by its name, x, in the prompt
        (tmp_path / "emb").mkdir()
        _write(kind, tmp_path / "emb" / f"x{suffix}", evil, tiny_sd)
        args[1] = "a x"
        args += ["--model", tiny_sd, "--embedding-dir", tmp_path / "emb"]
    else:
        checkpoint, args = _resume_args(finished, tmp_path)
        _write(kind, checkpoint / ("optimizer.pt" if suffix == ".pt" else "rng_and_tensors.safetensors"), evil, tiny_sd)
        if suffix == ".pt":  # read with weights_only=True whatever the flags: the payload is refused as such
            words = "no code ran"
    if allow_pickle:
        args.append("--allow-pickle")
        if kind.startswith("pickle") and suffix != ".safetensors" and role != "checkpoint":
            # trusted, so read with torch.load(weights_only=True) (by diffusers or transformers inside a folder),
            # which refuses the payload; a folder's .ckpt/.pt/.pth is a name diffusers never reads
            words = "no file named" if role in FOLDER_ROLES and suffix != ".bin" else "no code ran"
    code, stdout, stderr = run_cli(*args)
    assert code == 2 and stdout == ""
    line = one_line(stderr).lower()
    assert line.startswith("t2i: error:") and words in line, line
    if role == "checkpoint":
        assert "cannot be resumed" in line
        assert [s for s, _ in Checkpoints(tmp_path / "run" / "checkpoints").all()] == [2]  # nothing trained on
    assert not marker.exists()
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_broken_model_folder_configs_are_refused_in_one_line(run_cli, sd_copy, tmp_path, case):
    part, _, what = case.partition(" config ")
    if part.startswith("model_index"):
        file, what = sd_copy / "model_index.json", part.partition(" ")[2]
    else:
        file = sd_copy / part / "config.json"
    if what == "missing":
        file.unlink()
    elif what == "malformed":
        file.write_text('{"in_channels": 4, ')
    else:
        file.write_text("[1, 2, 3]")
    code, stdout, stderr = run_cli("generate", "a", "--steps", "1", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert line.startswith("t2i: error:") and file.name in line, line


@pytest.mark.parametrize("damage", BROKEN_CHECKPOINTS)
def test_a_damaged_checkpoint_is_refused_in_one_line(run_cli, finished, tmp_path, damage):
    checkpoint, args = _resume_args(finished, tmp_path)
    target = checkpoint / damage.split()[0]
    if damage == "state.json not JSON":
        target.write_text("{not json")
    elif damage == "state.json without a step":
        target.write_text(json.dumps({k: v for k, v in json.loads(target.read_text()).items() if k != "step"}))
    elif damage.endswith("truncated"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    code, stdout, stderr = run_cli(*args)
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert line.startswith("t2i: error:") and "cannot be resumed" in line and BROKEN_CHECKPOINTS[damage] in line, line


def test_a_real_process_prints_one_line_too(sd_copy, evil, marker, tmp_path):
    """In-process capture misses loggers bound to the real stderr; a subprocess sees all of it."""
    (sd_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    evil(str(sd_copy / "vae" / "diffusion_pytorch_model.bin"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--allow-pickle"]):
        proc = subprocess.run([sys.executable, "-m", "t2i.cli", "generate", "a", "--model", str(sd_copy),
                               "--out", str(tmp_path / "o"), *extra], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and proc.stdout == ""
        assert one_line(proc.stderr).startswith("t2i: error:")
    assert not marker.exists()

