"""LoRA fine-tuning: `t2i train lora --model M --data DIR --output OUT`.

The run, in order:
1. Check the config, the data and the output folder (cheap; before any model loads).
2. Load the base model through t2i (safe loading, model hash), freeze it, add
   peft LoRA adapters to the UNet attention projections (and the text encoder's).
3. Cache VAE latents (and text embeddings when the text encoder is frozen).
   Regularisation images (`reg_data`) train on their captions without the
   trigger, so prompts without it keep the base model's look.
4. Train through accelerate: one CPU process, a GPU with mixed precision, or
   several processes under `accelerate launch` with no code change.
   Min-SNR weighting, noise offset, caption dropout, aspect-ratio buckets.
5. Checkpoint atomically every N steps (train/checkpoint.py); render a
   validation grid every M steps; Ctrl-C saves a checkpoint, then exits.
6. Write the LoRA (diffusers layout or kohya's) with its training metadata,
   and the final validation grid beside it.

A step whose gradients are not finite is skipped with a warning (nothing
non-finite is ever saved); `max_bad_steps` in a row stop the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2i.errors import StorageError, T2IError, UsageError
from t2i.train.checkpoint import Checkpoints, read_training_state, save_training_state
from t2i.train.config import load_config
from t2i.train.data import BatchPlan, Dataset, bucket_sizes, fit, merge, scan, to_tensor, with_trigger

ADAPTER = "t2i_lora"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FORMATS = ("diffusers", "kohya")


class TrainingError(T2IError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class LoraTrainConfig:
    model: str = ""  # "" = the bundled t2i-shapes
    data: str = ""
    reg_data: str = ""  # regularisation images: captions without the trigger (keeps untriggered prompts as they were)
    output: str = ""
    name: str = "lora"  # the weights are <output>/<name>.safetensors
    trigger: str = ""
    rank: int = 4
    alpha: float = 0.0  # 0 = rank (scale 1)
    steps: int = 500
    lr: float = 1e-4
    text_encoder_lr: float = 0.0  # 0 = lr
    warmup: int = 0
    batch: int = 1
    grad_accum: int = 1
    resolution: int = 0  # 0 = the model's native size
    buckets: bool = True
    train_text_encoder: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    min_snr_gamma: float = 5.0  # 0 = plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validation_every: int = 100  # 0 = only at the end
    validation_prompts: list[str] = field(default_factory=list)  # default: the first captions of the data
    validation_seeds: list[int] = field(default_factory=lambda: [1, 2])
    max_bad_steps: int = 5
    format: str = "diffusers"  # diffusers | kohya
    allow_pickle: bool = False


def load(config: str | None, overrides: dict) -> LoraTrainConfig:
    return load_config(LoraTrainConfig, config, overrides)


def check(cfg: LoraTrainConfig, resume: str | None) -> tuple[Dataset, Path]:
    """Every cheap check, before a model is loaded."""
    if not cfg.data:
        raise UsageError("give the training images with --data DIR")
    if not cfg.output:
        raise UsageError("give the output folder with --output DIR")
    for name, value, low in (("rank", cfg.rank, 1), ("steps", cfg.steps, 1), ("batch", cfg.batch, 1),
                             ("grad-accum", cfg.grad_accum, 1), ("checkpoint-every", cfg.checkpoint_every, 1),
                             ("max-bad-steps", cfg.max_bad_steps, 1)):
        if value < low:
            raise UsageError(f"--{name} must be at least {low}, got {value}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.alpha < 0 or not 0 <= cfg.caption_dropout < 1 or cfg.noise_offset < 0:
        raise UsageError("--alpha and --noise-offset must be >= 0, caption_dropout in [0, 1)")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UsageError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
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


def lora_state_dict(unet, text_encoder, rank: int, alpha: float, with_text: bool) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' layout ('unet.…lora_A.weight'), alpha/rank baked into lora_B."""
    from peft.utils import get_peft_model_state_dict

    scale = alpha / rank
    out = {}
    parts = [("unet", unet)] + ([("text_encoder", text_encoder)] if with_text else [])
    for prefix, module in parts:
        for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
            value = value.detach().float().cpu().contiguous()
            if ".lora_B." in key:
                value = value * scale
            out[f"{prefix}.{key}"] = value
    return out


def _say(acc, message: str) -> None:
    """Progress notes go to stderr (stdout carries only the written file's path), once per run."""
    if acc.is_main_process:
        tqdm.write(message, file=sys.stderr)


_held = {"on": False, "pending": False}  # see _whole_step


def _on_signal(signum, frame):
    if _held["on"]:
        _held["pending"] = True  # raised once the step is whole
    else:
        raise KeyboardInterrupt


def _signals_to_interrupt():
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption, `kill`): checkpoint, then exit.

    SIGINT is set explicitly: a process started in the background by a non-interactive
    shell inherits it as ignored, and `kill -INT` should still save and stop the run.
    """
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


@contextlib.contextmanager
def _whole_step():
    """An optimizer update and the step count that names it, as one: a signal between them is raised after.
    Raised between, the interrupt saved step N's name on step N+1's weights, and the resumed run differed."""
    _held["on"], _held["pending"] = True, False
    try:
        yield
    finally:
        _held["on"] = False
    if _held["pending"]:
        _held["pending"] = False
        raise KeyboardInterrupt


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
                _say(self.acc, f"warning: skipping {e}")
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

    def batch(self, idx: list[int], gen: torch.Generator, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w) scaled for the UNet, conditioning (B, 77, D)); unreadable images are left out,
        and a batch left empty takes the first readable image instead."""
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
            cond = torch.stack([self.empty if d else self.embeds[i] for i, d in zip(idx, drop)]).to(dev)
        else:
            ids = self.tokens(["" if d else self.captions[i] for i, d in zip(idx, drop)]).to(dev)
            cond = text_encoder(ids)[0]
        return latents.to(dev), cond


def _accelerator(cfg: LoraTrainConfig):
    """accelerate keeps one process-wide state: a second run in the same Python process (a notebook,
    the tests) with another precision needs it cleared; the process group itself is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


def validation_grid(pipe, cfg: LoraTrainConfig, prompts: list[str], out: Path) -> Path:
    """Each prompt without and with the trigger, at the fixed seeds, as one PNG (rows: prompts)."""
    from PIL import Image

    rows = []
    for p in prompts:
        variants = [p, with_trigger(p, cfg.trigger)] if cfg.trigger else [p]
        row = []
        for text in variants:
            for seed in cfg.validation_seeds:
                row.append(pipe(text, seed=seed, progress=False).images[0])
        rows.append(row)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img, (x * w, y * h))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- the run


def train(cfg: LoraTrainConfig, resume: str | None = None) -> Path | None:
    """Run (or continue) a LoRA fine-tuning; returns the written LoRA file (None on processes other than the main)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    from t2i.pipelines import Text2Image
    from t2i.lora import format as lora_format

    # 1. Check inputs, and read the checkpoint to resume (a damaged or hostile one is refused before a model loads)
    dataset, out = check(cfg, resume)
    ckpts = Checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
    path = ckpts.resolve(resume)
    saved = read_training_state(path) if path is not None else None
    acc = _accelerator(cfg)
    _say(acc, f"data: {dataset.report()}")

    # 2. Load and freeze the base model; add the adapters
    pipe = Text2Image.from_pretrained(cfg.model or None, device="cpu", dtype="fp32", allow_pickle=cfg.allow_pickle)
    if pipe.model.arch == "sdxl":
        raise UsageError("LoRA training supports SD 1.x/2.x models so far, not SDXL")
    pipe.pipe.to(acc.device)
    unet, vae, text_encoder = pipe.pipe.unet, pipe.pipe.vae, pipe.pipe.text_encoder
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    alpha = cfg.alpha or float(cfg.rank)
    torch.manual_seed(cfg.seed)  # the adapters' initial weights
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS), adapter_name=ADAPTER)
    if cfg.train_text_encoder:
        # peft directly: transformers' add_adapter insists on a newer peft than diffusers needs
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS), text_encoder, adapter_name=ADAPTER)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5
            (enable or text_encoder.gradient_checkpointing_enable)()
    params = {**_trainable(unet, "unet"), **(_trainable(text_encoder, "text_encoder") if cfg.train_text_encoder else {})}
    for p in params.values():
        p.data = p.data.float()  # fp32 master weights, whatever the autocast dtype

    # 3. Data: buckets, fixed order, caches
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)  # UNet needs sizes divisible by this
    resolution = cfg.resolution or unet.config.sample_size * pipe.vae_scale_factor
    buckets = bucket_sizes(resolution, factor) if cfg.buckets else None
    plan = BatchPlan(dataset, buckets, resolution, cfg.batch, cfg.seed)
    captions = [it.caption if it.reg else with_trigger(it.caption, cfg.trigger) for it in dataset.items]
    encoder = Encoder(cfg, dataset, plan, pipe, acc, captions)
    encoder.cache()
    prompts = cfg.validation_prompts or list(dict.fromkeys(
        it.caption for it in dataset.items if it.caption and not it.reg))[:2] or [""]

    # 4. Optimizer, schedule, resume
    groups = [{"params": [p for k, p in params.items() if k.startswith("unet.")], "lr": cfg.lr}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for k, p in params.items() if k.startswith("text_encoder.")],
                       "lr": cfg.text_encoder_lr or cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
    identity = {"base_model_hash": pipe.model.hash, "rank": cfg.rank, "alpha": alpha,
                "train_text_encoder": cfg.train_text_encoder, "images": len(dataset.items),
                "reg_images": sum(it.reg for it in dataset.items)}
    start = 0
    if saved is not None:
        state, tensors = saved.state, saved.tensors
        was = state.get("identity", {})
        differs = {k: (was.get(k), v) for k, v in identity.items() if was.get(k) != v}
        if differs:
            k, (before, now) = next(iter(differs.items()))
            raise UsageError(f"checkpoint {saved.folder} was trained with {k}={before}, this run has {k}={now}; "
                             f"use the same settings or a new --output")
        saved.restore({}, opt, sched)
        if set(params) - set(tensors):
            raise StorageError(f"checkpoint {saved.folder} lacks the LoRA weights "
                               f"{sorted(set(params) - set(tensors))[0]}; resume from another with --resume PATH")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        start = state["step"]
        _say(acc, f"resumed from {saved.folder} at step {start}")
    elif resume == "latest":
        _say(acc, f"no checkpoint in {out / 'checkpoints'} yet: starting at step 0")

    noise_scheduler = DDPMScheduler.from_config(pipe.pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(acc.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # (T,)
    model = acc.prepare(unet)
    te_model = acc.prepare(text_encoder) if cfg.train_text_encoder else text_encoder
    opt, sched = acc.prepare(opt, sched)
    trainable = list(params.values())

    def save(step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in trainable):
            _say(acc, f"warning: weights at step {step} are not finite; checkpoint not written")
            return
        if acc.is_main_process:
            tensors = {k: p.detach().cpu().contiguous() for k, p in params.items()}
            ckpts.save(step, lambda d: {**save_training_state(d, {}, opt, sched, tensors), "identity": identity,
                                        "config": asdict(cfg)})

    def validate(step: int | None) -> Path | None:
        if not acc.is_main_process:
            return None
        model.eval()
        te_model.eval()
        name = f"step-{step:08d}.png" if step is not None else "validation.png"
        target = out / "samples" / name if step is not None else out / name
        return validation_grid(pipe, cfg, prompts, target)

    # 5. Train
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    _signals_to_interrupt()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="lora", disable=not acc.is_main_process)
    bad_in_row, done, last_saved = 0, start, start
    try:
        for step in bar:
            model.train()
            te_model.train(cfg.train_text_encoder)
            losses = []
            for micro in range(cfg.grad_accum):
                k = (step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
                latents, cond = encoder.batch(plan[k], gen, te_model)  # (B, C, h, w), (B, 77, D)
                noise = torch.randn(latents.shape, generator=gen)
                if cfg.noise_offset:
                    noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
                noise = noise.to(acc.device)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
                t = t.to(acc.device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
                sync = acc.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync, acc.autocast():
                    pred = model(noisy, t, cond).sample  # (B, C, h, w)
                    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    if cfg.min_snr_gamma:
                        w = torch.clamp(snr[t], max=cfg.min_snr_gamma)
                        w = w / snr[t] if prediction == "epsilon" else w / (snr[t] + 1)
                        per_sample = per_sample * w
                    loss = per_sample.mean() / cfg.grad_accum
                    acc.backward(loss)
                losses.append(loss.detach() * cfg.grad_accum)
            norm = acc.clip_grad_norm_(trainable, 1.0)  # all-reduced: the same on every rank
            loss_value = float(torch.stack(losses).mean())
            with _whole_step():
                if not math.isfinite(float(norm)):
                    opt.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    _say(acc, f"warning: step {step + 1}: non-finite loss/gradients; step skipped ({bad_in_row} in a "
                              "row)")
                    if bad_in_row >= cfg.max_bad_steps:
                        raise TrainingError(f"{bad_in_row} non-finite steps in a row at step {step + 1}; stopped. "
                                            f"The last checkpoint (step {last_saved}) is intact: lower --lr or use "
                                            f"--mixed-precision no, then --resume latest")
                else:
                    bad_in_row = 0
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sched.step()
                done = step + 1
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": loss_value, "lr": sched.get_last_lr()[0],
                                        "skipped": bad_in_row > 0, "t": time.time()}) + "\n")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save(done)
                last_saved = done
            if cfg.validation_every and done % cfg.validation_every == 0 and done != cfg.steps:
                _say(acc, f"step {done}: validation grid -> {validate(done)}")
            acc.wait_for_everyone()
    except KeyboardInterrupt:
        if done > last_saved:
            save(done)
        _say(acc, f"interrupted at step {done}: checkpoint saved in {out / 'checkpoints'}; continue with --resume latest")
        raise
    except OSError as e:  # the disk filled up (or went away) while writing the log or a grid
        newest = ckpts.latest()
        kept = (f"the newest checkpoint ({newest.name}) is intact; once that is fixed, --resume latest continues "
                "from it") if newest else "no checkpoint was written yet"
        raise StorageError(f"could not write {e.filename or out}: {e.strerror or e}; {kept}") from None

    # 6. Write the LoRA and the final grid
    unwrapped_te = acc.unwrap_model(te_model) if cfg.train_text_encoder else text_encoder
    sd = lora_state_dict(acc.unwrap_model(model), unwrapped_te, cfg.rank, alpha, cfg.train_text_encoder)
    digests = acc.gather(torch.tensor([int(_digest(params)[:15], 16)], device=acc.device))
    identical = len(set(digests.tolist())) == 1
    if not identical:
        raise TrainingError(f"the {acc.num_processes} processes ended with different weights; not saved")
    final = out / f"{cfg.name}.safetensors"
    if acc.is_main_process:
        import t2i

        metadata = {
            "t2i.version": t2i.__version__, "t2i.base_model": pipe.model.source.name,
            "t2i.base_model_hash": pipe.model.hash, "t2i.rank": str(cfg.rank), "t2i.alpha": str(alpha),
            "t2i.steps": str(cfg.steps), "t2i.trigger": cfg.trigger, "t2i.resolution": str(resolution),
            "t2i.lr": str(cfg.lr), "t2i.batch": str(cfg.batch * cfg.grad_accum * acc.num_processes),
            "t2i.images": str(sum(not it.reg for it in dataset.items)),
            "t2i.reg_images": str(sum(it.reg for it in dataset.items)), "t2i.train_text_encoder": str(cfg.train_text_encoder).lower(),
            "t2i.processes": str(acc.num_processes), "t2i.weights_sha256": _digest(params),
        }
        lora_format.save_lora(final, sd, metadata, format=cfg.format, overwrite=resume is not None)
        with open(log_path, "a") as f:
            f.write(json.dumps({"done": cfg.steps, "processes": acc.num_processes, "ranks_identical": identical,
                                "weights_sha256": _digest(params), "lora": str(final)}) + "\n")
        _say(acc, f"validation grid -> {validate(None)}")
    acc.wait_for_everyone()
    return final if acc.is_main_process else None


def run(config: str | None, overrides: dict, resume: str | None = None) -> Path | None:
    cfg = load(config, overrides)
    return train(cfg, resume)


