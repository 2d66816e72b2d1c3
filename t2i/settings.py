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
    # dynamic prompts: the template `prompt` was resolved from ("" when the prompt was written out); the JSON
    # chunk only: A1111's `parameters` holds the resolved prompt, which is what `reproduce` replays
    prompt_template: str = ""
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
