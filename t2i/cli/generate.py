"""`t2i generate`, `t2i img2img`, `t2i inpaint`: images from a prompt (or a file of prompts)."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from t2i.cli.common import (
    image_args,
    load_pipeline,
    model_args,
    output_args,
    print_paths,
    progress_bar,
    prompt_args,
    sampling_args,
    set_autoguidance,
    speed_options,
    tidy_folders,
)
from t2i.cli.startup import no_collections
from t2i.errors import UsageError


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
        if task != "text2image":
            image_args(g, mask=task == "inpaint")
        model_args(g)
        sampling_args(g)
        output_args(g)
        g.set_defaults(func=cmd_generate, task=task)



@dataclass
class _Job:
    """A checked run with its model loaded: what each call of this process gets."""

    pipe: object
    prompts: list[str]
    todo: list[int]  # the indices of this process's prompts
    inputs: dict  # the task's own arguments: init image, mask, strength
    loras: list
    options: object  # t2i.speed.SpeedOptions, or None for the plain path
    seed: int | None
    share: tuple | None  # (state, prompt indices, first file number, seed) under several processes


def cmd_generate(args) -> int:
    with tidy_folders(args.out):  # a run stopped before its first image leaves no new empty folder
        with no_collections():  # imports and loading make millions of lasting objects: no collections over them
            job = _prepare(args)
        _generate(args, job)
    return 0


def _prepare(args) -> _Job:
    # deferred: torch and diffusers; --help must not import them
    from t2i import guards
    from t2i.lora import LoraSet, parse_lora_arg
    from t2i.output import plan_paths
    from t2i.prompts import extract_loras
    from t2i.samplers import get_sampler

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
    inputs = _check_image_inputs(args)
    if args.sampler:
        get_sampler(args.sampler)
    if len(prompts) > 1 and Path(args.out).suffix.lower() == ".png":
        raise UsageError("--prompts-file writes several images; give a folder as --out")
    plan_paths(args.out, args.batch, args.overwrite)
    loras = [parse_lora_arg(x) for x in args.lora]
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir} is not a folder")
    vetting = LoraSet(None, args.lora_dir, args.allow_pickle)
    loras = [vetting.spec(l) for l in loras]
    for prompt in prompts:  # <lora:NAME:W> in a prompt names a file of --lora-dir: found and vetted now
        vetting.tagged(extract_loras(prompt)[1])
    options = speed_options(args)

    # 2. Under `accelerate launch`/torchrun: this process's share of the prompts, named as one process would
    share = _distributed_share(args, len(prompts))
    seed = None if args.seed == -1 else args.seed
    todo = list(range(len(prompts)))
    if share is not None:
        state, mine, _, seed = share
        todo = [i for i in todo if i in mine]
        args.device = str(state.device) if args.device == "auto" else args.device
        args.quiet = args.quiet or not state.is_main_process

    # 3. Load once
    pipe = load_pipeline(args, args.task)
    set_autoguidance(pipe, args)
    pipe.loras.lora_dir, pipe.loras.allow_pickle = vetting.lora_dir, args.allow_pickle
    return _Job(pipe, prompts, todo, inputs, loras, options, seed, share)


def _generate(args, job: _Job) -> None:
    """4. Each prompt of this process, one bar across them all; written paths on stdout."""
    # deferred: torch; --help must not import it
    from t2i import speed
    from t2i.output import save_images

    bar = progress_bar(args, "generating")
    try:
        with speed.apply(job.pipe, job.options) if job.options else contextlib.nullcontext():
            for i in job.todo:
                result = job.pipe(job.prompts[i], **job.inputs, negative_prompt=args.negative_prompt,
                                  steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=job.seed,
                                  width=args.width, height=args.height, batch=args.batch, loras=job.loras,
                                  progress=bar)
                names = None
                if job.share is not None:
                    first_number = job.share[2]
                    names = [f"{first_number + i * args.batch + j:05d}-{s.seed}.png"
                             for j, s in enumerate(result.settings)]
                paths = save_images(result.images, result.settings, args.out, overwrite=args.overwrite, names=names)
                if bar and i == job.todo[-1]:
                    bar.close()  # the finished bar first, the last paths below it
                print_paths(paths, bar)
    finally:
        if bar:
            bar.close()
    if job.share is not None:
        job.share[0].wait_for_everyone()


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


def _check_image_inputs(args) -> dict:
    """img2img/inpaint: the init image and mask decode, strength and blur are in range; the pipeline's arguments."""
    # deferred: torch and PIL; --help must not import them
    from t2i import guards
    from t2i.images import as_mask, check_mask, read_input

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
