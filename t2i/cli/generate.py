"""`t2i generate`, `t2i img2img`, `t2i inpaint`: images from a prompt (or a file of prompts)."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from t2i.cli.common import (
    dynamic_prompt_args,
    dynamic_prompts_mode,
    everyday_args,
    hires_of,
    image_args,
    model_args,
    output_args,
    print_paths,
    progress_bar,
    prompt_args,
    sampling_args,
    tidy_folders,
)
from t2i.cli.startup import no_collections
from t2i.errors import UsageError

log = logging.getLogger("t2i.cli.generate")


def add_parser(sub) -> None:
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
        prompt_args(g)
        dynamic_prompt_args(g)
        if task != "text2image":
            image_args(g, mask=task == "inpaint")
        model_args(g)
        sampling_args(g)
        if task == "text2image":
            g.add_argument("--from-png", metavar="IMAGE",
                           help="make an image's settings again (A1111's send to txt2img): the prompt, negative "
                                "prompt, steps, sampler, schedule, CFG, seed and size recorded in an A1111, t2i or "
                                "ComfyUI image (PNG, or A1111's JPEG/WebP); flags given here win; a note for each "
                                "setting t2i cannot honour")
        everyday_args(g, hires=task == "text2image")
        output_args(g)
        g.set_defaults(func=cmd_generate, task=task)



def cmd_generate(args) -> int:
    with tidy_folders(args.out):  # a run stopped before its first image leaves no new empty folder
        with no_collections():  # imports and loading make millions of lasting objects: no collections over them
            job, share = _check(args)
            from t2i import jobs  # deferred: torch and diffusers; --help must not import them

            pipe = jobs.load(job)
            if getattr(args, "from_png_found", None) is not None:
                _model_note(args.from_png_found, pipe)
        _generate(args, job, pipe, share)
    return 0


def _check(args):
    """1. The request, checked whole before any model loads (t2i.jobs.check: the server's path too);
    2. under `accelerate launch`/torchrun, this process's share of the prompts."""
    # deferred: torch and diffusers; --help must not import them
    from t2i import guards, jobs
    from t2i.output import plan_paths

    from_png = getattr(args, "from_png", None)
    if from_png and args.prompts_file:
        raise UsageError("--from-png makes one image's settings again; drop --prompts-file (a prompt given "
                         "beside it replaces the recorded one)")
    if not from_png and bool(args.prompt is not None) == bool(args.prompts_file):
        raise UsageError("give a prompt or --prompts-file (one of them)")
    prompts = guards.read_prompts_file(args.prompts_file) if args.prompts_file else [args.prompt]
    if len(prompts) > 1 and Path(args.out).suffix.lower() == ".png":
        raise UsageError("--prompts-file writes several images; give a folder as --out")
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir} is not a folder")
    if args.embedding_dir and not Path(args.embedding_dir).is_dir():
        raise UsageError(f"--embedding-dir {args.embedding_dir} is not a folder")
    if args.task == "inpaint" and args.mask_blur < 0:
        raise UsageError(f"--mask-blur must be 0 or more pixels, got {args.mask_blur}")
    image = {} if args.task == "text2image" else {"init_image": args.init, "strength": args.strength}
    if args.task == "inpaint":
        image |= {"mask": args.mask, "mask_blur": args.mask_blur, "invert_mask": args.invert_mask}
    sampling = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                    sampler=args.sampler, scheduler=args.scheduler, width=args.width, height=args.height)
    rest = dict(task=args.task, batch=args.batch, lora_dir=args.lora_dir, autoguidance=args.autoguidance,
                speed=args.speed, model=args.model, model_config=args.model_config, device=args.device,
                dtype=args.dtype, allow_pickle=args.allow_pickle, vae=args.vae, vae_dir=args.vae_dir,
                embedding_dir=args.embedding_dir, **image)
    everyday = {"clip_skip": args.clip_skip, "hires": hires_of(args)}  # None: not given (--from-png: the image's)
    if from_png:
        rest |= everyday
        request = _request_from_png(args, sampling, rest)
    else:
        request = jobs.Request(prompts, **sampling, seed=args.seed, loras=args.lora, **rest,
                               **{k: v for k, v in everyday.items() if v is not None})
    request.dynamic_prompts, request.wildcard_dir = dynamic_prompts_mode(args), args.wildcard_dir
    job = jobs.check(request)
    request = job.request  # --combinatorial: the job's own request, its prompts every combination
    if len(request.prompts) > 1 and Path(args.out).suffix.lower() == ".png":
        raise UsageError("--combinatorial makes several prompts; give a folder as --out")
    plan_paths(args.out, args.batch, args.overwrite)

    share = _distributed_share(args, len(request.prompts))
    if share is not None:
        state, _, _, seed = share
        request.seed = seed  # every process draws from the seed process 0 chose
        request.device = str(state.device) if args.device == "auto" else args.device
        args.quiet = args.quiet or not state.is_main_process
    return job, share


def _request_from_png(args, sampling: dict, rest: dict):
    """--from-png: the image's settings under the flags given (None/-1: not given); a note for each it has that
    t2i does not honour."""
    from t2i import infotext

    given = {k: v for k, v in sampling.items() if v is not None}
    if args.prompt is not None:
        given["prompts"] = [args.prompt]
    if args.seed != -1:
        given["seed"] = args.seed
    if args.lora:
        given["loras"] = args.lora
    request, notes, found = infotext.request_from_image(args.from_png, **given, **rest)
    for note in notes:
        log.warning(note)
    args.from_png_found = found
    return request


def _model_note(found, pipe) -> None:
    from t2i import infotext

    note = infotext.model_note(found, pipe.model.source.name, pipe.model.hash)
    if note:
        log.warning(note)


def _generate(args, job, pipe, share) -> None:
    """3. Each prompt of this process, one bar across them all; written paths on stdout."""
    from t2i import jobs  # deferred: torch; --help must not import it
    from t2i.output import save_images

    mine = (lambda i: i in share[1]) if share is not None else None
    last = max((i for i in range(len(job.request.prompts)) if mine is None or mine(i)), default=-1)
    bar = progress_bar(args, "generating")
    try:
        for i, result in zip((i for i in range(len(job.request.prompts)) if mine is None or mine(i)),
                             jobs.run(pipe, job, progress=bar, only=mine)):
            names = None
            if share is not None:  # the names one process would give them
                names = [f"{share[2] + i * args.batch + j:05d}-{s.seed}.png" for j, s in enumerate(result.settings)]
            paths = save_images(result.images, result.settings, args.out, overwrite=args.overwrite, names=names)
            if bar and i == last:
                bar.close()  # the finished bar first, the last paths below it
            print_paths(paths, bar)
    finally:
        if bar:
            bar.close()
    if share is not None:
        share[0].wait_for_everyone()


def _distributed_share(args, n_prompts: int):
    """Under several processes (WORLD_SIZE > 1): (state, this process's prompt indices, the first file number,
    the seed), agreed by all processes before any writes; None for a single process.

    Prompt i goes to process i % N, and its images get the numbers and seeds a single
    process would give them, so the folder ends up the same as after one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # deferred: torch and accelerate; --help must not import them
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from t2i.output import next_number, plan_paths

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
