"""One request path: a generation job as every front end states it, checked once, run by one function.

The CLI (`t2i generate`, `img2img`, `inpaint`), the server and a user's Python build a
`Request`. `check` validates everything that can be checked without a model, so bad
input fails in one line before anything loads, and returns a `Job`: the request with
its LoRAs vetted, its speed options parsed and its input images decoded. `run` makes
the job's images on a loaded pipeline, one call per prompt and iteration, and yields
each call's `Result`; the images go to one writer (`t2i.output.save_images` or
`png_bytes`) with the same metadata whoever asked.

    job = jobs.check(jobs.Request(["a red circle"], seed=1, batch=4))
    pipe = jobs.load(job)
    for result in jobs.run(pipe, job):
        output.save_images(result.images, result.settings, "outputs")
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

from PIL import Image

from t2i import dynamic_prompts, guards, metadata, models, samplers, speed
from t2i.embeddings import EmbeddingSet, model_folder_dir
from t2i.errors import UsageError
from t2i.images import as_mask, check_mask, read_input
from t2i.lora import LoraSet, parse_lora_arg
from t2i.models import tiny_vae
from t2i.devices import resolve_device, resolve_dtype
from t2i.models.vae import resolve_vae
from t2i.pipelines import BasePipeline, Image2Image, Inpaint, Text2Image
from t2i.pipelines.hires import Hires, plan as hires_plan
from t2i.prompts import extract_loras
from t2i.settings import LoraSpec, Settings

TASKS = {"text2image": Text2Image, "image2image": Image2Image, "inpaint": Inpaint}


@dataclass
class Request:
    """A generation job in the words of its front end; every field has the CLI's default."""

    prompts: list[str]
    task: str = "text2image"  # text2image | image2image | inpaint
    negative_prompt: str | None = None  # None: the model's
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None  # t2i or A1111 name
    seed: int = -1  # the first image's seed; -1: random (recorded)
    width: int | None = None
    height: int | None = None
    batch: int = 1  # images per call: image i has seed + i
    iterations: int = 1  # calls per prompt (A1111's n_iter): call k starts at seed + k * batch
    loras: list[str | LoraSpec] = field(default_factory=list)  # "FILE[:SCALE]"
    lora_dir: str | Path | None = None  # where <lora:NAME:W> in a prompt finds NAME.safetensors
    init_image: str | Path | Image.Image | None = None  # image2image and inpaint
    strength: float = 0.75
    mask: str | Path | Image.Image | None = None  # inpaint: white is redrawn
    mask_blur: int = 4
    invert_mask: bool = False
    autoguidance: float | None = None  # None: the model's
    speed: str = "auto"  # "auto" (faster on this device at no quality cost), "exact" (= ""), or option names
    model: str | None = None  # None: the bundled model
    model_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    # A1111's everyday set (issue 29)
    clip_skip: int = 1  # 1 = the text encoder's last layer, 2 = the one before (SD 1.x; see BasePipeline.clip_skip)
    vae: str | Path | None = None  # a diffusers VAE folder, a weights file or a name in vae_dir; None: the model's
    vae_dir: str | Path | None = None  # where a VAE given by name is found (A1111's models/VAE)
    hires: Hires | None = None  # text2image: A1111's hires fix (t2i.pipelines.hires)
    # dynamic prompts ({red|blue}, __wildcard__; t2i.dynamic_prompts): "off" keeps prompts as written (the
    # server's default), "random" resolves each image's prompt from its seed, "combinatorial" makes every
    # combination of each prompt (each one a prompt of its own, starting at the seed)
    dynamic_prompts: str = "off"
    wildcard_dir: str | Path | None = None  # where __NAME__ finds NAME.txt
    # A1111's schedule type beside the sampler (t2i.samplers.SCHEDULES key or label); None: automatic, the
    # sampler's own in A1111 1.9+ (Karras for DPM++ 2M)
    scheduler: str | None = None
    # textual inversion: where an embedding's name in a prompt finds NAME.safetensors (the model folder's
    # embeddings/ is searched after it)
    embedding_dir: str | Path | None = None


@dataclass
class Job:
    """A checked request: what `run` needs, nothing left to fail on before the model."""

    request: Request
    loras: list[LoraSpec]
    options: speed.SpeedOptions | None
    inputs: dict  # the task's own arguments of the pipeline call (init image, mask, strength, ...)
    source: models.ModelSource
    vae: Path | None = None  # the request's VAE, vetted
    hires: Hires | None = None  # the request's hires fix, checked
    # dynamic prompts: the template each of request.prompts comes from ("" for a prompt as written); with
    # "combinatorial", request.prompts are the combinations (the Job's own copy of the request)
    templates: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        r = self.request
        return len(r.prompts) * r.iterations * r.batch


def check(request: Request) -> Job:
    """Everything checkable without the model, in the order a user fixes them; one-line UsageErrors."""
    r = request
    if r.task not in TASKS:
        raise UsageError(f"unknown task {r.task!r}; use one of: {', '.join(TASKS)}")
    if not r.prompts or not all(isinstance(p, str) for p in r.prompts):
        raise UsageError("give at least one prompt (a string)")
    guards.check_sampling(r.steps, r.guidance, r.autoguidance, r.sampler)
    _check_schedule(r)
    guards.check_batch(r.batch)
    if r.iterations < 1:
        raise UsageError(f"iterations must be 1 or more, got {r.iterations}")
    if r.seed != -1:
        guards.check_seed(r.seed)
        if r.seed + r.iterations * r.batch - 1 > guards.MAX_SEED:
            raise UsageError(f"seed {r.seed} + {r.iterations * r.batch} images runs past 2**64-1; use a smaller seed")
    if r.width is not None or r.height is not None:
        guards.check_size(r.width or 8, r.height or 8)
    r, templates = _dynamic_prompts(r)
    source = models.resolve(r.model)
    inputs = _image_inputs(r)
    loras = _loras(r)
    options = _speed_options(r, source)
    guards.check_clip_skip(r.clip_skip, _text_encoder_depth(source))
    vae = resolve_vae(r.vae, r.vae_dir, r.allow_pickle) if r.vae else None
    hires = _hires(r, source)
    _embeddings(r, source)
    return Job(r, loras, options, inputs, source, templates=templates, vae=vae, hires=hires)


def _text_encoder_depth(source: models.ModelSource) -> int | None:
    """The layers of a model folder's text encoder (what clip skip can skip), or None before loading."""
    if source.kind not in ("bundled", "folder"):
        return None
    try:
        return int(json.loads((Path(source.location) / "text_encoder" / "config.json").read_text())
                   ["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the loader says what is wrong with the folder


def _hires(r: Request, source: models.ModelSource) -> Hires | None:
    """The hires fix checked: text2image only, its settings in range, and, where the size and the model's
    configs are known before loading, its size within the memory budget."""
    if r.hires is None:
        return None
    if r.task != "text2image":
        raise UsageError(f"hires fix is for text2image; {r.task} takes no hires settings")
    hires = r.hires.checked()
    if r.width is None or r.height is None or source.kind not in ("bundled", "folder"):
        return hires  # the pipeline checks it once the model's native size is known
    try:
        folder = Path(source.location)
        configs = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae")}
        f = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        device = resolve_device(r.device)
        sizing = SimpleNamespace(  # what BasePipeline.memory_estimate reads, from the configs alone
            vae_scale_factor=f, exact_batch=True, dtype=resolve_dtype(r.dtype, device),
            pipe=SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(**configs["unet"])),
                                 vae=SimpleNamespace(config=SimpleNamespace(**configs["vae"]))))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return hires  # the loader says what is wrong with the folder; the pipeline checks memory
    plan = hires_plan(hires, r.width, r.height, f)
    try:
        need = BasePipeline.memory_estimate(sizing, r.batch, plan.out_w, plan.out_h)
    except (TypeError, AttributeError, IndexError):
        return hires  # an odd config: the pipeline checks memory once loaded
    guards.check_memory(need, device, f"the hires size {plan.out_w}x{plan.out_h} is too large: use a smaller "
                                      "hires scale or size, or a smaller batch")
    return hires


def _check_schedule(r: Request) -> None:
    """The schedule is one t2i runs, and runs with the sampler (the model's default sampler, when none is
    named, is checked once it is known)."""
    if r.sampler:
        samplers.resolve(r.sampler, r.scheduler)  # also a schedule in the sampler's name ("Euler Simple")
    elif r.scheduler:
        samplers.get_schedule(r.scheduler)


def _image_inputs(r: Request) -> dict:
    """image2image/inpaint: the init image and mask decode, strength and blur are in range; the call's arguments."""
    if r.task == "text2image":
        return {}
    if r.init_image is None:
        raise UsageError(f"{r.task} needs an init image")
    read_input(r.init_image, "init image")
    guards.check_strength(r.strength)
    if r.steps is not None and int(r.steps * r.strength) < 1:
        raise UsageError(f"strength {r.strength:g} of {r.steps} steps runs no denoising step; "
                         f"use a strength of {1 / r.steps:.2g} or more, or more steps")
    inputs = {"init_image": r.init_image, "strength": r.strength}
    if r.task == "inpaint":
        if r.mask is None:
            raise UsageError("inpaint needs a mask (white = redraw)")
        check_mask(read_input(r.mask, "mask", convert=as_mask)[0], r.invert_mask)
        if r.mask_blur < 0:
            raise UsageError(f"mask blur must be 0 or more pixels, got {r.mask_blur}")
        inputs |= {"mask": r.mask, "mask_blur": r.mask_blur, "invert_mask": r.invert_mask}
    return inputs


def _loras(r: Request) -> list[LoraSpec]:
    """The LoRA arguments vetted (files exist, safetensors unless pickles are allowed), and every
    `<lora:NAME:W>` of the prompts found in the LoRA folder: a missing one fails here, not after loading."""
    if r.lora_dir is not None and not Path(r.lora_dir).is_dir():
        raise UsageError(f"the LoRA folder {r.lora_dir} is not a folder")
    vetting = LoraSet(None, r.lora_dir, r.allow_pickle)
    specs = [vetting.spec(parse_lora_arg(x) if isinstance(x, str) else x) for x in r.loras]
    for prompt in r.prompts:
        vetting.tagged(extract_loras(prompt)[1])
    return specs


def embedding_set(r: Request, model_path: str | Path | None) -> EmbeddingSet:
    """The embeddings a request's prompts can call: its embedding folder, then the model folder's embeddings/."""
    dirs = [Path(d) for d in (r.embedding_dir, model_folder_dir(model_path)) if d]
    return EmbeddingSet(dirs, allow_pickle=r.allow_pickle)


def _embeddings(r: Request, source: models.ModelSource) -> None:
    """The embedding folder exists, and every embedding file the prompts may call reads (safetensors unless
    pickles are allowed, a known layout, finite vectors): a broken or hostile one fails here, not after loading."""
    if r.embedding_dir is not None and not Path(r.embedding_dir).is_dir():
        raise UsageError(f"the embedding folder {r.embedding_dir} is not a folder")
    negative = [r.negative_prompt] if r.negative_prompt else []
    embedding_set(r, source.location if source.kind != "hub" else None).vet([extract_loras(p)[0] for p in r.prompts] + negative)


def _speed_options(r: Request, source: models.ModelSource) -> speed.SpeedOptions | None:
    """The parsed speed options (None: the plain, exact path), refused here if they cannot run."""
    if not r.speed:
        return None
    options = speed.SpeedOptions.parse(r.speed)
    if options.cpu_offload and r.device in ("cpu", "mps"):
        raise UsageError(f"speed option cpu_offload needs a CUDA device, not {r.device}; leave it off")
    if options.tiny_vae is not None:  # the small decoder exists
        tiny_vae.tiny_vae_folder(options.tiny_vae, Path(source.location) if source.kind != "hub" else None)
    return options


def _dynamic_prompts(r: Request) -> tuple[Request, list[str]]:
    """Each prompt that is a dynamic-prompt template checked (grammar, wildcard files); with "combinatorial" the
    request's prompts replaced by every combination (a copy of the request). Returns (request, templates)."""
    if r.dynamic_prompts not in dynamic_prompts.MODES:
        raise UsageError(f"unknown dynamic prompts mode {r.dynamic_prompts!r}; use one of: "
                         f"{', '.join(dynamic_prompts.MODES)}")
    if r.dynamic_prompts == "off":
        return r, []
    templates = ["" if not dynamic_prompts.is_template(p) else p for p in r.prompts]
    for t in dict.fromkeys(filter(None, templates)):
        dynamic_prompts.check(t, r.wildcard_dir)
    if r.dynamic_prompts == "random" or not any(templates):
        return r, templates
    prompts, expanded = [], []
    for p, t in zip(r.prompts, templates):
        combos = dynamic_prompts.combinations(t, r.wildcard_dir) if t else [p]
        prompts += combos
        expanded += [t] * len(combos)
        if len(prompts) > dynamic_prompts.MAX_COMBINATIONS:
            raise UsageError(f"the prompts make more than {dynamic_prompts.MAX_COMBINATIONS} combinations; use "
                             "fewer variants, or leave out --combinatorial (one random combination per image)")
    return dataclasses.replace(r, prompts=prompts), expanded


def load(job: Job):
    """The pipeline of the job's task over its model (`from_pretrained`), set up as the job asks."""
    r = job.request
    pipe = TASKS[r.task].from_pretrained(r.model, device=r.device, dtype=r.dtype, allow_pickle=r.allow_pickle,
                                         model_config=r.model_config)
    return prepare(pipe, job)


def prepare(pipe, job: Job):
    """An already loaded pipeline made ready for the job: its task's class over the same modules, the job's
    LoRA folder and autoguidance. Returns the pipeline to run."""
    r = job.request
    if pipe.task != r.task:
        pipe = TASKS[r.task].from_pipe(pipe)
    if r.autoguidance is not None:
        pipe.autoguidance = r.autoguidance  # refuses a scale > 0 on a model without a guide/ UNet
    pipe.speed = r.speed or "exact"  # its calls' speed mode when no speed.apply block is on (the server's calls)
    pipe.loras.lora_dir = Path(r.lora_dir) if r.lora_dir else None
    pipe.loras.allow_pickle = r.allow_pickle
    pipe.clip_skip = r.clip_skip  # refuses a clip skip beyond the text encoder's layers
    pipe.set_vae(job.vae, allow_pickle=r.allow_pickle)  # None: the model's own (a shared pipeline gets it back)
    pipe.embeddings = embedding_set(r, pipe.model.path)
    return pipe


def calls(job: Job) -> Iterator[tuple[int, str, int | None]]:
    """(prompt index, prompt, first seed) of each pipeline call: each prompt starts at the request's seed
    (a random one per prompt when it is -1), its iterations at seed + k * batch."""
    r = job.request
    for i, prompt in enumerate(r.prompts):
        seed = r.seed if r.seed != -1 else (random.randrange(2**32) if r.iterations > 1 else None)
        for k in range(r.iterations):
            yield i, prompt, None if seed is None else seed + k * r.batch


def run(pipe, job: Job, progress=None, only: Callable[[int], bool] | None = None) -> Iterator:
    """Make the job's images on `pipe` (from `load` or `prepare`): one `Result` per call, in order.

    `progress`: a tqdm bar shared by the calls, True for one of the pipeline's own, None/False for none.
    `only(prompt_index)` picks this process's prompts when several share a job. A step callback of the
    pipeline (`pipe.on_step`) may raise to stop the job between two steps.
    """
    with speed.apply(pipe, job.options or speed.SpeedOptions.off()):  # None: the exact path
        for i, prompt, seed in calls(job):
            if only is None or only(i):
                yield call(pipe, job, prompt, seed, progress, template=job.templates[i] if job.templates else "")


def call(pipe, job: Job, prompt: str, seed: int | None, progress=None, template: str = ""):
    """One pipeline call of the job (see `calls`): `batch` images from `seed` on (None: a random seed).
    The job's speed options must already be on (`run` turns them on for all its calls).
    `template`: the dynamic prompt `prompt` comes from (`job.templates`; see `_call_template`)."""
    r = job.request
    if template:
        return _call_template(pipe, job, template, prompt, seed, progress)
    return pipe(prompt, **job.inputs, negative_prompt=r.negative_prompt, steps=r.steps, guidance=r.guidance,
                sampler=r.sampler, seed=seed, width=r.width, height=r.height, batch=r.batch, loras=job.loras,
                scheduler=r.scheduler, progress=progress, **({"hires": job.hires} if job.hires is not None else {}))


def _call_template(pipe, job: Job, template: str, prompt: str, seed: int | None, progress):
    """A call whose prompt comes from a dynamic-prompt template, recorded in each image's settings. Under
    "random" each image's prompt is resolved from its own seed: images that resolve alike share a call."""
    r = job.request
    if r.dynamic_prompts != "random":
        groups = [(prompt, r.batch)]  # a combination, already resolved
    else:
        seed = random.randrange(2**32) if seed is None else seed  # the prompts need the seeds now
        resolved = dynamic_prompts.resolve_many(template, [seed + j for j in range(r.batch)], r.wildcard_dir)
        groups = [(text, len(list(same))) for text, same in itertools.groupby(resolved)]
    images, settings, first = [], [], 0
    for text, n in groups:
        part = dataclasses.replace(job, request=dataclasses.replace(r, batch=n))
        result = call(pipe, part, text, None if seed is None else seed + first, progress)
        images += result.images
        settings += [dataclasses.replace(s, prompt_template=template) for s in result.settings]
        first += n
    return dataclasses.replace(result, images=images, settings=settings)


def png_bytes(image: Image.Image, settings: Settings) -> bytes:
    """The PNG `t2i.output.save_images` writes, in memory: the same `parameters` and `t2i` chunks."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=metadata.png_info(settings))
    return buf.getvalue()
