"""The demo model's text and UNet stages, each a Job for the training loop (train/loop.py):

    text   the CLIPTextModel alone learns to draw a coarse picture of each caption's scene (LayoutHead, an
           auxiliary task never exported), so the UNet starts from words that already say where things are
    unet   the CLIPTextModel and the UNet2DConditionModel trained together on VAE latents (epsilon or v
           objective, min-SNR weighting with a floor, optionally the layout task kept on); an EMA copy of both
           is what gets exported

Either can start from an exported model (unet.init_from), taking its tokenizer, VAE and small decoder when the
run has none of its own.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.demo.shapes import IMAGE_SIZE, extra_phrase
from t2i.errors import UsageError
from t2i.train import loop, losses
from t2i.train.checkpoint import Checkpoints
from t2i.train.demo.config import DemoConfig
from t2i.train.demo.export import assemble, sample_grid
from t2i.train.demo.models import LayoutHead, build_text_encoder, build_unet, layout_error, train_noise_scheduler
from t2i.train.demo.scenes import step_scenes

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "two green stars",
    "a yellow triangle above a purple heart",
    "a big pink cross",
    "three orange circles",
    "a cyan star to the right of a red square",
    "a small blue heart at the top on a white background",
]


def stage_text(cfg: DemoConfig, resume: str | None = "latest", budget: loop.TimeBudget | None = None) -> None:
    """Train the text encoder alone on the layout task (LayoutHead); write it to <output_dir>/text."""
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    ct, root = cfg.text, Path(cfg.output_dir)
    if ct.layout_steps <= 0:
        return
    if ct.layout_cells < 1 or ct.layout_anchor < 0:
        raise UsageError("text.layout_cells must be >= 1 and text.layout_anchor >= 0")
    acc = loop.accelerator(cfg.mixed_precision, root)
    if cfg.unet.init_from:
        _parts_from_init(acc, cfg)
    if not (root / "tokenizer").is_dir():
        raise UsageError(f"stage text needs the tokenizer stage's output in {root}; run it first")
    torch.manual_seed(cfg.seed + 3)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    text_encoder = build_text_encoder(cfg, tokenizer)
    if cfg.unet.init_from:
        text_encoder.load_state_dict(_fp32_weights(_init_folder(cfg) / "text_encoder" / "model.safetensors"))
    anchor = copy.deepcopy(text_encoder).requires_grad_(False).eval() if ct.layout_anchor > 0 else None
    model = torch.nn.ModuleDict({"text_encoder": text_encoder,
                                 "layout_head": LayoutHead(ct.hidden_size, ct.layout_cells)})
    opt = torch.optim.AdamW(model.parameters(), lr=ct.layout_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup_cosine(min(100, ct.layout_steps // 10), ct.layout_steps))

    def batches(start: int):
        for _, captions, (picture, fixed) in step_scenes(cfg, acc, 3 * 10**7, start, ct.layout_steps,
                                                         ct.layout_batch, ct.layout_cells):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # (B, 77)
            yield ids.to(acc.device), picture, fixed  # (B, 77), (B, 4, cells, cells), (B,)

    def loss(models, batch, step):
        ids, picture, fixed = batch
        m = acc.unwrap_model(models["text"])
        encoded = m["text_encoder"](ids)
        tokens = encoded.last_hidden_state  # (B, 77, D)
        layout_loss = layout_error(m["layout_head"](encoded.pooler_output), picture, fixed)
        values = {"layout_loss": layout_loss.item()}
        if anchor is None:
            return layout_loss, values
        with torch.no_grad():
            before = anchor(ids)[0]  # (B, 77, D): the starting encoder's tokens
        drift = F.mse_loss(tokens.float(), before.float())
        values["drift"] = drift.item()
        return layout_loss + ct.layout_anchor * drift, values

    job = loop.Job("text", {"text": model}, opt, sched, batches, loss, ct.layout_steps,
                   Checkpoints(root / "text_checkpoints", keep=cfg.keep_checkpoints), ct.checkpoint_every,
                   root / "text_log.jsonl", max_bad_steps=cfg.max_bad_steps, budget=budget)
    start = loop.resume(acc, job, resume)
    if anchor is not None:
        anchor.to(acc.device)
    loop.train(acc, job, start)
    out = root / "text"
    if acc.is_main_process and (start < ct.layout_steps or not (out / "model.safetensors").is_file()):
        model["text_encoder"].save_pretrained(str(out), safe_serialization=True)
        save_file(model["layout_head"].state_dict(), str(out / "layout_head.safetensors"))
        log.info("text: step %d -> %s", ct.layout_steps, out)


def stage_unet(cfg: DemoConfig, resume: str | None = "latest", budget: loop.TimeBudget | None = None) -> None:
    """Train the UNet and the text encoder on the VAE's latents; checkpoints hold them and their EMA copies."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    cu, root = cfg.unet, Path(cfg.output_dir)
    if cu.layout_weight < 0 or cfg.text.layout_cells < 1:
        raise UsageError("unet.layout_weight must be >= 0 (0 turns the layout loss off) and text.layout_cells >= 1")

    # 1. The parts: the run's tokenizer and frozen VAE, a new text encoder and UNet (and the layout task's head)
    acc = loop.accelerator(cfg.mixed_precision, root)
    if cu.init_from:
        _parts_from_init(acc, cfg)
    torch.manual_seed(cfg.seed)
    if not (root / "vae" / "config.json").is_file() or not (root / "tokenizer").is_dir():
        raise UsageError(f"stage unet needs the tokenizer and vae stages' output in {root}; run them first")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval().requires_grad_(False)
    latent_size = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg, latent_size)
    ema = {"unet": loop.EMA(unet, cu.ema_decay), "text_encoder": loop.EMA(text_encoder, cu.ema_decay)}
    noise_scheduler = train_noise_scheduler(cu)
    models = {"unet": unet, "text_encoder": text_encoder}
    if cu.layout_weight > 0:
        models["layout_head"] = LayoutHead(cfg.text.hidden_size, cfg.text.layout_cells)
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cu.lr, weight_decay=1e-2)
    run_steps = [cu.steps]  # this run's own steps: set below, once its first step is known

    def rate(i: int) -> float:  # i counts this run's steps (the scheduler's own count, kept in checkpoints)
        if cu.lr_schedule == "cosine":
            return loop.warmup_cosine(cu.warmup, run_steps[0])(i)
        return loop.warmup(cu.warmup)(i)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)

    # 2. The data: per step, latents of fresh scenes, the noise and timesteps, captions dropped for CFG
    snr = losses.snr(noise_scheduler).to(acc.device)  # (1000,)
    empty_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    cells = cfg.text.layout_cells if "layout_head" in models else 0

    def batches(start: int):
        for step, (images, captions, *picture) in enumerate(
                step_scenes(cfg, acc, 5 * 10**7, start, cu.steps, cu.batch, cells), start):
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * acc.num_processes + acc.process_index)
            with torch.no_grad():
                posterior = vae.encode(images.to(acc.device)).latent_dist
                latents = posterior.sample(generator=None) * vae.config.scaling_factor  # (B, 4, 16, 16)
            if cu.caption_extras:
                rng = random.Random(cfg.seed * 7919 + step * acc.num_processes + acc.process_index)
                captions = [f"{c}, {extra_phrase(rng)}" if rng.random() < cu.caption_extras else c for c in captions]
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # (B, 77)
            ids[torch.rand(len(captions), generator=gen) < cu.caption_dropout] = empty_ids  # unconditional rows
            noise = torch.randn(latents.shape, generator=gen).to(acc.device)  # (B, 4, 16, 16)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
            t = t.to(acc.device)  # (B,)
            noisy = noise_scheduler.add_noise(latents, noise, t)  # (B, 4, 16, 16)
            yield noisy, t, losses.target(noise_scheduler, latents, noise, t), ids.to(acc.device), picture

    # 3. The loss: min-SNR-weighted diffusion loss, plus the layout task's when it is on
    def loss(models, batch, step):
        noisy, t, target, ids, picture = batch
        encoded = models["text_encoder"](ids)
        pred = models["unet"](noisy, t, encoded.last_hidden_state).sample  # (B, 4, 16, 16)
        loss = losses.diffusion_loss(pred, target, snr[t], cu.prediction_type, cu.min_snr_gamma, cu.snr_floor)
        if "layout_head" not in models:
            return loss, {}
        layout_loss = layout_error(models["layout_head"](encoded.pooler_output), *picture[0])
        return loss + cu.layout_weight * layout_loss, {"layout_loss": layout_loss.item()}

    def samples(done: int) -> None:
        if done % cu.sample_every == 0 or done == cu.steps:
            pipe = assemble(cfg, tokenizer, ema["text_encoder"].shadow, vae, ema["unet"].shadow)
            log.info("unet step %d: samples -> %s", done,
                     sample_grid(pipe, SAMPLE_PROMPTS, root / "samples" / f"unet-{done:08d}.png"))

    job = loop.Job("unet", models, opt, sched, batches, loss, cu.steps,
                   Checkpoints(root / "unet_checkpoints", keep=cfg.keep_checkpoints, pinned=(cfg.guide.step,)),
                   cu.checkpoint_every, root / "unet_log.jsonl", ema=ema, max_bad_steps=cfg.max_bad_steps,
                   budget=budget, after_step=samples)

    # 4. Where it starts: a checkpoint of the run, else an exported model's weights (unet.init_from), and the
    # text stage's encoder when there is one
    start = loop.resume(acc, job, resume)
    resumed = start > 0
    if not resumed and cu.init_from:
        folder = _init_folder(cfg)
        _init_from(folder, unet, text_encoder, ema["unet"].shadow, ema["text_encoder"].shadow)
        start = json.loads((folder / "t2i.json").read_text()).get("trained_unet_steps", 0)
        if start >= cu.steps:
            raise UsageError(f"{folder} is already trained {start} steps; set unet.steps above that, e.g. "
                             f"--set unet.steps={start + 1000}")
        if acc.is_main_process:
            log.info("unet: started from the weights in %s (step %d; optimizer state is new)", folder, start)
    run_steps[0] = cu.steps - (start - sched.last_epoch)  # a resumed scheduler has counted its run's steps
    if not resumed and (root / "text" / "config.json").is_file():  # the text stage's encoder (and head)
        text_sd = load_file(str(root / "text" / "model.safetensors"))
        text_encoder.load_state_dict(text_sd)
        ema["text_encoder"].shadow.load_state_dict(text_sd)
        if "layout_head" in models and (root / "text" / "layout_head.safetensors").is_file():
            head_sd = load_file(str(root / "text" / "layout_head.safetensors"))
            cells = math.isqrt(head_sd["net.3.bias"].numel() // 4)
            if cells != cfg.text.layout_cells:
                raise UsageError(f"the text stage drew {cells}x{cells} layouts; set text.layout_cells = {cells}")
            models["layout_head"].load_state_dict(head_sd)
        if acc.is_main_process:
            log.info("unet: the text encoder starts from the text stage's, %s", root / "text")
    elif not resumed and "layout_head" in models and cu.init_from and acc.is_main_process:
        log.info("unet: the layout task's head starts untrained (a model ships without it), so its first steps "
                 "push the text encoder at random; run --stage text first (`all` does)")

    # 5. Train
    vae.to(acc.device)
    loop.train(acc, job, start)


def _fp32_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in fp32 (the bundled model ships fp16)."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def _init_folder(cfg: DemoConfig) -> Path:
    """unet.init_from as a folder: "t2i-shapes" names the bundled model (also in a non-editable install)."""
    from t2i.models.sources import BUNDLED_NAME, bundled_model_path

    if cfg.unet.init_from == BUNDLED_NAME and not Path(BUNDLED_NAME).exists():
        if (bundled := bundled_model_path()) is None:
            raise UsageError(f"the bundled model {BUNDLED_NAME} is not in this install; set unet.init_from to a folder")
        return bundled
    return Path(cfg.unet.init_from)


def _parts_from_init(acc, cfg: DemoConfig) -> None:
    """With unet.init_from set, a run that has no tokenizer, VAE or small decoder of its own takes the folder's
    (its UNet and text encoder learnt that latent space and those token ids), so continuing a bundled model is
    one command; a run's own parts are never replaced."""
    src, root = _init_folder(cfg), Path(cfg.output_dir)
    if not (src / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise UsageError(f"unet.init_from {src} has no unet/diffusion_pytorch_model.safetensors; give a model "
                         "folder t2i exported, such as assets/t2i-shapes")
    for part in ("tokenizer", "vae", "vae_tiny"):
        wanted = (src / part / ("vocab.json" if part == "tokenizer" else "config.json")).is_file()
        if wanted and not (root / part).exists() and acc.is_main_process:
            shutil.copytree(src / part, root / part)
            log.info("%s: taken from %s", part, src / part)
    acc.wait_for_everyone()


def _init_from(folder: Path, unet, text_encoder, ema_unet, ema_text) -> None:
    u = _fp32_weights(folder / "unet" / "diffusion_pytorch_model.safetensors")
    t = _fp32_weights(folder / "text_encoder" / "model.safetensors")
    for module, sd in ((unet, u), (ema_unet, u), (text_encoder, t), (ema_text, t)):
        module.load_state_dict(sd)
