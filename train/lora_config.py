"""The settings of a LoRA run (`t2i train lora`, train/configs/lora.toml, `LoraTrainConfig`): one set of defaults.

Kept apart from the trainer (no torch import), so the CLI's help reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("kohya", "diffusers")
# --targets: which UNet layers get LoRA (peft matches a name's last parts). attn-mlp adds the transformer
# blocks' projections and feed-forward (every Linear there, as kohya's default LoRA); all adds the ResNet
# convolutions (LoCon, kohya's conv_dim), which carry texture and structure that attention alone does not.
_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_MLP = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = ["conv1", "conv2"]  # ResnetBlock2D's 3x3 convolutions: --conv-rank/--conv-alpha
TARGETS = {"attn": _ATTN, "attn-mlp": _ATTN + _MLP, "all": _ATTN + _MLP + CONV_TARGETS}
UNET_TARGETS = TARGETS["attn"]


@dataclass
class LoraTrainConfig:
    model: str = ""  # "" = the bundled t2i-shapes
    data: str = ""
    reg_data: str = ""  # regularisation images: captions without the trigger (keeps untriggered prompts as they were)
    output: str = ""
    name: str = "lora"  # the weights are <output>/<name>.safetensors
    trigger: str = ""
    # attn | attn-mlp | all (see TARGETS). all, chosen by measurement (docs/benchmarks.md): it learnt both the
    # colour style (84% of the VAE's ceiling, attn 67%) and the structural one (67%, attn 59%; issue 30's harder
    # mosaic: 62% against 36%) in the default steps, at 1.0-1.3x attn's time per step here
    targets: str = "all"
    rank: int = 16
    alpha: float = 0.0  # 0 = rank (scale 1)
    conv_rank: int = 0  # rank of the ResNet convolutions with targets "all"; 0 = rank
    conv_alpha: float = 0.0  # 0 = conv_rank (scale 1)
    steps: int = 400
    lr: float = 3e-3
    text_encoder_lr: float = 0.0  # 0 = lr
    warmup: int = 0
    batch: int = 8
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
    max_minutes: float = 0.0  # stop at the next checkpoint after this many minutes (0 = no limit); --resume latest goes on
    format: str = "kohya"  # kohya (what A1111, ComfyUI and diffusers all read) | diffusers
    allow_pickle: bool = False
    # prior preservation (train/prior.py): without reg_data, the base model's own images of the data's captions
    # train beside the data, on those captions without the trigger (made once, in <output>/prior)
    prior: bool = True
    prior_steps: int = 0  # sampling steps of each prior image (0 = the model's default)
    # The loss weight of the regularisation (prior or reg-data) images against the data's 1 (kohya's and diffusers'
    # DreamBooth name; their default is 1). 0.5 by measurement (docs/benchmarks.md): with every default at once the
    # mosaic style went 42% of the way to the VAE's ceiling at 1, 54% at 0.5 (pastel 90%), and prompts without the
    # trigger kept the base model's look (blockiness 0.14 against the base's 0.12; paleness 0.23 against 0.22)
    prior_loss_weight: float = 0.5
