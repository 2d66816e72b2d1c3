"""Text2Image: prompt in, images and their exact settings out."""

from __future__ import annotations

from dataclasses import replace

import torch

from t2i import guards
from t2i.settings import LoraSpec
from t2i.speed import per_call

from t2i.pipelines import hires as hr
from t2i.pipelines.base import BasePipeline, Result


class Text2Image(BasePipeline):
    """Generate images from text with any SD 1.x/2.x/SDXL model (or the bundled demo model).

        pipe = Text2Image.from_pretrained()            # bundled t2i-shapes
        result = pipe("a red circle", seed=7, batch=4)
        for image, settings in result: ...
        pipe("a red circle", seed=7, hires=Hires(scale=2))   # A1111's hires fix (t2i.pipelines.hires)

    Reusable in a loop without reloading; `.to("cuda")` moves it.
    """

    task = "text2image"
    diffusers_classes = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                         "sdxl": "StableDiffusionXLPipeline"}

    @per_call  # the pipeline's speed mode (pipe.speed: "auto" by default) on for the call
    def __call__(
        self,
        prompt: str,
        *,
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
        hires: hr.Hires | None = None,
        progress=True,
    ) -> Result:
        """Generate `batch` images; image i uses seed + i. Defaults come from the model. With `hires`, each is
        made at width x height, upscaled and redrawn at the hires size (A1111's hires fix)."""
        extra = {}
        if hires is not None:
            hires = hires.checked()
            extra = {"hires_upscaler": hires.upscaler, "hires_scale": hires.scale, "hires_width": hires.width,
                     "hires_height": hires.height, "hires_steps": hires.steps, "hires_denoise": hires.denoise}
        settings = self._settings(prompt, negative_prompt, steps, guidance, sampler, seed, width, height, batch,
                                  list(loras), scheduler=scheduler, **extra)
        if hires is None:
            return self._generate(settings, progress, self._inputs)
        return self._hires(settings, hires, progress)

    def _inputs(self, group) -> dict:
        latents, generators = self._noise(group)
        return {"latents": latents, "generator": generators, "height": group[0].height, "width": group[0].width}

    # ------------------------------------------------------------------ hires fix

    def hires_plan(self, s, hires: hr.Hires) -> hr.Plan:
        """The second pass's size for settings `s`, checked against the memory budget before any work."""
        plan = hr.plan(hires, s.width, s.height, self.vae_scale_factor)
        guards.check_memory(self.memory_estimate(s.batch_size, plan.out_w, plan.out_h), self.device,
                            f"the hires size {plan.out_w}x{plan.out_h} is too large: use a smaller hires scale "
                            "or size, or a smaller batch")
        return plan

    def _hires(self, settings, hires: hr.Hires, progress) -> Result:
        """First pass, upscale, then image-to-image at the hires size on the same modules; one bar over both."""
        plan = self.hires_plan(settings[0], hires)
        f, latent = self.vae_scale_factor, hr.UPSCALERS[hires.upscaler].mode is not None
        bar = self._progress(progress, 2)
        try:
            # 1. First pass: latents kept for a latent upscaler (never decoded, as in A1111), else images.
            keep = (lambda latents: list(latents.split(1))) if latent else None  # [(1, C, h, w)]
            first = self._generate(settings, bar, self._inputs, decode=keep).images
            # 2. Upscale.
            if latent:
                upscaled = [hr.upscale_latents(x, plan, hires.upscaler, f) for x in first]  # [(1, C, H, W)]
            else:
                upscaled = [hr.upscale_image(im, plan, hires.upscaler, f) for im in first]
            # 3. Second pass: image-to-image at the larger size, its noise drawn afresh from each image's seed.
            total, strength = hires.schedule(settings[0].steps)
            second = [replace(s, steps=total, width=plan.out_w, height=plan.out_h) for s in settings]

            def inputs(group) -> dict:
                images = [upscaled[s.batch_index] for s in group]
                return {"image": torch.cat(images) if latent else images, "strength": strength,
                        "generator": self._generators(group)}

            images = self._second_pass()._generate(second, bar, inputs).images
        finally:
            if bar is not None and progress is True:
                bar.close()
        return Result(images, settings)

    def _second_pass(self):
        """An Image2Image over the same modules (no reload), running as this pipeline runs now."""
        from t2i.pipelines.image2image import Image2Image

        other = Image2Image.from_pipe(self)
        other.exact_batch, other.speed, other.decoder, other.on_step = \
            self.exact_batch, self.speed, self.decoder, self.on_step
        return other
