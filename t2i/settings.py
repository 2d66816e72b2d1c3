"""The exact settings that made one image: what metadata stores and `reproduce` replays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LoraSpec:
    path: str
    scale: float = 1.0
    name: str = ""  # file stem, what A1111 calls the network
    hash: str = ""  # A1111's short hash (12 hex of the tensor-data sha256)


@dataclass
class EmbeddingSpec:
    """A textual-inversion embedding a prompt called (see t2i.embeddings)."""

    name: str  # the file's stem, the word in the prompt
    hash: str = ""  # A1111's short hash (12 hex of the file's sha256), its `TI hashes` entry
    path: str = ""


@dataclass
class Settings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpm++2m-karras"
    guidance: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""  # what was asked for: a path, a hub id, or "" for the bundled model
    model_name: str = ""
    model_hash: str = ""
    model_config: str = ""  # the --model-config folder a single-file checkpoint was built with
    arch: str = ""  # sd1 | sd2 | sdxl
    loras: list[LoraSpec] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "fp32"
    pipeline: str = "text2image"
    # image-to-image and inpainting
    init_image: str | None = None
    init_image_hash: str | None = None
    mask_image: str | None = None
    mask_image_hash: str | None = None
    strength: float | None = None
    mask_blur: int | None = None  # inpainting: pixels of Gaussian blur on the mask
    invert_mask: bool = False  # inpainting: repaint the black part instead
    # autoguidance with the model's guide/ UNet below that timestep (0: off, classifier-free guidance throughout)
    autoguidance: float = 0.0
    autoguidance_below: int = 0
    speed: list[str] = field(default_factory=list)  # t2i.speed options the image was made with (names)
    batch_size: int = 1  # images made in the same call: reproduce replays the whole call
    batch_index: int = 0  # position in that call (the seed is already per image)
    versions: dict[str, str] = field(default_factory=dict)
    # A1111's everyday set (issue 29). Clip skip in A1111's count: 1 = the encoder's last layer, 2 = the one
    # before it through the final layer norm (SD 1.x; SD 2.x and SDXL ignore it, as in A1111).
    clip_skip: int = 1
    # A VAE decoding (and encoding) in place of the model's own: as given, A1111's "VAE" (the file name) and
    # "VAE hash" (sha256 of the file, 10 hex; of its weights for a diffusers folder). "" = the model's own.
    vae: str = ""
    vae_name: str = ""
    vae_hash: str = ""
    # Hires fix: the first pass at width x height, upscaled (t2i.pipelines.hires.UPSCALERS; "" = off) to
    # hires_scale times that size or to hires_width x hires_height (A1111's hr_resize_x/y; 0 = from the
    # other side's ratio), then redrawn by image-to-image with hires_steps (0 = steps) at hires_denoise.
    hires_upscaler: str = ""
    hires_scale: float = 0.0
    hires_width: int = 0
    hires_height: int = 0
    hires_steps: int = 0
    hires_denoise: float = 0.0
    # dynamic prompts: the template `prompt` was resolved from ("" when the prompt was written out); the JSON
    # chunk only: A1111's `parameters` holds the resolved prompt, which is what `reproduce` replays
    prompt_template: str = ""
    # The schedule the sampler ran on (t2i.samplers.SCHEDULES key, never "automatic" unless the sampler takes
    # none); "": an image made before t2i had schedules, whose sampler name says it ("dpm++2m-karras").
    scheduler: str = ""
    # textual-inversion embeddings the prompt and negative prompt called, recorded as A1111's `TI hashes`
    embeddings: list[EmbeddingSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["loras"] = [LoraSpec(**l) for l in data.get("loras", [])]
        data["embeddings"] = [EmbeddingSpec(**e) for e in data.get("embeddings", [])]
        return cls(**data)
