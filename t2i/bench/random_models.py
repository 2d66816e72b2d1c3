"""Randomly initialised models of real architectures' sizes (SD 1.5, SDXL), built in memory: what `t2i bench
--arch` times where no weights can be downloaded. Speed depends on the architecture, not on the weights."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from t2i import models
from t2i.devices import resolve_device, resolve_dtype
from t2i.errors import UsageError
from t2i.models.tiny_vae import TINY_VAE_FOLDER
from t2i.pipelines import Text2Image
from t2i.pipelines.base import LoadedModel


# Random models of the real architectures' sizes (diffusers' / transformers' configs of SD 1.5 and SDXL 1.0).
_SD_VAE = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


ARCHS = {
    "sd15": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "text_encoder": _CLIP_L,
        "vae": _SD_VAE,
    },
    "sdxl": {
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                     transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        "text_encoder": _CLIP_L,
        "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                               hidden_act="gelu"),
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
    },
}


_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, prediction_type="epsilon")


def random_pipeline(arch: str, device: str = "auto", dtype: str = "auto", seed: int = 0, tiny_vae: bool = False):
    """A Text2Image over a randomly initialised model of `arch`'s real size (ARCHS), built in memory. With
    `tiny_vae` its folder (a temporary one, removed at exit) holds a random TAESD-sized vae_tiny/ for the
    speed option of that name."""
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; choose from: {', '.join(ARCHS)}")
    config = ARCHS[arch]
    bundled = models.resolve(None)  # the demo model's tokenizer: ids stay below CLIP's vocabulary size
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(bundled.location) / "tokenizer"))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    parts = {
        "unet": diffusers.UNet2DConditionModel(**config["unet"]),
        "vae": diffusers.AutoencoderKL(**config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"], **ids)),
        "tokenizer": tokenizer,
        "scheduler": diffusers.EulerDiscreteScheduler(**_SD_SCHEDULER),
    }
    if arch == "sdxl":
        parts |= {"text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"], **ids)),
                  "tokenizer_2": tokenizer}
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    dev = resolve_device(device)
    pipe.to(dev, resolve_dtype(dtype, dev))
    name = f"random-{arch}"
    folder = Path(f"<{name}>")
    if tiny_vae:
        folder = Path(tempfile.mkdtemp(prefix=f"t2i-{name}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        tiny = diffusers.AutoencoderTiny(**config.get("tiny_vae", {}))  # default: TAESD's own layout
        tiny.save_pretrained(str(folder / TINY_VAE_FOLDER))
    source = models.ModelSource("random", name, name, name)
    return Text2Image(pipe, LoadedModel(source, "sdxl" if arch == "sdxl" else "sd1", folder, "0" * 10))
