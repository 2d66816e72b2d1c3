"""The demo model's diffusers folder: assembled from the run's parts and the newest UNet checkpoint's EMA
weights, stored in fp16, with its small decoder, its guide and t2i's defaults beside it; and sample grids."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from t2i.demo.shapes import IMAGE_SIZE
from t2i.errors import UsageError
from t2i.files import give_usual_mode
from t2i.train.checkpoint import Checkpoints
from t2i.train.config import to_dict
from t2i.train.demo.config import DemoConfig
from t2i.train.demo.models import build_text_encoder, build_unet, train_noise_scheduler

log = logging.getLogger(__name__)


def stage_export(cfg: DemoConfig, resume: str | None = "latest") -> Path:
    """Build the diffusers folder from the newest UNet checkpoint's EMA weights and the current VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    root = Path(cfg.output_dir)
    path = Checkpoints(root / "unet_checkpoints").resolve(resume or "latest")
    if path is None:
        raise UsageError(f"no UNet checkpoint in {root / 'unet_checkpoints'}; run the unet stage first")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg, IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1))
    text_encoder.load_state_dict(load_file(str(path / "ema_text_encoder.safetensors")))
    unet.load_state_dict(load_file(str(path / "ema_unet.safetensors")))
    out = export(cfg, assemble(cfg, tokenizer, text_encoder.eval(), vae, unet.eval()))
    step = json.loads((path / "state.json").read_text())["step"]
    (out / "t2i.json").write_text(json.dumps({"steps": 20, "guidance": 5.0, "sampler": "dpm++2m-karras",
                                              "trained_unet_steps": step}, indent=1))
    _export_guide(cfg, out, step)
    return out


def _export_guide(cfg: DemoConfig, out: Path, exported_step: int) -> None:
    """The model's guide/ from the run's checkpoint of guide.step (see GuideConfig); a note when there is none."""
    from t2i.models import guide

    g = cfg.guide
    source = Path(cfg.output_dir) / "unet_checkpoints" / f"step-{g.step:08d}"
    if (out / "guide").exists():  # an earlier export's, made against another UNet
        shutil.rmtree(out / "guide")
    if not g.step:
        return
    if g.step >= exported_step or not (source / "ema_unet.safetensors").is_file():
        why = "not before the exported step" if g.step >= exported_step else f"{source} is missing"
        log.info("export: no guide/ (%s; guide.step names an earlier UNet checkpoint of this run)", why)
        return
    folder, kept = guide.make(out, source, g.bits, g.scale, g.below, overwrite=True)
    log.info("export: guide/ from step %d, %d bits per weight (%.1f%% of the difference kept) -> %s",
             g.step, g.bits, 100 * kept, folder)


def assemble(cfg: DemoConfig, tokenizer, text_encoder, vae, unet):
    """A stock StableDiffusionPipeline over the given parts (the default sampler's scheduler)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    base = train_noise_scheduler(cfg.unet).config
    scheduler = DPMSolverMultistepScheduler.from_config(base, use_karras_sigmas=True)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], out: Path, seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 5.0) -> Path:
    """Render each prompt with each seed into one grid PNG (rows: prompts, columns: seeds)."""
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    size = IMAGE_SIZE
    grid = Image.new("RGB", (size * len(seeds), size * len(prompts)), "white")
    for r, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size).images
        for c, im in enumerate(images):
            grid.paste(im, (c * size, r * size))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def export(cfg: DemoConfig, pipe) -> Path:
    """Write the diffusers folder with every weight in fp16 (half the size). Stock diffusers loads its own parts
    as fp32; transformers would keep the text encoder in the dtype its config names, which stays float32 (the
    model's own), so stock pipelines run in fp32 throughout."""
    out = Path(cfg.export_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)  # as trained (fp32); every file halved below
    for name in ("vocab.json", "merges.txt"):  # for transformers versions without tokenizer.json support
        shutil.copy(Path(cfg.output_dir) / "tokenizer" / name, out / "tokenizer" / name)
    tiny = Path(cfg.output_dir) / "vae_tiny"  # not a pipeline component: the speed option `tiny_vae` reads it
    if (tiny / "config.json").is_file():
        shutil.copytree(tiny, out / "vae_tiny", dirs_exist_ok=True)
    (out / "training_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    for weights in out.rglob("*.safetensors"):
        _to_fp16(weights)
        give_usual_mode(weights)
    log.info("exported diffusers model -> %s", out)
    return out


def _to_fp16(path: Path) -> None:
    """Rewrite a safetensors file's fp32 tensors as fp16 (in place; metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    if any(t.dtype == torch.float32 for t in tensors.values()):
        save_file({k: t.half() if t.dtype == torch.float32 else t for k, t in tensors.items()}, str(path), metadata)
