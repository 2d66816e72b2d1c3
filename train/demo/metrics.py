"""How well the demo model's autoencoders reconstruct held-out scenes: PSNR on 8-bit pixels."""

from __future__ import annotations

import math

import torch

from t2i.train.demo.scenes import held_out_renders


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between image batches in [-1, 1], measured on 8-bit pixels like a viewer sees them."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def batched_psnr(fn, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> float:
    """The mean over batches of PSNR(fn(inputs[batch]), targets[batch])."""
    total = [psnr(fn(inputs[i : i + batch]), targets[i : i + batch]) for i in range(0, len(inputs), batch)]
    return sum(total) / len(total)


@torch.no_grad()
def vae_psnr(vae, n: int = 256, batch: int = 64) -> float:
    """Reconstruction PSNR of the VAE on `n` held-out renders (latent mean, no sampling)."""
    vae.eval()
    images = held_out_renders(n)
    return batched_psnr(lambda x: vae.decode(vae.encode(x).latent_dist.mode()).sample, images, images, batch)


@torch.no_grad()
def held_out_latents(vae, n: int = 256, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's scaled latent means (the UNet's space) of `n` held-out renders, and the renders."""
    vae.eval()
    images = held_out_renders(n)
    latents = [vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, n, batch)]
    return torch.cat(latents) * vae.config.scaling_factor, images


def tiny_vae_psnr(tiny, vae, n: int = 256, batch: int = 64) -> float:
    """PSNR of the small decoder on the VAE's latents (mean) of `n` held-out renders: vae_psnr's measure."""
    tiny.eval()
    return batched_psnr(lambda z: tiny.decode(z).sample, *held_out_latents(vae, n, batch), batch)
