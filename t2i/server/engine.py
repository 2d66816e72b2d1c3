"""The server's one bridge to t2i's core: loading, generating, saving, metadata.

Every import of a t2i module below the pipelines lives here, so that the server
follows the core when it moves. A job runs through the very pipeline objects the
CLI uses (`t2i.pipelines`), with the same arguments `t2i generate` passes, and its
PNGs are written with the same metadata: an API request and the matching
`t2i generate` give the same pixels and the same `parameters` and `t2i` chunks.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from t2i import dynamic_prompts, jobs, metadata, models, prompts
from t2i.files import check_safetensors
from t2i.models import tiny_vae
from t2i.errors import ModelLoadError, T2IError, UnsafeFileError, UsageError
from t2i.images import as_mask, check_mask, to_rgb
from t2i.output import save_images
from t2i.samplers import COMBINED, SAMPLERS, SCHEDULES, a1111_names, get_sampler, get_schedule, resolve
from t2i.settings import Settings

__all__ = ["Engine", "GenRequest", "Interrupted", "Skipped", "T2IError", "UsageError", "ModelLoadError",
           "UnsafeFileError",
           "check_mask", "decode_image", "read_png_text", "SAMPLERS", "get_sampler", "metadata", "prompts",
           "models", "Settings",
           "COMBINED", "SCHEDULES", "get_schedule", "resolve", "a1111_names"]

# One model load at a time in a process: diffusers builds modules on the meta device through accelerate's
# init_empty_weights, which patches torch.nn.Module for the whole process while it runs; two workers loading
# at once (--devices a,b at start) would each build the other's modules empty ("Cannot copy out of meta tensor").
_LOADING = threading.Lock()

MAX_UPLOAD_PIXELS = 4096 * 4096  # a decoded upload larger than this is refused before it is converted


class Interrupted(Exception):
    """Raised from the step callback: the job was interrupted (or its client went away)."""


class Skipped(Exception):
    """Raised from the step callback: skip the current iteration, go on with the next."""


@dataclass
class GenRequest:
    """One generation job, as the pipelines take it: every name is already checked against its registry."""

    task: str  # text2image | image2image | inpaint
    prompt: str
    negative_prompt: str | None
    steps: int | None
    guidance: float | None
    sampler: str | None  # a t2i sampler name
    seed: int  # the first image's seed (never -1 here)
    width: int | None
    height: int | None
    batch_size: int = 1
    n_iter: int = 1
    model: str = ""  # registry name of the checkpoint
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.75
    mask_blur: int = 4
    invert_mask: bool = False
    save: bool = False  # also write the PNGs into the server's --out folder
    scheduler: str | None = None  # a t2i schedule key (t2i.samplers.SCHEDULES); None: automatic
    # A1111's everyday set (issue 29)
    clip_skip: int = 1
    vae: str | None = None  # a VAE file or folder the server lists (GET /sdapi/v1/sd-vae); None: the model's own
    hires: object | None = None  # t2i.pipelines.hires.Hires (text2image), checked
    # dynamic prompts (A1111's Dynamic Prompts extension): "random" resolves each image's prompt from its seed
    dynamic_prompts: str = "off"
    wildcard_dir: str | None = None  # t2i serve --wildcard-dir: where __NAME__ finds NAME.txt

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter


@dataclass
class Output:
    """What a job made: PNG bytes (metadata included) and the settings of each image."""

    pngs: list[bytes] = field(default_factory=list)
    settings: list[Settings] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    interrupted: bool = False
    skipped: int = 0  # iterations skipped
    save_error: str | None = None  # why --out has not got every image (the images are still answered)


def decode_image(data: bytes, what: str, mask: bool = False) -> Image.Image:
    """An uploaded image decoded fully (so corrupt data fails here), with the guards of t2i.images.load_rgb:
    any mode in, 8-bit RGB out (a mask: mode L, white repaints, transparent keeps)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise UsageError(f"{what} is {img.width}x{img.height}; at most {MAX_UPLOAD_PIXELS} pixels")
            img.load()
            return as_mask(img) if mask else to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, UsageError):
            raise
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise UsageError(f"{what} is not a readable image ({type(e).__name__}: {detail})") from None


def read_png_text(data: bytes) -> dict[str, str]:
    """The text chunks of an uploaded image (A1111's png-info), decoded with the upload guards."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise UsageError(f"image is {im.width}x{im.height}; at most {MAX_UPLOAD_PIXELS} pixels")
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            text.update({k: v for k, v in im.info.items() if isinstance(v, str)})
            return text
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"image is not a readable image ({type(e).__name__})") from None


class Engine:
    """The loaded model and the pipelines over it; used by the one worker thread only.

    `hook(step, total, latents)` is called after every denoising step of the running job; it may
    raise Interrupted or Skipped. Loading another checkpoint replaces the loaded one (one at a time).
    """

    speed = "auto"  # the speed mode of its jobs (t2i.jobs.Request.speed): what `t2i generate` runs by default

    def __init__(self, device: str = "auto", lora_dir: Path | None = None, out: Path | None = None,
                 embedding_dir: Path | None = None):
        self.device = device
        self.lora_dir = lora_dir
        self.out = out
        self.embedding_dir = embedding_dir  # textual-inversion embeddings a prompt calls by name
        self.loaded: str | None = None  # registry name
        self.location: str | None = None
        self._pipes: dict[str, object] = {}
        self.hook: Callable | None = None
        self._preview_decoder = None  # the model's vae_tiny/ when it has one (previews only), else its VAE

    # ------------------------------------------------------------------ models

    def load(self, name: str, location: str | None) -> None:
        """Load a checkpoint (location None: the bundled model) unless it is the loaded one."""
        if self.loaded == name and self._pipes:
            return
        from t2i.pipelines import Text2Image

        self._pipes = {}
        self.loaded = None
        self._preview_decoder = None
        with _LOADING:
            pipe = Text2Image.from_pretrained(location, device=self.device, dtype="auto", allow_pickle=False)
        self._instrument(pipe)
        self._pipes["text2image"] = pipe
        self.loaded, self.location = name, location

    def pipe(self, task: str):
        from t2i.pipelines import Image2Image, Inpaint

        if task not in self._pipes:
            cls = {"image2image": Image2Image, "inpaint": Inpaint}[task]
            with _LOADING:
                self._pipes[task] = cls.from_pipe(self._pipes["text2image"])
            self._instrument(self._pipes[task])
        pipe = self._pipes[task]
        # as `t2i generate --lora-dir` sets it; pickles never load here, whatever the CLI allows
        pipe.loras.lora_dir, pipe.loras.allow_pickle = self.lora_dir, False
        return pipe

    @property
    def model_info(self) -> dict:
        """name, hash and native size of the loaded model (empty before the first load)."""
        if not self._pipes:
            return {}
        p = self._pipes["text2image"]
        return {"name": p.model.source.name, "hash": p.model.hash, "arch": p.model.arch,
                "width": p.defaults.width, "height": p.defaults.height, "steps": p.defaults.steps,
                "guidance": p.defaults.guidance, "sampler": p.defaults.sampler,
                "vae_scale_factor": p.vae_scale_factor, "device": str(p.device),
                # the width of an embedding's vectors that fits (SDXL: clip_l's and clip_g's together), as A1111
                "embedding_width": sum(e.get_input_embeddings().embedding_dim for e in p._text_encoders()[1])}

    def _instrument(self, pipe) -> None:
        """Have the pipeline's own step callback report each step, with its latents, to `self.hook`.

        The pipeline's `on_step(i)` gives no latents (needed for the live preview) nor the number of
        steps of the call, so the callback it builds is wrapped, per instance, here.
        """
        build = pipe._step_callback
        engine = self

        def step_callback(bar):
            inner = build(bar)

            def on_step_end(diffusers_pipe, i, t, kwargs):
                kwargs = inner(diffusers_pipe, i, t, kwargs)
                if engine.hook is not None:
                    engine.hook(i + 1, diffusers_pipe.num_timesteps, kwargs.get("latents"))
                return kwargs

            return on_step_end

        pipe._step_callback = step_callback

    def _previewer(self, pipe):
        """The decoder for live previews: the model's small vae_tiny/ (TAESD-style) when it has one, the
        way A1111 previews with TAESD; else the model's own VAE."""
        if self._preview_decoder is None:
            self._preview_decoder = pipe.pipe.vae
            folder = pipe.model.path
            if folder.is_dir() and (folder / "vae_tiny" / "config.json").is_file():
                try:
                    self._preview_decoder = tiny_vae.load_tiny_vae(
                        tiny_vae.tiny_vae_folder("", folder), pipe.dtype, pipe.device,
                        pipe.pipe.unet.config.in_channels)
                except T2IError:
                    pass  # previews from the full VAE then
        return self._preview_decoder

    def preview(self, task: str, latents) -> Image.Image:
        """The first image of a batch from its current latents — decoded on the worker thread, between two
        steps, by a decoder that changes no state of the job."""
        import torch

        pipe = self._pipes[task]
        vae = self._previewer(pipe)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            x = latents[:1].to(vae.dtype) / vae.config.scaling_factor + shift  # (1, C, h, w)
            decoded = vae.decode(x).sample.float()  # (1, 3, H, W)
        return pipe.pipe.image_processor.postprocess(decoded, output_type="pil")[0]

    # ------------------------------------------------------------------ jobs

    def run(self, req: GenRequest, on_iteration: Callable[[int], None] | None = None) -> Output:
        """Run a request through t2i's one request path (t2i.jobs): n_iter calls of batch_size images, the k-th
        starting at seed + k * batch_size (A1111's seeds; image i of a t2i batch is the single run with seed + i,
        so this is one batch of n_iter * batch_size images, image for image). A skipped iteration leaves the
        others; an interrupt ends the job with the images made so far."""
        job = jobs.check(self.request(req))
        pipe = jobs.prepare(self.pipe(req.task), job)
        out = Output()
        for k, (i, prompt, seed) in enumerate(jobs.calls(job)):
            if on_iteration is not None:
                on_iteration(k)
            try:  # a dynamic prompt's template: each image's prompt resolved from its seed (jobs._call_template)
                result = jobs.call(pipe, job, prompt, seed, template=job.templates[i] if job.templates else "")
            except Skipped:
                out.skipped += 1
                continue
            except Interrupted:
                out.interrupted = True
                break
            for image, settings in result:
                out.pngs.append(jobs.png_bytes(image, settings))
                out.settings.append(settings)
            if req.save and self.out is not None and out.save_error is None:
                self._save(result, out)
        return out

    def _save(self, result, out: Output) -> None:
        """Write each image into --out (atomically: a full disk leaves no half-written PNG). A failure stops the
        saving, is logged once and said in the answer; the images still go to the client: nothing is lost."""
        for image, settings in result:
            try:
                out.saved += [str(p) for p in save_images([image], [settings], self.out)]
            except (T2IError, OSError) as e:
                out.save_error = f"not saved into --out: {e}"
                logging.getLogger("t2i.server").warning(out.save_error)
                return

    def request(self, req: GenRequest) -> jobs.Request:
        """The server's job as t2i's `Request`: what `t2i generate` is asked with the same settings."""
        request = jobs.Request([req.prompt], task=req.task, negative_prompt=req.negative_prompt, steps=req.steps,
                            guidance=req.guidance, sampler=req.sampler, seed=req.seed, width=req.width,
                            height=req.height, batch=req.batch_size, iterations=req.n_iter, lora_dir=self.lora_dir,
                            init_image=req.init_image, strength=req.strength, mask=req.mask,
                            mask_blur=req.mask_blur, invert_mask=req.invert_mask, model=self.location,
                            device=self.device, scheduler=req.scheduler, clip_skip=req.clip_skip, vae=req.vae,
                            hires=req.hires, embedding_dir=self.embedding_dir, speed=self.speed)
        request.dynamic_prompts, request.wildcard_dir = req.dynamic_prompts, req.wildcard_dir
        return request


def check_dynamic_prompt(prompt: str, wildcard_dir: str | None) -> bool:
    """Whether the prompt is a dynamic-prompt template, checked as `t2i generate` checks it (grammar, wildcard
    files): a one-line UsageError otherwise."""
    if not dynamic_prompts.is_template(prompt):
        return False
    dynamic_prompts.check(prompt, wildcard_dir)
    return True


def resolved_prompts(req: GenRequest) -> list[str]:
    """Each image's prompt: the template resolved from each image's seed (as the job resolves it), else as given."""
    seeds = [req.seed + i for i in range(req.images)]
    if req.dynamic_prompts != "random" or not dynamic_prompts.is_template(req.prompt):
        return [req.prompt] * len(seeds)
    return dynamic_prompts.resolve_many(req.prompt, seeds, req.wildcard_dir)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS), the CPU allocator's RuntimeError, or Python's MemoryError."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, (oom, MemoryError)) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def free_memory(device: str) -> None:
    """Give cached device memory back after a failed job (a no-op on the CPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and not str(device).startswith(("cpu", "mps")):
        torch.cuda.empty_cache()


def sampler_entries() -> list[tuple[str, str, dict]]:
    """(A1111 name, t2i name, options) of every sampler t2i has."""
    return [(s.a1111, s.name, dict(s.options)) for s in SAMPLERS.values()]


def lora_names_in(prompt: str) -> list[str]:
    """The NAMEs of `<lora:NAME:W>` tags in a prompt."""
    return [name for name, _ in prompts.extract_loras(prompt)[1]]


def safetensors_header(path: Path) -> dict:
    """A vetted safetensors file's header (tensor names, shapes), no tensor loaded."""
    return check_safetensors(path)


def resolve_model(location: str | None):
    """models.resolve: what a --model argument names, checked, nothing loaded."""
    return models.resolve(location)


def bundled_name() -> str:
    return models.BUNDLED_NAME


def model_hash_of(location: str | None) -> str:
    source = models.resolve(location)
    folder = Path(source.location) if source.kind in ("bundled", "folder") else None
    return models.model_hash(source, folder)
