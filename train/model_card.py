"""The model card (README.md) of the bundled demo model, written from measured numbers.

    python -m t2i.train.model_card assets/t2i-shapes --eval eval/shapeeval.json --psnr 28.7
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
license: apache-2.0
tags: [stable-diffusion, t2i, toy-model, shapes]
---

# t2i-shapes

A small text-to-image latent diffusion model, trained from scratch by
`t2i train demo` (the t2i toolkit) on a procedural world of 64x64 scenes: one to
three shapes (circle, square, triangle, star, heart, cross) in eight colours, small
or big, placed left/right/top/bottom/center or relative to each other, counted, on
black, gray or white backgrounds. It is a standard diffusers Stable Diffusion folder:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{folder}")
image = pipe("a red circle to the left of a blue square", height=64, width=64,
             num_inference_steps={steps}, guidance_scale={guidance}).images[0]
```

## Architecture

| part | what | parameters |
|---|---|---|
| VAE | AutoencoderKL, 64x64x3 <-> 16x16x4, channels {vae_channels} | {vae_params} |
| text encoder | CLIPTextModel, {text_layers} layers, width {text_width}, CLIP BPE tokenizer over the world's words | {text_params} |
| UNet | UNet2DConditionModel, channels {unet_channels}, cross-attention at 8x8 and 4x4 | {unet_params} |
{tiny_row}{guide_row}
Weights: {storage}; {size_mb:.1f} MB in all.
Scheduler: {sampler} (`t2i.json` holds t2i's defaults: {steps} steps, guidance {guidance}).

## Training

`t2i train demo --config train/configs/demo.toml` (stages tokenizer, vae, text, unet,
decoder, tiny_vae, export; each resumable). VAE: {vae_steps} steps of batch 32, MSE + 1e-6 KL.{decoder_training}{tiny_training}
UNet and text encoder together: {unet_steps} steps; the last run's settings (training_config.json):
batch {unet_batch}, {objective} objective on {schedule} betas ({beta_start}..{beta_end}) with {weighting}
weighting, {dropout}% caption dropout (for classifier-free guidance), AdamW {lr}, EMA {ema} (exported).{layout_training} Data: `t2i.shapes.sample_scene(seed)`, a fresh scene
per sample{scene_mix}; the compositions ShapeEval holds out never appear.{guide_training}

## Evaluation

ShapeEval (`t2i eval`, {seeds} seeds per prompt, {steps} steps, {sampler},
guidance {guidance}{autoguidance}); the checker scores 1.000 on ground-truth renders
(`t2i eval --ground-truth`).

| category | accuracy |
|---|---|
{eval_rows}

VAE reconstruction PSNR on 256 held-out renders: **{psnr:.2f} dB**.{tiny_psnr}{ceiling}

These numbers are this checkpoint's, measured by the commands above; the
project's targets (overall >= 0.90, every category >= 0.75, held-out >= 0.80,
PSNR >= 30 dB) are {verdict}.
"""


def _params(folder: Path, part: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in (folder / part).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                total += math.prod(sf.get_slice(k).get_shape())
    return total


def write_card(folder: Path, eval_json: Path, psnr: float, seeds: int = 4, tiny_psnr: float | None = None,
               ceiling: float | None = None) -> Path:
    from t2i.samplers import DEFAULT_SAMPLER, a1111_names, resolve

    summary = json.loads(eval_json.read_text())["summary"]
    defaults = json.loads((folder / "t2i.json").read_text())
    train = json.loads((folder / "training_config.json").read_text())
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    targets = {k: 0.75 for k in summary if k not in ("overall", "held_out")}
    missed = [k for k, v in summary.items() if v < targets.get(k, 0.90 if k == "overall" else 0.80)]
    verdict = "all met" if not missed and psnr >= 30 else (
        "not all met yet: " + ", ".join(missed + (["PSNR"] if psnr < 30 else [])) + " below target")
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in summary.items())
    card = CARD.format(
        folder=folder.name, guidance=defaults["guidance"], steps=defaults["steps"], seeds=seeds,
        sampler=_sampler_words(*a1111_names(*resolve(defaults.get("sampler", DEFAULT_SAMPLER)))),
        vae_channels=vae_cfg["block_out_channels"], vae_params=f"{_params(folder, 'vae') / 1e6:.2f} M",
        text_layers=train["text"]["num_hidden_layers"], text_width=train["text"]["hidden_size"],
        text_params=f"{_params(folder, 'text_encoder') / 1e6:.2f} M", unet_channels=unet_cfg["block_out_channels"],
        unet_params=f"{_params(folder, 'unet') / 1e6:.2f} M", size_mb=size / 1e6, vae_steps=train["vae"]["steps"],
        unet_steps=defaults.get("trained_unet_steps", "?"), eval_rows=rows, psnr=psnr, verdict=verdict,
        ceiling="" if ceiling is None else (
            f"\nGround-truth renders passed through the VAE (encode, decode) score **{ceiling:.3f}** "
            "(`t2i eval --ground-truth --through-vae`): the most any UNet can reach with this VAE."),
        **_unet_parts(train), **_tiny_parts(folder, train, tiny_psnr), **_guide_parts(folder, defaults),
        storage=_storage(folder),
    )
    out = folder / "README.md"
    out.write_text(card)
    return out


def _with_defaults(train: dict, section: str, config_class) -> dict:
    """A training_config.json section with the fields older configs lack filled from the dataclass's defaults."""
    from dataclasses import asdict

    return {**asdict(config_class()), **train.get(section, {})}


def _unet_parts(train: dict) -> dict:
    """The card's training numbers for the UNet and the decoder fine-tuning, from training_config.json."""
    from t2i.train.demo import UNetConfig

    u, v = _with_defaults(train, "unet", UNetConfig), train["vae"]
    steps = v.get("decoder_steps", 0)
    return {
        "unet_batch": u["batch"], "schedule": u["beta_schedule"].replace("_", "-"),
        "beta_start": u["beta_start"], "beta_end": u["beta_end"], "objective": u["prediction_type"].replace("_", "-"),
        "weighting": (f"image-space SNR clamped to [{u['snr_floor']:g}, {u['min_snr_gamma']:g}]" if u["snr_floor"]
                      else f"min-SNR-{u['min_snr_gamma']:g}"),
        "dropout": f"{100 * u['caption_dropout']:g}",
        "lr": f"{u['lr']:g}" + (" with a cosine decay to 5%" if u["lr_schedule"] == "cosine" else ""),
        "ema": u["ema_decay"],
        "layout_training": _layout_part(train),
        "scene_mix": _mix_part(train),
        "decoder_training": f"\nVAE decoder: {steps} more steps of batch {v['batch']}, encoder frozen (the latent space "
                            f"is unchanged), AdamW {v['decoder_lr']:g} with a cosine decay." if steps else "",
    }


def _mix_part(train: dict) -> str:
    """The card's words on the last run's scene mix ([scenes] in training_config.json), empty for the default."""
    from t2i.demo.shapes import SceneMix

    mix = SceneMix(**_with_defaults(train, "scenes", SceneMix))
    if mix == SceneMix():
        return ""
    kinds = mix.kinds()
    total = sum(kinds.values())
    shares = ", ".join(f"{k} {100 * w / total:.0f}%" for k, w in kinds.items())
    four = f"; {100 * mix.four:g}% of counting scenes with four objects" if mix.four else ""
    return f" (the last run's mix: {shares}; {100 * mix.colorless:g}% of captions without colours{four})"


def _layout_part(train: dict) -> str:
    """The card's line on the text stage's layout task, empty when the model was trained without it."""
    from t2i.train.demo import TextConfig, UNetConfig

    t, weight = _with_defaults(train, "text", TextConfig), _with_defaults(train, "unet", UNetConfig)["layout_weight"]
    steps, cells = t["layout_steps"], t["layout_cells"]
    if not steps and not weight:
        return ""
    first = (f" The text encoder first learnt alone, {steps} steps of batch {t['layout_batch']}, to draw the"
             f" objects of captions that fix a position or relation on a grid of {cells}x{cells} cells (an MLP on"
             f" its pooled feature, not exported).") if steps else ""
    return first + (f" The UNet stage kept that task on at weight {weight:g}." if weight else "")


def _guide_parts(folder: Path, defaults: dict) -> dict:
    """The card's row on guide/ (autoguidance's weaker UNet) and the evaluation's words on it; empty without one."""
    from t2i.models import guide as guides

    guide = folder / "guide"
    if not (guide / "config.json").is_file():
        return {"guide_row": "", "autoguidance": "", "guide_training": ""}
    scale, below = defaults.get("autoguidance", 0), defaults.get("autoguidance_below", 500)
    size = sum(p.stat().st_size for p in guide.iterdir()) / 1e6
    if (guide / guides.DELTA_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(guide / guides.DELTA_FILE), framework="pt") as sf:
            meta = sf.metadata() or {}
        what = (f"the UNet of training checkpoint {meta.get('source', '?')}, stored as its difference from unet/ at "
                f"{meta.get('bits', '?')} bits per weight")
        params = _params(folder, "unet")
        training = (f"\nguide/: `t2i guide --model {folder.name} --from RUN/unet_checkpoints/{meta.get('source', '?')} "
                    f"--bits {meta.get('bits', '?')}`, an earlier checkpoint of this training run (the weaker model "
                    "autoguidance steers away from).")
    else:
        what = f"UNet2DConditionModel, channels {json.loads((guide / 'config.json').read_text())['block_out_channels']}"
        params, training = _params(folder, "guide"), ""
    return {
        "guide_training": training,
        "guide_row": f"| guide/ (not a pipeline part) | {what}: t2i's autoguidance (scale {scale:g} below timestep "
                     f"{below}) | {params / 1e6:.2f} M in {size:.1f} MB |\n",
        "autoguidance": f", autoguidance {scale:g} with guide/ below timestep {below}" if scale else "",
    }


def _storage(folder: Path) -> str:
    """Which parts are stored in fp16 and which in fp32, from the files themselves."""
    from safetensors import safe_open

    names = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "vae_tiny": "vae_tiny/"}
    kinds: dict[str, list[str]] = {}
    for part, name in names.items():
        for f in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                dtype = str(sf.get_slice(next(iter(sf.keys()))).get_dtype())
            kinds.setdefault({"F16": "fp16", "F32": "fp32"}.get(dtype, dtype), []).append(name)
            break
    parts = "; ".join(f"{', '.join(v)} in {k}" for k, v in kinds.items())
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    runs = (", which stock diffusers and transformers load as fp32 (the text encoder's config says "
            f"{te.get('dtype') or te.get('torch_dtype')})") if "fp16" in kinds else ""
    return parts + runs


def _tiny_parts(folder: Path, train: dict, tiny_psnr: float | None) -> dict:
    """The card's lines on vae_tiny/ (the small decoder of `--speed tiny_vae`), empty when there is none."""
    tiny = folder / "vae_tiny" / "config.json"
    if not tiny.is_file():
        return {"tiny_row": "", "tiny_training": "", "tiny_psnr": ""}
    cfg = json.loads(tiny.read_text())
    v = train["vae"]
    return {
        "tiny_row": f"| vae_tiny/ (not a pipeline part) | AutoencoderTiny (TAESD-style), width "
                    f"{cfg['decoder_block_out_channels'][0]}, in the VAE's latent space: t2i's `--speed tiny_vae` "
                    f"| {_params(folder, 'vae_tiny') / 1e6:.2f} M |\n",
        "tiny_training": f"\nvae_tiny: {v.get('tiny_steps', '?')} steps of batch {v['batch']} on the frozen VAE's "
                         "latents (decoder: MSE to the render; encoder: MSE to the VAE's scaled latent means)"
                         + (f"; with {v['tiny_pool']} latents generated by this model's UNet, against the VAE's "
                            "decoding of them, as half of each batch" if v.get("tiny_distill_from") else "") + ".",
        "tiny_psnr": "" if tiny_psnr is None else f" The small decoder (vae_tiny/, same measure): **{tiny_psnr:.2f} dB**.",
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="write the demo model's card from measured numbers")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--eval", type=Path, required=True, help="shapeeval.json from `t2i eval --out`")
    ap.add_argument("--psnr", type=float, required=True, help="held-out VAE PSNR (dB)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--tiny-psnr", type=float, help="held-out PSNR of vae_tiny/ (dB)")
    ap.add_argument("--ceiling", type=float, help="overall of `t2i eval --ground-truth --through-vae`")
    a = ap.parse_args()
    print(write_card(a.folder, a.eval, a.psnr, a.seeds, a.tiny_psnr, a.ceiling))


def _sampler_words(sampler: str, schedule: str | None) -> str:
    """A sampler and its schedule as a reader of A1111 1.9+ knows them: "DPM++ 2M, Karras schedule"."""
    return f"{sampler}, {schedule} schedule" if schedule else sampler
