"""PNG metadata: A1111's `parameters` text and t2i's full JSON settings.

A1111, ComfyUI's loaders, Civitai and most image browsers read the
`parameters` chunk, laid out as

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ...

(sampler and schedule apart, as A1111 1.9+ writes them: the schedule that ran, never left to
A1111's "automatic", which reads a missing Schedule type as the sampler's own).

The `t2i` chunk holds `Settings` as JSON (with library versions), which is
what `t2i reproduce` replays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from t2i.choices import HIRES_UPSCALERS
from t2i.errors import UsageError
from t2i.samplers import a1111_names
from t2i.settings import Settings

JSON_KEY = "t2i"
A1111_KEY = "parameters"


def _quote(value: str) -> str:
    """A1111 quotes a value that holds a separator (its infotext `quote`)."""
    value = str(value)
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",\n:") else value


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(s: Settings) -> str:
    """The A1111 `parameters` text for one image."""
    prompt = s.prompt
    for lora in s.loras:  # A1111 keeps LoRAs in the prompt; add the ones given on the command line
        tag = f"<lora:{lora.name}:"
        if tag not in prompt:
            prompt = f"{prompt} <lora:{lora.name}:{_fmt_number(lora.scale)}>".strip()
    lines = [prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    sampler, schedule = a1111_names(s.sampler, s.scheduler)
    fields: list[tuple[str, str]] = [
        ("Steps", str(s.steps)),
        ("Sampler", sampler),
        *([("Schedule type", schedule)] if schedule else []),
        ("CFG scale", _fmt_number(s.guidance)),
        ("Seed", str(s.seed)),
        ("Size", f"{s.width}x{s.height}"),
    ]
    if s.model_hash:
        fields.append(("Model hash", s.model_hash[:10]))
    if s.model_name:
        fields.append(("Model", s.model_name))
    fields += _vae_fields(s)
    if s.strength is not None:
        fields.append(("Denoising strength", _fmt_number(s.strength)))
    fields += _clip_skip_and_hires_fields(s)
    if s.mask_blur is not None:
        fields.append(("Mask blur", str(s.mask_blur)))
    if s.invert_mask:
        fields.append(("Mask mode", "Inpaint not masked"))
    if s.autoguidance:
        fields += [("Autoguidance", _fmt_number(s.autoguidance)), ("Autoguidance below", str(s.autoguidance_below))]
    if s.loras:
        fields.append(("Lora hashes", ", ".join(f"{l.name}: {l.hash[:12]}" for l in s.loras)))
    if s.embeddings:  # A1111 drops ':' and ',' from the names in this field
        fields.append(("TI hashes", ", ".join(f"{re.sub('[:,]', '', e.name)}: {e.hash[:12]}" for e in s.embeddings)))
    fields.append(("Version", f"t2i {s.versions.get('t2i', '')}".strip()))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def _vae_fields(s: Settings) -> list[tuple[str, str]]:
    """A1111's "VAE hash" and "VAE" (the file name) of a VAE override; none for the model's own."""
    if not s.vae:
        return []
    return [("VAE hash", s.vae_hash[:10]), ("VAE", s.vae_name)]


def _clip_skip_and_hires_fields(s: Settings) -> list[tuple[str, str]]:
    """A1111's "Clip skip" (above 1 only) and hires fix fields: "Denoising strength", "Hires upscale" (or
    "Hires resize"), "Hires steps" (when not the first pass's), "Hires upscaler"."""
    fields = []
    if s.hires_upscaler and s.strength is None:
        fields.append(("Denoising strength", _fmt_number(s.hires_denoise)))
    if s.clip_skip > 1:
        fields.append(("Clip skip", str(s.clip_skip)))
    if s.hires_upscaler:
        if s.hires_width or s.hires_height:
            fields.append(("Hires resize", f"{s.hires_width}x{s.hires_height}"))
        else:
            fields.append(("Hires upscale", _fmt_number(s.hires_scale)))
        if s.hires_steps:
            fields.append(("Hires steps", str(s.hires_steps)))
        fields.append(("Hires upscaler", HIRES_UPSCALERS.get(s.hires_upscaler, s.hires_upscaler)))
    return fields


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    """Parse A1111 `parameters` text into {"Prompt", "Negative prompt", "Steps", ...} strings."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_FIELD.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt).strip()}
    if in_negative:
        out["Negative prompt"] = "\n".join(negative).strip()
    for key, value in _FIELD.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key.strip()] = value
    return out


def png_info(settings: Settings) -> PngInfo:
    info = PngInfo()
    info.add_text(A1111_KEY, a1111_parameters(settings))  # tEXt, or iTXt when not Latin-1
    info.add_text(JSON_KEY, json.dumps(settings.to_dict(), ensure_ascii=False, sort_keys=True))
    return info


def read(path: str | Path) -> tuple[str | None, Settings | None]:
    """(A1111 parameters text, t2i Settings) stored in an image; either may be None."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            text.update({k: v for k, v in im.info.items() if isinstance(v, str)})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path} is not a readable image ({e.__class__.__name__})") from None
    settings = None
    if JSON_KEY in text:
        try:
            data = json.loads(text[JSON_KEY])
            if not isinstance(data, dict):
                raise TypeError("not an object")
            settings = Settings.from_dict(data)
        except (json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
            raise UsageError(f"{path} has a malformed t2i metadata chunk") from None
    return text.get(A1111_KEY), settings


def grid_png_info(settings: Settings, fields: dict[str, str], record: dict) -> PngInfo:
    """A grid's chunks, as A1111 writes them: the first image's `parameters` with the grid's own fields added
    (Script: X/Y/Z plot, X Type, X Values, ...); the JSON chunk is the first image's settings plus a `grid`
    record (t2i.grid.json_record: its axes and each cell's file)."""
    info = PngInfo()
    extra = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
    info.add_text(A1111_KEY, f"{a1111_parameters(settings)}, {extra}")
    info.add_text(JSON_KEY, json.dumps({**settings.to_dict(), "grid": record}, ensure_ascii=False, sort_keys=True))
    return info


def is_grid(parameters: str | None) -> bool:
    """Whether an image's A1111 `parameters` are a grid's (A1111's X/Y/Z plot fields, as `grid_png_info` writes)."""
    return bool(parameters) and parse_a1111(parameters).get("Script") == "X/Y/Z plot"
