"""Textual inversion: `t2i train embedding --data DIR --output OUT --token NAME`.

Learns N new token vectors (an embedding) so that NAME in a prompt calls what the
images share, with the whole model frozen: only the vectors train.

1. Check the config, the data and the output folder (cheap; before any model loads).
2. Load the base model through t2i and freeze it; start the vectors from the token
   embeddings of `init_words` (A1111's way: vector i from word token i * len / N).
3. Cache the VAE latents; each caption gets NAME appended ("a red circle, NAME").
4. Train on the one training loop (train/loop.py): each caption is encoded by the
   prompt encoder t2i generates with (t2i.prompts.encode_sd), the vectors in the
   place of NAME's tokens, so training sees exactly what generation will; the
   diffusion loss with min-SNR weighting (train/losses.py); checkpoints hold only
   the vectors, with an exact resume.
5. Write OUT/NAME.safetensors in A1111's layout (`emb_params`, (N, D)), which
   A1111, diffusers' loader and t2i read.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from t2i.embeddings import Embedding
from t2i.errors import UsageError
from t2i.files import atomic_write
from t2i.train import loop, losses
from t2i.train.checkpoint import Checkpoints
from t2i.train.config import load_config
from t2i.train.data import BatchPlan, Dataset, bucket_sizes, scan, with_trigger
from t2i.train.embedding_config import EmbeddingTrainConfig
from t2i.train.lora import Encoder

log = logging.getLogger(__name__)

KEY = "emb_params"  # A1111's safetensors layout


def load(config: str | None, overrides: dict) -> EmbeddingTrainConfig:
    return load_config(EmbeddingTrainConfig, config, overrides)


def check(cfg: EmbeddingTrainConfig, resume: str | None) -> tuple[Dataset, Path]:
    """Every cheap check, before a model is loaded."""
    if not cfg.data:
        raise UsageError("give the training images with --data DIR")
    if not cfg.output:
        raise UsageError("give the output folder with --output DIR")
    if not cfg.token or not cfg.token.strip() or any(c in cfg.token for c in '/\\:,()[]<>"') or cfg.token != cfg.token.strip():
        raise UsageError(f"--token {cfg.token!r}: give the embedding's name, one word without /\\:,()[]<>\" "
                         "(e.g. pastelstyle): it is the file's name and the word that calls it in a prompt")
    for name, value, low in (("steps", cfg.steps, 1), ("batch", cfg.batch, 1), ("vectors", cfg.vectors, 1),
                             ("checkpoint-every", cfg.checkpoint_every, 1), ("max-bad-steps", cfg.max_bad_steps, 1)):
        if value < low:
            raise UsageError(f"--{name} must be at least {low}, got {value}")
    if cfg.vectors > 75:
        raise UsageError(f"--vectors {cfg.vectors}: a prompt chunk holds 75 tokens; use fewer (1-16 is usual)")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.max_minutes >= 0:
        raise UsageError(f"--max-minutes must be >= 0 (0: no limit), got {cfg.max_minutes:g}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UsageError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if cfg.resolution and cfg.resolution % 8:
        raise UsageError(f"--resolution {cfg.resolution} is not a multiple of 8")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is not a folder")
    final = out / f"{cfg.token}.safetensors"
    if not resume:
        if final.exists():
            raise UsageError(f"{final} exists (a finished run); choose a new --output or --token")
        if Checkpoints(out / "checkpoints").latest() is not None:
            raise UsageError(f"{out} holds checkpoints of an earlier run; continue it with --resume latest "
                             f"or choose a new --output")
    return scan(cfg.data), out


class Vectors(torch.nn.Module):
    """The trained vectors, (N, D): a module, so that accelerate prepares it like any model."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(init.detach().clone().float())  # (N, D)

    def forward(self) -> torch.Tensor:
        return self.weight


def initial_vectors(tokenizer, text_encoder, words: str, n: int) -> torch.Tensor:
    """(n, D): vector i is the token embedding of word token i * len / n of `words` (A1111's initialisation)."""
    ids = tokenizer(words or "*", add_special_tokens=False).input_ids or [tokenizer.bos_token_id]
    table = text_encoder.get_input_embeddings().weight.detach()  # (V, D)
    return torch.stack([table[ids[i * len(ids) // n]] for i in range(n)]).float()  # (n, D)


def save_embedding(path: Path, vectors: torch.Tensor, metadata: dict[str, str], overwrite: bool = False) -> Path:
    """A1111's safetensors layout: {"emb_params": (N, D)} with string metadata; written whole or not at all."""
    from safetensors.torch import save_file

    with atomic_write(path, overwrite=overwrite) as tmp:
        save_file({KEY: vectors.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    return path


# --------------------------------------------------------------------------- the run


def train(cfg: EmbeddingTrainConfig, resume: str | None = None) -> Path | None:
    """Run (or continue) textual inversion; returns the written embedding (None on processes other than the main,
    and when max_minutes ran out first)."""
    from t2i import prompts

    # 1. Check inputs, and read the checkpoint to resume (a damaged or hostile one is refused before a model loads)
    budget = loop.TimeBudget(cfg.max_minutes)
    dataset, out = check(cfg, resume)

    # 2. Load and freeze the base model; the new vectors
    run = loop.fine_tune("embedding", cfg, out, resume, dataset.report())
    ckpts, saved, acc, pipe = run.checkpoints, run.saved, run.acc, run.pipe
    noise_scheduler, prediction = run.noise_scheduler, run.prediction
    unet, vae, text_encoder, tokenizer = pipe.pipe.unet, pipe.pipe.vae, pipe.pipe.text_encoder, pipe.pipe.tokenizer
    name_ids = tokenizer(cfg.token, add_special_tokens=False).input_ids
    vectors = Vectors(initial_vectors(tokenizer, text_encoder, cfg.init_words, cfg.vectors)).to(acc.device)

    # 3. Data: buckets, a fixed order, cached latents; NAME after every caption
    factor = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * pipe.vae_scale_factor
    plan = BatchPlan(dataset, bucket_sizes(resolution, factor) if cfg.buckets else None, resolution, cfg.batch,
                     cfg.seed)
    captions = [with_trigger(it.caption, cfg.token) for it in dataset.items]
    encoder = Encoder(SimpleNamespace(cache_latents=True, train_text_encoder=True), dataset, plan, pipe, acc, captions)
    encoder.cache()  # latents only: the captions are encoded with the vectors at every step
    snr = losses.snr(noise_scheduler).to(acc.device)  # (T,)

    def batches(start: int):
        """Micro-batch n of this process: a pure function of n (a resumed run sees what a straight one would)."""
        for n in itertools.count(start):
            k = n * acc.num_processes + acc.process_index
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            idx = [i for i in plan[k] if i in encoder.latents] or [next(iter(encoder.latents))]
            mean = torch.stack([encoder.latents[i][0] for i in idx])  # (B, C, h, w)
            std = torch.stack([encoder.latents[i][1] for i in idx])
            latents = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
            latents, noise, t = latents.to(acc.device), noise.to(acc.device), t.to(acc.device)
            noisy = noise_scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
            yield noisy, t, losses.target(noise_scheduler, latents, noise, t), [captions[i] for i in idx]

    def loss(models, batch, step):
        noisy, t, target, texts = batch
        emb = Embedding(cfg.token, Path(cfg.token), "", {"": models["vectors"]()})  # (N, D), with its gradient
        table = {name_ids[0]: [(name_ids, emb)]}
        cond = torch.cat([prompts.encode_sd(tokenizer, text_encoder, text, embeddings=table, grad=True).embeds[:, :77]
                          for text in texts])  # (B, 77, D): the first chunk, as a short caption has one
        pred = unet(noisy, t, cond).sample  # (B, C, h, w)
        return losses.diffusion_loss(pred, target, snr[t], prediction, cfg.min_snr_gamma), {}

    # 4. Optimizer, schedule, resume
    opt = torch.optim.AdamW(vectors.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup(0))
    identity = {"base_model_hash": pipe.model.hash, "token": cfg.token, "vectors": cfg.vectors,
                "images": len(dataset.items)}
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    job = loop.Job("embedding", {"vectors": vectors}, opt, sched, batches, loss, cfg.steps, ckpts,
                   cfg.checkpoint_every, log_path, tensors={KEY: vectors.weight},
                   state={"identity": identity, "config": asdict(cfg)}, max_bad_steps=cfg.max_bad_steps,
                   budget=budget)
    start = loop.start_step(acc, job, saved, resume, identity)

    # 5. Train
    try:
        loop.train(acc, job, start)
    except loop.OutOfTime as stop:
        if acc.is_main_process:
            log.info("%s; continue with --resume latest", stop)
        return None

    # 6. Write the embedding in A1111's layout
    final = out / f"{cfg.token}.safetensors"
    if acc.is_main_process:
        import t2i

        metadata = {"t2i.version": t2i.__version__, "t2i.base_model": pipe.model.source.name,
                    "t2i.base_model_hash": pipe.model.hash, "t2i.token": cfg.token, "t2i.vectors": str(cfg.vectors),
                    "t2i.init_words": cfg.init_words, "t2i.steps": str(cfg.steps), "t2i.lr": str(cfg.lr),
                    "t2i.batch": str(cfg.batch * acc.num_processes), "t2i.images": str(len(dataset.items))}
        save_embedding(final, acc.unwrap_model(vectors).weight, metadata, overwrite=resume is not None)
        with open(log_path, "a") as f:
            f.write(json.dumps({"done": cfg.steps, "processes": acc.num_processes, "embedding": str(final)}) + "\n")
    acc.wait_for_everyone()
    return final if acc.is_main_process else None


def run(config: str | None, overrides: dict, resume: str | None = None) -> Path | None:
    cfg = load(config, overrides)
    return train(cfg, resume)
