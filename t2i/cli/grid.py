"""`t2i grid`: A1111's X/Y/Z plot, an image per combination of axis values, drawn into one labelled PNG."""

from __future__ import annotations

from pathlib import Path

from t2i.cli.common import (
    dynamic_prompt_args,
    dynamic_prompts_mode,
    everyday_args,
    hires_of,
    model_args,
    output_args,
    print_paths,
    sampling_args,
    tidy_folders,
)
from t2i.cli.startup import no_collections
from t2i.errors import UsageError

EPILOG = """axes (t2i name or A1111's): seed, steps, cfg ("CFG Scale"), sampler, scheduler ("Schedule type"),
clip-skip ("Clip skip"), width, height, autoguidance, negative-prompt, prompt-sr ("Prompt S/R": the first value is replaced by each value, in the prompt and the
negative prompt), lora-scale (the scale of every --lora), model ("Checkpoint name": as --model takes it; each
loads once), vae ("VAE": as --vae takes it; None or Automatic: the model's own), hires-scale ("Hires upscale"),
hires-steps ("Hires steps"), hires-denoise ("Denoising"), hires-upscaler ("Hires upscaler"); a hires axis turns
the hires fix on, its other settings from the --hires-* flags.
values: comma-separated ("Euler a, DPM++ 2M"; quote one that holds a comma); numbers also as ranges:
1-5, 10-30 (+10), 30-10 (-10), 1-9 [5] (five evenly spaced).

examples:
  t2i grid "a red circle" --x "steps=10-30 (+10)" --y "sampler=Euler a,DPM++ 2M" --seed 7
  t2i grid "a red circle" --x "Prompt S/R=red,blue,green" --y "CFG Scale=3,5,7" --z "seed=1,2"
"""


def add_parser(sub) -> None:
    import argparse

    g = sub.add_parser("grid", help="an X/Y/Z grid: one image per combination of settings, labelled",
                       description="A1111's X/Y/Z plot: one image per combination of the axes' values, saved with "
                                   "its own metadata, and one labelled grid PNG (xyz_grid-NNNNN-SEED.png, the first "
                                   "image's parameters plus the axes, as A1111 writes them). With --z, one sub-grid "
                                   "per Z value, side by side in the same PNG. Paths of written PNGs go to stdout.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="the prompt (A1111 syntax and dynamic prompts; see t2i generate --help)")
    g.add_argument("--x", required=True, metavar="AXIS=VALUES", help='the columns, e.g. "steps=10,20,30"')
    g.add_argument("--y", metavar="AXIS=VALUES", help='the rows, e.g. "sampler=Euler a,DPM++ 2M"')
    g.add_argument("--z", metavar="AXIS=VALUES", help="one sub-grid per value, side by side")
    dynamic_prompt_args(g)
    model_args(g)
    sampling_args(g)
    everyday_args(g, hires=True)
    output_args(g)
    g.set_defaults(func=cmd_grid)


def cmd_grid(args) -> int:
    with tidy_folders(args.out):  # a run stopped before its first image leaves no new empty folder
        with no_collections():  # imports and loading make millions of lasting objects: no collections over them
            cells, axes = _check(args)
            from t2i import grid, jobs  # deferred: torch and diffusers; --help must not import them

            pipe = jobs.load(grid.run_order(cells)[0].job)
        _grid(args, pipe, cells, axes)
    return 0


def _check(args):
    """The axes read, every cell's request checked (t2i.grid.plan: t2i.jobs.check per cell), before any model."""
    from t2i import grid, jobs  # deferred: torch; --help must not import it
    from t2i.guards import check_writable_folder

    if Path(args.out).suffix.lower() == ".png":
        raise UsageError("a grid writes several images; give a folder as --out")
    if args.batch != 1:
        raise UsageError("a grid makes one image per cell; leave out --batch (a seed axis makes several seeds)")
    axes = [grid.parse_axis(spec, flag) for flag, spec in (("--x", args.x), ("--y", args.y), ("--z", args.z))
            if spec is not None]
    if args.z is not None and args.y is None:
        raise UsageError("--z needs a --y (give the second axis as --y)")
    names = [a.axis.name for a in axes]
    for name in set(names):
        if names.count(name) > 1:
            raise UsageError(f"two axes set {name}; give each setting one axis")
    if "lora-scale" in names and not args.lora:
        raise UsageError("the lora-scale axis sets the scale of each --lora; give one with --lora FILE")
    request = jobs.Request([args.prompt], negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, scheduler=args.scheduler, seed=args.seed,
                           width=args.width, height=args.height, loras=args.lora, lora_dir=args.lora_dir,
                           autoguidance=args.autoguidance, speed=args.speed, model=args.model,
                           model_config=args.model_config, device=args.device, dtype=args.dtype,
                           allow_pickle=args.allow_pickle, clip_skip=args.clip_skip or 1, vae=args.vae,
                           vae_dir=args.vae_dir, hires=_hires(args, names))
    request.dynamic_prompts, request.wildcard_dir = dynamic_prompts_mode(args), args.wildcard_dir
    cells = grid.plan(request, axes)
    sizes = [(c.job.request.width, c.job.request.height) for c in cells]
    if all(w and h for w, h in sizes):  # else the model's size, known once it is loaded (checked then)
        grid.check_pixels(axes, max(w for w, _ in sizes), max(h for _, h in sizes))
    check_writable_folder(args.out)
    return cells, axes


def _hires(args, names: list[str]):
    """The --hires-* flags' hires fix; with a hires axis, on even without a size flag (the axis turns it on)."""
    import argparse

    if any(n.startswith("hires-") for n in names) and args.hires_scale is None and not args.hires_width \
            and not args.hires_height:
        args = argparse.Namespace(**{**vars(args), "hires_scale": 2.0})
    return hires_of(args)


def _load(job):
    """Another model of a Checkpoint axis: loaded as the first one was (no collections over its objects)."""
    from t2i import jobs  # deferred: torch; --help must not import it

    with no_collections():
        return jobs.load(job)


def _grid(args, pipe, cells, axes) -> None:
    """Each cell in turn (its PNG written as soon as it is made), one bar over the whole grid, then the grid PNG."""
    from t2i import grid  # deferred: torch; --help must not import it
    from t2i.output import save_images
    from t2i.progress import PlannedBar

    d = pipe.defaults
    grid.check_pixels(axes, max(c.job.request.width or d.width for c in cells),
                      max(c.job.request.height or d.height for c in cells))
    order = grid.run_order(cells)  # by model: a Checkpoint axis loads each model once
    bar = False if args.quiet else PlannedBar("grid", [c.job.request.steps or d.steps for c in order])
    try:
        for cell in grid.run(cells, pipe, progress=bar, load=_load):
            cell.paths = save_images(cell.result.images, cell.result.settings, args.out)
            print_paths(cell.paths, bar)
        image, _ = grid.draw(cells, axes)
        path = _save_grid(image, cells, axes, Path(args.out))
        if bar:
            bar.close()  # the finished bar first, the grid's path below it
        print_paths([path], bar)
    finally:
        if bar:
            bar.close()


def _save_grid(image, cells, axes, folder: Path) -> Path:
    """xyz_grid-NNNNN-SEED.png, NNNNN the first cell's number (so it is free), never over an existing file."""
    from t2i import grid, metadata  # deferred: PIL; --help must not import it
    from t2i.files import atomic_write

    first = cells[0]
    path = folder / f"xyz_grid-{first.paths[0].name}"
    info = metadata.grid_png_info(first.result.settings[0], grid.a1111_fields(axes), grid.json_record(axes, cells))
    try:
        with atomic_write(path, overwrite=False) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
    except FileExistsError:
        raise UsageError(f"{path} exists; not overwritten (the cells are written: {cells[0].paths[0]} on)") from None
    return path
