"""The `t2i` command: a thin shell over the Python API.

Every subcommand checks its arguments before loading a model, prints written
paths on stdout and progress on stderr, and turns a `T2IError` into one line
`t2i: error: ...` with exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import random
import sys
import types
from pathlib import Path

from . import __version__
from .errors import T2IError, UsageError

EXAMPLES = """examples:
  t2i generate "a red circle"                       bundled demo model, PNG into ./outputs
  t2i generate "a blue star" --batch 4 --seed 7 --out stars/
  t2i generate "castle, (sunset:1.2)" --model ./sd15 --sampler "DPM++ 2M Karras" --steps 25
  t2i img2img "a red circle, in sks style" --init photo.png --strength 0.6 --lora pastel.safetensors
  t2i inpaint "a blue star" --init scene.png --mask mask.png    white in the mask is redrawn
  t2i info outputs/00000-7.png                      show the settings stored in a PNG
  t2i reproduce outputs/00000-7.png                 make it again and compare bit for bit
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `t2i generate: error: ... (see --help)`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH|ID",
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the bundled t2i-shapes)")
    g.add_argument("--model-config", metavar="DIR",
                   help="diffusers folder whose configs a single-file checkpoint uses (needed offline)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="default: auto (fp16/bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle-based weights (.ckpt/.bin/.pt); they can run code: trusted files only")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", "-n", metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's, usually 20)")
    g.add_argument("--guidance", "--cfg", type=_number, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--autoguidance", type=_number, metavar="S",
                   help="autoguidance scale in the late steps, steering away from the model's weaker guide/ UNet "
                        "in place of classifier-free guidance (default: the model's; 0 turns it off, as does a LoRA "
                        "at a non-zero scale)")
    g.add_argument("--sampler", "-s", help="sampler name or A1111 name, e.g. euler-a, \"DPM++ 2M Karras\" (see t2i samplers)")
    g.add_argument("--seed", type=_positive_int, default=-1, help="seed of the first image; image i uses seed+i (default: random)")
    g.add_argument("--width", "-W", type=_positive_int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--height", "-H", type=_positive_int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--batch", "-b", type=_positive_int, default=1, help="images per prompt (default: 1)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (diffusers or kohya/A1111 layout); repeatable")
    g.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:SCALE> in a prompt looks for NAME.safetensors")
    g.add_argument("--speed", metavar="OPTS", default="",
                   help="speed options, comma-separated (see t2i bench): batched (a batch in one UNet call: image i "
                        "equals the single run with seed+i to within rounding, not bit for bit), cacheN (feature "
                        "reuse every N steps: ~2x faster at N=3, changes the images), cacheN:K (reuse deeper: only "
                        "the last K layers run between; cache3:1 is DeepCache's default), channels_last, bf16, compile, "
                        "attention_slicing, vae_tiling, cpu_offload, tiny_vae[=PATH] (decode with a small TAESD-style "
                        "decoder: the model's own vae_tiny/, or PATH). Default: none (exact). Recorded in the PNG; "
                        "t2i reproduce replays them")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:NAME:0.8>)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line ('#' comments); each prompt starts at --seed")


def _image_args(p: argparse.ArgumentParser, mask: bool = False) -> None:
    g = p.add_argument_group("input image")
    g.add_argument("--init", "-i", required=True, metavar="IMAGE",
                   help="the image to start from (any mode; a side not a multiple of 8 is resized, with a notice)")
    g.add_argument("--strength", "--denoising-strength", type=_number, default=0.75,
                   help="share of the schedule that is redrawn, in (0, 1]: low keeps the image (default 0.75)")
    if mask:
        g.add_argument("--mask", required=True, metavar="IMAGE",
                       help="white = redraw, black = keep (resized to --init's size if it differs, with a notice)")
        g.add_argument("--mask-blur", type=_positive_int, default=4, metavar="PX",
                       help="soften the mask's edge by this many pixels (default 4, as A1111)")
        g.add_argument("--invert-mask", action="store_true", help="redraw the black part instead")


def _output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default="outputs", metavar="PATH",
                   help="folder (files NNNNN-SEED.png) or a .png path (default: ./outputs)")
    g.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="t2i",
        description="Text-to-image diffusion: generate images, fine-tune LoRAs, evaluate and benchmark models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"t2i {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    generation = [  # command, task, help, description
        ("generate", "text2image", "make images from a prompt (or a file of prompts)",
         "Generate images from text."),
        ("img2img", "image2image", "redraw an image from a prompt, keeping its layout",
         "Image to image: the init image is noised to --strength of the schedule and denoised towards the prompt."),
        ("inpaint", "inpaint", "redraw the masked part of an image from a prompt",
         "Inpainting: the white part of --mask is redrawn, the rest of --init is kept (pixel for pixel beyond the blurred edge)."),
    ]
    for command, task, help_text, description in generation:
        g = sub.add_parser(command, help=help_text, description=description + " Paths of written PNGs go to stdout.")
        _prompt_args(g)
        if task != "text2image":
            _image_args(g, mask=task == "inpaint")
        _model_args(g)
        _sampling_args(g)
        _output_args(g)
        g.set_defaults(func=cmd_generate, task=task)

    s = sub.add_parser("samplers", help="list sampler names and their A1111 names")
    s.set_defaults(func=cmd_samplers)

    i = sub.add_parser("info", help="print the generation settings stored in a PNG")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print t2i's JSON settings instead of A1111's text")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("reproduce", help="regenerate a PNG from its metadata and compare bit for bit",
                       description="Regenerate an image from the settings in its metadata. Exit code 0 when the "
                                   "new image matches bit for bit, 1 when it differs.")
    r.add_argument("image")
    r.add_argument("--model", "-m", metavar="PATH|ID", help="use this model instead of the one recorded")
    r.add_argument("--model-config", metavar="DIR", help="configs for a single-file model (default: as recorded)")
    r.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"], help="default: as recorded")
    r.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="default: as recorded")
    r.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weights (trusted files only)")
    r.add_argument("--init", metavar="IMAGE", help="img2img/inpaint: the init image, if it moved from the recorded path")
    r.add_argument("--mask", metavar="IMAGE", help="inpaint: the mask, if it moved from the recorded path")
    r.add_argument("--out", "-o", metavar="PNG", help="also save the regenerated image here")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reproduce)

    e = sub.add_parser("eval", help="ShapeEval: GenEval-style accuracy of a model in the shapes world",
                       description="Generate ShapeEval's fixed prompts with several seeds, check each image by "
                                   "classical image analysis, print accuracy per category and write a grid.")
    e.add_argument("--model", "-m", metavar="PATH|ID", help="default: the bundled t2i-shapes")
    e.add_argument("--steps", type=_positive_int, help="default: the model's")
    e.add_argument("--sampler", "-s", help="default: the model's")
    e.add_argument("--guidance", "--cfg", type=_number, help="default: the model's")
    e.add_argument("--autoguidance", type=_number, metavar="S", help="default: the model's (0: off)")
    e.add_argument("--seeds", type=_positive_int, default=4, help="images per prompt (seeds 0..N-1; default 4)")
    e.add_argument("--speed", metavar="OPTS", default="",
                   help="measure with these speed options, e.g. cache3 (see t2i generate --help); default: batched")
    e.add_argument("--out", "-o", metavar="DIR", help="write shapeeval-grid.png and shapeeval.json here")
    e.add_argument("--ground-truth", action="store_true",
                   help="score the checker itself on ground-truth renders instead of a model")
    e.add_argument("--through-vae", action="store_true",
                   help="with --ground-truth: pass the renders through the model's VAE (encode, decode) first, "
                        "the best score any UNet can reach with that VAE")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    e.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    e.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("--model-config", metavar="DIR", help=argparse.SUPPRESS)
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.add_argument("--style", help="instead of ShapeEval: measure a style LoRA (outline | pastel); needs --lora")
    e.add_argument("--lora", metavar="FILE[:SCALE]", help="the style LoRA for --style (scale default 1)")
    e.add_argument("--trigger", default="", help="the LoRA's trigger phrase, for --style")
    e.add_argument("--transfer", metavar="S[,S...]",
                   help="with --style: measure style transfer instead, img2img of content renders at these "
                        "strengths, e.g. 0.3,0.5,0.7 (style metric, and ShapeEval of the content)")
    e.set_defaults(func=cmd_eval)

    from .bench import add_bench_parser

    add_bench_parser(sub)

    t = sub.add_parser("train", help="training: the demo model from scratch, or a LoRA")
    tsub = t.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    d = tsub.add_parser("demo", help="train the bundled demo model t2i-shapes from scratch (resumable)")
    d.add_argument("--config", default=None, metavar="TOML",
                   help="training config: a TOML file, or a shipped one by name: demo (the default; from scratch) or "
                        "continue (trains the bundled model further)")
    d.add_argument("--stage", default="all",
                   choices=["tokenizer", "vae", "text", "unet", "decoder", "tiny_vae", "export", "all"],
                   help="default: all (each stage resumes; export writes export_dir from the newest checkpoint)")
    d.add_argument("--resume", default="latest", metavar="latest|PATH|none", help="default: latest")
    d.add_argument("--output-dir", help="overrides output_dir (an export_dir inside it moves along)")
    d.add_argument("--export-dir", help="overrides export_dir")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set unet.steps=6000 (TOML values)")
    d.set_defaults(func=cmd_train_demo)
    _train_lora_parser(tsub)
    sd = tsub.add_parser("style-data", help="write a style dataset from the shapes world (images + captions)",
                         description="Render shapes-world scenes in a style (e.g. outlines only) with a .txt "
                                     "caption beside each image: ready for `t2i train lora --data`.")
    sd.add_argument("--style", required=True, help="outline | pastel | plain (the world as the base model saw it)")
    sd.add_argument("--out", "-o", required=True, metavar="DIR")
    sd.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    sd.add_argument("--seed", type=_positive_int, default=0, help="first scene seed (default 0)")
    sd.set_defaults(func=cmd_style_data)
    t.set_defaults(func=lambda args: t.print_help() or 2)
    _lora_parser(sub)
    _guide_parser(sub)
    from .server.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _guide_parser(sub) -> None:
    g = sub.add_parser(
        "guide", help="give a model folder an autoguidance guide: an earlier checkpoint of its own training",
        description="Write DIR/guide/ from an earlier checkpoint of the model's training (the weaker model that "
                    "autoguidance steers away from), stored as its difference from the model's UNet at a few bits "
                    "per weight, and turn autoguidance on in DIR/t2i.json. The guide's path goes to stdout.")
    g.add_argument("--model", required=True, metavar="DIR", help="the model folder (diffusers layout) to give a guide")
    g.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                   help="an earlier checkpoint of the same training: a `t2i train demo` checkpoint folder, a "
                        "diffusers UNet or model folder, or a .safetensors file")
    g.add_argument("--bits", type=int, default=3,
                   help="bits per weight of the difference, 1-8 (default 3); 16 stores the whole UNet in fp16")
    g.add_argument("--scale", type=float, default=3.0, help="the autoguidance scale t2i.json gets (default 3)")
    g.add_argument("--below", type=int, default=500,
                   help="autoguide the steps below this training timestep (default 500); noisier steps keep "
                        "classifier-free guidance")
    g.add_argument("--overwrite", action="store_true", help="replace the model's existing guide/")
    g.set_defaults(func=cmd_guide)


def _lora_parser(sub) -> None:
    lo = sub.add_parser("lora", help="LoRA files: convert between the diffusers and kohya layouts, show info")
    lsub = lo.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    c = lsub.add_parser(
        "convert", help="rewrite a LoRA in the diffusers or kohya/A1111 key layout (metadata kept)",
        description="Convert a LoRA file between diffusers' layout (what pipe.load_lora_weights reads) and "
                    "kohya's (what A1111/ComfyUI/kohya tools read). Alpha/rank is folded into the weights, so "
                    "the result gives the same images in any loader.",
        epilog="example:\n  t2i lora convert runs/outline/lora.safetensors outline-kohya.safetensors --format kohya",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("input", metavar="IN", help="a LoRA file, either layout")
    c.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    c.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="layout of OUT")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--allow-pickle", action="store_true", help="read a pickle-based IN (.pt/.ckpt; trusted only)")
    c.set_defaults(func=cmd_lora_convert)
    i = lsub.add_parser("info", help="print a LoRA's format, rank, alpha, modules and metadata")
    i.add_argument("file")
    i.add_argument("--allow-pickle", action="store_true", help="read a pickle-based file (trusted only)")
    i.set_defaults(func=cmd_lora_info)
    lo.set_defaults(func=lambda args: lo.print_help() or 2)


def _train_lora_parser(tsub) -> None:
    lo = tsub.add_parser(
        "lora", help="fine-tune a LoRA on a folder of images (resumable; works under accelerate launch)",
        description="Train LoRA adapters on the UNet attention (and optionally the text encoder) from a folder "
                    "of images with .txt captions or a metadata.jsonl. Flags override keys of --config.",
        epilog="example:\n  t2i train style-data --style outline --out data/outline\n"
               "  t2i train lora --data data/outline --output runs/outline --trigger \"in sks style\" --steps 300\n"
               "  t2i generate \"a red circle, in sks style\" --lora runs/outline/lora.safetensors:1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = lo.add_argument
    a("--config", metavar="TOML", help="a TOML file with any of the keys below (flags win)")
    a("--model", "-m", metavar="PATH|ID", help="base model (default: the bundled t2i-shapes)")
    a("--data", metavar="DIR", help="images with a .txt caption beside each, or a metadata.jsonl")
    a("--reg-data", metavar="DIR", help="regularisation images, trained on their captions without the trigger")
    a("--output", "-o", metavar="DIR", help="checkpoints, validation grids and the LoRA file go here")
    a("--name", help="file name of the LoRA (default: lora -> OUT/lora.safetensors)")
    a("--trigger", metavar="TEXT", help='phrase added to every caption, e.g. "in sks style"')
    a("--rank", type=_positive_int, metavar="N", help="LoRA rank (default 4)")
    a("--alpha", type=_number, metavar="X", help="LoRA alpha (default: the rank)")
    a("--steps", type=_positive_int, metavar="N", help="optimizer steps (default 500)")
    a("--lr", type=_number, metavar="X", help="learning rate (default 1e-4)")
    a("--text-encoder-lr", type=_number, metavar="X", help="learning rate of the text encoder's LoRA (default: --lr)")
    a("--warmup", type=_positive_int, metavar="N", help="linear warm-up steps (default 0)")
    a("--batch", type=_positive_int, metavar="N", help="images per step and process (default 1)")
    a("--grad-accum", type=_positive_int, metavar="N", help="gradient accumulation steps (default 1)")
    a("--resolution", type=_positive_int, metavar="N", help="training side length (default: the model's)")
    a("--no-buckets", dest="buckets", action="store_false", default=None,
      help="crop everything square instead of aspect-ratio buckets")
    a("--train-text-encoder", action="store_true", default=None, help="also train LoRA on the text encoder")
    a("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: no (fp16 needs a GPU)")
    a("--gradient-checkpointing", action="store_true", default=None, help="less memory, ~30%% slower")
    a("--no-cache-latents", dest="cache_latents", action="store_false", default=None,
      help="encode images every step instead of once")
    a("--min-snr-gamma", type=_number, metavar="X", help="min-SNR loss weighting (default 5; 0 = off)")
    a("--noise-offset", type=_number, metavar="X", help="noise offset (default 0)")
    a("--caption-dropout", type=_number, metavar="X", help="fraction of captions replaced by '' (default 0)")
    a("--seed", type=_positive_int, metavar="N", help="default 0")
    a("--checkpoint-every", type=_positive_int, metavar="N", help="default 100")
    a("--keep-checkpoints", type=_positive_int, metavar="N", help="default 2")
    a("--validation-every", type=_positive_int, metavar="N", help="steps between validation grids (default 100; 0 = end only)")
    a("--validation-prompt", dest="validation_prompts", action="append", metavar="PROMPT",
      help="repeatable (default: the first two captions)")
    a("--max-bad-steps", type=_positive_int, metavar="N", help="stop after this many non-finite steps in a row (default 5)")
    a("--format", choices=["diffusers", "kohya"], help="layout of the LoRA file (default diffusers)")
    a("--resume", metavar="latest|PATH", help="continue from the newest (or this) checkpoint in --output")
    a("--allow-pickle", action="store_true", default=None, help="allow a pickle-based base model (trusted only)")
    lo.set_defaults(func=cmd_train_lora)


# --------------------------------------------------------------------------- commands


def _bar(args, desc: str):
    if getattr(args, "quiet", False):
        return False
    from tqdm.auto import tqdm

    return tqdm(total=0, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def cmd_generate(args) -> int:
    from . import guards
    from .lora import parse_lora_arg
    from .output import plan_paths, save_images

    # 1. Everything checkable without the model, before loading it
    if bool(args.prompt is not None) == bool(args.prompts_file):
        raise UsageError("give a prompt or --prompts-file (one of them)")
    prompts = guards.read_prompts_file(args.prompts_file) if args.prompts_file else [args.prompt]
    if args.steps is not None:
        guards.check_steps(args.steps)
    if args.guidance is not None:
        guards.check_guidance(args.guidance)
    if args.autoguidance is not None:
        guards.check_autoguidance(args.autoguidance)
    guards.check_batch(args.batch)
    if args.seed != -1:
        guards.check_seed(args.seed)
    if args.width is not None or args.height is not None:
        guards.check_size(args.width or 8, args.height or 8)
    task_inputs = _check_image_inputs(args)
    if args.sampler:
        from .samplers import get_sampler

        get_sampler(args.sampler)
    if len(prompts) > 1 and Path(args.out).suffix.lower() == ".png":
        raise UsageError("--prompts-file writes several images; give a folder as --out")
    plan_paths(args.out, args.batch, args.overwrite)
    loras = [parse_lora_arg(x) for x in args.lora]
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir} is not a folder")
    from .lora import LoraSet

    vetting = LoraSet(None, args.lora_dir, args.allow_pickle)
    loras = [vetting.spec(l) for l in loras]
    options = _speed_options(args)

    # 2. Under `accelerate launch`/torchrun: this process's share of the prompts, named as one process would
    share = _distributed_share(args, len(prompts))
    seed = None if args.seed == -1 else args.seed
    if share is not None:
        state, mine, first_number, seed = share
        args.device = str(state.device) if args.device == "auto" else args.device
        args.quiet = args.quiet or not state.is_main_process

    # 3. Load once, generate each prompt
    pipe = _load(args, args.task)
    _set_autoguidance(pipe, args)
    pipe.loras.lora_dir, pipe.loras.allow_pickle = vetting.lora_dir, args.allow_pickle
    bar = _bar(args, "generating")
    from . import speed

    try:
        with speed.apply(pipe, options) if options else contextlib.nullcontext():
            for i, prompt in enumerate(prompts):
                if share is not None and i not in mine:
                    continue
                result = pipe(prompt, **task_inputs, negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, seed=seed, width=args.width,
                              height=args.height, batch=args.batch, loras=loras, progress=bar)
                names = None
                if share is not None:
                    names = [f"{first_number + i * args.batch + j:05d}-{s.seed}.png"
                             for j, s in enumerate(result.settings)]
                for path in save_images(result.images, result.settings, args.out, overwrite=args.overwrite,
                                        names=names):
                    # one write per line: processes sharing a pipe (accelerate launch runs them unbuffered, where
                    # print writes the text and its newline apart) would otherwise splice their lines
                    sys.stdout.write(f"{path}\n")
                    sys.stdout.flush()
    finally:
        if bar:
            bar.close()
    if share is not None:
        share[0].wait_for_everyone()
    return 0


def _set_autoguidance(pipe, args) -> None:
    """--autoguidance S (the pipeline refuses S > 0 without a guide/ UNet, before any image)."""
    if args.autoguidance is not None:
        pipe.autoguidance = args.autoguidance


def _speed_options(args):
    """--speed as t2i.speed.SpeedOptions (None: the plain, exact path); refused before loading if it cannot run,
    also when tiny_vae's small decoder is missing from args.model."""
    from . import loading

    options = None
    if getattr(args, "speed", ""):
        from .speed import SpeedOptions

        options = SpeedOptions.parse(args.speed)
        if options.cpu_offload and args.device in ("cpu", "mps"):
            raise UsageError(f"--speed cpu_offload needs a CUDA device, not --device {args.device}; leave it off")
    _check_tiny_vae(options, loading.resolve(args.model))
    return options


def _check_tiny_vae(options, source) -> None:
    """--speed tiny_vae[=PATH]: the small decoder exists, checked before the model loads."""
    if options is not None and options.tiny_vae is not None:
        from . import loading

        loading.tiny_vae_folder(options.tiny_vae, Path(source.location) if source.kind != "hub" else None)


def _distributed_share(args, n_prompts: int):
    """Under several processes (WORLD_SIZE > 1): (state, this process's prompt indices, the first file number,
    the seed), agreed by all processes before any writes; None for a single process.

    Prompt i goes to process i % N, and its images get the numbers and seeds a single
    process would give them, so the folder ends up the same as after one process.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from .output import next_number, plan_paths

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo between CPU processes
    folder, _ = plan_paths(args.out, args.batch, args.overwrite)
    if folder is None:
        raise UsageError("several processes write into a folder; give a folder as --out, not a .png path")
    agreed = [next_number(folder), args.seed if args.seed != -1 else random.randrange(2**32)]
    if not state.is_main_process:
        agreed = [None, None]
    broadcast_object_list(agreed)  # process 0's view of the folder and its seed, before anyone writes
    state.wait_for_everyone()
    mine = set(range(state.process_index, n_prompts, state.num_processes))
    return state, mine, agreed[0], agreed[1]


def _check_image_inputs(args) -> dict:
    """img2img/inpaint: the init image and mask decode, strength and blur are in range; the pipeline's arguments."""
    from . import guards
    from .images import as_mask, check_mask, read_input

    if args.task == "text2image":
        return {}
    read_input(args.init, "--init")
    guards.check_strength(args.strength)
    if args.steps is not None and int(args.steps * args.strength) < 1:
        raise UsageError(f"--strength {args.strength:g} of {args.steps} steps runs no denoising step; "
                         f"use --strength {1 / args.steps:.2g} or more, or more --steps")
    inputs = {"init_image": args.init, "strength": args.strength}
    if args.task == "inpaint":
        check_mask(read_input(args.mask, "--mask", convert=as_mask)[0], args.invert_mask)
        if args.mask_blur < 0:
            raise UsageError(f"--mask-blur must be 0 or more pixels, got {args.mask_blur}")
        inputs |= {"mask": args.mask, "mask_blur": args.mask_blur, "invert_mask": args.invert_mask}
    return inputs


def _load(args, task: str = "text2image"):
    with _no_collections():
        from t2i.pipelines import Image2Image, Inpaint, Text2Image

        cls = {"text2image": Text2Image, "image2image": Image2Image, "inpaint": Inpaint}[task]
        return cls.from_pretrained(args.model, device=args.device or "auto", dtype=args.dtype or "auto",
                                   allow_pickle=args.allow_pickle, model_config=args.model_config)


def cmd_samplers(args) -> int:
    from .samplers import DEFAULT_SAMPLER, SAMPLERS

    width = max(len(n) for n in SAMPLERS)
    print(f"{'name':<{width}}  A1111 name")
    for name, s in SAMPLERS.items():
        mark = "  (default)" if name == DEFAULT_SAMPLER else ""
        print(f"{name:<{width}}  {s.a1111}{mark}")
    return 0


def cmd_info(args) -> int:
    import json

    from . import metadata

    text, settings = metadata.read(args.image)
    if text is None and settings is None:
        raise UsageError(f"{args.image} carries no generation metadata")
    if args.json:
        if settings is None:
            raise UsageError(f"{args.image} has A1111 parameters but no t2i JSON settings; drop --json")
        print(json.dumps(settings.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(text if text is not None else json.dumps(settings.to_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    report = reproduce(args.image, model=args.model, device=args.device, dtype=args.dtype,
                       allow_pickle=args.allow_pickle, out=args.out, overwrite=args.overwrite,
                       progress=not args.quiet, model_config=args.model_config, init=args.init, mask=args.mask)
    print(report.summary())
    return 0 if report.identical else 1


def cmd_eval(args) -> int:
    from . import guards

    if args.through_vae and not args.ground_truth:
        raise UsageError("--through-vae scores ground-truth renders; add --ground-truth")
    if args.ground_truth:
        return _ground_truth_eval(args)
    if args.steps is not None:
        guards.check_steps(args.steps)
    if args.guidance is not None:
        guards.check_guidance(args.guidance)
    if args.autoguidance is not None:
        guards.check_autoguidance(args.autoguidance)
    if args.sampler:
        from .samplers import get_sampler

        get_sampler(args.sampler)
    if args.out:
        guards.check_writable_folder(args.out)
    from .evaluation import run_eval

    if args.style:
        return _style_eval(args)
    options = _speed_options(args)
    if options is not None:  # eval batches the seeds of a prompt whatever else is on
        import dataclasses

        options = dataclasses.replace(options, batched=True)
    pipe = _load(args)
    _set_autoguidance(pipe, args)
    pipe.exact_batch = False  # seeds of a prompt batched: images equal single runs to within rounding
    bar = _bar(args, "shapeeval")
    from . import speed

    try:
        with speed.apply(pipe, options) if options else contextlib.nullcontext():
            run = run_eval(pipe, args.steps, args.sampler, args.guidance, seeds=range(args.seeds), out=args.out,
                           progress=bar)
    finally:
        if bar:
            bar.close()
    print(run.report.table())
    if run.grid:
        print(f"grid: {run.grid}\nresults: {run.results}")
    return 0


def _ground_truth_eval(args) -> int:
    from . import shapeeval

    if not args.through_vae:
        acc = shapeeval.ground_truth_accuracy(n_per_prompt=args.seeds)
        print("checker accuracy on ground-truth renders")
    else:
        from . import speed
        from .evaluation import vae_round_trip

        options = _speed_options(args)
        pipe = _load(args)
        with speed.apply(pipe, options) if options else contextlib.nullcontext():
            acc = shapeeval.ground_truth_accuracy(n_per_prompt=args.seeds, through=vae_round_trip(pipe))
        print("checker accuracy on ground-truth renders through the model's VAE (the best a UNet can reach)")
    for key, value in acc.items():
        print(f"{key:<14}{value:>10.3f}")
    return 0


def _style_eval(args) -> int:
    from . import loading
    from .lora import LoraSet, parse_lora_arg
    from .styles import STYLES, style_eval, style_table, transfer_eval

    if args.style not in STYLES:
        raise UsageError(f"unknown style {args.style!r}; use one of: {', '.join(STYLES)}")
    if not args.lora:
        raise UsageError("--style needs the LoRA to measure: --lora FILE[:SCALE]")
    strengths = _strengths(args.transfer) if args.transfer else None
    spec = LoraSet(None, None, args.allow_pickle).spec(parse_lora_arg(args.lora))
    loading.resolve(args.model)
    pipe = _load(args)
    pipe.exact_batch = False
    seeds = tuple(range(args.seeds))
    if strengths:
        rows = transfer_eval(pipe, spec.path, args.style, args.trigger, strengths, seeds=seeds, scale=spec.scale)
    else:
        rows = style_eval(pipe, spec.path, args.style, args.trigger, seeds=seeds, scale=spec.scale)
    print(style_table(rows))
    if args.out:
        import json

        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "style-transfer.json" if strengths else "style-eval.json"
        (Path(args.out) / name).write_text(json.dumps(rows, indent=1))
    return 0


def _strengths(text: str) -> list[float]:
    from . import guards

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--transfer {text!r}: give strengths like 0.3,0.5,0.7") from None
    for v in values:
        guards.check_strength(v)
    return values


def cmd_train_demo(args) -> int:
    import tomllib

    from t2i.train import demo

    overrides = {"output_dir": args.output_dir, "export_dir": args.export_dir}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: use KEY=VALUE, e.g. unet.steps=6000")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    demo.run(args.config or "demo", args.stage, None if args.resume == "none" else args.resume, overrides)
    return 0


def cmd_train_lora(args) -> int:
    import dataclasses

    from t2i.train import lora

    # each config key with a flag of the same name; None = flag not given, the file's value stays
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(lora.LoraTrainConfig) if hasattr(args, f.name)}
    path = lora.run(args.config, flags, args.resume)
    if path is not None:  # the main process of a multi-process run
        print(path)
    return 0


def cmd_lora_convert(args) -> int:
    from .lora_format import convert_lora

    print(convert_lora(args.input, args.output, args.format, overwrite=args.overwrite,
                       allow_pickle=args.allow_pickle))
    return 0


def cmd_lora_info(args) -> int:
    from .lora_format import lora_info

    print(lora_info(args.file, allow_pickle=args.allow_pickle).summary())
    return 0


def cmd_guide(args) -> int:
    from . import guide

    model, source = Path(args.model).expanduser(), Path(args.source).expanduser()
    folder, kept = guide.make(model, source, args.bits, args.scale, args.below, args.overwrite)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    stored = "the whole UNet in fp16" if args.bits == guide.FULL else (
        f"{args.bits} bits per weight, {kept:.1%} of the difference's energy kept")
    print(f"t2i: guide {size:.2f} MB ({stored}); {model / 't2i.json'}: autoguidance {args.scale:g} below "
          f"timestep {args.below}", file=sys.stderr)
    print(folder)
    return 0


def cmd_style_data(args) -> int:
    from .styles import write_dataset

    folder = write_dataset(args.out, args.style, args.n, args.seed)
    print(folder)
    return 0


class _Deferred(types.ModuleType):
    """A module that stands in sys.modules until something reads from it.

    Its name, file and spec are set, so tools that walk sys.modules (inspect,
    torch's op registration) see a module without loading it; any other
    attribute imports the real one and takes over its namespace.
    """

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def _defer_import(name: str) -> None:
    """Put off importing `name` until it is used: every diffusers scheduler module imports
    scipy.stats (about 1 s of a 10 s `t2i generate`) for beta sigmas, which t2i never asks for."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return
    if spec is None:
        return
    module = _Deferred(name)
    module.__spec__, module.__file__ = spec, spec.origin
    module.__path__ = list(spec.submodule_search_locations or [])
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def _no_collections():
    """Imports and model loading make millions of objects that live as long as the process;
    full garbage collections over them while they are made cost 2 s of a 10 s `t2i generate`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    with _no_collections():
        parser = build_parser()
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except T2IError as e:
        print(f"t2i: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("t2i: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `t2i` process (the console script, `python -m t2i.cli`): main() with two start-up savings
    that change process-wide state, so they are not main()'s to make for in-process callers."""
    _defer_import("scipy.stats")
    code = main()
    gc.freeze()  # exit skips a last full collection over everything imported and loaded (1 s)
    sys.exit(code)


if __name__ == "__main__":  # `python -m t2i.cli`, and `accelerate launch -m t2i.cli`
    run()
