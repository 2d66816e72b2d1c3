"""A VAE in place of the model's own (A1111's `--vae`/`sd_vae`): a diffusers VAE folder or a single weights file.

Single files come as A1111 users have them: the original (LDM) layout (`encoder.down.0.block.0...`, often
under `first_stage_model.`), converted with diffusers' own converter onto the model's VAE config, or already
in diffusers' layout. Files are vetted like any weights: safetensors, or pickles only with allow_pickle (then
read with weights_only). A1111's infotext names the file ("VAE") and its sha256 ("VAE hash", 10 hex).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file

from t2i.errors import ModelLoadError, UsageError, did_you_mean, first_line
from t2i.files import WEIGHT_SUFFIXES, check_weight_file, file_sha256, load_pickled_weights
from t2i.models.loading import check_component, from_vetted_folder, quiet_loading

IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates"}  # as A1111's sd_vae drops them (and loss.*)


def vae_names(folder: str | Path | None) -> dict[str, Path]:
    """The VAEs of a folder (A1111's models/VAE): weights files and diffusers VAE folders, by file name."""
    found: dict[str, Path] = {}
    if folder is None or not Path(folder).is_dir():
        return found
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and not (p.parent / "config.json").is_file():
            found.setdefault(p.name, p)  # a weights file of its own, not one of a diffusers folder
        elif p.is_dir() and _is_vae_folder(p):
            found.setdefault(p.name, p)
    return found


def _is_vae_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_vae(value: str | Path, vae_dir: str | Path | None = None, allow_pickle: bool = False) -> Path:
    """The VAE that `value` names (a path, or a name in `vae_dir`, with or without its suffix), vetted; loads
    nothing. One-line errors for a missing, hostile or broken file."""
    path = Path(value).expanduser()
    if not path.exists() and vae_dir is not None:
        names = vae_names(vae_dir)
        stems = {Path(n).stem: p for n, p in names.items()} | {n.split(".vae.")[0]: p for n, p in names.items()}
        path = names.get(str(value)) or stems.get(str(value)) or path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"VAE {value} is a folder without config.json; give a diffusers VAE folder or a "
                             ".safetensors file")
        check_component(path, allow_pickle)
        return path
    if path.is_file():
        check_weight_file(path, allow_pickle)
        return path
    listed = list(vae_names(vae_dir)) if vae_dir is not None else []
    spellings = {k: n for n in listed for k in (n, Path(n).stem, n.split(".vae.")[0])}
    hint = did_you_mean(str(value), spellings) if listed else ""
    where = f" or a name in {vae_dir}" if vae_dir is not None else ""
    raise UsageError(f"VAE {value} does not exist{f' ({hint})' if hint else ''}; give a diffusers VAE folder, "
                     f"a .safetensors file{where}")


def vae_hash(path: Path) -> str:
    """A1111's "VAE hash": sha256 of the file, 10 hex; for a diffusers folder, over its weights as model_hash."""
    if path.is_file():
        return file_sha256(path)[:10]
    h = hashlib.sha256()
    for p in sorted(path.rglob("*.safetensors")):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:10]


def _state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a header that passed vetting can still hold bad data
            raise ModelLoadError(f"could not read the VAE {path}: {first_line(e)}") from None
    else:
        check_weight_file(path, allow_pickle)
        state = load_pickled_weights(path)
        state = state.get("state_dict", state)
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.startswith("loss") and k not in IGNORED_KEYS}


def _is_ldm(keys) -> bool:
    return any(".down.0." in k or k.startswith(("first_stage_model.", "vae.")) or ".mid.block_1." in k
               for k in keys)


def load_vae(path: Path, like: AutoencoderKL, dtype, device, allow_pickle: bool = False) -> AutoencoderKL:
    """The VAE at `path` (vetted by resolve_vae), ready on `device` in `dtype`. A single file takes the
    model's VAE config (`like`), as A1111 loads a VAE's weights into the model's own first stage."""
    with quiet_loading():  # diffusers' notes on casting say nothing a user can act on
        vae = _build(path, like, dtype, allow_pickle)
    if vae.config.latent_channels != like.config.latent_channels:
        raise UsageError(f"the VAE {path.name} has {vae.config.latent_channels}-channel latents, this model "
                         f"{like.config.latent_channels}; give a VAE made for this model family")
    with quiet_loading():
        return vae.to(device).eval().requires_grad_(False)


def _build(path: Path, like: AutoencoderKL, dtype, allow_pickle: bool) -> AutoencoderKL:
    if path.is_dir():
        vae = from_vetted_folder(AutoencoderKL, path, dtype, "the VAE")
    else:
        state = _state_dict(path, allow_pickle)
        if _is_ldm(state):
            try:
                state = convert_ldm_vae_checkpoint(state, dict(like.config))
            except (KeyError, IndexError, ValueError, RuntimeError) as e:
                raise ModelLoadError(f"could not convert the VAE {path.name} from the original layout: "
                                     f"{first_line(e)}") from None
        vae = AutoencoderKL.from_config(like.config)
        try:
            vae.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"the VAE {path.name} does not fit this model's VAE ({first_line(e)[:160]}); "
                                 "give a VAE made for this model family") from None
        vae = vae.to(dtype)
    return vae
