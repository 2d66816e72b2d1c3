"""Small assertions the test modules share."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent  # the checkout: subprocesses run `python -m t2i.cli` from it


def pixels(image) -> np.ndarray:
    """An image as an int16 array (H, W, 3), so differences do not wrap around."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def one_line(err: str) -> str:
    """The single line of an error message; fails on several lines or a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


class Payload:
    """Unpickling this runs code: it writes the marker file (see the `evil` fixture)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


BROKEN = {  # kind -> (content, words of the refusal): files that are not what their .safetensors name says
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4265380512\n",
            "git lfs"),
    "html": (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in</body></html>\n",
             "not a valid safetensors"),
    "tiny": (b"abc", "only 3 bytes"),
}


def lora_cfg(tiny_sd, data, out, **kw) -> dict:
    """A small `t2i train lora` config on the tiny model; `kw` overrides keys."""
    base = dict(model=str(tiny_sd), data=str(data), output=str(out), trigger="in sks style", rank=2, steps=4,
                batch=2, lr=1e-2, checkpoint_every=2, validation_every=0, validation_prompts=["a square"],
                validation_seeds=[0], prior_steps=2)
    return {**base, **kw}


def weights(path: Path) -> dict:
    """A safetensors file's tensors by name."""
    return load_file(str(path))


def lora_args(cfg: dict) -> list[str]:
    """The same config as `t2i train lora` flags."""
    return ["--model", cfg["model"], "--data", cfg["data"], "--output", cfg["output"], "--trigger", cfg["trigger"],
            "--rank", str(cfg["rank"]), "--steps", str(cfg["steps"]), "--batch", str(cfg["batch"]),
            "--lr", str(cfg["lr"]), "--checkpoint-every", str(cfg["checkpoint_every"]), "--validation-every", "0",
            "--validation-prompt", "a square", "--prior-steps", str(cfg.get("prior_steps", 0))]
