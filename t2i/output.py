"""Writing PNGs: numbered names in a folder, never overwriting, safe across processes.

Each image is written to a temporary file first and then linked to its final
name with `os.link` (`t2i.files.atomic_write`), which fails if the name exists: two `t2i generate`
processes writing into one folder can never replace each other's files, and
a crash never leaves a half-written PNG under a real name. A number is kept
only if no other file holds it once ours is in place, so two processes that
pick the same number at the same moment never both keep it.

Every file t2i writes for the user to keep (images here, LoRA files, exported
models) gets the mode a new file has under the user's umask: `give_usual_mode`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from t2i import metadata
from t2i.errors import UsageError
from t2i.files import atomic_write
from t2i.guards import check_writable_folder
from t2i.settings import Settings

_NUMBERED = re.compile(r"^(\d{5,})-")


def plan_paths(out: str | Path, count: int, overwrite: bool = False) -> tuple[Path | None, list[Path] | None]:
    """Check an --out target before any compute. Returns (folder, None) or (None, explicit file paths)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
        check_writable_folder(out.parent if str(out.parent) else Path("."))
        for p in paths:
            if p.exists() and not overwrite:
                raise UsageError(f"{p} exists; pass --overwrite to replace it, or choose another --out")
        return None, paths
    if out.suffix and not out.exists():
        raise UsageError(f"--out {out}: give a folder or a path ending in .png")
    return check_writable_folder(out), None


def next_number(folder: Path) -> int:
    """One past the highest NNNNN- prefix in the folder (A1111's numbering)."""
    best = -1
    for p in folder.iterdir():
        m = _NUMBERED.match(p.name)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def write_png(image: Image.Image, settings: Settings, path: Path, overwrite: bool = False) -> bool:
    """Write atomically; False (nothing written) if `path` exists and overwrite is off.

    A failed write (disk full, permissions) is a one-line StorageError and leaves `path` as it was.
    """
    try:
        with atomic_write(path, overwrite=overwrite) as tmp:
            image.save(tmp, format="PNG", pnginfo=metadata.png_info(settings))  # the name ends in .tmp
    except FileExistsError:
        return False
    return True


def _number_free(folder: Path, number: int, mine: Path) -> bool:
    """No file but `mine` has this NNNNN- prefix."""
    prefix = f"{number:05d}-"
    return not any(e.name.startswith(prefix) and e.name != mine.name for e in os.scandir(folder))


def save_images(images, settings: list[Settings], out: str | Path, overwrite: bool = False,
                names: list[str] | None = None) -> list[Path]:
    """Save images with metadata into a folder (NNNNN-SEED.png) or to explicit .png paths."""
    folder, paths = plan_paths(out, len(images), overwrite)
    written = []
    if paths is not None:
        for image, s, p in zip(images, settings, paths):
            if not write_png(image, s, p, overwrite):
                raise UsageError(f"{p} appeared while generating; not overwritten (pass --overwrite)")
            written.append(p)
        return written
    number = next_number(folder)
    for i, (image, s) in enumerate(zip(images, settings)):
        if names is not None:
            path = folder / names[i]
            if not write_png(image, s, path, overwrite):
                raise UsageError(f"{path} exists; pass --overwrite to replace it")
            written.append(path)
            continue
        while True:  # a number is taken, e.g. by another process writing into the same folder: try the next
            path = folder / f"{number:05d}-{s.seed}.png"
            if _number_free(folder, number, path) and write_png(image, s, path):
                if _number_free(folder, number, path):
                    break
                path.unlink()  # another process linked this number at the same moment: both move on
            number += 1
        written.append(path)
        number += 1
    return written
