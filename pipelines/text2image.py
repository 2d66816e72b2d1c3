"""Text2Image: prompt in, images and their exact settings out."""

from __future__ import annotations

from t2i.settings import LoraSpec

from t2i.pipelines.base import BasePipeline, Result


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
        scheduler: str | None = None,  # A1111's schedule type (t2i.samplers.SCHEDULES); None: automatic
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        loras: list[LoraSpec | str] = (),
        progress=True,
    ) -> Result:
        """Generate `batch` images; image i uses seed + i. Defaults come from the model."""
        settings = self._settings(prompt, negative_prompt, steps, guidance, sampler, seed, width, height, batch,
                                  list(loras), scheduler=scheduler)
        return self._generate(settings, progress, self._inputs)

    def _inputs(self, group) -> dict:
        latents, generators = self._noise(group)
        return {"latents": latents, "generator": generators, "height": group[0].height, "width": group[0].width}
