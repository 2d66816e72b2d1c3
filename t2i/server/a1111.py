"""AUTOMATIC1111's HTTP API, /sdapi/v1/...: its route names, field names and response shapes.

Requests are pydantic models (a wrong type is a 422 naming the field); unknown
keys are accepted and ignored, as A1111 does, because clients send many.
A1111 fields t2i does not implement are listed in UNSUPPORTED: each is accepted
at its default (or at a value that means the same) and refused with a 422
naming it at any other value, never silently ignored.

Where A1111's default is a property of the model (steps, CFG scale, size,
sampler), an omitted field takes the loaded model's recommended value, as
`t2i generate` does; clients that send them (all of the common ones) get exactly
what they ask for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import random
import time
from typing import Any, Callable

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from t2i.guards import check_clip_skip
from t2i.models.vae import vae_names
from t2i.pipelines.hires import UPSCALERS, Hires, plan as hires_plan
from t2i.server import engine as core
from t2i.server.queue import INTERRUPTED, QUEUED, RUNNING, Job, JobError, QueueFull, b64, new_id

router = APIRouter(prefix="/sdapi/v1", tags=["A1111"])

# --------------------------------------------------------------------------- request models


class _Request(BaseModel):
    """Fields shared by txt2img and img2img, with A1111's names and defaults."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="A1111 or t2i sampler name (GET /samplers); default: the model's")
    scheduler: str | None = Field(None, description="schedule type (GET /schedulers): Automatic (the sampler's own in A1111 "
                                                        "1.9+), Uniform, Karras, Exponential, SGM Uniform, Normal, Beta")
    sampler_index: str | None = Field(None, description="old name of sampler_name")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = Field(None, description="default: the model's (20 for most)")
    cfg_scale: float | None = Field(None, description="default: the model's")
    width: int | None = Field(None, description="default: the model's native size")
    height: int | None = Field(None, description="default: the model's native size")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    clip_skip: int | None = None  # not A1111's (it is an option there); some clients send it
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = Field(None, description="the job's id (else one is assigned; see info.task_id)")
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75  # used by hires fix only
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int | bool = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs with the `parameters` and `t2i` chunks")
    parameters: dict
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, ...")


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


# --------------------------------------------------------------------------- what t2i does not implement


def _off(*accepted) -> Callable[[Any, Any], bool]:
    return lambda value, req: value in accepted


def _eta(value, req) -> bool:
    """eta scales an ancestral sampler's noise: t2i's ancestral samplers run at A1111's default 1, DDIM at its
    default 0; on deterministic samplers eta has no effect (as in A1111)."""
    if value is None:
        return True
    sampler = req.get("_t2i_sampler") or ""
    if sampler == "ddim":
        return value == 0
    if core.SAMPLERS.get(sampler) is not None and core.SAMPLERS[sampler].stochastic:
        return value == 1
    return True


_ANY = lambda value, req: True  # noqa: E731


def _same_sampler(name, req) -> bool:
    try:
        return resolve_sampler(name, None) == req.get("_t2i_sampler")
    except HTTPException:
        return False


def _hr(*accepted) -> Callable[[Any, Any], bool]:
    """A hires fix field: anything while enable_hr is off (A1111 ignores it then), else one of `accepted`."""
    return lambda value, req: not req.get("enable_hr") or value in accepted

# field -> (is this value one t2i honours?, what t2i lacks). One table, so the refusals are all in one place.
UNSUPPORTED: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "restore_faces": (_off(False, None), "face restoration is not implemented in t2i"),
    "tiling": (_off(False, None), "tiling is not implemented in t2i"),
    "styles": (_off(None, []), "prompt styles are not implemented in t2i; put the words in the prompt"),
    "subseed_strength": (_off(0, None), "variation seeds are not implemented in t2i; leave subseed_strength 0"),
    "seed_resize_from_h": (lambda v, r: v is None or v <= 0, "seed resize is not implemented in t2i"),
    "seed_resize_from_w": (lambda v, r: v is None or v <= 0, "seed resize is not implemented in t2i"),
    "eta": (_eta, "t2i's samplers run at A1111's default eta (1 for ancestral samplers, 0 for DDIM)"),
    "s_min_uncond": (_off(None, 0), "negative guidance minimum sigma is not implemented in t2i"),
    "s_churn": (_off(None, 0), "sigma churn is not implemented in t2i"),
    "s_tmin": (_off(None, 0), "sigma tmin is not implemented in t2i"),
    "s_tmax": (lambda v, r: v in (None, 0) or v == math.inf, "sigma tmax is not implemented in t2i"),
    "s_noise": (_off(None, 1), "sigma noise is not implemented in t2i"),
    "refiner_checkpoint": (_off(None, "", "None"), "refiners are not implemented in t2i"),
    "disable_extra_networks": (_off(False), "t2i always reads <lora:...> tags"),
    "firstpass_image": (_off(None, ""), "a given first-pass image is not implemented in t2i; leave it out and "
                                        "t2i makes the first pass"),
    # hires fix: t2i's second pass runs the first pass's model, sampler, prompts and CFG scale
    "hr_checkpoint_name": (_hr(None, "", "Use same checkpoint"), "the hires pass runs the same checkpoint"),
    "hr_sampler_name": (lambda v, r: not r.get("enable_hr") or v in (None, "", "Use same sampler")
                        or _same_sampler(v, r), "the hires pass runs the same sampler"),
    "hr_scheduler": (_hr(None, "", "Use same scheduler", "Automatic", "automatic"),
                     "the hires pass runs the same scheduler"),
    "hr_prompt": (lambda v, r: not r.get("enable_hr") or v in ("", r.get("prompt")), "the hires pass runs the "
                                                                                     "same prompt"),
    "hr_negative_prompt": (lambda v, r: not r.get("enable_hr") or v in ("", r.get("negative_prompt")),
                           "the hires pass runs the same negative prompt"),
    "hr_cfg": (lambda v, r: not r.get("enable_hr") or v is None or v == r.get("cfg_scale"),
               "the hires pass runs the same CFG scale"),
    "firstphase_width": (_hr(0), "the old hires fix sizes are not implemented; send width/height and hr_scale"),
    "firstphase_height": (_hr(0), "the old hires fix sizes are not implemented; send width/height and hr_scale"),
    "script_name": (_off(None, ""), "scripts are not implemented in t2i (GET /scripts lists none)"),
    "alwayson_scripts": (lambda v, r: not _other_scripts(v), "scripts and extensions are not implemented in t2i "
                                                             "(but for Dynamic Prompts' on/off: see docs/server.md)"),
    "infotext": (_off(None, ""), "setting fields from infotext is not implemented in t2i; send the fields"),
    # img2img
    "resize_mode": (_off(0), "t2i resizes the init image to the output size (resize_mode 0, just resize)"),
    "mask_round": (_off(True), "t2i rounds no mask; leave mask_round true"),
    "inpainting_fill": (_off(0, 1), "t2i starts the masked area from the init image (inpainting_fill 1, "
                                    "original; A1111's API default 0 is taken as 1)"),
    "initial_noise_multiplier": (_off(None, 1), "t2i's noise is not scaled; leave initial_noise_multiplier 1"),
    "latent_mask": (_off(None, ""), "a separate latent mask is not implemented in t2i"),
}


def _unsupported(req: _Request, sampler: str | None) -> None:
    """422 naming the first field set to something t2i does not do (see UNSUPPORTED)."""
    fields = set(type(req).model_fields)
    context = {**req.model_dump(), "_t2i_sampler": sampler}  # what the checks may look at besides the value
    for name, (ok, why) in UNSUPPORTED.items():
        if name in fields and not ok(getattr(req, name), context):
            raise _field_error(name, f"{name}={json.dumps(getattr(req, name))} is not supported: {why}")


def _field_error(field: str, message: str, status: int = 422) -> HTTPException:
    return HTTPException(status, [{"loc": ["body", field], "msg": message, "type": "value_error.t2i"}])


# --------------------------------------------------------------------------- request -> job


SCHEDULERS = {k: s.label for k, s in core.SCHEDULES.items() if s.a1111}  # A1111 key -> label (GET /schedulers)


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """A1111's sampler_name plus scheduler (1.9+), or a combined old name -> (t2i sampler, schedule).

    Names are case-free; a scheduler may be a key ("sgm_uniform") or a label ("SGM Uniform"). "Automatic" (or
    none) is the sampler's own schedule in A1111 1.9+ (Karras for DPM++ 2M); the one that ran is in the infotext.
    Without a sampler_name, the model's default sampler runs with the scheduler (checked once it is known)."""
    field = "sampler_name"
    try:
        if name:
            core.get_sampler(name)  # an unknown sampler is the sampler's fault; the rest, the scheduler's
        field = "scheduler"
        if not name:
            return None, None if scheduler is None else core.get_schedule(scheduler).name
        return core.resolve(name, scheduler)
    except core.UsageError as e:
        raise _field_error(field, f"{e}; GET /sdapi/v1/samplers and /schedulers list them") from None


def _decode_b64(text: str, field: str) -> bytes:
    """Bare base64 or a data: URL -> bytes."""
    if not isinstance(text, str) or not text:
        raise _field_error(field, f"{field} must be a base64 image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise _field_error(field, f"{field} is not valid base64") from None


def _image(text: str, field: str, mask: bool = False):
    try:
        return core.decode_image(_decode_b64(text, field), field, mask=mask)
    except core.UsageError as e:
        raise _field_error(field, str(e)) from None


def checkpoint_for(server, req: _Request):
    """The checkpoint a request runs on: override_settings' sd_model_checkpoint, or the selected one."""
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    if override:
        found = server.registry.find_checkpoint(override)
        if found is None:
            raise _field_error("override_settings", f"unknown checkpoint {override!r}; GET /sdapi/v1/sd-models "
                                                    "lists those this server has", status=404)
        return found
    return server.registry.checkpoints[server.selected]


def check_override_settings(server, settings: dict | None) -> None:
    """override_settings: the checkpoint may differ; every other option must keep its value."""
    current = options(server)
    for key, value in (settings or {}).items():
        if key in ("sd_model_checkpoint", *PER_REQUEST_OPTIONS):
            continue
        if key not in current:
            raise _field_error("override_settings", f"option {key!r} is not one t2i has (GET /sdapi/v1/options)")
        if not _same(current[key], value, key):
            raise _field_error("override_settings", f"option {key}={json.dumps(value)} is not supported; "
                                                    f"t2i runs with {json.dumps(current[key])}")


EQUIVALENT = {"sd_vae": {"automatic", "none", ""}}  # A1111's "None" VAE is the model's own, as "Automatic" here


def _same(a, b, key: str = "") -> bool:
    if key in EQUIVALENT and isinstance(b, str) and b.lower() in EQUIVALENT[key]:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def check_limits(server, checkpoint, width, height, steps, images) -> None:
    """Size, steps and count within the server's limits (4xx before anything is queued)."""
    lim = server.limits
    d = server.model_defaults(checkpoint.name)
    width, height, steps = width or d["width"], height or d["height"], steps or d["steps"]
    for field, value in (("width", width), ("height", height)):
        if value > lim.max_side:
            raise _field_error(field, f"{field} {value} is over this server's limit of {lim.max_side}")
        try:
            core_check_size(value)
        except core.UsageError as e:
            raise _field_error(field, str(e)) from None
    if steps < 1 or steps > lim.max_steps:
        raise _field_error("steps", f"steps must be 1..{lim.max_steps}, got {steps}")
    if images > lim.max_images:
        raise _field_error("batch_size", f"batch_size x n_iter = {images} images; this server makes at most "
                                         f"{lim.max_images} per request")
    cost = width * height * steps * images
    if cost > lim.max_pixel_steps:
        raise _field_error("steps", f"width x height x steps x images = {cost} is over this server's budget of "
                                    f"{lim.max_pixel_steps}; ask for fewer steps, images or pixels", status=413)


def core_check_size(value: int, multiple: int = 8) -> None:
    if value < multiple or value % multiple:
        lo = value - value % multiple
        raise core.UsageError(f"{value} is not a multiple of {multiple}; use "
                              f"{lo if lo >= multiple else multiple}" + (f" or {lo + multiple}" if lo >= multiple else ""))


def check_loras(server, prompt: str) -> None:
    """Every <lora:NAME:W> in the prompt is a file of --lora-dir, by name."""
    for name in core.lora_names_in(prompt):
        if name not in server.registry.loras:
            where = "this server has no --lora-dir" if server.config.lora_dir is None else \
                "GET /sdapi/v1/loras lists those in --lora-dir"
            raise _field_error("prompt", f"unknown LoRA {name!r} in <lora:{name}:...>; {where}")


def build_request(server, req: _Request, task: str, images=None,
                  dynamic: str | None = None) -> tuple[core.GenRequest, Any]:
    """Check a txt2img/img2img request whole, before any compute; the job's request and its checkpoint."""
    sampler, schedule = resolve_sampler(req.sampler_name or req.sampler_index or None, req.scheduler)
    _unsupported(req, sampler)
    check_override_settings(server, req.override_settings)
    checkpoint = checkpoint_for(server, req)
    everyday = everyday_fields(server, req, checkpoint)
    if req.batch_size < 1 or req.n_iter < 1:
        raise _field_error("batch_size" if req.batch_size < 1 else "n_iter", "batch_size and n_iter must be at least 1")
    if req.cfg_scale is not None and (not math.isfinite(req.cfg_scale) or req.cfg_scale < 0):
        raise _field_error("cfg_scale", f"cfg_scale must be a finite number >= 0, got {req.cfg_scale}")
    width, height = req.width, req.height
    if images is not None and (width is None or height is None):  # img2img: the init image's size, as the
        init = images["init"]                                         # pipeline will take it (snapped to 8)
        width = width or max(8, round(init.width * (height or init.height) / init.height / 8) * 8)
        height = height or max(8, round(init.height * width / init.width / 8) * 8)
    check_limits(server, checkpoint, width, height, req.steps, req.batch_size * req.n_iter)
    if req.seed != -1 and not 0 <= req.seed <= 2**64 - 1 - req.batch_size * req.n_iter:
        raise _field_error("seed", f"seed {req.seed} is out of range; use 0 .. 2**64-1 (or -1 for a random seed)")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(req, field)) > server.limits.max_prompt:
            raise _field_error(field, f"{field} is {len(getattr(req, field))} characters; this server takes at most "
                                      f"{server.limits.max_prompt}", status=413)
    check_loras(server, req.prompt)
    check_loras(server, req.negative_prompt)
    if dynamic is None:  # the routes check a template on a worker thread first and pass its mode
        dynamic = dynamic_prompts_mode(server, req)
    if req.save_images and server.config.out is None:
        raise _field_error("save_images", "this server saves nowhere: start it with --out DIR")
    seed = req.seed if req.seed != -1 else random.randrange(4294967294)  # A1111's range for a random seed
    gen = core.GenRequest(task="text2image", prompt=req.prompt, negative_prompt=req.negative_prompt,
                          steps=req.steps, guidance=req.cfg_scale, sampler=sampler, seed=seed, width=req.width,
                          height=req.height, batch_size=req.batch_size, n_iter=req.n_iter, model=checkpoint.name,
                          save=server.config.out is not None, scheduler=schedule)
    gen.clip_skip, gen.vae, gen.hires = everyday["clip_skip"], everyday["vae"], everyday["hires"]
    gen.dynamic_prompts = dynamic
    gen.wildcard_dir = str(server.config.wildcard_dir) if server.config.wildcard_dir else None
    if images is not None:
        gen.task, gen.init_image, gen.strength = images["task"], images["init"], req.denoising_strength
        if images.get("mask") is not None:
            gen.mask, gen.mask_blur, gen.invert_mask = images["mask"], images["blur"], images["invert"]
    return gen, checkpoint


async def decode_img2img(req: Img2ImgRequest) -> dict:
    """The init image and mask of an img2img request, decoded off the event loop."""
    if not req.init_images:
        raise _field_error("init_images", "img2img needs an init image (init_images: [base64 PNG])", status=400)
    if len(req.init_images) > 1:
        raise _field_error("init_images", "t2i takes one init image per request")
    if req.denoising_strength is None or not 0 < req.denoising_strength <= 1:
        raise _field_error("denoising_strength", f"denoising_strength must be in (0, 1], got {req.denoising_strength}")
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
        raise _field_error("mask_blur_y", "t2i blurs the mask evenly; give mask_blur_x = mask_blur_y (or mask_blur)")
    if blur < 0:
        raise _field_error("mask_blur", f"mask_blur must be 0 or more pixels, got {blur}")
    init = await run_in_threadpool(_image, req.init_images[0], "init_images")
    out = {"task": "image2image", "init": init}
    if req.mask:
        mask = await run_in_threadpool(_image, req.mask, "mask", True)
        invert = bool(req.inpainting_mask_invert)
        try:
            core.check_mask(mask, invert)
        except core.UsageError as e:
            raise _field_error("mask", str(e)) from None
        out |= {"task": "inpaint", "mask": mask, "blur": blur, "invert": invert}
    return out


# --------------------------------------------------------------------------- running a job


def new_job(server, gen: core.GenRequest, checkpoint, echo: dict, force_task_id: str | None) -> Job:
    job_id = force_task_id if force_task_id else new_id()
    if not 0 < len(job_id) <= 128 or not job_id.isprintable():
        raise _field_error("force_task_id", "force_task_id must be 1..128 printable characters")
    job = Job(job_id, "generate", gen, meta={"checkpoint": checkpoint, "echo": echo})
    job.iterations = gen.n_iter
    return job


def submit(server, job: Job) -> Job:
    try:
        return server.queue.submit(job)
    except QueueFull as e:
        raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except JobError as e:
        raise HTTPException(e.status, e.message) from None


async def wait_for(server, job: Job, request: Request | None) -> Job:
    """Await a job; if the client goes away first, drop it (queued) or interrupt it (running)."""
    done = asyncio.wrap_future(job.future)
    while True:
        finished, _ = await asyncio.wait({done}, timeout=0.25)
        if finished:
            break
        if request is not None and await request.is_disconnected():
            server.queue.cancel(job)
            break
    try:
        return await done
    except JobError as e:
        raise HTTPException(e.status, e.message) from None


def _extra_params(s0) -> dict:
    """A1111's extra_generation_params: the schedule type that ran (as its infotext says it)."""
    schedule = core.a1111_names(s0.sampler, s0.scheduler)[1] if s0 else None
    return {"Schedule type": schedule} if schedule else {}


def result(server, job: Job) -> dict:
    """A1111's response: images (bare base64), the echoed request, and info as a JSON string."""
    gen: core.GenRequest = job.request
    out = job.output or core.Output(interrupted=job.state == INTERRUPTED)
    s0 = out.settings[0] if out.settings else None
    seeds = [gen.seed + i for i in range(gen.images)]
    infotexts = [core.metadata.a1111_parameters(s) for s in out.settings]
    checkpoint = job.meta["checkpoint"]
    echo = job.meta["echo"]
    info = {
        "prompt": gen.prompt, "all_prompts": _all_prompts(gen, out),  # dynamic prompts: each image's own
        "negative_prompt": gen.negative_prompt, "all_negative_prompts": [gen.negative_prompt] * gen.images,
        "seed": gen.seed, "all_seeds": seeds, "subseed": echo.get("subseed", -1),
        "all_subseeds": [echo.get("subseed", -1)] * gen.images, "subseed_strength": 0,
        "width": s0.width if s0 else gen.width, "height": s0.height if s0 else gen.height,
        "sampler_name": core.a1111_names(s0.sampler, s0.scheduler)[0] if s0 else echo.get("sampler_name"),
        "cfg_scale": s0.guidance if s0 else gen.guidance, "steps": s0.steps if s0 else gen.steps,
        "batch_size": gen.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": s0.model_name if s0 else checkpoint.name,
        "sd_model_hash": s0.model_hash[:10] if s0 else checkpoint.hash,
        "sd_vae_name": (s0.vae_name or None) if s0 else None, "sd_vae_hash": (s0.vae_hash[:10] or None) if s0 else None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": (s0.strength if s0.strength is not None else (s0.hires_denoise or None)) if s0 else None,
        "extra_generation_params": _extra_params(s0),
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": s0.clip_skip if s0 else 1, "is_using_inpainting_conditioning": False, "version": f"t2i {core_version()}",
        # t2i's own
        "task_id": job.id, "interrupted": out.interrupted, "skipped_iterations": out.skipped,
        "saved": out.saved, "save_error": out.save_error, "comments": job.meta.get("comments", []),
    }
    send = echo.get("send_images", True)
    images = [b64(p) for p in out.pngs] if send else []
    return {"images": images, "parameters": echo, "info": json.dumps(info, ensure_ascii=False)}


def _all_prompts(gen: core.GenRequest, out: core.Output) -> list[str]:
    """Each image's prompt: as its settings say when every image was made, else resolved again from the seeds
    (the library parses the template again: slow for a long one)."""
    if len(out.settings) == gen.images and out.settings and all(s.prompt_template for s in out.settings):
        return [s.prompt for s in out.settings]
    return core.resolved_prompts(gen)


def core_version() -> str:
    from t2i.server.app import core_version as v

    return v()


def _echo(req: _Request) -> dict:
    echo = req.model_dump()
    if "init_images" in echo and not echo.get("include_init_images"):
        echo["init_images"], echo["mask"] = None, None
    return echo


async def _generate(request: Request, req: _Request, task: str) -> dict:
    server = request.app.state.server
    images = await decode_img2img(req) if task == "img2img" else None
    dynamic = await run_in_threadpool(dynamic_prompts_mode, server, req)  # a long template parses for seconds
    gen, checkpoint = build_request(server, req, task, images, dynamic)
    request.scope.setdefault("state", {}).update(seed=gen.seed, prompt=gen.prompt)
    job = new_job(server, gen, checkpoint, _echo(req), req.force_task_id)
    if images is not None and images.get("mask") is not None and req.inpaint_full_res:
        job.meta["comments"] = ["t2i inpaints the whole picture (inpaint_full_res has no effect)"]
    submit(server, job)
    job = await wait_for(server, job, request)
    body = await run_in_threadpool(result, server, job)
    server.queue.release(job)
    return body


@router.post("/txt2img", response_model=ImageResponse)
async def txt2img(body: Txt2ImgRequest, request: Request):
    """Text to image (A1111's txt2img)."""
    return await _generate(request, body, "txt2img")


@router.post("/img2img", response_model=ImageResponse)
async def img2img(body: Img2ImgRequest, request: Request):
    """Image to image; with `mask`, inpainting (white repaints; inpainting_mask_invert=1 swaps)."""
    return await _generate(request, body, "img2img")


# --------------------------------------------------------------------------- png-info, progress, control


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest):
    """The generation parameters stored in a PNG (A1111's `parameters` chunk, parsed)."""
    data = _decode_b64(body.image, "image")
    try:
        text = await run_in_threadpool(core.read_png_text, data)
    except core.UsageError as e:
        raise _field_error("image", str(e)) from None
    info = text.pop(core.metadata.A1111_KEY, "")
    parameters = core.metadata.parse_a1111(info) if info else {}
    if "Size" in parameters and "x" in parameters["Size"]:
        parameters["Size-1"], parameters["Size-2"] = parameters["Size"].split("x", 1)
    return {"info": info, "items": text, "parameters": parameters}


def _progress(server, job: Job | None, skip_current_image: bool) -> dict:
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)) if job else ""
    running = job is not None and job.state == RUNNING
    state = {"skipped": bool(job and job.skipped), "interrupted": bool(job and job.interrupted),
             "stopping_generation": False, "job": job.id if job else "",
             "job_count": job.iterations if job is not None and job.state in (QUEUED, RUNNING) else 0,
             "job_timestamp": stamp, "job_no": job.iteration if job else 0,
             "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0,
             "queue_position": server.queue.position(job) if job else -1, "queued": server.queue.waiting}
    image = None
    if running and not skip_current_image:
        png = server.queue.preview(job)
        image = b64(png) if png else None
    textinfo = None
    if job is not None:
        if job.state == QUEUED:
            textinfo = f"In queue, position {server.queue.position(job)}"
        elif running:
            textinfo = f"Step {job.step}/{job.steps}" + (f", batch {job.iteration + 1}/{job.iterations}"
                                                         if job.iterations > 1 else "")
        else:
            textinfo = job.state + (f": {job.error.message}" if job.error else "")
    return {"progress": round(job.progress, 4) if job else 0.0, "eta_relative": round(job.eta, 3) if job else 0.0,
            "state": state, "current_image": image, "textinfo": textinfo}


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False, id_task: str | None = Query(None)):
    """Progress of the running job, or of the job `id_task` (queued, running or recently finished)."""
    server = request.app.state.server
    if id_task is not None:
        job = server.queue.get(id_task)
        if job is None:
            raise HTTPException(404, f"no job id_task={id_task!r} (unknown, or finished long ago)")
    else:  # the oldest running generation (a checkpoint load is not a job A1111's clients know)
        job = next((j for j in server.queue.running if j.kind == "generate"), None)
    return _progress(server, job, skip_current_image)


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop the running job within a step; its finished images (if any) are returned to its client."""
    request.app.state.server.queue.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request):
    """Skip the running batch (n_iter) of the running job and go on with the next."""
    request.app.state.server.queue.skip()
    return {}


# --------------------------------------------------------------------------- A1111's everyday set (issue 29)

PER_REQUEST_OPTIONS = ("CLIP_stop_at_last_layers", "sd_vae")  # options a request may override for itself
OWN_VAE = {"automatic", "none", ""}  # A1111's sd_vae values that mean the model's own VAE here


def server_vaes(server) -> dict[str, Any]:
    """The VAEs a request may name: --vae-dir's .safetensors files and diffusers VAE folders, and
    NAME.vae.safetensors files in --model-dir (never a pickle: the server loads none)."""
    found = {n: p for n, p in vae_names(server.config.model_dir).items() if n.endswith(".vae.safetensors")}
    found |= vae_names(server.config.vae_dir)
    return {n: p for n, p in found.items() if p.is_dir() or p.suffix.lower() == ".safetensors"}


def everyday_fields(server, req: _Request, checkpoint) -> dict:
    """Clip skip (the clip_skip field some clients send, or override_settings' CLIP_stop_at_last_layers), the
    VAE (override_settings' sd_vae, by name) and, for txt2img, the hires fix; 422s naming the field."""
    override = req.override_settings or {}
    skip = override.get("CLIP_stop_at_last_layers", req.clip_skip)
    field = "override_settings" if "CLIP_stop_at_last_layers" in override else "clip_skip"
    if skip in (None, 0):
        skip = 1
    try:
        skip = check_clip_skip(skip)
    except core.UsageError as e:
        raise _field_error(field, str(e)) from None
    vae = override.get("sd_vae")
    if vae is not None and (not isinstance(vae, str) or vae.lower() in OWN_VAE):
        vae = None if isinstance(vae, str) else vae
    if vae is not None:
        found = server_vaes(server).get(vae) if isinstance(vae, str) else None
        if found is None:
            raise _field_error("override_settings", f"unknown VAE {json.dumps(vae)}; GET /sdapi/v1/sd-vae lists "
                                                    "those this server has (--vae-dir)", status=404)
        vae = str(found)
    return {"clip_skip": skip, "vae": vae, "hires": _hires(server, req, checkpoint)}


def _hires(server, req: _Request, checkpoint) -> Hires | None:
    """enable_hr's fields as t2i's Hires, its size and work within the server's limits."""
    if not getattr(req, "enable_hr", False):
        return None
    try:
        hires = Hires(scale=req.hr_scale, width=req.hr_resize_x, height=req.hr_resize_y,
                      steps=req.hr_second_pass_steps, denoise=req.denoising_strength if req.denoising_strength
                      is not None else 0.75, upscaler=req.hr_upscaler).checked()
    except core.UsageError as e:
        field = {"upscaler": "hr_upscaler", "denois": "denoising_strength", "steps": "hr_second_pass_steps",
                 "width": "hr_resize_x", "height": "hr_resize_y"}
        name = next((f for k, f in field.items() if k in str(e)), "hr_scale")
        raise _field_error(name, str(e)) from None
    d = server.model_defaults(checkpoint.name)
    width, height, steps = req.width or d["width"], req.height or d["height"], req.steps or d["steps"]
    try:
        p = hires_plan(hires, width, height)
    except core.UsageError as e:
        raise _field_error("hr_scale", str(e)) from None
    lim = server.limits
    if hires.steps_for(steps) > lim.max_steps:
        raise _field_error("hr_second_pass_steps", f"hr_second_pass_steps must be 0..{lim.max_steps}, "
                                                   f"got {req.hr_second_pass_steps}")
    if max(p.up_w, p.up_h) > lim.max_side:
        raise _field_error("hr_scale", f"the hires size {p.up_w}x{p.up_h} is over this server's limit of "
                                       f"{lim.max_side} a side; use a smaller hr_scale or hr_resize")
    images = req.batch_size * req.n_iter
    cost = (width * height * steps + p.out_w * p.out_h * hires.steps_for(steps)) * images
    if cost > lim.max_pixel_steps:
        raise _field_error("hr_scale", f"both passes' width x height x steps x images = {cost} is over this "
                                       f"server's budget of {lim.max_pixel_steps}; ask for a smaller hires size, "
                                       "fewer steps or images", status=413)
    return hires


# --------------------------------------------------------------------------- dynamic prompts (issue 29)

# The Dynamic Prompts extension's script args (alwayson_scripts {"Dynamic Prompts vX": {"args": [...]}}) are
# positional: [0] is_enabled, then its modes. t2i honours [0] and refuses those of its on/off modes it lacks.
DYNAMIC_PROMPTS_MODES = {1: "combinatorial generation", 3: "magic prompt", 4: "I'm feeling lucky",
                         5: "attention grabber", 10: "fixed seed", 11: "unlink seed from prompt",
                         13: "Jinja2 templates", 14: "don't generate images"}


def _is_dynamic_prompts(name) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith("dynamic prompts")  # A1111: case-free


def _other_scripts(scripts) -> bool:
    """Whether alwayson_scripts names a script other than the Dynamic Prompts extension."""
    return bool(scripts) and (not isinstance(scripts, dict) or not all(map(_is_dynamic_prompts, scripts)))


def dynamic_prompts_mode(server, req: _Request) -> str:
    """"random" (each image's prompt resolved from its seed, as A1111's Dynamic Prompts extension does by default)
    or "off": the server's --no-dynamic-prompts, or the extension's is_enabled arg in alwayson_scripts. A template
    is checked here (grammar, wildcard files): a 422 naming `prompt`."""
    mode = "random" if server.config.dynamic_prompts else "off"
    for name, value in (req.alwayson_scripts or {}).items():
        if not _is_dynamic_prompts(name):
            continue
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise _field_error("alwayson_scripts", f"alwayson_scripts {name!r} must be {{\"args\": [...]}}")
        if args:
            mode = "random" if args[0] else "off"
        for i, what in DYNAMIC_PROMPTS_MODES.items():
            if mode == "random" and len(args) > i and args[i] not in (False, None, 0):  # checkboxes: off
                raise _field_error("alwayson_scripts", f"alwayson_scripts {name!r} args[{i}] ({what}) is not "
                                                       "supported: t2i picks one variant per image, from its seed")
    if mode == "random" and len(req.prompt) <= server.limits.max_prompt:  # a longer one: build_request's 413
        try:
            core.check_dynamic_prompt(req.prompt, str(server.config.wildcard_dir) if server.config.wildcard_dir
                                      else None)
        except core.UsageError as e:
            message = str(e).replace("pass --no-dynamic-prompts", "turn dynamic prompts off for this request "
                                     '(alwayson_scripts {"Dynamic Prompts": {"args": [false]}})')
            raise _field_error("prompt", message.replace("--wildcard-dir", "the server's --wildcard-dir")) from None
    return mode


# --------------------------------------------------------------------------- options and lists


def options(server) -> dict:
    """The options A1111 clients read and post back; only sd_model_checkpoint can change."""
    c = server.registry.checkpoints.get(server.selected)
    return {
        "sd_model_checkpoint": c.title if c else server.selected, "sd_checkpoint_hash": c.hash if c else None,
        "sd_vae": "Automatic", "sd_lora": "None", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
        "eta_ancestral": 1.0, "eta_ddim": 0.0, "randn_source": "CPU", "samples_format": "png",
        "samples_save": server.config.out is not None, "enable_pnginfo": True, "add_model_hash_to_info": True,
        "add_model_name_to_info": True, "return_grid": False, "grid_save": False, "img2img_fix_steps": False,
        "live_previews_enable": True, "show_progress_every_n_steps": 1, "live_preview_content": "Combined",
        "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "s_churn": 0.0, "s_tmin": 0.0,
        "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0, "token_merging_ratio": 0.0, "sdxl_crop_top": 0,
        "sdxl_crop_left": 0, "sd_checkpoints_limit": 1, "sd_hypernetwork": "None",
    }


@router.get("/options")
async def get_options(request: Request):
    return options(request.app.state.server)


@router.post("/options")
async def set_options(body: dict[str, Any], request: Request):
    """Switch checkpoints with sd_model_checkpoint (waits until it is loaded). Every other option may be
    posted back at its value (clients post the whole dict); another value is a 422 naming it."""
    server = request.app.state.server
    current = options(server)
    for key, value in body.items():
        if key == "sd_model_checkpoint":
            continue
        if key not in current:
            raise _field_error(key, f"option {key!r} is not one t2i has (GET /sdapi/v1/options lists them)")
        if not _same(current[key], value, key):
            raise _field_error(key, f"option {key}={json.dumps(value)} cannot be changed on t2i "
                                    f"(it is {json.dumps(current[key])})")
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None and wanted != current["sd_model_checkpoint"]:
        checkpoint = server.registry.find_checkpoint(wanted)
        if checkpoint is None:
            raise _field_error("sd_model_checkpoint", f"unknown checkpoint {wanted!r}; GET /sdapi/v1/sd-models lists "
                                                      "those this server has", status=404)
        loads = [submit(server, job) for job in server.load_jobs(checkpoint)]  # every worker loads it
        for job in loads:
            await wait_for(server, job, None)
        server.selected = checkpoint.name
    return None


@router.get("/sd-models")
async def sd_models(request: Request):
    return [{"title": c.title, "model_name": c.name, "hash": c.hash, "sha256": None, "filename": c.filename,
             "config": None} for c in request.app.state.server.registry.checkpoints.values()]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request):
    await run_in_threadpool(request.app.state.server.registry.refresh_checkpoints)
    return None


@router.get("/samplers")
async def samplers():
    """A1111 1.9+'s list: each sampler once, its automatic schedule in options (old combined names still work)."""
    old = {name: [n for n, (base, _) in core.COMBINED.items() if base == name] for name in core.SAMPLERS}
    return [{"name": s.a1111, "aliases": [s.name, *old[s.name]], "options": {} if s.automatic in ("automatic",
             "uniform") else {"scheduler": s.automatic}} for s in core.SAMPLERS.values()]


@router.get("/schedulers")
async def schedulers():
    return [{"name": key, "label": label, "aliases": ["SGMUniform"] if key == "sgm_uniform" else None,
             "default_rho": 7.0 if key == "karras" else -1,
             "need_inner_model": key in ("uniform", "sgm_uniform", "normal")} for key, label in SCHEDULERS.items()]


@router.get("/loras")
async def loras(request: Request):
    return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
            for name, path in request.app.state.server.registry.loras.items()]


@router.post("/refresh-loras")
async def refresh_loras(request: Request):
    request.app.state.server.registry.refresh_loras()
    return None


@router.get("/embeddings")
async def embeddings(request: Request):
    """The .safetensors files of --embedding-dir, as A1111 lists them: `loaded` when their vectors fit the selected
    checkpoint's text encoders (or before it has loaded), else `skipped`; a prompt calls a loaded one by name."""
    server = request.app.state.server
    reg = server.registry
    width = server.models.get(server.selected, {}).get("embedding_width")
    found = {"loaded": {}, "skipped": {}}
    for name in reg.embeddings:
        vectors, shape = reg.embedding_shape(name)
        fits = shape and (width is None or shape == width)
        found["loaded" if fits else "skipped"][name] = {
            "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape, "vectors": vectors}
    return found


@router.post("/refresh-embeddings")
async def refresh_embeddings(request: Request):
    request.app.state.server.registry.refresh_embeddings()
    return None


@router.get("/sd-vae")
async def sd_vae(request: Request):
    """The VAEs of --vae-dir (and NAME.vae.* beside the checkpoints of --model-dir), by file name, as A1111
    lists its models/VAE; the file name is what override_settings' sd_vae takes."""
    return [{"model_name": name, "filename": name} for name in server_vaes(request.app.state.server)]


@router.get("/upscalers")
async def upscalers():
    """A1111's built-in pixel upscalers (hires fix's Lanczos and Nearest); no model-based ones."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4 if name != "None"
             else 1} for name in ("None", *(u.a1111 for u in UPSCALERS.values() if u.mode is None))]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    return [{"name": u.a1111} for u in UPSCALERS.values() if u.mode is not None]


@router.get("/memory")
async def memory():
    import psutil
    import torch

    vm = psutil.virtual_memory()
    ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total,
           "process_rss": psutil.Process().memory_info().rss}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                             "peak": stats.get("inactive_split_bytes.all.peak", 0)},
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    else:
        cuda = {"error": "unavailable"}
    return {"ram": ram, "cuda": cuda}


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    return request.app.state.server.config.flags()


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
async def script_info():
    return []


@router.get("/prompt-styles")
async def prompt_styles():
    return []


@router.get("/hypernetworks")
async def hypernetworks():
    return []


@router.get("/face-restorers")
async def face_restorers():
    return []
