"""LoRA fine-tuning: `t2i train lora --model M --data DIR --output OUT`.

The run, in order:
1. Check the config, the data and the output folder (cheap; before any model loads).
2. Load the base model through t2i (safe loading, model hash), freeze it, add
   peft LoRA adapters to the UNet's `targets` (attention; + MLPs; + ResNet convolutions)
   (and the text encoder's attention).
   Without `reg_data`, the base model first draws its own image of each caption
   into OUT/prior (prior preservation, train/prior.py; once, reused on resume;
   `prior = false` / --no-prior turns it off).
3. Cache VAE latents (and text embeddings when the text encoder is frozen).
   Regularisation images (`reg_data`, or the prior images) train on their
   captions without the trigger, so prompts without it keep the base model's
   look and content.
4. Train on the one training loop (train/loop.py): accelerate (one CPU process,
   a GPU with mixed precision, several processes under `accelerate launch`),
   atomic checkpoints every N steps with an exact resume, a validation grid every
   M steps, non-finite steps skipped (`max_bad_steps` in a row stop the run),
   Ctrl-C saves a checkpoint and exits, `max_minutes` stops at a checkpoint.
   Min-SNR weighting (train/losses.py), noise offset, caption dropout,
   aspect-ratio buckets.
5. Write the LoRA (kohya's layout by default, which every tool reads; or diffusers')
   with its training metadata, and the final labelled validation grid beside it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from t2i.errors import UsageError
from t2i.train import loop, losses, prior
from t2i.train.checkpoint import Checkpoints
from t2i.train.config import load_config
from t2i.train.data import BatchPlan, Dataset, bucket_sizes, fit, merge, scan, to_tensor, with_trigger
from t2i.train.loop import TrainingError  # noqa: F401 - raised by the loop; part of this module's API
from t2i.train.lora_config import CONV_TARGETS, FORMATS, TARGETS, UNET_TARGETS, LoraTrainConfig  # noqa: F401

log = logging.getLogger(__name__)

ADAPTER = "t2i_lora"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load(config: str | None, overrides: dict) -> LoraTrainConfig:
    return load_config(LoraTrainConfig, config, overrides)


def uses_prior(cfg: LoraTrainConfig) -> bool:
    """Prior preservation (train/prior.py): on unless turned off, and only when no --reg-data is given."""
    return cfg.prior and not cfg.reg_data


def regularisation(cfg: LoraTrainConfig) -> str:
    """What kept prompts without the trigger as they were: reg-data (the user's images), prior (the base model's
    own, made by the run) or none. The LoRA's metadata says it."""
    return "reg-data" if cfg.reg_data else "prior" if cfg.prior else "none"


def check(cfg: LoraTrainConfig, resume: str | None) -> tuple[Dataset, Path]:
    """Every cheap check, before a model is loaded."""
    if not cfg.data:
        raise UsageError("give the training images with --data DIR")
    if not cfg.output:
        raise UsageError("give the output folder with --output DIR")
    for name, value, low in (("prior-steps", cfg.prior_steps, 0), ("rank", cfg.rank, 1), ("steps", cfg.steps, 1), ("batch", cfg.batch, 1),
                             ("grad-accum", cfg.grad_accum, 1), ("checkpoint-every", cfg.checkpoint_every, 1),
                             ("max-bad-steps", cfg.max_bad_steps, 1)):
        if value < low:
            raise UsageError(f"--{name} must be at least {low}, got {value}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.max_minutes >= 0:
        raise UsageError(f"--max-minutes must be >= 0 (0: no limit), got {cfg.max_minutes:g}")
    if not (cfg.prior_loss_weight >= 0 and math.isfinite(cfg.prior_loss_weight)):
        raise UsageError(f"--prior-loss-weight must be a number >= 0, got {cfg.prior_loss_weight:g}")
    if cfg.alpha < 0 or not 0 <= cfg.caption_dropout < 1 or cfg.noise_offset < 0:
        raise UsageError("--alpha and --noise-offset must be >= 0, caption_dropout in [0, 1)")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UsageError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if cfg.targets not in TARGETS:
        raise UsageError(f"--targets {cfg.targets!r}: use {', '.join(TARGETS)}")
    if cfg.conv_rank < 0 or cfg.conv_alpha < 0:
        raise UsageError("--conv-rank and --conv-alpha must be >= 0 (0: the same as --rank, --alpha)")
    if cfg.format not in FORMATS:
        raise UsageError(f"--format {cfg.format!r}: use {' or '.join(FORMATS)}")
    if cfg.resolution and cfg.resolution % 8:
        raise UsageError(f"--resolution {cfg.resolution} is not a multiple of 8")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is not a folder")
    final = out / f"{cfg.name}.safetensors"
    if not resume:
        if final.exists():
            raise UsageError(f"{final} exists (a finished run); choose a new --output or --name")
        if Checkpoints(out / "checkpoints").latest() is not None:
            raise UsageError(f"{out} holds checkpoints of an earlier run; continue it with --resume latest "
                             f"or choose a new --output")
    dataset = scan(cfg.data)
    if cfg.reg_data:
        dataset = merge(dataset, scan(cfg.reg_data, reg=True))
    return dataset, out


# --------------------------------------------------------------------------- pieces


def _trainable(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad}


def _digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def lora_state_dict(unet, text_encoder, with_text: bool) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' layout ('unet.…lora_A.weight'), each module's alpha/rank baked into lora_B."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    parts = [("unet", unet)] + ([("text_encoder", text_encoder)] if with_text else [])
    for prefix, module in parts:
        scales = {name: m.scaling[ADAPTER] for name, m in module.named_modules()
                  if ADAPTER in getattr(m, "scaling", {})}  # peft's alpha/rank, per module (convolutions: their own)
        for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
            value = value.detach().float().cpu().contiguous()
            if key.endswith(".lora_B.weight"):
                value = value * scales[key[: -len(".lora_B.weight")]]
            out[f"{prefix}.{key}"] = value
    return out


class Encoder:
    """Turns dataset items into (latents, text embeddings), from a cache when allowed."""

    def __init__(self, cfg, dataset, plan, pipe, acc, with_trigger_captions):
        self.cfg, self.dataset, self.plan, self.pipe, self.acc = cfg, dataset, plan, pipe, acc
        self.captions = with_trigger_captions
        self.latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # i -> (mean, std), each (C, h, w)
        self.embeds: dict[int, torch.Tensor] = {}
        self.bad: set[int] = set()
        self.empty = None

    @property
    def vae(self):
        return self.pipe.pipe.vae

    def tokens(self, texts: list[str]) -> torch.Tensor:
        tok = self.pipe.pipe.tokenizer
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def _pixels(self, idx) -> list[tuple[int, torch.Tensor]]:
        """(i, (3, H, W) fitted to its bucket) for each readable image; one unreadable since the scan is
        reported once and skipped from then on."""
        from t2i.images import load_rgb

        out = []
        for i in idx:
            if i in self.bad:
                continue
            try:
                out.append((i, to_tensor(fit(load_rgb(self.dataset.items[i].path), self.plan.bucket_of[i]))))
            except UsageError as e:
                self.bad.add(i)
                if self.acc.is_main_process:
                    log.warning("skipping %s", e)
        return out

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack(pixels).to(self.acc.device, self.vae.dtype)  # (B, 3, H, W)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()  # (B, C, H/f, W/f)

    def cache(self) -> None:
        if self.cfg.cache_latents:
            items = range(len(self.dataset.items))
            for i in tqdm(items, desc="caching latents", disable=not self.acc.is_main_process, leave=False):
                for j, px in self._pixels([i]):
                    mean, std = self._encode([px])
                    self.latents[j] = (mean[0], std[0])
            if not self.latents:
                raise TrainingError("no training image is readable any more; check --data")
        if not self.cfg.train_text_encoder:
            with torch.no_grad():
                te = self.pipe.pipe.text_encoder
                for i, text in enumerate(self.captions):
                    self.embeds[i] = te(self.tokens([text]).to(self.acc.device))[0][0].float().cpu()  # (77, D)
                self.empty = te(self.tokens([""]).to(self.acc.device))[0][0].float().cpu()

    def batch(self, idx: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w) scaled for the UNet, text): text is the cached embeddings (B, 77, D) when the
        text encoder is frozen, else the token ids (B, 77) it encodes in the loss. Unreadable images are left
        out, and a batch left empty takes the first readable image instead."""
        dev = self.acc.device
        if self.latents:
            idx = [i for i in idx if i in self.latents] or [next(iter(self.latents))]
            mean = torch.stack([self.latents[i][0] for i in idx])
            std = torch.stack([self.latents[i][1] for i in idx])
        else:
            loaded = self._pixels(idx) or self._pixels(range(len(self.dataset.items)))[:1]
            if not loaded:
                raise TrainingError("no training image is readable any more; check --data")
            idx = [i for i, _ in loaded]
            mean, std = self._encode([px for _, px in loaded])
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.vae.config.scaling_factor
        drop = (torch.rand(len(idx), generator=gen) < self.cfg.caption_dropout).tolist()  # unconditional rows for CFG
        if self.embeds:
            text = torch.stack([self.empty if d else self.embeds[i] for i, d in zip(idx, drop)])
        else:
            text = self.tokens(["" if d else self.captions[i] for i, d in zip(idx, drop)])
        return latents.to(dev), text.to(dev)


def validation_grid(pipe, cfg: LoraTrainConfig, prompts: list[str], out: Path, step: int) -> Path:
    """Each prompt without and with the trigger at the fixed seeds, one row each, as one PNG.

    A band above each row says what it shows (the prompt, with or without the trigger, the step), so a
    person comparing grids sees what changed.
    """
    from PIL import Image, ImageDraw

    rows = []  # (label, images)
    for p in prompts:
        variants = [("without trigger", p), ("with trigger", with_trigger(p, cfg.trigger))] if cfg.trigger \
            else [("no trigger set", p)]
        for which, text in variants:
            images = [pipe(text, seed=seed, progress=False).images[0] for seed in cfg.validation_seeds]
            rows.append((f"step {step} | {which} | {text or '(empty prompt)'}", images))
    w, h = rows[0][1][0].size
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band = draw.textbbox((0, 0), "Ay|", font=None)[3] + 6  # PIL's default font
    width = max(w * len(cfg.validation_seeds), max(int(draw.textlength(label)) for label, _ in rows) + 8)
    grid = Image.new("RGB", (width, (band + h) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for y, (label, images) in enumerate(rows):
        top = y * (band + h)
        draw.text((4, top + 3), label, fill="black")
        for x, img in enumerate(images):
            grid.paste(img, (x * w, top + band))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- the run


def train(cfg: LoraTrainConfig, resume: str | None = None) -> Path | None:
    """Run (or continue) a LoRA fine-tuning; returns the written LoRA file (None on processes other than the main,
    and when max_minutes ran out first)."""
    from peft import LoraConfig, inject_adapter_in_model

    from t2i.lora import format as lora_format

    # 1. Check inputs, and read the checkpoint to resume (a damaged or hostile one is refused before a model loads)
    budget = loop.TimeBudget(cfg.max_minutes)
    dataset, out = check(cfg, resume)

    # 2. Load and freeze the base model; its own images of the captions (prior preservation); add the adapters
    run = loop.fine_tune("LoRA", cfg, out, resume, dataset.report())
    ckpts, saved, acc, pipe = run.checkpoints, run.saved, run.acc, run.pipe
    noise_scheduler, prediction = run.noise_scheduler, run.prediction
    unet, text_encoder = pipe.pipe.unet, pipe.pipe.text_encoder
    was = {"targets": "attn", "regularisation": "reg-data" if cfg.reg_data else "none"}  # what older checkpoints lack
    loop.same_settings(saved, {"regularisation": regularisation(cfg)}, was)  # before drawing for nothing
    if uses_prior(cfg):
        if acc.is_main_process:
            prior.draw(pipe, dataset, out / prior.FOLDER, cfg.seed, cfg.prior_steps)
        acc.wait_for_everyone()  # the main process drew them; every process trains on them
        dataset = merge(dataset, prior.images(out / prior.FOLDER))
    alpha = cfg.alpha or float(cfg.rank)
    conv_rank = cfg.conv_rank or cfg.rank
    conv_alpha = cfg.conv_alpha or float(conv_rank)
    torch.manual_seed(cfg.seed)  # the adapters' initial weights
    convs = {c: conv_rank for c in CONV_TARGETS} if cfg.targets == "all" else {}
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=TARGETS[cfg.targets], rank_pattern=convs,
                                alpha_pattern={c: conv_alpha for c in convs}), adapter_name=ADAPTER)
    if cfg.train_text_encoder:
        # peft directly: transformers' add_adapter insists on a newer peft than diffusers needs
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS), text_encoder, adapter_name=ADAPTER)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5
            (enable or text_encoder.gradient_checkpointing_enable)()
    models = {"unet": unet, **({"text_encoder": text_encoder} if cfg.train_text_encoder else {})}
    params = {k: p for name, m in models.items() for k, p in _trainable(m, name).items()}
    for p in params.values():
        p.data = p.data.float()  # fp32 master weights, whatever the autocast dtype

    # 3. Data: buckets, a fixed order, caches
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)  # UNet needs sizes divisible by this
    resolution = cfg.resolution or unet.config.sample_size * pipe.vae_scale_factor
    buckets = bucket_sizes(resolution, factor) if cfg.buckets else None
    plan = BatchPlan(dataset, buckets, resolution, cfg.batch, cfg.seed)
    captions = [it.caption if it.reg else with_trigger(it.caption, cfg.trigger) for it in dataset.items]
    encoder = Encoder(cfg, dataset, plan, pipe, acc, captions)
    encoder.cache()
    prompts = cfg.validation_prompts or list(dict.fromkeys(
        it.caption for it in dataset.items if it.caption and not it.reg))[:2] or [""]
    snr = losses.snr(noise_scheduler).to(acc.device)  # (T,)

    def batches(start: int):
        """Micro-batch n of this process: a pure function of n, so a resumed run sees the data and noise a
        straight run would."""
        for n in itertools.count(start * cfg.grad_accum):
            k = n * acc.num_processes + acc.process_index  # micro-batch k of the whole run
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            latents, text = encoder.batch(plan[k], gen)  # (B, C, h, w); (B, 77, D) embeddings or (B, 77) ids
            noise = torch.randn(latents.shape, generator=gen)
            if cfg.noise_offset:
                noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
            noise = noise.to(acc.device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
            t = t.to(acc.device)
            noisy = noise_scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
            weight = torch.tensor([cfg.prior_loss_weight if dataset.items[i].reg else 1.0 for i in plan[k]])  # (B,)
            yield noisy, t, losses.target(noise_scheduler, latents, noise, t), text, weight.to(acc.device)

    def loss(models, batch, step):
        noisy, t, target, text, weight = batch
        cond = models["text_encoder"](text)[0] if cfg.train_text_encoder else text  # (B, 77, D)
        pred = models["unet"](noisy, t, cond).sample  # (B, C, h, w)
        return losses.diffusion_loss(pred, target, snr[t], prediction, cfg.min_snr_gamma, weight=weight), {}

    def validate(step: int | None) -> Path:
        unet.eval()
        text_encoder.eval()
        target = out / "samples" / f"step-{step:08d}.png" if step is not None else out / "validation.png"
        return validation_grid(pipe, cfg, prompts, target, cfg.steps if step is None else step)

    def after_step(done: int) -> None:
        if cfg.validation_every and done % cfg.validation_every == 0 and done != cfg.steps:
            log.info("step %d: validation grid -> %s", done, validate(done))

    # 4. Optimizer, schedule, resume
    groups = [{"params": [p for k, p in params.items() if k.startswith("unet.")], "lr": cfg.lr}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for k, p in params.items() if k.startswith("text_encoder.")],
                       "lr": cfg.text_encoder_lr or cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup(cfg.warmup))
    identity = {"base_model_hash": pipe.model.hash, "targets": cfg.targets, "rank": cfg.rank, "alpha": alpha,
                **({"conv_rank": conv_rank, "conv_alpha": conv_alpha} if convs else {}),
                "train_text_encoder": cfg.train_text_encoder,
                "regularisation": regularisation(cfg),  # before the counts it changes: the refusal names it
                "images": len(dataset.items), "reg_images": sum(it.reg for it in dataset.items)}
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    job = loop.Job("lora", models, opt, sched, batches, loss, cfg.steps, ckpts, cfg.checkpoint_every, log_path,
                   tensors=params, state={"identity": identity, "config": asdict(cfg)}, grad_accum=cfg.grad_accum,
                   max_bad_steps=cfg.max_bad_steps, budget=budget, after_step=after_step)
    start = loop.start_step(acc, job, saved, resume, identity, was)

    # 5. Train
    try:
        loop.train(acc, job, start)
    except loop.OutOfTime as stop:
        if acc.is_main_process:
            log.info("%s; continue with --resume latest", stop)
        return None

    # 6. Write the LoRA and the final grid
    sd = lora_state_dict(acc.unwrap_model(unet), acc.unwrap_model(text_encoder), cfg.train_text_encoder)
    digests = acc.gather(torch.tensor([int(_digest(params)[:15], 16)], device=acc.device))
    identical = len(set(digests.tolist())) == 1
    if not identical:
        raise TrainingError(f"the {acc.num_processes} processes ended with different weights; not saved")
    final = out / f"{cfg.name}.safetensors"
    if acc.is_main_process:
        import t2i

        metadata = {
            "t2i.version": t2i.__version__, "t2i.base_model": pipe.model.source.name,
            "t2i.base_model_hash": pipe.model.hash, "t2i.targets": cfg.targets, "t2i.rank": str(cfg.rank),
            "t2i.alpha": str(alpha), **({"t2i.conv_rank": str(conv_rank), "t2i.conv_alpha": str(conv_alpha)} if convs else {}),
            "t2i.steps": str(cfg.steps), "t2i.trigger": cfg.trigger, "t2i.resolution": str(resolution),
            "t2i.lr": str(cfg.lr), "t2i.batch": str(cfg.batch * cfg.grad_accum * acc.num_processes),
            "t2i.images": str(sum(not it.reg for it in dataset.items)),
            "t2i.reg_images": str(sum(it.reg for it in dataset.items)), "t2i.regularisation": regularisation(cfg),
            **({"t2i.prior_loss_weight": f"{cfg.prior_loss_weight:g}"} if regularisation(cfg) != "none" else {}),
            "t2i.train_text_encoder": str(cfg.train_text_encoder).lower(),
            "t2i.processes": str(acc.num_processes), "t2i.weights_sha256": _digest(params),
        }
        lora_format.save_lora(final, sd, metadata, format=cfg.format, overwrite=resume is not None)
        with open(log_path, "a") as f:
            f.write(json.dumps({"done": cfg.steps, "processes": acc.num_processes, "ranks_identical": identical,
                                "weights_sha256": _digest(params), "lora": str(final)}) + "\n")
        log.info("validation grid -> %s", validate(None))
    acc.wait_for_everyone()
    return final if acc.is_main_process else None


def run(config: str | None, overrides: dict, resume: str | None = None) -> Path | None:
    cfg = load(config, overrides)
    return train(cfg, resume)


