"""The diffusion training objective, for every trainer: the target a UNet predicts, min-SNR weighting, the loss.

A noised latent is x_t = sqrt(a) x0 + sqrt(1 - a) eps, with a = alphas_cumprod[t] and SNR(t) = a / (1 - a).
The UNet predicts eps ("epsilon"), v = sqrt(a) eps - sqrt(1 - a) x0 ("v_prediction") or x0 ("sample"); an
error e in its prediction is an error in x0 of e / sqrt(SNR) (epsilon), e / sqrt(SNR + 1) (v) or e (sample).

Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")
weighs each timestep's x0 error by min(SNR, gamma), so the nearly clean steps, whose SNR is large, stop
dominating the loss. Said of the prediction's own error, that is

    epsilon:       min(SNR, gamma) / SNR
    v_prediction:  min(SNR, gamma) / (SNR + 1)
    sample:        min(SNR, gamma)

t2i adds a floor under the x0 weight, max(min(SNR, gamma), floor): min-SNR gives the noisiest steps, where only
the prompt can decide the layout and background, almost no weight; the floor keeps them in the loss. Floor 0 is
plain min-SNR; floor 1 with v-prediction is Salimans & Ho's truncated-SNR weighting, capped at gamma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i.errors import UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"prediction type {prediction_type!r} cannot be trained; use one of "
                         f"{', '.join(PREDICTION_TYPES)}")


def snr(scheduler) -> torch.Tensor:
    """SNR(t) = a / (1 - a) of every training timestep of a diffusers noise scheduler, (T,)."""
    a = scheduler.alphas_cumprod
    return a / (1 - a)


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for latents noised with `noise` at timesteps `t`, (B, C, h, w)."""
    kind = scheduler.config.prediction_type
    check_prediction_type(kind)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return latents


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str, floor: float = 0.0) -> torch.Tensor:
    """Per-sample weights (B,) of the prediction's squared error at timesteps of SNR `snr_t` (B,): min-SNR-gamma
    with an x0 floor, in the prediction type's own terms (see the module docstring)."""
    check_prediction_type(prediction_type)
    x0_weight = torch.clamp(snr_t, min=floor, max=gamma)  # (B,)
    if prediction_type == "epsilon":
        return x0_weight / snr_t
    if prediction_type == "v_prediction":
        return x0_weight / (snr_t + 1)
    return x0_weight


def mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the batch of each sample's mean squared error, each times its weight (B,) when given; in fp32
    whatever the autocast dtype of `pred`."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_sample * weight).mean() if weight is not None else per_sample.mean()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, snr_t: torch.Tensor, prediction_type: str,
                   gamma: float, floor: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: the prediction's MSE, min-SNR weighted when gamma > 0 (gamma 0: unweighted), times each
    sample's own `weight` (B,) when given (a regularisation image's prior_loss_weight)."""
    snr_weight = min_snr_weight(snr_t, gamma, prediction_type, floor) if gamma > 0 else None
    if weight is None:
        weight = snr_weight
    elif snr_weight is not None:
        weight = weight * snr_weight
    return mse(pred, target, weight)
