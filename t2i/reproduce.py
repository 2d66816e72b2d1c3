"""Regenerate an image from its metadata and compare it bit for bit."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from t2i import metadata, speed
from t2i.embeddings import EmbeddingSet, embedding_hash
from t2i.errors import UsageError
from t2i.images import as_mask, pixel_hash, read_input, to_rgb
from t2i.output import plan_paths, save_images
from t2i.models.vae import resolve_vae
from t2i.pipelines import Image2Image, Inpaint, Text2Image
from t2i.pipelines.hires import Hires
from t2i.progress import StepBar

log = logging.getLogger(__name__)


@dataclass
class Report:
    image: str
    identical: bool
    max_abs_diff: int
    differing_pixels: int
    model_hash_matches: bool
    written: str | None = None

    def summary(self) -> str:
        if self.identical:
            line = f"{self.image}: reproduced bit for bit"
        else:
            line = (f"{self.image}: differs (max abs pixel difference {self.max_abs_diff}, "
                    f"{self.differing_pixels} pixels differ)")
            if not self.model_hash_matches:
                line += "; the model's hash differs from the recorded one"
        return line + (f"; saved {self.written}" if self.written else "")


def _input_image(recorded: str | None, given: str | None, want_hash: str | None, what: str, flag: str, convert):
    """The init image or mask to replay with: the recorded file (or `given`), checked against the recorded hash."""
    source = given or recorded
    if source is None:
        raise UsageError(f"the {what} was given in memory, not as a file; pass it with {flag}")
    img, _ = read_input(source, what, convert=convert)
    if want_hash and pixel_hash(img) != want_hash:
        raise UsageError(f"the {what} {source} is not the one the image was made from (its pixels differ); "
                         f"pass the original with {flag}")
    return source


def _speed_options(settings, device):
    """The recorded speed options, as chosen then (`auto`'s choice, not `auto`: another machine would choose
    otherwise; None: the plain path); offload, which does not change pixels, only on CUDA."""
    if not settings.speed:
        return None
    options = speed.SpeedOptions.parse(",".join(settings.speed))
    if options.cpu_offload and device.type != "cuda":
        options = dataclasses.replace(options, cpu_offload=False, batched=True)
    return options


def _vae(settings, given: str | None, image, allow_pickle: bool):
    """The VAE to replay with (None: the model's own): `given`, or the recorded one, which must still exist."""
    if not (given or settings.vae):
        return None
    if given is None and not Path(settings.vae).exists():
        raise UsageError(f"the VAE {settings.vae} used for {image} is missing; pass it with --vae")
    return resolve_vae(given or settings.vae, allow_pickle=allow_pickle)


def _hires(settings) -> dict:
    """The hires fix argument of the replayed call ({} without one)."""
    if not settings.hires_upscaler:
        return {}
    if settings.pipeline != "text2image":
        raise UsageError(f"the image records a hires fix on {settings.pipeline}, which has none; its metadata "
                         "is inconsistent")
    return {"hires": Hires(scale=settings.hires_scale, width=settings.hires_width, height=settings.hires_height,
                           steps=settings.hires_steps, denoise=settings.hires_denoise,
                           upscaler=settings.hires_upscaler)}


def _recorded_embeddings(settings, image, allow_pickle: bool) -> EmbeddingSet:
    """Exactly the embeddings the image was made with (its recorded files, checked by hash): a name that called
    none then is a word now too."""
    files = {}
    for e in settings.embeddings:
        if not Path(e.path).is_file():
            raise UsageError(f"the embedding {e.path} used for {image} is missing")
        if e.hash and embedding_hash(e.path) != e.hash[:12]:
            raise UsageError(f"the embedding {e.path} is not the one {image} was made with (hash "
                             f"{embedding_hash(e.path)}, recorded {e.hash[:12]})")
        files[e.name] = Path(e.path)
    found = EmbeddingSet(files=files, allow_pickle=allow_pickle)
    found.vet([settings.prompt, settings.negative_prompt])
    return found


def reproduce(image: str | Path, model: str | None = None, device: str | None = None, dtype: str | None = None,
              allow_pickle: bool = False, out: str | Path | None = None, overwrite: bool = False,
              progress: bool = True, model_config: str | None = None, init: str | None = None,
              mask: str | None = None, vae: str | None = None) -> Report:
    """Re-run the recorded settings of `image`; report whether the new pixels are identical.

    Images made by img2img or inpaint replay from their recorded init image and mask
    (or `init`/`mask` when the files moved), which must have the recorded pixels; an image made with a
    VAE override replays with the recorded VAE (or `vae`), clip skip and hires fix as recorded.
    """
    parameters, settings = metadata.read(image)
    if metadata.is_grid(parameters):
        raise UsageError(f"{image} is an X/Y/Z grid; reproduce one of its single images (t2i grid writes them "
                         "beside it, its t2i chunk lists them)")
    if settings is None:
        raise UsageError(f"{image} has no t2i settings to replay (A1111 text alone is not exact enough)")
    classes = {"text2image": Text2Image, "image2image": Image2Image, "inpaint": Inpaint}
    if settings.pipeline not in classes:
        raise UsageError(f"{image} was made by an unknown pipeline {settings.pipeline!r}; this t2i replays "
                         f"{', '.join(classes)}")
    inputs = {}
    if settings.pipeline != "text2image":
        inputs = {"init_image": _input_image(settings.init_image, init, settings.init_image_hash, "init image",
                                             "--init", to_rgb), "strength": settings.strength}
    if settings.pipeline == "inpaint":
        inputs |= {"mask": _input_image(settings.mask_image, mask, settings.mask_image_hash, "mask", "--mask",
                                        as_mask), "mask_blur": settings.mask_blur, "invert_mask": settings.invert_mask}
    if out is not None:
        plan_paths(out, 1, overwrite)
    for lora in settings.loras:
        if not Path(lora.path).is_file():
            raise UsageError(f"the LoRA {lora.path} used for {image} is missing")
    vae = _vae(settings, vae, image, allow_pickle)
    hires = _hires(settings)
    embeddings = _recorded_embeddings(settings, image, allow_pickle)
    pipe = classes[settings.pipeline].from_pretrained(model if model is not None else (settings.model or None),
                                      device=device or settings.device.split(":")[0],
                                      dtype=dtype or settings.dtype, allow_pickle=allow_pickle,
                                      model_config=model_config or settings.model_config or None)
    if pipe.model.hash != settings.model_hash:
        log.warning("model hash %s differs from the recorded %s", pipe.model.hash, settings.model_hash)
    if settings.autoguidance and pipe.guide is None:
        raise UsageError(f"{image} was made with autoguidance, and the model {pipe.model.path} has no guide/ UNet; "
                         "give the model it was made with (--model)")
    pipe.embeddings = embeddings
    pipe.autoguidance = settings.autoguidance  # 0 (off) for images made before autoguidance existed
    pipe.clip_skip = settings.clip_skip  # 1 for images made before clip skip existed
    pipe.set_vae(vae, allow_pickle=allow_pickle)
    if vae is not None and pipe.vae_hash != settings.vae_hash:
        log.warning("VAE hash %s differs from the recorded %s", pipe.vae_hash, settings.vae_hash)
    if settings.autoguidance:
        pipe.autoguidance_below = settings.autoguidance_below
    options = _speed_options(settings, pipe.device)
    # Batched speed options make image i of a call equal the single run with seed + i only to within rounding:
    # replay the whole call then, and keep the image at its position.
    whole_call = options is not None and not options.exact and settings.batch_size > 1
    batch, index = (settings.batch_size, settings.batch_index) if whole_call else (1, 0)
    bar = StepBar("reproducing") if progress is True else progress
    try:
        with speed.apply(pipe, options or speed.SpeedOptions.off()):  # none recorded: the exact path
            result = pipe(settings.prompt, **inputs, negative_prompt=settings.negative_prompt, steps=settings.steps,
                          guidance=settings.guidance, sampler=settings.sampler, seed=settings.seed - index,
                          scheduler=settings.scheduler,
                          width=settings.width, height=settings.height, batch=batch, loras=settings.loras,
                          progress=bar, **hires)
    finally:
        if bar and progress is True:
            bar.close()
    result.images[:], result.settings[:] = [result.images[index]], [result.settings[index]]
    new = np.asarray(result.images[0].convert("RGB"), dtype=np.int16)
    with Image.open(image) as im:
        old = np.asarray(im.convert("RGB"), dtype=np.int16)
    if old.shape != new.shape:
        diff, count = 255, int(np.prod(old.shape[:2]))
    else:
        d = np.abs(old - new)
        diff, count = int(d.max()), int((d.max(axis=-1) > 0).sum())
    written = None
    if out is not None:
        written = str(save_images(result.images, [settings], out, overwrite=overwrite)[0])
    return Report(str(image), diff == 0, diff, count, pipe.model.hash == settings.model_hash, written)
