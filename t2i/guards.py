"""Checks that run before expensive work, and the numerical guard after it.

Every check raises `UsageError` with one line that says what was wrong and what
to do; the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from t2i.errors import NumericalError, UsageError
from t2i.samplers import get_sampler

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64-1


def check_size(width: int, height: int, multiple: int = 8) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < multiple:
            raise UsageError(f"{name} {value} is too small; use at least {multiple}")
        if value % multiple:
            lo, hi = value - value % multiple, value - value % multiple + multiple
            near = f"{lo} or {hi}" if lo >= multiple else f"{hi}"
            raise UsageError(f"{name} {value} is not a multiple of {multiple}; use {near}")


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")


def check_guidance(guidance: float) -> None:
    if not math.isfinite(guidance) or guidance < 0:
        raise UsageError(f"guidance must be a finite number >= 0, got {guidance}")


def check_autoguidance(scale: float) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"autoguidance must be a finite number >= 0 (0 turns it off), got {scale}")


def check_sampling(steps: int | None = None, guidance: float | None = None, autoguidance: float | None = None,
                   sampler: str | None = None) -> None:
    """The sampling settings a request may leave to the model (None): each one given is in range, the sampler
    is known (with a "did you mean")."""
    if steps is not None:
        check_steps(steps)
    if guidance is not None:
        check_guidance(guidance)
    if autoguidance is not None:
        check_autoguidance(autoguidance)
    if sampler:
        get_sampler(sampler)


MAX_BATCH = 100_000  # per call; memory is checked from an estimate once the model is loaded


def check_batch(batch: int) -> None:
    if batch < 1:
        raise UsageError(f"batch must be at least 1, got {batch}")
    if batch > MAX_BATCH:
        raise UsageError(f"batch {batch} is more than one call makes (at most {MAX_BATCH}); split the work "
                         "into several runs or a prompts file")


def check_seed(seed: int) -> int:
    """Seeds are integers in 0 .. 2**64-1 (what torch.Generator takes); anything else is refused."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if seed < 0 or seed > MAX_SEED:
        raise UsageError(f"seed {seed} is out of range; use 0 .. 2**64-1 (or -1 for a random seed)")
    return seed


def check_strength(strength: float) -> None:
    if not (0.0 < strength <= 1.0) or not math.isfinite(strength):
        raise UsageError(f"strength must be in (0, 1], got {strength}")


def check_clip_skip(n, depth: int | None = None) -> int:
    """A1111's clip skip: 1 (the last layer) .. the text encoder's depth; returns it as an int."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"clip skip must be a whole number >= 1 (1 = the last layer, 2 = the one before), got {n!r}")
    if depth is not None and n > depth:
        raise UsageError(f"clip skip {n} is beyond this model's text encoder, which has {depth} layers; "
                         f"use 1 .. {depth}")
    return n


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompts file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"prompts file {path} is a folder; give a text file with one prompt per line") from None
    except PermissionError:
        raise UsageError(f"prompts file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UsageError(f"prompts file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"prompts file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def check_writable_folder(folder: str | Path) -> Path:
    """The folder exists (or can be made) and is writable; made if missing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {folder} is a file; give a folder or a .png path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"output folder {folder} cannot be created: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} is not writable; choose another with --out")
    return folder


# --------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new job on `device` (CUDA: free device memory; CPU: MemAvailable within any
    cgroup limit); None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        limit, used = (Path("/sys/fs/cgroup", n).read_text().strip() for n in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


def check_memory(need: int, device: torch.device, advice: str) -> None:
    """Refuse a job whose estimated need exceeds the free memory (an estimate that errs low: it refuses only
    what cannot fit)."""
    free = available_memory(device)
    if free is not None and need > free:
        gib = 2**30
        raise UsageError(f"this needs about {need / gib:.1f} GiB of memory on {device.type} but "
                         f"{max(free, 0) / gib:.1f} GiB are free; {advice}")


# --------------------------------------------------------------------------- numerical guard


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode with the VAE; on NaN/inf (the fp16 overflow behind black images) retry in fp32.

    `latents` are already unscaled (divided by the scaling factor). Returns the
    decoded images in [-1, 1] as float32, shape (B, 3, H, W); a retry is logged. Raises
    NumericalError when the latents themselves are not finite or the fp32
    retry fails too.
    """
    if not is_finite(latents):
        raise NumericalError("the denoiser produced NaN/inf latents; rerun with --dtype fp32 (or a lower guidance)")
    dtype = vae.dtype
    # force_upcast is for fp16, whose range the VAE overflows; bf16 has fp32's range (diffusers upcasts fp16 only)
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if not upcast:
        with torch.no_grad():
            images = vae.decode(latents.to(dtype)).sample  # (B, 3, H, W)
        if is_finite(images):
            return images.float()
        log.warning("the VAE overflowed in %s; decoding again in fp32", str(dtype).replace("torch.", ""))
    with torch.no_grad():
        vae.to(torch.float32)
        try:
            images = vae.decode(latents.float()).sample
        finally:
            vae.to(dtype)
    if not is_finite(images):
        raise NumericalError("the VAE decoded NaN/inf even in fp32; the model or its VAE is broken")
    return images
