"""Fine-tuning data: a folder of images with captions, bucketed by aspect ratio.

A dataset is a folder of images, each captioned by a `.txt` file beside it
(`cat.png` + `cat.txt`) or by a `metadata.jsonl` line
`{"file_name": "cat.png", "text": "..."}`. An image with no caption gets the
trigger alone. An optional second folder of regularisation images (kohya's
`reg_data_dir`) is trained on its captions without the trigger, so that
prompts without the trigger keep the base model's look. Every image is opened once while scanning: unreadable images
and captions are skipped and reported, and an empty result is an error that
says what was found.

Batches come from one aspect-ratio bucket at a time. The order of an epoch
is a pure function of (seed, epoch), so the data position after a resume is
fixed by the step number alone.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i.errors import UsageError
from t2i.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str  # without the trigger
    size: tuple[int, int]  # (width, height) of the file
    reg: bool = False  # a regularisation image: trained on its caption as is, never with the trigger


@dataclass
class Dataset:
    items: list[Item]
    skipped: list[str] = field(default_factory=list)  # "name: why", for the report

    def report(self) -> str:
        text = f"{len(self.items)} images"
        if self.skipped:
            text += f", {len(self.skipped)} skipped: " + "; ".join(self.skipped[:5])
            text += f" (+{len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return text


def _jsonl_captions(folder: Path, skipped: list[str]) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({type(e).__name__}); fix or remove it") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row.get("text", row.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped.append(f"metadata.jsonl line {n}: not a JSON object with file_name")
    return captions


def scan(folder: str | Path, reg: bool = False) -> Dataset:
    """Find and vet the images and captions in `folder` (not recursive); `reg` marks regularisation images."""
    folder = Path(folder)
    flag = "--reg-data" if reg else "--data"
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is not a folder")
    skipped: list[str] = []
    from_jsonl = _jsonl_captions(folder, skipped)
    items = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as img:
                img.load()  # decodes everything: truncated files fail here, not mid-epoch
                size = img.size
        except Exception as e:  # PIL raises many types for broken files
            skipped.append(f"{path.name}: not a readable image ({type(e).__name__})")
            continue
        caption = from_jsonl.get(path.name, "")
        txt = path.with_suffix(".txt")
        if path.name not in from_jsonl and txt.is_file():
            try:
                caption = txt.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                skipped.append(f"{path.name}: caption {txt.name} unreadable ({type(e).__name__})")
                continue
        items.append(Item(path, " ".join(caption.split()), size, reg))
    if not items:
        found = sorted({p.suffix.lower() or p.name for p in folder.iterdir()})
        why = f"; skipped: {'; '.join(skipped[:3])}" if skipped else ""
        raise UsageError(f"{flag} {folder} holds no usable images (found: {', '.join(found) or 'nothing'}){why}; "
                         f"use .png/.jpg/.webp files with a .txt caption beside each")
    return Dataset(items, skipped)


def merge(a: Dataset, b: Dataset) -> Dataset:
    return Dataset(a.items + b.items, a.skipped + b.skipped)


def with_trigger(caption: str, trigger: str) -> str:
    """'a red circle' + 'in sks style' -> 'a red circle, in sks style'; no caption -> the trigger alone."""
    if not trigger:
        return caption
    return f"{caption}, {trigger}" if caption else trigger


# --------------------------------------------------------------------------- buckets


def bucket_sizes(resolution: int, step: int, max_ratio: float = 2.5) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with about resolution**2 pixels, aspect ratio up to max_ratio."""
    sizes = set()
    w = step
    while w <= resolution * max_ratio:
        h = max(step, int(resolution * resolution / w) // step * step)
        if 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((w, h))
        w += step
    sizes.add((resolution, resolution))
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size`, then centre-crop to it."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((rw, rh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3)
    return a.permute(2, 0, 1) / 127.5 - 1.0


class BatchPlan:
    """Which items form batch k of the run: bucketed, shuffled per epoch, reproducible from the step alone."""

    def __init__(self, dataset: Dataset, buckets: list[tuple[int, int]] | None, resolution: int, batch: int, seed: int):
        self.batch = batch
        self.seed = seed
        if buckets:
            self.bucket_of = [nearest_bucket(it.size, buckets) for it in dataset.items]
        else:
            self.bucket_of = [(resolution, resolution)] * len(dataset.items)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.groups.setdefault(b, []).append(i)
        # batches per epoch; a bucket smaller than the batch still forms one (smaller) batch
        self.per_epoch = sum(math.ceil(len(g) / batch) for g in self.groups.values())
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def epoch(self, n: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + n)
        batches = []
        for _, idx in sorted(self.groups.items()):
            idx = idx[:]
            rng.shuffle(idx)
            batches += [idx[i:i + self.batch] for i in range(0, len(idx), self.batch)]
        rng.shuffle(batches)
        return batches

    def __getitem__(self, k: int) -> list[int]:
        """Batch number k of the whole run (k counts micro-batches across processes)."""
        n = k // self.per_epoch
        if self._cached[0] != n:
            self._cached = (n, self.epoch(n))
        return self._cached[1][k % self.per_epoch]
