"""A model's small VAE decoder (diffusers' AutoencoderTiny, TAESD-style): the speed option `tiny_vae`."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderTiny

from t2i.errors import ModelLoadError, UsageError
from t2i.models.loading import check_component, from_vetted_folder, hub_snapshot
from t2i.models.sources import is_hub_id


TINY_VAE_FOLDER = "vae_tiny"  # a model folder's own small decoder (the bundled model ships one)


def tiny_vae_folder(value: str, model_path: Path | None) -> Path:
    """Where the small VAE decoder of `--speed tiny_vae[=VALUE]` (a diffusers AutoencoderTiny, TAESD-style) lives:
    VALUE a local folder or a hub id; no VALUE: the model folder's own vae_tiny/."""
    if not value:
        own = model_path / TINY_VAE_FOLDER if model_path is not None and model_path.is_dir() else None
        if own is None or not (own / "config.json").is_file():
            raise UsageError(f"this model has no {TINY_VAE_FOLDER}/ folder; give a tiny VAE with --speed "
                             "tiny_vae=PATH (an AutoencoderTiny folder, e.g. a local copy of madebyollin/taesd)")
        return own
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(value):
        raise UsageError(f"tiny_vae {value}: not a folder; give an AutoencoderTiny folder (config.json and "
                         ".safetensors weights) or a hub id such as madebyollin/taesd")
    return hub_snapshot(value)


def load_tiny_vae(folder: Path, dtype, device, latent_channels: int):
    """An AutoencoderTiny from a vetted folder (safetensors only, no code), checked against the UNet's latents."""
    kind = check_component(folder, allow_pickle=False).get("_class_name")
    if kind != "AutoencoderTiny":
        raise ModelLoadError(f"{folder} is not an AutoencoderTiny (its config says {kind or 'no _class_name'}); "
                             "give a tiny VAE folder (TAESD-style)")
    vae = from_vetted_folder(AutoencoderTiny, folder, dtype, "the tiny VAE")
    if vae.config.latent_channels != latent_channels:
        raise UsageError(f"the tiny VAE {folder} decodes {vae.config.latent_channels}-channel latents, this model "
                         f"makes {latent_channels}; give the tiny VAE made for this model family")
    return vae.to(device).eval().requires_grad_(False)


