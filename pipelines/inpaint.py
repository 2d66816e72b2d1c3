"""Inpaint: redraw the white part of a mask, keep the rest of the init image pixel for pixel."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from t2i.errors import UsageError
from t2i.images import as_mask, check_mask, pixel_hash, read_input
from t2i.settings import LoraSpec
from t2i.speed import per_call

from t2i.pipelines.base import Result
from t2i.pipelines.image2image import DEFAULT_STRENGTH, Image2Image

log = logging.getLogger(__name__)

DEFAULT_MASK_BLUR = 4  # A1111's default, in pixels


class Inpaint(Image2Image):
    """A1111-style inpainting with any SD model (a 4-channel UNet blends the kept latents each step;
    an inpainting UNet with 9 input channels gets the mask and masked image as well).

        inpaint = Inpaint.from_pipe(Text2Image.from_pretrained())
        result = inpaint("a blue star", "scene.png", "mask.png", strength=1.0, seed=3)

    Mask: white repaints, black keeps (any mode; transparent counts as black);
    `invert_mask` swaps them. The mask is blurred by `mask_blur` pixels, and
    the original is pasted back through the blurred mask, so pixels it does
    not touch stay exactly as they were (A1111's overlay). A mask of another
    size than the init image is resized to it, with a notice.
    """

    task = "inpaint"
    diffusers_classes = {"sd1": "StableDiffusionInpaintPipeline", "sd2": "StableDiffusionInpaintPipeline",
                         "sdxl": "StableDiffusionXLInpaintPipeline"}

    @per_call  # the pipeline's speed mode (pipe.speed: "auto" by default) on for the call
    def __call__(
        self,
        prompt: str,
        init_image: str | Path | Image.Image,
        mask: str | Path | Image.Image,
        *,
        strength: float = DEFAULT_STRENGTH,
        mask_blur: int = DEFAULT_MASK_BLUR,
        invert_mask: bool = False,
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
        """Repaint the masked part of `init_image` `batch` times; image i uses seed + i."""
        init, init_path = read_input(init_image, "init image")
        mask_img, mask_path = read_input(mask, "mask", convert=as_mask)
        if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or mask_blur < 0:
            raise UsageError(f"mask blur must be a whole number of pixels >= 0, got {mask_blur!r}")
        check_mask(mask_img, invert_mask)
        settings = self._image_settings(
            prompt, init, init_path, strength, negative_prompt, steps, guidance, sampler, seed, width, height, batch,
            loras, mask_image=mask_path, mask_image_hash=pixel_hash(mask_img), mask_blur=mask_blur,
            invert_mask=bool(invert_mask), scheduler=scheduler)
        if mask_img.size != init.size:
            log.warning("mask %dx%d resized to the init image's %dx%d", mask_img.width, mask_img.height,
                        init.width, init.height)
            mask_img = mask_img.resize(init.size, Image.BILINEAR)  # no ringing past the edge
        if invert_mask:
            mask_img = ImageOps.invert(mask_img)
        s0 = settings[0]
        init = self._fit(init, s0, "init image")
        mask_img = mask_img.resize((s0.width, s0.height), Image.BILINEAR) if mask_img.size != init.size else mask_img
        soft = mask_img.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else mask_img

        def inputs(group):
            n = len(group)
            return {"image": [init] * n, "mask_image": [soft] * n, "strength": s0.strength,
                    "generator": self._generators(group), "height": s0.height, "width": s0.width}

        def paste_back(group, images):  # the original wherever the blurred mask is 0, blended at its edge
            return [Image.composite(img.convert("RGB"), init, soft) for img in images]

        return self._generate(settings, progress, inputs, paste_back)
