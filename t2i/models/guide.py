"""A model's autoguidance guide, stored as a few bits per weight of its difference from the model's UNet.

Autoguidance (Karras et al. 2024; pipelines.unet_calls.autoguided_unet) steers away from a weaker version of the same
model. An earlier checkpoint of the model's own training run is the natural one, and it differs from the final
UNet far less than either weighs, so guide/ need not hold a second UNet: `delta.safetensors` holds
(checkpoint - unet) with every weight matrix quantized row by row (2**bits levels, evenly spaced, the step that
loses the least squared error; BitDelta's sign-and-scale at 1 bit), vectors and biases in fp16, and the
fingerprint of the unet/ it was taken against. At 3 bits that is 1/5 of the UNet's fp16 size.

`make` writes a guide/ folder (delta or whole-UNet), `read` rebuilds the guide's weights; loading.load_guide
decides which layout a folder has.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from t2i.errors import ModelLoadError, UsageError, first_line
from t2i.files import atomic_write, check_safetensors
from t2i.guards import check_autoguidance
from t2i.models.loading import check_component, from_vetted_folder, quiet_loading

DELTA_FILE = "delta.safetensors"
FORMAT = "t2i-guide-delta"
UNET_FILE = "diffusion_pytorch_model.safetensors"
FULL = 16  # `bits` that stores the guide as a whole UNet in fp16 rather than as a difference
_STEP_GRID = torch.linspace(0.02, 1.0, 50)  # candidate steps, as fractions of the step that reaches a row's max


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A UNet's identity by value: names, shapes and fp32 values (the same for its fp16 and fp32 files)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- quantizing


def quantize(d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `d` (rows, cols) as codes in [0, 2**bits) and a per-row fp16 step; see dequantize."""
    levels = 2**bits
    d = d.float()
    top = d.abs().amax(dim=1, keepdim=True)
    best_err, best_codes, best_step = torch.full_like(top, float("inf")), torch.zeros_like(d), torch.zeros_like(top)
    for f in _STEP_GRID:
        step = (top * f / (levels / 2 - 0.5)).half().float()  # as stored
        safe = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero row: any code, times step 0
        codes = torch.clamp(torch.round(d / safe - 0.5), -levels // 2, levels // 2 - 1) + levels // 2
        err = (_levels(codes, step, levels) - d).square().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better, codes, best_codes)
        best_step = torch.where(better, step, best_step)
    return best_codes.to(torch.uint8), best_step.squeeze(1).half()


def _levels(codes: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    return (codes.float() - levels // 2 + 0.5) * step


def dequantize(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return _levels(codes, step.float()[:, None], 2**bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes < 2**bits as a dense bit stream, `bits` bits each, most significant first (uint8 bytes)."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    stream = ((codes.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """pack's inverse. Every 8 codes fill exactly `bits` bytes: each such group is read as one 64-bit word and
    its 8 codes shifted out (a few whole-tensor operations per group byte, not one per bit: start-up time)."""
    groups = -(-count // 8)
    data = torch.cat([packed.reshape(-1), packed.new_zeros(max(0, groups * bits - packed.numel()))])[: groups * bits]
    word = torch.zeros(groups, dtype=torch.int64)
    for i in range(bits):
        word = (word << 8) | data[i::bits].long()
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * bits
    return ((word[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count].to(torch.uint8)


def encode(base: dict[str, torch.Tensor], guide: dict[str, torch.Tensor], bits: int):
    """(tensors, metadata, kept): the difference guide - base as delta.safetensors holds it, and the share of the
    difference's energy the quantized one keeps (1 - lost / total)."""
    tensors, total, lost = {}, 0.0, 0.0
    for key, w in base.items():
        d = guide[key].float() - w.float()
        if d.dim() >= 2:
            rows = d.reshape(d.shape[0], -1)
            codes, step = quantize(rows, bits)
            tensors[f"{key}.codes"] = pack(codes, bits)
            tensors[f"{key}.step"] = step
            q = dequantize(codes, step, bits)
        else:
            tensors[key] = d.half()
            q = tensors[key].float().reshape(-1, 1)
            rows = d.reshape(-1, 1)
        total += float(rows.square().sum())
        lost += float((q - rows).square().sum())
    metadata = {"format": FORMAT, "bits": str(bits), "base": "unet", "base_fingerprint": fingerprint(base)}
    return tensors, metadata, 1.0 - lost / total if total else 1.0


def decode(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The guide's weights (fp32): base plus the stored difference."""
    out = {}
    for key, w in base.items():
        w = w.float()
        if f"{key}.codes" in tensors:
            step = tensors[f"{key}.step"]
            codes = unpack(tensors[f"{key}.codes"], bits, w.numel())
            out[key] = w + dequantize(codes.reshape(len(step), -1), step, bits).reshape(w.shape)
        elif key in tensors:
            out[key] = w + tensors[key].float().reshape(w.shape)
        else:
            raise KeyError(key)
    return out


# ---------------------------------------------------------------------------- reading


def read(folder: Path, base_file: Path) -> dict[str, torch.Tensor]:
    """A delta guide's weights (fp32) from its folder and the unet/ weights file it was made against."""
    delta = folder / DELTA_FILE
    with safe_open(str(delta), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or not meta.get("bits", "").isdigit() or not 1 <= int(meta["bits"]) <= 8:
        raise ModelLoadError(f"{delta} is not a t2i guide difference (format {meta.get('format')!r}, bits "
                             f"{meta.get('bits')!r}); remake it with `t2i guide`")
    if not base_file.is_file():
        raise ModelLoadError(f"{delta} is a difference from {base_file}, which is missing; give the model folder "
                             "its unet/ weights as a single safetensors file")
    base = load_file(str(base_file))
    if fingerprint(base) != meta.get("base_fingerprint"):
        raise ModelLoadError(f"{folder} was made against another unet/ than this folder's (fingerprints "
                             f"{meta.get('base_fingerprint')} and {fingerprint(base)}); remake it with "
                             f"`t2i guide --model {folder.parent} --from CHECKPOINT`, or delete it")
    try:
        return decode(base, load_file(str(delta)), int(meta["bits"]))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{delta} does not match {base_file} ({e}); remake it with `t2i guide`") from None


# ---------------------------------------------------------------------------- making


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """A UNet's weights from what training leaves: a `t2i train demo` checkpoint folder (its EMA UNet, the one
    that gets exported), a diffusers UNet folder, a model folder (its unet/), or a .safetensors file."""
    candidates = [path] if path.is_file() else [
        path / "ema_unet.safetensors", path / "unet.safetensors", path / UNET_FILE, path / "unet" / UNET_FILE]
    for file in candidates:
        if file.is_file():
            if file.suffix != ".safetensors":
                raise UsageError(f"{file}: only safetensors weights are read; convert it first")
            check_safetensors(file)
            return load_file(str(file))
    raise UsageError(f"{path}: no UNet weights found; give a `t2i train demo` checkpoint folder "
                     "(ema_unet.safetensors), a diffusers UNet or model folder, or a .safetensors file")


def check_request(model: Path, source: Path, bits: int, scale: float, below: int, overwrite: bool) -> Path:
    """The checks of `t2i guide` that need no weights; returns the model's unet/ weights file."""
    base_file = model / "unet" / UNET_FILE
    if not (model / "model_index.json").is_file():
        raise UsageError(f"{model} is not a diffusers model folder (no model_index.json); give the folder "
                         "the guide is for")
    if not base_file.is_file():
        raise UsageError(f"{model} has no unet/{UNET_FILE}; a guide is made against the UNet's safetensors file")
    if not source.exists():
        raise UsageError(f"{source} does not exist; give an earlier checkpoint of the model's training")
    if bits != FULL and not 1 <= bits <= 8:
        raise UsageError(f"--bits {bits}: give 1 to 8 (bits per weight of the difference), or {FULL} (the whole "
                         "UNet in fp16)")
    if not 0 < below <= 1000:
        raise UsageError(f"--below {below}: give a training timestep in 1..1000 (steps with less noise than it "
                         "are autoguided)")
    check_autoguidance(scale)
    if (model / "guide").exists() and not overwrite:
        raise UsageError(f"{model / 'guide'} exists; pass --overwrite to replace it")
    _read_defaults(model / "t2i.json")
    return base_file


def make(model: Path, source: Path, bits: int = 3, scale: float = 3.0, below: int = 500,
         overwrite: bool = False) -> tuple[Path, float]:
    """Give the model folder a guide/ from an earlier checkpoint and turn autoguidance on in its t2i.json.

    Returns the guide folder and the share of the difference's energy it keeps (1.0 for a whole UNet).
    Written beside the old guide and swapped in at the end, so a failure leaves the folder as it was.
    """
    base_file = check_request(model, source, bits, scale, below, overwrite)
    base, weights = load_file(str(base_file)), checkpoint_weights(source)
    wrong = sorted(k for k in base if k not in weights or weights[k].shape != base[k].shape)
    if wrong:
        raise UsageError(f"{source} is not this model's UNet architecture (first mismatch: {wrong[0]}); give a "
                         "checkpoint of the same training run")
    target, tmp = model / "guide", model / ".guide.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copy(base_file.parent / "config.json", tmp / "config.json")
        if bits == FULL:
            save_file({k: weights[k].half().contiguous() for k in base}, str(tmp / UNET_FILE), {"format": "pt"})
            kept = 1.0
        else:
            tensors, meta, kept = encode(base, weights, bits)
            meta["source"] = source.name if source.is_dir() else f"{source.parent.name}/{source.name}"
            save_file(tensors, str(tmp / DELTA_FILE), meta)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = model / ".guide.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)  # kept until the new guide is in place
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _set_defaults(model / "t2i.json", scale, below)
    return target, kept


def _read_defaults(path: Path) -> dict:
    try:
        values = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        values = None
    if not isinstance(values, dict):
        raise UsageError(f"{path} is not a JSON object; fix or delete it, then run again")
    return values


def _set_defaults(path: Path, scale: float, below: int) -> None:
    values = _read_defaults(path) | {"autoguidance": scale, "autoguidance_below": below}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(values, indent=1) + "\n")


GUIDE_FOLDER = "guide"  # a model folder's weaker UNet for autoguidance (the bundled model ships one)


def load_guide(model_path: Path | None, dtype, device, unet_config):
    """The model folder's guide/ UNet (autoguidance, see pipelines.unet_calls.autoguided_unet), or None without one.

    Vetted like every component (safetensors only, no code) and checked against the model's UNet: it must
    read the same latents and the same text embeddings. Its weights are a UNet's own, or a difference from the
    model's unet/ (t2i.guide's delta.safetensors, made by `t2i guide`).
    """
    folder = model_path / GUIDE_FOLDER if model_path is not None and model_path.is_dir() else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = check_component(folder, allow_pickle=False)
    kind = config.get("_class_name")
    if kind != "UNet2DConditionModel":
        raise ModelLoadError(f"{folder} is not a UNet2DConditionModel (its config says {kind or 'no _class_name'}); "
                             f"a model's {GUIDE_FOLDER}/ holds the UNet that autoguidance steers away from")
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if config.get(key) != unet_config.get(key):
            raise ModelLoadError(f"{folder}: {key} is {config.get(key)}, the model's UNet has "
                                 f"{unet_config.get(key)}; the guide must read the same latents and prompts")
    if (folder / DELTA_FILE).is_file():  # a difference from the model's UNet (t2i.guide)
        weights = read(folder, model_path / "unet" / UNET_FILE)
        with quiet_loading():
            guide = UNet2DConditionModel.from_config(config)
        try:
            guide.load_state_dict(weights)
        except RuntimeError as e:
            raise ModelLoadError(f"{folder}/config.json does not describe the UNet its difference rebuilds "
                                 f"({first_line(e)}); remake it with `t2i guide`") from None
        guide.to(dtype)
    else:
        guide = from_vetted_folder(UNet2DConditionModel, folder, dtype, "the guide UNet")
    return guide.to(device).eval().requires_grad_(False)
