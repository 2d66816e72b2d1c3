"""Train the demo model `t2i-shapes` from scratch on the shapes world.

The stages, each resumable, each one command (`t2i train demo --stage S`):

1. tokenizer: a CLIP BPE tokenizer over the shapes world's words
   (stock `CLIPTokenizer.from_pretrained` loads it).
2. vae: an AutoencoderKL, 64x64x3 <-> 16x16x4, reconstruction (MSE) + a tiny KL.
3. text (optional, `text.layout_steps`): the CLIPTextModel alone learns to
   draw a coarse picture of each caption's scene (an auxiliary head, never
   exported), so the UNet starts from words that already say where things are.
4. unet: the CLIPTextModel and a UNet2DConditionModel trained together
   (epsilon or v objective, min-SNR weighting, optionally the layout task
   kept on), on VAE latents; an EMA copy of both is what gets exported.
5. decoder (optional, `vae.decoder_steps`): the VAE decoder fine-tuned on the
   frozen encoder's latents.
6. tiny_vae (optional, `vae.tiny_steps`): a TAESD-style AutoencoderTiny in the
   same latent space, the small decoder of the speed option `tiny_vae`.
7. export: the diffusers folder from the newest checkpoints.

`--stage all` runs them in order and writes a diffusers folder that stock
`StableDiffusionPipeline.from_pretrained` loads. Every training stage is a Job
for the one training loop (train/loop.py): accelerate (one CPU process here, a
GPU when there is one, several processes under `accelerate launch`), resume,
checkpoints, logs and the time budget are the loop's.

The modules, by noun: config (the TOML tables), scenes (the data), tokenizer,
models (the parts and the layout task), metrics (PSNR), vae_stages (vae,
decoder, tiny_vae), unet_stages (text, unet), export (the diffusers folder).
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState

from t2i.errors import UsageError
from t2i.train import loop
from t2i.train.checkpoint import Checkpoints
from t2i.train.demo.config import (CONFIGS, DemoConfig, GuideConfig, TextConfig, TokenizerConfig, UNetConfig,
                                   VAEConfig, check, config_path, run_config)
from t2i.train.demo.export import assemble, export, sample_grid, stage_export
from t2i.train.demo.metrics import batched_psnr, held_out_latents, psnr, tiny_vae_psnr, vae_psnr
from t2i.train.demo.models import (LayoutHead, build_text_encoder, build_tiny_vae, build_unet, build_vae,
                                   layout_error, train_noise_scheduler)
from t2i.train.demo.scenes import VAL_SEED, batch_seed, held_out_renders, scene_batch, step_scenes
from t2i.train.demo.tokenizer import build_tokenizer, stage_tokenizer
from t2i.train.demo.unet_stages import SAMPLE_PROMPTS, stage_text, stage_unet
from t2i.train.demo.vae_stages import export_vae, generated_pool, stage_decoder, stage_tiny_vae, stage_vae

__all__ = [  # the demo training's Python API, by module
    "run", "STAGES",
    "CONFIGS", "DemoConfig", "GuideConfig", "TextConfig", "TokenizerConfig", "UNetConfig", "VAEConfig", "check",
    "config_path", "run_config",
    "assemble", "export", "sample_grid", "stage_export",
    "batched_psnr", "held_out_latents", "psnr", "tiny_vae_psnr", "vae_psnr",
    "LayoutHead", "build_text_encoder", "build_tiny_vae", "build_unet", "build_vae", "layout_error",
    "train_noise_scheduler",
    "VAL_SEED", "batch_seed", "held_out_renders", "scene_batch", "step_scenes",
    "build_tokenizer", "stage_tokenizer",
    "SAMPLE_PROMPTS", "stage_text", "stage_unet",
    "export_vae", "generated_pool", "stage_decoder", "stage_tiny_vae", "stage_vae",
]

log = logging.getLogger(__name__)

STAGES = {"tokenizer": stage_tokenizer, "vae": stage_vae, "text": stage_text, "unet": stage_unet, "decoder": stage_decoder,
          "tiny_vae": stage_tiny_vae, "export": stage_export}
# A run that continues a model (unet.init_from) keeps that model's tokenizer and VAE: a new one would not be the
# token ids and latent space its UNet learnt. `all` then runs the stages that train on top of them.
CONTINUED = ("tokenizer", "vae")


def run(config: str | None, stage: str = "all", resume: str | None = "latest", overrides: dict | None = None) -> None:
    """Run one stage or all of them (`stage='all'`), resuming from the latest checkpoints. `config`: a TOML path,
    a shipped config's name (see config_path), or None for the dataclasses' defaults."""
    cfg = run_config(config, overrides)
    if stage not in (*STAGES, "all"):
        raise UsageError(f"unknown stage {stage!r}; use one of: {', '.join(STAGES)}, all")
    check(cfg)  # before an `all` run's earlier stages
    if cfg.unet.init_from and stage in CONTINUED:
        raise UsageError(f"stage {stage} would replace the tokenizer and VAE of unet.init_from's model, which its "
                         "UNet learnt; run the text, unet, decoder, tiny_vae or export stage, or drop unet.init_from")
    names = [n for n in STAGES if not (cfg.unet.init_from and n in CONTINUED)] if stage == "all" else [stage]
    budget = loop.TimeBudget(cfg.max_minutes)  # for the whole run, all its stages
    try:
        for name in names:
            if name == "tokenizer":
                if stage == "all" and (Path(cfg.output_dir) / "tokenizer" / "vocab.json").is_file():
                    continue
                stage_tokenizer(cfg)
            elif name == "export":
                stage_export(cfg, resume)
            else:
                STAGES[name](cfg, resume, budget)
    except loop.OutOfTime as stop:
        state = PartialState()
        if state.is_main_process:
            log.info("%s; the same command goes on from there", stop)
        if "export" in names and Checkpoints(Path(cfg.output_dir) / "unet_checkpoints").latest() is not None:
            if state.is_main_process:
                stage_export(cfg, "latest")  # the newest UNet checkpoint, the one just written
            state.wait_for_everyone()
