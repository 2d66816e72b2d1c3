"""`t2i eval`: ShapeEval of a model, the checker's own accuracy, or a style LoRA's effect."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from t2i.choices import DEVICES, DTYPES
from t2i.cli.common import (
    load_pipeline,
    number,
    positive_int,
    progress_bar,
    set_autoguidance,
    speed_options,
    tidy_folders,
)
from t2i.errors import UsageError


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="ShapeEval: GenEval-style accuracy of a model in the shapes world",
                       description="Generate ShapeEval's fixed prompts with several seeds, check each image by "
                                   "classical image analysis, print accuracy per category and write a grid.")
    e.add_argument("--model", "-m", metavar="PATH|ID", help="default: the bundled t2i-shapes")
    e.add_argument("--steps", type=positive_int, help="default: the model's")
    e.add_argument("--sampler", "-s", help="default: the model's")
    e.add_argument("--guidance", "--cfg", type=number, help="default: the model's")
    e.add_argument("--autoguidance", type=number, metavar="S", help="default: the model's (0: off)")
    e.add_argument("--seeds", type=positive_int, default=4, help="images per prompt (seeds 0..N-1; default 4)")
    e.add_argument("--speed", metavar="OPTS", default="auto",
                   help="measure with these speed options, e.g. cache3 (see t2i generate --help); default: auto "
                        "(what t2i generate does); exact: the fp32 path. A prompt's seeds are batched either way")
    e.add_argument("--out", "-o", metavar="DIR", help="write shapeeval-grid.png and shapeeval.json here")
    e.add_argument("--ground-truth", action="store_true",
                   help="score the checker itself on ground-truth renders instead of a model")
    e.add_argument("--through-vae", action="store_true",
                   help="with --ground-truth: pass the renders through the model's VAE (encode, decode) first, "
                        "the best score any UNet can reach with that VAE")
    e.add_argument("--device", default="auto", choices=DEVICES)
    e.add_argument("--dtype", default="auto", choices=DTYPES)
    e.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("--model-config", metavar="DIR", help=argparse.SUPPRESS)
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.add_argument("--style", help="instead of ShapeEval: measure a style LoRA (outline | pastel | mosaic) against "
                                   "the style's data and the VAE's ceiling (that data through the model's VAE); "
                                   "needs --lora, --embedding or --data")
    e.add_argument("--lora", metavar="FILE[:SCALE]", help="the style LoRA for --style (scale default 1)")
    e.add_argument("--trigger", default="", help="the LoRA's trigger phrase, for --style")
    e.add_argument("--embedding", metavar="FILE",
                   help="with --style: measure a style embedding instead of a LoRA, its name (the file's stem) "
                        "appended to the prompts")
    e.add_argument("--transfer", metavar="S[,S...]",
                   help="with --style: measure style transfer instead, img2img of content renders at these "
                        "strengths, e.g. 0.3,0.5,0.7 (style metric, and ShapeEval of the content)")
    e.add_argument("--data", metavar="DIR",
                   help="with --style: your own style images (a training folder) as the style data: the style "
                        "metric of them, raw and through the model's VAE (the ceiling); alone, without --lora, "
                        "only these two rows")
    e.set_defaults(func=cmd_eval)



def cmd_eval(args) -> int:
    with tidy_folders(args.out) if args.out else contextlib.nullcontext():  # no new empty --out left behind
        return _eval(args)


def _eval(args) -> int:
    # deferred: torch and diffusers; --help must not import them
    from t2i import guards, speed
    from t2i.demo.evaluation import run_eval

    if args.through_vae and not args.ground_truth:
        raise UsageError("--through-vae scores ground-truth renders; add --ground-truth")
    if args.ground_truth:
        return _ground_truth_eval(args)
    guards.check_sampling(args.steps, args.guidance, args.autoguidance, args.sampler)
    if args.out:
        guards.check_writable_folder(args.out)
    if args.style:
        return _style_eval(args)
    options = speed_options(args)
    if options is not None:  # eval batches the seeds of a prompt whatever else is on
        options = dataclasses.replace(options, batched=True)
    pipe = load_pipeline(args)
    set_autoguidance(pipe, args)
    pipe.exact_batch = False  # seeds of a prompt batched: images equal single runs to within rounding
    bar = progress_bar(args, "shapeeval")
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
    from t2i.demo import shapeeval  # deferred: numpy and PIL; --help must not import them

    if not args.through_vae:
        acc = shapeeval.ground_truth_accuracy(n_per_prompt=args.seeds)
        print("checker accuracy on ground-truth renders")
    else:
        # deferred: torch and diffusers; the checker's accuracy alone needs neither
        from t2i import speed
        from t2i.demo.evaluation import vae_round_trip

        options = speed_options(args)
        pipe = load_pipeline(args)
        with speed.apply(pipe, options) if options else contextlib.nullcontext():
            acc = shapeeval.ground_truth_accuracy(n_per_prompt=args.seeds, through=vae_round_trip(pipe))
        print("checker accuracy on ground-truth renders through the model's VAE (the best a UNet can reach)")
    for key, value in acc.items():
        print(f"{key:<14}{value:>10.3f}")
    return 0


def _style_eval(args) -> int:
    # deferred: torch and diffusers; --help must not import them
    from t2i import models
    from t2i.demo.styles import (
        STYLES,
        share_line,
        style_eval,
        style_table,
        transfer_eval,
    )
    from t2i.lora import LoraSet, parse_lora_arg

    if args.style not in STYLES:
        raise UsageError(f"unknown style {args.style!r}; use one of: {', '.join(STYLES)}")
    if args.data and args.transfer:
        raise UsageError("--transfer redraws ShapeEval's content renders; leave out --data")
    data = _data_folder(args.data) if args.data else None  # vetted before the model loads
    if args.embedding:
        return _embedding_eval(args, data)
    if not args.lora and data is not None:
        return _ceiling_eval(args, data)
    if not args.lora:
        raise UsageError("--style needs the LoRA or embedding to measure: --lora FILE[:SCALE] or --embedding FILE "
                         "(or --data DIR for the ceiling of your own style images)")
    strengths = _strengths(args.transfer) if args.transfer else None
    spec = LoraSet(None, None, args.allow_pickle).spec(parse_lora_arg(args.lora))
    models.resolve(args.model)
    pipe = load_pipeline(args)
    pipe.exact_batch = False
    seeds = tuple(range(args.seeds))
    if strengths:
        rows = transfer_eval(pipe, spec.path, args.style, args.trigger, strengths, seeds=seeds, scale=spec.scale)
    else:
        rows = style_eval(pipe, spec.path, args.style, args.trigger, seeds=seeds, scale=spec.scale,
                          data=_fitted(data, pipe))
    print(style_table(rows))
    if not strengths:
        print(share_line(rows, "lora + trigger"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "style-transfer.json" if strengths else "style-eval.json"
        (Path(args.out) / name).write_text(json.dumps(rows, indent=1))
    return 0


def _data_folder(folder: str):
    """The images of --data, scanned and vetted as `t2i train lora --data` does (a one-line error if none)."""
    from t2i.train.data import scan  # deferred: torch; --help must not import it

    return scan(folder)


def _fitted(data, pipe):
    """--data's images resized and centre-cropped to the model's native size, as training does by default."""
    # deferred: PIL and torch; --help must not import them
    from PIL import Image

    from t2i.train.data import fit

    if data is None:
        return None
    size = (pipe.defaults.width, pipe.defaults.height)
    images = []
    for item in data.items:
        with Image.open(item.path) as img:
            images.append(fit(img.convert("RGB"), size))
    return images


def _ceiling_eval(args, data) -> int:
    """--style S --data DIR alone: the style metric of the folder's images, raw and through the model's VAE."""
    from t2i import models  # deferred: torch and diffusers; --help must not import them
    from t2i.demo.styles import ceiling_rows, style_table

    models.resolve(args.model)
    pipe = load_pipeline(args)
    rows = ceiling_rows(pipe, args.style, [], data=_fitted(data, pipe))
    print(f"style data: {len(data.items)} images of {args.data}, at {pipe.defaults.width}x{pipe.defaults.height}")
    print(style_table(rows))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "style-ceiling.json").write_text(json.dumps(rows, indent=1))
    return 0


def _embedding_eval(args, data=None) -> int:
    # deferred: torch and diffusers; --help must not import them
    from t2i import embeddings, models
    from t2i.demo.styles import embedding_eval, share_line, style_table

    if args.lora or args.transfer:
        raise UsageError("--embedding measures an embedding alone; leave out --lora and --transfer")
    if not Path(args.embedding).is_file():
        raise UsageError(f"embedding file {args.embedding} does not exist")
    embeddings.read(args.embedding, args.allow_pickle)  # a broken or hostile file fails before the model loads
    models.resolve(args.model)
    pipe = load_pipeline(args)
    pipe.exact_batch = False
    rows = embedding_eval(pipe, args.embedding, args.style, seeds=tuple(range(args.seeds)), data=_fitted(data, pipe))
    print(style_table(rows))
    print(share_line(rows, "embedding"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "embedding-eval.json").write_text(json.dumps(rows, indent=1))
    return 0


def _strengths(text: str) -> list[float]:
    from t2i import guards  # deferred: torch; --help must not import it

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--transfer {text!r}: give strengths like 0.3,0.5,0.7") from None
    for v in values:
        guards.check_strength(v)
    return values
