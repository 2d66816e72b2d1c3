"""The demo model's training config: one dataclass per TOML table, the shipped configs, and the checks a run
makes before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from t2i.demo.shapes import SceneMix
from t2i.errors import UsageError
from t2i.train.config import load_config

CONFIGS = Path(__file__).parent.parent / "configs"  # the shipped configs, also in a non-editable install


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
    # objects of each caption that fixes a position or relation (LayoutHead), far cheaper per step than the UNet;
    # the UNet stage then starts from it and keeps the task on with unet.layout_weight. Starts from
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
    # Attention only at 8x8 and 4x4: at 16x16 it is most of a CPU step's time.
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
    # SNR 0 an epsilon model must output its input almost exactly (an error e costs e / sqrt(a) in the image);
    # v tends to -x0 there, so the noisiest steps learn the image itself.
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
    # Min-SNR-gamma weighting with a floor (train/losses.py): each step's image (x0) error weighs
    # max(min(SNR, gamma), snr_floor). Plain min-SNR (floor 0) leaves the noisiest steps, where only the prompt
    # can decide the background and layout, almost no weight; the floor keeps them in the loss. 1 with
    # v_prediction = Salimans & Ho's truncated-SNR weighting capped at gamma. min_snr_gamma 0: unweighted.
    min_snr_gamma: float = 5.0
    snr_floor: float = 0.0
    # Weight of the text stage's layout task kept on during this stage (0 = off; its LayoutHead, trained along,
    # is never exported). The diffusion loss alone teaches the text encoder only what the UNet already uses:
    # position words stayed close together, and the UNet put objects where the seed's noise put them.
    layout_weight: float = 0.0
    caption_dropout: float = 0.1
    # The share of captions with a random trailing phrase (", in qzv style", ", xkd art", ...: t2i.demo.shapes.
    # extra_phrase), the image unchanged: the model learns that words it never saw after a caption change nothing,
    # so a LoRA's trigger words alone keep the base model's content (without, "prompt, in sks style" lost 40%
    # of ShapeEval). 0 = off.
    caption_extras: float = 0.0
    checkpoint_every: int = 200
    sample_every: int = 500
    # A diffusers folder (e.g. the bundled model) whose UNet and text encoder start the
    # run when there is no checkpoint yet; its vae/ and tokenizer/ must be the run's.
    init_from: str = ""


@dataclass
class GuideConfig:
    # Autoguidance's guide (t2i.models.guide, `t2i guide`): the UNet checkpoint of this step is kept past pruning,
    # and the export stage stores it in the model's guide/ as `bits` bits per weight of its difference from the
    # exported UNet, with autoguidance `scale` below timestep `below` in t2i.json. 0 = no guide. A multiple of
    # unet.checkpoint_every, well before the exported step (a weaker model of the same run).
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
    # GPU the renderer is the bottleneck, and a dozen or so processes keep it fed.
    data_workers: int = 0
    # Stop after this many minutes (0 = no limit): the running stage stops at its next checkpoint, and a run of
    # all stages still exports the newest UNet checkpoint; the same command resumes. For lent machines.
    max_minutes: float = 0.0
    # Non-finite steps in a row that stop a stage (each is skipped, the weights left as they were).
    max_bad_steps: int = 5
    # The training scenes' mix (every stage's data; validation scenes keep the default): relative weights of
    # the kinds single, count, pair, relation, triple, the share of captions without colours and the share of
    # counting scenes with four objects (t2i.demo.shapes.SceneMix).
    scenes: SceneMix = field(default_factory=SceneMix)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)


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


def check(cfg: DemoConfig) -> None:
    """Every check of the config that needs no file: a run makes them before any stage's work."""
    cu, g = cfg.unet, cfg.guide
    if cu.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(f"unet.prediction_type must be epsilon or v_prediction, not {cu.prediction_type!r}")
    if cu.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"unet.lr_schedule must be constant or cosine, not {cu.lr_schedule!r}")
    if problem := cfg.scenes.problem():
        raise UsageError(problem)
    for key in ("caption_dropout", "caption_extras"):
        if not 0 <= getattr(cu, key) <= 1:
            raise UsageError(f"unet.{key} is a share of captions, between 0 and 1, not {getattr(cu, key):g}")
    if cfg.data_workers < 0:
        raise UsageError(f"data_workers must be >= 0 (0 renders scenes in the training process), not {cfg.data_workers}")
    if cfg.max_minutes < 0:
        raise UsageError(f"max_minutes must be >= 0 (0: no limit), not {cfg.max_minutes:g}")
    if cfg.max_bad_steps < 1:
        raise UsageError(f"max_bad_steps must be at least 1, not {cfg.max_bad_steps}")
    if g.step < 0 or g.step % cu.checkpoint_every:
        raise UsageError(f"guide.step must be 0 (no guide) or a multiple of unet.checkpoint_every "
                         f"({cu.checkpoint_every}), not {g.step}")
    if g.step and not (g.bits in range(1, 9) or g.bits == 16) or not 0 < g.below <= 1000 or not g.scale >= 0:
        raise UsageError(f"guide: bits must be 1-8 or 16, below 1-1000 and scale >= 0 (got {g.bits}, {g.below}, "
                         f"{g.scale:g})")
