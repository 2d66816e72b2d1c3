"""Train the demo model `t2i-shapes` from scratch on the shapes world.

The stages, each resumable, each one command (`t2i train demo --stage S`):

1. tokenizer: a CLIP BPE tokenizer over the shapes world's words
   (stock `CLIPTokenizer.from_pretrained` loads it).
2. vae: an AutoencoderKL, 64x64x3 <-> 16x16x4, reconstruction (MSE) + a tiny KL.
3. text (optional, `text.layout_steps`): the CLIPTextModel alone learns to
   draw a coarse picture of each caption's scene (an auxiliary head, never
   exported), so the UNet starts from words that already say where things are.
4. unet: the CLIPTextModel and a UNet2DConditionModel trained together
   (epsilon or v objective, min-SNR weighting, optionally the layout task
   kept on), on VAE latents; an EMA copy of both is what gets exported.
5. decoder (optional, `vae.decoder_steps`): the VAE decoder fine-tuned on the
   frozen encoder's latents.
6. tiny_vae (optional, `vae.tiny_steps`): a TAESD-style AutoencoderTiny in the
   same latent space, the small decoder of the speed option `tiny_vae`.
7. export: the diffusers folder from the newest checkpoints.

`--stage all` runs them in order and writes a diffusers folder that stock
`StableDiffusionPipeline.from_pretrained` loads. Everything runs through
accelerate: one CPU process here, a GPU when there is one, several processes
under `accelerate launch`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2i.errors import UsageError
from t2i.files import give_usual_mode
from t2i.demo.shapes import BACKGROUNDS, IMAGE_SIZE, SceneMix, caption_words, render, sample_scene

from t2i.train.checkpoint import Checkpoints, load_training_state, save_training_state
from t2i.train.config import load_config, to_dict

VAL_SEED = 10**9  # held-out scenes (for PSNR and sample grids) start here
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


@dataclass
class TokenizerConfig:
    max_length: int = 77


@dataclass
class VAEConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    # training
    steps: int = 600
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 50
    kl_weight: float = 1e-6
    checkpoint_every: int = 100
    # decoder fine-tuning (stage "decoder"): the encoder and so the latent space stay fixed,
    # so it can run after (or while) the UNet trains, and improves every image it decodes
    decoder_steps: int = 0
    decoder_lr: float = 2e-4
    # the small decoder (stage "tiny_vae", speed option `tiny_vae`): a TAESD-style AutoencoderTiny
    # trained in the frozen VAE's latent space; its decoder on the UNet's (scaled) latents, its
    # encoder to give the VAE's scaled latent means. One width, one entry of tiny_blocks per level.
    tiny_channels: int = 32
    tiny_blocks: list[int] = field(default_factory=lambda: [2, 1, 1])
    tiny_steps: int = 0
    tiny_lr: float = 1e-3
    # A model folder whose UNet makes latents for the small decoder to learn too (half of each batch, target:
    # the VAE's decoding of them): generated latents leave the encoder's distribution, and a decoder fitted only
    # to encoded renders decodes them differently from the VAE. "" = encoded renders only.
    tiny_distill_from: str = ""
    tiny_pool: int = 512  # generated latents, made once and kept in <output_dir>/tiny_vae_pool.safetensors


@dataclass
class TextConfig:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # Stage "text" (optional, layout_steps > 0): the text encoder alone learns to draw a coarse picture of the
    # objects of each caption that fixes a position or relation (LayoutHead), at ~1/3 of a UNet step's time
    # (batch 128); the UNet stage then starts from it and keeps the task on with unet.layout_weight. Starts from
    # unet.init_from's text encoder when that is set; layout_anchor then keeps its tokens near where they were
    # (MSE to the starting encoder's), so the UNet trained on them still reads them while new words take shape.
    layout_cells: int = 8
    layout_steps: int = 0
    layout_batch: int = 128
    layout_lr: float = 1e-3
    layout_anchor: float = 0.0
    checkpoint_every: int = 200


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    # Attention only at 8x8 and 4x4: at 16x16 it costs twice the step time on a CPU.
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    )
    # The noise schedule (diffusers' DDPMScheduler names). Stable Diffusion's scaled-linear betas leave
    # sqrt(alpha_bar_T) = 0.068 of the image in the last step's latent: at 16x16 its mean, the background and
    # the coarse layout, can be read from the noise itself, and the model learns to take them from the seed
    # instead of the prompt. DDPM's linear betas (1e-4..0.02) leave 0.0064.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # What the UNet predicts: "epsilon" (the noise) or "v_prediction" (sqrt(a) eps - sqrt(1-a) x0). Near
    # SNR 0 an epsilon model must output its input almost exactly (an error e costs e / sqrt(a) in the image,
    # x157 at t=999 with linear betas); v tends to -x0 there, so the noisiest steps learn the image itself.
    prediction_type: str = "epsilon"
    # training
    steps: int = 4000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 200
    # "constant" after the warm-up, or "cosine": down to 5% of lr at unet.steps, over this run's own steps (a
    # run continued from init_from decays from where it starts). A constant rate keeps the weights wandering
    # at the noise level the rate sets; the cosine lets the last steps settle (a cool-down).
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # Min-SNR-gamma weighs a step's image (x0) error by min(SNR, gamma): the noisiest steps (SNR ~1e-4 at
    # t=999 with linear betas), where only the prompt can decide the background and layout, count for almost
    # nothing. A floor keeps them in the loss: x0 weight max(min(SNR, gamma), snr_floor); 0 = plain min-SNR,
    # 1 with v_prediction = Salimans & Ho's truncated-SNR weighting capped at gamma.
    snr_floor: float = 0.0
    # Weight of the text stage's layout task kept on during this stage (0 = off; its LayoutHead, trained along,
    # is never exported). The diffusion loss alone teaches the text encoder only what the UNet already uses:
    # after 5600 steps "on the left" and "on the right" differed by 0.6 per token (a colour word by 14), and
    # the UNet put objects where the seed's noise put them.
    layout_weight: float = 0.0
    caption_dropout: float = 0.1
    checkpoint_every: int = 200
    sample_every: int = 500
    # A diffusers folder (e.g. the bundled model) whose UNet and text encoder start the
    # run when there is no checkpoint yet; its vae/ and tokenizer/ must be the run's.
    init_from: str = ""


@dataclass
class GuideConfig:
    # Autoguidance's guide (t2i.guide, `t2i guide`): the UNet checkpoint of this step is kept past pruning, and
    # the export stage stores it in the model's guide/ as `bits` bits per weight of its difference from the
    # exported UNet, with autoguidance `scale` below timestep `below` in t2i.json. 0 = no guide. A multiple of
    # unet.checkpoint_every, well before the exported step (the bundled model's: step 8200 of 21300).
    step: int = 0
    bits: int = 3
    scale: float = 3.0
    below: int = 500


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    export_dir: str = "runs/demo/t2i-shapes"
    seed: int = 0
    mixed_precision: str = "no"
    keep_checkpoints: int = 2
    # Processes that render the coming steps' scenes while the model trains (0: rendered in the training
    # process, between steps). A step's scenes are a pure function of the step, so this changes no bits. On a
    # GPU the renderer is the bottleneck: one H200 trained 9 steps of batch 256 a second with 14 rendering ahead.
    data_workers: int = 0
    # Stop after this many minutes (0 = no limit): the running stage stops at its next checkpoint, and a run of
    # all stages still exports the newest UNet checkpoint; the same command resumes. For lent machines.
    max_minutes: float = 0.0
    # The training scenes' mix (every stage's data; validation scenes keep the default): relative weights of
    # the kinds single, count, pair, relation, triple, the share of captions without colours and the share of
    # counting scenes with four objects (t2i.shapes.SceneMix).
    scenes: SceneMix = field(default_factory=SceneMix)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)


# --------------------------------------------------------------------------- data


def scene_batch(first_seed: int, n: int, layout_cells: int = 0, mix: SceneMix = SceneMix()):
    """Scenes first_seed .. first_seed+n-1 as a (n, 3, 64, 64) tensor in [-1, 1] and their captions; with
    `layout_cells`, also their layout pictures (n, 4, cells, cells): per cell, the share of its pixels that
    are objects and their mean colour times that share (0..1). Backgrounds are left out: one caption in four
    names them, and they are most of the pixels (as a difference to the background, the objects' colours
    would flip sign with it and average out over the captions that don't name it); and which captions fix
    the layout, (n,) bool: a position or a relation. Only those are worth drawing: where a caption leaves the
    places free, the picture is noise to the text."""
    import numpy as np

    scenes = [sample_scene(first_seed + i, mix=mix) for i in range(n)]
    arr = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])  # (n, 64, 64, 3)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, 64, 64)
    if not layout_cells:
        return images, [s.caption for s in scenes]
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0  # (n, 3)
    fg = ((images - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (n, 1, 64, 64)
    layout = F.adaptive_avg_pool2d(torch.cat([fg, fg * (images + 1) / 2], dim=1), layout_cells)
    fixed = torch.tensor([s.position is not None or s.relation is not None for s in scenes])
    return images, [s.caption for s in scenes], (layout, fixed)


def batch_seed(seed: int, stage_offset: int, step: int, batch: int, rank: int, world: int) -> int:
    """The first scene seed of a process's batch at `step`: the data position is a pure function of it."""
    return seed * 10**8 + stage_offset + (step * world + rank) * batch


class _StepScenes(torch.utils.data.Dataset):
    """Item i: the scenes of step start + i for one process (scene_batch of its batch_seed)."""

    def __init__(self, seed: int, stage_offset: int, start: int, stop: int, batch: int, rank: int, world: int,
                 cells: int, mix: SceneMix):
        self.seed, self.offset, self.start, self.stop = seed, stage_offset, start, stop
        self.batch, self.rank, self.world, self.cells, self.mix = batch, rank, world, cells, mix

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        first = batch_seed(self.seed, self.offset, self.start + i, self.batch, self.rank, self.world)
        return scene_batch(first, self.batch, self.cells, self.mix)


def _as_is(item):
    return item


def step_scenes(cfg: DemoConfig, acc, stage_offset: int, start: int, stop: int, batch: int, cells: int = 0):
    """The scenes of steps start..stop-1, in order (see scene_batch): rendered on demand, or ahead by
    cfg.data_workers processes (a torch DataLoader; the same batches either way)."""
    data = _StepScenes(cfg.seed, stage_offset, start, stop, batch, acc.process_index, acc.num_processes, cells,
                       cfg.scenes)
    if cfg.data_workers <= 0:
        return (data[i] for i in range(len(data)))
    # its own generator: the workers' seeds must not come from the global RNG, which the steps' noise draws on
    return iter(torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_as_is, num_workers=cfg.data_workers,
                                            prefetch_factor=8, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- models


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a word's pieces, lowest rank first (what CLIPTokenizer does)."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_tokenizer(cfg: DemoConfig, out: Path):
    """A CLIP-format BPE tokenizer in which every word of the shapes world is one token.

    Built deterministically (no trainer: BPE trainers break ties differently run to
    run): the 256 byte characters, each also as a word end (`x</w>`), then for each
    world word in sorted order just the merges that make it a single token. Any
    other text still tokenizes, character by character. Stock CLIPTokenizer loads it.
    """
    from transformers import CLIPTokenizer

    byte_chars = _bytes_to_unicode()
    alphabet = list(byte_chars.values())
    vocab = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted(caption_words()):
        encoded = "".join(byte_chars[b] for b in word.encode("utf-8"))
        pieces = _bpe([*encoded[:-1], encoded[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # join the first two pieces left, until the word is whole
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab.append(pair[0] + pair[1])
            pieces = _bpe(pieces, ranks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                        model_max_length=cfg.tokenizer.max_length)
    tok.save_pretrained(str(out))
    tok = CLIPTokenizer.from_pretrained(str(out))
    for w in caption_words():  # every world word must be a single token
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {w!r} into {len(ids)} tokens")
    return tok


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


# --------------------------------------------------------------------------- helpers


def _accelerator(cfg: DemoConfig):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.mixed_precision)


def _warmup(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def _warmup_cosine(warmup: int, steps: int, floor: float = 0.05):
    """Warm-up, then a cosine from the full rate down to `floor` of it at `steps`: the last checkpoint settles
    instead of wandering with a constant rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _state_beside_weights(opt) -> None:
    """A resumed optimizer's moments go where accelerate put the weights: restored before `prepare`, they stayed
    on the CPU while the weights went to a GPU ("found at least two devices" at the first step)."""
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            for k, v in inner.state.get(p, {}).items():
                if torch.is_tensor(v) and k != "step" and v.device != p.device:
                    inner.state[p][k] = v.to(p.device)


class _OutOfTime(Exception):
    """A stage stopped at a checkpoint because the run's max_minutes ran out."""


def _stop_if_out_of_time(acc, cfg: DemoConfig, name: str, step: int) -> None:
    """After a checkpoint: raise _OutOfTime once max_minutes have passed since the run began (every process
    agrees, so none waits for another that stopped)."""
    deadline = getattr(cfg, "deadline", None)
    if deadline is None:
        return
    late = torch.tensor(float(time.monotonic() > deadline), device=acc.device)
    if float(acc.reduce(late, reduction="sum")) > 0:
        raise _OutOfTime(f"{name}: max_minutes ({cfg.max_minutes:g}) ran out at step {step}, its checkpoint written")


def _update(acc, loss: torch.Tensor, params, opt, sched) -> None:
    """One optimizer step of every stage: backward, clip the gradient norm to 1, step the rate schedule."""
    acc.backward(loss)
    acc.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _resume(acc, ckpts: Checkpoints, resume, modules: dict, opt, sched, name: str) -> int:
    """The step to start at: the checkpoint `resume` names (latest, a path) restored into modules, else 0."""
    if (path := ckpts.resolve(resume)) is None:
        return 0
    state, _ = load_training_state(path, modules, opt, sched)
    acc.print(f"{name}: resumed from {path} at step {state['step']}")
    return state["step"]


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between image batches in [-1, 1], measured on 8-bit pixels like a viewer sees them."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@lru_cache(maxsize=4)
def held_out_renders(n: int = 256) -> torch.Tensor:
    """The first `n` held-out scenes (VAL_SEED on) as (n, 3, 64, 64) in [-1, 1]; rendered once per process
    (shared: read it, never write to it)."""
    return scene_batch(VAL_SEED, n)[0]


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
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    kept = list(ema.parameters())
    torch._foreach_lerp_(kept, [p.detach().to(e.dtype) for e, p in zip(kept, model.parameters())], 1 - decay)


# --------------------------------------------------------------------------- stages


def stage_tokenizer(cfg: DemoConfig) -> None:
    out = Path(cfg.output_dir) / "tokenizer"
    tok = build_tokenizer(cfg, out)
    print(f"tokenizer: {len(tok)} tokens -> {out}")


def stage_vae(cfg: DemoConfig, resume: str | None = "latest") -> None:
    acc = _accelerator(cfg)
    torch.manual_seed(cfg.seed)
    root = Path(cfg.output_dir)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(cfg.vae.warmup))
    ckpts = Checkpoints(root / "vae_checkpoints", keep=cfg.keep_checkpoints)
    start = _resume(acc, ckpts, resume, {"vae": vae}, opt, sched, "vae")
    vae, opt = acc.prepare(vae, opt)
    _state_beside_weights(opt)
    cv = cfg.vae
    bar = tqdm(range(start, cv.steps), initial=start, total=cv.steps, desc="vae", disable=not acc.is_main_process)
    scenes = step_scenes(cfg, acc, 0, start, cv.steps, cv.batch)
    for step in bar:
        vae.train()
        images, _ = next(scenes)
        images = images.to(acc.device)
        with acc.autocast():
            posterior = acc.unwrap_model(vae).encode(images).latent_dist
            recon = acc.unwrap_model(vae).decode(posterior.sample()).sample  # (B, 3, 64, 64)
            rec_loss = F.mse_loss(recon.float(), images)
            loss = rec_loss + cv.kl_weight * posterior.kl().mean()
        _update(acc, loss, vae.parameters(), opt, sched)
        done = step + 1
        bar.set_postfix(loss=f"{rec_loss.item():.5f}")
        if acc.is_main_process:
            _log(root / "vae_log.jsonl", {"step": done, "mse": rec_loss.item(), "lr": sched.get_last_lr()[0], "t": time.time()})
        if done % cv.checkpoint_every == 0 or done == cv.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                model = acc.unwrap_model(vae)
                ckpts.save(done, lambda d: save_training_state(d, {"vae": model}, opt, sched))
                p = vae_psnr(model)
                _log(root / "vae_log.jsonl", {"step": done, "val_psnr": p})
                bar.write(f"vae step {done}: held-out PSNR {p:.2f} dB")
            _stop_if_out_of_time(acc, cfg, "vae", done)
    if acc.is_main_process:
        export_vae(cfg, acc.unwrap_model(vae))


@torch.no_grad()
def export_vae(cfg: DemoConfig, vae) -> Path:
    """Save the VAE with a scaling factor that gives its latents unit variance."""
    vae.eval()
    images, _ = scene_batch(VAL_SEED + 10**6, 256)
    latents = vae.encode(images).latent_dist.sample()  # (256, 4, 16, 16)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    out = Path(cfg.output_dir) / "vae"
    vae.save_pretrained(str(out))
    print(f"vae: scaling_factor {vae.config.scaling_factor:.4f}, held-out PSNR {vae_psnr(vae):.2f} dB -> {out}")
    return out


def _vae_stage_start(cfg: DemoConfig, stage: str, seed_offset: int):
    """A stage on the vae stage's latent space: its accelerator, seeded, and the VAE from <output_dir>/vae."""
    from diffusers import AutoencoderKL

    root = Path(cfg.output_dir)
    if not (root / "vae" / "config.json").is_file():
        raise UsageError(f"stage {stage} needs the vae stage's output in {root}; run it first")
    acc = _accelerator(cfg)
    torch.manual_seed(cfg.seed + seed_offset)
    return acc, AutoencoderKL.from_pretrained(str(root / "vae"))


def _small_stage(cfg: DemoConfig, acc, name: str, model, params, lr: float, steps: int, data_offset: int, resume,
                 loss_fn, val_fn, decay: bool = False):
    """The loop the decoder and tiny_vae stages share: AdamW with warm-up (then a cosine decay with `decay`),
    a fresh batch of renders per step (`loss_fn(model, images, step)` -> (loss, values to log)), resumable
    checkpoints of `model` under <output_dir>/<name>_checkpoints, a JSONL log, and `val_fn(model)` (PSNR, dB)
    at each checkpoint. Returns the trained (unwrapped) model."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cv.warmup, steps) if decay else _warmup(cv.warmup))
    ckpts = Checkpoints(root / f"{name}_checkpoints", keep=cfg.keep_checkpoints)
    start = _resume(acc, ckpts, resume, {name: model}, opt, sched, name)
    prepared, opt = acc.prepare(model, opt)
    _state_beside_weights(opt)
    model = acc.unwrap_model(prepared)
    log = root / f"{name}_log.jsonl"
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, disable=not acc.is_main_process)
    scenes = step_scenes(cfg, acc, data_offset, start, steps, cv.batch)
    for step in bar:
        images, _ = next(scenes)
        with acc.autocast():
            loss, values = loss_fn(model, images.to(acc.device), step)
        _update(acc, loss, params, opt, sched)
        done = step + 1
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if acc.is_main_process:
            _log(log, {"step": done, **values, "t": time.time()})
        if done % cv.checkpoint_every == 0 or done == steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                ckpts.save(done, lambda d: save_training_state(d, {name: model}, opt, sched))
                p = val_fn(model)
                _log(log, {"step": done, "val_psnr": p})
                bar.write(f"{name} step {done}: held-out PSNR {p:.2f} dB")
            _stop_if_out_of_time(acc, cfg, name, done)
    return model


def stage_decoder(cfg: DemoConfig, resume: str | None = "latest") -> None:
    """Fine-tune only the VAE decoder on latents of the frozen encoder; rewrites <output_dir>/vae."""
    cv, root = cfg.vae, Path(cfg.output_dir)
    if cv.decoder_steps <= 0:
        return
    acc, vae = _vae_stage_start(cfg, "decoder", seed_offset=1)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)

    def loss_fn(model, images, step):
        model.decoder.train()
        with torch.no_grad():
            latents = model.encode(images).latent_dist.sample()  # (B, 4, 16, 16): the UNet's latent space
        loss = F.mse_loss(model.decode(latents).sample.float(), images)
        return loss, {"mse": loss.item()}

    params = [p for p in vae.parameters() if p.requires_grad]
    model = _small_stage(cfg, acc, "decoder", vae, params, cv.decoder_lr, cv.decoder_steps, 9 * 10**7, resume,
                         loss_fn, vae_psnr, decay=True)
    if acc.is_main_process:
        model.eval()
        model.save_pretrained(str(root / "vae"))  # same scaling factor: the latent space is unchanged
        print(f"decoder: held-out PSNR {vae_psnr(model):.2f} dB -> {root / 'vae'}")


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


def stage_tiny_vae(cfg: DemoConfig, resume: str | None = "latest") -> None:
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
        model.train()
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

    model = _small_stage(cfg, acc, "tiny_vae", tiny, list(tiny.parameters()), cv.tiny_lr, cv.tiny_steps,
                         8 * 10**7, resume, loss_fn, val_fn)
    if acc.is_main_process:
        model.eval()
        if pool is not None:
            p = batched_psnr(lambda z: model.decode(z).sample, *pool)
            _log(root / "tiny_vae_log.jsonl", {"step": cv.tiny_steps, "generated_psnr_vs_vae": p})
            print(f"tiny_vae: on generated latents it matches the VAE's decoding at {p:.2f} dB")
        model.save_pretrained(str(root / "vae_tiny"))
        print(f"tiny_vae: held-out PSNR {val_fn(model):.2f} dB (the VAE: {vae_psnr(vae):.2f} dB) "
              f"-> {root / 'vae_tiny'}")


def stage_text(cfg: DemoConfig, resume: str | None = "latest") -> None:
    """Train the text encoder alone on the layout task (LayoutHead); write it to <output_dir>/text."""
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    ct, root = cfg.text, Path(cfg.output_dir)
    if ct.layout_steps <= 0:
        return
    if ct.layout_cells < 1 or ct.layout_anchor < 0:
        raise UsageError("text.layout_cells must be >= 1 and text.layout_anchor >= 0")
    acc = _accelerator(cfg)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(min(100, ct.layout_steps // 10), ct.layout_steps))
    ckpts = Checkpoints(root / "text_checkpoints", keep=cfg.keep_checkpoints)
    start = _resume(acc, ckpts, resume, {"text": model}, opt, sched, "text")
    prepared, opt = acc.prepare(model, opt)
    _state_beside_weights(opt)
    model = acc.unwrap_model(prepared)
    if anchor is not None:
        anchor.to(acc.device)
    bar = tqdm(range(start, ct.layout_steps), initial=start, total=ct.layout_steps, desc="text",
               disable=not acc.is_main_process)
    scenes = step_scenes(cfg, acc, 3 * 10**7, start, ct.layout_steps, ct.layout_batch, ct.layout_cells)
    for step in bar:
        model.train()
        _, captions, (picture, fixed) = next(scenes)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(acc.device)
        with acc.autocast():
            encoded = model["text_encoder"](ids)
            tokens = encoded.last_hidden_state  # (B, 77, D)
            layout_loss = layout_error(model["layout_head"](encoded.pooler_output), picture, fixed)
            loss = layout_loss
            values = {"layout_loss": layout_loss.item()}
            if anchor is not None:
                with torch.no_grad():
                    before = anchor(ids)[0]
                drift = F.mse_loss(tokens.float(), before.float())
                loss = loss + ct.layout_anchor * drift
                values["drift"] = drift.item()
        _update(acc, loss, model.parameters(), opt, sched)
        done = step + 1
        bar.set_postfix(loss=f"{layout_loss.item():.4f}")
        if acc.is_main_process:
            _log(root / "text_log.jsonl", {"step": done, **values, "lr": sched.get_last_lr()[0], "t": time.time()})
        if done % ct.checkpoint_every == 0 or done == ct.layout_steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                ckpts.save(done, lambda d: save_training_state(d, {"text": model}, opt, sched))
            _stop_if_out_of_time(acc, cfg, "text", done)
    out = root / "text"
    if acc.is_main_process and (start < ct.layout_steps or not (out / "model.safetensors").is_file()):
        model["text_encoder"].save_pretrained(str(out), safe_serialization=True)
        save_file(model["layout_head"].state_dict(), str(out / "layout_head.safetensors"))
        acc.print(f"text: step {ct.layout_steps} -> {out}")


def stage_unet(cfg: DemoConfig, resume: str | None = "latest") -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    if cfg.unet.layout_weight < 0 or cfg.text.layout_cells < 1:
        raise UsageError("unet.layout_weight must be >= 0 (0 turns the layout loss off) and text.layout_cells >= 1")
    acc = _accelerator(cfg)
    if cfg.unet.init_from:
        _parts_from_init(acc, cfg)
    torch.manual_seed(cfg.seed)
    root = Path(cfg.output_dir)
    if not (root / "vae" / "config.json").is_file() or not (root / "tokenizer").is_dir():
        raise UsageError(f"stage unet needs the tokenizer and vae stages' output in {root}; run them first")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval().requires_grad_(False)
    latent_size = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg, latent_size)
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    cu = cfg.unet
    noise_scheduler = train_noise_scheduler(cu)
    layout = LayoutHead(cfg.text.hidden_size, cfg.text.layout_cells) if cu.layout_weight > 0 else None
    params = list(unet.parameters()) + list(text_encoder.parameters()) + (list(layout.parameters()) if layout else [])
    opt = torch.optim.AdamW(params, lr=cu.lr, weight_decay=1e-2)
    run_steps = [cu.steps]  # this run's own steps: set below, once its first step is known

    def rate(i: int) -> float:  # i counts this run's steps (the scheduler's own count, kept in checkpoints)
        if cu.lr_schedule == "cosine":
            return _warmup_cosine(cu.warmup, run_steps[0])(i)
        return _warmup(cu.warmup)(i)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    ckpts = Checkpoints(root / "unet_checkpoints", keep=cfg.keep_checkpoints, pinned=(cfg.guide.step,))
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    if layout is not None:
        modules["layout_head"] = layout
    start = 0
    if (path := ckpts.resolve(resume)) is not None:
        state, _ = load_training_state(path, modules, opt, sched)
        start = state["step"]
        acc.print(f"unet: resumed from {path} at step {start}")
    elif cu.init_from:
        folder = _init_folder(cfg)
        _init_from(folder, unet, text_encoder, ema_unet, ema_text)
        start = json.loads((folder / "t2i.json").read_text()).get("trained_unet_steps", 0)
        if start >= cu.steps:
            raise UsageError(f"{folder} is already trained {start} steps; set unet.steps above that, e.g. "
                             f"--set unet.steps={start + 1000}")
        acc.print(f"unet: started from the weights in {folder} (step {start}; optimizer state is new)")
    run_steps[0] = cu.steps - (start - sched.last_epoch)  # a resumed scheduler has counted its run's steps
    if path is None and (root / "text" / "config.json").is_file():  # the text stage's encoder (and head)
        text_sd = load_file(str(root / "text" / "model.safetensors"))
        text_encoder.load_state_dict(text_sd)
        ema_text.load_state_dict(text_sd)
        if layout is not None and (root / "text" / "layout_head.safetensors").is_file():
            head_sd = load_file(str(root / "text" / "layout_head.safetensors"))
            cells = math.isqrt(head_sd["net.3.bias"].numel() // 4)
            if cells != cfg.text.layout_cells:
                raise UsageError(f"the text stage drew {cells}x{cells} layouts; set text.layout_cells = {cells}")
            layout.load_state_dict(head_sd)
        acc.print(f"unet: the text encoder starts from the text stage's, {root / 'text'}")
    elif path is None and layout is not None and cu.init_from:
        acc.print("unet: the layout task's head starts untrained (a model ships without it), so its first steps "
                  "push the text encoder at random; run --stage text first (`all` does)")
    unet, text_encoder, opt = acc.prepare(unet, text_encoder, opt)
    if layout is not None:
        layout = acc.prepare(layout)
    _state_beside_weights(opt)
    vae.to(acc.device)
    ema_unet.to(acc.device)  # beside the weights they follow (a GPU's, when there is one)
    ema_text.to(acc.device)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(acc.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # (1000,)
    # A target's squared error per unit of squared image (x0) error: SNR for epsilon, SNR + 1 for v.
    v_pred = cu.prediction_type == "v_prediction"
    target_per_x0 = snr + 1 if v_pred else snr
    empty_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    bar = tqdm(range(start, cu.steps), initial=start, total=cu.steps, desc="unet", disable=not acc.is_main_process)
    scenes = step_scenes(cfg, acc, 5 * 10**7, start, cu.steps, cu.batch,
                         cfg.text.layout_cells if layout is not None else 0)
    for step in bar:
        unet.train()
        text_encoder.train()
        images, captions, *picture = next(scenes)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * acc.num_processes + acc.process_index)
        with torch.no_grad():
            posterior = vae.encode(images.to(acc.device)).latent_dist
            latents = posterior.sample(generator=None) * vae.config.scaling_factor  # (B, 4, 16, 16)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        drop = torch.rand(len(captions), generator=gen) < cu.caption_dropout  # unconditional rows for CFG
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen).to(acc.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(acc.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t) if v_pred else noise
        with acc.autocast():
            encoded = text_encoder(ids.to(acc.device))
            cond = encoded.last_hidden_state  # (B, 77, D)
            pred = unet(noisy, t, cond).sample  # (B, 4, 16, 16)
            per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
            weight = torch.clamp(snr[t], min=cu.snr_floor, max=cu.min_snr_gamma) / target_per_x0[t]
            loss = (per_sample * weight).mean()
            if layout is not None:
                layout_loss = layout_error(layout(encoded.pooler_output), *picture[0])
                loss = loss + cu.layout_weight * layout_loss
        _update(acc, loss, params, opt, sched)
        done = step + 1
        decay = min(cu.ema_decay, (1 + done) / (10 + done))
        ema_update(ema_unet, acc.unwrap_model(unet), decay)
        ema_update(ema_text, acc.unwrap_model(text_encoder), decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if acc.is_main_process:
            record = {"step": done, "loss": loss.item(), "lr": sched.get_last_lr()[0], "t": time.time()}
            if layout is not None:
                record["layout_loss"] = layout_loss.item()
            _log(root / "unet_log.jsonl", record)
        if done % cu.checkpoint_every == 0 or done == cu.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                m = {**modules, "unet": acc.unwrap_model(unet), "text_encoder": acc.unwrap_model(text_encoder)}
                if layout is not None:
                    m["layout_head"] = acc.unwrap_model(layout)
                ckpts.save(done, lambda d: save_training_state(d, m, opt, sched))
            _stop_if_out_of_time(acc, cfg, "unet", done)
        if acc.is_main_process and (done % cu.sample_every == 0 or done == cu.steps):
            pipe = assemble(cfg, tokenizer, ema_text, vae, ema_unet)
            out = root / "samples" / f"unet-{done:08d}.png"
            sample_grid(pipe, SAMPLE_PROMPTS, out)
            bar.write(f"unet step {done}: samples -> {out}")


def stage_export(cfg: DemoConfig, resume: str | None = "latest") -> Path:
    """Build the diffusers folder from the newest UNet checkpoint's EMA weights and the current VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    root = Path(cfg.output_dir)
    path = Checkpoints(root / "unet_checkpoints").resolve(resume or "latest")
    if path is None:
        raise UsageError(f"no UNet checkpoint in {root / 'unet_checkpoints'}; run the unet stage first")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_unet(cfg, IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1))
    text_encoder.load_state_dict(load_file(str(path / "ema_text_encoder.safetensors")))
    unet.load_state_dict(load_file(str(path / "ema_unet.safetensors")))
    out = export(cfg, assemble(cfg, tokenizer, text_encoder.eval(), vae, unet.eval()))
    step = json.loads((path / "state.json").read_text())["step"]
    (out / "t2i.json").write_text(json.dumps({"steps": 20, "guidance": 5.0, "sampler": "dpm++2m-karras",
                                              "trained_unet_steps": step}, indent=1))
    _export_guide(cfg, out, step)
    return out


def _export_guide(cfg: DemoConfig, out: Path, exported_step: int) -> None:
    """The model's guide/ from the run's checkpoint of guide.step (see GuideConfig); a note when there is none."""
    import shutil

    from t2i.models import guide

    g = cfg.guide
    source = Path(cfg.output_dir) / "unet_checkpoints" / f"step-{g.step:08d}"
    if (out / "guide").exists():  # an earlier export's, made against another UNet
        shutil.rmtree(out / "guide")
    if not g.step:
        return
    if g.step >= exported_step or not (source / "ema_unet.safetensors").is_file():
        why = "not before the exported step" if g.step >= exported_step else f"{source} is missing"
        print(f"export: no guide/ ({why}; guide.step names an earlier UNet checkpoint of this run)")
        return
    folder, kept = guide.make(out, source, g.bits, g.scale, g.below, overwrite=True)
    print(f"export: guide/ from step {g.step}, {g.bits} bits per weight ({kept:.1%} of the difference kept) "
          f"-> {folder}")


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
    import shutil

    src, root = _init_folder(cfg), Path(cfg.output_dir)
    if not (src / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise UsageError(f"unet.init_from {src} has no unet/diffusion_pytorch_model.safetensors; give a model "
                         "folder t2i exported, such as assets/t2i-shapes")
    for part in ("tokenizer", "vae", "vae_tiny"):
        wanted = (src / part / ("vocab.json" if part == "tokenizer" else "config.json")).is_file()
        if wanted and not (root / part).exists() and acc.is_main_process:
            shutil.copytree(src / part, root / part)
            acc.print(f"{part}: taken from {src / part}")
    acc.wait_for_everyone()


def _init_from(folder: Path, unet, text_encoder, ema_unet, ema_text) -> None:
    u = _fp32_weights(folder / "unet" / "diffusion_pytorch_model.safetensors")
    t = _fp32_weights(folder / "text_encoder" / "model.safetensors")
    for module, sd in ((unet, u), (ema_unet, u), (text_encoder, t), (ema_text, t)):
        module.load_state_dict(sd)


def assemble(cfg: DemoConfig, tokenizer, text_encoder, vae, unet):
    """A stock StableDiffusionPipeline over the given parts (the default sampler's scheduler)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    base = train_noise_scheduler(cfg.unet).config
    scheduler = DPMSolverMultistepScheduler.from_config(base, use_karras_sigmas=True)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], out: Path, seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 5.0) -> Path:
    """Render each prompt with each seed into one grid PNG (rows: prompts, columns: seeds)."""
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    size = IMAGE_SIZE
    grid = Image.new("RGB", (size * len(seeds), size * len(prompts)), "white")
    for r, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size).images
        for c, im in enumerate(images):
            grid.paste(im, (c * size, r * size))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def export(cfg: DemoConfig, pipe) -> Path:
    """Write the diffusers folder with every weight in fp16 (half the size). Stock diffusers loads its own parts
    as fp32; transformers would keep the text encoder in the dtype its config names, which stays float32 (the
    model's own), so stock pipelines run in fp32 throughout."""
    import shutil

    out = Path(cfg.export_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)  # as trained (fp32); every file halved below
    for name in ("vocab.json", "merges.txt"):  # for transformers versions without tokenizer.json support
        shutil.copy(Path(cfg.output_dir) / "tokenizer" / name, out / "tokenizer" / name)
    tiny = Path(cfg.output_dir) / "vae_tiny"  # not a pipeline component: the speed option `tiny_vae` reads it
    if (tiny / "config.json").is_file():
        shutil.copytree(tiny, out / "vae_tiny", dirs_exist_ok=True)
    (out / "training_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    for weights in out.rglob("*.safetensors"):
        _to_fp16(weights)
        give_usual_mode(weights)
    print(f"exported diffusers model -> {out}")
    return out


def _to_fp16(path: Path) -> None:
    """Rewrite a safetensors file's fp32 tensors as fp16 (in place; metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    if any(t.dtype == torch.float32 for t in tensors.values()):
        save_file({k: t.half() if t.dtype == torch.float32 else t for k, t in tensors.items()}, str(path), metadata)


CONFIGS = Path(__file__).parent / "configs"  # the shipped configs, also in a non-editable install


def config_path(config: str | None) -> str | None:
    """A config as given (a TOML path), or a shipped one by name: "demo" (from scratch), "continue"."""
    if config and not Path(config).exists() and (CONFIGS / f"{config}.toml").is_file():
        return str(CONFIGS / f"{config}.toml")
    return config


def run_config(config: str | None, overrides: dict | None = None) -> DemoConfig:
    """The config a run uses: the file (or shipped name) with `overrides` applied. A new output_dir alone moves
    the export with it when the file's export_dir lies inside its output_dir: otherwise two runs with their
    own output dirs would export into one folder, the second over the first."""
    given = {key for key, value in (overrides or {}).items() if value is not None}
    cfg = load_config(DemoConfig, config_path(config), overrides)
    if "output_dir" in given and "export_dir" not in given:
        in_file = load_config(DemoConfig, config_path(config))
        if Path(in_file.export_dir).is_relative_to(in_file.output_dir):
            cfg.export_dir = str(Path(cfg.output_dir) / Path(in_file.export_dir).relative_to(in_file.output_dir))
    return cfg


STAGES = {"tokenizer": stage_tokenizer, "vae": stage_vae, "text": stage_text, "unet": stage_unet, "decoder": stage_decoder,
          "tiny_vae": stage_tiny_vae, "export": stage_export}


def run(config: str | None, stage: str = "all", resume: str | None = "latest", overrides: dict | None = None) -> None:
    """Run one stage or all of them (`stage='all'`), resuming from the latest checkpoints. `config`: a TOML path,
    a shipped config's name (see config_path), or None for the dataclasses' defaults."""
    cfg = run_config(config, overrides)
    if stage not in (*STAGES, "all"):
        raise UsageError(f"unknown stage {stage!r}; use one of: {', '.join(STAGES)}, all")
    if cfg.unet.prediction_type not in ("epsilon", "v_prediction"):  # before an `all` run's earlier stages
        raise UsageError(f"unet.prediction_type must be epsilon or v_prediction, not {cfg.unet.prediction_type!r}")
    if cfg.unet.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"unet.lr_schedule must be constant or cosine, not {cfg.unet.lr_schedule!r}")
    if problem := cfg.scenes.problem():
        raise UsageError(problem)
    if cfg.data_workers < 0:
        raise UsageError(f"data_workers must be >= 0 (0 renders scenes in the training process), not {cfg.data_workers}")
    if cfg.max_minutes < 0:
        raise UsageError(f"max_minutes must be >= 0 (0: no limit), not {cfg.max_minutes:g}")
    g = cfg.guide
    if g.step < 0 or g.step % cfg.unet.checkpoint_every:
        raise UsageError(f"guide.step must be 0 (no guide) or a multiple of unet.checkpoint_every "
                         f"({cfg.unet.checkpoint_every}), not {g.step}")
    if g.step and not (g.bits in range(1, 9) or g.bits == 16) or not 0 < g.below <= 1000 or not g.scale >= 0:
        raise UsageError(f"guide: bits must be 1-8 or 16, below 1-1000 and scale >= 0 (got {g.bits}, {g.below}, "
                         f"{g.scale:g})")
    # A run that continues a model (unet.init_from) keeps that model's tokenizer and VAE: a new one would not be
    # the token ids and latent space its UNet learnt. `all` then runs the stages that train on top of them.
    continued = ("tokenizer", "vae")
    if cfg.unet.init_from and stage in continued:
        raise UsageError(f"stage {stage} would replace the tokenizer and VAE of unet.init_from's model, which its "
                         "UNet learnt; run the text, unet, decoder, tiny_vae or export stage, or drop unet.init_from")
    names = [n for n in STAGES if not (cfg.unet.init_from and n in continued)] if stage == "all" else [stage]
    cfg.deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None  # not a config field
    try:
        for name in names:
            if name == "tokenizer":
                if stage == "all" and (Path(cfg.output_dir) / "tokenizer" / "vocab.json").is_file():
                    continue
                stage_tokenizer(cfg)
            else:
                STAGES[name](cfg, resume)
    except _OutOfTime as stop:
        from accelerate import PartialState

        state = PartialState()
        state.print(f"{stop}; the same command goes on from there")
        if "export" in names and Checkpoints(Path(cfg.output_dir) / "unet_checkpoints").latest() is not None:
            if state.is_main_process:
                stage_export(cfg, "latest")  # the newest UNet checkpoint, the one just written
            state.wait_for_everyone()
