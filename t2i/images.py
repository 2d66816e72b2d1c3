"""Reading user images: any common mode and bit depth in, 8-bit RGB out.

Used for training data and for img2img/inpaint inputs and masks. A file that is not
an image is a one-line `UsageError`; nothing here guesses silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from t2i.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha is composited over `background`, 16-bit is scaled, CMYK/P/L converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)  # (H, W); 16-bit or 32-bit integers
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")  # a palette may carry transparency
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def load_rgb(path: str | Path, convert=to_rgb) -> Image.Image:
    """Open an image file fully (so corrupt data fails here) as 8-bit RGB (or what `convert` makes of it)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path} is not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def read_input(source: str | Path | Image.Image, what: str = "init image", convert=to_rgb
               ) -> tuple[Image.Image, str | None]:
    """An img2img/inpaint input as 8-bit RGB (or `convert`'s mode), and its absolute path (None: in memory)."""
    if isinstance(source, Image.Image):
        return convert(source), None
    if not isinstance(source, (str, Path)):
        raise UsageError(f"{what} must be a path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        return load_rgb(path, convert), str(path.resolve())
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None


def as_mask(img: Image.Image) -> Image.Image:
    """A mask in mode L from any mode: white repaints, black keeps; transparent pixels keep (over black)."""
    return to_rgb(img, background=(0, 0, 0)).convert("L")


def pixel_hash(img: Image.Image) -> str:
    """SHA-256 (16 hex) of an image's size, mode and pixels: the same picture gives the same hash in any file."""
    h = hashlib.sha256(f"{img.mode} {img.width}x{img.height}\n".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:16]


def snap_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The nearest size whose sides are multiples of `multiple` (at least one multiple each)."""
    return tuple(max(multiple, int(v / multiple + 0.5) * multiple) for v in (width, height))


def check_mask(mask: Image.Image, invert: bool = False) -> None:
    """Refuse a mask that repaints nothing (all black, or all white when inverted)."""
    lo, hi = mask.getextrema()
    if (lo if invert else hi) == (255 if invert else 0):
        raise UsageError("the mask is all " + ("white: with --invert-mask nothing is repainted" if invert else
                                              "black: nothing to repaint (white marks the area to redraw)"))
