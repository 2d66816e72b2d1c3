"""Hires fix (A1111's): a first pass at the asked size, upscaled, then redrawn by image-to-image at the larger size.

    result = Text2Image.from_pretrained()("a red circle", seed=1, hires=Hires(scale=2, denoise=0.7))

The upscale happens in latent space (`latent*` upscalers: the first pass's latents are interpolated, never
decoded) or on pixels (`lanczos`, `nearest`: decoded, resized, encoded again). The second pass's noise is
drawn afresh from each image's own seed at the larger latent shape, as A1111 draws it, so the result is a
function of the settings alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from t2i import guards
from t2i.choices import HIRES_UPSCALERS
from t2i.errors import UsageError, did_you_mean

DEFAULT_DENOISE = 0.7  # A1111's UI default for hires fix
DEFAULT_SCALE = 2.0


@dataclass(frozen=True)
class Upscaler:
    a1111: str  # A1111's name (its infotext and /sdapi/v1/upscalers, /latent-upscale-modes)
    mode: str | None = None  # torch.nn.functional.interpolate mode on latents; None: a pixel upscaler
    antialias: bool = False
    resample: int | None = None  # PIL resampling filter of a pixel upscaler


_MODES = {  # A1111's shared.latent_upscale_modes (interpolate mode, antialias) and its pixel upscalers' filters
    "latent": ("bilinear", False), "latent-antialiased": ("bilinear", True), "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True), "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False), "lanczos": Image.LANCZOS, "nearest": Image.NEAREST,
}
UPSCALERS = {name: Upscaler(a1111, *_MODES[name]) if isinstance(_MODES[name], tuple)
             else Upscaler(a1111, resample=_MODES[name]) for name, a1111 in HIRES_UPSCALERS.items()}
DEFAULT_UPSCALER = "latent"  # A1111's latent_upscale_default_mode


def upscaler_name(name: str | None) -> str:
    """The t2i name of an upscaler given by its t2i or A1111 name (any case); a one-line error otherwise."""
    if not name:
        return DEFAULT_UPSCALER
    by_any = {k: k for k in UPSCALERS} | {u.a1111.lower(): k for k, u in UPSCALERS.items()}
    found = by_any.get(str(name).strip().lower())
    if found is None:
        hint = did_you_mean(str(name), list(UPSCALERS) + [u.a1111 for u in UPSCALERS.values()])
        raise UsageError(f"unknown hires upscaler {name!r}{f' ({hint})' if hint else ''}; use one of: "
                         f"{', '.join(UPSCALERS)} (or A1111's names)")
    return found


@dataclass
class Hires:
    """What the second pass does: the size (`scale` times the first, or `width` x `height`: A1111's
    hr_resize_x/y, 0 = kept in the first pass's ratio), its `steps` (0 = as many as the first pass),
    its `denoise` strength in (0, 1] and the `upscaler` (see UPSCALERS)."""

    scale: float = DEFAULT_SCALE
    width: int = 0
    height: int = 0
    steps: int = 0
    denoise: float = DEFAULT_DENOISE
    upscaler: str = DEFAULT_UPSCALER

    def checked(self) -> "Hires":
        """The same settings with the upscaler's t2i name; a one-line UsageError for any out of range."""
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale <= 0:
            raise UsageError(f"hires scale must be a number above 0 (2 doubles each side), got {self.scale!r}")
        for name, value in (("hires width", self.width), ("hires height", self.height), ("hires steps", self.steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name} must be a whole number >= 0 (0: {'same as steps' if 'steps' in name else 'from the scale'}), got {value!r}")
        for name, value in (("hires width", self.width), ("hires height", self.height)):
            if value and value % 8:
                lo = value - value % 8
                raise UsageError(f"{name} {value} is not a multiple of 8; use {lo or 8}" + (f" or {lo + 8}" if lo else ""))
        if isinstance(self.denoise, bool) or not isinstance(self.denoise, (int, float)) \
                or not (0 < self.denoise <= 1):
            raise UsageError(f"hires denoising strength must be in (0, 1], got {self.denoise!r}")
        return Hires(float(self.scale), self.width, self.height, self.steps, float(self.denoise),
                     upscaler_name(self.upscaler))

    def steps_for(self, steps: int) -> int:
        """The denoising steps the second pass runs: `steps` (0: the first pass's), whatever the strength."""
        return self.steps or steps

    def schedule(self, steps: int) -> tuple[int, float]:
        """(schedule length, strength) of the second pass's image-to-image call, as A1111 runs hires steps
        (sd_samplers_common.setup_img2img_steps with steps given): N steps at strength d are the last N of a
        schedule of int(N / min(d, 0.999)) steps, so "Hires steps: N" runs N. The strength passed makes
        diffusers' int(total * strength) come out at N exactly."""
        n = self.steps_for(steps)
        total = max(n, int(n / min(self.denoise, 0.999)))
        return total, min(1.0, (n + 0.5) / total)


@dataclass(frozen=True)
class Plan:
    """Sizes of the second pass, in pixels: upscaled to up_w x up_h, then cropped to out_w x out_h."""

    up_w: int
    up_h: int
    out_w: int
    out_h: int


def plan(hires: Hires, width: int, height: int, f: int = 8) -> Plan:
    """A1111's hires target (processing.py calculate_target_resolution), floored to multiples of the VAE
    factor `f`: by scale; by one resize side (the other in the first pass's ratio); by both (upscaled to
    cover them, the overhang cropped evenly)."""
    if not hires.width and not hires.height:
        w, h = int(width * hires.scale), int(height * hires.scale)
        up = (w // f * f, h // f * f)
        out = up
    elif not hires.height:
        up = out = (hires.width, hires.width * height // width // f * f)
    elif not hires.width:
        up = out = (hires.height * width // height // f * f, hires.height)
    else:
        if width / height < hires.width / hires.height:
            up = (hires.width, hires.width * height // width // f * f)
        else:
            up = (hires.height * width // height // f * f, hires.height)
        out = (hires.width, hires.height)
    result = Plan(*up, *out)
    if min(result.out_w, result.out_h, result.up_w, result.up_h) < f:
        raise UsageError(f"the hires size {result.out_w}x{result.out_h} from {width}x{height} is too small; "
                         f"use a larger hires scale or size")
    guards.check_size(result.out_w, result.out_h, f)
    return result


def _crop(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """The centre out_h x out_w of (B, C, H, W), the odd row/column cut at the end, as A1111 truncates."""
    ty, tx = x.shape[-2] - out_h, x.shape[-1] - out_w
    return x[..., ty // 2: x.shape[-2] - (ty + 1) // 2, tx // 2: x.shape[-1] - (tx + 1) // 2]


def upscale_latents(latents: torch.Tensor, p: Plan, upscaler: str, f: int) -> torch.Tensor:
    """(B, C, h, w) first-pass latents -> (B, C, out_h / f, out_w / f), interpolated in float32."""
    u = UPSCALERS[upscaler]
    up = torch.nn.functional.interpolate(latents.float(), size=(p.up_h // f, p.up_w // f), mode=u.mode,
                                         antialias=u.antialias)  # (B, C, up_h/f, up_w/f)
    return _crop(up, p.out_h // f, p.out_w // f).to(latents.dtype)


def upscale_image(image: Image.Image, p: Plan, upscaler: str, f: int) -> Image.Image:
    """A decoded first-pass image resized to up_w x up_h with the upscaler's filter, then cropped in whole
    latent cells like upscale_latents."""
    up = image.resize((p.up_w, p.up_h), UPSCALERS[upscaler].resample)
    tx, ty = (p.up_w - p.out_w) // f, (p.up_h - p.out_h) // f
    left, top = tx // 2 * f, ty // 2 * f
    return up.crop((left, top, left + p.out_w, top + p.out_h))
