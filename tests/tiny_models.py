"""Tiny random models, built in-process in seconds: SD 1.x-style and SDXL-style.

Like diffusers' own fast tests: `torch.manual_seed(0)`, a few channels, one or
two layers. Saved as ordinary diffusers folders (safetensors), so every test
goes through the same loading code a real model does.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_tokenizer(out: Path):
    """A CLIP-format BPE tokenizer over the shapes world's words (plus every printable character)."""
    from t2i.train.demo import DemoConfig, build_tokenizer

    cfg = DemoConfig()
    return build_tokenizer(cfg, out)


def _scheduler():
    from t2i.train.demo import train_noise_scheduler
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(train_noise_scheduler().config)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )


def _text_encoder(tokenizer, hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_sd(folder: Path, tokenizer_dir: Path) -> Path:
    """An SD 1.x-layout model: 32x32 images, 16x16x4 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_sdxl(folder: Path, tokenizer_dir: Path, hidden_2: int = 32) -> Path:
    """An SDXL-layout model: two text encoders, pooled embeddings and time ids.

    `hidden_2` is text_encoder_2's width. Single-file loading tells SDXL's two encoders apart by
    width (768 vs 1280 in the real model), so a single-file round trip needs it to differ from 32.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=32 + hidden_2, norm_num_groups=8,  # the two encoders' outputs, concatenated
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer),
        text_encoder_2=_text_encoder(tokenizer, hidden_2, projection=True), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=_scheduler(),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
