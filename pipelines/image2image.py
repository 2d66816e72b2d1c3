"""Image2Image: a prompt and an init image in; the image redrawn, its layout kept as far as `strength` allows."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from t2i import guards
from t2i.errors import UsageError
from t2i.images import pixel_hash, read_input, snap_size
from t2i.settings import LoraSpec
from t2i.speed import per_call

from t2i.pipelines.base import BasePipeline, Result

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength


class Image2Image(BasePipeline):
    """Redraw an image from a prompt (A1111's img2img). Shares loaded components with `Text2Image`:

        t2i = Text2Image.from_pretrained()
        img2img = Image2Image.from_pipe(t2i)           # no reload, no copy
        result = img2img("a red circle, in sks style", "content.png", strength=0.5, seed=1)

    `strength` is the share of the denoising schedule that runs (0.75 runs 15 of 20
    steps from the init image noised to that level): low keeps the image, 1 ignores it.
    Any image mode is converted to RGB (alpha over white); a side that is not a
    multiple of the VAE's factor (8 for Stable Diffusion) is resized, with a notice.
    """

    task = "image2image"
    diffusers_classes = {"sd1": "StableDiffusionImg2ImgPipeline", "sd2": "StableDiffusionImg2ImgPipeline",
                         "sdxl": "StableDiffusionXLImg2ImgPipeline"}

    @per_call  # the pipeline's speed mode (pipe.speed: "auto" by default) on for the call
    def __call__(
        self,
        prompt: str,
        init_image: str | Path | Image.Image,
        *,
        strength: float = DEFAULT_STRENGTH,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        scheduler: str | None = None,  # A1111's schedule type (t2i.samplers.SCHEDULES); None: automatic
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        loras: list[LoraSpec | str] = (),
        progress=True,
    ) -> Result:
        """Redraw `init_image` (a path or a PIL image) `batch` times; image i uses seed + i."""
        init, path = read_input(init_image, "init image")
        settings = self._image_settings(prompt, init, path, strength, negative_prompt, steps, guidance, sampler,
                                        seed, width, height, batch, loras, scheduler=scheduler)
        init = self._fit(init, settings[0], "init image")
        return self._generate(settings, progress, lambda group: {
            "image": [init] * len(group), "strength": strength, "generator": self._generators(group)})

    def _image_settings(self, prompt, init, path, strength, negative_prompt, steps, guidance, sampler, seed, width,
                        height, batch, loras, **extra):
        """Settings of an image-conditioned call: the output size defaults to the init image's, snapped."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise UsageError(f"strength must be a number in (0, 1], got {strength!r}")
        guards.check_strength(strength)
        if width is None or height is None:  # from the init image, its aspect ratio kept when one side is given
            w, h = init.width, init.height
            if width is not None:
                w, h = width, init.height * width / init.width
            elif height is not None:
                w, h = init.width * height / init.height, height
            snapped = snap_size(round(w), round(h), self.vae_scale_factor)
            width, height = width or snapped[0], height or snapped[1]
        settings = self._settings(prompt, negative_prompt, steps, guidance, sampler, seed, width, height, batch,
                                  list(loras), init_image=path, init_image_hash=pixel_hash(init),
                                  strength=float(strength), **extra)
        s = settings[0]
        if int(s.steps * s.strength) < 1:
            raise UsageError(f"strength {s.strength:g} of {s.steps} steps runs no denoising step; "
                             f"use a strength of at least {1 / s.steps:.2g} or more steps")
        return settings

    def _fit(self, image: Image.Image, s, what: str) -> Image.Image:
        """Resize an input to the output size, saying so."""
        if image.size == (s.width, s.height):
            return image
        f = self.vae_scale_factor
        snapped = snap_size(*image.size, f) == (s.width, s.height)
        why = f"sides must be multiples of {f}" if snapped else "the output size asked for"
        log.warning("%s %dx%d resized to %dx%d (%s)", what, image.width, image.height, s.width, s.height, why)
        return image.resize((s.width, s.height), Image.LANCZOS)
