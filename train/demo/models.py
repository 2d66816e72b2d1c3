"""The demo model's parts, built from the config: VAE, small decoder, text encoder, UNet and its noise schedule,
and the text encoder's auxiliary layout task (LayoutHead)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i.demo.shapes import IMAGE_SIZE
from t2i.errors import UsageError
from t2i.train.demo.config import DemoConfig, UNetConfig


def build_vae(cfg: DemoConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.vae.block_out_channels),
        layers_per_block=cfg.vae.layers_per_block,
        latent_channels=cfg.vae.latent_channels,
        norm_num_groups=cfg.vae.norm_num_groups,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_tiny_vae(cfg: DemoConfig):
    from diffusers import AutoencoderTiny

    n, cv = len(cfg.vae.block_out_channels), cfg.vae
    if len(cv.tiny_blocks) != n:
        raise UsageError(f"vae.tiny_blocks needs one entry per VAE level ({n}), got {cv.tiny_blocks}")
    return AutoencoderTiny(
        encoder_block_out_channels=[cv.tiny_channels] * n,
        decoder_block_out_channels=[cv.tiny_channels] * n,
        num_encoder_blocks=[1] * n,
        num_decoder_blocks=list(cv.tiny_blocks),
        latent_channels=cv.latent_channels,
        scaling_factor=1.0,  # it reads and writes the UNet's latents as they are
    )


def build_text_encoder(cfg: DemoConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.text
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            max_position_embeddings=cfg.tokenizer.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


class LayoutHead(torch.nn.Module):
    """A caption's pooled feature (B, D) -> a coarse picture of its objects (B, 4, cells, cells): the text
    encoder's auxiliary task. The pooled feature is CLIP's, the end-of-text token's state, which has read the
    whole caption; an MLP, not attention, draws the picture, so each cell's colour is a direct function of
    it and the gradient asks the encoder itself for what, where and which colour goes with which shape."""

    def __init__(self, dim: int, cells: int, hidden: int = 512):
        super().__init__()
        self.cells = cells
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 4 * cells * cells))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled).view(-1, 4, self.cells, self.cells)


def layout_error(drawn: torch.Tensor, picture: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the LayoutHead's pictures over the captions that fix their layout (0 if none)."""
    err = F.mse_loss(drawn.float(), picture.to(drawn.device), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    w = fixed.to(drawn.device, err.dtype)
    return (err * w).sum() / w.sum().clamp(min=1)


def build_unet(cfg: DemoConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        layers_per_block=u.layers_per_block,
        block_out_channels=list(u.block_out_channels),
        down_block_types=list(u.down_block_types),
        up_block_types=list(u.up_block_types),
        cross_attention_dim=cfg.text.hidden_size,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


def train_noise_scheduler(cu: UNetConfig | None = None):
    """The training schedule: `cu`'s betas and prediction type, by default Stable Diffusion's (scaled-linear
    0.00085..0.012, epsilon)."""
    from diffusers import DDPMScheduler

    cu = cu or UNetConfig()
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=cu.beta_start,
        beta_end=cu.beta_end,
        beta_schedule=cu.beta_schedule,
        prediction_type=cu.prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
