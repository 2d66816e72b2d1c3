"""Text2Image: prompt in, images and their exact settings out."""

from __future__ import annotations

import contextlib

from t2i.samplers import get_sampler
from t2i.settings import LoraSpec

from .base import BasePipeline, Result, per_image_unet


class Text2Image(BasePipeline):
    """Generate images from text with any SD 1.x/2.x/SDXL model (or the bundled demo model).

        pipe = Text2Image.from_pretrained()            # bundled t2i-shapes
        result = pipe("a red circle", seed=7, batch=4)
        for image, settings in result: ...

    Reusable in a loop without reloading; `.to("cuda")` moves it.
    """

    task = "text2image"
    diffusers_classes = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                         "sdxl": "StableDiffusionXLPipeline"}

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        loras: list[LoraSpec | str] = (),
        progress=True,
    ) -> Result:
        """Generate `batch` images; image i uses seed + i. Defaults come from the model."""
        # 1. Check inputs and fill defaults (one Settings per image)
        settings = self._settings(prompt, negative_prompt, steps, guidance, sampler, seed, width, height, batch,
                                  list(loras))
        s0 = settings[0]
        # 2. LoRAs (arguments and <lora:...> tags)
        text = self._prepare_loras(s0.prompt, s0.loras)
        # 3. Sampler
        sampler_info = get_sampler(s0.sampler)
        # 4. Prompt embeddings
        embeds = self._encode(text, s0.negative_prompt, s0.guidance)
        # 5-7. Noise, denoising and decoding, per group of images that may share a call
        groups = [[s] for s in settings] if sampler_info.batch_coupled else [settings]
        bar = self._progress(progress, len(groups))
        images = []
        try:
            for group in groups:
                images += self._generate(group, embeds, bar)
        finally:
            if bar is not None and progress is True:
                bar.close()
        return Result(images, settings)

    def _generate(self, group, embeds, bar):
        s0 = group[0]
        self.pipe.scheduler = self._scheduler(s0.sampler, s0.seed)
        latents, generators = self._noise(group)
        n = len(group)
        batched = {k: v.expand(n, *v.shape[1:]) for k, v in embeds.items()}
        with per_image_unet(self.pipe.unet, n) if self.exact_batch else contextlib.nullcontext():
            out = self.pipe(
                **batched,
                num_inference_steps=s0.steps,
                guidance_scale=s0.guidance,
                height=s0.height,
                width=s0.width,
                latents=latents,
                generator=generators,
                output_type="latent",
                callback_on_step_end=self._step_callback(bar),
            )
        return self._decode(out.images)

    def _scheduler(self, name, seed):
        from t2i.samplers import make_scheduler

        return make_scheduler(name, self._scheduler_config, seed=seed)
