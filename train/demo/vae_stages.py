"""The demo model's autoencoder stages, each a Job for the training loop (train/loop.py):

    vae       an AutoencoderKL, 64x64x3 <-> 16x16x4: reconstruction (MSE) + a tiny KL
    decoder   the VAE decoder fine-tuned on the frozen encoder's latents (the latent space stays)
    tiny_vae  a TAESD-style AutoencoderTiny in the same latent space: the speed option `tiny_vae`
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2i.demo.shapes import IMAGE_SIZE, sample_scene
from t2i.errors import UsageError
from t2i.train import loop
from t2i.train.checkpoint import Checkpoints
from t2i.train.demo.config import DemoConfig
from t2i.train.demo.metrics import batched_psnr, held_out_latents, vae_psnr
from t2i.train.demo.models import build_tiny_vae, build_vae
from t2i.train.demo.scenes import VAL_SEED, scene_batch, step_scenes

log = logging.getLogger(__name__)


def stage_vae(cfg: DemoConfig, resume: str | None = "latest", budget: loop.TimeBudget | None = None) -> None:
    """Train the VAE from scratch; writes <output_dir>/vae with the scaling factor of its latents."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    acc = loop.accelerator(cfg.mixed_precision, root)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cv.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup(cv.warmup))

    def batches(start: int):
        for images, _ in step_scenes(cfg, acc, 0, start, cv.steps, cv.batch):
            yield images.to(acc.device)  # (B, 3, 64, 64)

    def loss(models, images, step):
        model = acc.unwrap_model(models["vae"])
        posterior = model.encode(images).latent_dist
        recon = model.decode(posterior.sample()).sample  # (B, 3, 64, 64)
        mse = F.mse_loss(recon.float(), images)
        return mse + cv.kl_weight * posterior.kl().mean(), {"mse": mse.item()}

    def validate(step: int) -> dict[str, float]:
        p = vae_psnr(vae)
        log.info("vae step %d: held-out PSNR %.2f dB", step, p)
        return {"val_psnr": p}

    job = loop.Job("vae", {"vae": vae}, opt, sched, batches, loss, cv.steps,
                   Checkpoints(root / "vae_checkpoints", keep=cfg.keep_checkpoints), cv.checkpoint_every,
                   root / "vae_log.jsonl", max_bad_steps=cfg.max_bad_steps, budget=budget, on_checkpoint=validate)
    loop.train(acc, job, loop.resume(acc, job, resume))
    if acc.is_main_process:
        export_vae(cfg, vae)


@torch.no_grad()
def export_vae(cfg: DemoConfig, vae) -> Path:
    """Save the VAE with a scaling factor that gives its latents unit variance."""
    vae.eval()
    images, _ = scene_batch(VAL_SEED + 10**6, 256)
    latents = vae.encode(images).latent_dist.sample()  # (256, 4, 16, 16)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    out = Path(cfg.output_dir) / "vae"
    vae.save_pretrained(str(out))
    log.info("vae: scaling_factor %.4f, held-out PSNR %.2f dB -> %s", vae.config.scaling_factor, vae_psnr(vae), out)
    return out


def _vae_stage_start(cfg: DemoConfig, stage: str, seed_offset: int):
    """A stage on the vae stage's latent space: its accelerator, seeded, and the VAE from <output_dir>/vae."""
    from diffusers import AutoencoderKL

    root = Path(cfg.output_dir)
    if not (root / "vae" / "config.json").is_file():
        raise UsageError(f"stage {stage} needs the vae stage's output in {root}; run it first")
    acc = loop.accelerator(cfg.mixed_precision, root)
    torch.manual_seed(cfg.seed + seed_offset)
    return acc, AutoencoderKL.from_pretrained(str(root / "vae"))


def _small_stage(cfg: DemoConfig, acc, name: str, model, lr: float, steps: int, data_offset: int, resume, budget,
                 loss_fn, val_fn, decay: bool = False):
    """The Job the decoder and tiny_vae stages share: AdamW over `model`'s trainable weights with a warm-up (then a
    cosine decay with `decay`), a fresh batch of renders per step (`loss_fn(model, images, step)` -> (loss,
    values to log)), checkpoints under <output_dir>/<name>_checkpoints, and `val_fn(model)` (PSNR, dB) at each.
    Returns the trained model."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup_cosine(cv.warmup, steps) if decay else loop.warmup(cv.warmup))

    def batches(start: int):
        for images, _ in step_scenes(cfg, acc, data_offset, start, steps, cv.batch):
            yield images.to(acc.device)  # (B, 3, 64, 64)

    def loss(models, images, step):
        return loss_fn(acc.unwrap_model(models[name]), images, step)

    def validate(step: int) -> dict[str, float]:
        p = val_fn(model)
        log.info("%s step %d: held-out PSNR %.2f dB", name, step, p)
        return {"val_psnr": p}

    job = loop.Job(name, {name: model}, opt, sched, batches, loss, steps,
                   Checkpoints(root / f"{name}_checkpoints", keep=cfg.keep_checkpoints), cv.checkpoint_every,
                   root / f"{name}_log.jsonl", max_bad_steps=cfg.max_bad_steps, budget=budget, on_checkpoint=validate)
    loop.train(acc, job, loop.resume(acc, job, resume))
    return model


def stage_decoder(cfg: DemoConfig, resume: str | None = "latest", budget: loop.TimeBudget | None = None) -> None:
    """Fine-tune only the VAE decoder on latents of the frozen encoder; rewrites <output_dir>/vae."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    if cv.decoder_steps <= 0:
        return
    acc, vae = _vae_stage_start(cfg, "decoder", seed_offset=1)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)

    def loss_fn(model, images, step):
        model.encoder.eval()  # frozen: it encodes as it does for the UNet (train mode lays tensors out otherwise)
        with torch.no_grad():
            latents = model.encode(images).latent_dist.sample()  # (B, 4, 16, 16): the UNet's latent space
        loss = F.mse_loss(model.decode(latents).sample.float(), images)
        return loss, {"mse": loss.item()}

    model = _small_stage(cfg, acc, "decoder", vae, cv.decoder_lr, cv.decoder_steps, 9 * 10**7, resume, budget,
                         loss_fn, vae_psnr, decay=True)
    if acc.is_main_process:
        model.eval()
        model.save_pretrained(str(root / "vae"))  # same scaling factor: the latent space is unchanged
        log.info("decoder: held-out PSNR %.2f dB -> %s", vae_psnr(model), root / "vae")


@torch.no_grad()
def generated_pool(cfg: DemoConfig, vae, device, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.tiny_pool` latents generated by the UNet of `vae.tiny_distill_from` for random captions (its default
    sampler and steps), and the VAE's decoding of each; made once, then read from <output_dir>."""
    from safetensors.torch import load_file, save_file

    cv = cfg.vae
    path = Path(cfg.output_dir) / "tiny_vae_pool.safetensors"
    if path.is_file():
        pool = load_file(str(path))
        if len(pool["latents"]) == cv.tiny_pool:
            return pool["latents"], pool["images"]
    from diffusers import StableDiffusionPipeline

    folder = Path(cv.tiny_distill_from)
    defaults = json.loads((folder / "t2i.json").read_text()) if (folder / "t2i.json").is_file() else {}
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.to(device).set_progress_bar_config(disable=True)
    latents, images = [], []
    for i in tqdm(range(0, cv.tiny_pool, batch), desc="tiny_vae pool", leave=False):
        n = min(batch, cv.tiny_pool - i)
        captions = [sample_scene(VAL_SEED + 2 * 10**6 + i + j).caption for j in range(n)]
        out = pipe(captions, num_inference_steps=defaults.get("steps", 20), guidance_scale=defaults.get("guidance", 5.0),
                   height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(VAL_SEED + i))
        latents.append(out.images.cpu())
    z = torch.cat(latents)  # (N, 4, 16, 16), the UNet's scaled latents
    for i in range(0, len(z), batch):
        images.append(vae.decode(z[i : i + batch].to(device) / vae.config.scaling_factor).sample.clamp(-1, 1).cpu())
    pool = {"latents": z.contiguous(), "images": torch.cat(images).contiguous()}
    save_file(pool, str(path))
    return pool["latents"], pool["images"]


def stage_tiny_vae(cfg: DemoConfig, resume: str | None = "latest", budget: loop.TimeBudget | None = None) -> None:
    """Train the small decoder (and its encoder) in the frozen VAE's latent space; writes <output_dir>/vae_tiny."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    if cv.tiny_steps <= 0:
        return
    acc, vae = _vae_stage_start(cfg, "tiny_vae", seed_offset=2)
    vae = vae.eval().requires_grad_(False).to(acc.device)
    scale = vae.config.scaling_factor
    tiny = build_tiny_vae(cfg)
    pool = generated_pool(cfg, vae, acc.device) if cv.tiny_distill_from else None  # (latents, VAE images)

    def loss_fn(model, images, step):
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents, means = posterior.sample() * scale, posterior.mode() * scale  # (B, 4, 16, 16), UNet space
        rec_loss = F.mse_loss(model.decode(latents).sample.float(), images)
        enc_loss = F.mse_loss(model.encode(images).latents.float(), means)
        loss = rec_loss + enc_loss
        if pool is not None:  # as many generated latents, from the pool, against the VAE's decoding
            pick = torch.randint(len(pool[0]), (cv.batch,), generator=torch.Generator().manual_seed(step))
            gen_latents, gen_images = pool[0][pick].to(images.device), pool[1][pick].to(images.device)
            loss = loss + F.mse_loss(model.decode(gen_latents).sample.float(), gen_images)
        return loss, {"mse": rec_loss.item(), "latent_mse": enc_loss.item()}

    held_out = held_out_latents(vae)  # encoded once, decoded at every checkpoint

    def val_fn(model):
        model.eval()
        return batched_psnr(lambda z: model.decode(z).sample, *held_out)

    model = _small_stage(cfg, acc, "tiny_vae", tiny, cv.tiny_lr, cv.tiny_steps, 8 * 10**7, resume, budget,
                         loss_fn, val_fn)
    if acc.is_main_process:
        model.eval()
        if pool is not None:
            p = batched_psnr(lambda z: model.decode(z).sample, *pool)
            with open(root / "tiny_vae_log.jsonl", "a") as f:
                f.write(json.dumps({"step": cv.tiny_steps, "generated_psnr_vs_vae": p}) + "\n")
            log.info("tiny_vae: on generated latents it matches the VAE's decoding at %.2f dB", p)
        model.save_pretrained(str(root / "vae_tiny"))
        log.info("tiny_vae: held-out PSNR %.2f dB (the VAE: %.2f dB) -> %s", val_fn(model), vae_psnr(vae),
                 root / "vae_tiny")
