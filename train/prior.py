"""Prior preservation: the base model's own images of the data's captions, trained beside the data.

A LoRA trained on style images alone learns more than the style: prompts without the trigger drift
towards the data too, and lose content the base model drew right. Regularisation images (kohya's
`reg_data_dir`, DreamBooth's prior preservation) hold that back: each trains on its caption without the
trigger, so the LoRA learns "caption -> what the base model drew" there and "caption + trigger -> the
data" on the data. When the user gives no `--reg-data`, `t2i train lora` makes them: one image per data
image, of its caption (the trigger is never in it), by the base model before the adapters are added, at a
fixed seed each. They are written to OUT/prior/ as NNNN.png + NNNN.txt with a prior.json naming the base
model, once: a resumed or restarted run reuses every image whose caption and base model still match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from t2i.files import atomic_write
from t2i.train.data import Dataset, scan

log = logging.getLogger(__name__)

FOLDER = "prior"
MANIFEST = "prior.json"


def wanted(dataset: Dataset) -> list[str]:
    """The captions to draw: one per data image (regularisation images have their own), the trigger never in them."""
    return [it.caption for it in dataset.items if not it.reg]


def _read(manifest: Path) -> dict:
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def missing(folder: Path, captions: list[str], model_hash: str, seed: int, steps: int = 0) -> list[int]:
    """Which images of `captions` are not in `folder` yet (all of them when it holds another base model's, or
    another seed's or step count's)."""
    made = _read(folder / MANIFEST)
    if (made.get("base_model_hash"), made.get("seed"), made.get("steps", 0)) != (model_hash, seed, steps):
        return list(range(len(captions)))
    out = []
    for i, caption in enumerate(captions):
        png, txt = folder / f"{i:04d}.png", folder / f"{i:04d}.txt"
        try:
            same = png.is_file() and txt.read_text(encoding="utf-8").strip() == caption
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            out.append(i)
    return out


def draw(pipe, dataset: Dataset, folder: Path, seed: int, steps: int = 0) -> int:
    """Draw the base model's image of each data caption into `folder`, only those not there yet, with a progress
    bar; returns how many were drawn. `pipe` must be the base model, without the LoRA; `steps`: its sampling
    steps (0: its default)."""
    captions = wanted(dataset)
    todo = missing(folder, captions, pipe.model.hash, seed, steps)
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"base_model": pipe.model.source.name, "base_model_hash": pipe.model.hash, "seed": seed,
                    "steps": steps, "images": len(captions)}
        if _read(folder / MANIFEST) != manifest:
            with atomic_write(folder / MANIFEST) as tmp:
                tmp.write_text(json.dumps(manifest) + "\n")
        for f in folder.glob("[0-9][0-9][0-9][0-9].*"):  # a longer earlier list's leftovers would join the scan
            if f.suffix in (".png", ".txt") and f.stem.isdigit() and int(f.stem) >= len(captions):
                f.unlink()
        log.info("prior preservation: drawing %d of %d base-model images into %s (once; --no-prior turns it off)",
                 len(todo), len(captions), folder)
        for i in tqdm(todo, desc="prior images", leave=False):
            image = pipe(captions[i], seed=seed + i, steps=steps or None, progress=False).images[0]
            with atomic_write(folder / f"{i:04d}.png") as tmp:
                image.save(tmp, format="PNG")
            txt = folder / f"{i:04d}.txt"
            if not (txt.is_file() and txt.read_text(encoding="utf-8", errors="replace").strip() == captions[i]):
                with atomic_write(txt) as tmp:
                    tmp.write_text(captions[i] + "\n", encoding="utf-8")
    return len(todo)


def images(folder: Path) -> Dataset:
    """The drawn images as regularisation items (trained on their captions, never with the trigger)."""
    return scan(folder, reg=True)
