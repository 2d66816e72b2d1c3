"""What a model argument names, without loading anything: the bundled model, a folder, a file or a hub id.

`resolve(model)` is cheap, so every front end can check a model argument before
any work; `arch_of_folder` / `arch_of_keys` tell SD 1.x, 2.x and SDXL apart;
`model_hash` is A1111's "Model hash".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from t2i.errors import ModelLoadError, UsageError, did_you_mean
from t2i.files import WEIGHT_SUFFIXES, file_sha256


BUNDLED_NAME = "t2i-shapes"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # bundled | folder | single_file | hub
    location: str  # path or hub id
    name: str  # what A1111 shows as "Model"
    asked: str = ""  # what the user typed ("" for the bundled model)


def bundled_model_path() -> Path | None:
    """Where the bundled demo model lives in this install, or None if it is not there."""
    try:
        root = resources.files("t2i.assets") / BUNDLED_NAME
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "model_index.json").is_file() else None


def is_hub_id(text: str) -> bool:
    """`org/name` that is not a path someone meant (./x, /x, ~/x, a weights file name)."""
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1] \
        or path.suffix.lower() in WEIGHT_SUFFIXES or text.count("/") != 1
    return not looks_like_path and bool(_HUB_ID.match(text))


def resolve(model: str | None) -> ModelSource:
    """Decide what `model` names, checking that local paths exist; loads nothing."""
    if model is None or model == "":
        path = bundled_model_path()
        if path is None:
            raise ModelLoadError(
                f"the bundled demo model {BUNDLED_NAME} is not in this install; pass --model PATH_OR_HUB_ID"
            )
        return ModelSource("bundled", str(path), BUNDLED_NAME, "")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{path} is a folder without model_index.json; give a diffusers model folder or a checkpoint file")
        return ModelSource("folder", str(path), path.resolve().name, model)
    if path.is_file():
        return ModelSource("single_file", str(path), path.stem, model)
    if not is_hub_id(model):
        near = {name: os.path.join(os.path.dirname(model), name) for name in _models_in(path.parent)}  # as typed
        hint = did_you_mean(path.name, near)
        raise UsageError(f"model {model} does not exist{f' ({hint})' if hint else ''}; give a diffusers folder, "
                         "a .safetensors file or a hub id (org/name)")
    return ModelSource("hub", model, model.split("/")[-1], model)


def _models_in(folder: Path) -> list[str]:
    """Names of the model folders and weights files in a folder (none if it is not one)."""
    try:
        return [p.name for p in folder.iterdir()
                if (p / "model_index.json").is_file() or p.suffix.lower() in WEIGHT_SUFFIXES]
    except OSError:
        return []


def arch_of_folder(path: Path) -> str:
    """'sdxl', 'sd2' or 'sd1' for a diffusers folder."""
    index = json.loads((path / "model_index.json").read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "sd1"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def arch_of_keys(keys) -> str:
    """'sdxl', 'sd2' or 'sd1' from an original (LDM) single-file checkpoint's tensor names."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith(("cond_stage_model.transformer.", "model.diffusion_model.")) for k in keys):
        return "sd1"
    raise ModelLoadError("checkpoint is not a Stable Diffusion 1.x/2.x/SDXL model (unknown tensor names)")


def model_hash(source: ModelSource, folder: Path | None = None) -> str:
    """A1111's "Model hash" (sha256, first 10 hex) for a file; for a folder, over its weights."""
    if source.kind == "single_file":
        return file_sha256(source.location)[:10]
    folder = folder or Path(source.location)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:10]
