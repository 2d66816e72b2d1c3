"""What the commands share: one-line argument errors (with a "did you mean"), argument types and groups, device
and model loading, the progress bar and written paths, output folders left tidy, and the speed options' checks."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from t2i.choices import DEVICES, DTYPES
from t2i.errors import UsageError, did_you_mean
from t2i.cli.startup import no_collections

EXAMPLES = """examples:
  t2i generate "a red circle"                       bundled demo model, PNG into ./outputs
  t2i generate "a blue star" --batch 4 --seed 7 --out stars/
  t2i generate "castle, (sunset:1.2)" --model ./sd15 --sampler "DPM++ 2M Karras" --steps 25
  t2i img2img "a red circle, in sks style" --init photo.png --strength 0.6 --lora pastel.safetensors
  t2i inpaint "a blue star" --init scene.png --mask mask.png    white in the mask is redrawn
  t2i info outputs/00000-7.png                      show the settings stored in a PNG
  t2i reproduce outputs/00000-7.png                 make it again and compare bit for bit
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `t2i generate: error: ... (see --help)`, exit code 2; a mistyped choice
    (a command, a --device) is answered with the closest ones."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action, value):  # argparse's check of `choices` (Python 3.14 suggests on its own)
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            hint = did_you_mean(str(value), list(action.choices))
            if not hint:
                raise
            raise argparse.ArgumentError(action, f"{e.message}; {hint}") from None


def positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH|ID",
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the bundled t2i-shapes)")
    g.add_argument("--model-config", metavar="DIR",
                   help="diffusers folder whose configs a single-file checkpoint uses (needed offline)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="default: auto")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="default: auto (fp16/bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle-based weights (.ckpt/.bin/.pt); they can run code: trusted files only")


def sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", "-n", metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's, usually 20)")
    g.add_argument("--guidance", "--cfg", type=number, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--autoguidance", type=number, metavar="S",
                   help="autoguidance scale in the late steps, steering away from the model's weaker guide/ UNet "
                        "in place of classifier-free guidance (default: the model's; 0 turns it off, as does a LoRA "
                        "at a non-zero scale)")
    g.add_argument("--sampler", "-s", help="sampler name or A1111 name, e.g. euler-a, \"DPM++ 2M\" (see t2i samplers); "
                                          "old combined names (dpm++2m-karras, \"DPM++ 2M Karras\") still work")
    g.add_argument("--scheduler", "--schedule-type", metavar="NAME",
                   help="the schedule beside the sampler, as A1111 1.9+: automatic (the sampler's own: Karras for "
                        "DPM++ 2M, Uniform for Euler), uniform, karras, exponential, sgm_uniform, normal, beta "
                        "(default: automatic; the one that ran is recorded)")
    g.add_argument("--seed", type=positive_int, default=-1, help="seed of the first image; image i uses seed+i (default: random)")
    g.add_argument("--width", "-W", type=positive_int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--height", "-H", type=positive_int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--batch", "-b", type=positive_int, default=1, help="images per prompt (default: 1)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (diffusers or kohya/A1111 layout); repeatable")
    g.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:SCALE> in a prompt looks for NAME.safetensors")
    g.add_argument("--embedding-dir", metavar="DIR",
                   help="textual-inversion embeddings: NAME in a prompt calls DIR/NAME.safetensors (A1111's "
                        "layouts and diffusers'); the model folder's embeddings/ is searched too")
    g.add_argument("--speed", metavar="OPTS", default="auto",
                   help="auto (default: what measures faster on this device at no quality cost: batched UNet calls, "
                        "and bf16 weights on a CPU with AMX/AVX512-BF16), exact (the bit-exact fp32 path: a batch "
                        "equals its single runs), or speed options, comma-separated: batched (a batch in one UNet "
                        "call: image i equals the single run with seed+i to within rounding, not bit for bit), "
                        "bf16_weights, bf16_vae (bf16 copies of the weights), cacheN (feature reuse every N steps: "
                        "faster, changes the images), cacheN:K (reuse deeper: only the last K layers run between; "
                        "cache3:1 is DeepCache's default), channels_last, bf16 (autocast), compile, "
                        "attention_slicing, vae_tiling, cpu_offload, tiny_vae[=PATH] (decode with a small TAESD-style "
                        "decoder: the model's own vae_tiny/, or PATH). What was chosen is recorded in the PNG; "
                        "t2i reproduce replays it (docs/speed.md)")


def prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:NAME:0.8>)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line ('#' comments); each prompt starts at --seed")


def dynamic_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dynamic prompts", "{red|blue} circle: one variant per image, picked from its seed; "
                             "{0.5::red|2::blue}: weighted; {2$$a|b|c}: two of them; __colors__: a line of "
                             "colors.txt in --wildcard-dir (the dynamicprompts library's syntax)")
    g.add_argument("--combinatorial", action="store_true",
                   help="every combination of the variants and wildcards, each a prompt of its own starting at "
                        "--seed (at most 1000)")
    g.add_argument("--wildcard-dir", metavar="DIR", help="where __NAME__ finds NAME.txt (__a/b__: a/b.txt)")
    g.add_argument("--no-dynamic-prompts", action="store_true", help="keep {, } and __ in the prompt as written")


def dynamic_prompts_mode(args) -> str:
    """The jobs.Request.dynamic_prompts mode the dynamic-prompt arguments ask for."""
    if args.no_dynamic_prompts:
        if args.combinatorial:
            raise UsageError("--combinatorial and --no-dynamic-prompts contradict each other; give one")
        return "off"
    return "combinatorial" if args.combinatorial else "random"


def image_args(p: argparse.ArgumentParser, mask: bool = False) -> None:
    g = p.add_argument_group("input image")
    g.add_argument("--init", "-i", required=True, metavar="IMAGE",
                   help="the image to start from (any mode; a side not a multiple of 8 is resized, with a notice)")
    g.add_argument("--strength", "--denoising-strength", type=number, default=0.75,
                   help="share of the schedule that is redrawn, in (0, 1]: low keeps the image (default 0.75)")
    if mask:
        g.add_argument("--mask", required=True, metavar="IMAGE",
                       help="white = redraw, black = keep (resized to --init's size if it differs, with a notice)")
        g.add_argument("--mask-blur", type=positive_int, default=4, metavar="PX",
                       help="soften the mask's edge by this many pixels (default 4, as A1111)")
        g.add_argument("--invert-mask", action="store_true", help="redraw the black part instead")


def output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default="outputs", metavar="PATH",
                   help="folder (files NNNNN-SEED.png) or a .png path (default: ./outputs)")
    g.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def progress_bar(args, desc: str):
    """One bar over the job's steps on stderr, drawn from its first step (False with --quiet)."""
    if getattr(args, "quiet", False):
        return False
    from t2i.progress import StepBar  # deferred: tqdm; --help must not import it

    return StepBar(desc)


def print_paths(paths, bar) -> None:
    """Written paths on stdout, each on a line of its own even while the bar is drawn in the same terminal."""
    for path in paths:
        if bar:
            bar.write(f"{path}\n")
        else:
            # one write per line: processes sharing a pipe (accelerate launch runs them unbuffered, where
            # print writes the text and its newline apart) would otherwise splice their lines
            sys.stdout.write(f"{path}\n")
            sys.stdout.flush()


@contextlib.contextmanager
def tidy_folders(out: str | Path):
    """Folders the block makes for `out` (plan_paths makes them) are removed again if the block stops with an
    error or Ctrl-C and they are still empty. A folder that was there before is never removed."""
    out = Path(out)
    folder = out.parent if out.suffix.lower() == ".png" else out
    new = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    try:
        yield
    except BaseException:
        for p in new:
            try:
                p.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


def set_autoguidance(pipe, args) -> None:
    """--autoguidance S (the pipeline refuses S > 0 without a guide/ UNet, before any image)."""
    if args.autoguidance is not None:
        pipe.autoguidance = args.autoguidance


def speed_options(args):
    """--speed as t2i.speed.SpeedOptions (None: the plain, exact path); refused before loading if it cannot run,
    also when tiny_vae's small decoder is missing from args.model."""
    # deferred: torch and diffusers; --help must not import them
    from t2i import models
    from t2i.speed import SpeedOptions

    options = None
    if getattr(args, "speed", ""):
        options = SpeedOptions.parse(args.speed)
        if options.cpu_offload and args.device in ("cpu", "mps"):
            raise UsageError(f"--speed cpu_offload needs a CUDA device, not --device {args.device}; leave it off")
    check_tiny_vae(options, models.resolve(args.model))
    return options


def check_tiny_vae(options, source) -> None:
    """--speed tiny_vae[=PATH]: the small decoder exists, checked before the model loads."""
    if options is not None and options.tiny_vae is not None:
        from t2i.models import tiny_vae  # deferred: diffusers; --help must not import it

        tiny_vae.tiny_vae_folder(options.tiny_vae, Path(source.location) if source.kind != "hub" else None)


def load_pipeline(args, task: str = "text2image"):
    with no_collections():
        # deferred: imported here with collections off; --help must not import them
        from t2i.pipelines import Image2Image, Inpaint, Text2Image

        cls = {"text2image": Text2Image, "image2image": Image2Image, "inpaint": Inpaint}[task]
        return cls.from_pretrained(args.model, device=args.device or "auto", dtype=args.dtype or "auto",
                                   allow_pickle=args.allow_pickle, model_config=args.model_config)


def everyday_args(p: argparse.ArgumentParser, hires: bool = False) -> None:
    """A1111's everyday set: clip skip, a VAE override and (text to image) the hires fix."""
    from t2i.choices import HIRES_UPSCALERS

    g = p.add_argument_group("A1111 everyday set")
    g.add_argument("--clip-skip", type=positive_int, metavar="N",
                   help="stop the text encoder N-1 layers early, as A1111 counts: 1 = the last layer (default), "
                        "2 = the one before (SD 1.x; SD 2.x and SDXL ignore it, as in A1111)")
    g.add_argument("--vae", metavar="PATH|NAME",
                   help="decode with this VAE instead of the model's: a diffusers VAE folder, a .safetensors file "
                        "(original or diffusers layout) or a name in --vae-dir; pickles only with --allow-pickle")
    g.add_argument("--vae-dir", metavar="DIR", help="where --vae NAME is found (A1111's models/VAE)")
    if not hires:
        return
    h = p.add_argument_group("hires fix (A1111's): generate, upscale, redraw at the larger size")
    h.add_argument("--hires-scale", type=number, metavar="F", help="turn it on: each side times F (e.g. 2)")
    h.add_argument("--hires-width", type=positive_int, default=0, metavar="W",
                   help="turn it on: this width (with --hires-height: both, the overhang cropped; alone: the "
                        "height in the first pass's ratio)")
    h.add_argument("--hires-height", type=positive_int, default=0, metavar="H", help="turn it on: this height")
    h.add_argument("--hires-steps", type=positive_int, metavar="N",
                   help="steps of the second pass (default 0: as many as --steps)")
    h.add_argument("--hires-denoise", type=number, metavar="F",
                   help="denoising strength of the second pass, in (0, 1] (default 0.7)")
    h.add_argument("--hires-upscaler", choices=list(HIRES_UPSCALERS), metavar="NAME",
                   help=f"how the first pass is enlarged: {', '.join(HIRES_UPSCALERS)} (latent*: in latent space; "
                        "lanczos, nearest: as pixels). Default: latent")


def hires_of(args):
    """The t2i.pipelines.hires.Hires the --hires-* flags ask for, or None when no size turns it on."""
    if getattr(args, "hires_scale", None) is None and not getattr(args, "hires_width", 0) \
            and not getattr(args, "hires_height", 0):
        if any(getattr(args, f"hires_{x}", None) is not None for x in ("steps", "denoise", "upscaler")):
            raise UsageError("--hires-steps, --hires-denoise and --hires-upscaler need --hires-scale or "
                             "--hires-width/--hires-height, which turn the hires fix on")
        return None
    from t2i.pipelines.hires import Hires  # deferred: torch; --help must not import it

    if args.hires_scale is not None and (args.hires_width or args.hires_height):
        raise UsageError("give --hires-scale or --hires-width/--hires-height, not both")
    return Hires(scale=args.hires_scale if args.hires_scale is not None else 2.0, width=args.hires_width,
                 height=args.hires_height, steps=args.hires_steps or 0,
                 denoise=args.hires_denoise if args.hires_denoise is not None else 0.7,
                 upscaler=args.hires_upscaler or "latent")
